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

import torch


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
    if isinstance(obj, torch.Tensor):
        if obj.ndim == 0 or obj.shape[0] % count:
            return obj
        blocks = obj.shape[0] // count
        index = torch.cat([indices + j * count for j in range(blocks)]).to(obj.device)
        return obj[index]
    if isinstance(obj, dict):
        return {key: reindex_batch(value, indices) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(reindex_batch(value, indices) for value in obj)
    return obj
