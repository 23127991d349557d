"""Temporal delta cache: bit-identical when off, skip counts follow the documented rule, per-branch
state, reset per call, reindexing, configs, unsupported pipelines, composition."""

from __future__ import annotations

import contextlib
import functools
import math
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

import diffaccel
from diffaccel import QuantizedAttentionConfig, UnsupportedCombinationError, UnsupportedPipelineError
from diffaccel.features.delta_cache import BLOCK_HOOK, DENOISER_HOOK, DeltaCache, DeltaCacheConfig, DeltaCacheStats
from diffaccel.rewards import FunctionReward
from diffaccel.steering import FKSteeringConfig, steer
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

INF = float("inf")
PROMPT = "a red circle"

# case -> (tiny pipeline, extra call kwargs, the cache contexts the pipeline runs its denoiser under:
# one per CFG branch that is a separate call; "default" where it sets none)
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "pixart-sigma": ("pixart-sigma", {}, ("default",)),  # CFG batched, no context
    "sd3": ("sd3", {}, ("default",)),  # CFG batched, no context
    "flux": ("flux", {}, ("cond",)),  # no CFG
    "flux-true-cfg": ("flux", {"negative_prompt": "blurry", "true_cfg_scale": 2.0}, ("cond", "uncond")),
    "cogvideox": ("cogvideox", {}, ("cond_uncond",)),  # CFG batched under one context
    "wan": ("wan", {}, ("cond", "uncond")),  # guidance 5: two calls per step
    "ltx": ("ltx", {}, ("cond_uncond",)),  # CFG batched under one context
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine its OpenMP
    barriers stall whenever the other core is taken."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _pipe(name: str) -> Any:
    return tiny_pipeline(name)


def _run(case: str, steps: int = 6, seed: int = 0, pipe: Any = None) -> torch.Tensor:
    name, extra, _ = CASES[case]
    pipe = pipe if pipe is not None else _pipe(name)
    result = pipe(
        PROMPT,
        num_inference_steps=steps,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **tiny_call_inputs(name),
        **extra,
    )
    return result.images if hasattr(result, "images") else result.frames


@functools.lru_cache(maxsize=None)
def _untouched_pipe(name: str) -> Any:
    """A second copy (same weights) that diffaccel never touches, for the reference outputs."""
    return tiny_pipeline(name)


@functools.lru_cache(maxsize=None)
def _baseline(case: str, steps: int = 6, seed: int = 0) -> torch.Tensor:
    return _run(case, steps, seed, pipe=_untouched_pipe(CASES[case][0]))


@contextlib.contextmanager
def _accelerated(name: str, *configs: Any) -> Iterator[Any]:
    pipe = diffaccel.accelerate(_pipe(name), *configs)
    try:
        yield pipe
    finally:
        diffaccel.restore(pipe)


def _num_blocks(name: str) -> int:
    transformer = _pipe(name).transformer
    lists = ("transformer_blocks", "single_transformer_blocks", "blocks")
    return sum(len(getattr(transformer, attr, ())) for attr in lists)


def _stats(pipe: Any) -> DeltaCacheStats:
    return pipe.acceleration_stats.features["delta_cache"]


def expected_skip_steps(
    num_steps: int, first: int, last: int, max_skips: int, steps: range | None = None
) -> list[int]:
    """The steps at which a block skips when every predicted change is below the threshold,
    by the rule in the module docs: a cache exists after the first computed step, steps outside
    ``[first, num_steps - last)`` compute, and a block computes after ``max_skips`` skips in a row.
    ``steps``: the steps its denoiser runs (default: all)."""
    skips, cached, run = [], False, 0
    for step in steps if steps is not None else range(num_steps):
        if cached and first <= step < num_steps - last and run < max_skips:
            skips.append(step)
            run += 1
        else:
            cached, run = True, 0
    return skips


def _no_hooks_left(denoiser: torch.nn.Module) -> bool:
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and (DENOISER_HOOK in registry.hooks or BLOCK_HOOK in registry.hooks):
            return False
    return True


@pytest.mark.parametrize("case", CASES)
def test_threshold_zero_is_bit_identical(case):
    name, _, branches = CASES[case]
    with _accelerated(name, DeltaCacheConfig(threshold=0.0)) as pipe:
        output = _run(case, pipe=pipe)
        stats = _stats(pipe)
    assert torch.equal(output, _baseline(case))
    assert stats.blocks_skipped == 0
    assert stats.blocks_computed == _num_blocks(name) * len(branches) * 6
    assert stats.skipped_per_step == [0] * 6


@pytest.mark.parametrize("case", CASES)
def test_restore_gives_back_the_untouched_output(case):
    name = CASES[case][0]
    with _accelerated(name, DeltaCacheConfig(threshold=INF)) as pipe:
        skipped = _run(case, pipe=pipe)
    assert not torch.equal(skipped, _baseline(case))
    assert _no_hooks_left(pipe.transformer)
    assert torch.equal(_run(case), _baseline(case))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "steps,max_skips,first,last", [(6, 1, 1, 1), (7, 2, 1, 1), (6, 3, 0, 2), (5, 2, 2, 0), (3, 2, 2, 1)]
)
def test_skip_counts_follow_the_rule(case, steps, max_skips, first, last):
    name, _, branches = CASES[case]
    config = DeltaCacheConfig(threshold=INF, max_consecutive_skips=max_skips, first_steps=first, last_steps=last)
    with _accelerated(name, config) as pipe:
        output = _run(case, steps, pipe=pipe)
        stats = _stats(pipe)
    per_step = _num_blocks(name) * len(branches)
    skip_steps = expected_skip_steps(steps, first, last, max_skips)
    assert stats.num_steps == steps
    assert stats.branches == branches
    assert stats.blocks == _num_blocks(name)
    assert stats.skipped_per_step == [per_step if s in skip_steps else 0 for s in range(steps)]
    assert stats.blocks_skipped == per_step * len(skip_steps)
    assert stats.blocks_computed == per_step * (steps - len(skip_steps))
    assert stats.skipped_fraction == pytest.approx(len(skip_steps) / steps)
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("case", ["sd3", "flux", "wan", "cogvideox"])
def test_skipping_stays_close_to_the_untouched_output(case):
    name = CASES[case][0]
    with _accelerated(name, DeltaCacheConfig(threshold=INF)) as pipe:
        output = _run(case, steps=8, pipe=pipe)
    baseline, other_seed = _baseline(case, 8), _baseline(case, 8, seed=1)
    assert torch.isfinite(output).all()
    error = float((output - baseline).norm())
    assert error > 0
    # Much closer to the untouched output than an independent sample is.
    assert error < 0.1 * float((other_seed - baseline).norm())


@pytest.mark.parametrize("threshold", [0.0, INF])
def test_sd3_skip_layer_guidance_calls_run_uncached(threshold):
    steps, start, stop, skip_layers = 6, 0.0, 1.0, [1]
    extra = dict(skip_guidance_layers=skip_layers, skip_layer_guidance_start=start, skip_layer_guidance_stop=stop)
    pipe = _untouched_pipe("sd3")
    call = dict(num_inference_steps=steps, output_type="latent", **tiny_call_inputs("sd3"), **extra)
    baseline = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    with _accelerated("sd3", DeltaCacheConfig(threshold=threshold)) as accelerated:
        output = accelerated(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
        stats = _stats(accelerated)
    blocks = _num_blocks("sd3")
    guidance_calls = sum(1 for i in range(steps) if steps * start < i < steps * stop)  # the pipeline's condition
    skipped = blocks * len(expected_skip_steps(steps, 1, 1, 2)) if threshold else 0
    assert stats.branches == ("default",)
    assert stats.blocks_skipped == skipped
    assert stats.blocks_computed == blocks * steps - skipped + guidance_calls * (blocks - len(skip_layers))
    assert torch.equal(output, baseline) == (threshold == 0)


def test_every_pipeline_runs_with_the_default_config():
    for case, (name, _, branches) in CASES.items():
        with _accelerated(name, DeltaCacheConfig()) as pipe:
            output = _run(case, steps=8, pipe=pipe)
            stats = _stats(pipe)
        assert torch.isfinite(output).all(), case
        assert stats.blocks_computed + stats.blocks_skipped == _num_blocks(name) * len(branches) * 8, case
        assert stats.skipped_per_step[0] == stats.skipped_per_step[-1] == 0, case


@pytest.mark.parametrize("threshold", [0.0, INF])
def test_two_stage_wan_caches_each_transformer(threshold):
    """Wan 2.2's high-noise ``transformer`` and low-noise ``transformer_2`` each get a cache; the
    second starts empty at the boundary step."""
    from diffusers import WanPipeline

    def two_stage() -> Any:
        base = tiny_pipeline("wan")
        parts = {key: getattr(base, key) for key in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")}
        pipe = WanPipeline(**parts, transformer_2=tiny_pipeline("wan", seed=1).transformer, boundary_ratio=0.75)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    steps = 8
    untouched = _run("wan", steps, pipe=two_stage())
    pipe = diffaccel.accelerate(two_stage(), DeltaCacheConfig(threshold=threshold))
    output = _run("wan", steps, pipe=pipe)
    stats = _stats(pipe)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps  # the pipeline's rule
    high = [i for i, t in enumerate(pipe.scheduler.timesteps) if t >= boundary]
    assert 2 < len(high) < steps - 2  # both stages have steps to skip
    stages = (range(0, len(high)), range(len(high), steps))
    skip_steps = [s for stage in stages for s in expected_skip_steps(steps, 1, 1, 2, stage)] if threshold else []
    per_step = _num_blocks("wan") * 2
    assert stats.skipped_per_step == [per_step if s in skip_steps else 0 for s in range(steps)]
    assert torch.equal(output, untouched) == (threshold == 0)
    diffaccel.restore(pipe)
    assert _no_hooks_left(pipe.transformer) and _no_hooks_left(pipe.transformer_2)


def test_a_threshold_between_changes_skips_some_blocks_only():
    # Tiny thresholds skip nothing, an infinite one everything allowed; the predicted change decides between.
    counts = []
    for threshold in (1e-9, 0.05, INF):
        with _accelerated("wan", DeltaCacheConfig(threshold=threshold, max_consecutive_skips=8)) as pipe:
            _run("wan", steps=8, pipe=pipe)
            counts.append(_stats(pipe).blocks_skipped)
    assert counts[0] == 0
    assert counts == sorted(counts)
    assert counts[-1] == _num_blocks("wan") * 2 * len(expected_skip_steps(8, 1, 1, 8))


def _captured_denoiser_call(name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of the untouched pipeline's first denoiser call."""
    captured = []
    transformer = _untouched_pipe(name).transformer
    handle = transformer.register_forward_pre_hook(lambda m, a, k: captured.append((a, k)), with_kwargs=True)
    try:
        _run(next(c for c, spec in CASES.items() if spec[0] == name), steps=2, pipe=_untouched_pipe(name))
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("name", sorted({spec[0] for spec in CASES.values()}))
def test_a_skipped_block_replays_its_own_output(name):
    """Given the same inputs again, every skipped block returns input + cached residual = its
    step-0 output, in its own return format (both streams of dual-stream blocks)."""
    args, kwargs = _captured_denoiser_call(name)
    block_outputs: dict[str, list[Any]] = {}
    with torch.no_grad():
        reference = _untouched_pipe(name).transformer(*args, **kwargs)[0]
        with _accelerated(name, DeltaCacheConfig(threshold=INF)) as pipe:
            handles = [
                module.register_forward_hook(lambda m, a, out, k=key: block_outputs.setdefault(k, []).append(out))
                for key, module in pipe.transformer.named_modules()
                if BLOCK_HOOK in getattr(getattr(module, "_diffusers_hook", None), "hooks", ())
            ]
            feature = pipe._diffaccel_features[0]
            feature.begin_call(SimpleNamespace(transformer=pipe.transformer, _num_timesteps=4), {})
            outputs = [pipe.transformer(*args, **kwargs)[0] for _ in range(2)]
            stats = feature.end_call()
            for handle in handles:
                handle.remove()
    assert stats.skipped_per_step == [0, _num_blocks(name), 0, 0]
    assert torch.equal(outputs[0], reference)
    torch.testing.assert_close(outputs[1], reference, atol=1e-5, rtol=1e-5)
    assert len(block_outputs) == _num_blocks(name)
    for computed, replayed in block_outputs.values():
        assert type(replayed) is type(computed)
        if isinstance(computed, tuple):
            assert [x is None for x in replayed] == [x is None for x in computed]
            for x, y in zip(computed, replayed):
                if x is not None:
                    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(replayed, computed, atol=1e-5, rtol=1e-5)


def _steps(
    name: str, calls: list[dict[str, Any]], config: DeltaCacheConfig
) -> tuple[list[torch.Tensor], DeltaCacheStats]:
    """Run the denoiser once per step with each call's arguments, as one pipeline call of 4 steps."""
    with torch.no_grad(), _accelerated(name, config) as pipe:
        feature = pipe._diffaccel_features[0]
        feature.begin_call(SimpleNamespace(transformer=pipe.transformer, _num_timesteps=4), {})
        outputs = [pipe.transformer(**kwargs)[0] for kwargs in calls]
        return outputs, feature.end_call()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_dual_stream_blocks_predict_from_both_streams(name):
    """Same latents, new text: the image stream entering the first block is unchanged, the text
    stream is not, so a dual-stream block must compute (and the output is the untouched one)."""
    args, kwargs = _captured_denoiser_call(name)
    assert not args
    text = kwargs["encoder_hidden_states"]
    noise = torch.randn(text.shape, generator=torch.Generator().manual_seed(1))
    changed = dict(kwargs, encoder_hidden_states=text + text.std() * noise)
    outputs, stats = _steps(name, [kwargs, changed], DeltaCacheConfig(threshold=0.01))
    with torch.no_grad():
        reference = _untouched_pipe(name).transformer(**changed)[0]
    assert stats.blocks_skipped == 0
    assert torch.equal(outputs[1], reference)


def test_a_changed_batch_size_recomputes():
    generator = torch.Generator().manual_seed(0)
    one = dict(
        hidden_states=torch.randn(1, 16, 3, 4, 4, generator=generator),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=generator),
        return_dict=False,
    )
    two = {key: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for key, v in one.items()}
    outputs, stats = _steps("wan", [one, two, two], DeltaCacheConfig(threshold=INF))
    with torch.no_grad():
        reference = _untouched_pipe("wan").transformer(**two)[0]
    assert stats.skipped_per_step == [0, 0, _num_blocks("wan"), 0]  # step 1 recomputes, step 2 may skip
    assert torch.equal(outputs[1], reference)


def test_cfg_branches_keep_separate_caches():
    """Repeating a branch's step-0 inputs at step 1 replays that branch's own residuals, so each
    branch gets back its own step-0 output; one shared cache would hand cond the uncond residuals."""
    transformer = _pipe("wan").transformer
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 4, 4, generator=generator)
    texts = {branch: torch.randn(1, 16, 32, generator=generator) for branch in ("cond", "uncond")}
    timestep = torch.tensor([500.0])
    with torch.no_grad(), _accelerated("wan", DeltaCacheConfig(threshold=INF, max_consecutive_skips=4)) as pipe:
        feature = pipe._diffaccel_features[0]
        feature.begin_call(pipe, {})
        outputs = {}
        for step in (0, 1):
            for branch, text in texts.items():
                with transformer.cache_context(branch, step_index=step, num_inference_steps=4):
                    outputs[branch, step] = transformer(
                        hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False
                    )[0]
        stats = feature.end_call()
    assert stats.branches == ("cond", "uncond")
    assert stats.skipped_per_step == [0, 2 * _num_blocks("wan"), 0, 0]
    assert not torch.allclose(outputs["cond", 0], outputs["uncond", 0], atol=1e-3)
    for branch in texts:
        torch.testing.assert_close(outputs[branch, 1], outputs[branch, 0], atol=1e-5, rtol=1e-5)


def test_reindex_reorders_the_cached_samples():
    transformer = _pipe("wan").transformer
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 3, 4, 4, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    timestep = torch.tensor([500.0, 500.0])
    order = torch.tensor([1, 0])

    def step(index: int, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with transformer.cache_context("cond", step_index=index, num_inference_steps=4):
            inputs = dict(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
            return transformer(**inputs)[0]

    with torch.no_grad(), _accelerated("wan", DeltaCacheConfig(threshold=INF)) as pipe:
        feature = pipe._diffaccel_features[0]
        for reindex in (False, True):
            feature.begin_call(pipe, {})
            first = step(0, latents, text)
            if reindex:
                feature.reindex(order)
            second = step(1, latents[order], text[order])
            stats = feature.end_call()
            assert stats.blocks_skipped == _num_blocks("wan")
            close = torch.allclose(second, first[order], atol=1e-5, rtol=1e-5)
            assert close == reindex  # without reindexing, sample 0 gets sample 1's residuals


def _selection_spread(pipe: Any, name: str) -> float:
    """FK steering where every particle copies the brightest at step 0: with a deterministic
    scheduler they stay identical only if the cached block inputs and residuals moved with them."""
    config = FKSteeringConfig(
        num_particles=3, potential="immediate", lmbda=1e6, resample_every=100, final_correction=False
    )
    reward = FunctionReward(lambda media, prompts: media.mean(dim=tuple(range(1, media.ndim))), name="brightness")
    with pytest.warns(UserWarning, match="deterministic"):
        out = steer(pipe, config, reward)(
            PROMPT, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt",
            **tiny_call_inputs(name),
        )
    assert out.stats.resampled_steps == [0] and len(set(out.stats.ancestry[0])) == 1
    media = out.images if hasattr(out, "images") else out.frames
    return float((media - media[:1]).abs().max())


@pytest.mark.parametrize("name", ["wan", "pixart-sigma"])  # CFG as two calls / CFG batched
def test_fk_steering_moves_the_caches_with_the_particles(name, monkeypatch):
    with _accelerated(name, DeltaCacheConfig(threshold=INF)) as pipe:
        assert _selection_spread(pipe, name) < 1e-5
        assert _stats(pipe).blocks_skipped > 0
        monkeypatch.setattr(DeltaCache, "reindex", lambda self, indices: None)
        assert _selection_spread(pipe, name) > 1e-3  # the check above can fail


@pytest.mark.filterwarnings("ignore:FlowMatchEulerDiscreteScheduler is deterministic")
def test_fk_steering_chunks_are_refused():
    config = FKSteeringConfig(num_particles=2, resample_every=1, max_batch=1)
    reward = FunctionReward(lambda media, prompts: media.mean(dim=tuple(range(1, media.ndim))))
    with _accelerated("wan", DeltaCacheConfig()) as pipe:
        with pytest.raises(UnsupportedCombinationError, match="max_batch"):
            steer(pipe, config, reward)(PROMPT, num_inference_steps=3, output_type="pt", **tiny_call_inputs("wan"))


def test_state_is_reset_between_calls():
    config = DeltaCacheConfig(threshold=0.05, max_consecutive_skips=3)
    with _accelerated("wan", config) as pipe:
        first = _run("wan", steps=8, pipe=pipe)
        first_stats = _stats(pipe).to_dict()
        _run("wan", steps=5, seed=3, pipe=pipe)  # a different call in between
        second = _run("wan", steps=8, pipe=pipe)
        second_stats = _stats(pipe).to_dict()
    assert first_stats["blocks_skipped"] > 0
    assert torch.equal(first, second)
    assert first_stats == second_stats


def test_the_denoiser_outside_a_pipeline_call_is_untouched():
    transformer = _pipe("wan").transformer
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 3, 4, 4, generator=generator),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=generator),
        return_dict=False,
    )
    with torch.no_grad():
        reference = transformer(**inputs)[0]
    with torch.no_grad(), _accelerated("wan", DeltaCacheConfig(threshold=INF)):
        outputs = [transformer(**inputs)[0] for _ in range(3)]
    for output in outputs:
        assert torch.equal(output, reference)


def test_block_lists_can_be_chosen():
    config = DeltaCacheConfig(threshold=INF, blocks=("single_transformer_blocks",))
    with _accelerated("flux", config) as pipe:
        _run("flux", steps=6, pipe=pipe)
        stats = _stats(pipe)
        hooked = [hasattr(block, "_diffusers_hook") for block in pipe.transformer.transformer_blocks]
    singles = len(_pipe("flux").transformer.single_transformer_blocks)
    assert stats.blocks == singles
    assert stats.blocks_skipped == singles * len(expected_skip_steps(6, 1, 1, 2))
    assert not any(hooked)
    with pytest.raises(UnsupportedCombinationError, match="single_transformer_blocks"):
        diffaccel.accelerate(_pipe("wan"), DeltaCacheConfig(blocks=("single_transformer_blocks",)))
    assert type(_pipe("wan")).__name__ == "WanPipeline"


def test_composes_with_quantized_attention():
    config = DeltaCacheConfig(threshold=INF)
    with _accelerated("flux", QuantizedAttentionConfig(impl="reference")) as pipe:
        _run("flux", pipe=pipe)
        attention_calls_alone = pipe.acceleration_stats.features["quantized_attention"].calls
    with _accelerated("flux", config, QuantizedAttentionConfig(impl="reference")) as pipe:
        output = _run("flux", pipe=pipe)
        stats = _stats(pipe)
        attention_calls = pipe.acceleration_stats.features["quantized_attention"].calls
    assert torch.isfinite(output).all()
    assert stats.blocks_skipped == _num_blocks("flux") * len(expected_skip_steps(6, 1, 1, 2))
    # Every block has one attention call, and skipped blocks make none.
    evaluations = stats.blocks_computed + stats.blocks_skipped
    assert attention_calls == attention_calls_alone * stats.blocks_computed // evaluations
    assert _no_hooks_left(pipe.transformer)


def test_composes_with_quantized_linear_layers():
    quantization = diffaccel.QuantizationConfig(precision="int8", min_weight_numel=0, impl="reference")
    outputs, skipped = {}, {}
    for threshold in (0.0, INF):
        with _accelerated("wan", quantization, DeltaCacheConfig(threshold=threshold)) as pipe:
            outputs[threshold] = _run("wan", pipe=pipe)
            skipped[threshold] = _stats(pipe).blocks_skipped
            assert pipe.acceleration_stats.features["quantization"] is not None
    with _accelerated("wan", quantization) as pipe:
        quantized_only = _run("wan", pipe=pipe)
    assert torch.equal(outputs[0.0], quantized_only)  # the block hooks change nothing when off
    assert skipped == {0.0: 0, INF: _num_blocks("wan") * 2 * len(expected_skip_steps(6, 1, 1, 2))}
    assert torch.isfinite(outputs[INF]).all() and not torch.equal(outputs[INF], quantized_only)


def test_saved_pipeline_loads_the_delta_cache_back(tmp_path):
    from diffaccel.acceleration import accelerated_class

    config = DeltaCacheConfig(threshold=0.1, max_consecutive_skips=3, blocks=("blocks",))
    pipe = diffaccel.accelerate(tiny_pipeline("wan"), config)
    pipe.save_pretrained(tmp_path)
    loaded = accelerated_class(type(diffaccel.restore(pipe))).from_pretrained(tmp_path)
    assert loaded.acceleration == (config,)
    _run("wan", pipe=loaded)
    assert _stats(loaded).blocks == _num_blocks("wan")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"threshold": "0.1"}, "threshold"),
        ({"threshold": True}, "threshold"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
        ({"max_consecutive_skips": 1.5}, "max_consecutive_skips"),
        ({"first_steps": -1}, "first_steps"),
        ({"last_steps": -2}, "last_steps"),
        ({"last_steps": None}, "last_steps"),
        ({"blocks": ()}, "blocks"),
        ({"blocks": ("",)}, "blocks"),
        ({"blocks": ("blocks", "blocks")}, "blocks"),
        ({"blocks": 3}, "blocks"),
    ],
)
def test_bad_configs_raise(kwargs, field):
    with pytest.raises(ValueError, match=f"DeltaCacheConfig.{field} must be"):
        DeltaCacheConfig(**kwargs)


def test_config_round_trips_through_dict():
    configs = (DeltaCacheConfig(), DeltaCacheConfig(0.2, 3, 2, 0, ["blocks"]), DeltaCacheConfig(threshold=INF))
    for config in configs:
        assert DeltaCacheConfig.from_dict(config.to_dict()) == config
    assert DeltaCacheConfig(blocks="blocks").blocks == ("blocks",)


def test_unsupported_pipeline_raises():
    pipe = tiny_pipeline("sd")
    pipe.unet = torch.nn.Linear(2, 2)  # a denoiser without transformer blocks
    with pytest.raises(UnsupportedPipelineError, match="Flux.*UNets.*Linear"):
        diffaccel.accelerate(pipe, DeltaCacheConfig())
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_replaced_transformer_gets_the_cache_at_the_next_call():
    pipe = diffaccel.accelerate(tiny_pipeline("wan"), DeltaCacheConfig(threshold=INF))
    original = pipe.transformer
    pipe.transformer = tiny_pipeline("wan", seed=1).transformer
    _run("wan", pipe=pipe)
    assert pipe.acceleration_stats.features["delta_cache"].blocks_skipped > 0
    assert not hasattr(original, "_diffusers_hook")  # detached from the transformer it replaced
    diffaccel.restore(pipe)
    assert not hasattr(pipe.transformer, "_diffusers_hook")


# ---- forecast, spans (F/B split) and shared branch decisions


@pytest.mark.parametrize("case", ["sd3", "flux", "wan", "pixart-sigma"])
@pytest.mark.parametrize("extra", [{"forecast": 1}, {"front_blocks": 1}, {"front_blocks": 1, "forecast": 1},
                                   {"share_branches": True}])
def test_threshold_zero_is_bit_identical_in_every_mode(case, extra):
    pipe = diffaccel.accelerate(tiny_pipeline(CASES[case][0]), DeltaCacheConfig(threshold=0.0, **extra))
    output = _run(case, pipe=pipe)  # a fresh pipeline: earlier tests reconfigure the shared Wan one
    assert _stats(pipe).blocks_skipped == 0
    assert torch.equal(output, _baseline(case))


@pytest.mark.parametrize("case", ["sd3", "flux", "flux-true-cfg", "wan", "cogvideox"])
@pytest.mark.parametrize("front,back", [(1, 0), (1, 1), (2, 1)])
def test_a_span_skips_its_middle_blocks_only(case, front, back):
    name, _, branches = CASES[case]
    blocks = _num_blocks(name)
    if front + back >= blocks:
        pytest.skip(f"{name} has {blocks} blocks")
    config = DeltaCacheConfig(threshold=INF, max_consecutive_skips=2, front_blocks=front, back_blocks=back)
    with _accelerated(name, config) as pipe:
        output = _run(case, steps=6, pipe=pipe)
        stats = _stats(pipe)
    middle = (blocks - front - back) * len(branches)
    skip_steps = expected_skip_steps(6, 1, 1, 2)
    assert stats.skipped_per_step == [middle if s in skip_steps else 0 for s in range(6)]
    assert stats.blocks_computed == blocks * len(branches) * 6 - middle * len(skip_steps)
    assert not torch.equal(output, _baseline(case)) and torch.isfinite(output).all()


def test_a_span_follows_the_front_residual_change():
    """A threshold between the front residual's changes skips at some steps and not others."""
    with _accelerated("sd3", DeltaCacheConfig(threshold=INF, front_blocks=1, max_consecutive_skips=9)) as pipe:
        _run("sd3", steps=8, pipe=pipe)
        everything = _stats(pipe).blocks_skipped
    with _accelerated("sd3", DeltaCacheConfig(threshold=1e-6, front_blocks=1)) as pipe:
        assert torch.equal(_run("sd3", steps=8, pipe=pipe), _baseline("sd3", 8))  # every step changes more
        assert _stats(pipe).blocks_skipped == 0
    assert everything > 0


@pytest.mark.parametrize("front", [0, 1])
def test_forecast_extrapolates_the_residual_and_order_zero_replays_it(front, monkeypatch):
    """With a forecast, a skipped block adds r2 + (s - s2)/(s2 - s1) * (r2 - r1): different from the
    replay, and on a denoiser whose residuals change linearly in the step exactly right."""
    config = dict(threshold=INF, max_consecutive_skips=1, front_blocks=front)
    outputs = {}
    for order in (0, 1):
        with _accelerated("sd3", DeltaCacheConfig(forecast=order, **config)) as pipe:
            outputs[order] = _run("sd3", steps=8, pipe=pipe)
    assert not torch.equal(outputs[0], outputs[1])
    assert torch.isfinite(outputs[1]).all()
    from diffaccel.features.delta_cache import _BlockCache

    cache = _BlockCache(torch.zeros(2), torch.tensor([3.0, 5.0]), None, None, None, step=4,
                        previous=(2, torch.tensor([1.0, 1.0]), None))
    torch.testing.assert_close(cache.residuals(5, 1)[0], torch.tensor([4.0, 7.0]))  # linear in the step
    torch.testing.assert_close(cache.residuals(5, 0)[0], torch.tensor([3.0, 5.0]))


def test_shared_decisions_make_the_branches_skip_together():
    """Wan runs its CFG branches as two calls; a threshold that only the conditional branch meets at
    a step skips both when shared."""
    config = dict(max_consecutive_skips=9)
    counts = {}
    for shared in (False, True):
        with _accelerated("wan", DeltaCacheConfig(threshold=INF, front_blocks=1, share_branches=shared, **config)) as pipe:
            _run("wan", steps=6, pipe=pipe)
            counts[shared] = _stats(pipe).skipped_per_step
    assert counts[True] == counts[False]  # inf: both branches skip anyway
    from diffaccel.features.delta_cache import _Runtime

    shared, own = _Runtime(DeltaCacheConfig(share_branches=True)), _Runtime(DeltaCacheConfig())
    for runtime in (shared, own):
        runtime.start(None, 2)
    assert shared.decide("span", 3, True) and shared.decide("span", 3, False)  # the first branch decided
    assert not shared.decide("span", 4, False) and not shared.decide("span", 4, True)
    assert own.decide("span", 3, True) and not own.decide("span", 3, False)  # each branch its own
    shared.start(None, 2)
    assert not shared.decide("span", 3, False)  # a new call forgets the last one's decisions


@pytest.mark.parametrize(
    ("name", "config", "why"),
    [("sd", DeltaCacheConfig(front_blocks=1), "needs a transformer denoiser"),
     ("sd3", DeltaCacheConfig(front_blocks=2, back_blocks=1), "leave no block to skip")],
)
def test_spans_that_cannot_apply_are_refused(name, config, why):
    if name == "sd3" and _num_blocks("sd3") > 3:
        config = DeltaCacheConfig(front_blocks=_num_blocks("sd3"))
    with pytest.raises(UnsupportedCombinationError, match=why):
        diffaccel.accelerate(tiny_pipeline(name), config)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"forecast": 2}, "forecast must be 0 or 1"),
    ({"back_blocks": 1}, "back_blocks needs front_blocks"),
    ({"front_blocks": -1}, "front_blocks must be an int >= 0"),
    ({"share_branches": "yes"}, "share_branches must be a bool"),
])
def test_bad_forecast_and_span_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeltaCacheConfig(**kwargs)
