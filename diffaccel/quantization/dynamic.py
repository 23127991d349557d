"""The dynamic-precision feature: the nested NVFP4 residual switched on per block and timestep
band while the pipeline runs (:class:`DynamicPrecisionConfig`, made by
:func:`~diffaccel.quantization.allocation.allocate_dynamic` from a calibration).

A step's band is ``step * num_bands // num_steps``. With ``online_threshold`` the feature measures
each block's relative input-output difference at a step and decides the next step from it.

Example:
    >>> config = DynamicPrecisionConfig({"transformer_blocks.0": (True, False)})
    >>> config.num_bands, config.quantization_config().precision
    (2, 'nvfp4')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import torch
from diffusers.hooks import ModelHook

from ..errors import UnsupportedCombinationError
from ..features.base import AttachedFeature, FeatureConfig, json_field
from ..seams import add_hook, loop_length, remove_hook
from .calibration import (
    PrecisionPredictor,
    StepCounter,
    block_hidden_states,
    denoiser_of,
    relative_difference,
    transformer_blocks,
)
from .config import QuantizationConfig
from .linear import QuantizedLinear

_DYNAMIC_HOOK = "diffaccel.dynamic_precision"
_PROBE_HOOK = "diffaccel.dynamic_precision.probe"


@dataclass(frozen=True)
class DynamicPrecisionConfig(FeatureConfig, attach_order=20):
    """Switch the nested residual of NVFP4 layers on per block and timestep band.

    Args:
        schedule: ``(block name, (refine in band 0, refine in band 1, ...))`` pairs (a mapping is
            accepted); every block's tuple has the same length, the number of bands. Blocks not
            listed are never refined.
        predictor: the predictor the schedule was derived from (saved with the pipeline's
            ``diffaccel_config.json``), or ``None``.
        online_threshold: decide at inference instead: from step 1 on, each listed block is
            refined when ``predictor.predict(d) > online_threshold``, ``d`` being the block's
            relative input-output difference measured at the previous step (the schedule's band
            decides step 0). Needs ``predictor``. ``None`` (default): the schedule decides.

    The pipeline's denoiser must be quantized to NVFP4 with the residual stored for the listed
    blocks (:meth:`quantization_config` gives such a config); attaching checks it.

    Example:
        >>> DynamicPrecisionConfig({"transformer_blocks.0": (True, False)}).num_bands
        2
    """

    name = "dynamic_precision"

    schedule: Any = json_field((), to_json=lambda schedule: {block: list(bands) for block, bands in schedule})
    predictor: PrecisionPredictor | None = json_field(None, from_json=PrecisionPredictor.from_dict)
    online_threshold: float | None = None

    def __post_init__(self) -> None:
        items = self.schedule.items() if isinstance(self.schedule, Mapping) else self.schedule
        try:
            schedule = tuple((str(block), tuple(bool(b) for b in bands)) for block, bands in items)
        except (TypeError, ValueError) as error:
            raise ValueError(f"DynamicPrecisionConfig.schedule must be (block, bands) pairs: {error}") from None
        lengths = {len(bands) for _, bands in schedule}
        if len(lengths) > 1 or 0 in lengths:
            raise ValueError(f"DynamicPrecisionConfig.schedule needs one non-empty band tuple length, got {lengths}")
        if len({block for block, _ in schedule}) != len(schedule):
            raise ValueError("DynamicPrecisionConfig.schedule names a block twice")
        object.__setattr__(self, "schedule", schedule)
        if self.predictor is not None and not isinstance(self.predictor, PrecisionPredictor):
            raise ValueError(f"DynamicPrecisionConfig.predictor must be a PrecisionPredictor or None, got {self.predictor!r}")
        if self.online_threshold is not None:
            threshold = self.online_threshold
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
                raise ValueError(f"DynamicPrecisionConfig.online_threshold must be a number or None, got {threshold!r}")
            if self.predictor is None:
                raise ValueError("DynamicPrecisionConfig.online_threshold needs a predictor")
            object.__setattr__(self, "online_threshold", float(threshold))

    @property
    def num_bands(self) -> int:
        """Timestep bands of the schedule (1 when it is empty)."""
        return len(self.schedule[0][1]) if self.schedule else 1

    @property
    def refined_blocks(self) -> tuple[str, ...]:
        """Blocks that may be refined (in some band, or any listed block when online): the ones
        that need the residual stored."""
        return tuple(block for block, bands in self.schedule if any(bands) or self.online_threshold is not None)

    def quantization_config(self, base: QuantizationConfig | None = None) -> QuantizationConfig:
        """``base`` (default: all NVFP4) storing the nested residual for the refined blocks only,
        unapplied (``refine=False``) until this schedule switches it on.

        Example:
            >>> config = DynamicPrecisionConfig({"blocks.0": (True, False)}).quantization_config()
            >>> config.overrides, config.refine
            ((('blocks.0.*', 'nvfp4+residual'),), False)
        """
        base = base or QuantizationConfig(precision="nvfp4")
        nested = {f"{block}.*": "nvfp4+residual" for block in self.refined_blocks}
        return replace(base, overrides={**nested, **dict(base.overrides)}, refine=False)

    def attach(self, pipe: Any) -> "DynamicPrecision":
        return DynamicPrecision(self, pipe)


@dataclass
class DynamicPrecisionStats:
    """What the dynamic allocation did in one call: per step, the fraction of quantized weights
    refined and their mean bits per weight in use (refined NVFP4 layers count 9 bits)."""

    num_steps: int = 0
    refined_fraction: list[float] = field(default_factory=list)
    bits_per_weight: list[float] = field(default_factory=list)

    @property
    def mean_bits_per_weight(self) -> float:
        """Bits per quantized weight in use, averaged over the steps."""
        return float(np.mean(self.bits_per_weight)) if self.bits_per_weight else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return {"num_steps": self.num_steps, "refined_fraction": list(self.refined_fraction),
                "bits_per_weight": list(self.bits_per_weight), "mean_bits_per_weight": self.mean_bits_per_weight}


class _BandSwitch(StepCounter):
    """Denoiser hook: at each new step, set ``refine`` on every block's layers for the step's band."""

    def __init__(self, feature: "DynamicPrecision") -> None:
        super().__init__()
        self.feature = feature

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        before = self.step
        args, kwargs = super().pre_forward(module, *args, **kwargs)
        if self.step != before:
            self.feature.enter_step(self.step)
        return args, kwargs


class _DifferenceProbe(ModelHook):
    """Block hook: records the block's relative input-output difference at every call."""

    def __init__(self, name: str, feature: "DynamicPrecision") -> None:
        super().__init__()
        self.name, self.feature = name, feature

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden_in, hidden_out = block_hidden_states(module, args, kwargs, output)
        self.feature.current.setdefault(self.name, []).append(relative_difference(hidden_out, hidden_in))
        return output


class DynamicPrecision(AttachedFeature):
    """:class:`DynamicPrecisionConfig` attached to a pipeline whose denoiser is quantized."""

    def __init__(self, config: DynamicPrecisionConfig, pipe: Any) -> None:
        self.config, self.pipe = config, pipe
        self.model = denoiser_of(pipe)
        blocks = dict(transformer_blocks(self.model))
        unknown = [block for block, _ in config.schedule if block not in blocks]
        if unknown:
            raise UnsupportedCombinationError(
                f"DynamicPrecisionConfig names blocks {unknown} that {type(self.model).__name__} does not have; "
                f"its blocks: {sorted(blocks)}")
        self.all_layers = [m for m in self.model.modules() if isinstance(m, QuantizedLinear)]
        if not self.all_layers:
            raise UnsupportedCombinationError(
                f"dynamic precision needs a quantized denoiser, and {type(self.model).__name__} has no quantized "
                "layers: quantize it first with diffaccel.quantize_(model, config.quantization_config(base)) "
                "(check that its layers are not all excluded or under the base config's min_weight_numel)")
        self.layers: dict[str, list[QuantizedLinear]] = {}
        for block, bands in config.schedule:
            layers = [m for m in blocks[block].modules() if isinstance(m, QuantizedLinear)]
            if any(bands) and not any(layer.has_residual for layer in layers):
                raise UnsupportedCombinationError(
                    f"block {block} is refined but none of its layers stores the nested residual; quantize with "
                    "DynamicPrecisionConfig.quantization_config() (precision 'nvfp4+residual' for that block)")
            self.layers[block] = [layer for layer in layers if layer.has_residual]
        self.at_rest = [(layer, layer.refine) for layers in self.layers.values() for layer in layers]
        self.switch = _BandSwitch(self)
        add_hook(self.model, self.switch, _DYNAMIC_HOOK)
        self.probed = [blocks[block] for block, _ in config.schedule] if config.online_threshold is not None else []
        for (block, _), module in zip(config.schedule, self.probed):
            add_hook(module, _DifferenceProbe(block, self), _PROBE_HOOK)
        self.current: dict[str, list[float]] = {}
        self.num_steps: int | None = None
        self.stats = DynamicPrecisionStats()

    def begin_call(self, pipe: Any, call_kwargs: Mapping[str, Any]) -> None:
        self.switch.reset()
        self.num_steps, self.current = None, {}
        self.stats = DynamicPrecisionStats()

    def enter_step(self, step: int) -> None:
        """Set every scheduled block's ``refine`` flags for ``step``'s band and record the bits in use."""
        if self.num_steps is None:
            self.num_steps = max(loop_length(self.pipe), 1)
        band = min(step * self.config.num_bands // self.num_steps, self.config.num_bands - 1)
        previous, self.current = self.current, {}
        for block, bands in self.config.schedule:
            refine = bands[band]
            if self.config.online_threshold is not None and previous.get(block):
                predicted = self.config.predictor.predict(float(np.mean(previous[block])))
                refine = predicted > self.config.online_threshold
            for layer in self.layers[block]:
                layer.refine = refine
        total = sum(layer.in_features * layer.out_features for layer in self.all_layers)
        refined = sum(layer.in_features * layer.out_features for layer in self.all_layers if layer.refine)
        bits = sum(_bits_in_use(layer) * layer.in_features * layer.out_features for layer in self.all_layers)
        self.stats.num_steps = step + 1
        self.stats.refined_fraction.append(refined / total)
        self.stats.bits_per_weight.append(bits / total)

    def _restore(self) -> None:
        """Put the scheduled layers' ``refine`` back as it was when the feature was attached."""
        for layer, refine in self.at_rest:
            layer.refine = refine

    def end_call(self) -> DynamicPrecisionStats:
        self._restore()
        return self.stats

    def detach(self, pipe: Any) -> None:
        self._restore()
        remove_hook(self.model, _DYNAMIC_HOOK)
        for module in self.probed:
            remove_hook(module, _PROBE_HOOK)


def _bits_in_use(layer: QuantizedLinear) -> float:
    """Bits per weight the layer reads in its forward (the residual only when refined)."""
    if layer.has_residual and not layer.refine:
        return layer.bits_per_weight / 2
    return layer.bits_per_weight
