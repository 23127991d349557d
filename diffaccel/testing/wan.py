"""A tiny Wan 2.1 text-to-video pipeline (``WanTransformer3DModel``, UMT5 encoder, ``AutoencoderKLWan``).

Example::

    >>> from diffaccel.testing.wan import tiny_wan_pipeline
    >>> type(tiny_wan_pipeline(seed=0)).__name__
    'WanPipeline'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..tokenizers import t5_tokenizer
from ._assembly import T5_VOCAB, finish
from .components import seeded, tiny_t5_encoder

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import WanPipeline

__all__ = ["tiny_wan_pipeline"]


def tiny_wan_pipeline(*, seed: int = 0, **transformer_overrides: Any) -> WanPipeline:
    """A tiny ``WanPipeline`` (Wan 2.1 text-to-video structure) with **random weights** (outputs are noise).

    2-layer ``WanTransformer3DModel`` (2 heads x 12, patch (1, 2, 2)), ``UMT5EncoderModel`` (d_model
    32) with :func:`diffaccel.tokenizers.t5_tokenizer`, ``AutoencoderKLWan`` (8x spatial, 4x temporal),
    flow-matching Euler scheduler. ``num_frames`` must be ``4k + 1`` (else diffusers rounds it);
    height/width multiples of 16. Defaults in :data:`TINY_CALL_KWARGS`: 32x32, 9 frames.
    ``output_type="np"`` gives ``frames`` of shape (B, num_frames, H, W, 3).

    Example::

        >>> from diffaccel.testing import TINY_CALL_KWARGS
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
    tokenizer = t5_tokenizer(T5_VOCAB)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer), seed, d_model=config["text_dim"], umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    return finish(pipe)
