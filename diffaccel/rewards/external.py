"""Adapters for reward models that live in their own packages (optional extras).

``ImageReward`` (extra ``imagereward``: ``pip install "diffaccel[imagereward]"``) and HPSv2
(extra ``hpsv2``) are used when their packages and weights are present; without the package the
constructor raises an ``ImportError`` naming the extra. PickScore is a transformers CLIP model:
:class:`PickScoreReward` takes the model's folder or hub id (the user's cache).

Example:
    >>> reward = ImageRewardReward()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from .base import Reward


def require(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise an ImportError that names the diffaccel extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the '{module}' package: install the '{extra}' extra, pip install \"diffaccel[{extra}]\""
        ) from err


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in array]


class ImageRewardReward(Reward):
    """ImageReward (Xu et al., 2023) through the ``image-reward`` package (extra ``imagereward``)."""

    name = "image_reward"

    def __init__(self, model_name: str = "ImageReward-v1.0", device: str | torch.device = "cpu") -> None:
        package = require("ImageReward", "imagereward", "ImageRewardReward")
        self.model = package.load(model_name, device=str(device))

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pil = _to_pil(images)
        return torch.tensor([float(self.model.score(prompt, [image])) for prompt, image in zip(prompts, pil)])


class HPSv2Reward(Reward):
    """Human Preference Score v2 through the ``hpsv2`` package (extra ``hpsv2``)."""

    name = "hpsv2"

    def __init__(self, version: str = "v2.1") -> None:
        self.hpsv2 = require("hpsv2", "hpsv2", "HPSv2Reward")
        self.version = version

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pil = _to_pil(images)
        scores = [self.hpsv2.score([image], prompt, hps_version=self.version)[0] for prompt, image in zip(prompts, pil)]
        return torch.tensor([float(s) for s in scores])


class PickScoreReward(Reward):
    """PickScore (Kirstain et al., 2023): a CLIP-H model's scaled image-text similarity.

    Args:
        model_path: the PickScore model's local folder or hub id (``yuvalkirstain/PickScore_v1``).
        processor_path: its processor (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
    """

    name = "pickscore"

    def __init__(
        self,
        model_path: str | os.PathLike = "yuvalkirstain/PickScore_v1",
        processor_path: str | os.PathLike = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoModel, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(os.fspath(processor_path))
            self.model = AutoModel.from_pretrained(os.fspath(model_path), use_safetensors=True).eval().to(device)
        except OSError as err:
            raise OSError(
                f"PickScoreReward could not load {model_path!s} / {processor_path!s}: download them to the local "
                "cache first or pass local folders"
            ) from err

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from .clip import _features

        inputs = self.processor(images=_to_pil(images), return_tensors="pt").to(self.device)
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_emb = torch.nn.functional.normalize(_features(self.model.get_image_features(**inputs)), dim=-1)
        text_emb = torch.nn.functional.normalize(_features(self.model.get_text_features(**text.to(self.device))), dim=-1)
        return self.model.logit_scale.exp() * (image_emb * text_emb).sum(dim=-1)
