"""From the scheduler's latents to images: predicted x0 and per-pipeline decoding.

Steering scores the *predicted clean sample* at intermediate steps. The scheduler seam sees the
guided model output, so x0 comes from the scheduler's own output where it reports one
(``pred_original_sample``: DDIM, DDPM, Euler, our :class:`FlowMatchSDEScheduler`), from the
multistep history of data-prediction solvers (DPM-Solver++, UniPC), or from the flow identity
``x0 = x - sigma * v``. Decoding follows each pipeline family's own latent layout (packed Flux/LTX
latents, SD3/Flux shift factors, Wan/LTX latent statistics) and returns images (N, 3, H, W) or
clips (N, T, 3, H, W) in [0, 1].

Example:
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd")
    >>> decode_latents(pipe, torch.zeros(2, 4, 8, 8), {}).shape
    torch.Size([2, 3, 64, 64])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UnsupportedPipelineError


def predicted_x0(scheduler: Any, output: Any, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The clean-sample prediction of the scheduler step that just ran (``output`` is its return_dict output)."""
    x0 = getattr(output, "pred_original_sample", None)
    if isinstance(x0, torch.Tensor):
        return x0
    config = scheduler.config
    history = getattr(scheduler, "model_outputs", None)
    data_prediction = config.get("algorithm_type", "") in ("dpmsolver++", "sde-dpmsolver++") or config.get(
        "predict_x0", False
    )
    if history and history[-1] is not None and data_prediction:
        return history[-1]
    if "FlowMatch" in type(scheduler).__name__ and getattr(scheduler, "step_index", None):
        sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample.device, torch.float32)
        return (sample.float() - sigma * model_output.float()).to(sample.dtype)
    raise UnsupportedPipelineError(
        f"cannot get the predicted clean sample from {type(scheduler).__name__}: supported are schedulers that "
        "report pred_original_sample (DDIM, DDPM, Euler, FlowMatchSDEScheduler), DPM-Solver++/UniPC with data "
        "prediction, and FlowMatchEulerDiscreteScheduler"
    )


def call_parameters(pipe: Any) -> Mapping[str, inspect.Parameter]:
    """Parameters of the diffusers ``__call__`` of ``pipe`` (seen through diffaccel's accelerated
    subclass, whose ``__call__`` takes ``*args, **kwargs``)."""
    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        if call is not None:
            parameters = inspect.signature(call).parameters
            if "prompt" in parameters:
                return parameters
    return {}


def call_default(pipe: Any, name: str) -> Any:
    """Default of a ``pipe.__call__`` argument (e.g. LTX's height), or ``None``."""
    parameter = call_parameters(pipe).get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def is_video_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` returns clips (it has a ``video_processor``)."""
    return getattr(pipe, "video_processor", None) is not None


def _size(pipe: Any, sizes: Mapping[str, Any]) -> tuple[int, int]:
    height, width = sizes.get("height"), sizes.get("width")
    if height is None or width is None:
        default = getattr(pipe, "default_sample_size", None)
        scale = getattr(pipe, "vae_scale_factor", 8)
        height = height or call_default(pipe, "height") or default * scale
        width = width or call_default(pipe, "width") or default * scale
    return int(height), int(width)


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor, sizes: Mapping[str, Any]) -> torch.Tensor:
    """Decode the scheduler-space ``latents`` of ``pipe`` to media in [0, 1].

    ``sizes`` holds the call's ``height``, ``width`` and ``num_frames`` where given (needed to
    unpack Flux and LTX latents; the pipeline's defaults otherwise).
    """
    name = type(pipe).__name__
    vae = pipe.vae
    latents = latents.to(vae.dtype)
    if "LTX" in name:
        num_frames = int(sizes.get("num_frames") or call_default(pipe, "num_frames"))
        height, width = _size(pipe, sizes)
        latents = pipe._unpack_latents(
            latents,
            (num_frames - 1) // pipe.vae_temporal_compression_ratio + 1,
            height // pipe.vae_spatial_compression_ratio,
            width // pipe.vae_spatial_compression_ratio,
            pipe.transformer_spatial_patch_size,
            pipe.transformer_temporal_patch_size,
        )
        latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype)
        video = vae.decode(latents, timestep if vae.config.timestep_conditioning else None, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pt").float()
    if "CogVideoX" in name:
        return pipe.video_processor.postprocess_video(pipe.decode_latents(latents), output_type="pt").float()
    if name.startswith(("Wan", "AcceleratedWan")):
        config = vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)
        video = vae.decode(latents * std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pt").float()
    if "Flux" in name:
        height, width = _size(pipe, sizes)
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    if is_video_pipeline(pipe):
        raise UnsupportedPipelineError(
            f"decoding intermediate latents of {name} is not supported (supported: Wan, CogVideoX, LTX)")
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        channels = latents.shape[1]
        mean = torch.tensor(config.latents_mean).view(1, channels, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, channels, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt").float()
