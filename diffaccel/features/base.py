"""The contract between :func:`diffaccel.accelerate` and a feature.

A *feature config* is a frozen dataclass that knows how to attach itself to a pipeline; the
attached feature is told when each pipeline call begins and ends, so its state is reset per call
and it can report what it did.

Example (a do-nothing feature):
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class NoopConfig(FeatureConfig):
    ...     name = "noop"
    ...     def attach(self, pipe):
    ...         return NoopFeature()
    >>> class NoopFeature(AttachedFeature):
    ...     def end_call(self):
    ...         return {}
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping


class FeatureConfig:
    """Base class of feature configs: frozen dataclasses validated at construction."""

    name: ClassVar[str]

    def attach(self, pipe: Any) -> "AttachedFeature":
        """Install the feature on ``pipe`` (hooks, module swaps) and return its handle."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description, read back by :meth:`from_dict`."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureConfig":
        """Rebuild a config from :meth:`to_dict`'s output."""
        raise NotImplementedError


class AttachedFeature:
    """A feature installed on one pipeline."""

    config: FeatureConfig

    def begin_call(self, pipe: Any, call_kwargs: Mapping[str, Any]) -> None:
        """Called before each pipeline call: validate the call's arguments and reset state."""

    def end_call(self) -> Any:
        """Called after each pipeline call (also when it raised): release state, return stats."""
        raise NotImplementedError

    def detach(self, pipe: Any) -> None:
        """Remove everything :meth:`FeatureConfig.attach` installed."""
