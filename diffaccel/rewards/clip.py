"""CLIP score: 100 x the cosine similarity of a CLIP model's image and text embeddings.

Works with any open_clip model (:meth:`CLIPScoreReward.from_open_clip`, weights from the user's
cache or a local file) and with a transformers ``CLIPModel`` saved in a local folder
(:meth:`CLIPScoreReward.from_transformers`, e.g. the micro-CLIP model). Images are resized and
normalized on the reward's device as tensors; text embeddings are cached per prompt.

Example (random weights, so the score itself means nothing):
    >>> import open_clip, torch
    >>> reward = CLIPScoreReward.from_open_clip("RN50", pretrained=None)  # doctest: +SKIP
    >>> reward(torch.rand(2, 3, 64, 64), "a red circle").shape  # doctest: +SKIP
    torch.Size([2])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .base import Reward

#: OpenAI CLIP's image normalization (used when a model does not say otherwise).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize the short side to ``size``, center-crop, normalize: CLIP's preprocessing on tensors."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    if resized != (height, width):
        images = F.interpolate(images, size=resized, mode="bicubic", align_corners=False, antialias=True)
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    images = images[..., top : top + size, left : left + size].clamp(0, 1)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def _features(output: object) -> torch.Tensor:
    """transformers 5 returns model outputs from ``get_*_features``; older versions return tensors."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


class CLIPScoreReward(Reward):
    """CLIP score from an image encoder and a text encoder.

    Args:
        model: the CLIP module (moved by :meth:`to`).
        encode_images: preprocessed pixels (N, 3, S, S) -> embeddings (N, D).
        encode_texts: list of prompts -> embeddings (N, D), on the model's device.
        image_size, mean, std: the model's preprocessing.
    """

    name = "clip_score"
    worst = -100.0

    def __init__(
        self,
        model: torch.nn.Module,
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        encode_texts: Callable[[list[str]], torch.Tensor],
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        self.model = model.eval()
        self.encode_images, self.encode_texts = encode_images, encode_texts
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self._text_cache: dict[str, torch.Tensor] = {}

    def to(self, device: str | torch.device) -> CLIPScoreReward:
        self._text_cache = {}
        return super().to(device)  # type: ignore[return-value]

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized embeddings of (N, 3, H, W) images in [0, 1]."""
        dtype = next(self.model.parameters()).dtype
        pixels = preprocess(images.float(), self.image_size, self.mean, self.std).to(dtype)
        return F.normalize(self.encode_images(pixels).float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalized text embeddings, computed once per distinct prompt."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            for prompt, embedding in zip(missing, F.normalize(self.encode_texts(missing).float(), dim=-1)):
                self._text_cache[prompt] = embedding
        return torch.stack([self._text_cache[p] for p in prompts])

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return 100.0 * (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)

    @classmethod
    def from_open_clip(
        cls, model_name: str, pretrained: str | None = "openai", device: str | torch.device = "cpu", **kwargs: object
    ) -> CLIPScoreReward:
        """Any open_clip model: ``pretrained`` is a tag (from the user's cache), a local file, or ``None``
        (random weights, for tests). Extra keyword arguments go to ``open_clip.create_model``.

        Example:
            >>> reward = CLIPScoreReward.from_open_clip("ViT-L-14", pretrained="openai")  # doctest: +SKIP
        """
        import open_clip

        model = open_clip.create_model(model_name, pretrained=pretrained, device=device, **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
        cfg = model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]

        def encode_texts(prompts: list[str]) -> torch.Tensor:
            return model.encode_text(tokenizer(prompts).to(next(model.parameters()).device))

        return cls(model, model.encode_image, encode_texts, size, cfg["mean"], cfg["std"])

    @classmethod
    def from_transformers(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> CLIPScoreReward:
        """A transformers ``CLIPModel`` and its tokenizer from a local folder (safetensors weights).

        ``path`` may be ``"micro-clip"``: the bundled micro-CLIP (from any working directory, unless
        a local folder has that name). A folder without tokenizer files (like micro-CLIP's) uses
        CLIP's own BPE tokenizer, built offline by :func:`diffaccel.tokenizers.clip_tokenizer`. The
        image normalization comes from the folder's ``preprocessor_config.json`` when present, else
        OpenAI CLIP's.

        Example:
            >>> reward = CLIPScoreReward.from_transformers("micro-clip")
            >>> reward.image_size
            64
        """
        import json

        from transformers import AutoTokenizer, CLIPModel

        from ..micro_models import resolve_folder

        path = resolve_folder(path)
        if not os.path.isdir(path):
            raise ValueError(f"from_transformers needs a local folder with a CLIPModel, got {path!r}")
        model = CLIPModel.from_pretrained(path, use_safetensors=True).to(device)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            from ..tokenizers import clip_tokenizer

            tokenizer = clip_tokenizer()
        mean, std = OPENAI_MEAN, OPENAI_STD
        processor_file = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(processor_file):
            with open(processor_file, encoding="utf-8") as handle:
                processor = json.load(handle)
            mean, std = processor.get("image_mean", mean), processor.get("image_std", std)

        def encode_images(pixels: torch.Tensor) -> torch.Tensor:
            return _features(model.get_image_features(pixel_values=pixels))

        def encode_texts(prompts: list[str]) -> torch.Tensor:
            tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(model.device)
            return _features(model.get_text_features(**tokens))

        return cls(model, encode_images, encode_texts, model.config.vision_config.image_size, mean, std)
