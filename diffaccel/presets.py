"""Presets: one knob (``"fast"``, ``"balanced"``, ``"quality"``) for users who do not want to pick
key steps themselves; ``diffaccel.accelerate(pipe, "fast")`` and ``--preset fast`` take them.

Each preset is what the measurements on the bundled micro-SD say is best at its speed (``diffaccel
eval`` against DeepCache in the same run; figures in ``docs/measurements.md``): deep reuse of the
UNet (the outermost decoder layer runs at non-key steps), key steps placed by the adaptive schedule,
and guidance reuse at non-key steps. The three differ only in the adaptive threshold (the feature
drift allowed between key steps). Forecasting (``forecast=1``) is left off: on micro-SD it raised
PSNR by well under 1 dB and shifted small objects' colors (the verifier's color check failed more
often). The explicit configs stay for those who want to tune.

Presets exist for pipelines whose denoiser is a ``UNet2DConditionModel`` (Stable Diffusion and SDXL
with their img2img, inpaint and ControlNet variants) and for transformer (DiT) pipelines whose blocks
the delta cache knows (SD3, Flux, PixArt, Wan, CogVideoX, LTX). A DiT preset is the delta cache
deciding per block (:func:`dit_preset`), measured on micro-DiT (SD3, 28 steps) and micro-video (Wan,
20 steps) against FirstBlockCache, TaylorSeer, MagCache and cache-dit in the same ``diffaccel eval``
runs (``bench/results/eval/micro-dit-presets``, ``micro-video-presets``): ``"balanced"`` computes every
block for the first 4 steps, then skips a block whose input moved less than 10% since it last ran;
``"fast"`` starts skipping after the first step; ``"quality"`` allows 5%. The CFG branches of
pipelines that call the denoiser once per branch (Wan) share each decision. Other pipelines are
refused with an error that names the configs to use instead. Importing this module imports neither
torch nor diffusers (the command line reads :data:`PRESETS` before any model work).

Example:
    >>> import diffaccel
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = diffaccel.accelerate(tiny_pipeline("sd"), "fast")
    >>> pipe.acceleration[0].schedule
    AdaptiveSchedule(threshold=0.6, max_interval=6, min_key_steps=2)
    >>> preset_configs(tiny_pipeline("pixart-sigma"), "balanced")
    (DeltaCacheConfig(threshold=0.1, max_consecutive_skips=2, first_steps=4, last_steps=1, blocks=None, forecast=0, front_blocks=0, back_blocks=0, share_branches=True),)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import UnsupportedPipelineError

if TYPE_CHECKING:
    from .features.base import FeatureConfig
    from .features.delta_cache import DeltaCacheConfig
    from .features.encoder_reuse import EncoderReuseConfig

#: The preset names, fastest first.
PRESETS = ("fast", "balanced", "quality")

#: The adaptive schedule's threshold of each UNet preset (relative drift of the deepest feature
#: allowed between key steps), chosen on micro-SD at 25 DDIM steps.
_UNET_THRESHOLDS = {"fast": 0.6, "balanced": 0.5, "quality": 0.4}


def unet_preset(name: str) -> EncoderReuseConfig:
    """The encoder-reuse config of the UNet preset ``name``.

    Example:
        >>> unet_preset("quality").schedule.describe()
        'adaptive:0.4:6'
    """
    from .features.encoder_reuse import EncoderReuseConfig

    check_preset(name)
    return EncoderReuseConfig(
        schedule=f"adaptive:{_UNET_THRESHOLDS[name]}:6", shallow_layers=1, reuse_guidance=True
    )


#: The delta-cache settings of each DiT preset (threshold, and the first steps computed in full),
#: chosen on micro-DiT and micro-video (see the module docs).
_DIT_SETTINGS = {"fast": (0.1, 1), "balanced": (0.1, 4), "quality": (0.05, 4)}


def dit_preset(name: str) -> DeltaCacheConfig:
    """The delta-cache config of the transformer (DiT) preset ``name``.

    Example:
        >>> config = dit_preset("fast")
        >>> config.threshold, config.first_steps, config.share_branches
        (0.1, 1, True)
    """
    from .features.delta_cache import DeltaCacheConfig

    check_preset(name)
    threshold, first_steps = _DIT_SETTINGS[name]
    return DeltaCacheConfig(threshold=threshold, first_steps=first_steps, share_branches=True)


def check_preset(name: Any) -> str:
    """``name`` if it is a preset; a ``ValueError`` listing the presets otherwise.

    Example:
        >>> check_preset("fastest")
        Traceback (most recent call last):
        ...
        ValueError: unknown preset 'fastest': use one of 'fast', 'balanced', 'quality'
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(repr(p) for p in PRESETS)}")
    return name


def preset_configs(pipe: Any, name: str) -> tuple[FeatureConfig, ...]:
    """The feature configs of preset ``name`` for ``pipe``'s family (see the module docs).

    Raises ``ValueError`` for an unknown name and
    :class:`~diffaccel.errors.UnsupportedPipelineError` for a pipeline without presets.
    """
    from diffusers import UNet2DConditionModel

    from .seams import block_lists, denoiser

    check_preset(name)
    try:
        model = denoiser(pipe)
    except UnsupportedPipelineError:
        model = None
    if isinstance(model, UNet2DConditionModel):
        return (unet_preset(name),)
    if model is not None and block_lists(model):
        return (dit_preset(name),)
    raise UnsupportedPipelineError(
        f"no preset for {type(pipe).__name__}: presets exist for UNet pipelines (Stable Diffusion, SDXL and "
        "their variants) and transformer pipelines whose blocks the delta cache knows; configure this one "
        "with feature configs instead (README: the features)"
    )
