"""The state of one noise search (:mod:`diffaccel.steering.noise_search`), shared with the search
methods that live in their own modules (:mod:`diffaccel.steering.rbf`).

Example:
    >>> SearchCandidate(0, 0.5, 4)
    SearchCandidate(round=0, reward=0.5, nfe=4, accepted=False)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..features.checks import check_bool, check_choice, check_int
from ..rewards.base import Reward
from .fk import call_sizes, final_rewards
from .inputs import particle_kwargs
from .media import pipeline_media
from .sde import seed_sde_noise
from .replay import NoiseTape
from .session import ParticleSession, SessionStats

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
        record_noise: draw every candidate's per-step noise from its own seeded generator and return
            the noise tapes that replay any candidate on another pipeline (``SearchOutput.tapes``);
            always on when the search explores on a cheaper pipeline.

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
    record_noise: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "method", self.method, SEARCH_METHODS)
        for name in ("budget_nfe", "batch_size", "num_paths", "branch_every"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "seed", self.seed, minimum=0)
        check_bool(owner, "record_noise", self.record_noise)
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



class Searcher:
    """The state one noise search shares across its pipeline calls: the call, the budget spent
    (``nfe``, reward ``evaluations``, ``nan_scores``), the ``trace`` of scored candidates and each
    call's :class:`~diffaccel.steering.session.SessionStats`."""


    def __init__(
        self, pipe: Any, prompt: str, config: NoiseSearchConfig, reward: Reward, kwargs: dict[str, Any], steps: int
    ):
        self.pipe, self.prompt, self.config, self.reward, self.kwargs = pipe, prompt, config, reward, kwargs
        self.steps = steps  # the loop's executed steps
        self.sizes = call_sizes(pipe, kwargs)
        self.nfe, self.evaluations, self.nan_scores = 0, 0, 0
        self.trace: list[SearchCandidate] = []
        self.sessions: list[SessionStats] = []
        #: with ``record_noise``, the noise tape of each call (candidates replayable elsewhere).
        self.tapes: list[NoiseTape] | None = None

    def new_tape(self) -> NoiseTape | None:
        """A tape for the next call when recording noise (seeded by the search seed and the call's index)."""
        if self.tapes is None:
            return None
        self.tapes.append(NoiseTape(seed=self.config.seed * 100_003 + len(self.tapes)))
        return self.tapes[-1]

    def run_batch(self, count: int, latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count`` full samples (from ``latents`` if given): (media, rewards, initial latents)."""
        tape = self.new_tape()
        session = ParticleSession(self.pipe, self.reward, [self.prompt] * count, lambda n: set(), lambda *a: None,
                                  self.sizes, step_seeds=None if tape is None else tape.step_seed)
        call = particle_kwargs(self.kwargs, [self.prompt] * count, count, self.pipe)
        if latents is not None:
            call["latents"] = latents
        restore = seed_sde_noise(self.pipe.scheduler, self.config.seed * 100_003 + len(self.sessions))
        try:
            media = pipeline_media(session.run(self.pipe, call))
        finally:
            restore()
        if tape is not None:
            tape.record(session)
        rewards = final_rewards(self.reward, media, [self.prompt] * count, None, session.stats)
        self._account(session.stats)
        return media, rewards, session.initial_latents

    def _account(self, stats: SessionStats) -> None:
        self.nfe += stats.nfe
        self.evaluations += stats.reward_evaluations
        self.nan_scores += stats.nan_scores
        self.sessions.append(stats)
