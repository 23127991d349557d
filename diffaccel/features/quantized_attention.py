"""Route every attention call of a diffusers model through :func:`diffaccel.quantized_sdpa`.

``use_quantized_attention(model)`` swaps each attention processor for a subclass of its own
class (so ``isinstance`` checks, attributes and the call signature diffusers inspects are
unchanged) whose ``__call__`` runs the original processor under a ``TorchFunctionMode`` that
sends ``torch.nn.functional.scaled_dot_product_attention`` to the quantized kernel. That covers
both kinds of processors:

* UNet, PixArt, SD3 and CogVideoX processors call SDPA themselves;
* Flux, Wan and LTX processors call diffusers' ``dispatch_attention_fn``; the wrapped processor
  pins their ``_attention_backend`` to ``"native"``, whose backend calls SDPA.

Calls the quantized kernel cannot take (``is_causal=True``, ``dropout_p > 0``, head dims over
256) run the original SDPA and are counted as fallbacks. Context-parallel attention (which
bypasses SDPA) is refused. ``remove_quantized_attention(model)`` puts the original processor
objects back. Not tried yet: ``torch.compile`` of a model with quantized attention on.

Example:
    >>> import diffaccel, torch
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd")
    >>> handle = diffaccel.use_quantized_attention(pipe.unet)
    >>> _ = pipe("a red circle", num_inference_steps=2, output_type="np")
    >>> handle.calls > 0, handle.fallback_calls
    (True, 0)
    >>> diffaccel.remove_quantized_attention(pipe.unet) is pipe.unet
    True
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedCombinationError, UnsupportedPipelineError
from ..kernels.quantized_attention import MAX_HEAD_DIM, quantized_sdpa
from ..seams import denoiser
from .base import AttachedFeature, FeatureConfig
from .checks import check_choice

_HANDLE_ATTR = "_diffaccel_quantized_attention"
_SDPA_PARAMS = tuple(inspect.signature(quantized_sdpa).parameters)[:8]


@dataclass
class QuantizedAttention:
    """What :func:`use_quantized_attention` installed: counts of quantized and fallback calls."""

    impl: str = "auto"
    calls: int = 0
    fallback_calls: int = 0

    def reset(self) -> None:
        """Zero the counters."""
        self.calls = 0
        self.fallback_calls = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON reports."""
        return asdict(self)

    def attend(self, sdpa: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One SDPA call: quantized when supported, else the original ``sdpa``."""
        bound = dict(zip(_SDPA_PARAMS, args), **kwargs)
        query, value = bound["query"], bound["value"]
        if (
            bound.get("is_causal", False)
            or bound.get("dropout_p", 0.0) != 0.0
            or max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM
            or query.dim() != 4
        ):
            self.fallback_calls += 1
            return sdpa(*args, **kwargs)
        self.calls += 1
        return quantized_sdpa(**bound, impl=self.impl)


class _SDPAMode(TorchFunctionMode):
    def __init__(self, handle: QuantizedAttention) -> None:
        super().__init__()
        self.handle = handle

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func is F.scaled_dot_product_attention:
            return self.handle.attend(func, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@functools.cache
def _quantized_class(cls: type) -> type:
    """The subclass of a processor class whose calls run under the quantized-SDPA mode."""

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _SDPAMode(self._diffaccel_handle):
            return cls.__call__(self, *args, **kwargs)

    __call__.__signature__ = inspect.signature(cls.__call__)  # diffusers filters kwargs by it
    return type(f"Quantized{cls.__name__}", (cls,), {"__call__": __call__, "__doc__": cls.__doc__})


def _wrap(processor: Any, handle: QuantizedAttention) -> Any:
    wrapped = object.__new__(_quantized_class(type(processor)))
    wrapped.__dict__.update(processor.__dict__)
    wrapped._diffaccel_handle = handle
    if hasattr(type(processor), "_attention_backend"):  # processors that use dispatch_attention_fn
        wrapped._attention_backend = "native"
    return wrapped


def _check_model(model: torch.nn.Module) -> None:
    """Raise unless quantized attention can be put on ``model`` now."""
    if not (hasattr(model, "attn_processors") and hasattr(model, "set_attn_processor")):
        raise UnsupportedPipelineError(
            f"{type(model).__name__} has no attention processors: pass a diffusers model such as "
            "pipe.unet or pipe.transformer (UNet2DConditionModel, PixArt, SD3, Flux, CogVideoX, Wan, LTX)"
        )
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise ValueError(
            f"quantized attention is already on for this {type(model).__name__}; remove it first"
        )
    if any(getattr(p, "_parallel_config", None) is not None for p in model.attn_processors.values()):
        raise UnsupportedCombinationError(
            "quantized attention does not support context-parallel attention (its processors "
            "bypass scaled_dot_product_attention); disable context parallelism first"
        )


def use_quantized_attention(model: torch.nn.Module, *, impl: str = "auto") -> QuantizedAttention:
    """Send every attention call of a diffusers model (UNet or transformer) through quantized SDPA.

    ``impl`` is passed to :func:`~diffaccel.kernels.quantized_attention.quantized_sdpa`
    (``"auto"``: Triton on CUDA, the plain-torch reference elsewhere). Returns the handle that
    counts the calls; undo with :func:`remove_quantized_attention`.
    """
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    _check_model(model)
    originals = dict(model.attn_processors)
    handle = QuantizedAttention(impl=impl)
    model.set_attn_processor({name: _wrap(p, handle) for name, p in originals.items()})
    setattr(model, _HANDLE_ATTR, (handle, originals))
    return handle


def remove_quantized_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`use_quantized_attention`: restore the original processor objects; returns ``model``."""
    installed = getattr(model, _HANDLE_ATTR, None)
    if installed is None:
        raise ValueError(f"quantized attention is not on for this {type(model).__name__}")
    model.set_attn_processor(installed[1])
    delattr(model, _HANDLE_ATTR)
    return model


@dataclass(frozen=True)
class QuantizedAttentionConfig(FeatureConfig, attach_order=50):
    """Quantized attention as a :func:`diffaccel.accelerate` feature, on the pipeline's denoiser.

    ``impl`` is ``"auto"`` (Triton on CUDA, the reference elsewhere), ``"triton"`` or
    ``"reference"``. Each call reports a :class:`QuantizedAttention` (calls, fallback calls) in
    ``pipe.acceleration_stats.features["quantized_attention"]``. Only the denoiser (``transformer``
    or ``unet``) is routed, and only during the pipeline's own calls (another pipeline that shares
    the denoiser keeps its attention); text encoders and ControlNets keep their attention.

    Example:
        >>> import diffaccel
        >>> from diffaccel.testing import tiny_pipeline
        >>> pipe = diffaccel.accelerate(tiny_pipeline("flux"), QuantizedAttentionConfig())
        >>> _ = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="latent")
        >>> pipe.acceleration_stats.features["quantized_attention"].calls
        4
        >>> pipe = diffaccel.restore(pipe)
    """

    name = "quantized_attention"

    impl: str = "auto"

    def __post_init__(self) -> None:
        check_choice("QuantizedAttentionConfig", "impl", self.impl, ("auto", "triton", "reference"))

    def attach(self, pipe: Any) -> _QuantizedAttentionFeature:
        model = denoiser(pipe)
        _check_model(model)
        return _QuantizedAttentionFeature(self, model)


class _QuantizedAttentionFeature(AttachedFeature):
    """Puts quantized attention on the denoiser at the start of each pipeline call and removes it
    at the end, so other pipelines sharing the denoiser (``from_pipe``) keep their own attention."""

    def __init__(self, config: QuantizedAttentionConfig, model: torch.nn.Module) -> None:
        self.config = config
        self.model = model
        self.handle: QuantizedAttention | None = None

    def begin_call(self, pipe: Any, call_kwargs: Mapping[str, Any]) -> None:
        self.handle = use_quantized_attention(self.model, impl=self.config.impl)

    def end_call(self) -> QuantizedAttention:
        stats = replace(self.handle)
        self._remove()
        return stats

    def detach(self, pipe: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        if self.handle is not None:
            remove_quantized_attention(self.model)
            self.handle = None
