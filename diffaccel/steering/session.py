"""One pipeline call with a batch of particles that can be scored and reindexed between steps.

:class:`ParticleSession` is the machinery that FK steering and path search share. For the length of
one ``pipe(...)`` call it installs

* a wrapper around ``pipe.scheduler.step`` (the scheduler seam): after the scheduler step, at the
  scoring steps, it decodes the predicted x0, scores it, asks the *policy* for new particle indices,
  and reindexes the latents it returns, the scheduler's multistep history, and the per-sample state
  of accelerate features (:meth:`~diffaccel.features.base.AttachedFeature.reindex`);
* a ``callback_on_step_end`` that reindexes the prompt embeddings the same way (chained before the
  user's own callback);
* with ``max_batch``, a hook on the denoiser that runs it on chunks of at most ``max_batch``
  particles (the CFG rows of those particles included).

The pipeline's own ``__call__`` runs the loop; nothing of it is copied.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from diffusers.hooks import ModelHook
from diffusers.utils import BaseOutput

from ..errors import UnsupportedCombinationError
from ..features.base import reindex_batch
from ..rewards.base import Reward, check_scores, nan_to_worst
from ..seams import CHUNK_HOOK, add_hook, denoiser, loop_length, remove_hook, wrapped_scheduler_step
from .latents import call_parameters, decode_latents, predicted_x0
from .sde import is_flow_matching

if TYPE_CHECKING:
    from .lookahead import LookaheadRollout

#: Scheduler attributes that hold per-sample multistep history (DPM-Solver, UniPC, DEIS, PNDM, LMS, Heun, KDPM2).
HISTORY_ATTRIBUTES = (
    "model_outputs",
    "last_sample",
    "sample",
    "ets",
    "cur_sample",
    "cur_model_output",
    "derivatives",
    "prev_derivative",
)

#: ``callback_on_step_end`` tensors that are per-sample conditioning and move with the particles.
EMBEDDING_INPUTS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "add_text_embeds",
    "add_time_ids",
    "negative_add_time_ids",
    "prompt_embeds_mask",
    "prompt_attention_mask",
    "negative_prompt_attention_mask",
)

# Denoiser inputs that are not batched even when their first dimension equals the batch.
_UNBATCHED_INPUTS = frozenset({"img_ids", "txt_ids", "image_rotary_emb", "rotary_emb", "video_coords"})

_STOCHASTIC_SCHEDULERS = frozenset(
    {
        "CogVideoXDPMScheduler",
        "DDPMScheduler",
        "FlowMatchSDEScheduler",
        "EulerAncestralDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverSDEScheduler",
        "LCMScheduler",
        "TCDScheduler",
    }
)

#: ``policy(step, is_last, rewards) -> indices or None`` decides resampling at a scoring step.
Policy = Callable[[int, bool, torch.Tensor], "torch.Tensor | None"]


def is_stochastic(scheduler: Any, call_kwargs: dict[str, Any]) -> bool:
    """Whether the scheduler's steps inject fresh noise (needed for resampled copies to diverge)."""
    name, config = type(scheduler).__name__, scheduler.config
    if name in _STOCHASTIC_SCHEDULERS:
        return float(config.get("noise_level", 1.0)) > 0
    if name == "CogVideoXDDIMScheduler":  # accepts eta but never adds noise
        return False
    if "DDIM" in name:
        return float(call_kwargs.get("eta", 0.0) or 0.0) > 0
    if "DPMSolver" in name:
        return str(config.get("algorithm_type", "")).startswith("sde")
    return bool(config.get("stochastic_sampling", False))


def check_stochastic(scheduler: Any, call_kwargs: dict[str, Any]) -> None:
    """Warn when resampling would run on a deterministic scheduler (copies would stay identical)."""
    if is_stochastic(scheduler, call_kwargs):
        return
    if is_flow_matching(scheduler):
        remedy = "Use FlowMatchSDEScheduler.from_config(pipe.scheduler.config)."
    else:
        remedy = "Use DDIM with eta > 0, DDPM, or DPM-Solver with algorithm_type='sde-dpmsolver++'."
    warnings.warn(
        f"{type(scheduler).__name__} is deterministic here: resampled particles stay identical copies. {remedy}",
        UserWarning,
        stacklevel=3,
    )


@dataclass
class SessionStats:
    """What one particle call did: scoring and resampling steps, ESS, ancestry, rewards, NFE."""

    num_particles: int = 0
    num_steps: int = 0
    nfe: int = 0
    scored_steps: list[int] = field(default_factory=list)
    resampled_steps: list[int] = field(default_factory=list)
    ancestry: list[list[int]] = field(default_factory=list)
    intermediate_rewards: list[list[float]] = field(default_factory=list)
    reward_evaluations: int = 0
    nan_scores: int = 0
    lookahead_nfe: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(inputs: Any, batch: int, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``inputs`` whose first dimension is the batch, except
    under the keys of :data:`_UNBATCHED_INPUTS` (positional embeddings shared by the batch)."""

    def cut(path: tuple[Any, ...], leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0 or leaf.shape[0] != batch:
            return leaf
        if any(getattr(entry, "key", None) in _UNBATCHED_INPUTS for entry in path):
            return leaf
        return leaf[start:stop]

    return pytree.tree_map_with_path(cut, inputs)


def _concat(parts: list[Any]) -> Any:
    """The chunks' outputs joined along the batch (tensors of rank 0 and other leaves: the first's)."""

    def join(first: Any, *rest: Any) -> Any:
        return torch.cat([first, *rest]) if isinstance(first, torch.Tensor) and first.ndim > 0 else first

    return pytree.tree_map(join, parts[0], *parts[1:])


class _ChunkHook(ModelHook):
    """Runs the denoiser on chunks of at most ``max_batch`` particles and concatenates the outputs."""

    def __init__(self, num_particles: int, max_batch: int) -> None:
        super().__init__()
        self.num_particles, self.max_batch = num_particles, max_batch

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        original = self.fn_ref.original_forward
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        batch = sample.shape[0]
        if batch % self.num_particles:
            return original(*args, **kwargs)
        rows = self.max_batch * (batch // self.num_particles)
        if rows >= batch:
            return original(*args, **kwargs)
        parts = []
        for start in range(0, batch, rows):
            chunk_args, chunk_kwargs = _split((args, kwargs), batch, start, min(start + rows, batch))
            parts.append(original(*chunk_args, **chunk_kwargs))
        return _concat(parts)


class ParticleSession:
    """Scoring and reindexing of ``num_particles`` samples during one pipeline call (see module docs).

    Args:
        pipe: the diffusers pipeline (accelerated or not).
        reward: scores decoded predicted x0.
        prompts: one prompt per particle.
        scoring_steps: ``num_steps -> set of step indices`` at which to score (and maybe resample);
            the last step is scored when ``score_last`` is set.
        policy: ``(step, is_last, rewards) -> indices | None``.
        sizes: the call's ``height``/``width``/``num_frames`` (for decoding).
        max_batch: particles per denoiser / VAE / reward chunk (``None``: all at once).
        lookahead: ``(step, num_steps, sample, x0) -> x0`` refines the predicted x0 before scoring
            (a :class:`~diffaccel.steering.lookahead.LookaheadRollout`; its ``nfe`` is counted).
        step_seeds: ``(slot, step) -> seed``: the fresh noise a stochastic scheduler adds at each step
            is drawn per particle slot from a generator with that seed (a replayable noise tape, see
            :mod:`diffaccel.steering.replay`); ``None``: the call's own generator.
    """

    def __init__(
        self,
        pipe: Any,
        reward: Reward,
        prompts: Sequence[str],
        scoring_steps: Callable[[int], set[int]],
        policy: Policy,
        sizes: dict[str, Any],
        max_batch: int | None = None,
        score_last: bool = False,
        lookahead: LookaheadRollout | None = None,
        step_seeds: Callable[[int, int], int] | None = None,
    ) -> None:
        self.pipe, self.reward, self.prompts = pipe, reward, list(prompts)
        self.num_particles = len(self.prompts)
        self.scoring_steps_fn, self.policy, self.sizes = scoring_steps, policy, sizes
        self.max_batch, self.score_last, self.lookahead = max_batch, score_last, lookahead
        self.step_seeds = step_seeds
        self.stats = SessionStats(num_particles=self.num_particles)
        self.initial_latents: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._step = 0
        self._num_steps = 0
        self._scoring: set[int] = set()

    # -- installation -------------------------------------------------------------------------------

    def run(self, call: Callable[..., Any], call_kwargs: dict[str, Any]) -> Any:
        """Call ``call(**call_kwargs)`` (the pipeline) with the session installed; uninstall afterwards."""
        pipe, scheduler = self.pipe, self.pipe.scheduler
        chunking = self.max_batch is not None and self.max_batch < self.num_particles
        unchunkable = [f.config.name for f in getattr(pipe, "_diffaccel_features", ()) if not f.supports_chunked_batches]
        if chunking and unchunkable:
            raise UnsupportedCombinationError(
                f"max_batch smaller than the number of particles cannot be combined with {', '.join(unchunkable)} "
                "(it keeps state across the whole batch of a step); raise max_batch or drop one of them"
            )
        signature = inspect.signature(scheduler.step)

        def step(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return self._scheduler_step(inner, signature, args, kwargs)

        kwargs = dict(call_kwargs)
        self._install_callback(kwargs)
        model = denoiser(pipe) if chunking else None
        if model is not None:
            add_hook(model, _ChunkHook(self.num_particles, self.max_batch), CHUNK_HOOK)
        try:
            with wrapped_scheduler_step(scheduler, step):
                return call(**kwargs)
        finally:
            if model is not None:
                remove_hook(model, CHUNK_HOOK)

    def _install_callback(self, kwargs: dict[str, Any]) -> None:
        if "callback_on_step_end" not in call_parameters(self.pipe):
            return
        user = kwargs.pop("callback_on_step_end", None)
        allowed = list(getattr(self.pipe, "_callback_tensor_inputs", ()))
        user_inputs = list(kwargs.pop("callback_on_step_end_tensor_inputs", None) or getattr(user, "tensor_inputs", None) or [])
        wanted = [name for name in allowed if name in EMBEDDING_INPUTS or name == "latents" or name in user_inputs]

        def on_step_end(pipe: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if self._pending is not None:
                for name, value in callback_kwargs.items():
                    if name != "latents" and name in EMBEDDING_INPUTS and isinstance(value, torch.Tensor):
                        callback_kwargs[name] = reindex_batch(value, self._pending)
                self._pending = None
            if user is not None:
                callback_kwargs = user(pipe, index, timestep, callback_kwargs)
            return callback_kwargs

        kwargs["callback_on_step_end"] = on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = wanted

    # -- the scheduler seam -----------------------------------------------------------------------------

    def _scheduler_step(self, original: Callable[..., Any], signature: inspect.Signature, args: Any, kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        want_dict = bound.arguments.get("return_dict", True)
        bound.arguments["return_dict"] = True
        index = self._step
        self._step += 1
        sample = bound.arguments["sample"]
        if index == 0:
            pipe = self.pipe
            self._num_steps = loop_length(pipe)
            self._scoring = set(self.scoring_steps_fn(self._num_steps))
            self.stats.num_steps = self._num_steps
            sigma = float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))
            self.initial_latents = (sample.detach() / sigma).clone()
        self.stats.nfe += self.num_particles
        if self.step_seeds is not None and "generator" in signature.parameters:
            bound.arguments["generator"] = [torch.Generator().manual_seed(self.step_seeds(slot, index))
                                            for slot in range(self.num_particles)]
        output = original(*bound.args, **bound.kwargs)
        if isinstance(output, tuple):  # some schedulers (CogVideoX's DPM) return tuples whatever return_dict says
            output = _TupleOutput(output)
        is_last = index == self._num_steps - 1
        if index in self._scoring or (is_last and self.score_last):
            x0 = predicted_x0(self.pipe.scheduler, output, bound.arguments["model_output"], sample)
            if self.lookahead is not None:
                before = self.lookahead.nfe
                x0 = self.lookahead(index, self._num_steps, sample, x0)
                self.stats.lookahead_nfe += self.lookahead.nfe - before
                self.stats.nfe += self.lookahead.nfe - before
            rewards = self.score(x0)
            self.stats.scored_steps.append(index)
            self.stats.intermediate_rewards.append(rewards.tolist())
            indices = self.policy(index, is_last, rewards)
            if indices is not None:
                self.stats.resampled_steps.append(index)
                self.stats.ancestry.append(indices.tolist())
                self._reindex(indices, output)
        if isinstance(output, _TupleOutput):
            return output.to_tuple()
        return output if want_dict else output.to_tuple()

    def score(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode ``latents`` (in chunks of ``max_batch``) and score them; NaN counts as the worst score."""
        chunk = self.max_batch or self.num_particles
        scores = []
        for start in range(0, self.num_particles, chunk):
            media = decode_latents(self.pipe, latents[start : start + chunk], self.sizes)
            scores.append(self.reward(media, self.prompts[start : start + chunk]))
        rewards = check_scores(torch.cat(scores), self.num_particles, self.reward.name)
        self.stats.reward_evaluations += self.num_particles
        rewards, nan_count = nan_to_worst(rewards, self.reward.worst)
        self.stats.nan_scores += nan_count
        return rewards

    def _reindex(self, indices: torch.Tensor, output: BaseOutput) -> None:
        """Move every per-sample tensor with the particles: the step's outputs, the scheduler's history,
        the accelerate features' caches; the prompt embeddings follow in the step-end callback."""
        count = self.num_particles
        for key in list(output.keys()):
            value = output[key]
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == count:
                output[key] = value[indices.to(value.device)]
        scheduler = self.pipe.scheduler
        for name in HISTORY_ATTRIBUTES:
            value = scheduler.__dict__.get(name)
            if value is not None:
                setattr(scheduler, name, _reindex_exact(value, indices, count))
        for feature in getattr(self.pipe, "_diffaccel_features", ()):
            feature.reindex(indices)
        self._pending = indices if self._pending is None else self._pending[indices]


class _TupleOutput:
    """A scheduler's tuple output seen as ``(prev_sample, pred_original_sample, ...)``."""

    def __init__(self, values: tuple[Any, ...]) -> None:
        self._values = list(values)

    def keys(self) -> list[int]:
        return list(range(len(self._values)))

    def __getitem__(self, key: Any) -> Any:
        return self._values[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._values[key] = value

    @property
    def pred_original_sample(self) -> Any:
        return self._values[1] if len(self._values) > 1 else None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self._values)


def _reindex_exact(obj: Any, indices: torch.Tensor, count: int) -> Any:
    """Reindex tensors whose first dimension is exactly ``count`` (scheduler history)."""
    if isinstance(obj, torch.Tensor):
        return obj[indices.to(obj.device)] if obj.ndim > 0 and obj.shape[0] == count else obj
    if isinstance(obj, list):
        return [_reindex_exact(v, indices, count) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_reindex_exact(v, indices, count) for v in obj)
    return obj
