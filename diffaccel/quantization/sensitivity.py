"""Measured per-layer sensitivity: how much the denoiser's output moves when one layer alone takes a format.

What a budget allocation (:func:`~diffaccel.quantization.allocate_static` with ``bits_per_weight``
or ``max_bytes``) spends bytes by. :func:`measure_sensitivity` runs the pipeline on calibration
prompts and records the denoiser's inputs at a few steps of each (the calls the sampler really
makes, CFG batch included); then, per in-scope layer and format, it swaps in that layer quantized
exactly as :func:`~diffaccel.quantization.quantize_` would, reruns the denoiser on the recorded
calls and measures

``error[layer, format] = mean over calls of ||y_q - y||^2 / ||y||^2``

of the denoiser's output ``y``, the quantity PSNR is the log of. Errors of different layers are
treated as additive (independent small perturbations), which is what lets a greedy allocation
compare "this layer in INT8" with "that one in bf16" by error saved per byte spent.

With ``measure="trajectory"`` the error is instead that of the *final latents* of whole sampling
runs (each calibration prompt, same seed, the layer swapped in for every step):
``mean over prompts of ||z_q - z||^2 / ||z||^2``. It costs a full pipeline call per layer, format
and prompt, and sees what one step cannot: a layer whose error is the same at every step (one on
the text-conditioning path, such as a cross-attention key projection, reads the same input at every
step) adds up along the trajectory instead of averaging out.

A format whose quantization would fall back (it would zero most of the layer's weights; see
:mod:`~diffaccel.quantization.safety`) is recorded as unavailable (NaN) for that layer.

Example:
    >>> from diffaccel.testing import tiny_call_inputs, tiny_pipeline
    >>> pipe = tiny_pipeline("pixart-sigma")
    >>> data = measure_sensitivity(pipe, ["a red circle"], num_inference_steps=2, progress=False,
    ...                            **tiny_call_inputs("pixart-sigma"))
    >>> data.formats, data.error.shape == (len(data.layers), 2)
    (('nvfp4', 'w8a16'), True)
    >>> bool((data.error[:, 0] >= data.error[:, 1]).mean() > 0.5)   # 4-bit moves the output more than 8-bit
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.hooks import ModelHook
from tqdm.auto import tqdm

from ..seams import add_hook, denoiser, remove_hook, tree_map_tensors
from .config import QuantizationConfig
from .formats import planned_nbytes
from .quantize import quantization_plan
from .safety import check_weights, quantize_layer

#: Formats :func:`measure_sensitivity` can try on a layer (``"int8"``, W8A8, on Linear layers only).
SENSITIVITY_FORMATS: tuple[str, ...] = ("nvfp4", "w8a16", "int8")

#: What :func:`measure_sensitivity` measures the error on: the denoiser's output at recorded steps,
#: or the final latents of whole sampling runs.
SENSITIVITY_MEASURES: tuple[str, ...] = ("step", "trajectory")

_RECORD_HOOK = "diffaccel.sensitivity.record"

#: Denoising steps recorded per calibration prompt unless asked otherwise (``measure="step"``).
DEFAULT_STEPS_PER_PROMPT = 3


class _CallRecorder(ModelHook):
    """Keeps copies of the denoiser's inputs at the chosen steps (a new timestep is a new step)."""

    def __init__(self, steps: set[int]) -> None:
        super().__init__()
        self.steps, self.calls = steps, []
        self.step, self._last = -1, None

    def reset(self) -> None:
        self.step, self._last = -1, None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        value = None if timestep is None else float(torch.as_tensor(timestep).flatten()[0])
        if self.step < 0 or value != self._last:
            self.step, self._last = self.step + 1, value
        if self.step in self.steps:
            self.calls.append(tree_map_tensors(lambda t: t.detach().clone(), (args, kwargs)))
        return args, kwargs


def _output(result: Any) -> torch.Tensor:
    """The denoiser's prediction: the first element of a tuple, or the output's ``sample``."""
    if isinstance(result, (tuple, list)):
        return result[0]
    return getattr(result, "sample", result)


@dataclass
class LayerSensitivity:
    """What :func:`measure_sensitivity` measured.

    ``layers`` are the in-scope layers of ``config`` that it would quantize; ``error[i, j]`` is the
    output error with layer ``i`` alone in ``formats[j]`` (NaN: unavailable), ``nbytes[i, j]`` the
    bytes that layer stores then; ``numel[i]`` its weights; ``total_numel`` every parameter of the
    denoiser (the rest count at bf16 in a budget, as in :func:`~diffaccel.quantization.memory_report`).
    """

    layers: tuple[str, ...]
    formats: tuple[str, ...]
    error: np.ndarray
    nbytes: np.ndarray
    numel: np.ndarray
    total_numel: int
    config: QuantizationConfig

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON; NaN stays NaN)."""
        return {"layers": list(self.layers), "formats": list(self.formats), "error": self.error.tolist(),
                "nbytes": self.nbytes.tolist(), "numel": self.numel.tolist(), "total_numel": self.total_numel,
                "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerSensitivity":
        """Rebuild from :meth:`to_dict`'s output."""
        return cls(tuple(data["layers"]), tuple(data["formats"]), np.asarray(data["error"], dtype=np.float64),
                   np.asarray(data["nbytes"], dtype=np.int64), np.asarray(data["numel"], dtype=np.int64),
                   int(data["total_numel"]), QuantizationConfig.from_dict(data["config"]))


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(formats)
    if not formats or len(set(formats)) != len(formats) or any(f not in SENSITIVITY_FORMATS for f in formats):
        raise ValueError(f"formats must be distinct values of {SENSITIVITY_FORMATS}, got {formats!r}")
    return formats


def measure_sensitivity(
    pipe: Any,
    prompts: Sequence[str],
    *,
    formats: Sequence[str] = ("nvfp4", "w8a16"),
    config: QuantizationConfig | None = None,
    num_inference_steps: int = 20,
    steps_per_prompt: int = DEFAULT_STEPS_PER_PROMPT,
    seed: int = 0,
    measure: str = "step",
    progress: bool = True,
    **call_kwargs: Any,
) -> LayerSensitivity:
    """Measure each layer's output error in each format, one layer at a time.

    Args:
        pipe: a pipeline whose denoiser still holds float layers.
        prompts: calibration prompts (prompt ``i`` is seeded with ``seed + i``).
        formats: of :data:`SENSITIVITY_FORMATS`; ``"int8"`` (W8A8) applies to Linear layers only
            (NaN for convolutions, which have no W8A8 path).
        config: which layers are candidates (default ``QuantizationConfig(scope="all",
            min_weight_numel=0)``: every Linear and Conv2d the default ``exclude`` leaves); its
            ``group_size``, ``impl`` and ``fallback`` are used as :func:`quantize_` would.
        num_inference_steps: of each calibration call.
        steps_per_prompt: denoising steps recorded per prompt, evenly spaced from first to last
            (``measure="step"``).
        measure: ``"step"`` (the denoiser's output on the recorded calls) or ``"trajectory"`` (the
            final latents of a whole run per prompt; see the module docs).
        progress: show progress bars.
        call_kwargs: more pipeline arguments (``guidance_scale``, ``height``...).
    """
    formats = _check_formats(formats)
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    for name, value in (("num_inference_steps", num_inference_steps), ("steps_per_prompt", steps_per_prompt)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if measure not in SENSITIVITY_MEASURES:
        raise ValueError(f"measure must be one of {SENSITIVITY_MEASURES}, got {measure!r}")
    if measure == "trajectory" and steps_per_prompt != DEFAULT_STEPS_PER_PROMPT:
        warnings.warn("measure_sensitivity: steps_per_prompt has no effect with measure='trajectory' (whole runs "
                      "are measured); ignored", stacklevel=2)
    config = config or QuantizationConfig(scope="all", min_weight_numel=0)
    model = denoiser(pipe)
    plan = quantization_plan(model, replace(config, precision="nvfp4", overrides=()))
    layers = [name for name, precision in plan.items() if precision != "bf16"]
    if not layers:
        raise ValueError(f"the config leaves no layer of {type(model).__name__} to quantize (check exclude and scope)")
    check_weights(model, layers)
    if measure == "trajectory":
        def latents(index: int, prompt: str) -> torch.Tensor:
            with torch.no_grad():
                out = pipe(prompt, num_inference_steps=num_inference_steps, output_type="latent",
                           generator=torch.Generator().manual_seed(seed + index), **call_kwargs)
            return _latents(out).float()

        references = [latents(i, p) for i, p in enumerate(prompts)]

        def output_error() -> float:
            return float(np.mean([_relative_error(latents(i, p), ref)
                                  for (i, p), ref in zip(enumerate(prompts), references)]))
    else:
        calls = _record_calls(pipe, model, prompts, num_inference_steps, steps_per_prompt, seed, progress, call_kwargs)
        with torch.no_grad():
            references = [_output(model(*args, **kwargs)).float() for args, kwargs in calls]

        def output_error() -> float:
            with torch.no_grad():
                return float(np.mean([_relative_error(_output(model(*args, **kwargs)).float(), ref)
                                      for (args, kwargs), ref in zip(calls, references)]))
    error = np.full((len(layers), len(formats)), np.nan)
    nbytes = np.zeros((len(layers), len(formats)), dtype=np.int64)
    numel = np.zeros(len(layers), dtype=np.int64)
    for i, name in enumerate(tqdm(layers, desc="sensitivity: layers", disable=not progress)):
        original = model.get_submodule(name)
        numel[i] = original.weight.numel()
        out_features = original.weight.shape[0]
        for j, fmt in enumerate(formats):
            group_size = config.group_size if fmt == "w8a16" else None
            nbytes[i, j] = planned_nbytes(fmt, out_features, int(numel[i]) // out_features, group_size)
            if fmt == "int8" and isinstance(original, torch.nn.Conv2d):
                continue
            layer, fallback = quantize_layer(name, original, fmt, config)
            if fallback is not None and fallback.precision != fmt:
                continue
            model.set_submodule(name, layer)
            try:
                error[i, j] = output_error()
            finally:
                model.set_submodule(name, original)
    return LayerSensitivity(tuple(layers), formats, error, nbytes, numel,
                            sum(p.numel() for p in model.parameters()), config)


def _record_calls(pipe: Any, model: torch.nn.Module, prompts: Sequence[str], num_inference_steps: int,
                  steps_per_prompt: int, seed: int, progress: bool, call_kwargs: dict[str, Any]) -> list[tuple]:
    """The denoiser's inputs at ``steps_per_prompt`` evenly spaced steps of each calibration run."""
    steps = set(np.linspace(0, num_inference_steps - 1, min(steps_per_prompt, num_inference_steps)).round().astype(int).tolist())
    recorder = _CallRecorder(steps)
    add_hook(model, recorder, _RECORD_HOOK)
    try:
        for index, prompt in enumerate(tqdm(prompts, desc="sensitivity: record", disable=not progress)):
            recorder.reset()
            with torch.no_grad():
                pipe(prompt, num_inference_steps=num_inference_steps, output_type="latent",
                     generator=torch.Generator().manual_seed(seed + index), **call_kwargs)
    finally:
        remove_hook(model, _RECORD_HOOK)
    return recorder.calls


def _latents(output: Any) -> torch.Tensor:
    """The final latents of a pipeline call with ``output_type="latent"`` (images or frames)."""
    for name in ("images", "frames"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return _output(output)


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference||^2 / ||reference||^2``."""
    return float((value - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))
