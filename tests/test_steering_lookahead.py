"""Look-ahead potentials: a rollout over the whole remaining schedule is the deterministic sampler,
zero rollout steps is the x0 potential, and every rollout evaluation counts in the NFE."""

import copy
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

import diffaccel
from diffaccel.errors import UnsupportedCombinationError, UnsupportedPipelineError
from diffaccel.rewards import FunctionReward
from diffaccel.steering import FKSteeringConfig, steer
from diffaccel.steering.latents import decode_latents
from diffaccel.steering.lookahead import LookaheadRollout, rollout_points
from diffaccel.testing import TINY_CALL_KWARGS, tiny_pipeline

PROMPT = "a red circle"
SIZE = {"height": 32, "width": 32}
STEPS = 4


class Recorder(FunctionReward):
    """Brightness, remembering every batch of media it scored."""

    def __init__(self) -> None:
        super().__init__(lambda images, prompts: images.mean(dim=tuple(range(1, images.ndim))), name="brightness")
        self.seen: list[torch.Tensor] = []

    def __call__(self, media, prompts):
        self.seen.append(media.clone())
        return super().__call__(media, prompts)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _deterministic_sd():
    pipe = tiny_pipeline("sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    return pipe


def _score_step0(pipe, lookahead_steps, call, **config):
    """FK with one particle scored at step 0 only (no resampling effect): the recorded media of step 0."""
    recorder = Recorder()
    config = FKSteeringConfig(num_particles=config.pop("num_particles", 1), resample_every=STEPS,
                              final_correction=False, lookahead_steps=lookahead_steps, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deterministic scheduler: resampled copies would stay identical
        out = steer(pipe, config, recorder)(PROMPT, num_inference_steps=STEPS, generator=_gen(), output_type="pt", **call)
    return recorder.seen[1], out  # seen[0] is the reward probe on gray images


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_rollout_over_every_remaining_step_is_the_deterministic_sampler(family):
    if family == "vp":
        pipe, call = _deterministic_sd(), dict(SIZE, eta=0.0)
    else:
        pipe, call = tiny_pipeline("sd3"), dict(TINY_CALL_KWARGS["sd3"])
        assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    final = pipe(PROMPT, num_inference_steps=STEPS, generator=_gen(), output_type="latent", **call).images
    expected = decode_latents(pipe, final, call)
    scored, out = _score_step0(pipe, STEPS - 1, call)
    assert torch.allclose(scored, expected, atol=1e-5), float((scored - expected).abs().max())
    # The rollout was a side trip: the steered sample itself is the untouched pipeline's.
    untouched = pipe(PROMPT, num_inference_steps=STEPS, generator=_gen(), output_type="pt", **call).images
    assert torch.allclose(out.images, untouched, atol=1e-6)
    assert out.stats.lookahead_nfe == STEPS - 1 and out.stats.nfe == 2 * STEPS - 1


def test_zero_lookahead_steps_is_the_x0_potential():
    pipe = tiny_pipeline("sd", scheduler="ddim")
    call = dict(SIZE, eta=1.0)
    runs = []
    for config in (FKSteeringConfig(num_particles=3, resample_every=1), FKSteeringConfig(num_particles=3, resample_every=1, lookahead_steps=0)):
        out = steer(pipe, config, Recorder())(PROMPT, num_inference_steps=STEPS, generator=_gen(), output_type="pt", **call)
        runs.append(out)
    assert runs[0].stats.intermediate_rewards == runs[1].stats.intermediate_rewards
    assert torch.equal(runs[0].images, runs[1].images) and runs[1].stats.lookahead_nfe == 0
    # The rollout itself with zero steps hands back the prediction unchanged.
    rollout = LookaheadRollout(pipe, pipe, 0, {"prompt": [PROMPT] * 2})
    pipe.scheduler.set_timesteps(STEPS)
    x0 = torch.randn(2, 4, 4, 4)
    assert rollout(1, STEPS, torch.randn(2, 4, 4, 4), x0) is x0 and rollout.nfe == 0


def _count_particle_evaluations(pipe):
    """A forward pre-hook on the UNet that adds up the particles it denoises (CFG rows counted once)."""
    counted = [0]

    def count(module, args, kwargs):
        rows = (args[0] if args else kwargs["sample"]).shape[0]
        counted[0] += rows // 2 if pipe.do_classifier_free_guidance else rows

    return counted, pipe.unet.register_forward_pre_hook(count, with_kwargs=True)


@pytest.mark.parametrize("max_batch", [None, 2])
def test_nfe_counts_every_rollout_evaluation(max_batch):
    pipe = tiny_pipeline("sd", scheduler="ddim")
    counted, handle = _count_particle_evaluations(pipe)
    config = FKSteeringConfig(num_particles=3, resample_every=2, lookahead_steps=2, max_batch=max_batch)
    try:
        out = steer(pipe, config, Recorder())(PROMPT, num_inference_steps=6, generator=_gen(), eta=1.0, **SIZE)
    finally:
        handle.remove()
    assert out.stats.lookahead_nfe > 0
    assert out.stats.nfe == counted[0] == 3 * 6 + out.stats.lookahead_nfe


def test_chunked_rollouts_equal_one_batch():
    pipe = tiny_pipeline("sd", scheduler="ddim")
    outs = []
    for max_batch in (None, 1):
        config = FKSteeringConfig(num_particles=3, resample_every=2, lookahead_steps=2, max_batch=max_batch)
        outs.append(steer(pipe, config, Recorder())(PROMPT, num_inference_steps=6, generator=_gen(), eta=1.0,
                                                    output_type="pt", **SIZE))
    assert torch.allclose(outs[0].images, outs[1].images, atol=1e-5)
    assert torch.allclose(torch.tensor(outs[0].stats.intermediate_rewards), torch.tensor(outs[1].stats.intermediate_rewards), atol=1e-5)


def test_rollouts_on_a_cheaper_copy_run_there():
    pipe = tiny_pipeline("sd", scheduler="ddim")
    cheap = diffaccel.accelerate(copy.deepcopy(pipe), diffaccel.EncoderReuseConfig("uniform:2"))
    counted, handle = _count_particle_evaluations(cheap)
    config = FKSteeringConfig(num_particles=2, resample_every=2, lookahead_steps=2)
    try:
        out = steer(pipe, config, Recorder(), lookahead_pipe=cheap)(PROMPT, num_inference_steps=6, generator=_gen(),
                                                                    eta=1.0, **SIZE)
    finally:
        handle.remove()
    assert out.stats.lookahead_nfe == counted[0] > 0


def test_bad_lookahead_setups_fail_before_sampling():
    euler = tiny_pipeline("sd")
    euler.scheduler = EulerDiscreteScheduler.from_config(euler.scheduler.config)
    with pytest.raises(UnsupportedPipelineError, match="look-ahead"):
        steer(euler, FKSteeringConfig(num_particles=2, lookahead_steps=1), Recorder())(PROMPT, **SIZE)
    accelerated = diffaccel.accelerate(tiny_pipeline("sd", scheduler="ddim"), diffaccel.EncoderReuseConfig())
    with pytest.raises(UnsupportedCombinationError, match="lookahead_pipe"):
        steer(accelerated, FKSteeringConfig(num_particles=2, lookahead_steps=1), Recorder())(PROMPT, eta=1.0, **SIZE)
    with pytest.raises(ValueError, match="lookahead_steps"):
        FKSteeringConfig(lookahead_steps=-1)
    with pytest.warns(UserWarning, match="does nothing with resample_every=0"):
        FKSteeringConfig(resample_every=0, lookahead_steps=2)
    with pytest.warns(UserWarning, match="lookahead_pipe is ignored"):
        steer(euler, FKSteeringConfig(), Recorder(), lookahead_pipe=euler)


def test_rollout_points_spread_over_the_rest_of_the_schedule():
    assert rollout_points(0, 20, 1) == [10]
    assert rollout_points(10, 20, 4) == [12, 14, 16, 18]
    assert rollout_points(0, 4, 3) == [1, 2, 3]
