"""Tiny random-weight building blocks (text encoders, VAEs, UNet configs, schedulers).

Every model built here has **random weights**: it runs the real diffusers/transformers code paths
with the real tensor plumbing, but what it produces is noise. Use it to test and time code that
wraps pipelines, never to judge image quality.

All builders take a ``seed`` and initialise weights inside :func:`seeded`, which forks torch's CPU
RNG, so the caller's global RNG state is left untouched and the same seed always gives the same
weights.

Example::

    >>> from diffaccel.testing.components import tiny_clip_text_encoder, tiny_unet_config
    >>> text_encoder = tiny_clip_text_encoder(seed=0)   # random weights, hidden size 32
    >>> tiny_unet_config()["cross_attention_dim"]
    32
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AutoencoderKL, SchedulerMixin
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5EncoderModel,
        UMT5EncoderModel,
    )

__all__ = [
    "SCHEDULER_NAMES",
    "SD_SCHEDULER_CONFIG",
    "make_scheduler",
    "seeded",
    "tiny_clip_text_config",
    "tiny_clip_text_encoder",
    "tiny_t5_encoder",
    "tiny_unet_config",
    "tiny_vae",
]

#: Scheduler names accepted by ``scheduler=`` in the UNet pipeline builders.
SCHEDULER_NAMES: tuple[str, ...] = ("ddim", "pndm", "euler", "dpmsolver", "unipc", "ddpm", "lms")

_SCHEDULER_CLASSES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
    "lms": "LMSDiscreteScheduler",
}

#: The noise-schedule part of Stable Diffusion 1.x/2.x/XL's ``scheduler_config.json``.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

_PREDICTION_TYPES = ("epsilon", "v_prediction")


@contextlib.contextmanager
def seeded(seed: int, salt: str = "") -> Iterator[None]:
    """Run the body with torch's CPU RNG seeded from ``(seed, salt)``, restoring the RNG afterwards.

    ``salt`` gives each component its own stream, so changing one component's config does not
    change the weights of the others.

    Example::

        >>> import torch
        >>> with seeded(0, "unet"):
        ...     a = torch.randn(2)
        >>> with seeded(0, "unet"):
        ...     b = torch.randn(2)
        >>> bool((a == b).all())
        True
    """
    derived = (int(seed) * 1_000_003 + zlib.crc32(salt.encode())) % (2**63)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived)
        yield


def make_scheduler(
    name: str,
    config: dict[str, Any] | None = None,
    prediction_type: str | None = None,
) -> SchedulerMixin:
    """Build a diffusers scheduler by short name from a scheduler config (SD's by default).

    Args:
        name: One of :data:`SCHEDULER_NAMES` (``"ddim"``, ``"pndm"``, ``"euler"``, ``"dpmsolver"``,
            ``"unipc"``, ``"ddpm"``, ``"lms"``). ``"lms"`` needs scipy.
        config: A scheduler config (e.g. ``pipe.scheduler.config``); defaults to
            :data:`SD_SCHEDULER_CONFIG`. Keys a class does not know are ignored.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; ``None`` keeps the config's.

    Example::

        >>> sched = make_scheduler("euler", prediction_type="v_prediction")
        >>> type(sched).__name__, sched.config.prediction_type
        ('EulerDiscreteScheduler', 'v_prediction')
    """
    import diffusers

    if name not in _SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; supported: {', '.join(SCHEDULER_NAMES)}")
    if prediction_type is not None and prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; supported: {', '.join(_PREDICTION_TYPES)}")
    cls = getattr(diffusers, _SCHEDULER_CLASSES[name])
    if name == "lms":
        from diffusers.utils import is_scipy_available

        if not is_scipy_available():
            raise ImportError('scheduler="lms" (LMSDiscreteScheduler) needs scipy: `pip install scipy`')
    kwargs = {} if prediction_type is None else {"prediction_type": prediction_type}
    return cls.from_config(dict(config if config is not None else SD_SCHEDULER_CONFIG), **kwargs)


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------


def tiny_clip_text_config(
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    projection_dim: int = 32,
    **overrides: Any,
) -> CLIPTextConfig:
    """A tiny ``CLIPTextConfig`` compatible with :func:`diffaccel.tokenizers.clip_tokenizer`.

    ``vocab_size`` is 49408 and the special-token ids are CLIP's real ones (bos 49406, eos/pad 49407),
    so the pooled output is taken at the real ``<|endoftext|>`` position.

    Example::

        >>> tiny_clip_text_config().vocab_size
        49408
    """
    from transformers import CLIPTextConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        projection_dim=projection_dim,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def tiny_clip_text_encoder(
    seed: int = 0,
    *,
    with_projection: bool = False,
    salt: str = "clip",
    **config_overrides: Any,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A random-weight CLIP text encoder (``CLIPTextModel`` or ``CLIPTextModelWithProjection``).

    Random weights: its embeddings are noise. Config: :func:`tiny_clip_text_config` plus overrides.

    Example::

        >>> enc = tiny_clip_text_encoder(seed=0, with_projection=True)
        >>> type(enc).__name__, enc.config.hidden_size
        ('CLIPTextModelWithProjection', 32)
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    config = tiny_clip_text_config(**config_overrides)
    with seeded(seed, salt):
        model = cls(config)
    return model.eval()


def tiny_t5_encoder(
    vocab_size: int,
    seed: int = 0,
    *,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    umt5: bool = False,
    salt: str = "t5",
    **config_overrides: Any,
) -> T5EncoderModel | UMT5EncoderModel:
    """A random-weight ``T5EncoderModel`` (or ``UMT5EncoderModel`` with ``umt5=True``).

    Random weights: its embeddings are noise. ``vocab_size`` must be at least ``len(tokenizer)``
    (see :func:`diffaccel.tokenizers.t5_tokenizer`).

    Example::

        >>> from diffaccel.tokenizers import t5_tokenizer
        >>> enc = tiny_t5_encoder(len(t5_tokenizer()), seed=0)
        >>> enc.config.d_model
        32
    """
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    kwargs.update(config_overrides)
    if umt5:
        from transformers import UMT5Config, UMT5EncoderModel

        config, cls = UMT5Config(**kwargs), UMT5EncoderModel
    else:
        from transformers import T5Config, T5EncoderModel

        config, cls = T5Config(**kwargs), T5EncoderModel
    with seeded(seed, salt):
        model = cls(config)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# UNet / VAE
# --------------------------------------------------------------------------------------------------


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """Config of the tiny ``UNet2DConditionModel`` used by the SD builders (SD1.5 in miniature).

    Block structure mirrors SD 1.5's -- cross-attention down blocks at the high resolutions, a plain
    ``DownBlock2D`` at the lowest, a ``UNetMidBlock2DCrossAttn`` mid block and mirrored up blocks --
    with 3 levels instead of 4 and tiny channels: ``block_out_channels=(16, 32, 32)``,
    ``layers_per_block=1``, ``cross_attention_dim=32``, ``sample_size=8`` (latents 8x8).

    Args:
        **overrides: Any ``UNet2DConditionModel`` config key, e.g. ``in_channels=9`` (inpainting) or
            ``sample_size=16``.

    Example::

        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(**tiny_unet_config(sample_size=16))   # random weights
        >>> unet.config.down_block_types
        ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D')
    """
    config: dict[str, Any] = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    config.update(overrides)
    return config


def tiny_vae(
    seed: int = 0,
    *,
    block_out_channels: tuple[int, ...] = (8, 16),
    latent_channels: int = 4,
    norm_num_groups: int = 4,
    layers_per_block: int = 1,
    salt: str = "vae",
    **config_overrides: Any,
) -> AutoencoderKL:
    """A random-weight ``AutoencoderKL``; spatial scale factor is ``2 ** (len(block_out_channels) - 1)``.

    Random weights: decoded images are noise. Defaults give a 2x VAE with 4 latent channels.

    Example::

        >>> vae = tiny_vae(seed=0, block_out_channels=(8, 8, 16, 16))   # 8x, like SD's VAE
        >>> 2 ** (len(vae.config.block_out_channels) - 1)
        8
    """
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    kwargs: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        layers_per_block=layers_per_block,
        sample_size=32,
    )
    kwargs.update(config_overrides)
    with seeded(seed, salt):
        vae = AutoencoderKL(**kwargs)
    return vae.eval()
