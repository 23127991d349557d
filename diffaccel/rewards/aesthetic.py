"""The LAION aesthetic predictor: an MLP head on L2-normalized CLIP ViT-L/14 image embeddings.

The head's weights come from a user path, in safetensors only (convert the published
``sac+logos+ava1-l14-linearMSE.pth`` once with ``safetensors.torch.save_file``); its keys are the
original ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6`` and ``layers.7``.

Example:
    >>> reward = AestheticReward.from_open_clip("aesthetic_head.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch

from .base import Reward
from .clip import CLIPScoreReward


class AestheticHead(torch.nn.Module):
    """The predictor's MLP (dropouts are inactive in eval mode): embedding (N, D) -> score (N, 1).

    Example:
        >>> AestheticHead(8)(torch.zeros(2, 8)).shape
        torch.Size([2, 1])
    """

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AestheticHead:
        """Load the head from a ``.safetensors`` file (the only format accepted)."""
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            raise ValueError(f"the aesthetic head must be a .safetensors file, got {path!r}")
        state = load_file(path)
        head = cls(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head.eval()


class AestheticReward(Reward):
    """Aesthetic score (about 1-10 with the real weights) of images, from a CLIP image encoder and a head.

    Args:
        clip: a :class:`CLIPScoreReward` whose image encoder feeds the head (ViT-L/14 for the real head).
        head: the :class:`AestheticHead`; its input size must match the CLIP embedding size.
    """

    name = "aesthetic"

    def __init__(self, clip: CLIPScoreReward, head: AestheticHead) -> None:
        self.clip, self.head = clip, head.eval()

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeddings = self.clip.image_embeddings(images)
        head_dtype = next(self.head.parameters()).dtype
        return self.head(embeddings.to(head_dtype)).squeeze(-1).float()

    @classmethod
    def from_open_clip(
        cls,
        head_path: str | os.PathLike,
        model_name: str = "ViT-L-14",
        pretrained: str | None = "openai",
        device: str | torch.device = "cpu",
        **kwargs: object,
    ) -> AestheticReward:
        """The head from ``head_path`` on an open_clip image encoder (ViT-L/14 from the user's cache by default)."""
        head = AestheticHead.from_file(head_path).to(device)
        return cls(CLIPScoreReward.from_open_clip(model_name, pretrained=pretrained, device=device, **kwargs), head)
