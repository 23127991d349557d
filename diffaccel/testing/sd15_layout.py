"""SD 1.5's exact UNet layout with **random weights**, at any width (benchmark-sized pipelines).

Example::

    >>> from diffaccel.testing.sd15_layout import SD15_DOWN_BLOCK_TYPES
    >>> SD15_DOWN_BLOCK_TYPES[-1]
    'DownBlock2D'
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..tokenizers import clip_tokenizer
from ._assembly import finish, no_safety_checker
from .components import SD_SCHEDULER_CONFIG, make_scheduler, seeded, tiny_clip_text_encoder

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import StableDiffusionPipeline

__all__ = ["SD15_DOWN_BLOCK_TYPES", "SD15_UP_BLOCK_TYPES", "sd15_layout_pipeline"]

#: SD 1.5's UNet block layout.
SD15_DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def sd15_layout_pipeline(
    *,
    width: int = 320,
    sample_size: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    scheduler: str = "ddim",
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` with SD 1.5's exact UNet layout and **random weights**.

    UNet: down ``CrossAttnDownBlock2D`` x3 + ``DownBlock2D``, ``UNetMidBlock2DCrossAttn``, up
    ``UpBlock2D`` + ``CrossAttnUpBlock2D`` x3, ``layers_per_block=2``, ``block_out_channels=(w, 2w,
    4w, 4w)``, ``attention_head_dim=8`` (8 heads), GroupNorm with 32 groups (fewer if ``width`` is not
    a multiple of 32). With ``width=320, sample_size=64`` this is exactly SD 1.5's 860M-parameter
    architecture (use it for GPU benchmarks: the image is 512x512); smaller widths (64, 96) make
    CPU benchmarks with the same structure.

    Text encoder: hidden size = ``cross_attention_dim`` (768 at full width, ``2 * width`` below);
    at full width SD 1.5's 12-layer CLIP ViT-L/14 text config, else 2 layers. VAE: 8x with 4 latent
    channels; SD's real VAE config ``(128, 256, 512, 512)`` at full width, ``(32, 32, 64, 64)``
    (1 layer per block) below. Image size is ``8 * sample_size``.

    Weights are initialised on the CPU (so they do not depend on ``device``), then moved to
    ``device`` / ``dtype``. The full-width build takes ~12 s on a 2-core CPU (weight init).

    Args:
        width: First UNet block width (``block_out_channels[0]``); SD 1.5 uses 320.
        sample_size: Latent size (64 for SD 1.5's 512x512).
        seed: Seeds weight initialisation.
        dtype: Dtype of all models.
        device: Device the pipeline is moved to.
        scheduler: One of :data:`SCHEDULER_NAMES` (default ``"ddim"``).

    Example::

        >>> pipe = sd15_layout_pipeline(width=64, sample_size=32)   # CPU-sized, random weights
        >>> pipe.unet.config.block_out_channels
        (64, 128, 256, 256)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np").images.shape
        (1, 256, 256, 3)
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    if width < 8 or width % 8:
        raise ValueError(f"width must be a positive multiple of 8, got {width}")
    full = width >= 320
    cross_dim = 768 if full else 2 * width
    groups = math.gcd(32, width)
    unet_config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=SD15_DOWN_BLOCK_TYPES,
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=SD15_UP_BLOCK_TYPES,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=cross_dim,
        norm_num_groups=groups,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
    )
    with seeded(seed, "unet"):
        unet = UNet2DConditionModel(**unet_config)
    if full:
        vae_kwargs: dict[str, Any] = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
        text_kwargs: dict[str, Any] = dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
        )
    else:
        vae_kwargs = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
        text_kwargs = dict(
            hidden_size=cross_dim,
            intermediate_size=2 * cross_dim,
            num_hidden_layers=2,
            num_attention_heads=max(1, cross_dim // 64),
            projection_dim=cross_dim,
        )
    with seeded(seed, "vae"):
        n = len(vae_kwargs["block_out_channels"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=8 * sample_size,
            scaling_factor=0.18215,
            **vae_kwargs,
        )
    text_encoder = tiny_clip_text_encoder(seed, **text_kwargs)
    for model in (unet, vae, text_encoder):
        # torch.nn.Module.to, not ModelMixin.to: diffusers 0.42's override warns about "modules that
        # should be kept in float32: []" on every dtype cast, even when there are none.
        torch.nn.Module.to(model.eval(), device=device, dtype=dtype)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=make_scheduler(scheduler, SD_SCHEDULER_CONFIG),
        **no_safety_checker(),
    )
    return finish(pipe)
