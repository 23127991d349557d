"""Tiny Stable Diffusion 1.x pipelines: text-to-image, img2img, inpainting and ControlNet.

All four share the same **random-weight** parts (:func:`tiny_unet_config` UNet, 8x VAE, 2-layer
CLIP text encoder with the real CLIP tokenizer); their outputs are noise.

Example::

    >>> from diffaccel.testing.sd import tiny_sd_pipeline
    >>> tiny_sd_pipeline(seed=0).unet.config.cross_attention_dim
    32
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..tokenizers import clip_tokenizer
from ._assembly import SD_IMAGE, SD_VAE_CHANNELS, clip_heads, finish, no_safety_checker
from .components import SD_SCHEDULER_CONFIG, make_scheduler, seeded, tiny_clip_text_encoder, tiny_unet_config, tiny_vae

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import (
        StableDiffusionControlNetPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

__all__ = ["tiny_sd_controlnet_pipeline", "tiny_sd_img2img_pipeline", "tiny_sd_inpaint_pipeline", "tiny_sd_pipeline"]


def _sd_parts(
    seed: int,
    scheduler: str | None,
    prediction_type: str | None,
    unet_overrides: dict[str, Any],
    default_scheduler: str = "ddim",
) -> dict[str, Any]:
    """UNet, VAE, text encoder, tokenizer and scheduler shared by the SD 1.x-style builders."""
    from diffusers import UNet2DConditionModel

    config = tiny_unet_config(**unet_overrides)
    with seeded(seed, "unet"):
        unet = UNet2DConditionModel(**config).eval()
    hidden = int(config["cross_attention_dim"])
    return {
        "unet": unet,
        "vae": tiny_vae(seed, block_out_channels=SD_VAE_CHANNELS, sample_size=SD_IMAGE),
        "text_encoder": tiny_clip_text_encoder(
            seed, hidden_size=hidden, projection_dim=hidden, num_attention_heads=clip_heads(hidden)
        ),
        "tokenizer": clip_tokenizer(),
        "scheduler": make_scheduler(scheduler or default_scheduler, SD_SCHEDULER_CONFIG, prediction_type),
    }


def tiny_sd_pipeline(
    *,
    seed: int = 0,
    scheduler: str | None = None,
    prediction_type: str | None = None,
    **unet_overrides: Any,
) -> StableDiffusionPipeline:
    """A tiny ``StableDiffusionPipeline`` (SD 1.5 structure) with **random weights** (outputs are noise).

    UNet: :func:`tiny_unet_config` (8x8 latents); VAE: 8x, 4 latent channels; text encoder: 2-layer
    CLIP (hidden 32) with the real CLIP tokenizer. Default image size 64x64. No safety checker.

    Args:
        seed: Seeds weight initialisation (global RNG state is untouched).
        scheduler: One of :data:`SCHEDULER_NAMES`; default ``"ddim"`` (one UNet call per step).
        prediction_type: ``"epsilon"`` (default) or ``"v_prediction"``.
        **unet_overrides: Overrides for :func:`tiny_unet_config`.

    Example::

        >>> pipe = tiny_sd_pipeline(seed=0, scheduler="dpmsolver")
        >>> pipe("a red circle", num_inference_steps=2, output_type="np").images.shape
        (1, 64, 64, 3)
    """
    from diffusers import StableDiffusionPipeline

    parts = _sd_parts(seed, scheduler, prediction_type, unet_overrides)
    return finish(StableDiffusionPipeline(**parts, **no_safety_checker()))


def tiny_sd_img2img_pipeline(
    *,
    seed: int = 0,
    scheduler: str | None = None,
    prediction_type: str | None = None,
    **unet_overrides: Any,
) -> StableDiffusionImg2ImgPipeline:
    """A tiny ``StableDiffusionImg2ImgPipeline`` with **random weights** (same parts as :func:`tiny_sd_pipeline`).

    Needs ``image=`` (see :func:`tiny_call_inputs`); the output has the input image's size. With the
    default ``strength=0.8`` and ``num_inference_steps=2`` it runs one denoising step.

    Example::

        >>> from diffaccel.testing import tiny_call_inputs
        >>> pipe = tiny_sd_img2img_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **tiny_call_inputs("sd-img2img")).images.shape
        (1, 64, 64, 3)
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    parts = _sd_parts(seed, scheduler, prediction_type, unet_overrides)
    return finish(StableDiffusionImg2ImgPipeline(**parts, **no_safety_checker()))


def tiny_sd_inpaint_pipeline(
    *,
    seed: int = 0,
    scheduler: str | None = None,
    prediction_type: str | None = None,
    **unet_overrides: Any,
) -> StableDiffusionInpaintPipeline:
    """A tiny ``StableDiffusionInpaintPipeline`` with **random weights** (outputs are noise).

    Like SD-inpainting checkpoints, the UNet takes 9 input channels (4 latent + 1 mask + 4 masked-image
    latents); pass ``in_channels=4`` to get the legacy latent-blending path instead. Needs ``image=``
    and ``mask_image=`` (see :func:`tiny_call_inputs`).

    Example::

        >>> from diffaccel.testing import tiny_call_inputs
        >>> pipe = tiny_sd_inpaint_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **tiny_call_inputs("sd-inpaint")).images.shape
        (1, 64, 64, 3)
    """
    from diffusers import StableDiffusionInpaintPipeline

    unet_overrides.setdefault("in_channels", 9)
    parts = _sd_parts(seed, scheduler, prediction_type, unet_overrides)
    return finish(StableDiffusionInpaintPipeline(**parts, **no_safety_checker()))


def tiny_sd_controlnet_pipeline(
    *,
    seed: int = 0,
    scheduler: str | None = None,
    prediction_type: str | None = None,
    **unet_overrides: Any,
) -> StableDiffusionControlNetPipeline:
    """A tiny ``StableDiffusionControlNetPipeline`` with **random weights** (outputs are noise).

    The ControlNet is ``ControlNetModel.from_unet(unet)`` with a conditioning embedding matching the
    8x VAE. Its zero-initialised output convolutions get random weights instead, and its
    conditioning embedding a variance-preserving init, so the control image really changes the
    output. Needs ``image=`` (the control image, see
    :func:`tiny_call_inputs`).

    Example::

        >>> from diffaccel.testing import tiny_call_inputs
        >>> pipe = tiny_sd_controlnet_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **tiny_call_inputs("sd-controlnet")).images.shape
        (1, 64, 64, 3)
    """
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    parts = _sd_parts(seed, scheduler, prediction_type, unet_overrides)
    with seeded(seed, "controlnet"):
        controlnet = ControlNetModel.from_unet(
            parts["unet"], conditioning_embedding_out_channels=(8, 8, 16, 16)
        )
        # Real ControlNets start with zero convolutions (no effect until trained), and PyTorch's
        # default init shrinks the control signal through the conditioning embedding. Re-initialise
        # both so that the control image visibly changes the output of the random model.
        with torch.no_grad():
            for module in controlnet.controlnet_cond_embedding.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    torch.nn.init.normal_(module.bias, std=0.02)
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                conv.reset_parameters()
    return finish(StableDiffusionControlNetPipeline(controlnet=controlnet.eval(), **parts, **no_safety_checker()))
