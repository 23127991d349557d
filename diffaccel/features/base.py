"""The contract between :func:`diffaccel.accelerate` and a feature.

A *feature config* is a frozen dataclass that knows how to attach itself to a pipeline; the
attached feature is told when each pipeline call begins and ends, so its state is reset per call
and it can report what it did.

A config is its fields and its rules: :meth:`FeatureConfig.to_dict` / :meth:`FeatureConfig.from_dict`
come from the dataclass fields (tuples are saved as lists; a field whose value needs its own JSON
form says so with :func:`json_field`), and ``__post_init__`` validates with the helpers of
:mod:`diffaccel.features.checks`.

**Registration.** A config class joins :func:`diffaccel.accelerate` and ``diffaccel_config.json``
by naming its place in the attach order: ``class MyConfig(FeatureConfig, attach_order=60)``.
Features attach in increasing ``attach_order`` whatever order they are passed in. The built-in
order (:data:`FEATURE_CONFIGS`):

====  ========================  ===================================================================
10    ``quantization``          swaps the denoiser's Linear layers, so it comes first
20    ``dynamic_precision``     switches the residual of the layers quantization made
30    ``encoder_reuse``         denoiser hook; inside the delta cache's, so it sees one call per step
40    ``delta_cache``           block hooks, outside encoder reuse's
50    ``quantized_attention``   routes the denoiser's attention
====  ========================  ===================================================================

A config may leave ``attach`` to its :class:`AttachedFeature` class, which names it with
``class MyFeature(AttachedFeature, config=MyConfig)`` (so the config's module need not import the
feature's, as :mod:`diffaccel.quantization.feature` does for ``QuantizationConfig``).

Example (a do-nothing feature, not registered since it names no ``attach_order``):
    >>> from dataclasses import dataclass
    >>> from diffaccel.features.checks import check_int
    >>> @dataclass(frozen=True)
    ... class NoopConfig(FeatureConfig):
    ...     name = "noop"
    ...     level: int = 1
    ...     def __post_init__(self):
    ...         check_int("NoopConfig", "level", self.level)
    >>> class NoopFeature(AttachedFeature, config=NoopConfig):
    ...     def __init__(self, config, pipe):
    ...         self.config = config
    ...     def end_call(self):
    ...         return {}
    >>> NoopConfig(level=2).to_dict(), NoopConfig.from_dict({"level": 3})
    ({'level': 2}, NoopConfig(level=3))
    >>> type(NoopConfig().attach(pipe=None)).__name__, "noop" in FEATURE_CONFIGS
    ('NoopFeature', False)
    >>> NoopConfig.from_dict({"levels": 3})
    Traceback (most recent call last):
    ...
    ValueError: NoopConfig has no settings ['levels']; its settings are ['level']
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch

from ..seams import tree_map_tensors


def json_field(default: Any, *, to_json: Callable[[Any], Any] | None = None,
               from_json: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field with its own JSON form: ``to_json`` makes it (instead of the default
    conversion) in :meth:`FeatureConfig.to_dict`, ``from_json`` reads it back in
    :meth:`FeatureConfig.from_dict` (not called for ``None``).

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class ScaleConfig(FeatureConfig):
        ...     name = "scale"
        ...     scale: complex = json_field(1j, to_json=str, from_json=complex)
        >>> ScaleConfig().to_dict(), ScaleConfig.from_dict({"scale": "2j"})
        ({'scale': '1j'}, ScaleConfig(scale=2j))
    """
    metadata = {key: fn for key, fn in (("to_json", to_json), ("from_json", from_json)) if fn is not None}
    return dataclasses.field(default=default, metadata=metadata)


def _to_json(value: Any) -> Any:
    """The default JSON form of a field value: nested configs (anything with ``to_dict``) as their
    dict, enums as their value, tuples and lists as lists, mappings with their values converted."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_to_json(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _to_json(item) for key, item in value.items()}
    return value


def _from_json(value: Any) -> Any:
    """JSON lists back as tuples (configs are frozen and hashable), at any depth of lists."""
    return tuple(_from_json(item) for item in value) if isinstance(value, list) else value


class FeatureConfig:
    """Base class of feature configs: frozen dataclasses validated at construction.

    ``class MyConfig(FeatureConfig, attach_order=N)`` registers the config under its ``name`` (see
    the module docs); without ``attach_order`` it is not registered.
    """

    name: ClassVar[str]
    attach_order: ClassVar[int]
    #: The :class:`AttachedFeature` class that declared ``config=`` this class, if any.
    feature_type: ClassVar[type["AttachedFeature"] | None] = None

    def __init_subclass__(cls, attach_order: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if attach_order is not None:
            _register(cls, attach_order)

    def attach(self, pipe: Any) -> "AttachedFeature":
        """Install the feature on ``pipe`` (hooks, module swaps) and return its handle (by default
        :meth:`AttachedFeature.attach` of :attr:`feature_type`)."""
        if self.feature_type is None:
            raise NotImplementedError(
                f"{type(self).__name__} defines no attach and no AttachedFeature names it "
                f"(class MyFeature(AttachedFeature, config={type(self).__name__}))"
            )
        return self.feature_type.attach(self, pipe)

    def pretrained_components(self, path: str, load_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Components ``from_pretrained(path)`` should load this feature's way (by default
        :meth:`AttachedFeature.pretrained_components` of :attr:`feature_type`; none)."""
        return {} if self.feature_type is None else self.feature_type.pretrained_components(self, path, load_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description of the fields, read back by :meth:`from_dict`."""
        return {
            item.name: (item.metadata.get("to_json") or _to_json)(getattr(self, item.name))
            for item in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureConfig":
        """Rebuild a config from :meth:`to_dict`'s output: lists come back as tuples (or through the
        field's ``from_json``, see :func:`json_field`), missing settings take their defaults, unknown
        ones raise a ``ValueError`` naming them, and ``__post_init__`` validates the rest."""
        fields = {item.name: item for item in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__name__} has no settings {unknown}; its settings are {list(fields)}")
        values = {}
        for key, value in data.items():
            read = fields[key].metadata.get("from_json")
            values[key] = _from_json(value) if read is None else value if value is None else read(value)
        return cls(**values)


_REGISTERED: dict[str, type[FeatureConfig]] = {}


def _register(config: type[FeatureConfig], order: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"{config.__name__}: attach_order must be an int, got {order!r}")
    name = getattr(config, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config.__name__} names its attach_order but has no name")

    def same(other: type[FeatureConfig]) -> bool:  # the same class defined again (a module reloaded)
        return (other.__module__, other.__qualname__) == (config.__module__, config.__qualname__)

    previous = _REGISTERED.get(name)
    if previous is not None and not same(previous):
        raise ValueError(f"feature name {name!r} of {config.__qualname__} is taken by {previous.__qualname__}")
    clash = [c for c in _REGISTERED.values() if c.attach_order == order and c.name != name and not same(c)]
    if clash:
        raise ValueError(f"attach_order {order} of {config.__qualname__} is taken by {clash[0].__qualname__}")
    config.attach_order = order
    _REGISTERED[name] = config


class _FeatureConfigs(Mapping[str, type[FeatureConfig]]):
    """Read-only view of the registered configs by name, iterated in attach order."""

    def __getitem__(self, name: str) -> type[FeatureConfig]:
        return _REGISTERED[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_REGISTERED, key=lambda name: _REGISTERED[name].attach_order))

    def __len__(self) -> int:
        return len(_REGISTERED)

    def __repr__(self) -> str:
        return f"FEATURE_CONFIGS({dict(self)!r})"


#: The registered feature configs by ``name``, in attach order (read-only; a config joins by
#: declaring ``attach_order``).
FEATURE_CONFIGS: Mapping[str, type[FeatureConfig]] = _FeatureConfigs()


class AttachedFeature:
    """A feature installed on one pipeline.

    ``class MyFeature(AttachedFeature, config=MyConfig)`` makes it ``MyConfig``'s
    :attr:`~FeatureConfig.feature_type`: ``MyConfig.attach`` then calls :meth:`attach`.

    Capabilities (class attributes other code reads instead of checking which feature it is):

    * ``supports_chunked_batches``: whether the feature stays correct when one denoising step
      calls the denoiser several times on chunks of the batch (FK steering's ``max_batch``);
      features that keep state across the whole batch or count denoiser calls as steps set it
      to ``False`` and steering refuses to chunk them.
    """

    config: FeatureConfig
    supports_chunked_batches: ClassVar[bool] = True

    def __init_subclass__(cls, config: type[FeatureConfig] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if config is not None:
            config.feature_type = cls

    @classmethod
    def attach(cls, config: FeatureConfig, pipe: Any) -> "AttachedFeature":
        """Install ``config``'s feature on ``pipe`` (by default ``cls(config, pipe)``)."""
        return cls(config, pipe)  # type: ignore[call-arg]

    @classmethod
    def pretrained_components(cls, config: FeatureConfig, path: str, load_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Components ``from_pretrained(path)`` should load this feature's way; none by default."""
        return {}

    def begin_call(self, pipe: Any, call_kwargs: Mapping[str, Any]) -> None:
        """Called before each pipeline call: validate the call's arguments and reset state."""

    def end_call(self) -> Any:
        """Called after each pipeline call (also when it raised): release state, return stats."""
        raise NotImplementedError

    def detach(self, pipe: Any) -> None:
        """Remove everything :meth:`FeatureConfig.attach` installed."""

    def reindex(self, indices: torch.Tensor) -> None:
        """Called when particle steering reorders the samples of a running call: sample ``i`` takes
        the state of sample ``indices[i]``. Features that keep per-sample state (cached activations)
        reindex it, e.g. with :func:`reindex_batch`; the default keeps none."""


def reindex_batch(obj: Any, indices: torch.Tensor) -> Any:
    """Reindex every tensor in a nested structure whose batch (first dimension) holds the samples
    ``m`` times in blocks (``m = 2`` for a CFG batch ``[uncond, cond]``).

    Example:
        >>> reindex_batch({"x": torch.tensor([0, 1, 10, 11])}, torch.tensor([1, 1]))
        {'x': tensor([ 1,  1, 11, 11])}
    """
    count = indices.numel()

    def reindex(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 0 or tensor.shape[0] % count:
            return tensor
        blocks = tensor.shape[0] // count
        return tensor[torch.cat([indices + j * count for j in range(blocks)]).to(tensor.device)]

    return tree_map_tensors(reindex, obj)
