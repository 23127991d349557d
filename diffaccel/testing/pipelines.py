"""Builders of tiny random-weight diffusers pipelines that run fully offline on CPU.

**All weights are random.** The pipelines run the real diffusers code (real pipeline classes, real
model classes, real schedulers and tokenizers), but the images and videos they produce are noise.
They exist to test and time code that wraps pipelines -- hooks, caches, patches, compilation --
not to judge output quality.

Nothing is downloaded: tokenizers come from :mod:`diffaccel.tokenizers`, models are built from
configs. A 2-step call with :data:`TINY_CALL_KWARGS` takes well under a second on a CPU.

Example::

    >>> import torch
    >>> from diffaccel.testing import tiny_pipeline, tiny_call_inputs
    >>> pipe = tiny_pipeline("sd", seed=0, scheduler="euler")
    >>> out = pipe("a red circle", num_inference_steps=2, output_type="np",
    ...            generator=torch.Generator().manual_seed(0), **tiny_call_inputs("sd"))
    >>> out.images.shape
    (1, 64, 64, 3)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..tokenizers import clip_tokenizer, t5_tokenizer
from .components import (
    SCHEDULER_NAMES,
    SD_SCHEDULER_CONFIG,
    make_scheduler,
    seeded,
    tiny_clip_text_encoder,
    tiny_t5_encoder,
    tiny_unet_config,
    tiny_vae,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import (
        CogVideoXPipeline,
        DiffusionPipeline,
        FluxPipeline,
        LTXPipeline,
        PixArtSigmaPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        WanPipeline,
    )

__all__ = [
    "IMAGE_CONDITIONED_NAMES",
    "PIPELINE_NAMES",
    "SCHEDULER_NAMES",
    "TINY_CALL_KWARGS",
    "UNET_PIPELINE_NAMES",
    "VIDEO_PIPELINE_NAMES",
    "sd15_layout_pipeline",
    "tiny_call_inputs",
    "tiny_cogvideox_pipeline",
    "tiny_flux_pipeline",
    "tiny_ltx_pipeline",
    "tiny_pipeline",
    "tiny_pixart_sigma_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_controlnet_pipeline",
    "tiny_sd_img2img_pipeline",
    "tiny_sd_inpaint_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_unet_config",
    "tiny_wan_pipeline",
]

#: Every name accepted by :func:`tiny_pipeline`.
PIPELINE_NAMES: tuple[str, ...] = (
    "sd",
    "sdxl",
    "sd-controlnet",
    "sd-img2img",
    "sd-inpaint",
    "pixart-sigma",
    "sd3",
    "flux",
    "cogvideox",
    "wan",
    "ltx",
)
#: Pipelines whose denoiser is a ``UNet2DConditionModel`` (``scheduler=`` / ``prediction_type=`` apply).
UNET_PIPELINE_NAMES: tuple[str, ...] = ("sd", "sdxl", "sd-controlnet", "sd-img2img", "sd-inpaint")
#: Pipelines that need an input image (see :func:`tiny_call_inputs`).
IMAGE_CONDITIONED_NAMES: tuple[str, ...] = ("sd-controlnet", "sd-img2img", "sd-inpaint")
#: Pipelines that return videos: ``output_type="np"`` gives ``frames`` of shape (B, F, H, W, 3).
VIDEO_PIPELINE_NAMES: tuple[str, ...] = ("cogvideox", "wan", "ltx")

# Tiny SD-family sizes: 8x8 latents and an 8x VAE (as in SD), so images are 64x64.
_SD_VAE_CHANNELS = (8, 8, 16, 16)
_SD_IMAGE = 64

#: Keyword arguments for a fast call of each tiny pipeline (sizes, frame counts, text lengths).
#: Use as ``pipe(prompt, num_inference_steps=2, **TINY_CALL_KWARGS[name])``; the image-conditioned
#: pipelines also need the inputs from :func:`tiny_call_inputs`. Frame-count rules: CogVideoX and
#: Wan need ``num_frames = 4k + 1``, LTX ``8k + 1`` is recommended (``4k + 1`` works).
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "sd": {"height": _SD_IMAGE, "width": _SD_IMAGE},
    "sdxl": {"height": _SD_IMAGE, "width": _SD_IMAGE},
    "sd-controlnet": {"height": _SD_IMAGE, "width": _SD_IMAGE},
    "sd-img2img": {},  # output size follows the input image (64x64 from tiny_call_inputs)
    "sd-inpaint": {"height": _SD_IMAGE, "width": _SD_IMAGE},
    "pixart-sigma": {
        "height": 64,
        "width": 64,
        "max_sequence_length": 16,
        "use_resolution_binning": False,  # aspect-ratio bins exist only for the real sample sizes
        "clean_caption": False,  # True needs beautifulsoup4 + ftfy and only warns without them
    },
    "sd3": {"height": 64, "width": 64, "max_sequence_length": 16},
    "flux": {"height": 64, "width": 64, "max_sequence_length": 16},
    "cogvideox": {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16},
    "wan": {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16},
    "ltx": {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16},
}

_T5_VOCAB = 1000


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reject_scheduler_args(name: str, scheduler: str | None, prediction_type: str | None) -> None:
    if scheduler is not None or prediction_type is not None:
        raise ValueError(
            f"scheduler= and prediction_type= are only supported for the UNet pipelines "
            f"({', '.join(UNET_PIPELINE_NAMES)}) and 'pixart-sigma', not {name!r}"
        )


def _clip_heads(hidden: int) -> int:
    for heads in (4, 2, 1):
        if hidden % heads == 0:
            return heads
    return 1


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
        "vae": tiny_vae(seed, block_out_channels=_SD_VAE_CHANNELS, sample_size=_SD_IMAGE),
        "text_encoder": tiny_clip_text_encoder(
            seed, hidden_size=hidden, projection_dim=hidden, num_attention_heads=_clip_heads(hidden)
        ),
        "tokenizer": clip_tokenizer(),
        "scheduler": make_scheduler(scheduler or default_scheduler, SD_SCHEDULER_CONFIG, prediction_type),
    }


def _no_safety() -> dict[str, Any]:
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


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
    return _finish(StableDiffusionPipeline(**parts, **_no_safety()))


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

        >>> pipe = tiny_sd_img2img_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **tiny_call_inputs("sd-img2img")).images.shape
        (1, 64, 64, 3)
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    parts = _sd_parts(seed, scheduler, prediction_type, unet_overrides)
    return _finish(StableDiffusionImg2ImgPipeline(**parts, **_no_safety()))


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

        >>> pipe = tiny_sd_inpaint_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **tiny_call_inputs("sd-inpaint")).images.shape
        (1, 64, 64, 3)
    """
    from diffusers import StableDiffusionInpaintPipeline

    unet_overrides.setdefault("in_channels", 9)
    parts = _sd_parts(seed, scheduler, prediction_type, unet_overrides)
    return _finish(StableDiffusionInpaintPipeline(**parts, **_no_safety()))


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
    return _finish(StableDiffusionControlNetPipeline(controlnet=controlnet.eval(), **parts, **_no_safety()))


def tiny_sdxl_pipeline(
    *,
    seed: int = 0,
    scheduler: str | None = None,
    prediction_type: str | None = None,
    **unet_overrides: Any,
) -> StableDiffusionXLPipeline:
    """A tiny ``StableDiffusionXLPipeline`` with **random weights** (outputs are noise).

    SDXL's structure in miniature: two CLIP text encoders (hidden 32 each; the second with a
    projection, whose pooled output feeds the ``text_time`` added condition), UNet with
    ``cross_attention_dim=64`` (the concatenation), blocks (``DownBlock2D``, ``CrossAttnDownBlock2D``
    x2), linear projections, 8x VAE. Default scheduler ``"euler"`` (SDXL's default), no watermarker.

    Example::

        >>> pipe = tiny_sdxl_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np").images.shape
        (1, 64, 64, 3)
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    hidden, time_dim = 32, 8
    config = tiny_unet_config(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=2 * hidden,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden,
    )
    config.update(unet_overrides)
    with seeded(seed, "unet"):
        unet = UNet2DConditionModel(**config).eval()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed, block_out_channels=_SD_VAE_CHANNELS, sample_size=_SD_IMAGE),
        text_encoder=tiny_clip_text_encoder(seed, hidden_size=hidden, salt="clip"),
        text_encoder_2=tiny_clip_text_encoder(
            seed, with_projection=True, hidden_size=hidden, projection_dim=hidden, salt="clip2"
        ),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!"
        unet=unet,
        scheduler=make_scheduler(scheduler or "euler", SD_SCHEDULER_CONFIG, prediction_type),
        add_watermarker=False,
    )
    return _finish(pipe)


def tiny_pixart_sigma_pipeline(
    *,
    seed: int = 0,
    scheduler: str | None = None,
    prediction_type: str | None = None,
    **transformer_overrides: Any,
) -> PixArtSigmaPipeline:
    """A tiny ``PixArtSigmaPipeline`` with **random weights** (outputs are noise).

    2-layer ``PixArtTransformer2DModel`` (learned sigma: 8 output channels, ``ada_norm_single``),
    2-layer T5 encoder (d_model 32) with :func:`diffaccel.tokenizers.t5_tokenizer`, 8x VAE. Default
    scheduler ``"dpmsolver"`` (PixArt-Sigma's). Call with ``use_resolution_binning=False`` (the
    aspect-ratio bins only exist for the real sample sizes) -- :data:`TINY_CALL_KWARGS` does.

    Example::

        >>> pipe = tiny_pixart_sigma_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **TINY_CALL_KWARGS["pixart-sigma"]).images.shape
        (1, 64, 64, 3)
    """
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer(_T5_VOCAB)
    config: dict[str, Any] = dict(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    config.update(transformer_overrides)
    with seeded(seed, "transformer"):
        transformer = PixArtTransformer2DModel(**config).eval()
    sched_config = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
    }
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer), seed, d_model=config["caption_channels"]),
        vae=tiny_vae(seed, block_out_channels=_SD_VAE_CHANNELS, sample_size=64),
        transformer=transformer,
        scheduler=make_scheduler(scheduler or "dpmsolver", sched_config, prediction_type),
    )
    return _finish(pipe)


def tiny_sd3_pipeline(*, seed: int = 0, **transformer_overrides: Any) -> StableDiffusion3Pipeline:
    """A tiny ``StableDiffusion3Pipeline`` with **random weights** (outputs are noise).

    2-layer MMDiT (``SD3Transformer2DModel``, patch 2, 16 latent channels), two CLIP encoders with
    projection (hidden 32, pooled 32+32=64), a T5 encoder (d_model 64 = ``joint_attention_dim``;
    the CLIP features, 32+32, are padded to it as in SD3), 8x VAE with 16 latent channels and no
    quant convs. Flow-matching Euler scheduler (``scheduler=`` is not supported).

    Example::

        >>> pipe = tiny_sd3_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **TINY_CALL_KWARGS["sd3"]).images.shape
        (1, 64, 64, 3)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_hidden, t5_dim = 32, 64
    config: dict[str, Any] = dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_dim,
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_hidden,
        pos_embed_max_size=32,
    )
    config.update(transformer_overrides)
    with seeded(seed, "transformer"):
        transformer = SD3Transformer2DModel(**config).eval()
    tokenizer_3 = t5_tokenizer(_T5_VOCAB)
    clip_kwargs = dict(with_projection=True, hidden_size=clip_hidden, projection_dim=clip_hidden)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(
            seed,
            block_out_channels=_SD_VAE_CHANNELS,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            sample_size=64,
        ),
        text_encoder=tiny_clip_text_encoder(seed, salt="clip", **clip_kwargs),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed, salt="clip2", **clip_kwargs),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=tiny_t5_encoder(len(tokenizer_3), seed, d_model=t5_dim),
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe)


def tiny_flux_pipeline(*, seed: int = 0, **transformer_overrides: Any) -> FluxPipeline:
    """A tiny ``FluxPipeline`` with **random weights** (outputs are noise).

    ``FluxTransformer2DModel`` with 1 double-stream and 1 single-stream block (2 heads x 16, RoPE
    axes (4, 4, 8)), 16 latent channels packed 2x2 (``in_channels=64``), CLIP (pooled, hidden 32)
    and T5 (d_model 32) text encoders, 8x VAE without quant convs. ``guidance_embeds=False``
    (FLUX.1-schnell style); pass ``guidance_embeds=True`` for the dev variant. Flow-matching Euler
    scheduler with dynamic shifting, as FLUX.1 uses.

    Example::

        >>> pipe = tiny_flux_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **TINY_CALL_KWARGS["flux"]).images.shape
        (1, 64, 64, 3)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    config: dict[str, Any] = dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 4, 8),
    )
    config.update(transformer_overrides)
    with seeded(seed, "transformer"):
        transformer = FluxTransformer2DModel(**config).eval()
    tokenizer_2 = t5_tokenizer(_T5_VOCAB)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(
            seed,
            block_out_channels=_SD_VAE_CHANNELS,
            latent_channels=config["in_channels"] // 4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            sample_size=64,
        ),
        text_encoder=tiny_clip_text_encoder(seed, hidden_size=config["pooled_projection_dim"]),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(len(tokenizer_2), seed, d_model=config["joint_attention_dim"]),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _finish(pipe)


def tiny_cogvideox_pipeline(*, seed: int = 0, **transformer_overrides: Any) -> CogVideoXPipeline:
    """A tiny ``CogVideoXPipeline`` (CogVideoX 1.0 structure) with **random weights** (outputs are noise).

    1-layer ``CogVideoXTransformer3DModel`` (4 heads x 8, sin-cos positions, ``max_text_seq_length``
    16), T5 encoder (d_model 32), ``AutoencoderKLCogVideoX`` with 8x spatial / 4x temporal
    compression, ``CogVideoXDDIMScheduler`` (v-prediction, trailing, zero-SNR). ``num_frames`` must be
    ``4k + 1`` and ``max_sequence_length`` must equal the transformer's ``max_text_seq_length`` (16);
    height/width must be multiples of 16 (8x VAE, patch 2). Defaults in :data:`TINY_CALL_KWARGS`:
    32x32, 9 frames. ``output_type="np"`` gives ``frames`` of shape (B, num_frames, H, W, 3).

    Example::

        >>> pipe = tiny_cogvideox_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **TINY_CALL_KWARGS["cogvideox"]).frames.shape
        (1, 9, 32, 32, 3)
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    call = TINY_CALL_KWARGS["cogvideox"]
    config: dict[str, Any] = dict(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=32,
        num_layers=1,
        sample_width=call["width"] // 8,
        sample_height=call["height"] // 8,
        sample_frames=call["num_frames"],
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=call["max_sequence_length"],
    )
    config.update(transformer_overrides)
    with seeded(seed, "transformer"):
        transformer = CogVideoXTransformer3DModel(**config).eval()
    with seeded(seed, "vae"):
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=config["in_channels"],
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            sample_height=call["height"],
            sample_width=call["width"],
        ).eval()
    scheduler = CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
    )
    tokenizer = t5_tokenizer(_T5_VOCAB)
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer), seed, d_model=config["text_embed_dim"]),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


def tiny_wan_pipeline(*, seed: int = 0, **transformer_overrides: Any) -> WanPipeline:
    """A tiny ``WanPipeline`` (Wan 2.1 text-to-video structure) with **random weights** (outputs are noise).

    2-layer ``WanTransformer3DModel`` (2 heads x 12, patch (1, 2, 2)), ``UMT5EncoderModel`` (d_model
    32) with :func:`diffaccel.tokenizers.t5_tokenizer`, ``AutoencoderKLWan`` (8x spatial, 4x temporal),
    flow-matching Euler scheduler. ``num_frames`` must be ``4k + 1`` (else diffusers rounds it);
    height/width multiples of 16. Defaults in :data:`TINY_CALL_KWARGS`: 32x32, 9 frames.
    ``output_type="np"`` gives ``frames`` of shape (B, num_frames, H, W, 3).

    Example::

        >>> pipe = tiny_wan_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **TINY_CALL_KWARGS["wan"]).frames.shape
        (1, 9, 32, 32, 3)
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    config: dict[str, Any] = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    config.update(transformer_overrides)
    with seeded(seed, "transformer"):
        transformer = WanTransformer3DModel(**config).eval()
    with seeded(seed, "vae"):
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=config["in_channels"],
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()
    tokenizer = t5_tokenizer(_T5_VOCAB)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer), seed, d_model=config["text_dim"], umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    return _finish(pipe)


def tiny_ltx_pipeline(*, seed: int = 0, **transformer_overrides: Any) -> LTXPipeline:
    """A tiny ``LTXPipeline`` (LTX-Video 0.9 structure) with **random weights** (outputs are noise).

    1-layer ``LTXVideoTransformer3DModel`` (4 heads x 8), T5 encoder (d_model 32),
    ``AutoencoderKLLTXVideo`` with 8 latent channels and 4x spatial / 4x temporal compression,
    flow-matching Euler scheduler. ``num_frames`` should be ``8k + 1`` (LTX's recommendation;
    ``4k + 1`` also works with this VAE); height/width multiples of 32 (as for the real model).
    Defaults in :data:`TINY_CALL_KWARGS`: 32x32, 9 frames. ``output_type="np"`` gives ``frames`` of
    shape (B, num_frames, H, W, 3).

    Example::

        >>> pipe = tiny_ltx_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **TINY_CALL_KWARGS["ltx"]).frames.shape
        (1, 9, 32, 32, 3)
    """
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    config: dict[str, Any] = dict(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    config.update(transformer_overrides)
    with seeded(seed, "transformer"):
        transformer = LTXVideoTransformer3DModel(**config).eval()
    with seeded(seed, "vae"):
        vae = AutoencoderKLLTXVideo(
            latent_channels=config["in_channels"],
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4,
            patch_size=1,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    tokenizer = t5_tokenizer(_T5_VOCAB)
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny_t5_encoder(len(tokenizer), seed, d_model=config["caption_channels"]),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _finish(pipe)


_BUILDERS: dict[str, Callable[..., DiffusionPipeline]] = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd-controlnet": tiny_sd_controlnet_pipeline,
    "sd-img2img": tiny_sd_img2img_pipeline,
    "sd-inpaint": tiny_sd_inpaint_pipeline,
    "pixart-sigma": tiny_pixart_sigma_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "cogvideox": tiny_cogvideox_pipeline,
    "wan": tiny_wan_pipeline,
    "ltx": tiny_ltx_pipeline,
}
_SCHEDULABLE = (*UNET_PIPELINE_NAMES, "pixart-sigma")


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline {name!r}; supported: {', '.join(PIPELINE_NAMES)}")


def tiny_pipeline(
    name: str,
    *,
    seed: int = 0,
    scheduler: str | None = None,
    prediction_type: str | None = None,
    **unet_overrides: Any,
) -> DiffusionPipeline:
    """Build the tiny **random-weight** pipeline ``name`` (one of :data:`PIPELINE_NAMES`) offline.

    Dispatches to ``tiny_<name>_pipeline`` (``-`` becomes ``_``). Outputs are noise; the point is
    to exercise real pipeline code quickly. Progress bars are disabled.

    Args:
        name: ``"sd"``, ``"sdxl"``, ``"sd-controlnet"``, ``"sd-img2img"``, ``"sd-inpaint"``,
            ``"pixart-sigma"``, ``"sd3"``, ``"flux"``, ``"cogvideox"``, ``"wan"`` or ``"ltx"``.
        seed: Seeds weight initialisation; the same seed gives identical weights. Global RNG state
            is untouched.
        scheduler: UNet pipelines (and PixArt-Sigma) only: one of :data:`SCHEDULER_NAMES`, built with
            ``<SchedulerClass>.from_config`` from the pipeline's noise-schedule config.
        prediction_type: UNet pipelines (and PixArt-Sigma) only: ``"epsilon"`` or ``"v_prediction"``.
        **unet_overrides: Config overrides for the denoiser (``UNet2DConditionModel`` for the UNet
            pipelines, the transformer for the others).

    Raises:
        ValueError: Unknown ``name`` (the message lists the supported ones), or ``scheduler`` /
            ``prediction_type`` given for a flow-matching or CogVideoX pipeline.

    Example::

        >>> from diffaccel.testing import tiny_pipeline, TINY_CALL_KWARGS
        >>> pipe = tiny_pipeline("wan", seed=1)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **TINY_CALL_KWARGS["wan"]).frames.shape
        (1, 9, 32, 32, 3)
    """
    _check_name(name)
    kwargs: dict[str, Any] = dict(unet_overrides)
    if name in _SCHEDULABLE:
        kwargs.update(scheduler=scheduler, prediction_type=prediction_type)
    else:
        _reject_scheduler_args(name, scheduler, prediction_type)
    return _BUILDERS[name](seed=seed, **kwargs)


def _test_image(rng: Any, height: int, width: int) -> Any:
    """A smooth random colour pattern (low-frequency sinusoids) plus a little noise, as PIL RGB."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fy, fx = rng.uniform(0.5, 3.0, size=2) * 2 * np.pi
        phase = rng.uniform(0, 2 * np.pi)
        channels.append(0.5 + 0.4 * np.sin(fy * yy / height + fx * xx / width + phase))
    img = np.stack(channels, axis=-1) * 255 + rng.normal(0.0, 8.0, size=(height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def _test_control_image(rng: Any, height: int, width: int) -> Any:
    """An edge-map-like control image: white rectangle outlines on black, as PIL RGB."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        draw.rectangle((x0, y0, x1 + 1, y1 + 1), outline=(255, 255, 255), width=max(1, width // 32))
    return img


def _test_mask(rng: Any, height: int, width: int) -> Any:
    """A white (repaint) rectangle of random size and position on a black mask, as PIL "L"."""
    import numpy as np
    from PIL import Image

    mask = np.zeros((height, width), dtype=np.uint8)
    h, w = int(rng.integers(height // 4, height // 2 + 1)), int(rng.integers(width // 4, width // 2 + 1))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    mask[top : top + h, left : left + w] = 255
    return Image.fromarray(mask, mode="L")


def tiny_call_inputs(name: str, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for a fast call of tiny pipeline ``name``: sizes plus any required images.

    Returns a fresh copy of :data:`TINY_CALL_KWARGS` ``[name]``, and for the image-conditioned
    pipelines adds deterministic (``seed``) PIL inputs at the pipeline's default size:
    ``"sd-img2img"``: ``image`` (a smooth random colour pattern); ``"sd-inpaint"``: ``image`` and
    ``mask_image`` (a random white rectangle = repaint); ``"sd-controlnet"``: ``image`` (the
    control image: white rectangle outlines on black, like an edge map). With ``batch_size > 1`` those are lists of
    ``batch_size`` different images (pass ``batch_size`` prompts too). The prompt, step count and
    ``generator`` are up to the caller.

    Example::

        >>> from diffaccel.testing import tiny_pipeline, tiny_call_inputs
        >>> pipe = tiny_pipeline("sd-inpaint")
        >>> inputs = tiny_call_inputs("sd-inpaint", batch_size=2)
        >>> pipe(["a red circle", "a blue square"], num_inference_steps=2, output_type="np",
        ...      **inputs).images.shape
        (2, 64, 64, 3)
    """
    import numpy as np

    _check_name(name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kwargs = dict(TINY_CALL_KWARGS[name])
    if name not in IMAGE_CONDITIONED_NAMES:
        return kwargs
    height = kwargs.get("height", _SD_IMAGE)
    width = kwargs.get("width", _SD_IMAGE)
    rng = np.random.default_rng(seed)

    def batch(make: Callable[[], Any]) -> Any:
        items = [make() for _ in range(batch_size)]
        return items[0] if batch_size == 1 else items

    if name == "sd-controlnet":
        kwargs["image"] = batch(lambda: _test_control_image(rng, height, width))
    else:
        kwargs["image"] = batch(lambda: _test_image(rng, height, width))
    if name == "sd-inpaint":
        kwargs["mask_image"] = batch(lambda: _test_mask(rng, height, width))
    return kwargs


# --------------------------------------------------------------------------------------------------
# SD 1.5 layout (benchmark-sized)
# --------------------------------------------------------------------------------------------------

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
        **_no_safety(),
    )
    return _finish(pipe)
