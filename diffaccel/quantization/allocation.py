"""Per-block precision allocation from a calibration: static (fixed per layer) or dynamic (per
block and timestep band).

Both read the predictor of :mod:`diffaccel.quantization.calibration` (``error = slope *
difference + intercept``) and spend the 8-bit precision where the predicted NVFP4 error is
largest:

* :func:`allocate_static` gives whole blocks INT8 (W8A8) and the rest NVFP4, once and for all:
  its :meth:`StaticAllocation.quantization_config` goes to :func:`~diffaccel.quantization.quantize_`.
* :func:`allocate_dynamic` keeps every layer in NVFP4 and, for the (block, band) pairs that
  need it, adds the *nested* 4-bit residual correction (NVFP4 weight + NVFP4 of its error, ~8-bit
  accuracy) only at those timestep bands. Only blocks refined somewhere store the residual, so
  memory stays close to all-NVFP4. Its :class:`DynamicPrecisionConfig` is a feature for
  :func:`diffaccel.accelerate` that switches ``QuantizedLinear.refine`` per step, from the
  calibrated bands or, with ``online=True``, from each block's difference measured at the
  previous step of the running call (the predictor decides at inference).

A step's band is ``step * num_bands // num_steps``.

Example:
    >>> import numpy as np
    >>> from diffaccel.quantization.calibration import CalibrationData
    >>> data = CalibrationData(("a", "b"), ("p",), np.array([[[0.1, 0.5], [0.1, 0.2]]]),
    ...                        np.array([[[0.01, 0.05], [0.01, 0.02]]]))
    >>> allocate_static(data, int8_fraction=0.5).int8_blocks
    ('b',)
    >>> allocate_dynamic(data, num_bands=2, refine_fraction=0.25).schedule
    (('b', (True, False)),)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers.hooks import ModelHook

from ..errors import UnsupportedCombinationError
from ..features.base import AttachedFeature, FeatureConfig, json_field
from ..seams import add_hook, loop_length, remove_hook
from .calibration import (
    CalibrationData,
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


def _check_budget(fraction: float | None, threshold: float | None, name: str) -> None:
    if (fraction is None) == (threshold is None):
        raise ValueError(f"give exactly one of {name} and error_threshold")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {fraction!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0.0):
        raise ValueError(f"error_threshold must be >= 0, got {threshold!r}")


def _choose(scores: np.ndarray, fraction: float | None, threshold: float | None) -> np.ndarray:
    """Boolean mask of the highest scores: a fraction of them (rounded up) or those over a threshold."""
    if threshold is not None:
        return scores > threshold
    chosen = np.zeros(scores.shape, dtype=bool)
    count = math.ceil(fraction * scores.size - 1e-9)
    if count:
        order = np.argsort(-scores, axis=None, kind="stable")[:count]
        chosen.flat[order] = True
    return chosen


@dataclass(frozen=True)
class StaticAllocation:
    """A fixed precision per block: ``int8_blocks`` in INT8, every other block in NVFP4.

    ``predicted_error`` maps each block to its predicted NVFP4 error (mean over the calibration).
    """

    predictor: PrecisionPredictor
    predicted_error: Mapping[str, float]
    int8_blocks: tuple[str, ...]

    def overrides(self) -> dict[str, str]:
        """``QuantizationConfig.overrides`` patterns that put the INT8 blocks' layers in INT8."""
        return {f"{block}.*": "int8" for block in self.int8_blocks}

    def quantization_config(self, base: QuantizationConfig | None = None) -> QuantizationConfig:
        """``base`` (default: all NVFP4) with this allocation's INT8 overrides in front of its own."""
        base = base or QuantizationConfig(precision="nvfp4")
        return replace(base, overrides={**self.overrides(), **dict(base.overrides)})

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return {"predictor": self.predictor.to_dict(), "predicted_error": dict(self.predicted_error),
                "int8_blocks": list(self.int8_blocks)}


def allocate_static(
    data: CalibrationData,
    *,
    int8_fraction: float | None = None,
    error_threshold: float | None = None,
    predictor: PrecisionPredictor | None = None,
    by: str = "predicted",
) -> StaticAllocation:
    """Give INT8 to the blocks with the largest predicted NVFP4 error.

    Args:
        data: a calibration (:func:`~diffaccel.quantization.calibration.calibrate`).
        int8_fraction: this fraction of the blocks (rounded up) takes INT8; or
        error_threshold: blocks whose predicted error exceeds it take INT8.
        predictor: defaults to the one fitted on ``data``.
        by: ``"predicted"`` ranks blocks by the predictor applied to their mean difference (the
            paper's recipe); ``"measured"`` by the calibration's measured mean error, which a
            static allocation has at hand anyway (``predicted_error`` then holds those errors).
    """
    _check_budget(int8_fraction, error_threshold, "int8_fraction")
    if by not in ("predicted", "measured"):
        raise ValueError(f"by must be 'predicted' or 'measured', got {by!r}")
    predictor = predictor or PrecisionPredictor.fit(data)
    if by == "measured":
        predicted = np.nanmean(data.error, axis=(0, 1))
    else:
        predicted = np.asarray(predictor.predict(np.nanmean(data.difference, axis=(0, 1))), dtype=np.float64)
    chosen = _choose(predicted, int8_fraction, error_threshold)
    return StaticAllocation(
        predictor=predictor,
        predicted_error={block: float(e) for block, e in zip(data.blocks, predicted)},
        int8_blocks=tuple(block for block, c in zip(data.blocks, chosen) if c),
    )


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



def allocate_dynamic(
    data: CalibrationData,
    *,
    num_bands: int = 4,
    refine_fraction: float | None = None,
    error_threshold: float | None = None,
    predictor: PrecisionPredictor | None = None,
    online: bool = False,
) -> DynamicPrecisionConfig:
    """Refine the (block, timestep band) pairs with the largest predicted NVFP4 error.

    Args:
        data: a calibration.
        num_bands: timestep bands (at most the calibration's steps).
        refine_fraction: this fraction of all (block, band) pairs (rounded up) is refined; or
        error_threshold: pairs whose predicted error exceeds it are refined.
        predictor: defaults to the one fitted on ``data``.
        online: decide per step at inference from the measured block differences
            (``DynamicPrecisionConfig.online_threshold``): the threshold is ``error_threshold``,
            or the predicted error that ``refine_fraction`` of the calibration's (prompt, step,
            block) points exceed; the blocks that exceeded it anywhere in the calibration store
            the residual; the bands decide step 0.
    """
    if not isinstance(num_bands, int) or not 1 <= num_bands <= data.num_steps:
        raise ValueError(f"num_bands must be an int in [1, {data.num_steps}] (the calibration's steps), got {num_bands!r}")
    _check_budget(refine_fraction, error_threshold, "refine_fraction")
    predictor = predictor or PrecisionPredictor.fit(data)
    band_of_step = np.arange(data.num_steps) * num_bands // data.num_steps
    difference = np.stack([np.nanmean(data.difference[:, band_of_step == band], axis=(0, 1))
                           for band in range(num_bands)], axis=1)  # (blocks, bands)
    predicted = np.asarray(predictor.predict(difference), dtype=np.float64)
    if not online:
        chosen = _choose(predicted, refine_fraction, error_threshold)
        return DynamicPrecisionConfig(tuple((block, tuple(bool(c) for c in row))
                                            for block, row in zip(data.blocks, chosen) if row.any()), predictor)
    points = np.asarray(predictor.predict(data.difference), dtype=np.float64)  # (prompts, steps, blocks)
    threshold = error_threshold if error_threshold is not None else _threshold_for(points, refine_fraction)
    eligible = np.nan_to_num(points, nan=-np.inf).max(axis=(0, 1)) > threshold
    return DynamicPrecisionConfig(tuple((block, tuple(bool(p > threshold) for p in row))
                                        for block, row, e in zip(data.blocks, predicted, eligible) if e),
                                  predictor, online_threshold=threshold)


def _threshold_for(points: np.ndarray, fraction: float) -> float:
    """The value that ``fraction`` (rounded up) of the finite points lie strictly above."""
    values = np.sort(points[np.isfinite(points)])[::-1]
    count = math.ceil(fraction * values.size - 1e-9)
    if count == 0 or values.size == 0:
        return float(values[0]) if values.size else 0.0
    return float(values[count]) if count < values.size else float(np.nextafter(values[-1], -np.inf))


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


def calibration_prompts(count: int = 8, seed: int = 0) -> list[str]:
    """ShapeWorld training captions for calibration runs on the bundled micro models.

    Example:
        >>> len(calibration_prompts(3))
        3
    """
    from ..shapeworld import sample_scene

    rng = np.random.default_rng(seed)
    kinds: Sequence[str] = ("single", "relation", "count")
    return [sample_scene(rng, split="train", kind=kinds[i % len(kinds)]).caption for i in range(count)]
