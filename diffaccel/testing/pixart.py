"""A tiny PixArt-Sigma pipeline (``PixArtTransformer2DModel`` DiT, T5 text encoder).

Example::

    >>> from diffaccel.testing.pixart import tiny_pixart_sigma_pipeline
    >>> type(tiny_pixart_sigma_pipeline(seed=0)).__name__
    'PixArtSigmaPipeline'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..tokenizers import t5_tokenizer
from ._assembly import SD_VAE_CHANNELS, T5_VOCAB, finish
from .components import make_scheduler, seeded, tiny_t5_encoder, tiny_vae

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import PixArtSigmaPipeline

__all__ = ["tiny_pixart_sigma_pipeline"]


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

        >>> from diffaccel.testing import TINY_CALL_KWARGS
        >>> pipe = tiny_pixart_sigma_pipeline(seed=0)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **TINY_CALL_KWARGS["pixart-sigma"]).images.shape
        (1, 64, 64, 3)
    """
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer(T5_VOCAB)
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
        vae=tiny_vae(seed, block_out_channels=SD_VAE_CHANNELS, sample_size=64),
        transformer=transformer,
        scheduler=make_scheduler(scheduler or "dpmsolver", sched_config, prediction_type),
    )
    return finish(pipe)
