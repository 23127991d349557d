"""Running a pipeline for media in [0, 1] and converting it to the ``output_type`` the user asked for.

Example:
    >>> import torch
    >>> convert_media(torch.zeros(2, 3, 4, 4), "np").shape
    (2, 4, 4, 3)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "np", "pt")


def check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES} for steering and search, got {output_type!r}")
    return output_type


def pipeline_media(output: Any) -> torch.Tensor:
    """The (N, 3, H, W) images or (N, T, 3, H, W) frames of a pipeline output made with ``output_type="pt"``."""
    media = getattr(output, "frames", None)
    if media is None:
        media = output.images if hasattr(output, "images") else output[0]
    return torch.as_tensor(media).float()


def convert_media(media: torch.Tensor, output_type: str) -> Any:
    """(N, 3, H, W) / (N, T, 3, H, W) in [0, 1] -> ``"pt"`` (as is), ``"np"`` (channels last) or ``"pil"``."""
    if output_type == "pt":
        return media
    array = media.movedim(-3, -1).cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    def to_pil(image: np.ndarray) -> Any:
        return Image.fromarray((image.clip(0, 1) * 255).round().astype(np.uint8))

    if media.ndim == 5:
        return [[to_pil(frame) for frame in clip] for clip in array]
    return [to_pil(image) for image in array]


def gray_media(pipe: Any, count: int) -> torch.Tensor:
    """Small mid-gray images (or 2-frame clips) to probe a reward's output shape before sampling."""
    from .latents import is_video_pipeline

    shape = (count, 2, 3, 32, 32) if is_video_pipeline(pipe) else (count, 3, 32, 32)
    return torch.full(shape, 0.5)
