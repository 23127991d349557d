"""``diffaccel generate --particles K`` and ``--search METHOD``: the options (declaring them imports
no torch) and what they run.

Example:
    >>> import argparse
    >>> args = argparse.Namespace(particles=4, search=None, potential="max", lmbda=10.0, resample_every=2,
    ...                           resample_start=12, ess_threshold=0.5, reward="shapeworld", steps=20)
    >>> config, reward = make_steering(args, "cpu")
    >>> config.num_particles, reward.name
    (4, 'shapeworld')
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .checks import REWARD_HELP, fail, fraction, non_negative_int, positive_int, reward_spec

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..rewards.base import Reward

#: ``diffaccel.steering.SEARCH_METHODS`` (a test keeps them equal), here so parsing needs no torch.
SEARCH_METHODS = ("random", "zero-order", "paths", "rbf")
#: Search methods for flow-matching models only.
FLOW_SEARCH_METHODS = ("rbf",)
#: The steering options' defaults; they are None when not given, so an ignored one can be told. FK's
#: are :meth:`~diffaccel.FKSteeringConfig.measured` (the settings measured best on micro-SD), whose
#: first resampling step is 60% of ``--steps`` (filled in by :func:`fill_steering_defaults`).
STEERING_DEFAULTS = {"reward": "shapeworld", "potential": "max", "lmbda": 10.0, "resample_every": 2,
                     "ess_threshold": 0.5}
#: Steering options that only act with another one: option -> (the flags that enable it).
STEERING_NEEDS = {
    "reward": ("particles", "search"),
    "budget": ("search",),
    **dict.fromkeys(("potential", "lmbda", "resample_every", "resample_start", "ess_threshold"), ("particles",)),
}


def add_steering_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--particles``, ``--search`` and their options to ``parser``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_steering_arguments(parser)
        >>> parser.parse_args(["--particles", "4"]).particles
        4
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--particles", type=positive_int, default=None, metavar="K", help="FK steering with K particles")
    group.add_argument("--search", choices=SEARCH_METHODS, default=None,
                       help="noise search method (rbf: flow-matching models only, e.g. Flux, SD3, Wan, "
                            "and without --encoder-reuse/--quantize/--delta-cache)")
    parser.add_argument("--reward", type=reward_spec, default=None,
                        help=f"steering/search reward: {REWARD_HELP}")
    parser.add_argument("--budget", type=positive_int, default=None, metavar="NFE",
                        help="search budget (default: 4 x steps; paths: at least 2 x steps)")
    parser.add_argument("--potential", choices=("max", "difference", "sum", "immediate"), default=None,
                        help="FK potential (default: max)")
    parser.add_argument("--lmbda", type=float, default=None, help="FK potential inverse temperature (default: 10)")
    parser.add_argument("--resample-every", type=non_negative_int, default=None,
                        help="FK: steps between resamplings (default: 2; 0: off)")
    parser.add_argument("--resample-start", type=non_negative_int, default=None, metavar="STEP",
                        help="FK: first step (0-based) that may resample (default: 60%% of --steps, where the reward "
                             "of x0 becomes predictive: bench/fk_predictiveness.py)")
    parser.add_argument("--ess-threshold", type=fraction_or_off, default=None, metavar="F",
                        help="FK: resample only when the effective sample size falls below F x K (default: 0.5; "
                             "off: at every resampling step)")


def fraction_or_off(text: str) -> float | str:
    """``--ess-threshold``: a float in (0, 1], or ``off``.

    Example:
        >>> fraction_or_off("0.5"), fraction_or_off("off")
        (0.5, 'off')
    """
    return "off" if text == "off" else fraction(text)


def fill_steering_defaults(args: argparse.Namespace) -> None:
    """Set the steering options not given to :data:`STEERING_DEFAULTS` (and ``--resample-start`` to
    60% of ``--steps``)."""
    for name, value in STEERING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.resample_start is None:
        args.resample_start = round(0.6 * args.steps)


def check_search(args: argparse.Namespace) -> None:
    """``--search``'s budget covers its samples; RBF runs on a plain pipeline. Sets the default budget."""
    if args.search is None:
        return
    args.budget = args.budget or 4 * args.steps
    samples = 2 if args.search == "paths" else 1
    if args.budget < samples * args.steps:
        fail(f"--budget {args.budget}: --search {args.search} needs at least {samples} x --steps = "
             f"{samples * args.steps} NFE")
    features = [flag for flag, value in (("--encoder-reuse", args.encoder_reuse), ("--quantize", args.quantize),
                                         ("--delta-cache", args.delta_cache)) if value is not None]
    if args.search in FLOW_SEARCH_METHODS and features:
        fail(f"--search {args.search} runs look-ahead denoiser calls that cannot go with {', '.join(features)}")


def make_reward(spec: str, device: str = "cpu") -> Reward:
    """Build a reward from a ``--reward`` string (see :data:`~diffaccel.rewards.spec.REWARD_HELP`) with
    :func:`~diffaccel.rewards.reward_from_spec`; an unknown kind is a one-line error.

    Example:
        >>> make_reward("shapeworld").name, make_reward("shapeworld-layout").name
        ('shapeworld', 'shapeworld-layout')
        >>> make_reward("nosuch")
        Traceback (most recent call last):
        ...
        SystemExit: diffaccel: error: --reward: unknown reward 'nosuch'; use shapeworld (default; ...
    """
    from ..rewards.spec import RewardSpecError, reward_from_spec

    try:
        return reward_from_spec(spec, device)
    except RewardSpecError as err:
        fail(f"--reward: {err}")


def make_steering(args: argparse.Namespace, device: str) -> tuple[Any, Reward]:
    """The FK or noise-search config and the reward of ``args``, built before the pipeline loads;
    a value they refuse, or a reward model that cannot load, is a one-line error."""
    from ..steering.fk import FKSteeringConfig
    from ..steering.noise_search import NoiseSearchConfig

    try:
        if args.particles is not None:
            config: Any = FKSteeringConfig.measured(
                args.particles, args.steps, potential=args.potential, lmbda=args.lmbda,
                resample_every=args.resample_every, resample_start=args.resample_start,
                ess_threshold=None if args.ess_threshold == "off" else args.ess_threshold,
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


def run_steering(args: argparse.Namespace, pipe: Any, call: dict[str, Any], config: Any, reward: Reward
                 ) -> tuple[Any, dict[str, Any]]:
    """Run ``--particles`` or ``--search`` (``config`` and ``reward`` from :func:`make_steering`) for
    ``diffaccel generate``; print and return (best image, stats)."""
    from ..steering.fk import steer
    from ..steering.noise_search import search
    from ..steering.stochastic import stochastic_call

    call = dict(call, **stochastic_call(pipe))
    if args.particles is not None:
        out = steer(pipe, config, reward)(args.prompt, **call)
        best = out.best_indices[0]
        print(out.stats.summary())
        print(f"rewards ({reward.name}): {[round(float(r), 4) for r in out.rewards]}, best particle {best}")
        return out.images[best], {"method": "fk", "config": config.to_dict(), **out.stats.to_dict(),
                                  "rewards": out.rewards.tolist()}
    out = search(pipe, args.prompt, config, reward, **call)
    print(out.summary(args.search, config.budget_nfe))
    print(f"best reward ({reward.name}): {out.reward:.4f}")
    return out.image, {"method": args.search, "config": config.to_dict(), **out.to_dict()}
