"""Look-ahead potentials: score an intermediate state by a short deterministic rollout to t = 0.

FK steering scores particles mid-way. The one-step prediction x0 = E[x0 | x_t] is blurry early
on, so a reward on it says little about the final sample. A look-ahead rollout instead runs
``steps`` deterministic steps (DDIM with eta 0 on noise-prediction models, Euler on flow models)
from the current state over the remaining schedule, and scores the clean sample it lands on. The
rollout is one nested call of the pipeline itself (or of a cheaper accelerated copy of it) with a
:class:`RolloutScheduler`, so every pipeline family's conditioning and guidance apply unchanged.
Every denoiser evaluation of a rollout counts in the NFE.

The first jump reuses the model output the sampler has just computed; the rollout's ``steps``
further evaluations sit on the remaining schedule, evenly spread. With ``steps=0`` the rollout is
the one-step x0 prediction; with every remaining step it is the deterministic sampler's result.

Example:
    >>> import torch
    >>> from diffusers import DDIMScheduler
    >>> rollout = RolloutScheduler(DDIMScheduler(), torch.tensor([500, 250]), torch.tensor([0.3, 0.6]), "vp")
    >>> rollout.set_timesteps(2)
    >>> sample = torch.ones(1, 4, 2, 2)
    >>> tuple(rollout.step(torch.zeros_like(sample), 500, sample).prev_sample.shape)
    (1, 4, 2, 2)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import BaseOutput

from ..errors import UnsupportedCombinationError, UnsupportedPipelineError
from ..seams import denoiser
from .inputs import IMAGE_INPUTS, IMAGE_START_INPUTS, TENSOR_INPUTS, TEXT_INPUTS
from .media import pipeline_media
from .sde import is_flow_matching

#: Call arguments the rollout sets itself (or that belong to the outer sampler only).
_OUTER_ONLY = frozenset({
    "latents", "generator", "num_inference_steps", "timesteps", "sigmas", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs", "output_type", "return_dict", "eta", "denoising_end",
})



def schedule_family(scheduler: Any) -> str:
    """``"flow"`` (velocity on sigma interpolants) or ``"vp"`` (noise, v or sample prediction on
    ``alphas_cumprod`` with unscaled samples); anything else cannot be rolled out.

    Example:
        >>> from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
        >>> schedule_family(DDIMScheduler()), schedule_family(FlowMatchEulerDiscreteScheduler())
        ('vp', 'flow')
        >>> schedule_family(EulerDiscreteScheduler())
        Traceback (most recent call last):
        ...
        diffaccel.errors.UnsupportedPipelineError: look-ahead rollouts need a flow-matching scheduler or one on alphas_cumprod with unscaled samples (DDIM, DDPM, DPM-Solver, UniPC), got EulerDiscreteScheduler
    """
    if getattr(scheduler, "order", 1) == 1:
        if is_flow_matching(scheduler) and getattr(scheduler, "sigmas", None) is not None:
            return "flow"
        if getattr(scheduler, "alphas_cumprod", None) is not None and float(scheduler.init_noise_sigma) == 1.0:
            return "vp"
    raise UnsupportedPipelineError(
        "look-ahead rollouts need a flow-matching scheduler or one on alphas_cumprod with unscaled samples "
        f"(DDIM, DDPM, DPM-Solver, UniPC), got {type(scheduler).__name__}"
    )


def split_prediction(family: str, config: Any, model_output: torch.Tensor, sample: torch.Tensor,
                     level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, noise)`` implied by a model output at ``level`` (alpha-bar for ``"vp"``, sigma for ``"flow"``)."""
    x, out = sample.float(), model_output.float()
    if family == "flow":
        return x - level * out, x + (1.0 - level) * out
    a, b = level**0.5, (1.0 - level) ** 0.5
    kind = config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        x0 = (x - b * out) / a
    elif kind == "v_prediction":
        x0 = a * x - b * out
    elif kind == "sample":
        x0 = out
    else:
        raise UnsupportedPipelineError(f"look-ahead rollouts do not support prediction_type {kind!r}")
    if config.get("clip_sample", False):
        limit = float(config.get("clip_sample_range", 1.0))
        x0 = x0.clamp(-limit, limit)
    return x0, noise_of(family, x, x0, level)


def noise_of(family: str, sample: torch.Tensor, x0: torch.Tensor, level: float) -> torch.Tensor:
    """The noise that puts ``x0`` at ``sample`` on the interpolant at ``level``."""
    if family == "flow":
        return (sample.float() - (1.0 - level) * x0.float()) / level
    return (sample.float() - level**0.5 * x0.float()) / (1.0 - level) ** 0.5


def mix(family: str, x0: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
    """The interpolant of ``x0`` and ``noise`` at ``level``."""
    if family == "flow":
        return (1.0 - level) * x0 + level * noise
    return level**0.5 * x0 + (1.0 - level) ** 0.5 * noise


@dataclass
class RolloutSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class RolloutScheduler:
    """Deterministic steps through given ``timesteps`` at noise ``levels``; the last step returns x0.

    It stands in for the pipeline's scheduler during one rollout call: it takes the outer
    scheduler's ``config`` (so pipelines read the same settings), ignores the schedule a pipeline
    asks for (``num_inference_steps``, ``sigmas``, ``mu``) and counts its steps.
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, outer: Any, timesteps: torch.Tensor, levels: torch.Tensor, family: str) -> None:
        self.config = outer.config
        self._timesteps, self.levels, self.family = timesteps, [float(v) for v in levels], family
        self.timesteps = timesteps
        self.steps_taken = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, timesteps: Any = None,
                      sigmas: Any = None, mu: Any = None) -> None:
        self.timesteps = self._timesteps.to(device) if device is not None else self._timesteps
        self._index = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Rollouts always start at their first point."""

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             return_dict: bool = True) -> RolloutSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        level = self.levels[self._index]
        x0, noise = split_prediction(self.family, self.config, model_output, sample, level)
        self._index += 1
        self.steps_taken += 1
        following = x0 if self._index == len(self.levels) else mix(self.family, x0, noise, self.levels[self._index])
        prev, x0 = following.to(sample.dtype), x0.to(sample.dtype)
        return RolloutSchedulerOutput(prev, x0) if return_dict else (prev, x0)


def rollout_points(start: int, length: int, steps: int) -> list[int]:
    """Indices of ``steps`` evaluation points evenly spread over the schedule after ``start``
    (``length`` points in all; all of them when fewer remain).

    Example:
        >>> rollout_points(4, 20, 3), rollout_points(17, 20, 3), rollout_points(19, 20, 3)
        ([8, 12, 16], [18, 19], [])
    """
    remaining = length - 1 - start
    if steps >= remaining:
        return list(range(start + 1, length))
    span = length - start
    return sorted({start + round(m * span / (steps + 1)) for m in range(1, steps + 1)})


@contextlib.contextmanager
def _rollout_state(pipe: Any, scheduler: RolloutScheduler) -> Iterator[None]:
    """``pipe`` with ``scheduler`` and no progress bar; everything the nested call sets on it
    (its guidance scale, timestep count, current timestep, ...) is put back afterwards."""
    saved = dict(pipe.__dict__)
    pipe.__dict__["scheduler"] = scheduler
    pipe.__dict__["_progress_bar_config"] = {**saved.get("_progress_bar_config", {}), "disable": True}
    try:
        yield
    finally:
        pipe.__dict__.clear()
        pipe.__dict__.update(saved)


def check_rollout_pipe(pipe: Any, rollout_pipe: Any, call_kwargs: dict[str, Any]) -> None:
    """Refuse, before any model work, rollouts that would disturb the steered call or cannot start mid-way."""
    schedule_family(pipe.scheduler)
    if image := sorted(name for name in IMAGE_START_INPUTS if call_kwargs.get(name) is not None):
        raise UnsupportedCombinationError(
            f"look-ahead rollouts run text-to-image/video calls from an intermediate state; {image} start from an image")
    shared = denoiser(rollout_pipe) is denoiser(pipe)
    accelerated = [p for p in {id(pipe): pipe, id(rollout_pipe): rollout_pipe}.values()
                   if getattr(p, "_diffaccel_configs", None)]
    if shared and accelerated:
        raise UnsupportedCombinationError(
            "look-ahead rollouts on a denoiser that carries diffaccel features of the steered call would disturb "
            "their state; pass lookahead_pipe=<an accelerated copy with its own denoiser>, or steer a plain pipeline")


class LookaheadRollout:
    """Rolls particles out from an intermediate state and counts the rollout's NFE.

    Args:
        pipe: the steered pipeline (its scheduler defines the remaining schedule).
        rollout_pipe: the pipeline that runs the rollout (``pipe`` itself, or a cheaper copy).
        steps: denoiser evaluations per rollout (0: the one-step x0 prediction).
        call_kwargs: the steered call's particle arguments (prompts and conditioning per particle).
        max_batch: particles per rollout call (``None``: all at once).
    """

    def __init__(self, pipe: Any, rollout_pipe: Any, steps: int, call_kwargs: dict[str, Any],
                 max_batch: int | None = None) -> None:
        self.pipe, self.rollout_pipe, self.steps, self.max_batch = pipe, rollout_pipe, steps, max_batch
        self.family = schedule_family(pipe.scheduler)
        self.call_kwargs = {k: v for k, v in call_kwargs.items() if k not in _OUTER_ONLY}
        self.num_particles = len(call_kwargs["prompt"])
        self.nfe = 0

    def level(self, position: int) -> float:
        scheduler = self.pipe.scheduler
        if self.family == "flow":
            return float(scheduler.sigmas[position])
        return float(scheduler.alphas_cumprod[int(scheduler.timesteps[position])])

    @torch.no_grad()
    def __call__(self, index: int, num_steps: int, sample: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The clean samples that ``steps`` deterministic steps from ``sample`` (at loop step ``index``
        of ``num_steps``, whose prediction is ``x0``) reach."""
        timesteps = self.pipe.scheduler.timesteps
        position = index + len(timesteps) - num_steps
        points = rollout_points(position, len(timesteps), self.steps)
        if not points:
            return x0
        levels = torch.tensor([self.level(p) for p in points])
        noise = noise_of(self.family, sample, x0, self.level(position))
        start = mix(self.family, x0.float(), noise, float(levels[0])).to(sample.dtype)
        chunk = self.max_batch or self.num_particles
        results = []
        for begin in range(0, self.num_particles, chunk):
            stop = min(begin + chunk, self.num_particles)
            scheduler = RolloutScheduler(self.pipe.scheduler, timesteps[points].clone(), levels, self.family)
            kwargs = dict(_rows(self.call_kwargs, self.num_particles, begin, stop), latents=start[begin:stop],
                          num_inference_steps=len(points), output_type="latent")
            with _rollout_state(self.rollout_pipe, scheduler):
                output = self.rollout_pipe(**kwargs)
            self.nfe += scheduler.steps_taken * (stop - begin)
            results.append(pipeline_media(output).to(x0.dtype))
        return torch.cat(results)


def _rows(kwargs: dict[str, Any], count: int, begin: int, stop: int) -> dict[str, Any]:
    """Rows ``begin:stop`` of every per-particle argument (lists and batch-first tensors of length ``count``)."""
    per_particle = {"prompt", *TEXT_INPUTS, *IMAGE_INPUTS, *TENSOR_INPUTS}
    rows = {}
    for name, value in kwargs.items():
        if name in per_particle and isinstance(value, (list, tuple, torch.Tensor)) and len(value) == count:
            value = value[begin:stop]
        rows[name] = value
    return rows
