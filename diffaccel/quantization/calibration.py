"""Calibration for mixed NVFP4 / INT8 precision (6Bit-Diffusion's sensitivity predictor).

6Bit-Diffusion ("Inference-Time Mixed-Precision Quantization for Video Diffusion Models", 2026)
observes that a transformer block's relative input-output difference is linearly correlated
with the quantization error of its linear layers: blocks that change their input a lot are the
ones 4-bit weights hurt (the error of the residual branch scales with the residual). A
calibration run measures both, per block and denoising step, on a handful of prompts:

* ``difference[p, s, b] = ||out - in|| / ||in||`` of block ``b``'s hidden states at step ``s``
  of prompt ``p`` (the block's image/video stream; both CFG branches averaged when the
  pipeline runs them as separate calls);
* ``error[p, s, b] = ||out_q - out|| / ||out||``: the block's output error when the Linear
  layers inside it that the :class:`~diffaccel.quantization.QuantizationConfig` quantizes take
  NVFP4 weights (or their fallback's, where NVFP4 would zero most of a layer's weights; see
  :mod:`diffaccel.quantization.safety`) (the block runs a second time on the same inputs with the quantized weights
  swapped in; its float output is the one the pipeline goes on with; 0 for a block with none).

:class:`PrecisionPredictor` fits ``error ~ slope * difference + intercept`` by least squares;
:mod:`diffaccel.quantization.allocation` turns predicted errors into per-block precisions.

Blocks are the modules diffusers registers as transformer blocks (``BasicTransformerBlock`` in
UNets and PixArt, SD3's ``JointTransformerBlock``, Flux's, Wan's, CogVideoX's and LTX's blocks).
Steps are counted by the denoiser's timestep: a call with a new timestep starts a new step.

Example:
    >>> from diffaccel.testing import tiny_call_inputs, tiny_pipeline
    >>> pipe = tiny_pipeline("pixart-sigma")
    >>> data = calibrate(pipe, ["a red circle"], num_inference_steps=3, progress=False,
    ...                  config=QuantizationConfig(min_weight_numel=0), **tiny_call_inputs("pixart-sigma"))
    >>> data.difference.shape == (1, 3, len(data.blocks))
    True
    >>> predictor = PrecisionPredictor.fit(data)
    >>> bool(predictor.predict(0.0) == predictor.intercept)
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.hooks import ModelHook
from tqdm.auto import tqdm

from ..errors import UnsupportedPipelineError
from ..seams import add_hook, block_registry, denoisers, remove_hook, transformer_blocks
from ..shapeworld import sample_scene
from .config import QuantizationConfig
from .quantize import quantization_plan
from .safety import check_weights, quantize_layer
from .sensitivity import LayerSensitivity, measure_sensitivity

#: File that :meth:`CalibrationData.save` writes (beside a saved model, for instance).
CALIBRATION_FILE = "diffaccel_calibration.json"

_STEP_HOOK = "diffaccel.calibration.step"
_BLOCK_HOOK = "diffaccel.calibration.block"


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser (``pipe.transformer`` or ``pipe.unet``) that has transformer blocks.

    Raises :class:`~diffaccel.errors.UnsupportedPipelineError` when there is none.
    """
    try:
        found = denoisers(pipe)
    except UnsupportedPipelineError:
        found = {}
    for model in found.values():
        if transformer_blocks(model):
            return model
    raise UnsupportedPipelineError(
        f"{type(pipe).__name__} has no denoiser with diffusers transformer blocks; supported: pipelines "
        "whose `transformer` or `unet` holds them (SD/SDXL UNets, PixArt, SD3, Flux, Wan, CogVideoX, LTX)"
    )


def call_timestep(args: tuple, kwargs: dict) -> float | None:
    """The timestep a denoiser call was given (``timestep=`` or the second positional argument)."""
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if timestep is None:
        return None
    return float(torch.as_tensor(timestep).flatten()[0])


class StepCounter(ModelHook):
    """A denoiser hook that counts denoising steps: a call with a new timestep is a new step.

    ``step`` is ``-1`` before the first call; :meth:`reset` starts a new pipeline call.
    """

    _is_stateful = True

    def __init__(self) -> None:
        super().__init__()
        self.step, self._last = -1, None

    def reset(self) -> None:
        """Forget the steps seen (a new pipeline call begins)."""
        self.step, self._last = -1, None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.reset()
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        timestep = call_timestep(args, kwargs)
        if self.step < 0 or timestep != self._last:
            self.step, self._last = self.step + 1, timestep
        return args, kwargs


def block_hidden_states(block: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple[Any, Any]:
    """A block's hidden-states input and output, read with diffusers' block metadata."""
    metadata = block_registry().get(type(block))
    hidden_in = metadata._get_parameter_from_args_kwargs(metadata.hidden_states_argument_name, args, kwargs)
    hidden_out = output[metadata.return_hidden_states_index] if isinstance(output, (tuple, list)) else output
    return hidden_in, hidden_out


def relative_difference(new: torch.Tensor, old: torch.Tensor) -> float:
    """``||new - old|| / ||old||`` in float32 (0 when both are zero)."""
    new, old = new.detach().float(), old.detach().float()
    denominator = old.norm()
    return float((new - old).norm() / denominator) if denominator > 0 else float((new - old).norm() > 0)


class _Recorder:
    """Accumulates per-(step, block) sums of difference and error during one prompt."""

    def __init__(self, blocks: Sequence[str]) -> None:
        self.index = {name: i for i, name in enumerate(blocks)}
        self.rows: dict[tuple[int, int], list[float]] = {}  # (step, block) -> [diff, n_diff, err, n_err]

    def add(self, step: int, block: str, *, difference: float | None = None, error: float | None = None) -> None:
        row = self.rows.setdefault((step, self.index[block]), [0.0, 0, 0.0, 0])
        if difference is not None:
            row[0], row[1] = row[0] + difference, row[1] + 1
        if error is not None:
            row[2], row[3] = row[2] + error, row[3] + 1

    def arrays(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (num_steps, len(self.index))
        diff, err = np.full(shape, np.nan), np.full(shape, np.nan)
        for (step, block), (d, nd, e, ne) in self.rows.items():
            if step < num_steps:
                diff[step, block] = d / nd if nd else np.nan
                err[step, block] = e / ne if ne else np.nan
        return diff, err


def deployed_nvfp4_weight(name: str, linear: torch.nn.Linear, config: QuantizationConfig) -> torch.Tensor:
    """The weight ``linear`` computes with once quantized to NVFP4 by ``config``, in its own dtype: the
    NVFP4 one, or the fallback's when NVFP4 would zero most of it (see :mod:`~diffaccel.quantization.safety`).

    Example:
        >>> linear = torch.nn.Linear(64, 32)
        >>> weight = deployed_nvfp4_weight("fc", linear, QuantizationConfig())
        >>> weight.shape, bool((weight - linear.weight).norm() < 0.15 * linear.weight.norm())
        (torch.Size([32, 64]), True)
    """
    from .linear import QuantizedLinear

    module, _ = quantize_layer(name, linear, "nvfp4", replace(config, fp4_activations=False))
    if isinstance(module, QuantizedLinear):
        return module.dequantized_weight(linear.weight.dtype)
    return linear.weight.detach().clone()


class _BlockHook(ModelHook):
    """Records a block's relative input-output difference and its output error under NVFP4 weights."""

    def __init__(self, name: str, linears: dict[str, torch.nn.Linear], counter: StepCounter, recorder: _Recorder,
                 config: QuantizationConfig) -> None:
        super().__init__()
        self.name, self.counter, self.recorder = name, counter, recorder
        self.linears = list(linears.values())
        self.quantized = [deployed_nvfp4_weight(layer, m, config) for layer, m in linears.items()]

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden_in, hidden_out = block_hidden_states(module, args, kwargs, output)
        error = 0.0
        if self.linears:
            originals = [m.weight.data for m in self.linears]
            try:
                for linear, weight in zip(self.linears, self.quantized):
                    linear.weight.data = weight
                quantized = self.fn_ref.original_forward(*args, **kwargs)
            finally:
                for linear, weight in zip(self.linears, originals):
                    linear.weight.data = weight
            error = relative_difference(block_hidden_states(module, args, kwargs, quantized)[1], hidden_out)
        self.recorder.add(self.counter.step, self.name, difference=relative_difference(hidden_out, hidden_in),
                          error=error)
        return output


@dataclass
class CalibrationData:
    """What :func:`calibrate` measured: arrays of shape ``(prompts, steps, blocks)``.

    ``difference`` holds the blocks' relative input-output differences, ``error`` their relative
    output errors with NVFP4 weights; ``sensitivity`` the per-layer measurement of
    :func:`~diffaccel.quantization.measure_sensitivity` when ``calibrate(..., sensitivity=True)``
    made it (what a budget allocation reads), else None.
    """

    blocks: tuple[str, ...]
    prompts: tuple[str, ...]
    difference: np.ndarray
    error: np.ndarray
    sensitivity: LayerSensitivity | None = None

    @property
    def num_steps(self) -> int:
        """Denoising steps per prompt."""
        return int(self.difference.shape[1])

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable; NaN for a block a step did not run)."""
        data = {"blocks": list(self.blocks), "prompts": list(self.prompts),
                "difference": self.difference.tolist(), "error": self.error.tolist()}
        return data if self.sensitivity is None else {**data, "sensitivity": self.sensitivity.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CalibrationData":
        """Rebuild from :meth:`to_dict`'s output."""
        sensitivity = data.get("sensitivity")
        return cls(tuple(data["blocks"]), tuple(data["prompts"]),
                   np.asarray(data["difference"], dtype=np.float64), np.asarray(data["error"], dtype=np.float64),
                   None if sensitivity is None else LayerSensitivity.from_dict(sensitivity))

    def save(self, path: str | os.PathLike) -> str:
        """Write JSON to ``path`` (a folder gets :data:`CALIBRATION_FILE` inside it); returns the file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CALIBRATION_FILE)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationData":
        """Read what :meth:`save` wrote (a file, or a folder holding :data:`CALIBRATION_FILE`)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CALIBRATION_FILE)
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))


def calibrate(
    pipe: Any,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 20,
    seed: int = 0,
    config: QuantizationConfig | None = None,
    progress: bool = True,
    sensitivity: bool = False,
    sensitivity_config: QuantizationConfig | None = None,
    **call_kwargs: Any,
) -> CalibrationData:
    """Run ``pipe`` on ``prompts`` and measure, per block and step, the relative input-output
    difference and the block's output error with NVFP4 weights.

    ``sensitivity=True`` also measures every candidate layer's output error per format
    (:func:`~diffaccel.quantization.measure_sensitivity` on the same prompts, steps and seeds, with
    ``sensitivity_config``, default every Linear and Conv2d: ``QuantizationConfig(scope="all",
    min_weight_numel=0)``), which ``allocate_static(data, bits_per_weight=...)`` allocates by.

    The denoiser must still hold float ``nn.Linear`` layers (calibrate before
    :func:`~diffaccel.quantization.quantize_`). ``config`` (default ``QuantizationConfig()``) names
    the layers that will be quantized: only those count in a block's error. Outputs are not
    changed; the VAE is skipped (``output_type="latent"``). Prompt ``i`` is seeded with
    ``seed + i``; extra keyword arguments go to the pipeline call.

    Example:
        >>> from diffaccel.testing import tiny_call_inputs, tiny_pipeline
        >>> data = calibrate(tiny_pipeline("wan"), ["a red circle"], num_inference_steps=2, progress=False,
        ...                  config=QuantizationConfig(min_weight_numel=0), **tiny_call_inputs("wan"))
        >>> data.blocks, data.num_steps
        (('blocks.0', 'blocks.1'), 2)
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    model = denoiser_of(pipe)
    blocks = transformer_blocks(model)
    config = config or QuantizationConfig()
    plan = quantization_plan(model, config)
    quantized = [name for name, precision in plan.items() if precision != "bf16"]
    check_weights(model, quantized)
    names = [name for name, _ in blocks]
    counter = StepCounter()
    add_hook(model, counter, _STEP_HOOK)
    hooked = []
    differences, errors = [], []
    recorder = _Recorder(names)
    try:
        for name, block in blocks:
            linears = {layer: model.get_submodule(layer) for layer in quantized if layer.startswith(name + ".")}
            add_hook(block, _BlockHook(name, linears, counter, recorder, config), _BLOCK_HOOK)
            hooked.append(block)
        for index, prompt in enumerate(tqdm(prompts, desc="calibration", disable=not progress)):
            counter.reset()
            recorder.rows = {}
            generator = torch.Generator().manual_seed(seed + index)
            with torch.no_grad():
                pipe(prompt, num_inference_steps=num_inference_steps, generator=generator,
                     output_type="latent", **call_kwargs)
            diff, err = recorder.arrays(num_inference_steps)
            differences.append(diff)
            errors.append(err)
    finally:
        for block in hooked:
            remove_hook(block, _BLOCK_HOOK)
        remove_hook(model, _STEP_HOOK)
    layers = None
    if sensitivity:
        layers = measure_sensitivity(pipe, prompts, config=sensitivity_config, num_inference_steps=num_inference_steps,
                                     seed=seed, progress=progress, **call_kwargs)
    return CalibrationData(tuple(names), tuple(prompts), np.stack(differences), np.stack(errors), layers)


@dataclass(frozen=True)
class PrecisionPredictor:
    """The linear predictor ``error = slope * difference + intercept`` of 6Bit-Diffusion.

    ``correlation`` is Pearson's r of the calibration points it was fitted on.

    Example:
        >>> PrecisionPredictor(slope=0.5, intercept=0.25).predict(0.5)
        0.5
    """

    slope: float
    intercept: float
    correlation: float = float("nan")
    points: int = 0

    def predict(self, difference: Any) -> Any:
        """Predicted NVFP4 error for a relative block difference (a number or an array)."""
        if np.ndim(difference):
            return self.slope * np.asarray(difference, dtype=np.float64) + self.intercept
        return self.slope * float(difference) + self.intercept

    @classmethod
    def fit(cls, data: CalibrationData) -> "PrecisionPredictor":
        """Least-squares fit over every finite (difference, error) point of a calibration."""
        x, y = data.difference.ravel(), data.error.ravel()
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if x.size < 2 or np.ptp(x) == 0:
            mean = float(y.mean()) if y.size else 0.0
            return cls(slope=0.0, intercept=mean, correlation=float("nan"), points=int(x.size))
        slope, intercept = np.polyfit(x, y, 1)
        correlation = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else float("nan")
        return cls(slope=float(slope), intercept=float(intercept), correlation=correlation, points=int(x.size))

    def to_dict(self) -> dict[str, float]:
        """Plain-dict form."""
        return {"slope": self.slope, "intercept": self.intercept, "correlation": self.correlation,
                "points": self.points}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrecisionPredictor":
        """Rebuild from :meth:`to_dict`'s output."""
        return cls(float(data["slope"]), float(data["intercept"]), float(data.get("correlation", "nan")),
                   int(data.get("points", 0)))


def calibrate_activation_scales(
    pipe: Any,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 20,
    seed: int = 0,
    clip: float = 1.0,
    progress: bool = True,
    **call_kwargs: Any,
) -> dict[str, float]:
    """Give the INT8 layers of ``pipe``'s (quantized) denoiser static activation scales.

    Runs ``prompts`` with per-token (dynamic) activation quantization, records each INT8
    :class:`~diffaccel.quantization.QuantizedLinear`'s largest input magnitude over every call
    and step, and sets ``act_scale = clip * amax / 127`` (``clip < 1`` clips outliers for finer
    steps). Static scales skip the per-token reduction at inference; they are saved with the
    model. Returns the scales by layer name.

    Example:
        >>> from diffaccel.quantization import QuantizationConfig, quantize_
        >>> from diffaccel.testing import tiny_call_inputs, tiny_pipeline
        >>> pipe = tiny_pipeline("wan")
        >>> _ = quantize_(pipe.transformer, QuantizationConfig("int8", min_weight_numel=0))
        >>> scales = calibrate_activation_scales(pipe, ["a red circle"], num_inference_steps=2,
        ...                                      progress=False, **tiny_call_inputs("wan"))
        >>> all(pipe.transformer.get_submodule(name).act_scale > 0 for name in scales)
        True
    """
    from .linear import QuantizedLinear

    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if not isinstance(clip, (int, float)) or not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip!r}")
    model = denoiser_of(pipe)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.precision == "int8"}
    if not layers:
        raise UnsupportedPipelineError(
            f"{type(model).__name__} has no INT8 QuantizedLinear layers: quantize it with precision 'int8' first")
    amax = {name: torch.zeros((), dtype=torch.float32) for name in layers}

    def recorder(name: str):
        def hook(module, inputs):
            finite = inputs[0].detach().float().abs().nan_to_num(nan=0.0, posinf=0.0)
            amax[name] = torch.maximum(amax[name], finite.amax().cpu())
        return hook

    for layer in layers.values():
        layer.act_scale = None  # measure with dynamic scales
    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    try:
        for index, prompt in enumerate(tqdm(prompts, desc="activation scales", disable=not progress)):
            with torch.no_grad():
                pipe(prompt, num_inference_steps=num_inference_steps, output_type="latent",
                     generator=torch.Generator().manual_seed(seed + index), **call_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    scales: dict[str, float] = {}
    for name, layer in layers.items():
        value = float(amax[name]) * clip / 127.0
        scale = torch.tensor(value if value > 0 else 1.0, dtype=torch.float32, device=layer.weight_scale.device)
        layer.act_scale = scale
        scales[name] = float(scale)
    return scales


def calibration_prompts(count: int = 8, seed: int = 0) -> list[str]:
    """ShapeWorld training captions for calibration runs on the bundled micro models.

    Example:
        >>> len(calibration_prompts(3))
        3
    """
    rng = np.random.default_rng(seed)
    kinds: Sequence[str] = ("single", "relation", "count")
    return [sample_scene(rng, split="train", kind=kinds[i % len(kinds)]).caption for i in range(count)]
