"""Explore cheap, render exact: record what a particle call drew, and replay one particle elsewhere.

Search and FK spend most of their compute on candidates they throw away. Exploring on a cheaper
copy of the pipeline (encoder reuse, the delta cache, quantized weights) and rendering only the
winner on the exact pipeline is sound when the winner is *the same sample*: same initial noise,
same fresh noise at every stochastic step, same resampling ancestry. A :class:`NoiseTape` holds
exactly that. During exploration every particle slot draws its step noise from its own generator,
seeded by ``(tape seed, slot, step)``; the session records each slot's initial noise and the
ancestry of every resampling. :func:`render_exact` follows a winner's lineage back through the
ancestry and runs the exact pipeline from its root's initial noise with, at each step, the noise
seed its ancestor had at that step.

Example:
    >>> tape = NoiseTape(seed=0, num_steps=4, ancestry={1: [1, 1, 0]})
    >>> tape.lineage(2)   # slot 2 after step 1 descends from slot 0 at steps 0-1
    [0, 0, 2, 2]
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging

from ..errors import UnsupportedCombinationError
from ..seams import denoiser, denoiser_name
from .inputs import IMAGE_START_INPUTS, particle_kwargs
from .media import pipeline_media
from .session import ParticleSession

_SEED_MASK = (1 << 63) - 1


@dataclass
class NoiseTape:
    """The noise of one particle call: per-slot initial latents, per-(slot, step) noise seeds, ancestry.

    Attributes:
        seed: the tape's seed (every step-noise seed derives from it).
        num_steps: the loop's length.
        ancestry: ``{step: indices}``: after ``step``, slot ``j`` holds what slot ``indices[j]`` held.
        initial_latents: the slots' initial noise (unscaled), recorded by the session.
    """

    seed: int
    num_steps: int = 0
    ancestry: dict[int, list[int]] = field(default_factory=dict)
    initial_latents: torch.Tensor | None = None

    def step_seed(self, slot: int, step: int) -> int:
        """The seed of slot ``slot``'s fresh noise at ``step``.

        Example:
            >>> NoiseTape(0).step_seed(1, 2) != NoiseTape(0).step_seed(2, 1)
            True
        """
        return ((self.seed * 1_000_003 + slot) * 100_003 + step) & _SEED_MASK

    def lineage(self, slot: int) -> list[int]:
        """The slot that particle ``slot`` (at the end of the call) occupied at each step."""
        slots, current = [0] * self.num_steps, slot
        for step in range(self.num_steps - 1, -1, -1):
            if step in self.ancestry:
                current = self.ancestry[step][current]
            slots[step] = current
        return slots

    def replay_seeds(self, slot: int) -> list[int]:
        """The step-noise seed at each step along particle ``slot``'s lineage."""
        return [self.step_seed(s, step) for step, s in enumerate(self.lineage(slot))]

    def record(self, session: ParticleSession) -> None:
        """Take the loop length, ancestry and initial latents of a finished ``session``."""
        stats = session.stats
        self.num_steps = stats.num_steps
        self.ancestry = dict(zip(stats.resampled_steps, stats.ancestry))
        self.initial_latents = session.initial_latents


def check_explore_pipe(pipe: Any, explore_pipe: Any, call_kwargs: Mapping[str, Any]) -> None:
    """Refuse, before sampling, an exploration whose winners could not be replayed on ``pipe``."""
    if type(explore_pipe.scheduler).__name__ != type(pipe.scheduler).__name__:
        raise UnsupportedCombinationError(
            f"the exploring pipeline samples with {type(explore_pipe.scheduler).__name__}, the exact one with "
            f"{type(pipe.scheduler).__name__}: a winner replays only on the same sampler")
    if getattr(pipe, "_diffaccel_configs", None):
        raise UnsupportedCombinationError("the exact pipeline carries diffaccel features; render on a plain pipeline")
    if denoiser(explore_pipe) is denoiser(pipe) and getattr(explore_pipe, "_diffaccel_configs", None):
        raise UnsupportedCombinationError(
            "the exploring pipeline's features sit on the exact pipeline's denoiser; give it a denoiser of its own "
            "(diffaccel.steering.replay.cheap_copy)")
    if started := sorted(n for n in IMAGE_START_INPUTS if call_kwargs.get(n) is not None):
        raise UnsupportedCombinationError(f"explore-cheap replays text-to-image/video calls; {started} start from an image")


@torch.no_grad()
def render_exact(pipe: Any, prompts: list[str], tapes: list[NoiseTape], slots: list[int],
                 call_kwargs: Mapping[str, Any]) -> torch.Tensor:
    """Render particle ``slots[i]`` of ``tapes[i]`` (for ``prompts[i]``) on ``pipe`` in one batched call:
    media in [0, 1], as the pipeline's ``output_type="pt"``.

    Example:
        >>> media = render_exact(pipe, ["a red circle"], [out.tape], [out.best_indices[0]], call)  # doctest: +SKIP
    """
    roots = [tape.lineage(slot)[0] if tape.num_steps else slot for tape, slot in zip(tapes, slots)]
    latents = torch.cat([tape.initial_latents[root : root + 1] for tape, root in zip(tapes, roots)])
    seeds = [tape.replay_seeds(slot) for tape, slot in zip(tapes, slots)]
    call = particle_kwargs({k: v for k, v in call_kwargs.items() if k not in ("generator", "latents")}, prompts, 1, pipe)
    call["latents"] = latents.to(pipe.device)  # unscaled: the pipeline scales by init_noise_sigma itself
    session = ParticleSession(pipe, _NoReward(), prompts, lambda n: set(), lambda *a: None, {},
                              step_seeds=lambda row, step: seeds[row][step])
    return pipeline_media(session.run(pipe, call))


def cheap_copy(pipe: Any, *configs: Any) -> Any:
    """A copy of ``pipe`` to explore on: its own (deep-copied) denoiser and scheduler, every other
    component shared, with ``configs`` applied (a :class:`~diffaccel.QuantizationConfig` quantizes
    the copied denoiser, feature configs accelerate the copy).

    Example:
        >>> import diffaccel
        >>> from diffaccel.testing import tiny_pipeline
        >>> pipe = tiny_pipeline("sd")
        >>> cheap = cheap_copy(pipe, diffaccel.EncoderReuseConfig("uniform:2"))
        >>> cheap.unet is pipe.unet, cheap.vae is pipe.vae, type(cheap).__name__
        (False, True, 'AcceleratedStableDiffusionPipeline')
    """
    from ..acceleration import accelerate
    from ..quantization import QuantizationConfig, quantize_

    name = denoiser_name(pipe)
    base = getattr(pipe, "_diffaccel_original_class", type(pipe))
    own = {name: copy.deepcopy(getattr(pipe, name)), "scheduler": copy.deepcopy(pipe.scheduler)}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # from_pipe's note on casting: the dtype is the pipeline's own
    try:
        copied = base.from_pipe(pipe, dtype=pipe.dtype, **own)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    copied.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    features = []
    for config in configs:
        if isinstance(config, QuantizationConfig):
            quantize_(getattr(copied, name), config)
        else:
            features.append(config)
    return accelerate(copied, *features) if features else copied


class _NoReward:
    """The replay scores nothing; the session only needs the attributes."""

    name, worst = "none", float("-inf")
