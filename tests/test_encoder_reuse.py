"""Encoder propagation against the untouched diffusers pipelines (offline, CPU, tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import EncoderReuseConfig, UnsupportedCombinationError, UnsupportedPipelineError
from diffaccel.testing import TINY_CALL_KWARGS, tiny_call_inputs, tiny_pipeline

STEPS = 8
PROMPT = "a red circle to the left of a blue square"


def run(pipe, name="sd", seed=0, **kwargs):
    """One call with a fixed generator; returns the output array."""
    if name in ("sd-controlnet", "sd-img2img", "sd-inpaint"):
        inputs = tiny_call_inputs(name, seed=seed)
    else:
        inputs = dict(TINY_CALL_KWARGS.get(name, {}))
    inputs.update(kwargs)
    inputs.setdefault("num_inference_steps", STEPS)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **inputs).images


class CallCounter:
    """Counts real forward calls of a module with a plain torch hook (independent of diffaccel)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


def reuse_stats(pipe):
    return pipe.acceleration_stats.features["encoder_reuse"]


def test_no_features_is_bit_identical():
    pipe = tiny_pipeline("sd")
    baseline = run(pipe)
    diffaccel.accelerate(pipe)
    assert type(pipe).__name__ == "AcceleratedStableDiffusionPipeline"
    assert np.array_equal(run(pipe), baseline)


@pytest.mark.parametrize("parallel", [False, True])
def test_every_step_key_is_bit_identical(parallel):
    pipe = tiny_pipeline("sd")
    baseline = run(pipe)
    diffaccel.accelerate(pipe, EncoderReuseConfig("all", parallel=parallel))
    assert np.array_equal(run(pipe), baseline)
    assert reuse_stats(pipe).encoder_evaluations == STEPS


def test_restore_gives_back_the_untouched_pipeline():
    pipe = tiny_pipeline("sd")
    baseline = run(pipe)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2"))
    assert not np.array_equal(run(pipe), baseline)
    diffaccel.restore(pipe)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())
    assert "forward" not in pipe.unet.__dict__
    assert np.array_equal(run(pipe), baseline)


@pytest.mark.parametrize("schedule", ["uniform:3", "faster-diffusion", [0, 1, 5]])
def test_encoder_runs_only_at_key_steps(schedule):
    pipe = tiny_pipeline("sd")
    config = EncoderReuseConfig(schedule, parallel=False)
    diffaccel.accelerate(pipe, config)
    # Count the blocks' inner layers: the hooked blocks themselves are still *called* at every step.
    blocks = (pipe.unet.down_blocks[0], pipe.unet.mid_block, pipe.unet.up_blocks[0])
    down, mid, up = (CallCounter(block.resnets[0]) for block in blocks)
    run(pipe)
    key_steps = config.schedule.key_steps(STEPS)
    assert down.calls == mid.calls == len(key_steps)
    assert up.calls == STEPS
    stats = reuse_stats(pipe)
    assert stats.key_steps == key_steps
    assert stats.encoder_evaluations == len(key_steps)
    assert stats.decoder_evaluations == STEPS


def test_reuse_is_a_real_approximation_but_close():
    pipe = tiny_pipeline("sd")
    baseline = run(pipe)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=False))
    reused = run(pipe)
    assert not np.array_equal(reused, baseline)
    assert np.isfinite(reused).all()


def test_non_key_steps_ignore_the_latents():
    """At a non-key step the UNet output depends on the cached features, not on its input."""
    pipe = tiny_pipeline("sd")
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:4", parallel=False))
    outputs = []
    pipe.unet.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))

    def perturb(p, step, t, kw):
        if step == 0:
            kw["latents"] = kw["latents"] + 0.5
        return kw

    run(pipe)
    plain = outputs[:]
    outputs.clear()
    run(pipe, callback_on_step_end=perturb)
    assert torch.equal(plain[1], outputs[1]) and torch.equal(plain[2], outputs[2])  # non-key: unchanged
    assert not torch.equal(plain[4], outputs[4])  # key step 4 sees the perturbed latents


SCHEDULERS = ["ddim", "dpmsolver", "euler", "unipc", "pndm"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_parallel_decoding_equals_sequential_reuse(scheduler):
    pipe = tiny_pipeline("sd", scheduler=scheduler)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:3", parallel=False))
    sequential = run(pipe)
    seq_stats = reuse_stats(pipe)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:3", parallel=True))
    parallel = run(pipe)
    stats = reuse_stats(pipe)
    np.testing.assert_allclose(parallel, sequential, atol=1e-5)
    assert stats.parallel_fallbacks == 0
    assert stats.encoder_evaluations == seq_stats.encoder_evaluations
    assert stats.batched_decoder_calls == len(stats.key_steps) < seq_stats.batched_decoder_calls


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_schedulers_and_prediction_types(scheduler, prediction_type):
    pipe = tiny_pipeline("sd", scheduler=scheduler, prediction_type=prediction_type)
    baseline = run(pipe)
    diffaccel.accelerate(pipe, EncoderReuseConfig("all"))
    assert np.array_equal(run(pipe), baseline)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2"))
    reused = run(pipe)
    stats = reuse_stats(pipe)
    assert np.isfinite(reused).all() and reused.shape == baseline.shape
    assert stats.encoder_evaluations == len(range(0, stats.num_steps, 2))
    assert stats.num_steps == len(pipe.scheduler.timesteps)  # PNDM's loop has one step more


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
@pytest.mark.parametrize("batch", [dict(), dict(num_images_per_prompt=2), dict(prompt_batch=2)])
def test_guidance_and_batches(guidance_scale, batch):
    pipe = tiny_pipeline("sd")
    kwargs = dict(guidance_scale=guidance_scale)
    if batch.get("num_images_per_prompt"):
        kwargs["num_images_per_prompt"] = 2
    prompt = [PROMPT, "two green triangles"] if batch.get("prompt_batch") else PROMPT
    def call():
        return pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", num_inference_steps=STEPS,
                    **kwargs).images
    baseline = call()
    diffaccel.accelerate(pipe, EncoderReuseConfig("all", parallel=True))
    assert np.array_equal(call(), baseline)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:3", parallel=False))
    batches = []
    pipe.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    sequential = call()
    assert sequential.shape == baseline.shape
    assert batches == [len(baseline) * (2 if guidance_scale > 1 else 1)] * 3  # the encoder runs at key steps only
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:3", parallel=True))
    np.testing.assert_allclose(call(), sequential, atol=1e-5)
    assert reuse_stats(pipe).encoder_evaluations == 3


@pytest.mark.parametrize("name", ["sdxl", "sd-img2img", "sd-inpaint", "sd-controlnet"])
def test_pipeline_variants(name):
    pipe = tiny_pipeline(name)
    baseline = run(pipe, name)
    diffaccel.accelerate(pipe, EncoderReuseConfig("all"))
    assert np.array_equal(run(pipe, name), baseline)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=False))
    sequential = run(pipe, name)
    stats = reuse_stats(pipe)
    assert stats.encoder_evaluations == len(range(0, stats.num_steps, 2))
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=True))
    np.testing.assert_allclose(run(pipe, name), sequential, atol=1e-5)
    assert reuse_stats(pipe).parallel_fallbacks == 0
    diffaccel.restore(pipe)
    assert np.array_equal(run(pipe, name), baseline)


def test_img2img_counts_only_the_steps_it_runs():
    pipe = tiny_pipeline("sd-img2img")
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2"))
    run(pipe, "sd-img2img", strength=0.5, num_inference_steps=10)
    stats = reuse_stats(pipe)
    assert stats.num_steps == 5 and stats.key_steps == (0, 2, 4)


def test_controlnet_residuals_come_from_the_key_step():
    pipe = tiny_pipeline("sd-controlnet")
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:4", parallel=False))
    counter = CallCounter(pipe.controlnet.conv_in)
    run(pipe, "sd-controlnet")
    stats = reuse_stats(pipe)
    assert counter.calls == stats.controlnet_evaluations == 2
    assert stats.controlnet_reused == STEPS - 2


def test_controlnet_scale_change_is_honoured():
    """control_guidance_end switches the ControlNet off mid-run: reused residuals must follow."""
    pipe = tiny_pipeline("sd-controlnet")
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:3", parallel=False))  # key steps 0, 3, 6
    sequential = run(pipe, "sd-controlnet", control_guidance_end=0.5)  # scale 0 from step 4 on
    assert reuse_stats(pipe).controlnet_evaluations == 3 + 2  # steps 4 and 5 differ from key step 3
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:3", parallel=True))
    np.testing.assert_allclose(run(pipe, "sd-controlnet", control_guidance_end=0.5), sequential, atol=1e-5)
    # Step 4 finds its precomputed output (made with key step 3's residuals) stale and decodes
    # steps 4 and 5 again; step 5's zero-scaled residuals equal step 4's, so that output stands.
    assert reuse_stats(pipe).parallel_fallbacks == 1


def test_prior_noise_injection():
    pipe = tiny_pipeline("sd")
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=False))
    plain = run(pipe)
    assert reuse_stats(pipe).noise_injections == 0
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=False, noise_injection=0.05))
    injected = run(pipe)
    timesteps = pipe.scheduler.timesteps
    expected = sum(1 for t in timesteps[1:] if t < 500)
    assert reuse_stats(pipe).noise_injections == expected > 0
    assert not np.array_equal(plain, injected)
    assert "step" not in pipe.scheduler.__dict__  # unwrapped after the call


def test_pipeline_class_and_round_trip(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffaccel.pipelines import AcceleratedStableDiffusionPipeline

    source = tiny_pipeline("sd")
    config = EncoderReuseConfig("uniform:3", parallel=False)
    pipe = AcceleratedStableDiffusionPipeline.from_pipe(source, acceleration=config)
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.acceleration == (config,)
    expected = run(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = AcceleratedStableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.acceleration == (config,)
    assert np.array_equal(run(loaded), expected)
    plain = StableDiffusionPipeline.from_pretrained(tmp_path)  # the folder stays a plain diffusers folder
    plain.set_progress_bar_config(disable=True)
    assert type(plain) is StableDiffusionPipeline
    assert np.array_equal(run(plain), run(source))


def test_sdxl_drop_in_class():
    from diffaccel.pipelines import AcceleratedStableDiffusionXLPipeline

    pipe = AcceleratedStableDiffusionXLPipeline.from_pipe(tiny_pipeline("sdxl"), acceleration=EncoderReuseConfig("uniform:2"))
    run(pipe, "sdxl")
    assert reuse_stats(pipe).encoder_evaluations == STEPS // 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule=[]), "must not be empty"),
        (dict(schedule=[1, 2]), "must contain step 0"),
        (dict(schedule=[0, 0, 3]), "duplicates"),
        (dict(schedule=[0, -1]), ">= 0"),
        (dict(schedule="uniform:0"), "uniform"),
        (dict(schedule="sometimes"), "unknown key-step schedule"),
        (dict(parallel="yes"), "parallel"),
        (dict(max_parallel_steps=0), "max_parallel_steps"),
        (dict(noise_injection=-0.1), "noise_injection"),
        (dict(noise_injection_below=0.0), "noise_injection_below"),
    ],
)
def test_bad_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderReuseConfig(**kwargs)


def test_out_of_range_schedule_fails_before_model_work():
    pipe = tiny_pipeline("sd")
    diffaccel.accelerate(pipe, EncoderReuseConfig([0, 3, 20]))
    text = CallCounter(pipe.text_encoder)
    with pytest.raises(ValueError, match="out of range"):
        run(pipe)
    assert text.calls == 0
    assert not pipe.unet._diffusers_hook.get_hook("diffaccel.encoder_reuse").state.active


@pytest.mark.parametrize("name", ["flux", "pixart-sigma"])
def test_unsupported_pipelines_raise(name):
    pipe = tiny_pipeline(name)
    with pytest.raises(UnsupportedPipelineError, match="UNet2DConditionModel"):
        diffaccel.accelerate(pipe, EncoderReuseConfig())
    assert not hasattr(pipe, "_diffaccel_features") or not pipe._diffaccel_features
    assert "Accelerated" not in type(pipe).__name__


def test_extra_unet_calls_are_refused():
    """A pipeline calling the UNet twice per step must fail loudly, not give wrong images."""
    pipe = tiny_pipeline("sd")
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=False))

    def second_call(p, step, t, kw):
        p.unet(kw["latents"].repeat(2, 1, 1, 1), t, encoder_hidden_states=kw["prompt_embeds"])
        return kw

    with pytest.raises(UnsupportedCombinationError, match="one UNet call per step"):
        run(pipe, callback_on_step_end=second_call, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])


def test_changed_conditioning_falls_back_to_sequential_decoding():
    """A callback that edits prompt_embeds mid-run invalidates the precomputed decoder outputs."""

    def edit(p, step, t, kw):
        if step == 1:
            kw["prompt_embeds"] = kw["prompt_embeds"] * 0.5
        return kw

    pipe = tiny_pipeline("sd")
    extra = dict(callback_on_step_end=edit, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:4", parallel=False))
    sequential = run(pipe, **extra)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:4", parallel=True))
    np.testing.assert_allclose(run(pipe, **extra), sequential, atol=1e-5)
    stats = reuse_stats(pipe)
    assert stats.parallel_fallbacks == 1  # step 2 found its precomputed output stale...
    assert stats.batched_decoder_calls == 3  # ...and decoded steps 2 and 3 again in one call


def test_max_parallel_steps_bounds_the_batch():
    pipe = tiny_pipeline("sd")
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:4", parallel=False))
    sequential = run(pipe)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:4", parallel=True, max_parallel_steps=2))
    batches = []
    pipe.unet.up_blocks[0].resnets[0].register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    np.testing.assert_allclose(run(pipe), sequential, atol=1e-5)
    assert batches == [2 * 2] * 4  # CFG batch 2, two steps per call: (0,1) (2,3) (4,5) (6,7)
    stats = reuse_stats(pipe)
    assert stats.batched_decoder_calls == 4 and stats.encoder_evaluations == 2 and stats.decoder_evaluations == STEPS


def test_interrupted_call_leaves_no_state_behind():
    pipe = tiny_pipeline("sd")
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:3", parallel=True))
    expected = run(pipe)

    def fail(p, step, t, kw):
        if step == 4:
            raise KeyboardInterrupt
        return kw

    with pytest.raises(KeyboardInterrupt):
        run(pipe, callback_on_step_end=fail)
    assert np.array_equal(run(pipe), expected)


def test_unet_outside_a_pipeline_call_is_untouched():
    pipe = tiny_pipeline("sd")
    sample, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    expected = pipe.unet(sample, 10, encoder_hidden_states=embeds).sample
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2"))
    for _ in range(3):
        assert torch.equal(pipe.unet(sample, 10, encoder_hidden_states=embeds).sample, expected)


@pytest.mark.parametrize("scheduler", ["heun", "lcm"])
def test_more_schedulers(scheduler):
    """Heun calls the UNet twice per timestep (each call is a loop step); LCM uses few steps."""
    from diffusers import HeunDiscreteScheduler, LCMScheduler

    pipe = tiny_pipeline("sd")
    cls = HeunDiscreteScheduler if scheduler == "heun" else LCMScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=False))
    sequential = run(pipe, num_inference_steps=4)
    stats = reuse_stats(pipe)
    assert stats.num_steps == len(pipe.scheduler.timesteps)
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=True))
    np.testing.assert_allclose(run(pipe, num_inference_steps=4), sequential, atol=1e-5)
    assert reuse_stats(pipe).parallel_fallbacks == 0


def test_sdxl_denoising_end_locates_its_loop():
    pipe = tiny_pipeline("sdxl")
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=False))
    kwargs = dict(TINY_CALL_KWARGS["sdxl"], num_inference_steps=STEPS, denoising_end=0.5)
    def call():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    sequential = call()
    assert reuse_stats(pipe).num_steps == STEPS // 2
    diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2", parallel=True))
    torch.testing.assert_close(call(), sequential, atol=1e-4, rtol=1e-4)  # latents, not [0, 1] pixels
    assert reuse_stats(pipe).parallel_fallbacks == 0


def test_restore_keeps_a_forward_wrapper_installed_before():
    """Another library's instance-level forward (e.g. accelerate's offload hook) survives restore()."""
    pipe = tiny_pipeline("sd")
    original = pipe.unet.forward
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    pipe.unet.forward = wrapped
    diffaccel.restore(diffaccel.accelerate(pipe, EncoderReuseConfig("uniform:2")))
    assert pipe.unet.forward is wrapped
    run(pipe)
    assert len(calls) == STEPS
