"""Quantization that fails safe: what :func:`~diffaccel.quantization.quantize_` checks around the swap.

* :func:`check_weights`: before any layer is swapped, every layer to quantize must hold loaded,
  finite float32/float16/bfloat16 weights; the first that does not is named in the error and the
  model is left untouched.
* :func:`zeroed_fraction` / :func:`quantize_layer`: a few outliers make the per-tensor NVFP4
  scale so large that the other blocks' E4M3 scales fall below E4M3's smallest value, and whole
  blocks round to zero (the layer's relative error stays tiny, the outliers dominate its norm, so
  the fraction of nonzero weights that become zero is what tells). A layer that would lose more
  than :data:`MAX_ZEROED_FRACTION` of its nonzero weights is kept in a higher precision as
  ``QuantizationConfig.fallback`` says.
* :func:`coverage_warning`: a config that quantizes no layer, or (``min_weight_numel`` leaving
  layers out) under half of the model's Linear weights, says so.

Example:
    >>> import torch
    >>> weight = torch.full((32, 64), 1e-2)
    >>> weight.view(-1)[[5, 700, 1500]] = 1e4
    >>> linear = torch.nn.Linear(64, 32)
    >>> linear.weight.data = weight
    >>> layer, fallback = quantize_layer("fc", linear, "nvfp4", QuantizationConfig())
    >>> layer.precision, fallback.describe()
    ('int8', "'fc' (nvfp4 would zero 99.9% of its nonzero weights; kept in int8)")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import QuantizationConfig
from .conv import QuantizedConv2d
from .linear import QuantizedLinear

#: A layer whose quantized weights are zero for more than this fraction of its nonzero weights falls back.
MAX_ZEROED_FRACTION = 0.5

_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weights(model: nn.Module, names: list[str]) -> None:
    """Raise ``ValueError`` naming the first layer of ``names`` whose weight cannot be quantized.

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> layer.weight.data[0, 0] = float("nan")
        >>> check_weights(torch.nn.Sequential(layer), ["0"])
        Traceback (most recent call last):
        ...
        ValueError: cannot quantize layer '0': its weight holds 1 NaN or inf value(s); nothing was quantized
    """
    for name in names:
        weight = model.get_submodule(name).weight
        if weight.is_meta:
            problem = "its weight is on the meta device (it was never loaded)"
        elif weight.dtype not in _WEIGHT_DTYPES:
            problem = f"its weight is {weight.dtype}, quantization takes {', '.join(map(str, _WEIGHT_DTYPES))}"
        else:
            bad = int((~torch.isfinite(weight.detach())).sum())
            if not bad:
                continue
            problem = f"its weight holds {bad} NaN or inf value(s)"
        raise ValueError(f"cannot quantize layer {name!r}: {problem}; nothing was quantized")


def zeroed_fraction(weight: torch.Tensor, dequantized: torch.Tensor) -> float:
    """The fraction of ``weight``'s nonzero values that are zero in ``dequantized`` (0 for an all-zero weight).

    Example:
        >>> zeroed_fraction(torch.tensor([1.0, 2.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 0.0, 3.0]))
        0.3333333333333333
    """
    nonzero = weight != 0
    count = int(nonzero.sum())
    return int((nonzero & (dequantized == 0)).sum()) / count if count else 0.0


def _build(linear: nn.Linear | nn.Conv2d, precision: str, config: QuantizationConfig) -> QuantizedLinear | QuantizedConv2d:
    group_size = config.group_size if precision == "w8a16" else None
    if isinstance(linear, nn.Conv2d):
        return QuantizedConv2d.from_conv(linear, precision, impl=config.impl, group_size=group_size)
    layer = QuantizedLinear.from_linear(
        linear,
        "nvfp4" if precision == "nvfp4+residual" else precision,
        residual=precision == "nvfp4+residual",
        impl=config.impl,
        fp4_activations=config.fp4_activations and precision in ("nvfp4", "nvfp4+residual"),
        group_size=group_size,
    )
    layer.refine = layer.has_residual and config.refine  # a stored residual is used unless config.refine is False
    return layer


def _zeroed(linear: nn.Linear | nn.Conv2d, layer: QuantizedLinear | QuantizedConv2d) -> float:
    """The fraction of ``linear``'s nonzero weights ``layer`` zeroes (its base weight: a residual not applied)."""
    if isinstance(layer, QuantizedConv2d):
        return zeroed_fraction(linear.weight.detach(), layer.dequantized_weight(torch.float32))
    refine, layer.refine = layer.refine, False
    try:
        return zeroed_fraction(linear.weight.detach(), layer.dequantized_weight(torch.float32))
    finally:
        layer.refine = refine


@dataclass(frozen=True)
class Fallback:
    """A layer whose ``planned`` precision would zero the fraction ``zeroed`` of its nonzero weights;
    ``precision`` is what it got instead (``planned`` under ``fallback="none"``)."""

    name: str
    planned: str
    precision: str
    zeroed: float

    def describe(self) -> str:
        """``'name' (nvfp4 would zero 99.9% of its nonzero weights; kept in int8)``."""
        if self.precision == self.planned:
            kept = f"quantized to {self.precision} anyway"
        else:
            kept = "kept unquantized" if self.precision == "bf16" else f"kept in {self.precision}"
        return f"{self.name!r} ({self.planned} would zero {self.zeroed:.1%} of its nonzero weights; {kept})"


def quantize_layer(name: str, linear: nn.Linear | nn.Conv2d, planned: str,
                   config: QuantizationConfig) -> tuple[nn.Module, Fallback | None]:
    """The module that replaces ``linear`` (a Linear or a Conv2d; ``planned``: ``"nvfp4"``,
    ``"nvfp4+residual"``, ``"int8"`` or ``"w8a16"``, a convolution's as
    :func:`~diffaccel.quantization.quantization_plan` maps them).

    A :class:`QuantizedLinear` in ``planned``, unless ``planned`` would zero more than
    :data:`MAX_ZEROED_FRACTION` of the nonzero weights (nested layers are judged by their base
    NVFP4 weight): then what ``config.fallback`` says (``linear`` itself when unquantized), and the
    :class:`Fallback` that records it.

    Example:
        >>> layer, fallback = quantize_layer("fc", torch.nn.Linear(64, 32), "nvfp4", QuantizationConfig())
        >>> layer.precision, fallback
        ('nvfp4', None)
    """
    layer = _build(linear, planned, config)
    zeroed = _zeroed(linear, layer)
    if zeroed <= MAX_ZEROED_FRACTION or config.fallback == "none":
        return layer, None if zeroed <= MAX_ZEROED_FRACTION else Fallback(name, planned, planned, zeroed)
    eight_bit = planned if planned in ("int8", "w8a16") else "w8a16" if isinstance(linear, nn.Conv2d) else "int8"
    if config.fallback == "bf16" or (planned == eight_bit and config.fallback == "auto"):
        return linear, Fallback(name, planned, "bf16", zeroed)
    int8 = layer if planned == eight_bit else _build(linear, eight_bit, config)
    if config.fallback == "auto" and _zeroed(linear, int8) > MAX_ZEROED_FRACTION:
        return linear, Fallback(name, planned, "bf16", zeroed)
    return int8, Fallback(name, planned, eight_bit, zeroed)


def fallback_warning(fallbacks: list[Fallback], config: QuantizationConfig) -> str:
    """The warning for layers whose weights their precision would mostly round to zero."""
    return (
        f"quantize_: {len(fallbacks)} layer(s) would lose most of their weights to zero (a few outliers push the "
        f"other blocks' scales below the smallest one): {'; '.join(f.describe() for f in fallbacks)} "
        f"(QuantizationConfig.fallback={config.fallback!r})"
    )


def coverage_warning(model: nn.Module, plan: dict[str, str], config: QuantizationConfig) -> str | None:
    """A warning when ``config`` quantizes no layer, or under half of the model's Linear weights
    with ``min_weight_numel`` leaving some out (None otherwise, and for an all-bf16 config).

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> from diffaccel.quantization import quantization_plan
        >>> model = tiny_pipeline("wan").transformer
        >>> warning = coverage_warning(model, quantization_plan(model, QuantizationConfig()), QuantizationConfig())
        >>> print(warning.split(":")[0])
        quantize_ quantizes 0 of 26 in-scope Linear layers of WanTransformer3DModel (0.0% of its Linear weights)
    """
    if not config.quantizes_anything or not plan:
        return None
    types = (nn.Linear, nn.Conv2d) if config.scope == "all" else (nn.Linear,)
    numel = {name: module.weight.numel() for name, module in model.named_modules() if isinstance(module, types)}
    quantized = [name for name, precision in plan.items() if precision != "bf16"]
    fraction = sum(numel[name] for name in quantized) / max(sum(numel.values()), 1)
    reasons = [config.skip_reason(name, numel[name]) for name, precision in plan.items() if precision == "bf16"]
    small, excluded = reasons.count("min_weight_numel"), reasons.count("exclude")
    if quantized and (fraction >= 0.5 or not small):  # exclusions alone are the config's explicit choice
        return None
    kind = "Linear and Conv2d" if config.scope == "all" else "Linear"
    return (
        f"quantize_ quantizes {len(quantized)} of {len(plan)} in-scope {kind} layers of {type(model).__name__} "
        f"({fraction:.1%} of its {kind} weights): {small} have fewer than min_weight_numel={config.min_weight_numel} "
        f"weights, {excluded} match QuantizationConfig.exclude; lower min_weight_numel (0 quantizes every size) or "
        "narrow exclude to quantize more"
    )
