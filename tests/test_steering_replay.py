"""Explore cheap, render exact: a noise tape replays any particle on another pipeline exactly, and
exploring on an untouched copy changes nothing."""

import pytest
import torch

import diffaccel
from diffaccel.errors import UnsupportedCombinationError
from diffaccel.rewards import FunctionReward
from diffaccel.steering import FKSteeringConfig, NoiseSearchConfig, search, steer
from diffaccel.steering.replay import NoiseTape, cheap_copy, render_exact
from diffaccel.steering.stochastic import stochastic_call
from diffaccel.testing import TINY_CALL_KWARGS, tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]
BRIGHT = FunctionReward(lambda x, p: x.mean(dim=tuple(range(1, x.ndim))), name="brightness")


def _call(name):
    if name == "sd":
        return dict(num_inference_steps=5, eta=1.0, height=32, width=32)
    return dict(TINY_CALL_KWARGS[name], num_inference_steps=4)


def _pipe(name):
    pipe = tiny_pipeline(name, scheduler="ddim") if name == "sd" else tiny_pipeline(name)
    if name != "sd":
        stochastic_call(pipe)  # flow models: FlowMatchSDEScheduler
    return pipe


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_every_fk_particle_replays_exactly_from_its_tape(name):
    pipe, call = _pipe(name), _call(name)
    config = FKSteeringConfig(num_particles=3, resample_every=1, lmbda=1000.0, record_noise=True)
    out = steer(pipe, config, BRIGHT)(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    assert out.stats.resampled_steps and any(a != list(range(6)) for a in out.tape.ancestry.values())
    slots = list(range(6))
    replayed = render_exact(pipe, [p for p in PROMPTS for _ in range(3)], [out.tape] * 6, slots, call)
    assert torch.allclose(replayed, out.samples, atol=1e-5), float((replayed - out.samples).abs().max())


def test_fk_explored_on_an_untouched_copy_equals_plain_fk_and_renders_its_winner():
    pipe, call = _pipe("sd"), _call("sd")
    config = FKSteeringConfig(num_particles=3, resample_every=2, record_noise=True)
    plain = steer(pipe, config, BRIGHT)(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    explored = steer(pipe, config, BRIGHT, explore_pipe=cheap_copy(pipe))(
        PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    assert torch.equal(plain.samples, explored.samples) and plain.best_indices == explored.best_indices
    assert torch.allclose(explored.exact, plain.samples[plain.best_indices], atol=1e-5)
    assert torch.allclose(explored.exact_rewards, plain.rewards[plain.best_indices], atol=1e-5)
    assert explored.stats.render_nfe == 2 * 5


@pytest.mark.parametrize("method", ["random", "zero-order", "paths"])
def test_search_explored_on_an_untouched_copy_equals_plain_search(method):
    pipe, call = _pipe("sd"), _call("sd")
    config = NoiseSearchConfig(method, budget_nfe=20, batch_size=2, record_noise=True)
    plain = search(pipe, PROMPTS[0], config, BRIGHT, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    explored = search(pipe, PROMPTS[0], config, BRIGHT, explore_pipe=cheap_copy(pipe),
                      generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    assert torch.equal(plain.sample, explored.sample) and plain.winner == explored.winner
    assert torch.allclose(explored.exact_sample, plain.sample, atol=1e-5)
    assert explored.exact_reward == pytest.approx(plain.reward, abs=1e-5)
    assert [c.reward for c in plain.trace] == [c.reward for c in explored.trace]


def test_a_cheaper_copy_explores_and_the_exact_pipeline_renders():
    pipe, call = _pipe("sd"), _call("sd")
    cheap = cheap_copy(pipe, diffaccel.EncoderReuseConfig("uniform:2"))
    config = FKSteeringConfig(num_particles=3, resample_every=2)
    out = steer(pipe, config, BRIGHT, explore_pipe=cheap)(PROMPTS, generator=torch.Generator().manual_seed(0),
                                                         output_type="pt", **call)
    # The exact render is the exact pipeline on the winner's recorded noise: replaying that noise there again agrees.
    again = render_exact(pipe, PROMPTS, [out.tape] * 2, out.best_indices, call)
    assert torch.allclose(out.exact, again, atol=1e-6)
    # ... and it differs from the explored winner (the copy is not the exact pipeline).
    assert not torch.allclose(out.exact, out.samples[out.best_indices], atol=1e-4)
    assert pipe.unet is not cheap.unet and pipe.vae is cheap.vae


def test_explore_setups_that_cannot_replay_fail_before_sampling():
    pipe = _pipe("sd")
    other = cheap_copy(pipe)
    other.scheduler = diffaccel.steering.FlowMatchSDEScheduler()
    with pytest.raises(UnsupportedCombinationError, match="same sampler"):
        steer(pipe, FKSteeringConfig(num_particles=2), BRIGHT, explore_pipe=other)(PROMPTS[0], **_call("sd"))
    shared = diffaccel.accelerate(type(pipe).from_pipe(pipe), diffaccel.EncoderReuseConfig())
    with pytest.raises(UnsupportedCombinationError, match="denoiser of its own"):
        search(pipe, PROMPTS[0], NoiseSearchConfig(budget_nfe=10), BRIGHT, explore_pipe=shared, **_call("sd"))
    with pytest.raises(UnsupportedCombinationError, match="RBF"):
        search(_pipe("sd3"), PROMPTS[0], NoiseSearchConfig("rbf", budget_nfe=10, record_noise=True), BRIGHT,
               **_call("sd3"))


def test_lineage_follows_the_ancestry_back():
    tape = NoiseTape(seed=3, num_steps=3, ancestry={0: [1, 1], 2: [1, 0]})
    assert tape.lineage(0) == [1, 1, 1] and tape.lineage(1) == [1, 0, 0]
    assert tape.replay_seeds(1) == [tape.step_seed(1, 0), tape.step_seed(0, 1), tape.step_seed(0, 2)]
