"""Feynman-Kac steering (Singhal et al., "A General Framework for Inference-time Scaling and
Steering of Diffusion Models", 2025): ``k`` particles per prompt run as the batch of one pipeline
call and are resampled at intermediate steps by potentials of a reward on their predicted x0.

Example:
    >>> import torch, diffaccel
    >>> from diffaccel.rewards import FunctionReward
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd", scheduler="ddpm")
    >>> brightness = FunctionReward(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    >>> steering = diffaccel.steer(pipe, diffaccel.FKSteeringConfig(num_particles=2, resample_every=2), reward=brightness)
    >>> out = steering("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    >>> len(out.images), out.rewards.shape, out.stats.resampled_steps
    (2, torch.Size([2]), [0, 2, 3])
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..features.checks import check_bool, check_choice, check_int
from ..rewards.base import Reward, check_scores, nan_to_worst
from .inputs import particle_kwargs
from .latents import call_default
from .lookahead import LookaheadRollout, check_rollout_pipe
from .media import check_output_type, convert_media, gray_media, pipeline_media
from .replay import NoiseTape, check_explore_pipe, render_exact
from .resampling import (
    POTENTIALS,
    RESAMPLING_METHODS,
    PotentialState,
    effective_sample_size,
    resample_indices,
)
from .sde import seed_sde_noise
from .session import ParticleSession, SessionStats, check_stochastic


@dataclass(frozen=True)
class FKSteeringConfig:
    """Configuration of FK steering.

    Args:
        num_particles: ``k`` particles per prompt (the batch of one call), >= 1.
        potential: ``"max"``, ``"difference"``, ``"sum"`` or ``"immediate"`` (the paper's potentials).
        lmbda: the potentials' inverse temperature lambda (>= 0; 0 weighs all particles equally).
        resample_every: score and resample at every n-th step from ``resample_start``; 0 turns
            intermediate resampling off. Rewards are only computed at these steps (the stride).
        resample_start, resample_end: first and last step index (0-based) that may resample;
            ``resample_end=None`` is the second-to-last step. Resampling on steps where the reward
            of x0 says little about the final reward only spends diversity: with best-sample
            selection, start where it becomes predictive (``bench/fk_predictiveness.py`` measures
            it; on micro-SD at 20 steps, about step 12) and set ``ess_threshold``.
        resampling: ``"multinomial"`` or ``"systematic"``.
        ess_threshold: adaptive resampling: resample only when the effective sample size falls
            below ``ess_threshold * k`` (in (0, 1]); ``None`` resamples at every scheduled step.
        final_correction: after the last step, resample once more with weights
            ``exp(lambda r(x0)) / prod(potentials)`` so the target is ``p(x0) exp(lambda r(x0))``.
            It samples that target; when only the best particle is kept it can only drop candidates.
        max_batch: run the denoiser, VAE and reward on at most this many particles at once
            (same results, less memory); ``None``: all at once.
        seed: seeds the resampling draws (and the noise of :class:`FlowMatchSDEScheduler`).
        lookahead_steps: score each particle by the reward of a deterministic rollout of this many
            denoiser evaluations to t = 0 from its current state (a look-ahead potential, see
            :mod:`diffaccel.steering.lookahead`) instead of its one-step x0 prediction; 0 keeps
            the x0 potential. Every rollout evaluation counts in ``stats.nfe``.
        record_noise: draw each particle slot's per-step noise from its own seeded generator and
            return the noise tape (``out.tape``) that replays any particle on another pipeline
            (:func:`~diffaccel.steering.replay.render_exact`); always on with an ``explore_pipe``.
            Off, the step noise comes from the call's ``generator`` (one particle is then exactly
            the untouched pipeline's sample).

    Example:
        >>> FKSteeringConfig(num_particles=4, potential="difference").lmbda
        10.0
        >>> FKSteeringConfig(num_particles=0)
        Traceback (most recent call last):
        ...
        ValueError: FKSteeringConfig.num_particles must be an int >= 1, got 0
    """

    num_particles: int = 4
    potential: str = "max"
    lmbda: float = 10.0
    resample_every: int = 5
    resample_start: int = 0
    resample_end: int | None = None
    resampling: str = "systematic"
    ess_threshold: float | None = None
    final_correction: bool = True
    max_batch: int | None = None
    seed: int = 0
    lookahead_steps: int = 0
    record_noise: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "num_particles", self.num_particles)
        check_choice(owner, "potential", self.potential, POTENTIALS)
        if not isinstance(self.lmbda, (int, float)) or not self.lmbda >= 0 or self.lmbda == float("inf"):
            raise ValueError(f"{owner}.lmbda must be a finite number >= 0, got {self.lmbda!r}")
        check_int(owner, "resample_every", self.resample_every, minimum=0)
        check_int(owner, "resample_start", self.resample_start, minimum=0)
        check_int(owner, "resample_end", self.resample_end, minimum=0, optional=True)
        if self.resample_end is not None and self.resample_start > self.resample_end:
            raise ValueError(
                f"{owner}.resample_start ({self.resample_start}) must not be after resample_end ({self.resample_end})"
            )
        check_choice(owner, "resampling", self.resampling, RESAMPLING_METHODS)
        if self.ess_threshold is not None and not (
            isinstance(self.ess_threshold, (int, float)) and 0 < self.ess_threshold <= 1
        ):
            raise ValueError(f"{owner}.ess_threshold must be None or in (0, 1], got {self.ess_threshold!r}")
        check_bool(owner, "final_correction", self.final_correction)
        check_int(owner, "max_batch", self.max_batch, optional=True)
        check_int(owner, "seed", self.seed, minimum=0)
        check_int(owner, "lookahead_steps", self.lookahead_steps, minimum=0)
        check_bool(owner, "record_noise", self.record_noise)
        if self.lookahead_steps and not self.resample_every:
            warnings.warn(f"{owner}.lookahead_steps does nothing with resample_every=0 (no intermediate scoring)",
                          UserWarning, stacklevel=3)

    @classmethod
    def measured(cls, num_particles: int, num_steps: int, **overrides: Any) -> FKSteeringConfig:
        """The settings measured best on micro-SD's training prompts (``bench/grids/micro_sd_steering.json``,
        docs/steering.md): x0 potential ``max`` at lambda 10, resampling every 2nd step from 60% of the
        steps when the ESS falls below k/2, no final correction (the best particle is kept). Early
        resampling, and look-ahead potentials, measured worse at equal NFE.

        Example:
            >>> config = FKSteeringConfig.measured(4, 20)
            >>> config.resample_start, config.resample_every, config.ess_threshold
            (12, 2, 0.5)
        """
        check_int(cls.__name__, "num_steps", num_steps)
        settings = dict(potential="max", lmbda=10.0, resample_every=2, resample_start=round(0.6 * num_steps),
                        ess_threshold=0.5, final_correction=False)
        return cls(num_particles=num_particles, **{**settings, **overrides})

    def scoring_steps(self, num_steps: int) -> set[int]:
        """The intermediate steps (0-based) at which particles are scored and may be resampled."""
        if self.resample_every == 0:
            return set()
        end = num_steps - 2 if self.resample_end is None else min(self.resample_end, num_steps - 2)
        return set(range(self.resample_start, end + 1, self.resample_every))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SteeringStats(SessionStats):
    """:class:`SessionStats` plus the effective sample size at each scored step (mean over prompts),
    the number of prompts and the wall time of the call."""

    num_prompts: int = 0
    ess: list[float] = field(default_factory=list)
    seconds: float = 0.0
    render_nfe: int = 0

    def summary(self) -> str:
        """The particles per prompt, the resampling steps and the NFE (and the NaN rewards, if any), as
        ``diffaccel generate --particles`` prints them.

        Example:
            >>> print(SteeringStats(num_particles=4, nfe=10, resampled_steps=[0, 5], num_prompts=1).summary())
            FK steering: 4 particles, resampled at steps [0, 5], NFE 10
        """
        text = (f"FK steering: {self.num_particles // max(self.num_prompts, 1)} particles, "
                f"resampled at steps {self.resampled_steps}, NFE {self.nfe}")
        return text + (f"\nNaN rewards (counted as the worst): {self.nan_scores}" if self.nan_scores else "")


@dataclass
class SteeringOutput:
    """All particles (``samples`` in the requested ``output_type``), their final ``rewards``, the index
    of the best particle of each prompt (``best_indices``) and the call's ``stats``. Explored on a
    cheaper pipeline: each prompt's best particle rendered on the exact one (``exact``, with its
    ``exact_rewards``) and the ``tape`` that replays any particle (:func:`~diffaccel.steering.replay.render_exact`)."""

    samples: Any
    rewards: torch.Tensor
    best_indices: list[int]
    stats: SteeringStats
    tape: NoiseTape | None = None
    exact: Any = None
    exact_rewards: torch.Tensor | None = None

    @property
    def images(self) -> Any:
        """Alias of ``samples`` for image pipelines."""
        return self.samples

    @property
    def frames(self) -> Any:
        """Alias of ``samples`` for video pipelines."""
        return self.samples

    @property
    def best(self) -> list[Any]:
        """The best sample of each prompt."""
        return [self.samples[i] for i in self.best_indices]


def probe_reward(reward: Reward, pipe: Any, prompts: list[str]) -> None:
    """Call the reward on two gray samples: a wrong output shape fails here, before sampling."""
    if not isinstance(reward, Reward):
        raise TypeError(f"reward must be a diffaccel.rewards.Reward, got {type(reward).__name__}")
    reward(gray_media(pipe, 2), [prompts[0]] * 2)


def prompt_list(prompt: str | list[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    return prompts


def call_sizes(pipe: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {name: kwargs.get(name) for name in ("height", "width", "num_frames") if kwargs.get(name) is not None}


class FKSteering:
    """FK steering bound to a pipeline and a reward; call it like the pipeline (see :func:`steer`)."""

    def __init__(self, pipe: Any, config: FKSteeringConfig, reward: Reward, lookahead_pipe: Any = None,
                 explore_pipe: Any = None) -> None:
        if not isinstance(config, FKSteeringConfig):
            raise TypeError(f"config must be an FKSteeringConfig, got {type(config).__name__}")
        if lookahead_pipe is not None and not config.lookahead_steps:
            warnings.warn("lookahead_pipe is ignored: FKSteeringConfig.lookahead_steps is 0", UserWarning, stacklevel=2)
        self.pipe, self.config, self.reward = pipe, config, reward
        self.explore_pipe = explore_pipe
        self.sampler = pipe if explore_pipe is None else explore_pipe
        self.lookahead_pipe = self.sampler if lookahead_pipe is None else lookahead_pipe

    def __call__(self, prompt: str | list[str], **kwargs: Any) -> SteeringOutput:
        """Run ``k`` particles per prompt as one batched ``pipe(...)`` call (each prompt repeated ``k``
        times, which batches like ``num_images_per_prompt=k``).

        ``output_type`` may be ``"pil"`` (default), ``"np"`` or ``"pt"``; ``generator`` seeds the
        initial noise as usual, ``config.seed`` the resampling. With an ``explore_pipe``, the
        particles run there and each prompt's best one is rendered on ``pipe`` from its noise tape
        (``exact``, ``exact_rewards``).
        """
        config, pipe = self.config, self.sampler
        prompts = prompt_list(prompt)
        for name in ("num_images_per_prompt", "num_videos_per_prompt"):
            if name in kwargs:
                raise ValueError(f"{name} is set by FKSteeringConfig.num_particles; do not pass it")
        output_type = check_output_type(kwargs.pop("output_type", "pil"))
        num_steps = kwargs.get("num_inference_steps") or call_default(pipe, "num_inference_steps")
        if num_steps is not None and config.resample_every and config.resample_start > num_steps - 1:
            raise ValueError(
                f"FKSteeringConfig.resample_start ({config.resample_start}) is beyond the last step ({num_steps - 1})"
            )
        k = config.num_particles
        particle_prompts = [p for p in prompts for _ in range(k)]
        probe_reward(self.reward, pipe, prompts)
        if config.resample_every:
            check_stochastic(pipe.scheduler, kwargs)
        if config.lookahead_steps:
            check_rollout_pipe(pipe, self.lookahead_pipe, kwargs)
        if self.explore_pipe is not None:
            check_explore_pipe(self.pipe, self.explore_pipe, kwargs)
        tape = NoiseTape(seed=config.seed) if config.record_noise or self.explore_pipe is not None else None

        state = PotentialState.start(len(particle_prompts))
        generator = torch.Generator().manual_seed(config.seed)
        stats = SteeringStats(num_particles=len(particle_prompts), num_prompts=len(prompts))

        def policy(step: int, is_last: bool, rewards: torch.Tensor) -> torch.Tensor | None:
            if is_last:
                if not config.final_correction:
                    return None
                log_weights = state.final_log_weights(config.lmbda, rewards)
                resample = torch.ones(len(prompts), dtype=torch.bool)
            else:
                state.update(config.potential, config.lmbda, rewards)
                log_weights = state.log_weights
                ess = effective_sample_size(log_weights.view(len(prompts), k))
                stats.ess.append(float(ess.mean()))
                resample = (
                    torch.ones(len(prompts), dtype=torch.bool)
                    if config.ess_threshold is None
                    else ess < config.ess_threshold * k
                )
            if not bool(resample.any()):
                return None
            drawn = resample_indices(log_weights.view(len(prompts), k), config.resampling, generator)
            identity = torch.arange(len(particle_prompts))
            indices = torch.where(resample.repeat_interleave(k), drawn, identity)
            state.reindex(indices)
            state.log_weights = torch.where(resample.repeat_interleave(k), 0.0, state.log_weights)
            return indices

        call = particle_kwargs(kwargs, particle_prompts, k, pipe)
        lookahead = (LookaheadRollout(pipe, self.lookahead_pipe, config.lookahead_steps, call, config.max_batch)
                     if config.lookahead_steps and config.resample_every else None)
        session = ParticleSession(
            pipe,
            self.reward,
            particle_prompts,
            config.scoring_steps,
            policy,
            call_sizes(pipe, kwargs),
            max_batch=config.max_batch,
            score_last=config.final_correction,
            lookahead=lookahead,
            step_seeds=None if tape is None else tape.step_seed,
        )
        begin = time.perf_counter()
        restore_noise = seed_sde_noise(pipe.scheduler, config.seed)
        try:
            output = session.run(pipe, call)
        finally:
            restore_noise()
        media = pipeline_media(output)
        rewards = final_rewards(self.reward, media, particle_prompts, config.max_batch, session.stats)
        for name, value in asdict(session.stats).items():
            setattr(stats, name, value)
        stats.seconds = time.perf_counter() - begin
        best = [int(g * k + torch.argmax(rewards[g * k : (g + 1) * k])) for g in range(len(prompts))]
        result = SteeringOutput(convert_media(media, output_type), rewards, best, stats, tape=tape)
        if tape is not None:
            tape.record(session)
        if self.explore_pipe is not None:
            exact = render_exact(self.pipe, prompts, [tape] * len(prompts), best, kwargs)
            result.exact_rewards = final_rewards(self.reward, exact, prompts, config.max_batch, stats)
            result.exact = convert_media(exact, output_type)
            stats.render_nfe = len(prompts) * tape.num_steps
            stats.seconds = time.perf_counter() - begin
        return result


def final_rewards(
    reward: Reward, media: torch.Tensor, prompts: list[str], max_batch: int | None, stats: SessionStats
) -> torch.Tensor:
    """Score the final samples in chunks of ``max_batch``; NaN is the worst score and counted in ``stats``."""
    chunk = max_batch or len(prompts)
    scores = torch.cat([reward(media[i : i + chunk], prompts[i : i + chunk]) for i in range(0, len(prompts), chunk)])
    scores, nan_count = nan_to_worst(check_scores(scores, len(prompts), reward.name), reward.worst)
    stats.nan_scores += nan_count
    stats.reward_evaluations += len(prompts)
    return scores


def steer(pipe: Any, config: FKSteeringConfig, reward: Reward, lookahead_pipe: Any = None,
          explore_pipe: Any = None) -> FKSteering:
    """FK steering for ``pipe`` with ``reward``: returns a callable that runs like the pipeline.

    Works on any supported diffusers pipeline, accelerated or not (the particles are the batch, so
    encoder reuse and the other features apply to every particle). With
    ``config.lookahead_steps``, the look-ahead rollouts run on ``lookahead_pipe`` (default: ``pipe``
    itself; pass a cheaper accelerated copy with its own denoiser to make them cheaper). With
    ``explore_pipe`` (e.g. :func:`~diffaccel.steering.replay.cheap_copy`), the particles run on that
    cheaper pipeline and each prompt's winner is rendered on ``pipe`` from the same initial noise,
    per-step noise and ancestry (``out.exact``).

    Example:
        >>> steering = steer(pipe, FKSteeringConfig(num_particles=4), reward=clip_reward)  # doctest: +SKIP
        >>> best_image = steering("a red circle", num_inference_steps=50, eta=1.0).best[0]  # doctest: +SKIP
        >>> lookahead = FKSteeringConfig(num_particles=4, lookahead_steps=2)
        >>> out = steer(pipe, lookahead, reward=clip_reward)("a red circle", eta=1.0)  # doctest: +SKIP
        >>> out.stats.lookahead_nfe  # included in out.stats.nfe  # doctest: +SKIP
        32
    """
    return FKSteering(pipe, config, reward, lookahead_pipe, explore_pipe)
