"""Temporal delta cache (TDC, from 6Bit-Diffusion, 2026): skip transformer blocks whose input
barely changed since the block last ran, and add the residual ``out - in`` cached then.

A transformer block's residual is consistent across neighbouring denoising steps. The rule, per
transformer block ``b``, per CFG branch ``c`` (see below) and per denoising step ``s`` of ``N``:

* When ``b`` is **computed**, it caches its input ``x`` (``hidden_states``) and residual
  ``r = out - x``; dual-stream blocks (SD3's ``JointTransformerBlock``, Flux's blocks,
  CogVideoX's) also cache their ``encoder_hidden_states`` input ``e`` and residual
  ``r_e = out_e - e``. The number of consecutive skips is reset to 0.
* ``b`` is **skipped** at step ``s`` when all of these hold:

  1. ``threshold > 0``, ``first_steps <= s < N - last_steps``, and ``b`` has a cache of the same
     shapes (a changed batch size invalidates it);
  2. ``b`` skipped fewer than ``max_consecutive_skips`` steps in a row;
  3. the *predicted change* is below ``threshold``. It is the relative L1 change of the block's
     current input against its input at the step it was last computed,
     ``mean|x - x_ref| / mean|x_ref|`` over every element of the batch (all samples and CFG
     rows: a block runs or is skipped for the whole batch), computed in float32; for
     dual-stream blocks the larger of that and the same quantity for ``e``.

  A skipped block returns ``x + r`` (and ``e + r_e``) in the block's own return format (a tensor,
  or the ``(hidden_states, encoder_hidden_states)`` tuple in the order diffusers'
  ``TransformerBlockRegistry`` records; SD3's last block returns ``None`` for ``e`` and so does
  its replay). The cache keeps the input of the last *computed* step, so the drift of
  consecutive skips adds up against the threshold.
* Otherwise the block is computed and its cache refreshed. ``threshold = 0`` never skips and
  caches nothing: the output is bit-identical to the untouched pipeline.

**Forecast** (``forecast=1``). A skipped block adds, instead of its last residual ``r2`` (computed
at step ``s2``), the first-order extrapolation from its last two computed residuals, as TaylorSeer
extrapolates whole features: ``r2 + (s - s2) / (s2 - s1) * (r2 - r1)``; with one computed residual
so far it adds ``r2``. ``forecast=0`` is the rule above.

**Spans** (``front_blocks >= 1``, DBCache's F/B split). The denoiser's blocks, in call order, split
into the first ``front_blocks`` (always computed), the last ``back_blocks`` (always computed) and
the middle span, skipped or computed as one. The span is skipped when the conditions of 1-2 above
hold for it and the relative L1 change of the *front residual* (the front blocks' output minus their
input, FirstBlockCache's signal) against its value at the step the span was last computed is below
``threshold``. A skipped span's first block returns its input plus the span's cached (or forecast)
residual, the others pass their inputs on. Transformer denoisers only (a UNet's transformer
blocks sit at different resolutions).

**Shared decisions** (``share_branches=True``). Where the CFG branches are separate calls (Wan,
Flux with ``true_cfg_scale``), the first branch to reach a block (or span) at a step decides for
every branch at that step, so the conditional and unconditional predictions skip together.

The step index comes from the pipeline's ``cache_context(..., step_index=...)`` when it passes one
(Wan), else it counts the denoiser's calls in the branch; ``N`` comes from the context's
``num_inference_steps``, else the pipeline's ``_num_timesteps``, else ``len(scheduler.timesteps)``.
The block's timestep conditioning (``temb``) is not part of the prediction: ``first_steps``,
``last_steps`` and ``max_consecutive_skips`` bound how stale a residual can get.

**CFG branches.** Pipelines that call the denoiser once per branch (Wan, Flux with
``true_cfg_scale``) wrap each call in ``transformer.cache_context("cond")`` / ``("uncond")``; the
state lives in a diffusers ``StateManager``, so every context keeps its own cache and step
counter. Pipelines that batch CFG (PixArt, SD3, CogVideoX, LTX) keep one state for the batch.
SD3's skip-layer-guidance calls (``skip_layers=``) run every block uncached. Wan 2.2's second
transformer has its own hooks and caches, empty at its first step.

**Particles.** :meth:`DeltaCache.reindex` reorders the cached inputs and residuals when FK
steering resamples; FK steering's ``max_batch`` chunking (one denoiser call per chunk) is refused.

Built on diffusers hooks: one ``ModelHook`` per transformer block, one on each denoiser
(``transformer``, and ``transformer_2`` where a pipeline has one; or ``unet``, whose blocks are the
``BasicTransformerBlock`` lists inside its attentions) that picks the branch state and the step.
Hooks sit on whole blocks, so they compose with module swaps inside them (quantized
Linear layers, quantized attention processors). State is reset per pipeline call; outside a call
of the pipeline they were attached for, the hooks pass every call through unchanged. Memory: one
input and one residual (two for dual-stream blocks) per block and branch. Each prediction reads
a scalar back from the device (a sync per block and step).

Example:
    >>> import diffaccel
    >>> from diffaccel.features.delta_cache import DeltaCacheConfig
    >>> from diffaccel.testing import tiny_call_inputs, tiny_pipeline
    >>> pipe = diffaccel.accelerate(tiny_pipeline("wan"), DeltaCacheConfig(threshold=float("inf")))
    >>> _ = pipe("a red circle", num_inference_steps=4, output_type="latent", **tiny_call_inputs("wan"))
    >>> stats = pipe.acceleration_stats.features["delta_cache"]
    >>> stats.branches    # Wan runs CFG as two calls: each branch has its own cache
    ('cond', 'uncond')
    >>> stats.skipped_per_step    # steps 1 and 2 skip all 2 blocks in both branches
    [0, 4, 4, 0]
    >>> stats.blocks_computed, stats.blocks_skipped, stats.skipped_fraction
    (8, 8, 0.5)
    >>> pipe = diffaccel.restore(pipe)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager
from diffusers.utils.torch_utils import unwrap_module

from ..errors import UnsupportedCombinationError, UnsupportedPipelineError
from ..seams import BLOCK_LIST_NAMES, add_hook, block_lists, block_metadata, denoisers, loop_length, remove_hook
from .base import AttachedFeature, FeatureConfig, reindex_batch
from .checks import check_int

DENOISER_HOOK = "diffaccel.delta_cache.denoiser"
BLOCK_HOOK = "diffaccel.delta_cache.block"

#: Branch name used when the pipeline sets no cache context (CFG batched, or no CFG).
DEFAULT_BRANCH = "default"

_SUPPORTED = (
    "PixArt-Alpha/Sigma, SD3, Flux, CogVideoX, Wan, LTX-Video and other transformer denoisers whose "
    "blocks diffusers' TransformerBlockRegistry describes, and UNets' transformer blocks (SD, SDXL)"
)


@dataclass(frozen=True)
class DeltaCacheConfig(FeatureConfig, attach_order=40):
    """Configuration of the temporal delta cache (the rule is in the module docs).

    Args:
        threshold: skip a block when its predicted change (relative L1 change of its input since
            it last ran) is below this; ``0`` never skips, ``inf`` skips whenever the other
            conditions allow. In ``[0, inf]``.
        max_consecutive_skips: a block is computed after skipping this many steps in a row (>= 1).
        first_steps: the first this many steps compute every block (>= 0).
        last_steps: the last this many steps compute every block (>= 0).
        blocks: names of the denoiser's block lists to cache (e.g. ``("single_transformer_blocks",)``
            for Flux); ``None`` (default): every transformer block list.
        forecast: ``0`` replays a skipped block's last residual, ``1`` extrapolates it from the
            last two (first-order Taylor).
        front_blocks: ``0`` decides per block; ``>= 1`` always computes this many first blocks and
            decides for the blocks after them as one span, from the change of their residual.
        back_blocks: with ``front_blocks``, the last this many blocks are always computed too.
        share_branches: CFG branches that are separate calls follow one decision per step.

    Example:
        >>> DeltaCacheConfig(threshold=0.1, blocks=["transformer_blocks"]).to_dict()
        {'threshold': 0.1, 'max_consecutive_skips': 2, 'first_steps': 1, 'last_steps': 1,
         'blocks': ['transformer_blocks'], 'forecast': 0, 'front_blocks': 0, 'back_blocks': 0,
         'share_branches': False}
        >>> DeltaCacheConfig(back_blocks=1)
        Traceback (most recent call last):
        ...
        ValueError: DeltaCacheConfig.back_blocks needs front_blocks >= 1 (blocks are decided one by one otherwise)
        >>> DeltaCacheConfig(max_consecutive_skips=0)
        Traceback (most recent call last):
        ...
        ValueError: DeltaCacheConfig.max_consecutive_skips must be an int >= 1, got 0
    """

    name = "delta_cache"

    threshold: float = 0.05
    max_consecutive_skips: int = 2
    first_steps: int = 1
    last_steps: int = 1
    blocks: tuple[str, ...] | None = None
    forecast: int = 0
    front_blocks: int = 0
    back_blocks: int = 0
    share_branches: bool = False

    def __post_init__(self) -> None:
        threshold = self.threshold
        number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if not number or math.isnan(threshold) or threshold < 0:
            raise ValueError(f"DeltaCacheConfig.threshold must be a number in [0, inf], got {threshold!r}")
        object.__setattr__(self, "threshold", float(threshold))
        for name, minimum in (("max_consecutive_skips", 1), ("first_steps", 0), ("last_steps", 0),
                              ("front_blocks", 0), ("back_blocks", 0)):
            check_int("DeltaCacheConfig", name, getattr(self, name), minimum)
        if self.forecast not in (0, 1) or isinstance(self.forecast, bool):
            raise ValueError(f"DeltaCacheConfig.forecast must be 0 or 1, got {self.forecast!r}")
        if not isinstance(self.share_branches, bool):
            raise ValueError(f"DeltaCacheConfig.share_branches must be a bool, got {self.share_branches!r}")
        if self.back_blocks and not self.front_blocks:
            raise ValueError("DeltaCacheConfig.back_blocks needs front_blocks >= 1 (blocks are decided one by one "
                             "otherwise)")
        if self.blocks is not None:
            blocks = (self.blocks,) if isinstance(self.blocks, str) else self.blocks
            if (
                not isinstance(blocks, Sequence)
                or not blocks
                or not all(isinstance(b, str) and b for b in blocks)
                or len(set(blocks)) != len(blocks)
            ):
                raise ValueError(
                    "DeltaCacheConfig.blocks must be None or distinct block-list names such as "
                    f"{BLOCK_LIST_NAMES[:2]}, got {self.blocks!r}"
                )
            object.__setattr__(self, "blocks", tuple(blocks))

    def attach(self, pipe: Any) -> "DeltaCache":
        """Install the delta cache on ``pipe``'s transformer blocks."""
        return DeltaCache(self, pipe)



@dataclass
class DeltaCacheStats:
    """What the delta cache did in one pipeline call.

    ``blocks`` is the number of cached blocks per denoiser call, ``branches`` the CFG branches
    (cache contexts) seen, ``blocks_computed`` / ``blocks_skipped`` count block evaluations over
    all steps and branches, ``skipped_per_step[s]`` the blocks skipped at step ``s``.
    """

    num_steps: int = 0
    blocks: int = 0
    branches: tuple[str, ...] = ()
    blocks_computed: int = 0
    blocks_skipped: int = 0
    skipped_per_step: list[int] = field(default_factory=list)

    @property
    def skipped_fraction(self) -> float:
        """Skipped block evaluations over all block evaluations (0 when none ran)."""
        total = self.blocks_computed + self.blocks_skipped
        return self.blocks_skipped / total if total else 0.0

    def summary(self) -> str:
        """The skipped block evaluations, as the ``diffaccel`` commands print them.

        Example:
            >>> DeltaCacheStats(num_steps=2, blocks=2, blocks_computed=3, blocks_skipped=1).summary()
            'delta cache: 1/4 block evaluations skipped'
        """
        return f"delta cache: {self.blocks_skipped}/{self.blocks_computed + self.blocks_skipped} block evaluations skipped"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON reports."""
        return {
            "num_steps": self.num_steps,
            "blocks": self.blocks,
            "branches": list(self.branches),
            "blocks_computed": self.blocks_computed,
            "blocks_skipped": self.blocks_skipped,
            "skipped_fraction": self.skipped_fraction,
            "skipped_per_step": list(self.skipped_per_step),
        }


@dataclass
class _BlockCache:
    """A block's (or span's) input and residual at the step it was last computed, and the residual
    of the computed step before that (for the forecast)."""

    hidden: torch.Tensor
    residual: torch.Tensor
    encoder: torch.Tensor | None
    encoder_residual: torch.Tensor | None
    template: tuple[Any, ...] | None  # the tuple output with its two streams blanked; None: a tensor output
    step: int = 0
    previous: tuple[int, torch.Tensor, torch.Tensor | None] | None = None  # (step, residual, encoder residual)
    skips: int = 0

    def matches(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> bool:
        """Whether the inputs have the cached shapes (a changed batch cannot reuse the cache)."""
        if hidden.shape != self.hidden.shape or (encoder is None) != (self.encoder is None):
            return False
        return encoder is None or encoder.shape == self.encoder.shape

    def change(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> float:
        """The predicted change: relative L1 change of the inputs (the larger of the two streams)."""
        change = _relative_l1(hidden, self.hidden)
        if encoder is not None:
            change = max(change, _relative_l1(encoder, self.encoder))
        return change

    def succeeded_by(self, new: "_BlockCache") -> "_BlockCache":
        """``new`` (computed later), remembering this cache's residuals as the previous ones."""
        new.previous = (self.step, self.residual, self.encoder_residual)
        return new

    def residuals(self, step: int, order: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residuals to add at ``step``: the cached ones (order 0, or no previous step yet) or
        their first-order extrapolation from the previous computed step."""
        if order == 0 or self.previous is None:
            return self.residual, self.encoder_residual
        previous_step, previous, previous_encoder = self.previous
        slope = (step - self.step) / (self.step - previous_step)
        residual = self.residual + slope * (self.residual - previous)
        encoder = self.encoder_residual
        if encoder is not None and previous_encoder is not None:
            encoder = encoder + slope * (encoder - previous_encoder)
        return residual, encoder

    def reindexed(self, indices: torch.Tensor) -> None:
        """Reorder the cached samples (particle resampling)."""
        self.hidden, self.residual, self.encoder, self.encoder_residual = reindex_batch(
            (self.hidden, self.residual, self.encoder, self.encoder_residual), indices)
        if self.previous is not None:
            step, residual, encoder = self.previous
            self.previous = (step, *reindex_batch((residual, encoder), indices))


@dataclass
class _SpanState:
    """One branch's span during a call: the front input of the step in progress, the span's cache
    (its input stands for the front residual it was decided on) and the step's decision."""

    front_input: torch.Tensor | None = None
    front_residual: torch.Tensor | None = None
    entry: tuple[torch.Tensor, torch.Tensor | None] | None = None
    cache: _BlockCache | None = None
    skip: bool = False


def _relative_l1(current: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.detach().float()
    difference = float((current.detach().float() - reference).abs().mean())
    scale = float(reference.abs().mean())
    if scale == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / scale


class _BranchState:
    """One CFG branch's step and block caches during one pipeline call."""

    def __init__(self) -> None:
        self.calls = 0  # denoiser calls so far (the step index when the context gives none)
        self.step = 0
        self.num_steps = 0
        self.blocks: dict[str, _BlockCache] = {}
        self.span = _SpanState()
        self.templates: dict[str, tuple[Any, ...] | None] = {}  # each span block's output format


class _BranchStates(StateManager):
    """A diffusers ``StateManager`` (so ``cache_context`` reaches it) that falls back to one
    default branch when the pipeline sets no context."""

    def __init__(self) -> None:
        super().__init__(_BranchState)  # get_state below builds the states itself
        self.current: CacheContext | None = None
        self.branches: dict[str, _BranchState] = {}

    def set_context(self, context: CacheContext | None) -> None:
        self.current = context

    def get_state(self) -> _BranchState:
        name = self.current.name if self.current is not None else DEFAULT_BRANCH
        if name not in self.branches:
            self.branches[name] = _BranchState()
        return self.branches[name]

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.branches, self.current = {}, None


@dataclass
class _Runtime:
    """State shared by all hooks of one attached delta cache."""

    config: DeltaCacheConfig
    active: bool = False
    pipe: Any = None
    loop_length: int | None = None
    branch: _BranchState | None = None  # the branch of the denoiser call in progress
    branches: list[str] = field(default_factory=list)
    stats: DeltaCacheStats = field(default_factory=DeltaCacheStats)
    decisions: dict[tuple[str, int], bool] = field(default_factory=dict)  # (block or "span", step) -> skip

    def start(self, pipe: Any, blocks: int) -> None:
        self.active, self.pipe, self.loop_length, self.branch, self.branches = True, pipe, None, None, []
        self.stats = DeltaCacheStats(blocks=blocks)
        self.decisions = {}

    def decide(self, key: str, step: int, skip: bool) -> bool:
        """``skip``, or with ``share_branches`` the decision the first branch took for ``key`` at ``step``."""
        if not self.config.share_branches:
            return skip
        return self.decisions.setdefault((key, step), skip)

    def finish(self) -> DeltaCacheStats:
        stats = self.stats
        stats.branches = tuple(self.branches)
        self.active, self.pipe, self.branch = False, None, None
        return stats

    def num_steps(self, context: CacheContext | None) -> int:
        """The denoising loop's length (fixed at the call's first denoiser call)."""
        if context is not None and context.num_inference_steps is not None:
            return int(context.num_inference_steps)
        if self.loop_length is None:
            self.loop_length = loop_length(self.pipe)
        return self.loop_length

    def record(self, step: int | None, skipped: bool) -> None:
        """Count one block evaluation (``step`` is needed for skipped ones)."""
        stats = self.stats
        if not skipped:
            stats.blocks_computed += 1
            return
        stats.blocks_skipped += 1
        if step >= len(stats.skipped_per_step):
            stats.skipped_per_step.extend([0] * (step + 1 - len(stats.skipped_per_step)))
        stats.skipped_per_step[step] += 1


class _DenoiserHook(ModelHook):
    """On the denoiser: picks the branch state (from the cache context) and the step index."""

    _is_stateful = True

    def __init__(self, runtime: _Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self.states = _BranchStates()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.states.reset()
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        runtime, original = self.runtime, self.fn_ref.original_forward
        if not runtime.active or kwargs.get("skip_layers") is not None:
            return original(*args, **kwargs)
        context = self.states.current
        branch = self.states.get_state()
        name = context.name if context is not None else DEFAULT_BRANCH
        if name not in runtime.branches:
            runtime.branches.append(name)
        step = context.step_index if context is not None and context.step_index is not None else branch.calls
        branch.step, branch.num_steps = int(step), runtime.num_steps(context)
        stats = runtime.stats
        stats.num_steps = max(stats.num_steps, branch.num_steps)
        if len(stats.skipped_per_step) < branch.num_steps:
            stats.skipped_per_step.extend([0] * (branch.num_steps - len(stats.skipped_per_step)))
        runtime.branch = branch
        try:
            return original(*args, **kwargs)
        finally:
            runtime.branch = None
            branch.calls += 1


class _BlockHook(ModelHook):
    """On a transformer block: skip it (input + cached residual) or compute it and cache; in span
    mode, play its part of the span (``index`` is its place among the denoiser's ``count`` blocks)."""

    def __init__(self, runtime: _Runtime, key: str, metadata: Any, index: int = 0, count: int = 1) -> None:
        super().__init__()
        self.runtime, self.key, self.metadata = runtime, key, metadata
        self.index, self.count = index, count
        self._parameters: list[str] = []

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._parameters = list(inspect.signature(type(unwrap_module(module)).forward).parameters)[1:]
        return module

    def _argument(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The block's argument ``name``, passed by keyword or by position (None if absent)."""
        if name in kwargs:
            return kwargs[name]
        if name in self._parameters and self._parameters.index(name) < len(args):
            return args[self._parameters.index(name)]
        return None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        runtime, original, meta = self.runtime, self.fn_ref.original_forward, self.metadata
        branch = runtime.branch
        hidden = self._argument(meta.hidden_states_argument_name, args, kwargs)
        if branch is None or not isinstance(hidden, torch.Tensor):
            # Outside a pipeline call, or an uncached call (skip-layer guidance): just run.
            if runtime.active:
                runtime.record(None, skipped=False)
            return original(*args, **kwargs)
        encoder = None
        if meta.return_encoder_hidden_states_index is not None:
            encoder = self._argument(meta.encoder_hidden_states_argument_name, args, kwargs)
        if runtime.config.front_blocks:
            return self._span_forward(branch, hidden, encoder, args, kwargs)
        return self._block_forward(branch, hidden, encoder, args, kwargs)

    def _may_skip(self, branch: _BranchState, cache: _BlockCache | None) -> bool:
        """Conditions 1-2 of the rule (the step window, the consecutive skips, a cache)."""
        config, step = self.runtime.config, branch.step
        return (cache is not None and config.threshold > 0
                and config.first_steps <= step < branch.num_steps - config.last_steps
                and cache.skips < config.max_consecutive_skips)

    def _keeps_caches(self, branch: _BranchState) -> bool:
        """Whether a later step of this call may skip (else nothing is cached)."""
        config = self.runtime.config
        return config.threshold > 0 and branch.step + 1 < branch.num_steps - config.last_steps

    def _block_forward(self, branch: _BranchState, hidden: torch.Tensor, encoder: torch.Tensor | None,
                       args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        runtime, config, step = self.runtime, self.runtime.config, branch.step
        cache = branch.blocks.get(self.key)
        feasible = self._may_skip(branch, cache) and cache.matches(hidden, encoder)
        wanted = feasible and cache.change(hidden, encoder) < config.threshold
        if feasible and runtime.decide(self.key, step, wanted):
            cache.skips += 1
            runtime.record(step, skipped=True)
            return self._replay(cache.template, hidden, encoder, *cache.residuals(step, config.forecast))
        output = self.fn_ref.original_forward(*args, **kwargs)
        runtime.record(step, skipped=False)
        if self._keeps_caches(branch):
            new = self._capture(hidden, encoder, output, step)
            branch.blocks[self.key] = cache.succeeded_by(new) if cache is not None and cache.matches(hidden, encoder) else new
        else:  # no later step of this call can skip: keep nothing
            branch.blocks.pop(self.key, None)
        return output

    def _span_forward(self, branch: _BranchState, hidden: torch.Tensor, encoder: torch.Tensor | None,
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        runtime, config, step, span = self.runtime, self.runtime.config, branch.step, branch.span
        entry, back = config.front_blocks, self.count - config.back_blocks
        if self.index == 0:
            span.front_input = hidden
        if self.index == entry:  # the span's first block decides for the span
            front_residual = hidden - span.front_input
            cache = span.cache
            feasible = (self._may_skip(branch, cache) and cache.matches(front_residual, None)
                        and cache.residual.shape == hidden.shape)
            wanted = feasible and _relative_l1(front_residual, cache.hidden) < config.threshold
            span.skip = feasible and runtime.decide("span", step, wanted)
            if span.skip:
                cache.skips += 1
                runtime.record(step, skipped=True)
                residual, encoder_residual = cache.residuals(step, config.forecast)
                return self._replay(branch.templates.get(self.key), hidden, encoder, residual, encoder_residual)
            span.front_residual, span.entry = front_residual, (hidden, encoder)
        if entry <= self.index < back and span.skip:  # inside a skipped span: pass the inputs on
            runtime.record(step, skipped=True)
            return self._replay(branch.templates.get(self.key), hidden, encoder, None, None)
        output = self.fn_ref.original_forward(*args, **kwargs)
        runtime.record(step, skipped=False)
        if entry <= self.index < back:
            branch.templates[self.key] = self._template(output)
        if self.index == back - 1:  # the span's last block: cache the span's residual
            if self._keeps_caches(branch):
                entry_hidden, entry_encoder = span.entry
                exit_cache = self._capture(entry_hidden, entry_encoder, output, step)
                new = _BlockCache(span.front_residual, exit_cache.residual, None, exit_cache.encoder_residual,
                                  None, step)
                old = span.cache
                span.cache = old.succeeded_by(new) if old is not None and old.residual.shape == new.residual.shape else new
            else:
                span.cache = None
            span.entry = span.front_residual = None
        return output

    def _template(self, output: Any) -> tuple[Any, ...] | None:
        """The block's tuple output with its two streams blanked; None for a tensor output."""
        if not isinstance(output, tuple):
            return None
        meta, template = self.metadata, list(output)
        template[meta.return_hidden_states_index] = None
        if meta.return_encoder_hidden_states_index is not None:
            template[meta.return_encoder_hidden_states_index] = None
        return tuple(template)

    def _capture(self, hidden: torch.Tensor, encoder: torch.Tensor | None, output: Any, step: int) -> _BlockCache:
        meta = self.metadata
        if not isinstance(output, tuple):
            return _BlockCache(hidden, output - hidden, None, None, None, step)
        encoder_residual = None
        if meta.return_encoder_hidden_states_index is not None:
            out_encoder = output[meta.return_encoder_hidden_states_index]
            if out_encoder is not None and encoder is not None:
                encoder_residual = out_encoder - encoder
        return _BlockCache(hidden, output[meta.return_hidden_states_index] - hidden, encoder, encoder_residual,
                           self._template(output), step)

    def _replay(self, template: tuple[Any, ...] | None, hidden: torch.Tensor, encoder: torch.Tensor | None,
                residual: torch.Tensor | None, encoder_residual: torch.Tensor | None) -> Any:
        """The block's output format holding ``hidden + residual`` (and ``encoder + encoder_residual``);
        a None residual passes that stream on unchanged."""
        meta = self.metadata
        out_hidden = hidden if residual is None else hidden + residual
        if template is None:
            return out_hidden
        output = list(template)
        output[meta.return_hidden_states_index] = out_hidden
        if meta.return_encoder_hidden_states_index is not None and encoder is not None:
            if encoder_residual is not None:
                output[meta.return_encoder_hidden_states_index] = encoder + encoder_residual
            elif residual is None:  # passing on
                output[meta.return_encoder_hidden_states_index] = encoder
        return tuple(output)


class DeltaCache(AttachedFeature):
    """The temporal delta cache installed on a pipeline's transformer blocks; see the module docs.

    Each chunk of a chunked batch would count as a step and meet the other chunks' caches, so it
    does not support chunked batches."""

    supports_chunked_batches = False

    def __init__(self, config: DeltaCacheConfig, pipe: Any) -> None:
        self.config = config
        self.runtime = _Runtime(config)
        self._modules: list[tuple[torch.nn.Module, str]] = []
        self._denoiser_hooks: list[_DenoiserHook] = []
        self.denoisers = _denoisers(pipe)
        plan = {attribute: self._chosen_blocks(attribute, denoiser) for attribute, denoiser in self.denoisers.items()}
        self.num_blocks = sum(len(blocks) for blocks in next(iter(plan.values())).values())
        if config.front_blocks:
            _check_span(config, self.denoisers, plan)
        try:
            for attribute, lists in plan.items():
                denoiser = self.denoisers[attribute]
                detach_from_modules(denoiser)
                count = sum(len(blocks) for blocks in lists.values())
                flat = [(f"{name}.{i}", block) for name, blocks in lists.items() for i, block in enumerate(blocks)]
                for position, (key, block) in enumerate(flat):
                    hook = _BlockHook(self.runtime, key, block_metadata(block), position, count)
                    self._hook(block, hook, BLOCK_HOOK)
                hook = _DenoiserHook(self.runtime)
                self._hook(denoiser, hook, DENOISER_HOOK)
                self._denoiser_hooks.append(hook)
                # cache_context() walks a cached list of the registries under the denoiser.
                HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()
        except BaseException:
            self.detach(pipe)
            raise

    def _chosen_blocks(self, attribute: str, denoiser: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
        """The block lists to hook on one denoiser (all, or those ``config.blocks`` names)."""
        lists = block_lists(denoiser)
        if self.config.blocks is None:
            return lists
        missing = [name for name in self.config.blocks if name not in lists]
        if missing:
            raise UnsupportedCombinationError(
                f"DeltaCacheConfig.blocks names {missing}, which {attribute} "
                f"({type(denoiser).__name__}) does not have; it has {sorted(lists)}"
            )
        return {name: lists[name] for name in self.config.blocks}

    def _hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        add_hook(module, hook, name)
        self._modules.append((module, name))

    def begin_call(self, pipe: Any, call_kwargs: Mapping[str, Any]) -> None:
        """Reset every branch's caches and the statistics."""
        for hook in self._denoiser_hooks:
            hook.states.reset()
        self.runtime.start(pipe, self.num_blocks)

    def end_call(self) -> DeltaCacheStats:
        """Release the caches and return the call's :class:`DeltaCacheStats`."""
        for hook in self._denoiser_hooks:
            hook.states.reset()
        return self.runtime.finish()

    def reindex(self, indices: torch.Tensor) -> None:
        """Reorder every branch's cached inputs and residuals with the samples (particle resampling)."""
        for hook in self._denoiser_hooks:
            for branch in hook.states.branches.values():
                caches = [*branch.blocks.values(), *([branch.span.cache] if branch.span.cache is not None else [])]
                for cache in caches:
                    cache.reindexed(indices)

    def detach(self, pipe: Any) -> None:
        """Remove every hook this feature installed."""
        for module, name in reversed(self._modules):
            remove_hook(module, name)
        for denoiser in self.denoisers.values():
            registry = getattr(denoiser, "_diffusers_hook", None)
            if registry is not None:
                registry.invalidate_child_registries_cache()
        self._modules, self._denoiser_hooks = [], []


def _check_span(config: DeltaCacheConfig, denoisers: Mapping[str, torch.nn.Module],
                plan: Mapping[str, Mapping[str, torch.nn.ModuleList]]) -> None:
    """Span mode needs a transformer denoiser with at least one block between the front and back."""
    from diffusers import UNet2DConditionModel

    for attribute, lists in plan.items():
        denoiser = denoisers[attribute]
        if isinstance(denoiser, UNet2DConditionModel):
            raise UnsupportedCombinationError(
                "DeltaCacheConfig.front_blocks (span mode) needs a transformer denoiser; a UNet's transformer blocks "
                "sit at different resolutions: use front_blocks=0")
        count = sum(len(blocks) for blocks in lists.values())
        if config.front_blocks + config.back_blocks >= count:
            raise UnsupportedCombinationError(
                f"DeltaCacheConfig.front_blocks={config.front_blocks} + back_blocks={config.back_blocks} leave no "
                f"block to skip in {attribute} ({type(denoiser).__name__}, {count} cached blocks)")


def _denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's transformer denoisers that have supported blocks, by attribute name."""
    every = denoisers(pipe)
    found = {name: module for name, module in every.items() if block_lists(module)}
    if not found:
        raise UnsupportedPipelineError(
            f"the delta cache needs a transformer denoiser with supported blocks ({_SUPPORTED}); "
            f"{type(pipe).__name__} has {type(next(iter(every.values()))).__name__}"
        )
    return found


def detach_from_modules(denoiser: torch.nn.Module) -> None:
    """Remove any delta-cache hooks from a denoiser and its blocks (e.g. left by a shared pipeline)."""
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name in (DENOISER_HOOK, BLOCK_HOOK):
            if registry is not None and name in registry.hooks:
                remove_hook(module, name)
                registry = getattr(module, "_diffusers_hook", None)
