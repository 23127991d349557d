"""``diffaccel.accelerate(pipe, *configs)`` and ``diffaccel.restore(pipe)``.

Features attach at the seams diffusers already has (hooks on the denoiser, the scheduler, module
swaps). The pipeline keeps its own ``__call__``; :class:`AcceleratedPipelineMixin` only wraps it
to tell each feature when a call begins and ends (state is per call) and to collect what the
features did into ``pipe.acceleration_stats``. The wrapper has the base class's own signature
(``inspect.signature(AcceleratedStableDiffusionPipeline.__call__)`` lists ``prompt``, ``height``, ...).

**Features follow the pipeline that is called.** Pipelines built with ``from_pipe`` share their
modules (the UNet or transformer, the ControlNet). The features of at most one pipeline are attached
to a shared module at a time; at the start of each call the mixin makes sure that the features
attached are the called pipeline's own, re-attaching them if another pipeline's replaced them. So
``src`` and ``type(src).from_pipe(src, acceleration=...)`` each run as configured, in any order.
Hooks do nothing outside a call of the pipeline that owns them, and quantized attention is installed
only during its owner's calls: a plain diffusers pipeline that shares the modules
(``StableDiffusionPipeline.from_pipe(accelerated)``) draws the untouched image. Module swaps are
the exception, since they change the shared module itself: a denoiser quantized by
:class:`~diffaccel.quantization.QuantizationConfig` is quantized for every pipeline that uses it.

**Features follow the pipeline's current modules.** Replacing a component after ``accelerate``
(``pipe.unet = fine_tuned_unet``) moves the features to the new module at the next call: they are
detached from the old one and attached to the new one (quantization quantizes the new denoiser).

Example:
    >>> import diffaccel
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = diffaccel.accelerate(tiny_pipeline("sd"), diffaccel.EncoderReuseConfig("uniform:2"))
    >>> type(pipe).__name__
    'AcceleratedStableDiffusionPipeline'
    >>> _ = pipe("a blue square", num_inference_steps=4, output_type="np")
    >>> pipe.acceleration_stats.features["encoder_reuse"].key_steps
    (0, 2)
    >>> copy = type(pipe).from_pipe(pipe, acceleration=diffaccel.EncoderReuseConfig("uniform:4"))
    >>> _ = copy("a blue square", num_inference_steps=4, output_type="np")
    >>> _ = pipe("a blue square", num_inference_steps=4, output_type="np")    # pipe keeps its own features
    >>> pipe.acceleration_stats.features["encoder_reuse"].key_steps
    (0, 2)
    >>> type(diffaccel.restore(pipe)).__name__
    'StableDiffusionPipeline'
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch
from diffusers.utils.torch_utils import is_compiled_module

# The built-in feature configs register themselves (``attach_order``, see
# :mod:`diffaccel.features.base`) when their modules load: importing them here makes
# :data:`FEATURE_CONFIGS` (read by :func:`load_acceleration_config` and :func:`accelerate`) know them all.
from .attention import QuantizedAttentionConfig  # noqa: F401  (attach_order 50)
from .errors import DiffaccelError, UnsupportedPipelineError
from .features.base import FEATURE_CONFIGS, AttachedFeature, FeatureConfig
from .presets import check_preset, preset_configs
from .features.delta_cache import DeltaCacheConfig  # noqa: F401  (attach_order 40)
from .features.encoder_reuse import EncoderReuseConfig  # noqa: F401  (attach_order 30)
from .quantization.config import QuantizationConfig  # noqa: F401  (attach_order 10)
from .quantization.dynamic import DynamicPrecisionConfig  # noqa: F401  (attach_order 20)

#: File that ``save_pretrained`` writes beside ``model_index.json``.
ACCELERATION_CONFIG_NAME = "diffaccel_config.json"

AccelerationLike = Union[FeatureConfig, str, Sequence[Union[FeatureConfig, str]], None]


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

    def summary(self) -> str:
        """The call's seconds, then one summary per feature whose statistics have one, in attach order.

        Example:
            >>> from diffaccel.features.delta_cache import DeltaCacheStats
            >>> print(AccelerationStats(1.5, {"delta_cache": DeltaCacheStats(blocks_computed=3, blocks_skipped=1)}).summary())
            seconds: 1.500
            delta cache: 1/4 block evaluations skipped
        """
        lines = [f"seconds: {self.seconds:.3f}"]
        lines += [stats.summary() for stats in self.features.values() if hasattr(stats, "summary")]
        return "\n".join(lines)


class AcceleratedPipelineMixin:
    """Mixed into a diffusers pipeline class by :func:`accelerate` (or by the classes in
    :mod:`diffaccel.pipelines`): wraps ``__call__`` with per-call feature bookkeeping and makes
    ``from_pretrained``/``from_pipe`` accept ``acceleration=`` and ``save_pretrained`` keep it.

    Every subclass gets its own ``__call__`` wrapper, made with ``functools.wraps`` from the base
    class's, so it keeps the base's signature and docstring (diffusers' tests, IDEs and argument
    filters read them).
    """

    _diffaccel_configs: tuple[FeatureConfig, ...] = ()
    _diffaccel_features: Sequence[AttachedFeature] = ()
    acceleration_stats: AccelerationStats | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        call = _inherited_call(cls)
        if call is not None and "__call__" not in cls.__dict__ and not getattr(call, "_diffaccel_wrapper", False):
            cls.__call__ = _accelerated_call(cls, call)

    @property
    def acceleration(self) -> tuple[FeatureConfig, ...]:
        """The feature configs of this pipeline (attached again at each call if another pipeline's
        features, or a replaced component, took their place)."""
        return tuple(getattr(self, "_diffaccel_configs", ()))

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
        except DiffaccelError as error:
            if acceleration is None:
                raise
            # An explicit acceleration= overrides a saved config that cannot be read.
            warnings.warn(f"ignoring the saved acceleration config, acceleration= replaces it: {error}", stacklevel=2)
            saved = []
        configs = saved if acceleration is None else _as_configs(acceleration)
        for config in (*saved, *configs):
            load_components = getattr(config, "pretrained_components", None)
            if load_components is not None:
                kwargs = {**load_components(os.fspath(pretrained_model_name_or_path), kwargs), **kwargs}
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return accelerate(pipe, *configs)

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any) -> Any:
        """Build from another pipeline's components; ``acceleration=`` defaults to the source's.

        Both pipelines share the components and each keeps its own features (see the module docs).
        """
        acceleration = kwargs.pop("acceleration", None)
        if acceleration is None:
            acceleration = list(getattr(pipeline, "_diffaccel_configs", ()))
        pipe = super().from_pipe(pipeline, **kwargs)
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


def _inherited_call(cls: type) -> Callable[..., Any] | None:
    """The ``__call__`` that instances of ``cls`` use (looked up in the MRO, not on the metaclass)."""
    return next((klass.__dict__["__call__"] for klass in cls.__mro__ if "__call__" in klass.__dict__), None)


def _accelerated_call(cls: type, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` (the base class's ``__call__``) with the feature bookkeeping around it, under
    ``call``'s own name, docstring and signature."""

    @functools.wraps(call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _run_call(self, call, args, kwargs)

    __call__.__qualname__ = f"{cls.__qualname__}.__call__"
    __call__._diffaccel_wrapper = True
    return __call__


def _run_call(pipe: Any, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """One pipeline call: attach the pipeline's features if needed, tell them the call begins and
    ends, and record what they did in ``pipe.acceleration_stats``."""
    _ensure_attached(pipe)
    features = list(pipe._diffaccel_features) if pipe.__dict__.get("_diffaccel_bound") is not None else []
    started: list[AttachedFeature] = []
    begin = time.perf_counter()
    stats = AccelerationStats()
    try:
        for feature in features:
            feature.begin_call(pipe, kwargs)
            started.append(feature)
        output = call(pipe, *args, **kwargs)
    finally:
        for feature in started:
            stats.features[feature.config.name] = feature.end_call()
        stats.seconds = time.perf_counter() - begin
        pipe.acceleration_stats = stats
    return output


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


def _as_configs(acceleration: AccelerationLike) -> list[FeatureConfig | str]:
    """Feature configs and preset names (checked; :func:`accelerate` expands them for the pipeline)."""
    if acceleration is None:
        return []
    if isinstance(acceleration, (FeatureConfig, str)):
        acceleration = [acceleration]
    configs = list(acceleration)
    for config in configs:
        if isinstance(config, str):
            check_preset(config)
        elif not isinstance(config, FeatureConfig):
            raise TypeError(
                f"acceleration must be diffaccel feature configs or a preset name, got {type(config).__name__}"
            )
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
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise DiffaccelError(
                f"{config_path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno} "
                f"(character {error.pos})"
            ) from error
    if not isinstance(data, dict):
        raise DiffaccelError(
            f"{config_path} must hold a JSON object that maps feature names to their settings, "
            f"got a {type(data).__name__}"
        )
    unknown = set(data) - set(FEATURE_CONFIGS)
    if unknown:
        raise DiffaccelError(f"{config_path} names unknown features {sorted(unknown)}; known: {sorted(FEATURE_CONFIGS)}")
    return [_read_feature(config_path, name, data[name]) for name in FEATURE_CONFIGS if name in data]


def _read_feature(config_path: str, name: str, settings: Any) -> FeatureConfig:
    """One feature's config from the saved settings; bad settings name the file and the feature."""
    if not isinstance(settings, dict):
        raise DiffaccelError(f"{config_path}: the settings of {name!r} must be a JSON object, got {settings!r}")
    try:
        return FEATURE_CONFIGS[name].from_dict(settings)
    except (TypeError, ValueError) as error:
        raise DiffaccelError(f"{config_path}: invalid settings for {name!r}: {error}") from error


def accelerate(pipe: Any, *configs: FeatureConfig | str) -> Any:
    """Attach diffaccel features to a diffusers pipeline, in place, and return it.

    The pipeline's class becomes its accelerated subclass (so ``isinstance`` checks still hold)
    and every call records ``pipe.acceleration_stats``. Calling it again replaces the features.
    Features of another pipeline that shares a module with ``pipe`` (``from_pipe``) are detached
    from it; that pipeline attaches them again at its next call.
    Features attach in increasing ``attach_order`` (:data:`FEATURE_CONFIGS` order) whatever order
    they are given in (quantization first, then the dynamic precision that switches its layers);
    configs of unregistered classes attach last.

    Args:
        pipe: a diffusers pipeline.
        configs: feature configs, e.g. :class:`~diffaccel.EncoderReuseConfig`, or a preset name
            (``"fast"``, ``"balanced"``, ``"quality"``; see :mod:`diffaccel.presets`) that expands to
            the configs measured best for the pipeline's family.

    Example:
        >>> import diffaccel
        >>> from diffaccel.testing import tiny_pipeline
        >>> pipe = diffaccel.accelerate(tiny_pipeline("sd"), diffaccel.EncoderReuseConfig())
        >>> pipe.acceleration
        (EncoderReuseConfig(schedule=FasterDiffusionSchedule(), shallow_layers=None, forecast=0,
                            reuse_guidance=False, parallel=None, max_parallel_steps=None,
                            noise_injection=0.0, noise_injection_below=0.5),)
    """
    configs_given = _as_configs(list(configs))
    if configs_given:
        _refuse_compile_wrappers(pipe)
    expanded: list[FeatureConfig] = []
    for config in configs_given:
        expanded += preset_configs(pipe, config) if isinstance(config, str) else [config]
    configs = tuple(sorted(expanded, key=lambda c: getattr(c, "attach_order", math.inf)))
    names = [config.name for config in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"each feature may be given once, got {names}")
    _detach_all(pipe)
    if not isinstance(pipe, AcceleratedPipelineMixin):
        pipe._diffaccel_original_class = type(pipe)
        pipe.__class__ = accelerated_class(type(pipe))
    pipe._diffaccel_configs, pipe._diffaccel_features = configs, []
    try:
        _attach(pipe)
    except BaseException:
        restore(pipe)
        raise
    return pipe


def _refuse_compile_wrappers(pipe: Any) -> None:
    """An ``UnsupportedPipelineError`` when a model component is a ``torch.compile`` wrapper: the
    features hook modules inside the model, which the wrapper hides (compiling in place works)."""
    for name, module in _pipeline_modules(pipe).items():
        if is_compiled_module(module):
            raise UnsupportedPipelineError(
                f"pipe.{name} is a torch.compile wrapper ({type(module).__name__}): diffaccel's features hook the "
                f"modules inside it, which the wrapper hides. Compile in place instead, pipe.{name}.compile() (before "
                "or after diffaccel.accelerate); the features then run inside the compiled model"
            )


#: The pipeline whose features are attached to a module, for modules shared through ``from_pipe``.
_OWNERS: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def _pipeline_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's model components (what features attach to), by attribute name."""
    names = [name for name in getattr(pipe, "config", {}) if not name.startswith("_")]
    return {name: vars(pipe)[name] for name in names if isinstance(vars(pipe).get(name), torch.nn.Module)}


def _same_modules(a: dict[str, torch.nn.Module], b: dict[str, torch.nn.Module]) -> bool:
    return a.keys() == b.keys() and all(a[name] is b[name] for name in a)


def _ensure_attached(pipe: Any) -> None:
    """Before a call: attach the pipeline's features again if another pipeline's features took
    their place on a shared module, or if a component was replaced since they were attached."""
    if not pipe._diffaccel_configs:
        return
    bound = pipe.__dict__.get("_diffaccel_bound")
    if bound is None or not _same_modules(bound, _pipeline_modules(pipe)):
        _attach(pipe)


def _attach(pipe: Any) -> None:
    """Attach ``pipe``'s configs to its current modules, detaching first its own features (from the
    modules they were on) and any other pipeline's features on the modules it shares with it."""
    _detach_all(pipe)
    if not pipe._diffaccel_configs:
        return
    modules = _pipeline_modules(pipe)
    for module in modules.values():
        owner = _OWNERS.get(module)
        other = owner() if owner is not None else None
        if other is not None and other is not pipe:
            _detach_all(other)  # it keeps its configs and attaches them again at its next call
    attached: list[AttachedFeature] = []
    try:
        for config in pipe._diffaccel_configs:
            attached.append(config.attach(pipe))
    except BaseException:
        for feature in reversed(attached):
            feature.detach(pipe)
        raise
    pipe._diffaccel_features, pipe._diffaccel_bound = attached, modules
    for module in modules.values():
        _OWNERS[module] = weakref.ref(pipe)


def _detach_all(pipe: Any) -> None:
    """Detach the pipeline's features if they are attached (its configs stay)."""
    bound = pipe.__dict__.get("_diffaccel_bound")
    if bound is None:
        return
    pipe._diffaccel_bound = None
    for feature in reversed(pipe._diffaccel_features):
        feature.detach(pipe)
    for module in bound.values():
        owner = _OWNERS.get(module)
        if owner is not None and owner() is pipe:
            del _OWNERS[module]


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
    for name in ("_diffaccel_configs", "_diffaccel_features", "_diffaccel_bound"):
        pipe.__dict__.pop(name, None)
    original = pipe.__dict__.pop("_diffaccel_original_class", None)
    if original is not None:
        pipe.__class__ = original
        pipe.__dict__.pop("acceleration_stats", None)
    return pipe

