"""Prior noise injection (Faster Diffusion, Li et al., 2023), at the scheduler seam: late in sampling,
``coefficient * initial_noise`` is added to the latents each ``scheduler.step`` returns, which
restores the high-frequency detail encoder reuse loses. The initial noise is the first step's
sample divided by the scheduler's ``init_noise_sigma``.

:class:`~diffaccel.features.encoder_reuse.EncoderReuse` uses it when
``EncoderReuseConfig.noise_injection > 0``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

from ..errors import UnsupportedCombinationError
from ..seams import wrapped_scheduler_step


class NoiseInjectionState(Protocol):
    """What prior noise injection reads and updates during one pipeline call."""

    scheduler_steps: int
    initial_noise: torch.Tensor | None
    loop_timesteps: torch.Tensor | None
    stats: Any  # has an int ``noise_injections``


def prior_noise_injection(
    state: NoiseInjectionState, scheduler: Any, coefficient: float, below: float
) -> contextlib.AbstractContextManager[None]:
    """Within the block, each ``scheduler.step`` whose next timestep is below ``below *
    num_train_timesteps`` adds ``coefficient * state.initial_noise`` to the step's output.

    Example:
        >>> from types import SimpleNamespace
        >>> from diffusers import DDIMScheduler
        >>> scheduler = DDIMScheduler()
        >>> scheduler.set_timesteps(4)
        >>> state = SimpleNamespace(scheduler_steps=0, initial_noise=None, loop_timesteps=scheduler.timesteps,
        ...                         stats=SimpleNamespace(noise_injections=0))
        >>> with prior_noise_injection(state, scheduler, coefficient=0.1, below=0.5):
        ...     sample = torch.ones(1, 1)
        ...     for t in scheduler.timesteps:
        ...         sample = scheduler.step(torch.zeros(1, 1), t, sample).prev_sample
        >>> state.stats.noise_injections
        2
    """
    threshold = below * scheduler.config.num_train_timesteps
    sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))

    def step(inner: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        index = state.scheduler_steps
        state.scheduler_steps += 1
        if index == 0:
            state.initial_noise = sample.detach().clone() / sigma
        result = inner(model_output, timestep, sample, *args, **kwargs)
        if state.loop_timesteps is None:
            raise UnsupportedCombinationError(
                "prior noise injection could not locate the denoising loop's timesteps in the scheduler"
            )
        if index + 1 >= len(state.loop_timesteps) or float(state.loop_timesteps[index + 1]) >= threshold:
            return result
        state.stats.noise_injections += 1
        added = coefficient * state.initial_noise
        if isinstance(result, tuple):
            return (result[0] + added.to(result[0].dtype), *result[1:])
        result.prev_sample = result.prev_sample + added.to(result.prev_sample.dtype)
        return result

    return wrapped_scheduler_step(scheduler, step)
