"""The models the ``diffaccel`` commands know by name, and how the commands load a pipeline.

Example:
    >>> RANDOM_MODEL_INFO.size_multiple, RANDOM_VIDEO_INFO.video
    (8, True)
    >>> sorted(BUILTIN_INFO) == sorted([RANDOM_MODEL, RANDOM_VIDEO_MODEL])
    True
"""

from __future__ import annotations

import sys
from typing import Any

from .checks import ModelInfo, fail

#: The bundled micro-SD (``assets/models/micro-sd``), trained on ShapeWorld scenes.
DEFAULT_MODEL = "micro-sd"
#: A tiny Stable Diffusion pipeline with RANDOM weights, built in code.
RANDOM_MODEL = "diffaccel/tiny-random-sd"
#: What the checks know of :data:`RANDOM_MODEL` (``tiny_pipeline("sd", sample_size=32)``) without building it.
RANDOM_MODEL_INFO = ModelInfo("StableDiffusionPipeline", "DDIMScheduler", 1000, "unet", spatial_factor=8)
#: The bundled micro text-to-video model (``assets/models/micro-video``).
MICRO_VIDEO = "micro-video"
#: A tiny Wan pipeline with RANDOM weights, built in code.
RANDOM_VIDEO_MODEL = "diffaccel/tiny-random-wan"
#: What the checks know of :data:`RANDOM_VIDEO_MODEL` (``tiny_pipeline("wan")``) without building it.
RANDOM_VIDEO_INFO = ModelInfo("WanPipeline", "FlowMatchEulerDiscreteScheduler", 1000, "transformer",
                              spatial_factor=8, patch=2, temporal_factor=4)
#: The built-in random models, by name, for :func:`~diffaccel.cli.checks.describe_model`.
BUILTIN_INFO = {RANDOM_MODEL: RANDOM_MODEL_INFO, RANDOM_VIDEO_MODEL: RANDOM_VIDEO_INFO}


def resolve_device(name: str | None) -> str:
    """``--device``, checked (default: cuda if available, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        fail(f"--device {name}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available here")
    return name


def from_pretrained(model: str, dtype: Any) -> Any:
    """``DiffusionPipeline.from_pretrained`` (safetensors only); an ``OSError`` becomes a one-line error."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, use_safetensors=True)
    except OSError as err:
        fail(f"--model {model}: {' '.join(str(err).split())}")


def load_pipeline(model: str, device: str, dtype: Any) -> Any:
    """Load ``model`` (a local folder, a hub id, :data:`DEFAULT_MODEL` or :data:`RANDOM_MODEL`);
    diffusers' own loading errors (``OSError``: offline, no such repo, no safetensors) end the
    command with diffusers' message on one line.

    Example:
        >>> import torch
        >>> type(load_pipeline(DEFAULT_MODEL, "cpu", torch.float32)).__name__
        'StableDiffusionPipeline'
    """
    import torch

    if model == DEFAULT_MODEL:
        from ..micro_models import load_micro_sd

        print(f"model: {DEFAULT_MODEL} (bundled, trained on ShapeWorld, 64x64)", file=sys.stderr)
        return load_micro_sd(device, dtype)
    if model == RANDOM_MODEL:
        from ..testing import tiny_pipeline

        print(f"model: {RANDOM_MODEL} (tiny, RANDOM weights: the image is noise)", file=sys.stderr)
        pipe = tiny_pipeline("sd", sample_size=32).to(device)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    return from_pretrained(model, dtype).to(device)


def load_video_pipeline(model: str, device: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """The pipeline for ``model`` and the call arguments it needs (sizes, text length).

    Example:
        >>> import torch
        >>> pipe, call = load_video_pipeline(RANDOM_VIDEO_MODEL, "cpu", torch.float32)
        >>> type(pipe).__name__, call["height"]
        ('WanPipeline', 32)
    """
    if model == RANDOM_VIDEO_MODEL:
        from ..testing import tiny_call_inputs, tiny_pipeline

        print(f"model: {RANDOM_VIDEO_MODEL} (tiny, RANDOM weights: the clip is noise)", file=sys.stderr)
        call = {k: v for k, v in tiny_call_inputs("wan").items() if k != "num_frames"}
        return tiny_pipeline("wan").to(device, dtype), call
    if model == MICRO_VIDEO:
        from ..micro_models import load_micro_video

        pipe = load_micro_video(device, dtype)
        print(f"model: {MICRO_VIDEO} (bundled, trained on moving ShapeWorld, 64x64)", file=sys.stderr)
        return pipe, {"height": 64, "width": 64}
    return from_pretrained(model, dtype).to(device), {}
