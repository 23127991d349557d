"""The reward interface: a batch of images (or clips) and their prompts in, one score per sample out.

Rewards take what a diffusers pipeline returns (``output_type`` ``"pt"``, ``"np"`` or ``"pil"``)
and score it batched, under ``no_grad``, on the reward model's device. Higher is better. Clips
are scored on evenly sampled frames (mean of the frames' scores) unless a reward knows better.

Example:
    >>> import torch
    >>> brightness = FunctionReward(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    >>> brightness(torch.full((2, 3, 8, 8), 0.25), "a red circle")
    tensor([0.2500, 0.2500])
    >>> clean, nan_count = nan_to_worst(torch.tensor([0.5, float("nan"), 0.2]))
    >>> clean, nan_count
    (tensor([0.5000, 0.2000, 0.2000]), 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Prompts = str | Sequence[str]


def _pil_to_tensor(image: Any) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) numpy (uint8, or float in [0, 1]) -> (..., 3, H, W) float32 in [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
    return tensor.movedim(-1, -3)


def as_media_tensor(media: Any) -> torch.Tensor:
    """Images as (N, 3, H, W) or clips as (N, T, 3, H, W), float32 in [0, 1].

    Accepts float tensors in [0, 1] laid out like that (``output_type="pt"``), numpy arrays
    (N, H, W, 3) / (N, T, H, W, 3) in uint8 or [0, 1] floats (``output_type="np"``), a list of
    PIL images, or a list of lists of PIL frames.

    Example:
        >>> from PIL import Image
        >>> as_media_tensor([Image.new("RGB", (4, 2))]).shape
        torch.Size([1, 3, 2, 4])
    """
    if isinstance(media, torch.Tensor):
        tensor = media.float()
    elif isinstance(media, np.ndarray):
        tensor = _array_to_tensor(media)
    elif isinstance(media, (list, tuple)) and media and isinstance(media[0], (list, tuple)):
        tensor = torch.stack([torch.stack([_pil_to_tensor(frame) for frame in clip]) for clip in media])
    elif isinstance(media, (list, tuple)) and media:
        first = media[0]
        if isinstance(first, np.ndarray):
            tensor = _array_to_tensor(np.stack(media))
        elif isinstance(first, torch.Tensor):
            tensor = torch.stack(list(media)).float()
        else:
            tensor = torch.stack([_pil_to_tensor(image) for image in media])
    else:
        raise ValueError(f"cannot score {type(media).__name__}: pass images or clips (tensor, numpy or PIL)")
    if tensor.ndim not in (4, 5) or tensor.shape[-3] != 3:
        raise ValueError(
            f"images must be (N, 3, H, W) and clips (N, T, 3, H, W) with 3 channels, got shape {tuple(tensor.shape)}"
        )
    return tensor


def as_prompt_list(prompts: Prompts, count: int) -> list[str]:
    """One prompt per sample: a string is repeated, a list must have ``count`` entries."""
    if isinstance(prompts, str):
        return [prompts] * count
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"got {len(prompts)} prompts for {count} samples")
    return prompts


def sample_frame_indices(num_frames: int, count: int) -> list[int]:
    """``count`` evenly spaced frame indices from a clip of ``num_frames`` (first and last included).

    Example:
        >>> sample_frame_indices(9, 3)
        [0, 4, 8]
    """
    if num_frames <= count:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)}) if count > 1 else [num_frames // 2]


class Reward:
    """Base class: implement :meth:`score_images` (and optionally :meth:`score_clips`).

    Args of ``__call__``: ``media`` (images or clips, see :func:`as_media_tensor`) and ``prompts``
    (a string or one per sample). Returns a float32 CPU tensor of shape (N,).

    Attributes:
        name: shown in reports.
        frames_per_clip: how many evenly spaced frames :meth:`score_clips` scores.
        worst: the score a NaN becomes in :func:`nan_to_worst` (``None``: the batch's lowest finite score).
    """

    name: str = "reward"
    frames_per_clip: int = 4
    worst: float | None = None

    @property
    def device(self) -> torch.device:
        """Device of the reward model's parameters (CPU for a reward without parameters)."""
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                for parameter in value.parameters():
                    return parameter.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> Reward:
        """Move the reward's models to ``device``; returns ``self``."""
        for value in vars(self).values():
            if isinstance(value, (torch.nn.Module, Reward)):
                value.to(device)
        return self

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score (N, 3, H, W) images in [0, 1] (on :attr:`device`); return (N,) scores."""
        raise NotImplementedError

    def score_clips(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score (N, T, 3, H, W) clips: the mean score of :attr:`frames_per_clip` sampled frames."""
        frames = sample_frame_indices(clips.shape[1], self.frames_per_clip)
        count = clips.shape[0]
        flat = clips[:, frames].flatten(0, 1)
        scores = self.score_images(flat, [p for p in prompts for _ in frames])
        return scores.reshape(count, len(frames)).mean(dim=1)

    @torch.no_grad()
    def __call__(self, media: Any, prompts: Prompts) -> torch.Tensor:
        tensor = as_media_tensor(media).to(self.device)
        count = tensor.shape[0]
        prompt_list = as_prompt_list(prompts, count)
        scores = self.score_clips(tensor, prompt_list) if tensor.ndim == 5 else self.score_images(tensor, prompt_list)
        return check_scores(scores, count, self.name)


def check_scores(scores: Any, count: int, name: str = "reward") -> torch.Tensor:
    """Validate a reward's output: one finite-or-NaN float per sample, as a float32 CPU tensor."""
    scores = torch.as_tensor(scores).detach()
    if scores.shape != (count,):
        raise ValueError(f"{name} must return one score per sample, shape ({count},); got shape {tuple(scores.shape)}")
    return scores.float().cpu()


def nan_to_worst(scores: torch.Tensor, worst: float | None = None) -> tuple[torch.Tensor, int]:
    """Replace NaN scores by the worst score; return the scores and how many were NaN.

    ``worst`` defaults to the lowest finite score of the batch (0 when none is finite).
    """
    nan = torch.isnan(scores)
    count = int(nan.sum())
    if not count:
        return scores, 0
    if worst is None:
        finite = scores[~nan]
        worst = float(finite.min()) if finite.numel() else 0.0
    return torch.where(nan, torch.full_like(scores, worst), scores), count


class FunctionReward(Reward):
    """A reward from a function ``fn(images, prompts) -> (N,) scores`` on (N, 3, H, W) images in [0, 1].

    Example:
        >>> import torch
        >>> FunctionReward(lambda images, prompts: images[:, 0].mean(dim=(1, 2)))(torch.ones(1, 3, 2, 2), "x")
        tensor([1.])
    """

    def __init__(self, fn: Callable[[torch.Tensor, list[str]], torch.Tensor], name: str = "function") -> None:
        self.fn, self.name = fn, name

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.fn(images, prompts)
