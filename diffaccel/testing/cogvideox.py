"""A tiny CogVideoX pipeline (``CogVideoXTransformer3DModel``, T5 encoder, ``AutoencoderKLCogVideoX``).

The transformer's sample sizes and text length follow :data:`TINY_CALL_KWARGS` ``["cogvideox"]``.

Example::

    >>> from diffaccel.testing.cogvideox import tiny_cogvideox_pipeline
    >>> tiny_cogvideox_pipeline(seed=0).transformer.config.max_text_seq_length
    16
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..tokenizers import t5_tokenizer
from ._assembly import T5_VOCAB, finish
from .call_inputs import TINY_CALL_KWARGS
from .components import seeded, tiny_t5_encoder

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import CogVideoXPipeline

__all__ = ["tiny_cogvideox_pipeline"]


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
    tokenizer = t5_tokenizer(T5_VOCAB)
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer), seed, d_model=config["text_embed_dim"]),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return finish(pipe)
