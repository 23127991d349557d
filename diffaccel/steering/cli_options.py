"""What ``diffaccel generate --particles K`` and ``--search METHOD`` run (the options themselves are
defined in :func:`diffaccel.cli.add_steering_arguments`, so parsing them imports no torch).

Example:
    >>> import argparse
    >>> args = argparse.Namespace(particles=4, search=None, potential="max", lmbda=10.0, resample_every=5,
    ...                           resample_start=0, ess_threshold=None, reward="shapeworld")
    >>> config, reward = make_steering(args, "cpu")
    >>> config.num_particles, reward.name
    (4, 'shapeworld')
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..cli_types import REWARD_HELP, fail

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..rewards.base import Reward


def make_reward(spec: str, device: str = "cpu") -> Reward:
    """Build a reward from a ``--reward`` string (see :data:`~diffaccel.cli_types.REWARD_HELP`).

    Example:
        >>> make_reward("shapeworld").name, make_reward("shapeworld-layout").name
        ('shapeworld', 'shapeworld-layout')
    """
    from ..rewards import AestheticReward, CLIPScoreReward, ShapeWorldReward

    kind, _, rest = spec.partition(":")
    if kind == "shapeworld" and not rest:
        return ShapeWorldReward()
    if kind == "shapeworld-layout" and not rest:
        return ShapeWorldReward(shapes=False)
    if kind == "clip" and rest:
        model, _, pretrained = rest.partition(":")
        return CLIPScoreReward.from_open_clip(model, pretrained=pretrained or "openai", device=device)
    if kind == "transformers-clip" and rest:
        return CLIPScoreReward.from_transformers(rest, device=device)
    if kind == "aesthetic" and rest:
        return AestheticReward.from_open_clip(rest, device=device)
    fail(f"--reward: unknown reward {spec!r}; use {REWARD_HELP}")


def make_steering(args: argparse.Namespace, device: str) -> tuple[Any, Reward]:
    """The FK or noise-search config and the reward of ``args``, built before the pipeline loads;
    a value they refuse, or a reward model that cannot load, is a one-line error."""
    from .fk import FKSteeringConfig
    from .noise_search import NoiseSearchConfig

    try:
        if args.particles is not None:
            config: Any = FKSteeringConfig(
                num_particles=args.particles, potential=args.potential, lmbda=args.lmbda,
                resample_every=args.resample_every, resample_start=args.resample_start,
                ess_threshold=args.ess_threshold,
            )
        else:
            config = NoiseSearchConfig(args.search, budget_nfe=args.budget)
    except ValueError as err:
        fail(str(err))
    try:
        reward = make_reward(args.reward, device)
    except (OSError, RuntimeError, ValueError) as err:
        fail(f"--reward {args.reward}: {' '.join(str(err).split())}")
    return config, reward


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


def run_steering(args: argparse.Namespace, pipe: Any, call: dict[str, Any], config: Any, reward: Reward
                 ) -> tuple[Any, dict[str, Any]]:
    """Run ``--particles`` or ``--search`` (``config`` and ``reward`` from :func:`make_steering`) for
    ``diffaccel generate``; print and return (best image, stats)."""
    from .fk import steer
    from .noise_search import search

    call = dict(call, **stochastic_call(pipe))
    if args.particles is not None:
        out = steer(pipe, config, reward)(args.prompt, **call)
        best = out.best_indices[0]
        print(f"FK steering: {args.particles} particles, resampled at steps {out.stats.resampled_steps}, NFE {out.stats.nfe}")
        print(f"rewards ({reward.name}): {[round(float(r), 4) for r in out.rewards]}, best particle {best}")
        if out.stats.nan_scores:
            print(f"NaN rewards (counted as the worst): {out.stats.nan_scores}")
        return out.images[best], {"method": "fk", "config": config.to_dict(), **out.stats.to_dict(),
                                  "rewards": out.rewards.tolist()}
    out = search(pipe, args.prompt, config, reward, **call)
    print(f"{args.search} search: {len(out.trace)} candidates scored, NFE {out.nfe}/{config.budget_nfe}")
    print(f"best reward ({reward.name}): {out.reward:.4f}")
    return out.image, {"method": args.search, "config": config.to_dict(), **out.to_dict()}
