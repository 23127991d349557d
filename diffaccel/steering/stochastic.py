"""Stochastic sampling for resampling and branching: the scheduler swap FK steering and noise search
make so that particles can differ after a resampling (see :func:`stochastic_call`)."""

from __future__ import annotations

from typing import Any


def stochastic_call(pipe: Any) -> dict[str, Any]:
    """Make ``pipe``'s sampling stochastic for resampling and branching; returns extra call arguments.

    Flow-matching schedulers become :class:`~diffaccel.steering.FlowMatchSDEScheduler`, DDIM gets
    ``eta=1`` (CogVideoX's DDIM, which ignores eta, becomes its DPM scheduler), other diffusion
    schedulers become DDPM.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> pipe = tiny_pipeline("flux")
        >>> stochastic_call(pipe), type(pipe.scheduler).__name__
        ({}, 'FlowMatchSDEScheduler')
    """
    from diffusers import DDPMScheduler

    from .sde import FlowMatchSDEScheduler

    name = type(pipe.scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config)
        return {}
    if name == "CogVideoXDDIMScheduler":
        from diffusers import CogVideoXDPMScheduler

        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
        return {"eta": 1.0}
    if "DDIM" in name:
        return {"eta": 1.0}
    if name not in ("DDPMScheduler", "FlowMatchSDEScheduler") and "betas" in dir(pipe.scheduler):
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return {}
