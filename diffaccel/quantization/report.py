"""``memory_report(model)``: bits per weight and weight bytes per Linear (and Conv2d) layer, and in total.

Every parameter of the model is counted. Layers are listed per Linear, and per Conv2d too for a
model quantized with ``QuantizationConfig(scope="all")`` (or planned with such a config). Quantized layers count their stored weight tensors
(codes, residual, scales; see :attr:`QuantizedLinear.weight_nbytes`); every other parameter
(unquantized Linear layers, biases, norms, convolutions, embeddings) counts at bf16, 16 bits, the
dtype a quantized model is deployed in, whatever dtype it has now. The baseline is the same model
with every parameter in bf16, so ``ratio`` is the saving quantization gives over bf16.

Example:
    >>> from diffaccel.testing import tiny_pipeline
    >>> from diffaccel.quantization import QuantizationConfig, quantize_
    >>> model = quantize_(tiny_pipeline("flux").transformer, QuantizationConfig(min_weight_numel=0))
    >>> report = memory_report(model)
    >>> report.layers[0].precision, report.ratio < 0.7
    ('bf16', True)
    >>> print(report)   # doctest: +ELLIPSIS
    layer                                       precision      bits/weight   weight bytes
    ...
    total: ... bytes (bf16: ... bytes), ratio 0.6..., ... bits per weight
    quantized: 17 of 28 Linear layers, 52.2% of the Linear weights
    >>> report.quantized_layers, round(report.quantized_fraction, 3)
    (17, 0.522)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .config import QuantizationConfig
from .conv import QuantizedConv2d
from .formats import planned_nbytes
from .linear import QuantizedLinear
from .plan import PLAN_ATTR
from .quantize import quantization_plan

_BF16_BYTES = 2


@dataclass(frozen=True)
class LayerMemory:
    """One Linear or Conv2d layer: ``precision`` is ``"nvfp4"``, ``"nvfp4+residual"``, ``"int8"``, ``"w8a16"`` or ``"bf16"``."""

    name: str
    precision: str
    numel: int
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        """``nbytes * 8 / numel``."""
        return self.nbytes * 8 / self.numel


@dataclass(frozen=True)
class MemoryReport:
    """Per-layer and total weight storage of a model, against the same model in bf16.

    ``nbytes`` counts every parameter (quantized layers as stored, the rest at bf16);
    ``bf16_nbytes`` counts every parameter at bf16; ``ratio = nbytes / bf16_nbytes``.
    """

    layers: tuple[LayerMemory, ...]
    nbytes: int
    bf16_nbytes: int
    numel: int
    counts: dict[str, int] = field(default_factory=dict)
    kind: str = "Linear"

    @property
    def ratio(self) -> float:
        """Size relative to bf16 (``0.3``: 30% of the bf16 bytes)."""
        return self.nbytes / self.bf16_nbytes

    @property
    def bits_per_weight(self) -> float:
        """Average bits per parameter over the whole model."""
        return self.nbytes * 8 / self.numel

    @property
    def quantized_layers(self) -> int:
        """How many listed layers are quantized (0: the config matched none)."""
        return sum(layer.precision != "bf16" for layer in self.layers)

    @property
    def quantized_fraction(self) -> float:
        """The quantized layers' share of the listed layers' weights (0.0 to 1.0; 0.0 without any)."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.numel for layer in self.layers if layer.precision != "bf16") / total if total else 0.0

    def summary(self) -> str:
        """The storage against bf16 on one line.

        Example:
            >>> MemoryReport((), nbytes=1_500_000, bf16_nbytes=6_000_000, numel=3_000_000).summary()
            '1.50 MB vs 6.00 MB in bf16 (4.00 bits per weight)'
        """
        return (f"{self.nbytes / 1e6:.2f} MB vs {self.bf16_nbytes / 1e6:.2f} MB in bf16 "
                f"({self.bits_per_weight:.2f} bits per weight)")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON reports."""
        return {
            "nbytes": self.nbytes,
            "bf16_nbytes": self.bf16_nbytes,
            "ratio": self.ratio,
            "bits_per_weight": self.bits_per_weight,
            "numel": self.numel,
            "counts": dict(self.counts),
            "kind": self.kind,
            "quantized_layers": self.quantized_layers,
            "quantized_fraction": self.quantized_fraction,
            "layers": [dict(asdict(layer), bits_per_weight=layer.bits_per_weight) for layer in self.layers],
        }

    def __str__(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'precision':<14} {'bits/weight':>11}  {'weight bytes':>13}"]
        lines += [
            f"{layer.name:<{width}}  {layer.precision:<14} {layer.bits_per_weight:>11.3f}  {layer.nbytes:>13,}"
            for layer in self.layers
        ]
        lines.append(
            f"total: {self.nbytes:,} bytes (bf16: {self.bf16_nbytes:,} bytes), ratio {self.ratio:.3f}, "
            f"{self.bits_per_weight:.2f} bits per weight"
        )
        lines.append(
            f"quantized: {self.quantized_layers} of {len(self.layers)} {self.kind} layers, "
            f"{self.quantized_fraction:.1%} of the {self.kind} weights"
        )
        return "\n".join(lines)


def _precision(module: QuantizedLinear | QuantizedConv2d) -> str:
    return "nvfp4+residual" if module.has_residual else module.precision


def _listed_types(scope: str) -> tuple[type, ...]:
    return (nn.Linear, nn.Conv2d) if scope == "all" else (nn.Linear,)


def _kind(scope: str) -> str:
    return "Linear and Conv2d" if scope == "all" else "Linear"


def memory_report(model: nn.Module) -> MemoryReport:
    """Weight storage of ``model`` (any ``nn.Module``), per Linear (and Conv2d) layer and in total.

    Example:
        >>> import torch
        >>> from diffaccel.quantization import QuantizedLinear
        >>> model = torch.nn.Sequential(QuantizedLinear.from_linear(torch.nn.Linear(64, 64, bias=False), "nvfp4"))
        >>> r = memory_report(model)
        >>> r.layers[0].precision, r.layers[0].nbytes, r.bf16_nbytes
        ('nvfp4', 2308, 8192)
    """
    plan = getattr(model, PLAN_ATTR, None)
    scope = plan["config"].scope if plan else "blocks"
    if any(isinstance(m, QuantizedConv2d) for m in model.modules()):
        scope = "all"
    layers: list[LayerMemory] = []
    counts: dict[str, int] = {}
    quantized_numel = quantized_nbytes = 0
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedConv2d)):
            numel = module.weight_numel
            layer = LayerMemory(name, _precision(module), numel, module.weight_nbytes)
            quantized_numel += numel
            quantized_nbytes += module.weight_nbytes
        elif isinstance(module, _listed_types(scope)):
            layer = LayerMemory(name, "bf16", module.weight.numel(), module.weight.numel() * _BF16_BYTES)
        else:
            continue
        layers.append(layer)
        counts[layer.precision] = counts.get(layer.precision, 0) + 1
    params = sum(p.numel() for p in model.parameters())
    numel = params + quantized_numel
    return MemoryReport(
        layers=tuple(layers),
        nbytes=params * _BF16_BYTES + quantized_nbytes,
        bf16_nbytes=numel * _BF16_BYTES,
        numel=numel,
        counts=counts,
        kind=_kind(scope),
    )


def planned_memory(model: nn.Module, config: QuantizationConfig | None = None) -> MemoryReport:
    """What :func:`memory_report` would say after ``quantize_(model, config)``, without quantizing.

    Only shapes are read, so ``model`` may live on the ``meta`` device: size a 12B-parameter
    model's quantized weights before loading them.

    Example:
        >>> import torch
        >>> from diffaccel.testing import tiny_pipeline
        >>> config = QuantizationConfig(min_weight_numel=0)
        >>> model = tiny_pipeline("wan").transformer
        >>> planned = planned_memory(model, config)
        >>> from diffaccel.quantization import quantize_
        >>> planned.nbytes == memory_report(quantize_(model, config)).nbytes
        True
    """
    config = QuantizationConfig() if config is None else config
    plan = quantization_plan(model, config)
    layers: list[LayerMemory] = []
    counts: dict[str, int] = {}
    quantized_numel = quantized_nbytes = 0
    for name, module in model.named_modules():
        if not isinstance(module, _listed_types(config.scope)):
            continue
        precision = plan.get(name, "bf16")
        if precision == "nvfp4" and config.residual and isinstance(module, nn.Linear):
            precision = "nvfp4+residual"
        out_features, numel = module.weight.shape[0], module.weight.numel()
        if precision == "bf16":
            layer = LayerMemory(name, "bf16", numel, numel * _BF16_BYTES)
        else:
            group_size = config.group_size if precision == "w8a16" else None
            nbytes = planned_nbytes(precision, out_features, numel // out_features, group_size)
            layer = LayerMemory(name, precision, numel, nbytes)
            quantized_numel += numel
            quantized_nbytes += layer.nbytes
        layers.append(layer)
        counts[precision] = counts.get(precision, 0) + 1
    params = sum(p.numel() for p in model.parameters())
    return MemoryReport(
        layers=tuple(layers),
        nbytes=(params - quantized_numel) * _BF16_BYTES + quantized_nbytes,
        bf16_nbytes=params * _BF16_BYTES,
        numel=params,
        counts=counts,
        kind=_kind(config.scope),
    )
