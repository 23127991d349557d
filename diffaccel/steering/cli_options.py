"""``diffaccel generate`` options for FK steering (``--particles``) and noise search (``--search``).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_steering_arguments(parser)
    >>> parser.parse_args(["--particles", "4"]).particles
    4
"""

from __future__ import annotations

import argparse
from typing import Any

from ..cli_types import fraction, non_negative_int, positive_int
from ..rewards.base import Reward
from .noise_search import SEARCH_METHODS

#: ``--reward`` forms; the default needs no weights (it parses ShapeWorld captions).
REWARD_HELP = (
    "shapeworld (default; ShapeWorld captions), shapeworld-layout (colors and positions only), "
    "clip:MODEL[:PRETRAINED] (open_clip), "
    "transformers-clip:FOLDER (e.g. micro-CLIP), aesthetic:HEAD.safetensors"
)


def add_steering_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--particles``, ``--search`` and their options to ``parser``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--particles", type=positive_int, default=None, metavar="K", help="FK steering with K particles")
    group.add_argument("--search", choices=SEARCH_METHODS, default=None, help="noise search method")
    parser.add_argument("--reward", default="shapeworld", help=f"steering/search reward: {REWARD_HELP}")
    parser.add_argument("--budget", type=positive_int, default=None, metavar="NFE", help="search budget (default: 4 x steps)")
    parser.add_argument("--potential", choices=("max", "difference", "sum", "immediate"), default="max")
    parser.add_argument("--lmbda", type=float, default=10.0, help="FK potential inverse temperature")
    parser.add_argument("--resample-every", type=non_negative_int, default=5, help="FK: steps between resamplings (0: off)")
    parser.add_argument("--resample-start", type=non_negative_int, default=0, metavar="STEP",
                        help="FK: first step (0-based) that may resample; start where the reward of x0 becomes "
                             "predictive (bench/fk_predictiveness.py)")
    parser.add_argument("--ess-threshold", type=fraction, default=None, metavar="F",
                        help="FK: resample only when the effective sample size falls below F x K")


def make_reward(spec: str, device: str = "cpu") -> Reward:
    """Build a reward from a ``--reward`` string (see :data:`REWARD_HELP`).

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
    raise SystemExit(f"--reward: unknown reward {spec!r}; use {REWARD_HELP}")


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


def run_steering(args: argparse.Namespace, pipe: Any, call: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``--particles`` or ``--search`` for ``diffaccel generate``; print and return (best image, stats)."""
    from .fk import FKSteeringConfig, steer
    from .noise_search import NoiseSearchConfig, search

    reward = make_reward(args.reward, str(pipe.device))
    call = dict(call, **stochastic_call(pipe))
    if args.particles is not None:
        config = FKSteeringConfig(
            num_particles=args.particles, potential=args.potential, lmbda=args.lmbda, resample_every=args.resample_every,
            resample_start=args.resample_start, ess_threshold=args.ess_threshold,
        )
        out = steer(pipe, config, reward)(args.prompt, **call)
        best = out.best_indices[0]
        print(f"FK steering: {args.particles} particles, resampled at steps {out.stats.resampled_steps}, NFE {out.stats.nfe}")
        print(f"rewards ({reward.name}): {[round(float(r), 4) for r in out.rewards]}, best particle {best}")
        if out.stats.nan_scores:
            print(f"NaN rewards (counted as the worst): {out.stats.nan_scores}")
        return out.images[best], {"method": "fk", "config": config.to_dict(), **out.stats.to_dict(),
                                  "rewards": out.rewards.tolist()}
    config = NoiseSearchConfig(args.search, budget_nfe=args.budget or 4 * args.steps)
    out = search(pipe, args.prompt, config, reward, **call)
    print(f"{args.search} search: {len(out.trace)} candidates scored, NFE {out.nfe}/{config.budget_nfe}")
    print(f"best reward ({reward.name}): {out.reward:.4f}")
    return out.image, {"method": args.search, "config": config.to_dict(), **out.to_dict()}
