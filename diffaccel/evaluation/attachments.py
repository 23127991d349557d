"""Each evaluated variant bound to the pipeline: attach it before a call, detach it after.

Variants are interleaved on one pipeline (every variant runs batch by batch on the same inputs),
so attaching and detaching must be cheap and exact: :class:`FeatureAttachment` attaches diffaccel
features with :func:`diffaccel.accelerate` and removes them with :func:`diffaccel.restore`; a
variant that quantizes weights gets its own deep copy of the denoiser, quantized on its first
attach and swapped in and out afterwards (quantization is not undone by ``restore``). Peers come
from :func:`~diffaccel.evaluation.peers.peer_attachment`. :func:`module_bytes` counts a module's
weight storage, quantized tensor subclasses (optimum-quanto, torchao) included.

Example:
    >>> from diffaccel.testing import tiny_pipeline
    >>> from diffaccel.evaluation.variants import parse_variant
    >>> pipe = tiny_pipeline("sd")
    >>> attachment = build_attachment(pipe, parse_variant("q=int8:min_weight_numel=0"))
    >>> float_bytes = module_bytes(pipe.unet)
    >>> attachment.attach(); module_bytes(pipe.unet) < float_bytes
    True
    >>> attachment.detach(); module_bytes(pipe.unet) == float_bytes
    True
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch

from ..quantization.config import QuantizationConfig
from ..seams import denoiser, denoiser_name
from .variants import Variant

__all__ = ["Attachment", "FeatureAttachment", "build_attachment", "module_bytes"]


class Attachment(Protocol):
    """What the evaluation needs of a variant bound to a pipeline."""

    def attach(self) -> None:
        """From now on the pipeline runs with the variant."""

    def detach(self) -> None:
        """The pipeline is untouched again."""

    def describe(self) -> dict[str, Any]:
        """The settings the variant runs with (JSON-ready)."""


class FeatureAttachment:
    """A variant of diffaccel features (``variant.configs``; none: the untouched pipeline).

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> from diffaccel.evaluation.variants import parse_variant
        >>> pipe = tiny_pipeline("sd")
        >>> reuse = FeatureAttachment(pipe, parse_variant("r=encoder-reuse:uniform:2"))
        >>> reuse.attach(); type(pipe).__name__
        'AcceleratedStableDiffusionPipeline'
        >>> reuse.detach(); type(pipe).__name__
        'StableDiffusionPipeline'
        >>> reuse.describe()["features"]["encoder_reuse"]["schedule"]
        'uniform:2'
    """

    def __init__(self, pipe: Any, variant: Variant) -> None:
        self.pipe, self.variant = pipe, variant
        self.configs = list(variant.configs)
        #: Extra call arguments while attached (a steering variant's stochastic sampler: DDIM's ``eta=1``).
        self.call_kwargs: dict[str, Any] = {}
        self._scheduler: Any = None
        self._name = denoiser_name(pipe)
        self._original: torch.nn.Module | None = None
        self._copy: torch.nn.Module | None = None
        if any(isinstance(config, QuantizationConfig) for config in self.configs):
            self._copy = copy.deepcopy(denoiser(pipe))

    def attach(self) -> None:
        import diffaccel

        if self._copy is not None:
            self._original = getattr(self.pipe, self._name)
            setattr(self.pipe, self._name, self._copy)
        if self.configs:
            diffaccel.accelerate(self.pipe, *self.configs)
        if self.variant.steering is not None:  # resampling and branching need a stochastic sampler
            from ..steering.stochastic import stochastic_call

            self._scheduler = self.pipe.scheduler
            self.call_kwargs = stochastic_call(self.pipe)

    def detach(self) -> None:
        import diffaccel

        if self._scheduler is not None:
            self.pipe.scheduler, self._scheduler, self.call_kwargs = self._scheduler, None, {}
        if self.configs:
            diffaccel.restore(self.pipe)
        if self._original is not None:
            setattr(self.pipe, self._name, self._original)
            self._original = None

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"features": {config.name: config.to_dict() for config in self.configs}}
        if self.variant.steering is not None:
            steering = self.variant.steering
            described["steering"] = {"method": "fk" if type(steering).__name__ == "FKSteeringConfig" else "search",
                                     **steering.to_dict()}
        return described


def build_attachment(pipe: Any, variant: Variant) -> Attachment:
    """The attachment of ``variant`` on ``pipe``: diffaccel features, or a peer. Building does the
    one-time work (a copy of the denoiser to quantize, a peer's preparation) and refuses a peer
    that does not apply to the pipeline with :class:`~diffaccel.evaluation.variants.VariantSpecError`.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> from diffaccel.evaluation.variants import parse_variant
        >>> type(build_attachment(tiny_pipeline("sd"), parse_variant("untouched=none"))).__name__
        'FeatureAttachment'
    """
    if variant.peer is not None:
        from .peers import peer_attachment

        return peer_attachment(pipe, variant)
    return FeatureAttachment(pipe, variant)


def _tensor_bytes(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(storage pointer, bytes) of the plain tensors behind ``tensor`` (tensor subclasses flattened
    with ``__tensor_flatten__``, as torch's wrapper subclasses such as quanto's and torchao's define it)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return [part for name in names for part in _tensor_bytes(getattr(tensor, name))]
    return [(tensor.untyped_storage().data_ptr(), tensor.numel() * tensor.element_size())]


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored (shared storage counted once).

    Example:
        >>> module_bytes(torch.nn.Linear(4, 2))   # (8 weights + 2 biases) x 4 bytes
        40
    """
    seen: dict[tuple[int, int], int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        for pointer, nbytes in _tensor_bytes(tensor.detach() if not isinstance(tensor, torch.nn.Parameter) else tensor):
            seen[(pointer, nbytes)] = nbytes
    return sum(seen.values())
