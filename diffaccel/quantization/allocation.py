"""Precision allocation from a calibration: static (fixed per layer, by block fraction or by a
memory budget) or dynamic (per block and timestep band).

* :func:`allocate_static` with ``bits_per_weight=`` or ``max_bytes=`` fills a memory budget from
  measured per-layer sensitivities (:func:`~diffaccel.quantization.measure_sensitivity`, or
  ``calibrate(..., sensitivity=True)``): every layer starts in its cheapest format (NVFP4) and
  the upgrade (to INT8, then to bf16, per layer, across Linear and Conv2d layers) that saves the
  most measured output error per extra byte is taken while it fits, until none does. The budget
  is never exceeded; its :class:`BudgetAllocation` gives the ``QuantizationConfig`` that realises it.

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
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

import heapq

from .calibration import (
    CalibrationData,
    PrecisionPredictor,
)
from .config import QuantizationConfig
from .dynamic import DynamicPrecisionConfig
from .sensitivity import LayerSensitivity

_BF16_BYTES = 2


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


@dataclass(frozen=True)
class BudgetAllocation:
    """A precision per layer that fits a memory budget (from :func:`allocate_static` with a budget).

    ``precisions`` maps every candidate layer to ``"nvfp4"``, ``"w8a16"``, ``"int8"`` or
    ``"bf16"``; ``nbytes`` / ``bits_per_weight`` are the whole denoiser's storage as
    :func:`~diffaccel.quantization.memory_report` will count it (unquantized parameters at bf16);
    ``predicted_error`` is the sum of the chosen formats' measured errors; ``budget_nbytes`` the budget.
    """

    precisions: Mapping[str, str]
    nbytes: int
    total_numel: int
    budget_nbytes: int
    predicted_error: float
    config: QuantizationConfig

    @property
    def bits_per_weight(self) -> float:
        """``nbytes * 8 / total_numel``."""
        return self.nbytes * 8 / self.total_numel

    @property
    def counts(self) -> dict[str, int]:
        """Layers per precision."""
        counts: dict[str, int] = {}
        for precision in self.precisions.values():
            counts[precision] = counts.get(precision, 0) + 1
        return counts

    def quantization_config(self) -> QuantizationConfig:
        """The config that makes :func:`~diffaccel.quantization.quantize_` realise exactly this allocation
        (every candidate layer named in ``overrides``; everything else stays as it is)."""
        overrides = {name: precision for name, precision in self.precisions.items() if precision != "bf16"}
        return replace(self.config, precision="bf16", overrides=overrides, min_weight_numel=0, residual=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return {"precisions": dict(self.precisions), "nbytes": self.nbytes, "total_numel": self.total_numel,
                "bits_per_weight": self.bits_per_weight, "budget_nbytes": self.budget_nbytes,
                "predicted_error": self.predicted_error, "counts": self.counts, "config": self.config.to_dict()}


def _layer_options(error: np.ndarray, nbytes: np.ndarray, formats: tuple[str, ...], numel: int) -> list[tuple[int, float, str]]:
    """A layer's (bytes, error, format) options on their lower convex hull, cheapest first; bf16 last."""
    options = [(int(b), float(e), f) for f, e, b in zip(formats, error, nbytes) if np.isfinite(e)]
    options.append((numel * _BF16_BYTES, 0.0, "bf16"))
    options.sort(key=lambda o: (o[0], o[1]))
    hull: list[tuple[int, float, str]] = []
    for option in options:
        if hull and option[1] >= hull[-1][1]:  # costs at least as much, no better: never worth it
            continue
        while len(hull) >= 2:  # drop a middle point above the segment from its neighbours
            (b0, e0, _), (b1, e1, _) = hull[-2], hull[-1]
            if (e0 - e1) * (option[0] - b0) <= (e0 - option[1]) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def _allocate_budget(sensitivity: LayerSensitivity, budget: int, formats: tuple[str, ...]) -> BudgetAllocation:
    columns = [sensitivity.formats.index(f) for f in formats]
    hulls = [_layer_options(sensitivity.error[i, columns], sensitivity.nbytes[i, columns], formats, int(n))
             for i, n in enumerate(sensitivity.numel)]
    other = (sensitivity.total_numel - int(sensitivity.numel.sum())) * _BF16_BYTES
    level = [0] * len(hulls)
    total = other + sum(h[0][0] for h in hulls)
    if total > budget:
        raise ValueError(
            f"the budget ({budget * 8 / sensitivity.total_numel:.3f} bits per weight, {budget} bytes) is below the "
            f"smallest allocation ({total * 8 / sensitivity.total_numel:.3f} bits per weight, {total} bytes: every "
            f"candidate layer in its cheapest format of {formats})"
        )
    heap = [(-(h[0][1] - h[1][1]) / (h[1][0] - h[0][0]), i) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        hull, current = hulls[i], level[i]
        extra = hull[current + 1][0] - hull[current][0]
        if total + extra > budget:
            continue  # its later upgrades cost more still
        total += extra
        level[i] = current + 1
        if level[i] + 1 < len(hull):
            step = hull[level[i] + 1]
            heapq.heappush(heap, (-(hull[level[i]][1] - step[1]) / (step[0] - hull[level[i]][0]), i))
    precisions = {name: hulls[i][level[i]][2] for i, name in enumerate(sensitivity.layers)}
    error = sum(hulls[i][level[i]][1] for i in range(len(hulls)))
    return BudgetAllocation(precisions, total, sensitivity.total_numel, budget, float(error), sensitivity.config)


def allocate_static(
    data: CalibrationData | LayerSensitivity,
    *,
    int8_fraction: float | None = None,
    error_threshold: float | None = None,
    bits_per_weight: float | None = None,
    max_bytes: int | None = None,
    formats: tuple[str, ...] | None = None,
    predictor: PrecisionPredictor | None = None,
    by: str = "predicted",
) -> StaticAllocation | BudgetAllocation:
    """A fixed precision per layer: by block (6Bit-Diffusion's predictor) or to fill a memory budget.

    By block (``int8_fraction`` or ``error_threshold``; ``data`` a :class:`CalibrationData`): INT8
    for the blocks with the largest predicted NVFP4 error, NVFP4 for the rest; a :class:`StaticAllocation`.

    By budget (``bits_per_weight`` or ``max_bytes``; ``data`` a
    :class:`~diffaccel.quantization.LayerSensitivity` or a calibration made with
    ``sensitivity=True``): the greedy fill described in this module; a :class:`BudgetAllocation`.

    Args:
        data: a calibration (:func:`~diffaccel.quantization.calibrate`) or a sensitivity measurement.
        int8_fraction: this fraction of the blocks (rounded up) takes INT8; or
        error_threshold: blocks whose predicted error exceeds it take INT8; or
        bits_per_weight: the whole denoiser's average storage (every parameter counted, those left
            unquantized at bf16); or
        max_bytes: the same budget in bytes.
        formats: the quantized formats a budget allocation may use (default: every format measured
            but ``"int8"``, i.e. ``("nvfp4", "w8a16")``: W8A16 keeps more quality than W8A8 at the
            same bytes; pass ``("nvfp4", "int8")`` for W8A8 layers, the INT8 tensor cores' fast path). bf16 is
            always an option.
        predictor: defaults to the one fitted on ``data`` (by block).
        by: ``"predicted"`` ranks blocks by the predictor applied to their mean difference (the
            paper's recipe); ``"measured"`` by the calibration's measured mean error, which a
            static allocation has at hand anyway (``predicted_error`` then holds those errors).

    Example:
        >>> import numpy as np
        >>> from diffaccel.quantization.sensitivity import LayerSensitivity
        >>> data = LayerSensitivity(("a", "b"), ("nvfp4", "w8a16"), np.array([[1e-2, 1e-4], [1e-3, 1e-5]]),
        ...                         np.array([[600, 1100], [600, 1100]]), np.array([1024, 1024]), 2048,
        ...                         QuantizationConfig(scope="all"))
        >>> allocation = allocate_static(data, max_bytes=1800)
        >>> dict(allocation.precisions), allocation.nbytes
        ({'a': 'w8a16', 'b': 'nvfp4'}, 1700)
    """
    budgets = [v is not None for v in (bits_per_weight, max_bytes)]
    if any(budgets):
        if sum(budgets) > 1 or int8_fraction is not None or error_threshold is not None:
            raise ValueError("give exactly one of int8_fraction, error_threshold, bits_per_weight and max_bytes")
        sensitivity = data if isinstance(data, LayerSensitivity) else getattr(data, "sensitivity", None)
        if sensitivity is None:
            raise ValueError("a budget allocation needs measured layer sensitivities: pass measure_sensitivity(...)'s "
                             "result, or a calibration made with calibrate(..., sensitivity=True)")
        measured = tuple(f for f in sensitivity.formats if f != "int8") or sensitivity.formats
        formats = measured if formats is None else tuple(formats)
        unknown = [f for f in formats if f not in sensitivity.formats]
        if not formats or unknown:
            raise ValueError(f"formats must be measured ones {sensitivity.formats}, got {formats!r}")
        if bits_per_weight is not None:
            if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, (int, float)) or not bits_per_weight > 0:
                raise ValueError(f"bits_per_weight must be a number > 0, got {bits_per_weight!r}")
            max_bytes = math.floor(bits_per_weight * sensitivity.total_numel / 8)
        elif isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
        return _allocate_budget(sensitivity, max_bytes, formats)
    if isinstance(data, LayerSensitivity):
        raise ValueError("a sensitivity measurement allocates by budget: pass bits_per_weight or max_bytes")
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


