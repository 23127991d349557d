"""Sizes and finishing steps shared by the tiny pipeline builders (one module per family)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import DiffusionPipeline

PipelineT = TypeVar("PipelineT", bound="DiffusionPipeline")

# Tiny SD-family sizes: 8x8 latents and an 8x VAE (as in SD), so images are 64x64.
SD_VAE_CHANNELS = (8, 8, 16, 16)
SD_IMAGE = 64
#: Vocabulary size of the offline T5 tokenizer the DiT and video pipelines use.
T5_VOCAB = 1000


def finish(pipe: PipelineT) -> PipelineT:
    """Disable the pipeline's progress bars and return it."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def no_safety_checker() -> dict[str, Any]:
    """The SD pipelines' keyword arguments for building them without a safety checker."""
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def clip_heads(hidden: int) -> int:
    """The most attention heads (at most 4) that divide a CLIP text encoder's ``hidden`` size."""
    for heads in (4, 2, 1):
        if hidden % heads == 0:
            return heads
    return 1
