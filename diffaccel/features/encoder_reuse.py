"""UNet encoder propagation (Faster Diffusion, Li et al., "Faster Diffusion: Rethinking the Role
of UNet Encoder in Diffusion Models", 2023).

A UNet's encoder features (the skip connections and the mid-block output) change slowly across
denoising steps while its decoder features do not. At *key steps* the full UNet runs and the
encoder outputs are cached; at the other steps ``conv_in``, the down blocks and the mid block are
skipped and only the decoder runs, on the cached features and the current timestep's embedding.

Because a non-key step's decoder input no longer depends on the latents, the decoder passes of
a key step and the non-key steps that follow it can run as one batched call (*parallel
decoding*); the later steps then return outputs computed in advance.

*Deep reuse* (``shallow_layers=k``, the structure DeepCache uses) goes further: a non-key step also
replays the deep part of the decoder and runs only the outermost path (``conv_in``, the first
``k - 1`` encoder layers, the last ``k`` decoder layers; see :mod:`~diffaccel.features.unet_depth`).
With ``forecast=1`` a replayed feature is extrapolated to the current step from the last two key
steps (first order, as TaylorSeer does for DiT features) instead of reused unchanged. With an
``adaptive:T`` schedule each key step places the next one from how fast the cached features changed
since the key step before (:class:`~diffaccel.features.key_steps.AdaptiveSchedule`).

Everything is built on diffusers' hook registry: one hook on the UNet counts steps and picks the
mode, small hooks on ``conv_in``, each down block and the mid block capture or replay their
outputs, and a hook on the ControlNet (if any) replays the key step's residuals. The UNet's own
``forward`` still does all the glue (time embedding, ControlNet residual sums, up blocks), so
nothing of diffusers is copied here. Outside a call of the pipeline they were attached for, the hooks
pass every call through unchanged (see :mod:`diffaccel.acceleration` for pipelines that share a UNet).

Example:
    >>> import diffaccel
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd")
    >>> pipe = diffaccel.accelerate(pipe, diffaccel.EncoderReuseConfig(schedule="uniform:2"))
    >>> _ = pipe("a red circle", num_inference_steps=4, output_type="np")
    >>> pipe.acceleration_stats.features["encoder_reuse"].encoder_evaluations
    2
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.utils._pytree as pytree
from diffusers import UNet2DConditionModel
from diffusers.hooks import ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ..errors import UnsupportedCombinationError, UnsupportedPipelineError
from ..seams import add_hook, loop_length, remove_hook, same_tree, tree_map_tensor_pairs, tree_map_tensors
from .base import AttachedFeature, FeatureConfig, json_field, reindex_batch
from .checks import check_bool, check_choice, check_fraction, check_int
from .key_steps import ScheduleLike, parse_schedule
from .noise_injection import prior_noise_injection
from .unet_depth import max_shallow_layers, reuse_plan

UNET_HOOK = "diffaccel.encoder_reuse"
FEATURE_HOOK = "diffaccel.encoder_reuse.feature"
CONTROLNET_HOOK = "diffaccel.encoder_reuse.controlnet"
GUIDANCE_KEY = "guidance"  # the key step's cond - uncond output difference, among the cached features

# Pipelines that call the UNet more than once per denoising step, or feed it per-step adapter
# residuals: reusing encoder features there would give wrong images, so they are refused.
_UNSUPPORTED_PIPELINES = {
    "StableDiffusionSAGPipeline": "it calls the UNet twice per step (self-attention guidance)",
    "StableDiffusionPanoramaPipeline": "it calls the UNet once per view window per step",
    "StableDiffusionAttendAndExcitePipeline": "it runs extra UNet passes with gradients per step",
    "StableDiffusionDiffEditPipeline": "it calls the UNet for mask estimation and inversion",
    "StableDiffusionAdapterPipeline": "T2I-Adapter residuals are added inside the encoder",
    "StableDiffusionXLAdapterPipeline": "T2I-Adapter residuals are added inside the encoder",
}


@dataclass(frozen=True)
class EncoderReuseConfig(FeatureConfig, attach_order=30):
    """Configuration of UNet encoder propagation.

    Args:
        schedule: key steps, as a :class:`~diffaccel.features.key_steps.KeyStepSchedule`, a
            string (``"faster-diffusion"``, ``"uniform:N"``, ``"all"``, ``"0,1,5,10"``) or a
            list of step indices, or ``"adaptive:T"`` (key steps decided online). Step 0 is always a
            key step.
        shallow_layers: ``None`` (default): reuse the encoder only and run the whole decoder at
            non-key steps (Faster Diffusion). ``k >= 1``: deep reuse, run only the outermost path
            (``conv_in``, the first ``k - 1`` encoder layers, the last ``k`` decoder layers) and
            replay the rest; ``1`` is DeepCache's shallowest branch.
        forecast: ``0`` (default) replays cached features unchanged; ``1`` extrapolates them to the
            current step from the last two key steps (first-order Taylor).
        reuse_guidance: at non-key steps of a classifier-free-guidance batch, run the UNet on the
            conditional half only and take the unconditional output as the conditional one minus
            the key step's difference between them (forecast like the features), halving the
            non-key steps' work. Batches that are not ``[uncond, cond]`` with equal latents run whole.
        parallel: run the decoder passes of a key step and its following non-key steps as one
            batched call. ``None`` (default) turns it on when the UNet is on CUDA and the decoder
            input is known in advance (encoder reuse with a fixed schedule); deep reuse reads the
            current latents through ``conv_in`` and an adaptive schedule places the next key step
            only after the key step has run, so ``parallel=True`` is refused with either.
        max_parallel_steps: at most this many steps' decoder passes in one batched call (bounds
            the memory of parallel decoding; steps beyond it are batched at the first step that
            has none ready). ``None``: no limit.
        noise_injection: prior noise injection coefficient (the paper uses 0.003): late in
            sampling, ``noise_injection * initial_noise`` is added to the latents before each
            step. 0 turns it off. The initial noise is the initial latents divided by the
            scheduler's ``init_noise_sigma``.
        noise_injection_below: inject only at timesteps below this fraction of the scheduler's
            ``num_train_timesteps`` (the paper: 0.5).

    Example:
        >>> EncoderReuseConfig(schedule="uniform:3", parallel=False).schedule
        UniformSchedule(interval=3)
    """

    name = "encoder_reuse"

    schedule: ScheduleLike = json_field("faster-diffusion", to_json=lambda schedule: schedule.describe())
    shallow_layers: int | None = None
    forecast: int = 0
    reuse_guidance: bool = False
    parallel: bool | None = None
    max_parallel_steps: int | None = None
    noise_injection: float = 0.0
    noise_injection_below: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse_schedule(self.schedule))
        check_int("EncoderReuseConfig", "shallow_layers", self.shallow_layers, optional=True)
        check_int("EncoderReuseConfig", "forecast", self.forecast, minimum=0)
        check_choice("EncoderReuseConfig", "forecast", self.forecast, (0, 1))
        check_bool("EncoderReuseConfig", "reuse_guidance", self.reuse_guidance)
        check_bool("EncoderReuseConfig", "parallel", self.parallel, optional=True)
        if self.parallel and self.reuse_guidance:
            raise ValueError("EncoderReuseConfig.parallel=True cannot be combined with reuse_guidance")
        if self.parallel and (self.shallow_layers is not None or self.schedule.adaptive):
            raise ValueError(
                "EncoderReuseConfig.parallel=True needs the decoder inputs in advance: deep reuse (shallow_layers) "
                "reads the current latents and an adaptive schedule places its key steps as it goes; "
                "use parallel=None or False"
            )
        check_int("EncoderReuseConfig", "max_parallel_steps", self.max_parallel_steps, optional=True)
        check_fraction("EncoderReuseConfig", "noise_injection", self.noise_injection)
        check_fraction("EncoderReuseConfig", "noise_injection_below", self.noise_injection_below, include_zero=False)

    def attach(self, pipe: Any) -> "EncoderReuse":
        return EncoderReuse(self, pipe)



@dataclass
class EncoderReuseStats:
    """What encoder propagation did in one pipeline call.

    ``encoder_evaluations`` counts full UNet passes (the key steps), ``decoder_evaluations``
    counts decoder passes (one per denoising step), ``batched_decoder_calls`` the UNet calls
    they took (fewer with parallel decoding), ``parallel_fallbacks`` the precomputed steps that
    had to be recomputed because the step's inputs differed from the key step's. ``shallow_layers``
    is the config's (``None``: encoder reuse), ``forecasts`` the replayed features that were
    extrapolated rather than reused unchanged.
    """

    num_steps: int = 0
    key_steps: tuple[int, ...] = ()
    parallel: bool = False
    encoder_evaluations: int = 0
    decoder_evaluations: int = 0
    batched_decoder_calls: int = 0
    parallel_fallbacks: int = 0
    controlnet_evaluations: int = 0
    controlnet_reused: int = 0
    noise_injections: int = 0
    shallow_layers: int | None = None
    forecasts: int = 0
    guidance_reused: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON reports."""
        return asdict(self)

    def summary(self) -> str:
        """The key steps and the UNet passes, as ``diffaccel generate`` prints them.

        Example:
            >>> print(EncoderReuseStats(4, (0, 2), True, 2, 4, 2, noise_injections=0).summary())
            key steps: [0, 2]
            UNet encoder evaluations: 2/4, decoder evaluations: 4 in 2 calls (parallel)
        """
        layers = self.shallow_layers
        decoder = "decoder" if layers is None else f"shallow-path ({layers} decoder layer{'s' if layers > 1 else ''})"
        text = (f"key steps: {list(self.key_steps)}\n"
                f"UNet encoder evaluations: {self.encoder_evaluations}/{self.num_steps}, "
                f"{decoder} evaluations: {self.decoder_evaluations} in {self.batched_decoder_calls} calls"
                f"{' (parallel)' if self.parallel else ''}")
        text += f", {self.forecasts} forecast features" if self.forecasts else ""
        return text + (f"\nguidance reused (conditional half only) at {self.guidance_reused} steps"
                       if self.guidance_reused else "")


@dataclass
class _Precomputed:
    timestep: torch.Tensor
    inputs: dict[str, Any]
    output: torch.Tensor


@dataclass
class _ReuseState:
    """State shared by the hooks of one UNet during one pipeline call."""

    config: EncoderReuseConfig
    active: bool = False
    parallel: bool = False
    pipe: Any = None
    mode: str = "passthrough"  # "capture" | "replay" | "passthrough"
    key_batch: int = 0  # batch of one step's input in a batched call
    expand: int = 1  # how many steps a batched call holds
    step: int = 0
    num_steps: int | None = None
    key_steps: frozenset[int] = frozenset()
    loop_timesteps: torch.Tensor | None = None
    features: dict[str, Any] = field(default_factory=dict)
    previous_features: dict[str, Any] = field(default_factory=dict)  # the key step before (forecasting)
    key_history: list[int] = field(default_factory=list)
    cached_batch: int = 0
    next_key: int = 0  # adaptive: the next key step
    rows: slice | None = None  # guidance reuse: the rows of the cached features a non-key step replays
    precomputed: dict[int, _Precomputed] = field(default_factory=dict)
    controlnet: tuple[Any, Any] | None = None  # (output, conditioning_scale) of the last key step
    initial_noise: torch.Tensor | None = None
    scheduler_steps: int = 0
    stats: EncoderReuseStats = field(default_factory=EncoderReuseStats)

    def start(self, pipe: Any, parallel: bool) -> None:
        self.active, self.pipe, self.parallel = True, pipe, parallel
        self.step, self.num_steps, self.key_steps, self.loop_timesteps = 0, None, frozenset(), None
        self.scheduler_steps, self.initial_noise, self.controlnet = 0, None, None
        self.features, self.previous_features, self.precomputed, self.key_history = {}, {}, {}, []
        self.next_key, self.cached_batch = 0, 0
        self.stats = EncoderReuseStats(parallel=parallel, shallow_layers=self.config.shallow_layers)

    def finish(self) -> EncoderReuseStats:
        stats = self.stats
        self.active, self.pipe, self.mode = False, None, "passthrough"
        self.features, self.previous_features, self.precomputed, self.controlnet = {}, {}, {}, None
        self.loop_timesteps, self.initial_noise = None, None
        return stats

    def ensure_schedule(self) -> None:
        """Fix the loop length and key steps at the first hooked call of a pipeline call."""
        if self.num_steps is not None:
            return
        num_steps = int(loop_length(self.pipe))
        self.num_steps, self.stats.num_steps = num_steps, num_steps
        if not self.config.schedule.adaptive:
            key_steps = self.config.schedule.key_steps(num_steps)
            self.key_steps, self.stats.key_steps = frozenset(key_steps), tuple(key_steps)

    @property
    def adaptive(self) -> bool:
        return self.config.schedule.adaptive

    def is_key(self, step: int) -> bool:
        if self.adaptive:
            return step >= self.next_key
        return step in self.key_steps

    def begin_key_step(self, batch: int) -> None:
        """Start caching a key step's features (the previous key step's are kept for forecasting
        and for the adaptive schedule's rate of change)."""
        keep = self.config.forecast or self.adaptive
        self.previous_features = self.features if keep else {}
        self.features, self.precomputed, self.cached_batch = {}, {}, batch
        self.key_history.append(self.step)
        self.stats.encoder_evaluations += 1
        if self.adaptive:
            self.stats.key_steps += (self.step,)

    def place_next_key(self, deepest: str) -> None:
        """Adaptive schedule, after a key step: the next key step, from the relative change of the
        deepest cached feature (the mid block's output) since the previous key step, per step."""
        schedule = self.config.schedule
        if len(self.key_history) < schedule.min_key_steps:
            self.next_key = self.step + 1
            return
        changes = []
        now, then = self.features.get(deepest), self.previous_features.get(deepest)
        if now is not None and then is not None:
            for a, b in zip(pytree.tree_leaves(now), pytree.tree_leaves(then)):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    changes.append(float((a - b).abs().mean() / a.abs().mean().clamp_min(1e-12)))
        gap = self.key_history[-1] - self.key_history[-2]
        rate = sum(changes) / len(changes) / gap if changes else 0.0
        self.next_key = self.step + schedule.interval(rate)

    def replay(self, key: str, boundary: bool) -> Any:
        """A cached feature for this non-key step: as captured, or extrapolated to this step from
        the last two key steps (``forecast=1``, boundary features only)."""
        feature = self.features[key]
        previous = self.previous_features.get(key)
        if not (boundary and self.config.forecast and previous is not None and len(self.key_history) >= 2):
            return feature
        before, last = self.key_history[-2:]
        ratio = (self.step - last) / (last - before)
        self.stats.forecasts += 1
        return tree_map_tensor_pairs(lambda now, then: now + (now - then) * ratio, feature, previous)


def _repeat_batch(obj: Any, batch: int, times: int) -> Any:
    """Repeat every tensor whose first dimension is ``batch`` ``times`` times along it."""
    if times == 1:
        return obj

    def repeat(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0 or t.shape[0] != batch:
            return t
        return t.repeat(times, *([1] * (t.ndim - 1)))

    return tree_map_tensors(repeat, obj)


def _take_batch(obj: Any, total: int, keep: int) -> Any:
    """Keep the first ``keep`` rows of every tensor whose first dimension is ``total``."""
    return tree_map_tensors(lambda t: t[:keep] if t.ndim > 0 and t.shape[0] == total else t, obj)


def _rows(obj: Any, total: int, rows: slice) -> Any:
    """``rows`` of every tensor whose first dimension is ``total``."""
    return tree_map_tensors(lambda t: t[rows] if t.ndim > 0 and t.shape[0] == total else t, obj)


def _same_timestep(a: Any, b: torch.Tensor) -> bool:
    a = torch.as_tensor(a).flatten()
    return bool(torch.all(a.to(b.device, torch.float64) == b.to(torch.float64)))


class _FeatureHook(ModelHook):
    """On a replayed module (``conv_in``, a down block, the mid block; with deep reuse also decoder
    layers): capture outputs at key steps, replay them after (``boundary``: a computed module reads
    the output, so it is the one forecast)."""

    def __init__(self, state: _ReuseState, key: str, boundary: bool = True) -> None:
        super().__init__()
        self.state, self.key, self.boundary = state, key, boundary

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state, original = self.state, self.fn_ref.original_forward
        if not state.active or state.mode == "passthrough":
            return original(*args, **kwargs)
        if state.mode == "replay":
            feature = state.replay(self.key, self.boundary)
            if state.rows is not None:  # guidance reuse: the conditional half of the batch only
                feature = _rows(feature, state.cached_batch, state.rows)
            return _repeat_batch(feature, state.key_batch, state.expand)
        if state.expand == 1:
            output = original(*args, **kwargs)
            state.features[self.key] = output
            return output
        # Batched key step: the encoder runs on the key step's own rows only, the decoder on all.
        total = state.key_batch * state.expand
        args, kwargs = _take_batch((args, kwargs), total, state.key_batch)
        output = original(*args, **kwargs)
        state.features[self.key] = output
        return _repeat_batch(output, state.key_batch, state.expand)


class _ControlNetHook(ModelHook):
    """On the ControlNet: non-key steps reuse the key step's residuals (the UNet skips its encoder there)."""

    def __init__(self, state: _ReuseState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state, original = self.state, self.fn_ref.original_forward
        if not state.active:
            return original(*args, **kwargs)
        state.ensure_schedule()
        scale = kwargs.get("conditioning_scale", 1.0)
        if not state.is_key(state.step) and state.controlnet is not None and state.controlnet[1] == scale:
            state.stats.controlnet_reused += 1
            return state.controlnet[0]
        # A key step, or a conditioning scale that changed since the key step
        # (control_guidance_start/end): compute.
        output = original(*args, **kwargs)
        state.stats.controlnet_evaluations += 1
        if state.is_key(state.step):
            state.controlnet = (output, scale)
        return output


class _UNetHook(ModelHook):
    """On the UNet: counts denoising steps and runs each as a key step or a decoder-only step."""

    _is_stateful = True

    def __init__(self, state: _ReuseState, deepest: str) -> None:
        super().__init__()
        self.state, self.deepest = state, deepest
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(module.forward)
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.finish()
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state, original = self.state, self.fn_ref.original_forward
        if not state.active:
            return original(*args, **kwargs)
        inputs = dict(self._signature.bind(*args, **kwargs).arguments)
        return_dict = inputs.pop("return_dict", True)
        if inputs.get("down_intrablock_additional_residuals") is not None:
            raise UnsupportedCombinationError(
                "encoder reuse cannot be combined with T2I-Adapter residuals "
                "(down_intrablock_additional_residuals): they are added inside the skipped encoder"
            )
        state.ensure_schedule()
        step = state.step
        if step >= state.num_steps:
            raise UnsupportedCombinationError(
                f"the UNet was called {step + 1} times in a {state.num_steps}-step denoising loop: encoder reuse "
                "needs exactly one UNet call per step (pipelines that call it more often are not supported)"
            )
        if step == 0:
            state.loop_timesteps = self._locate_loop_timesteps(inputs["timestep"])
            if state.loop_timesteps is None:  # future timesteps unknown: decode step by step
                state.parallel = state.stats.parallel = False
        elif state.loop_timesteps is not None and not _same_timestep(inputs["timestep"], state.loop_timesteps[step]):
            raise UnsupportedCombinationError(
                f"denoising step {step} called the UNet at timestep {float(torch.as_tensor(inputs['timestep']).flatten()[0])}, "
                f"expected {float(state.loop_timesteps[step])}: encoder reuse needs one UNet call per step"
            )
        try:
            if state.is_key(step):
                sample = self._key_step(original, inputs)
                if state.adaptive:
                    state.place_next_key(self.deepest)
            else:
                sample = self._reuse_step(original, inputs)
        finally:
            state.mode = "passthrough"
        state.step += 1
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)

    def _locate_loop_timesteps(self, timestep: Any) -> torch.Tensor | None:
        """The timesteps of the pipeline's loop: the scheduler's, from the first call's timestep on."""
        state = self.state
        timesteps = state.pipe.scheduler.timesteps
        matches = (timesteps.to(torch.float64) == float(torch.as_tensor(timestep).flatten()[0])).nonzero()
        if len(matches) == 0 or len(timesteps) - int(matches[0]) < state.num_steps:
            return None
        start = int(matches[0])
        return timesteps[start : start + state.num_steps]

    def _steps_to_batch(self, step: int) -> list[int]:
        """The non-key steps after ``step`` whose decoder passes can join its call."""
        state = self.state
        if not state.parallel:
            return []
        limit = state.config.max_parallel_steps or state.num_steps
        steps = []
        for later in range(step + 1, min(state.num_steps, step + limit)):
            if state.is_key(later):
                break
            steps.append(later)
        return steps

    def _key_step(self, original: Callable[..., Any], inputs: dict[str, Any]) -> torch.Tensor:
        state = self.state
        state.begin_key_step(inputs["sample"].shape[0])
        output = self._decode(original, inputs, "capture")
        half = self._guidance_half(inputs)
        if half:
            state.features[GUIDANCE_KEY] = output[half:] - output[:half]
        return output

    def _guidance_half(self, inputs: dict[str, Any]) -> int:
        """With ``reuse_guidance``, the size of each half of a classifier-free-guidance batch
        ``[uncond, cond]`` (the pipeline guides and both halves hold the same latents); else 0."""
        state = self.state
        if not state.config.reuse_guidance or not getattr(state.pipe, "do_classifier_free_guidance", False):
            return 0
        sample = inputs["sample"]
        half = sample.shape[0] // 2
        if sample.shape[0] % 2 or not torch.equal(sample[:half], sample[half:]):
            return 0
        return half

    def _reuse_guided(self, original: Callable[..., Any], inputs: dict[str, Any], half: int) -> torch.Tensor:
        """A non-key step on the conditional half only: the unconditional output is the conditional
        one minus the key step's guidance difference (forecast like the features)."""
        state = self.state
        state.stats.batched_decoder_calls += 1
        state.stats.decoder_evaluations += 1
        state.stats.guidance_reused += 1
        state.mode, state.rows = "replay", slice(half, None)
        try:
            output = original(**_rows(inputs, 2 * half, state.rows), return_dict=False)[0]
        finally:
            state.rows = None
        difference = state.replay(GUIDANCE_KEY, True)
        return torch.cat([output - difference.to(output.dtype), output])

    def _check_batch(self, inputs: dict[str, Any]) -> None:
        cached_batch = self.state.cached_batch
        if inputs["sample"].shape[0] != cached_batch:
            raise UnsupportedCombinationError(
                f"the UNet batch changed from {cached_batch} at the key step to {inputs['sample'].shape[0]} at step "
                f"{self.state.step}: cached encoder features cannot be reused across batch sizes"
            )

    def _reuse_step(self, original: Callable[..., Any], inputs: dict[str, Any]) -> torch.Tensor:
        state = self.state
        if not state.features:
            raise UnsupportedCombinationError(f"step {state.step} is not a key step but no encoder features are cached")
        self._check_batch(inputs)
        half = self._guidance_half(inputs)
        if half and GUIDANCE_KEY in state.features:
            return self._reuse_guided(original, inputs, half)
        ready = state.precomputed.pop(state.step, None)
        if ready is not None:
            rest = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
            if _same_timestep(inputs["timestep"], ready.timestep) and same_tree(rest, ready.inputs):
                return ready.output
            # The step's conditioning differs from the call that precomputed it: decode it (and the
            # steps after it) again from this step's inputs.
            state.stats.parallel_fallbacks += 1
            state.precomputed = {}
        return self._decode(original, inputs, "replay")

    def _decode(self, original: Callable[..., Any], inputs: dict[str, Any], mode: str) -> torch.Tensor:
        """Run this step's UNet call in ``mode``; with parallel decoding, batch the following
        non-key steps' decoder passes into it and keep their outputs for later."""
        state = self.state
        ahead = self._steps_to_batch(state.step)
        state.stats.batched_decoder_calls += 1
        state.stats.decoder_evaluations += 1 + len(ahead)
        state.mode = mode
        if not ahead:
            return original(**inputs, return_dict=False)[0]

        sample, timestep = inputs["sample"], inputs["timestep"]
        batch, times = sample.shape[0], 1 + len(ahead)
        step_timesteps = torch.stack(
            [torch.as_tensor(timestep).flatten()[0].to(state.loop_timesteps.dtype).to(sample.device)]
            + [state.loop_timesteps[j].to(sample.device) for j in ahead]
        )
        batched = _repeat_batch({k: v for k, v in inputs.items() if k != "timestep"}, batch, times)
        batched["timestep"] = step_timesteps.repeat_interleave(batch)
        state.key_batch, state.expand = batch, times
        try:
            outputs = original(**batched, return_dict=False)[0].chunk(times)
        finally:
            state.expand = 1
        reference = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
        for j, output in zip(ahead, outputs[1:]):
            state.precomputed[j] = _Precomputed(state.loop_timesteps[j], reference, output)
        return outputs[0]


class EncoderReuse(AttachedFeature):
    """Encoder propagation installed on a pipeline's UNet (and ControlNet); see the module docs.

    Its cached encoder features span the whole batch, so it does not support chunked batches."""

    supports_chunked_batches = False

    def __init__(self, config: EncoderReuseConfig, pipe: Any) -> None:
        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, UNet2DConditionModel):
            raise UnsupportedPipelineError(
                f"encoder reuse needs a pipeline whose denoiser is a UNet2DConditionModel (StableDiffusion, "
                f"StableDiffusionXL, their img2img/inpaint/ControlNet variants); {type(pipe).__name__} has "
                f"{type(unet).__name__ if unet is not None else 'no unet'}"
            )
        base_names = {cls.__name__ for cls in type(pipe).__mro__}
        for name, reason in _UNSUPPORTED_PIPELINES.items():
            if name in base_names:
                raise UnsupportedPipelineError(f"encoder reuse does not support {name}: {reason}")
        self.config = config
        self.unet = unet
        self.controlnet = getattr(pipe, "controlnet", None)
        self.state = _ReuseState(config)
        self._scheduler_wrap = contextlib.ExitStack()
        self._modules: list[tuple[torch.nn.Module, str]] = []
        if config.shallow_layers is not None and config.shallow_layers >= max_shallow_layers(unet):
            raise UnsupportedCombinationError(
                f"shallow_layers={config.shallow_layers} leaves nothing to replay: this UNet's decoder has "
                f"{max_shallow_layers(unet)} layers (use 1 to {max_shallow_layers(unet) - 1})"
            )
        detach_from_modules(unet, self.controlnet)
        plan = reuse_plan(unet, config.shallow_layers)
        for replayed in plan:
            self._hook(replayed.module, _FeatureHook(self.state, replayed.key, replayed.boundary), FEATURE_HOOK)
        # The adaptive schedule's signal: the deepest feature, cached in every mode.
        deepest = "mid_block" if unet.mid_block is not None else f"down_blocks.{len(unet.down_blocks) - 1}"
        if isinstance(self.controlnet, torch.nn.Module):
            self._hook(self.controlnet, _ControlNetHook(self.state), CONTROLNET_HOOK)
        # The UNet hook goes last so that it wraps whatever forward the module had.
        self._hook(unet, _UNetHook(self.state, deepest), UNET_HOOK)

    def _hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        add_hook(module, hook, name)
        self._modules.append((module, name))

    def begin_call(self, pipe: Any, call_kwargs: Mapping[str, Any]) -> None:
        steps = call_kwargs.get("num_inference_steps")
        if isinstance(steps, int) and steps > 0 and not self.config.schedule.adaptive:
            self.config.schedule.key_steps(steps)  # an explicit schedule out of range fails before any model work
        parallel = self.config.parallel
        if parallel is None:
            config = self.config
            fixed_inputs = config.shallow_layers is None and not config.schedule.adaptive and not config.reuse_guidance
            parallel = fixed_inputs and self.unet.device.type == "cuda"
        self.state.start(pipe, parallel)
        if self.config.noise_injection > 0:
            config = self.config
            self._scheduler_wrap.enter_context(
                prior_noise_injection(self.state, pipe.scheduler, config.noise_injection, config.noise_injection_below)
            )

    def end_call(self) -> EncoderReuseStats:
        self._scheduler_wrap.close()
        return self.state.finish()

    def reindex(self, indices: torch.Tensor) -> None:
        """Reorder the per-sample caches with the samples (particle resampling): the key step's
        encoder features, precomputed decoder outputs, ControlNet residuals and the initial noise."""
        state = self.state
        state.features = reindex_batch(state.features, indices)
        state.previous_features = reindex_batch(state.previous_features, indices)
        state.precomputed = {
            step: _Precomputed(ready.timestep, reindex_batch(ready.inputs, indices), reindex_batch(ready.output, indices))
            for step, ready in state.precomputed.items()
        }
        if state.controlnet is not None:
            state.controlnet = (reindex_batch(state.controlnet[0], indices), state.controlnet[1])
        if state.initial_noise is not None:
            state.initial_noise = reindex_batch(state.initial_noise, indices)

    def detach(self, pipe: Any) -> None:
        for module, name in reversed(self._modules):
            remove_hook(module, name)
        self._modules = []


def detach_from_modules(unet: torch.nn.Module, controlnet: Any = None) -> None:
    """Remove any encoder-reuse hooks from a UNet (and ControlNet), e.g. left by a shared pipeline."""
    modules = [unet, *unet.modules()]
    if isinstance(controlnet, torch.nn.Module):
        modules.append(controlnet)
    for module in modules:
        for name in (UNET_HOOK, FEATURE_HOOK, CONTROLNET_HOOK):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and name in registry.hooks:
                remove_hook(module, name)
