"""Deep reuse, forecasting, adaptive key steps, guidance reuse and presets (encoder reuse's newer
modes) against the untouched pipeline and against DeepCache (offline, CPU, tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AdaptiveSchedule, DeltaCacheConfig, EncoderReuseConfig, UnsupportedCombinationError, UnsupportedPipelineError
from diffaccel.features.unet_depth import max_shallow_layers, reuse_plan
from diffaccel.testing import UNET_PIPELINE_NAMES, sd15_layout_pipeline, tiny_call_inputs, tiny_pipeline

STEPS = 8
PROMPT = "a red circle to the left of a blue square"


def run(pipe, name="sd", seed=0, **kwargs):
    inputs = tiny_call_inputs(name, seed=seed) if name in ("sd-controlnet", "sd-img2img", "sd-inpaint") else {}
    inputs.update(kwargs)
    inputs.setdefault("num_inference_steps", STEPS)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **inputs).images


def stats(pipe):
    return pipe.acceleration_stats.features["encoder_reuse"]


class Calls:
    """Records the batch size of each real forward call of a module (a plain torch hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.batches: list[int] = []
        module.register_forward_pre_hook(lambda m, args: self.batches.append(args[0].shape[0]))


@pytest.fixture(scope="module")
def sd():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def baseline(sd):
    return run(sd)


@pytest.fixture(autouse=True)
def _restore(sd):
    yield
    diffaccel.restore(sd)


@pytest.mark.parametrize("shallow_layers", [1, 2, 5])
@pytest.mark.parametrize("extra", [dict(), dict(forecast=1, reuse_guidance=True)])
def test_every_step_key_equals_untouched(sd, baseline, shallow_layers, extra):
    diffaccel.accelerate(sd, EncoderReuseConfig("all", shallow_layers=shallow_layers, **extra))
    assert np.array_equal(run(sd), baseline)
    assert stats(sd).encoder_evaluations == STEPS and stats(sd).guidance_reused == 0


def test_adaptive_with_a_tiny_threshold_equals_untouched(sd, baseline):
    diffaccel.accelerate(sd, EncoderReuseConfig("adaptive:1e-9", shallow_layers=1, forecast=1, reuse_guidance=True))
    assert np.array_equal(run(sd), baseline)
    assert stats(sd).key_steps == tuple(range(STEPS))


def test_shallow_layers_1_is_deepcache_branch_0(sd):
    """Deep reuse keeping one decoder layer replays exactly what DeepCache's shallowest branch does."""
    helper_module = pytest.importorskip("DeepCache")
    helper = helper_module.DeepCacheSDHelper(pipe=sd)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        deepcache = run(sd)
    finally:
        helper.disable()
    diffaccel.accelerate(sd, EncoderReuseConfig("uniform:3", shallow_layers=1))
    ours = run(sd)
    np.testing.assert_allclose(ours, deepcache, atol=1e-6)
    assert stats(sd).key_steps == (0, 3, 6)


def test_non_key_steps_run_only_the_shallow_path(sd):
    diffaccel.accelerate(sd, EncoderReuseConfig("uniform:4", shallow_layers=1))
    unet = sd.unet
    deep_down, mid = Calls(unet.down_blocks[0].resnets[0]), Calls(unet.mid_block.resnets[0])
    # A replayed sub-module is still *called* (its forward returns the cache): count its inner conv.
    deep_up, shallow_up = Calls(unet.up_blocks[-1].resnets[0].conv1), Calls(unet.up_blocks[-1].resnets[-1].conv1)
    conv_in = Calls(unet.conv_in)
    run(sd)
    assert len(deep_down.batches) == len(mid.batches) == len(deep_up.batches) == 2  # key steps 0 and 4
    assert len(shallow_up.batches) == len(conv_in.batches) == STEPS


def test_deep_reuse_reads_the_current_latents(sd):
    """Unlike encoder reuse, a non-key step of deep reuse sees its latents (through conv_in)."""
    diffaccel.accelerate(sd, EncoderReuseConfig("uniform:4", shallow_layers=1))
    outputs = []
    handle = sd.unet.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))

    def perturb(p, step, t, kw):
        if step == 0:
            kw["latents"] = kw["latents"] + 0.5
        return kw

    run(sd)
    plain = outputs[:]
    outputs.clear()
    run(sd, callback_on_step_end=perturb)
    handle.remove()
    assert not torch.equal(plain[1], outputs[1])


def test_forecast_extrapolates_the_boundary_feature(sd):
    """With key steps 0 and 2, step 3 reads f(2) + (f(2) - f(0)) / 2 where the computed path starts."""
    diffaccel.accelerate(sd, EncoderReuseConfig("0,2", shallow_layers=1, forecast=1))
    boundary = next(r for r in reuse_plan(sd.unet, 1) if r.boundary)
    seen = []
    handle = boundary.module.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
    run(sd, num_inference_steps=4)
    handle.remove()
    f0, _, f2, f3 = seen
    torch.testing.assert_close(f3, f2 + (f2 - f0) / 2)
    assert stats(sd).forecasts >= 1
    diffaccel.accelerate(sd, EncoderReuseConfig("0,2", shallow_layers=1, forecast=0))
    plain = []
    handle = boundary.module.register_forward_hook(lambda m, a, out: plain.append(out[0].clone()))
    run(sd, num_inference_steps=4)
    handle.remove()
    assert torch.equal(plain[3], plain[2]) and stats(sd).forecasts == 0


def test_adaptive_schedule_is_deterministic_and_bounded(sd):
    config = EncoderReuseConfig("adaptive:0.5:3", shallow_layers=1, forecast=1)
    diffaccel.accelerate(sd, config)
    first = run(sd, num_inference_steps=12)
    keys = stats(sd).key_steps
    second = run(sd, num_inference_steps=12)
    assert np.array_equal(first, second) and stats(sd).key_steps == keys
    assert keys[:2] == (0, 1) and len(keys) < 12
    assert all(b - a <= 3 for a, b in zip(keys, keys[1:])) and 12 - keys[-1] <= 3
    assert stats(sd).encoder_evaluations == len(keys)


def test_adaptive_threshold_orders_the_key_steps(sd):
    counts = []
    for threshold in (0.05, 0.5, 5.0):
        diffaccel.accelerate(sd, EncoderReuseConfig(f"adaptive:{threshold}", shallow_layers=1))
        run(sd, num_inference_steps=12)
        counts.append(len(stats(sd).key_steps))
    assert counts[0] >= counts[1] >= counts[2] == 2 and counts[0] > counts[2]


def test_guidance_reuse_runs_the_conditional_half(sd):
    diffaccel.accelerate(sd, EncoderReuseConfig("uniform:4", shallow_layers=1, reuse_guidance=True))
    conv_in = Calls(sd.unet.conv_in)
    guided = run(sd)
    assert conv_in.batches == [2, 1, 1, 1, 2, 1, 1, 1]
    assert stats(sd).guidance_reused == STEPS - 2
    diffaccel.accelerate(sd, EncoderReuseConfig("uniform:4", shallow_layers=1))
    assert not np.array_equal(run(sd), guided)


def test_guidance_reuse_output_is_cond_minus_the_key_difference(sd):
    """At a non-key step the unconditional half is the conditional one minus the key step's difference."""
    diffaccel.accelerate(sd, EncoderReuseConfig("uniform:4", shallow_layers=1, reuse_guidance=True))
    outputs = []
    handle = sd.unet.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    run(sd, num_inference_steps=3)
    handle.remove()
    key, later = outputs[0], outputs[1]
    torch.testing.assert_close(later[1] - later[0], key[1] - key[0])


def test_guidance_reuse_needs_guidance(sd):
    diffaccel.accelerate(sd, EncoderReuseConfig("uniform:4", shallow_layers=1))
    plain = run(sd, guidance_scale=1.0)
    diffaccel.accelerate(sd, EncoderReuseConfig("uniform:4", shallow_layers=1, reuse_guidance=True))
    assert np.array_equal(run(sd, guidance_scale=1.0), plain)
    assert stats(sd).guidance_reused == 0


def test_encoder_mode_with_forecast_and_guidance_reuse(sd, baseline):
    diffaccel.accelerate(sd, EncoderReuseConfig("uniform:3", forecast=1, reuse_guidance=True))
    images = run(sd)
    assert np.isfinite(images).all() and not np.array_equal(images, baseline)
    assert stats(sd).forecasts > 0 and stats(sd).guidance_reused > 0


def test_particle_reindexing_carries_the_forecast_history():
    """FK resampling reorders the cached features of both key steps with the particles."""
    pipe = tiny_pipeline("sd")
    config = EncoderReuseConfig("uniform:2", shallow_layers=1, forecast=1)
    diffaccel.accelerate(pipe, config)
    feature = pipe._diffaccel_features[0]
    state = feature.state
    state.features = {"x": torch.arange(4.0)}
    state.previous_features = {"x": torch.arange(4.0) * 10}
    feature.reindex(torch.tensor([1, 1]))
    assert state.features["x"].tolist() == [1.0, 1.0, 3.0, 3.0]
    assert state.previous_features["x"].tolist() == [10.0, 10.0, 30.0, 30.0]


@pytest.mark.parametrize("name", ["sdxl", "sd-img2img", "sd-inpaint", "sd-controlnet"])
def test_pipeline_variants_keep_working(name):
    pipe = tiny_pipeline(name)
    baseline = run(pipe, name)
    diffaccel.accelerate(pipe, EncoderReuseConfig("all", shallow_layers=1, forecast=1, reuse_guidance=True))
    assert np.array_equal(run(pipe, name), baseline)
    diffaccel.accelerate(pipe, "fast")
    images = run(pipe, name)
    assert images.shape == baseline.shape and np.isfinite(images).all()
    assert stats(pipe).encoder_evaluations < stats(pipe).num_steps
    diffaccel.restore(pipe)
    assert np.array_equal(run(pipe, name), baseline)


@pytest.mark.parametrize("preset", diffaccel.PRESETS)
@pytest.mark.parametrize("name", [*UNET_PIPELINE_NAMES, "sd15-layout"])
def test_presets_exist_for_every_unet_family(name, preset):
    pipe = sd15_layout_pipeline(width=32, sample_size=16) if name == "sd15-layout" else tiny_pipeline(name)
    (config,) = diffaccel.preset_configs(pipe, preset)
    assert isinstance(config, EncoderReuseConfig) and config.shallow_layers == 1 and config.forecast == 0 and config.reuse_guidance
    diffaccel.accelerate(pipe, preset)
    assert pipe.acceleration == (config,)


def test_preset_thresholds_order_the_speed(sd):
    thresholds = [diffaccel.preset_configs(sd, p)[0].schedule.threshold for p in diffaccel.PRESETS]
    assert thresholds == sorted(thresholds, reverse=True)  # fast allows the most drift


@pytest.mark.parametrize("preset", diffaccel.PRESETS)
@pytest.mark.parametrize("name", ["pixart-sigma", "sd3", "flux", "cogvideox", "wan", "ltx"])
def test_transformer_presets_are_the_delta_cache(name, preset):
    pipe = tiny_pipeline(name)
    (config,) = diffaccel.preset_configs(pipe, preset)
    assert isinstance(config, DeltaCacheConfig) and config.share_branches and config.forecast == 0
    diffaccel.accelerate(pipe, preset)
    assert pipe.acceleration == (config,)


def test_transformer_presets_order_the_speed():
    configs = [diffaccel.dit_preset(p) for p in diffaccel.PRESETS]  # fastest first
    assert [c.threshold for c in configs] == sorted((c.threshold for c in configs), reverse=True)
    assert [c.first_steps for c in configs] == sorted(c.first_steps for c in configs)


def test_balanced_transformer_preset_computes_the_first_steps_and_skips_after():
    pipe = diffaccel.accelerate(tiny_pipeline("wan"), "balanced")
    pipe("a red circle", num_inference_steps=8, output_type="latent", **tiny_call_inputs("wan"))
    skipped = pipe.acceleration_stats.features["delta_cache"].skipped_per_step
    assert skipped[:4] == [0, 0, 0, 0] and skipped[-1] == 0


def test_presets_are_refused_for_other_pipelines():
    other = type("KandinskyLikePipeline", (), {"unet": None, "transformer": torch.nn.Linear(2, 2)})()
    with pytest.raises(UnsupportedPipelineError, match=r"no preset for KandinskyLikePipeline: .*feature configs"):
        diffaccel.preset_configs(other, "fast")


def test_unknown_preset_is_refused(sd):
    with pytest.raises(ValueError, match="unknown preset 'fastest'"):
        diffaccel.accelerate(sd, "fastest")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shallow_layers=0), "shallow_layers must be an int >= 1"),
        (dict(forecast=2), "forecast must be one of"),
        (dict(forecast=True), "forecast must be an int"),
        (dict(shallow_layers=1, parallel=True), "parallel=True needs the decoder inputs"),
        (dict(schedule="adaptive:0.5", parallel=True), "parallel=True needs the decoder inputs"),
        (dict(reuse_guidance=True, parallel=True), "cannot be combined with reuse_guidance"),
        (dict(reuse_guidance="yes"), "reuse_guidance must be"),
        (dict(schedule="adaptive:-1"), "threshold must be a number > 0"),
        (dict(schedule="adaptive:x"), "bad adaptive schedule"),
        (dict(schedule="adaptive:0.5:2:1"), "min_key_steps must be an int >= 2"),
        (dict(schedule="adaptive:0.5:2:3:4"), "at most THRESHOLD:MAX_INTERVAL:MIN_KEY_STEPS"),
    ],
)
def test_bad_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderReuseConfig(**kwargs)


def test_too_many_shallow_layers_is_refused_at_attach(sd):
    too_many = max_shallow_layers(sd.unet)
    with pytest.raises(UnsupportedCombinationError, match="leaves nothing to replay"):
        diffaccel.accelerate(sd, EncoderReuseConfig("uniform:2", shallow_layers=too_many))


def test_configs_round_trip_through_json():
    config = EncoderReuseConfig("adaptive:0.5:6", shallow_layers=2, forecast=1, reuse_guidance=True)
    assert EncoderReuseConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["schedule"] == "adaptive:0.5:6"
    assert AdaptiveSchedule(0.5, None, 3).describe() == "adaptive:0.5:0:3"
    assert diffaccel.parse_schedule("adaptive:0.5:0:3") == AdaptiveSchedule(0.5, None, 3)


def test_presets_as_eval_variants():
    from diffaccel.evaluation.variants import VariantSpecError, parse_variant
    from diffaccel.presets import unet_preset

    assert parse_variant("f=preset:fast").configs == (unet_preset("fast"),)
    assert parse_variant("b=dit-preset:balanced").configs == (diffaccel.dit_preset("balanced"),)
    with pytest.raises(VariantSpecError, match="unknown preset 'fastest'"):
        parse_variant("f=preset:fastest")
    with pytest.raises(VariantSpecError, match="unknown preset 'fastest'"):
        parse_variant("f=dit-preset:fastest")
