"""A tiny Stable Diffusion XL pipeline (two CLIP text encoders, ``text_time`` added condition).

Example::

    >>> from diffaccel.testing.sdxl import tiny_sdxl_pipeline
    >>> tiny_sdxl_pipeline(seed=0).unet.config.addition_embed_type
    'text_time'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..tokenizers import clip_tokenizer
from ._assembly import SD_IMAGE, SD_VAE_CHANNELS, finish
from .components import SD_SCHEDULER_CONFIG, make_scheduler, seeded, tiny_clip_text_encoder, tiny_unet_config, tiny_vae

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import StableDiffusionXLPipeline

__all__ = ["tiny_sdxl_pipeline"]


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
        vae=tiny_vae(seed, block_out_channels=SD_VAE_CHANNELS, sample_size=SD_IMAGE),
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
    return finish(pipe)
