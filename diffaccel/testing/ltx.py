"""A tiny LTX-Video pipeline (``LTXVideoTransformer3DModel``, T5 encoder, ``AutoencoderKLLTXVideo``).

Example::

    >>> from diffaccel.testing.ltx import tiny_ltx_pipeline
    >>> type(tiny_ltx_pipeline(seed=0)).__name__
    'LTXPipeline'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..tokenizers import t5_tokenizer
from ._assembly import T5_VOCAB, finish
from .components import seeded, tiny_t5_encoder

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import LTXPipeline

__all__ = ["tiny_ltx_pipeline"]


def tiny_ltx_pipeline(*, seed: int = 0, **transformer_overrides: Any) -> LTXPipeline:
    """A tiny ``LTXPipeline`` (LTX-Video 0.9 structure) with **random weights** (outputs are noise).

    1-layer ``LTXVideoTransformer3DModel`` (4 heads x 8), T5 encoder (d_model 32),
    ``AutoencoderKLLTXVideo`` with 8 latent channels and 4x spatial / 4x temporal compression,
    flow-matching Euler scheduler. ``num_frames`` should be ``8k + 1`` (LTX's recommendation;
    ``4k + 1`` also works with this VAE); height/width multiples of 32 (as for the real model).
    Defaults in :data:`TINY_CALL_KWARGS`: 32x32, 9 frames. ``output_type="np"`` gives ``frames`` of
    shape (B, num_frames, H, W, 3).

    Example::

        >>> from diffaccel.testing import TINY_CALL_KWARGS
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
    tokenizer = t5_tokenizer(T5_VOCAB)
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny_t5_encoder(len(tokenizer), seed, d_model=config["caption_channels"]),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return finish(pipe)
