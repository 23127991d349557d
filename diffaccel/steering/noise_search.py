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
:func:`~diffaccel.seams.count_loop_steps`): img2img and inpainting run
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

from ..errors import UnsupportedCombinationError
from ..rewards.base import Reward
from ..seams import count_loop_steps
from .fk import final_rewards, probe_reward
from .inputs import particle_kwargs
from .media import check_output_type, convert_media, pipeline_media
from .rbf import check_rbf_pipeline, rollover_budget_forcing
from .replay import NoiseTape, check_explore_pipe, render_exact
from .sde import seed_sde_noise
from .searcher import NoiseSearchConfig, SearchCandidate, Searcher
from .session import ParticleSession, SessionStats, check_stochastic


@dataclass
class SearchOutput:
    """The best ``sample`` (in the requested ``output_type``), its ``reward`` and initial noise
    (``latents``, reusable as ``latents=``; ``None`` for paths), the ``trace`` of every candidate,
    the ``nfe`` spent, reward evaluations, NaN scores and seconds. Explored on a cheaper pipeline: the
    winner rendered on the exact one (``exact_sample``, ``exact_reward``), every call's noise ``tapes``
    and the winner's place in them (``winner``: call index, slot), which replay any candidate
    (:func:`~diffaccel.steering.replay.render_exact`)."""

    sample: Any
    reward: float
    latents: torch.Tensor | None
    trace: list[SearchCandidate]
    nfe: int
    reward_evaluations: int = 0
    nan_scores: int = 0
    seconds: float = 0.0
    stats: list[SessionStats] = field(default_factory=list)
    exact_sample: Any = None
    exact_reward: float | None = None
    tapes: list[NoiseTape] | None = None
    winner: tuple[int, int] | None = None

    @property
    def image(self) -> Any:
        """Alias of ``sample`` for image pipelines."""
        return self.sample

    @property
    def frames(self) -> Any:
        """Alias of ``sample`` for video pipelines."""
        return self.sample

    def summary(self, method: str, budget_nfe: int) -> str:
        """The candidates scored and the NFE spent of ``budget_nfe``, as ``diffaccel generate --search``
        prints them.

        Example:
            >>> SearchOutput(None, 0.5, None, [SearchCandidate(0, 0.5, 4)], nfe=4).summary("random", 8)
            'random search: 1 candidates scored, NFE 4/8'
        """
        return f"{method} search: {len(self.trace)} candidates scored, NFE {self.nfe}/{budget_nfe}"

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


#: A method's result: the best media, its reward, its initial noise (``None`` for paths) and where it
#: was sampled (the index of the search's call, the slot in it).
Found = tuple[torch.Tensor, float, "torch.Tensor | None", tuple[int, int]]


def _random(searcher: Searcher, total: int) -> Found:
    best: Found | None = None
    done, round_index = 0, 0
    while done < total:
        count = min(searcher.config.batch_size, total - done)
        media, rewards, latents = searcher.run_batch(count)
        for i in range(count):
            searcher.trace.append(SearchCandidate(round_index, float(rewards[i]), searcher.nfe))
        top = int(torch.argmax(rewards))
        if best is None or float(rewards[top]) > best[1]:
            best = (media[top], float(rewards[top]), latents[top : top + 1], (len(searcher.sessions) - 1, top))
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


def _zero_order(searcher: Searcher, total: int) -> Found:
    media, rewards, latents = searcher.run_batch(1)
    pivot = (media[0], float(rewards[0]), latents[:1], (0, 0))
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
            pivot = (media[top], float(rewards[top]), candidates[top : top + 1], (len(searcher.sessions) - 1, top))
        done, round_index = done + count, round_index + 1
    return pivot


def _paths(searcher: Searcher, total: int) -> Found:
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

    tape = searcher.new_tape()
    session = ParticleSession(
        pipe, searcher.reward, [searcher.prompt] * total, scoring_steps, policy, searcher.sizes, config.batch_size,
        step_seeds=None if tape is None else tape.step_seed,
    )
    restore = seed_sde_noise(pipe.scheduler, config.seed)
    try:
        output = session.run(pipe, particle_kwargs(searcher.kwargs, [searcher.prompt] * total, total, pipe))
    finally:
        restore()
    media = pipeline_media(output)
    if tape is not None:
        tape.record(session)
    rewards = final_rewards(searcher.reward, media, [searcher.prompt] * total, config.batch_size, session.stats)
    searcher._account(session.stats)
    top = int(torch.argmax(rewards))
    last_round = session.stats.num_steps - 1
    for i in range(total):
        trace.append(SearchCandidate(last_round, float(rewards[i]), searcher.nfe, i == top))
    return media[top], float(rewards[top]), None, (len(searcher.sessions) - 1, top)


def _rbf(searcher: Searcher, total: int) -> Found:
    return (*rollover_budget_forcing(searcher), (-1, 0))


_METHODS = {"random": _random, "zero-order": _zero_order, "paths": _paths, "rbf": _rbf}


def _loop_steps(pipe: Any, prompt: str, kwargs: dict[str, Any]) -> int:
    """The steps one sample's loop executes; the probing call draws its noise from a generator of
    its own, so the caller's generator is left untouched."""
    call = dict(particle_kwargs(kwargs, [prompt], 1, pipe), generator=torch.Generator().manual_seed(0))
    steps = count_loop_steps(pipe, call)
    if steps < 1:
        raise ValueError(f"{type(pipe).__name__} runs no denoising steps with these arguments; nothing to search")
    return steps


def search(pipe: Any, prompt: str, config: NoiseSearchConfig, reward: Reward, *, explore_pipe: Any = None,
           **kwargs: Any) -> SearchOutput:
    """Search for the sample of ``prompt`` that ``reward`` prefers, within ``config.budget_nfe``.

    ``kwargs`` go to the pipeline call (``num_inference_steps``, ``generator``, sizes, ``output_type``
    ``"pil"``/``"np"``/``"pt"``); works on accelerated pipelines and video pipelines alike.

    With ``explore_pipe`` (a cheaper copy of ``pipe``, e.g. :func:`~diffaccel.steering.replay.cheap_copy`),
    the search runs there, within the budget, and only the winner is rendered on ``pipe`` from the
    same initial noise and per-step noise (``exact_sample``; its ``steps`` NFE are not in ``nfe``).

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
    exact_pipe, pipe = pipe, pipe if explore_pipe is None else explore_pipe
    if config.method == "rbf":
        check_rbf_pipeline(pipe)
    if explore_pipe is not None or config.record_noise:
        if config.method == "rbf":
            raise UnsupportedCombinationError("RBF picks among look-ahead candidates at every step: its noise is not "
                                              "recorded, so it cannot explore on a cheaper pipeline and replay; use "
                                              "random, zero-order or paths")
    if explore_pipe is not None:
        check_explore_pipe(exact_pipe, explore_pipe, kwargs)
    probe_reward(reward, pipe, [prompt])
    begin = time.perf_counter()
    steps = _loop_steps(pipe, prompt, kwargs)
    if config.budget_nfe < steps:
        raise ValueError(
            f"NoiseSearchConfig.budget_nfe ({config.budget_nfe}) is smaller than one sample's {steps} denoising steps"
        )
    total = config.budget_nfe // steps
    searcher = Searcher(pipe, prompt, config, reward, kwargs, steps)
    if explore_pipe is not None or config.record_noise:
        searcher.tapes = []
    media, best_reward, latents, winner = _METHODS[config.method](searcher, total)
    exact: dict[str, Any] = {"tapes": searcher.tapes, "winner": winner if searcher.tapes is not None else None}
    if explore_pipe is not None:
        rendered = render_exact(exact_pipe, [prompt], [searcher.tapes[winner[0]]], [winner[1]], kwargs)
        exact_reward = final_rewards(reward, rendered, [prompt], None, SessionStats())
        exact.update(exact_sample=convert_media(rendered, output_type)[0], exact_reward=float(exact_reward[0]))
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
        **exact,
    )
