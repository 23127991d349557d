"""A tiny FLUX.1 pipeline (double- and single-stream transformer blocks, CLIP + T5, flow matching).

Example::

    >>> from diffaccel.testing.flux import tiny_flux_pipeline
    >>> type(tiny_flux_pipeline(seed=0)).__name__
    'FluxPipeline'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..tokenizers import clip_tokenizer, t5_tokenizer
from ._assembly import SD_VAE_CHANNELS, T5_VOCAB, finish
from .components import seeded, tiny_clip_text_encoder, tiny_t5_encoder, tiny_vae

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import FluxPipeline

__all__ = ["tiny_flux_pipeline"]


def tiny_flux_pipeline(*, seed: int = 0, **transformer_overrides: Any) -> FluxPipeline:
    """A tiny ``FluxPipeline`` with **random weights** (outputs are noise).

    ``FluxTransformer2DModel`` with 1 double-stream and 1 single-stream block (2 heads x 16, RoPE
    axes (4, 4, 8)), 16 latent channels packed 2x2 (``in_channels=64``), CLIP (pooled, hidden 32)
    and T5 (d_model 32) text encoders, 8x VAE without quant convs. ``guidance_embeds=False``
    (FLUX.1-schnell style); pass ``guidance_embeds=True`` for the dev variant. Flow-matching Euler
    scheduler with dynamic shifting, as FLUX.1 uses.

    Example::

        >>> from diffaccel.testing import TINY_CALL_KWARGS
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
    tokenizer_2 = t5_tokenizer(T5_VOCAB)
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
            block_out_channels=SD_VAE_CHANNELS,
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
    return finish(pipe)
