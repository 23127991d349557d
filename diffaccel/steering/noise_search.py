"""Noise search (Ma et al., "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising
Steps", 2025): spend a budget of function evaluations looking for a better sample.

* ``"random"``: best of N initial noises, run in batches.
* ``"zero-order"``: neighbours of a pivot noise on the noise sphere; the pivot moves to the best
  neighbour when it improves the reward, a round with no improvement is rejected.
* ``"paths"``: search over paths in one batched call: at every ``branch_every``-th step the
  ``num_paths`` best particles (reward on their predicted x0) are kept and branched to refill the
  batch; the stochastic scheduler's fresh noise makes the branches diverge (needs DDPM, DDIM with
  eta > 0, an SDE DPM-Solver, or, for flow-matching models, :class:`~diffaccel.steering.FlowMatchSDEScheduler`).
* ``"rbf"``: Rollover Budget Forcing for flow models (:mod:`diffaccel.steering.rbf`): one
  trajectory whose every step picks among SDE candidates scored by look-ahead denoiser calls.

The budget counts function evaluations (NFE) as denoising steps times samples (a CFG step counts
once); a method never spends more than ``budget_nfe``; random, zero-order and paths spend
``(budget_nfe // steps) * steps``, RBF the loop's steps plus the look-ahead calls it needed.
``steps`` is what the pipeline's loop executes (measured before sampling, see
:func:`~diffaccel.steering.session.count_loop_steps`): img2img and inpainting run
``int(strength * num_inference_steps)`` steps, so at ``strength=0.5`` a budget buys twice the samples.

Example:
    >>> import torch, diffaccel
    >>> from diffaccel.rewards import FunctionReward
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd")
    >>> brightness = FunctionReward(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    >>> config = diffaccel.NoiseSearchConfig("zero-order", budget_nfe=12, batch_size=2)
    >>> out = diffaccel.search(pipe, "a red circle", config, reward=brightness, num_inference_steps=4)
    >>> out.nfe, len(out.trace), out.image.size
    (12, 3, (64, 64))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..rewards.base import Reward
from .fk import _positive_int, _seed_sde_noise, call_sizes, final_rewards, probe_reward
from .inputs import particle_kwargs
from .media import check_output_type, convert_media, pipeline_media
from .rbf import check_rbf_pipeline, rollover_budget_forcing
from .session import ParticleSession, SessionStats, check_stochastic, count_loop_steps

SEARCH_METHODS = ("random", "zero-order", "paths", "rbf")


@dataclass(frozen=True)
class NoiseSearchConfig:
    """Configuration of a noise search.

    Args:
        method: ``"random"``, ``"zero-order"``, ``"paths"`` or ``"rbf"`` (see the module docs).
        budget_nfe: function evaluations to spend (denoising steps x samples), >= the number of steps.
        batch_size: samples per pipeline call (random search, zero-order neighbours per round; the
            chunk size of the paths call; RBF look-ahead candidates per denoiser call).
        step_size: zero-order: neighbour distance relative to the noise sphere's radius, in (0, 2].
        num_paths: paths: how many particles survive each branching step.
        branch_every: paths: steps between branchings.
        seed: zero-order neighbour directions and the step noise of :class:`FlowMatchSDEScheduler`
            (the initial noise comes from the call's ``generator``).

    Example:
        >>> NoiseSearchConfig("random", budget_nfe=100).batch_size
        4
        >>> NoiseSearchConfig("grid")
        Traceback (most recent call last):
        ...
        ValueError: NoiseSearchConfig.method must be one of ('random', 'zero-order', 'paths', 'rbf'), got 'grid'
    """

    method: str = "random"
    budget_nfe: int = 200
    batch_size: int = 4
    step_size: float = 0.5
    num_paths: int = 2
    branch_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"{owner}.method must be one of {SEARCH_METHODS}, got {self.method!r}")
        for name in ("budget_nfe", "batch_size", "num_paths", "branch_every"):
            _positive_int(owner, name, getattr(self, name))
        _positive_int(owner, "seed", self.seed, minimum=0)
        if not isinstance(self.step_size, (int, float)) or not 0 < self.step_size <= 2:
            raise ValueError(f"{owner}.step_size must be in (0, 2], got {self.step_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchCandidate:
    """One scored sample: the search ``round`` (the branching step for paths), its ``reward``, the NFE
    spent when it was scored, and whether it became the pivot / survived (``accepted``)."""

    round: int
    reward: float
    nfe: int
    accepted: bool = False


@dataclass
class SearchOutput:
    """The best ``sample`` (in the requested ``output_type``), its ``reward`` and initial noise
    (``latents``, reusable as ``latents=``; ``None`` for paths), the ``trace`` of every candidate,
    the ``nfe`` spent, reward evaluations, NaN scores and seconds."""

    sample: Any
    reward: float
    latents: torch.Tensor | None
    trace: list[SearchCandidate]
    nfe: int
    reward_evaluations: int = 0
    nan_scores: int = 0
    seconds: float = 0.0
    stats: list[SessionStats] = field(default_factory=list)

    @property
    def image(self) -> Any:
        """Alias of ``sample`` for image pipelines."""
        return self.sample

    @property
    def frames(self) -> Any:
        """Alias of ``sample`` for video pipelines."""
        return self.sample

    def to_dict(self) -> dict[str, Any]:
        """The trace and totals, for JSON reports."""
        return {
            "reward": self.reward,
            "nfe": self.nfe,
            "reward_evaluations": self.reward_evaluations,
            "nan_scores": self.nan_scores,
            "seconds": self.seconds,
            "trace": [asdict(c) for c in self.trace],
        }


class _Searcher:
    def __init__(
        self, pipe: Any, prompt: str, config: NoiseSearchConfig, reward: Reward, kwargs: dict[str, Any], steps: int
    ):
        self.pipe, self.prompt, self.config, self.reward, self.kwargs = pipe, prompt, config, reward, kwargs
        self.steps = steps  # the loop's executed steps
        self.sizes = call_sizes(pipe, kwargs)
        self.nfe, self.evaluations, self.nan_scores = 0, 0, 0
        self.trace: list[SearchCandidate] = []
        self.sessions: list[SessionStats] = []

    def run_batch(self, count: int, latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count`` full samples (from ``latents`` if given): (media, rewards, initial latents)."""
        session = ParticleSession(self.pipe, self.reward, [self.prompt] * count, lambda n: set(), lambda *a: None, self.sizes)
        call = particle_kwargs(self.kwargs, [self.prompt] * count, count, self.pipe)
        if latents is not None:
            call["latents"] = latents
        restore = _seed_sde_noise(self.pipe.scheduler, self.config.seed * 100_003 + len(self.sessions))
        try:
            media = pipeline_media(session.run(self.pipe, call))
        finally:
            restore()
        rewards = final_rewards(self.reward, media, [self.prompt] * count, None, session.stats)
        self._account(session.stats)
        return media, rewards, session.initial_latents

    def _account(self, stats: SessionStats) -> None:
        self.nfe += stats.nfe
        self.evaluations += stats.reward_evaluations
        self.nan_scores += stats.nan_scores
        self.sessions.append(stats)


def _random(searcher: _Searcher, total: int) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    best: tuple[torch.Tensor, float, torch.Tensor | None] | None = None
    done, round_index = 0, 0
    while done < total:
        count = min(searcher.config.batch_size, total - done)
        media, rewards, latents = searcher.run_batch(count)
        for i in range(count):
            searcher.trace.append(SearchCandidate(round_index, float(rewards[i]), searcher.nfe))
        top = int(torch.argmax(rewards))
        if best is None or float(rewards[top]) > best[1]:
            best = (media[top], float(rewards[top]), latents[top : top + 1])
        done, round_index = done + count, round_index + 1
    for candidate in searcher.trace:
        candidate.accepted = candidate.reward == best[1]
    return best


def _neighbours(pivot: torch.Tensor, count: int, step_size: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` points on the sphere of the pivot's radius, about ``step_size`` x radius away from it."""
    radius = pivot.flatten().norm()
    directions = torch.randn((count, *pivot.shape[1:]), generator=generator, dtype=torch.float32)
    directions = directions / directions.flatten(1).norm(dim=1).view(-1, *[1] * (pivot.ndim - 1)) * radius
    moved = pivot.float().cpu() + step_size * directions
    return (moved / moved.flatten(1).norm(dim=1).view(-1, *[1] * (pivot.ndim - 1)) * radius).to(pivot)


def _zero_order(searcher: _Searcher, total: int) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    media, rewards, latents = searcher.run_batch(1)
    pivot = (media[0], float(rewards[0]), latents[:1])
    searcher.trace.append(SearchCandidate(0, pivot[1], searcher.nfe, accepted=True))
    generator = torch.Generator().manual_seed(searcher.config.seed)
    done, round_index = 1, 1
    while done < total:
        count = min(searcher.config.batch_size, total - done)
        candidates = _neighbours(pivot[2], count, searcher.config.step_size, generator)
        media, rewards, _ = searcher.run_batch(count, candidates)
        top = int(torch.argmax(rewards))
        improved = float(rewards[top]) > pivot[1]
        for i in range(count):
            searcher.trace.append(SearchCandidate(round_index, float(rewards[i]), searcher.nfe, improved and i == top))
        if improved:
            pivot = (media[top], float(rewards[top]), candidates[top : top + 1])
        done, round_index = done + count, round_index + 1
    return pivot


def _paths(searcher: _Searcher, total: int) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    config, pipe = searcher.config, searcher.pipe
    if total < 2:
        raise ValueError("NoiseSearchConfig(method='paths') needs a budget of at least 2 samples (2 x steps NFE)")
    check_stochastic(pipe.scheduler, searcher.kwargs)
    keep = min(config.num_paths, total)
    trace = searcher.trace

    def scoring_steps(num_steps: int) -> set[int]:
        return set(range(0, num_steps - 1, config.branch_every))

    def policy(step: int, is_last: bool, rewards: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(rewards, descending=True, stable=True)[:keep]
        spent = searcher.nfe + (step + 1) * total
        for i in range(total):
            trace.append(SearchCandidate(step, float(rewards[i]), spent, bool((order == i).any())))
        return order[torch.arange(total) % keep]

    session = ParticleSession(
        pipe, searcher.reward, [searcher.prompt] * total, scoring_steps, policy, searcher.sizes, config.batch_size
    )
    restore = _seed_sde_noise(pipe.scheduler, config.seed)
    try:
        output = session.run(pipe, particle_kwargs(searcher.kwargs, [searcher.prompt] * total, total, pipe))
    finally:
        restore()
    media = pipeline_media(output)
    rewards = final_rewards(searcher.reward, media, [searcher.prompt] * total, config.batch_size, session.stats)
    searcher._account(session.stats)
    top = int(torch.argmax(rewards))
    last_round = session.stats.num_steps - 1
    for i in range(total):
        trace.append(SearchCandidate(last_round, float(rewards[i]), searcher.nfe, i == top))
    return media[top], float(rewards[top]), None


def _rbf(searcher: _Searcher, total: int) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    return rollover_budget_forcing(searcher)


_METHODS = {"random": _random, "zero-order": _zero_order, "paths": _paths, "rbf": _rbf}


def _loop_steps(pipe: Any, prompt: str, kwargs: dict[str, Any]) -> int:
    """The steps one sample's loop executes; the probing call draws its noise from a generator of
    its own, so the caller's generator is left untouched."""
    call = dict(particle_kwargs(kwargs, [prompt], 1, pipe), generator=torch.Generator().manual_seed(0))
    steps = count_loop_steps(pipe, call)
    if steps < 1:
        raise ValueError(f"{type(pipe).__name__} runs no denoising steps with these arguments; nothing to search")
    return steps


def search(pipe: Any, prompt: str, config: NoiseSearchConfig, reward: Reward, **kwargs: Any) -> SearchOutput:
    """Search for the sample of ``prompt`` that ``reward`` prefers, within ``config.budget_nfe``.

    ``kwargs`` go to the pipeline call (``num_inference_steps``, ``generator``, sizes, ``output_type``
    ``"pil"``/``"np"``/``"pt"``); works on accelerated pipelines and video pipelines alike.

    Example:
        >>> out = search(pipe, "a cat", NoiseSearchConfig("random", budget_nfe=400), reward=clip)  # doctest: +SKIP
        >>> out.image.save("best.png"); out.reward, out.nfe  # doctest: +SKIP
    """
    if not isinstance(config, NoiseSearchConfig):
        raise TypeError(f"config must be a NoiseSearchConfig, got {type(config).__name__}")
    if not isinstance(prompt, str):
        raise TypeError(f"search takes one prompt (a string), got {type(prompt).__name__}")
    for name in ("num_images_per_prompt", "num_videos_per_prompt", "latents"):
        if name in kwargs:
            raise ValueError(f"search sets {name} itself; do not pass it")
    output_type = check_output_type(kwargs.pop("output_type", "pil"))
    if config.method == "rbf":
        check_rbf_pipeline(pipe)
    probe_reward(reward, pipe, [prompt])
    begin = time.perf_counter()
    steps = _loop_steps(pipe, prompt, kwargs)
    if config.budget_nfe < steps:
        raise ValueError(
            f"NoiseSearchConfig.budget_nfe ({config.budget_nfe}) is smaller than one sample's {steps} denoising steps"
        )
    total = config.budget_nfe // steps
    searcher = _Searcher(pipe, prompt, config, reward, kwargs, steps)
    media, best_reward, latents = _METHODS[config.method](searcher, total)
    return SearchOutput(
        sample=convert_media(media.unsqueeze(0), output_type)[0],
        reward=best_reward,
        latents=latents,
        trace=searcher.trace,
        nfe=searcher.nfe,
        reward_evaluations=searcher.evaluations,
        nan_scores=searcher.nan_scores,
        seconds=time.perf_counter() - begin,
        stats=searcher.sessions,
    )
