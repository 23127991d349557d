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
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from .calibration import (
    CalibrationData,
    PrecisionPredictor,
)
from .config import QuantizationConfig
from .dynamic import DynamicPrecisionConfig


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


