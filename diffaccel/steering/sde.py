"""Stochastic sampling for flow-matching models (Flux, SD3, Wan, LTX).

:class:`FlowMatchSDEScheduler` is ``FlowMatchEulerDiscreteScheduler`` with noise: each step is the
Euler step plus a correction that keeps the marginals of the flow's probability path, so particles
can be resampled (FK steering) and branched (noise search). With ``noise_level=0`` the correction is
exactly zero and the scheduler reproduces ``FlowMatchEulerDiscreteScheduler`` bit for bit.

Writing the step at ``sigma`` -> ``sigma_next`` with the model's velocity ``v``, the predictions
``x0 = x - sigma v`` and ``eps = x + (1 - sigma) v``:

* ``interpolant="linear"`` (the linear path itself): Euler-Maruyama on the reverse SDE
  ``dx = [v - g^2/2 * score] dt + g dw`` with ``score = -eps / sigma`` and ``g = noise_level * sigma``;
  ``x_next = euler - h g^2 / (2 sigma) eps + g sqrt(h) z`` with ``h = sigma - sigma_next``.
* ``interpolant="vp"`` (the RBF paper's conversion to the variance-preserving interpolant with the
  same signal-to-noise ratio): the DDPM posterior step of that VP process, mapped back,
  ``x_next = euler + (sqrt(sigma_next^2 - eta^2) - sigma_next) eps + eta z`` with
  ``eta = noise_level * sigma_next * sqrt(1 - r^2)``, ``r = (alpha sigma_next) / (alpha_next sigma)``,
  ``alpha = 1 - sigma`` (``noise_level=1`` is DDPM's posterior, which is the same in both
  parametrizations).

Example:
    >>> import torch
    >>> from diffusers import FlowMatchEulerDiscreteScheduler
    >>> sde = FlowMatchSDEScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, noise_level=0.5)
    >>> sde.set_timesteps(4)
    >>> out = sde.step(torch.zeros(1, 4), sde.timesteps[0], torch.ones(1, 4), generator=torch.Generator().manual_seed(0))
    >>> out.prev_sample.shape, out.pred_original_sample.shape
    (torch.Size([1, 4]), torch.Size([1, 4]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

INTERPOLANTS = ("linear", "vp")


def is_flow_matching(scheduler: Any) -> bool:
    """Whether ``scheduler`` samples a flow-matching model (velocity prediction on ``sigma``
    interpolants), the only models :class:`FlowMatchSDEScheduler` applies to.

    Example:
        >>> from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
        >>> is_flow_matching(FlowMatchEulerDiscreteScheduler()), is_flow_matching(DDPMScheduler())
        (True, False)
    """
    config = scheduler.config
    return (
        "FlowMatch" in type(scheduler).__name__
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") == "flow_prediction"
    )


@dataclass
class FlowMatchSDESchedulerOutput(BaseOutput):
    """``prev_sample`` and the step's clean-sample prediction ``pred_original_sample``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class FlowMatchSDEScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` turned into a marginal-preserving SDE sampler (see module docs).

    Args (beyond the Euler scheduler's):
        noise_level: 0 gives the Euler ODE exactly; larger values add more noise (``vp``: 1 is DDPM).
        interpolant: ``"linear"`` or ``"vp"``.

    The pipelines do not pass a ``generator`` to ``step``: set one with :meth:`set_noise_generator`
    for reproducible noise (steering and search do).
    """

    _compatibles = [FlowMatchEulerDiscreteScheduler.__name__]  # noqa: RUF012  (diffusers' convention)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        noise_level: float = 0.7,
        interpolant: str = "vp",
    ) -> None:
        if not (isinstance(noise_level, (int, float)) and 0.0 <= noise_level <= 10.0):
            raise ValueError(f"FlowMatchSDEScheduler.noise_level must be in [0, 10], got {noise_level!r}")
        if interpolant not in INTERPOLANTS:
            raise ValueError(f"FlowMatchSDEScheduler.interpolant must be one of {INTERPOLANTS}, got {interpolant!r}")
        if stochastic_sampling:
            raise ValueError("FlowMatchSDEScheduler adds its own noise: stochastic_sampling must be False")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )
        self.noise_generator: torch.Generator | None = None

    def set_noise_generator(self, generator: torch.Generator | None) -> None:
        """Draw the step noise from ``generator`` when ``step`` is not given one."""
        self.noise_generator = generator

    def _noise_terms(self, sigma: float, sigma_next: float) -> tuple[float, float]:
        """Coefficients ``(c_eps, c_z)``: ``x_next = euler + c_eps * eps + c_z * z``."""
        level = float(self.config.noise_level)
        if level == 0.0 or sigma <= 0.0:
            return 0.0, 0.0
        if self.config.interpolant == "linear":
            h = sigma - sigma_next
            g = level * sigma
            return -h * g * g / (2.0 * sigma), g * math.sqrt(max(h, 0.0))
        alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
        ratio = (alpha * sigma_next) / (alpha_next * sigma) if alpha_next > 0 else 1.0
        eta = min(level * sigma_next * math.sqrt(max(0.0, 1.0 - ratio * ratio)), sigma_next)
        return math.sqrt(max(sigma_next * sigma_next - eta * eta, 0.0)) - sigma_next, eta

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        *args: Any,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> FlowMatchSDESchedulerOutput | tuple:
        """The Euler step plus the SDE correction; also returns ``pred_original_sample``."""
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        euler = super().step(model_output, timestep, sample, *args, generator=generator, return_dict=False, **kwargs)[0]
        x, v = sample.to(torch.float32), model_output.to(torch.float32)
        x0 = x - sigma * v
        c_eps, c_z = self._noise_terms(sigma, sigma_next)
        prev_sample = euler
        if c_eps != 0.0 or c_z != 0.0:
            eps = x + (1.0 - sigma) * v
            noise = randn_tensor(
                x.shape, generator=generator or self.noise_generator, device=x.device, dtype=torch.float32
            )
            prev_sample = (euler.to(torch.float32) + c_eps * eps + c_z * noise).to(euler.dtype)
        x0 = x0.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, x0)
        return FlowMatchSDESchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


def seed_sde_noise(scheduler: Any, seed: int) -> Callable[[], None]:
    """Seed :class:`FlowMatchSDEScheduler`'s step noise for a call (unless the user set a generator,
    or ``scheduler`` has no step noise to seed); returns the function that undoes it.

    Example:
        >>> scheduler = FlowMatchSDEScheduler()
        >>> restore = seed_sde_noise(scheduler, 0)
        >>> scheduler.noise_generator is not None
        True
        >>> restore()
        >>> scheduler.noise_generator is None
        True
    """
    if not hasattr(scheduler, "set_noise_generator") or scheduler.noise_generator is not None:
        return lambda: None
    scheduler.set_noise_generator(torch.Generator().manual_seed(seed))
    return lambda: scheduler.set_noise_generator(None)
