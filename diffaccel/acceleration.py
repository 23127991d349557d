"""``diffaccel.accelerate(pipe, *configs)`` and ``diffaccel.restore(pipe)``.

Features attach at the seams diffusers already has (hooks on the denoiser, the scheduler, module
swaps). The pipeline keeps its own ``__call__``; :class:`AcceleratedPipelineMixin` only wraps it
to tell each feature when a call begins and ends (state is per call) and to collect what the
features did into ``pipe.acceleration_stats``.

Example:
    >>> import diffaccel
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = diffaccel.accelerate(tiny_pipeline("sd"), diffaccel.EncoderReuseConfig("uniform:2"))
    >>> type(pipe).__name__
    'AcceleratedStableDiffusionPipeline'
    >>> _ = pipe("a blue square", num_inference_steps=4, output_type="np")
    >>> pipe.acceleration_stats.features["encoder_reuse"].key_steps
    (0, 2)
    >>> type(diffaccel.restore(pipe)).__name__
    'StableDiffusionPipeline'
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from .attention import QuantizedAttentionConfig
from .errors import DiffaccelError
from .features.base import AttachedFeature, FeatureConfig
from .features.delta_cache import DeltaCacheConfig
from .features.encoder_reuse import EncoderReuseConfig
from .quantization.allocation import DynamicPrecisionConfig
from .quantization.config import QuantizationConfig

#: Feature configs by their ``name``, for reading saved configurations back, in the order they
#: attach (quantization before the dynamic precision that switches its layers; the delta cache's
#: denoiser hook after, so outside, encoder reuse's, so that it sees one call per step).
FEATURE_CONFIGS: dict[str, type[FeatureConfig]] = {
    config.name: config
    for config in (QuantizationConfig, DynamicPrecisionConfig, EncoderReuseConfig, DeltaCacheConfig,
                   QuantizedAttentionConfig)
}

#: File that ``save_pretrained`` writes beside ``model_index.json``.
ACCELERATION_CONFIG_NAME = "diffaccel_config.json"

AccelerationLike = Union[FeatureConfig, Sequence[FeatureConfig], None]


@dataclass
class AccelerationStats:
    """What the features did during one pipeline call.

    ``seconds`` is the wall time of the whole call; ``features`` maps each feature's name to its
    own statistics object (e.g. :class:`~diffaccel.features.encoder_reuse.EncoderReuseStats`).
    """

    seconds: float = 0.0
    features: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON reports."""
        return {
            "seconds": self.seconds,
            "features": {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in self.features.items()},
        }


class AcceleratedPipelineMixin:
    """Mixed into a diffusers pipeline class by :func:`accelerate` (or by the classes in
    :mod:`diffaccel.pipelines`): wraps ``__call__`` with per-call feature bookkeeping and makes
    ``from_pretrained``/``from_pipe`` accept ``acceleration=`` and ``save_pretrained`` keep it.
    """

    _diffaccel_features: list[AttachedFeature]
    acceleration_stats: AccelerationStats | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        features = list(getattr(self, "_diffaccel_features", ()))
        started: list[AttachedFeature] = []
        begin = time.perf_counter()
        stats = AccelerationStats()
        try:
            for feature in features:
                feature.begin_call(self, kwargs)
                started.append(feature)
            output = super().__call__(*args, **kwargs)
        finally:
            for feature in started:
                stats.features[feature.config.name] = feature.end_call()
            stats.seconds = time.perf_counter() - begin
            self.acceleration_stats = stats
        return output

    @property
    def acceleration(self) -> tuple[FeatureConfig, ...]:
        """The feature configs attached to this pipeline."""
        return tuple(f.config for f in getattr(self, "_diffaccel_features", ()))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """Load like diffusers, then attach ``acceleration=`` (a config or a list of configs).

        Without ``acceleration=``, a ``diffaccel_config.json`` saved beside the model (by
        :meth:`save_pretrained`) is applied when the path is a local folder. A saved or requested
        config with a ``pretrained_components(path, kwargs)`` method supplies components to load its
        own way (:class:`~diffaccel.quantization.QuantizationConfig`: the saved quantized denoiser,
        loaded without re-quantizing, even under another ``acceleration=``); components passed in
        ``kwargs`` win.
        """
        acceleration = kwargs.pop("acceleration", None)
        try:
            saved = load_acceleration_config(pretrained_model_name_or_path)
        except DiffaccelError:
            if acceleration is None:
                raise
            saved = []  # an explicit acceleration= overrides a saved config this version cannot read
        configs = saved if acceleration is None else _as_configs(acceleration)
        for config in (*saved, *configs):
            load_components = getattr(config, "pretrained_components", None)
            if load_components is not None:
                kwargs = {**load_components(os.fspath(pretrained_model_name_or_path), kwargs), **kwargs}
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return accelerate(pipe, *configs)

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any) -> Any:
        """Build from another pipeline's components; ``acceleration=`` defaults to the source's."""
        acceleration = kwargs.pop("acceleration", None)
        if acceleration is None:
            acceleration = [f.config for f in getattr(pipeline, "_diffaccel_features", ())]
        pipe = super().from_pipe(pipeline, **kwargs)
        pipe._diffaccel_features = []
        return accelerate(pipe, *_as_configs(acceleration))

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save like diffusers (loadable by the plain diffusers class) plus the acceleration config."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        index["_class_name"] = _diffusers_base(type(self)).__name__
        with open(index_path, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
        configs = {config.name: config.to_dict() for config in self.acceleration}
        with open(os.path.join(save_directory, ACCELERATION_CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(configs, handle, indent=2, sort_keys=True)


def _diffusers_base(cls: type) -> type:
    """The first class in ``cls``'s MRO that is not a diffaccel class."""
    for base in cls.__mro__:
        if not issubclass(base, AcceleratedPipelineMixin):
            return base
    raise DiffaccelError(f"{cls.__name__} has no diffusers base class")


_ACCELERATED_CLASSES: dict[type, type] = {}


def register_accelerated_class(accelerated: type) -> type:
    """Class decorator: make :func:`accelerate` use ``accelerated`` for its diffusers base class."""
    _ACCELERATED_CLASSES[_diffusers_base(accelerated)] = accelerated
    return accelerated


def accelerated_class(base: type) -> type:
    """The accelerated subclass of a diffusers pipeline class (created on first use)."""
    if issubclass(base, AcceleratedPipelineMixin):
        return base
    if base not in _ACCELERATED_CLASSES:
        _ACCELERATED_CLASSES[base] = type(f"Accelerated{base.__name__}", (AcceleratedPipelineMixin, base), {})
    return _ACCELERATED_CLASSES[base]


def _as_configs(acceleration: AccelerationLike) -> list[FeatureConfig]:
    if acceleration is None:
        return []
    if isinstance(acceleration, FeatureConfig):
        return [acceleration]
    configs = list(acceleration)
    for config in configs:
        if not isinstance(config, FeatureConfig):
            raise TypeError(f"acceleration must be diffaccel feature configs, got {type(config).__name__}")
    return configs


def load_acceleration_config(path: str | os.PathLike) -> list[FeatureConfig]:
    """Read the feature configs that :meth:`AcceleratedPipelineMixin.save_pretrained` wrote.

    Returns an empty list when ``path`` is not a local folder or has no such file.

    Example:
        >>> load_acceleration_config("/nonexistent")
        []
    """
    config_path = os.path.join(os.fspath(path), ACCELERATION_CONFIG_NAME)
    if not os.path.isfile(config_path):
        return []
    with open(config_path, encoding="utf-8") as handle:
        data = json.load(handle)
    unknown = set(data) - set(FEATURE_CONFIGS)
    if unknown:
        raise DiffaccelError(f"{config_path} names unknown features {sorted(unknown)}; known: {sorted(FEATURE_CONFIGS)}")
    return [FEATURE_CONFIGS[name].from_dict(data[name]) for name in FEATURE_CONFIGS if name in data]


def accelerate(pipe: Any, *configs: FeatureConfig) -> Any:
    """Attach diffaccel features to a diffusers pipeline, in place, and return it.

    The pipeline's class becomes its accelerated subclass (so ``isinstance`` checks still hold)
    and every call records ``pipe.acceleration_stats``. Calling it again replaces the features.
    Features attach in :data:`FEATURE_CONFIGS` order whatever order they are given in
    (quantization first, then the dynamic precision that switches its layers).

    Args:
        pipe: a diffusers pipeline.
        configs: feature configs, e.g. :class:`~diffaccel.EncoderReuseConfig`.

    Example:
        >>> import diffaccel
        >>> from diffaccel.testing import tiny_pipeline
        >>> pipe = diffaccel.accelerate(tiny_pipeline("sd"), diffaccel.EncoderReuseConfig())
        >>> pipe.acceleration
        (EncoderReuseConfig(schedule=FasterDiffusionSchedule(), parallel=None, max_parallel_steps=None,
                            noise_injection=0.0, noise_injection_below=0.5),)
    """
    order = list(FEATURE_CONFIGS)
    configs = tuple(sorted(_as_configs(list(configs)),
                           key=lambda c: order.index(c.name) if c.name in order else len(order)))
    names = [config.name for config in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"each feature may be given once, got {names}")
    _detach_all(pipe)
    if not isinstance(pipe, AcceleratedPipelineMixin):
        pipe._diffaccel_original_class = type(pipe)
        pipe.__class__ = accelerated_class(type(pipe))
    attached: list[AttachedFeature] = []
    try:
        for config in configs:
            attached.append(config.attach(pipe))
    except BaseException:
        for feature in reversed(attached):
            feature.detach(pipe)
        restore(pipe)
        raise
    pipe._diffaccel_features = attached
    return pipe


def _detach_all(pipe: Any) -> None:
    for feature in reversed(getattr(pipe, "_diffaccel_features", ())):
        feature.detach(pipe)
    pipe._diffaccel_features = []


def restore(pipe: Any) -> Any:
    """Undo :func:`accelerate`: remove every hook and give the pipeline back its own class.

    Example:
        >>> import diffaccel
        >>> from diffaccel.testing import tiny_pipeline
        >>> pipe = diffaccel.restore(diffaccel.accelerate(tiny_pipeline("sd"), diffaccel.EncoderReuseConfig()))
        >>> hasattr(pipe.unet, "_diffusers_hook")
        False
    """
    _detach_all(pipe)
    original = pipe.__dict__.pop("_diffaccel_original_class", None)
    if original is not None:
        pipe.__class__ = original
        pipe.__dict__.pop("_diffaccel_features", None)
        pipe.__dict__.pop("acceleration_stats", None)
    return pipe

