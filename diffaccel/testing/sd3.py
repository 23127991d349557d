"""A tiny Stable Diffusion 3 pipeline (MMDiT, two CLIP encoders and a T5 encoder, flow matching).

Example::

    >>> from diffaccel.testing.sd3 import tiny_sd3_pipeline
    >>> type(tiny_sd3_pipeline(seed=0)).__name__
    'StableDiffusion3Pipeline'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..tokenizers import clip_tokenizer, t5_tokenizer
from ._assembly import SD_VAE_CHANNELS, T5_VOCAB, finish
from .components import seeded, tiny_clip_text_encoder, tiny_t5_encoder, tiny_vae

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import StableDiffusion3Pipeline

__all__ = ["tiny_sd3_pipeline"]


def tiny_sd3_pipeline(*, seed: int = 0, **transformer_overrides: Any) -> StableDiffusion3Pipeline:
    """A tiny ``StableDiffusion3Pipeline`` with **random weights** (outputs are noise).

    2-layer MMDiT (``SD3Transformer2DModel``, patch 2, 16 latent channels), two CLIP encoders with
    projection (hidden 32, pooled 32+32=64), a T5 encoder (d_model 64 = ``joint_attention_dim``;
    the CLIP features, 32+32, are padded to it as in SD3), 8x VAE with 16 latent channels and no
    quant convs. Flow-matching Euler scheduler (``scheduler=`` is not supported).

    Example::

        >>> from diffaccel.testing import TINY_CALL_KWARGS
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
    tokenizer_3 = t5_tokenizer(T5_VOCAB)
    clip_kwargs = dict(with_projection=True, hidden_size=clip_hidden, projection_dim=clip_hidden)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(
            seed,
            block_out_channels=SD_VAE_CHANNELS,
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
    return finish(pipe)
