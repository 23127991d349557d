"""FK steering on tiny pipelines: agreement with the untouched pipeline, unbiased resampling,
reward-driven selection, and that everything per-particle moves with the particles."""

import pytest
import torch

import diffaccel
from diffaccel.rewards import FunctionReward
from diffaccel.steering import FKSteeringConfig, FlowMatchSDEScheduler, steer
from diffaccel.steering import session as session_module
from diffaccel.steering.resampling import resample_indices
from diffaccel.steering.stochastic import stochastic_call
from diffaccel.testing import TINY_CALL_KWARGS, tiny_pipeline

PROMPT = "a red circle"
SIZE = {"height": 32, "width": 32}  # 4x4 latents: fast on CPU


def _brightness(images, prompts):
    return images.mean(dim=tuple(range(1, images.ndim)))


BRIGHT = FunctionReward(_brightness, name="brightness")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_one_particle_without_resampling_is_the_untouched_pipeline():
    pipe = tiny_pipeline("sd", scheduler="ddim")
    reference = pipe(PROMPT, num_inference_steps=4, generator=_gen(), eta=1.0, output_type="pt", **SIZE).images
    config = FKSteeringConfig(num_particles=1, resample_every=0, final_correction=False)
    out = steer(pipe, config, BRIGHT)(PROMPT, num_inference_steps=4, generator=_gen(), eta=1.0, output_type="pt", **SIZE)
    assert torch.equal(out.images, reference)
    assert out.stats.nfe == 4 and out.stats.resampled_steps == []
    # With resampling on, one particle can only be its own ancestor: still the same samples.
    config = FKSteeringConfig(num_particles=1, resample_every=1)
    out = steer(pipe, config, BRIGHT)(PROMPT, num_inference_steps=4, generator=_gen(), eta=1.0, output_type="pt", **SIZE)
    assert torch.equal(out.images, reference)
    assert "StableDiffusionPipeline" == type(pipe).__name__ and "step" not in pipe.scheduler.__dict__


def test_constant_reward_leaves_particles_unbiased():
    pipe = tiny_pipeline("sd", scheduler="ddpm")
    constant = FunctionReward(lambda images, prompts: torch.ones(images.shape[0]), name="constant")
    reference = pipe([PROMPT] * 4, num_inference_steps=4, generator=_gen(), output_type="pt", **SIZE).images
    # Systematic resampling of equal weights keeps every particle exactly once.
    config = FKSteeringConfig(num_particles=4, resample_every=1, resampling="systematic")
    out = steer(pipe, config, constant)(PROMPT, num_inference_steps=4, generator=_gen(), output_type="pt", **SIZE)
    assert all(a == [0, 1, 2, 3] for a in out.stats.ancestry)
    assert torch.allclose(out.images, reference, atol=1e-6)
    # Multinomial resampling of equal weights: every particle is drawn equally often on average.
    local = resample_indices(torch.zeros(3000, 8), "multinomial", _gen(1)) % 8
    counts = torch.bincount(local, minlength=8).float()
    expected = 3000.0
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001


@pytest.mark.parametrize("method", ["multinomial", "systematic"])
def test_resampling_draws_in_proportion_to_the_weights(method):
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    draws = 2000
    indices = resample_indices(weights.log().repeat(draws, 1), method, _gen(2)).view(draws, 2, 4)
    group_start = torch.tensor([0, 4]).view(1, 2, 1) + torch.arange(draws).view(draws, 1, 1) * 8
    local = indices - group_start
    assert bool(((local >= 0) & (local < 4)).all())  # groups never mix
    counts = torch.bincount((local + torch.tensor([0, 4]).view(1, 2, 1)).flatten(), minlength=8).float()
    assert torch.allclose(counts / 2000, 4 * weights.flatten(), atol=0.05)


def test_brightness_reward_makes_fk_pick_brighter_samples_than_best_of_one():
    pipe = tiny_pipeline("sd", scheduler="ddpm")
    config = FKSteeringConfig(num_particles=4, potential="immediate", lmbda=2000.0, resample_every=1)
    steering = steer(pipe, config, BRIGHT)
    fk, single = [], []
    for seed in range(3):
        out = steering(PROMPT, num_inference_steps=5, generator=_gen(seed), output_type="pt", **SIZE)
        fk.append(out.rewards.mean())
        plain = pipe(PROMPT, num_inference_steps=5, generator=_gen(seed), output_type="pt", **SIZE).images
        single.append(_brightness(plain, None)[0])
    assert min(fk) > max(single) or sum(fk) > sum(single) + 3 * 1e-3
    assert torch.stack(fk).mean() > torch.stack(single).mean()


def test_fk_beats_best_of_n_at_equal_nfe_when_the_reward_is_predictive_early():
    """Best-of-4 is FK without resampling: same particles, same NFE. On brightness, which the early x0
    already shows, resampling into the bright particles must find brighter samples; if duplicated
    particles shared their noise, or resampling mixed up particles, it would not."""
    pipe = tiny_pipeline("sd", scheduler="ddim")
    wins = losses = 0
    gains = []
    for seed in range(8):
        best = {}
        for name, every in (("best-of-n", 0), ("fk", 1)):
            config = FKSteeringConfig(num_particles=4, lmbda=3000.0, resample_every=every, final_correction=False, seed=seed)
            out = steer(pipe, config, BRIGHT)(PROMPT, num_inference_steps=10, generator=_gen(seed), eta=1.0,
                                               output_type="pt", **SIZE)
            assert out.stats.nfe == 40
            best[name] = float(_brightness(out.images, None).max())
        gains.append(best["fk"] - best["best-of-n"])
        wins, losses = wins + (gains[-1] > 1e-6), losses + (gains[-1] < -1e-6)
    assert wins > losses
    assert sum(gains) / len(gains) > 1e-3  # particles' brightness spreads about 0.015 here


def _selection_run(pipe, embeddings_seen=None, **call):
    """All particles copy the brightest one at step 0; a deterministic scheduler then keeps them identical
    only if everything per-particle (latents, scheduler history, feature caches) moved with them."""
    config = FKSteeringConfig(
        num_particles=3, potential="immediate", lmbda=1e6, resample_every=100, final_correction=False
    )
    if embeddings_seen is not None:
        call["callback_on_step_end"] = lambda p, i, t, kw: embeddings_seen.append("prompt_embeds" in kw) or kw
    with pytest.warns(UserWarning, match="deterministic"):
        out = steer(pipe, config, BRIGHT)(PROMPT, generator=_gen(), output_type="pt", **SIZE, **call)
    assert out.stats.resampled_steps == [0] and len(set(out.stats.ancestry[0])) == 1
    return out.images


def _spread(images):
    return float((images - images[:1]).abs().max())


def test_multistep_scheduler_history_moves_with_the_particles(monkeypatch):
    pipe = tiny_pipeline("sd", scheduler="dpmsolver")
    assert pipe.scheduler.config.solver_order == 2
    assert _spread(_selection_run(pipe, num_inference_steps=4)) < 1e-5
    monkeypatch.setattr(session_module, "HISTORY_ATTRIBUTES", ())
    assert _spread(_selection_run(pipe, num_inference_steps=4)) > 1e-3  # the check above can fail


def test_encoder_reuse_caches_move_with_the_particles(monkeypatch):
    pipe = diffaccel.accelerate(tiny_pipeline("sd", scheduler="ddim"), diffaccel.EncoderReuseConfig("uniform:3"))
    seen = []
    assert _spread(_selection_run(pipe, seen, num_inference_steps=4)) < 1e-5
    assert seen == [True] * 4  # the embeddings reach the step-end callback through the accelerated class
    assert pipe.acceleration_stats.features["encoder_reuse"].encoder_evaluations == 2
    from diffaccel.features.encoder_reuse import EncoderReuse

    monkeypatch.setattr(EncoderReuse, "reindex", lambda self, indices: None)
    assert _spread(_selection_run(pipe, num_inference_steps=4)) > 1e-3


def test_prompt_embeddings_are_reindexed_and_user_callback_still_runs():
    pipe = tiny_pipeline("sd", scheduler="ddpm")
    seen = []

    def callback(pipe, index, timestep, kwargs):
        seen.append((index, kwargs["prompt_embeds"].shape[0]))
        return kwargs

    prompts = ["a red circle", "a blue square"]
    config = FKSteeringConfig(num_particles=2, resample_every=1, lmbda=1e6, potential="immediate")
    out = steer(pipe, config, BRIGHT)(
        prompts, num_inference_steps=3, generator=_gen(), output_type="pt", callback_on_step_end=callback, **SIZE
    )
    assert [i for i, _ in seen] == [0, 1, 2] and all(batch == 8 for _, batch in seen)  # CFG: 2 x 4 particles
    for ancestry in out.stats.ancestry:  # particles of one prompt never take another prompt's state
        assert all(a // 2 == i // 2 for i, a in enumerate(ancestry))
    assert out.best_indices[0] in (0, 1) and out.best_indices[1] in (2, 3)


def test_max_batch_chunks_give_the_same_result():
    pipe = tiny_pipeline("sd", scheduler="ddpm")
    calls = []
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    runs = []
    for max_batch in (None, 2):
        config = FKSteeringConfig(num_particles=4, resample_every=1, lmbda=50.0, max_batch=max_batch)
        runs.append(steer(pipe, config, BRIGHT)(PROMPT, num_inference_steps=3, generator=_gen(), output_type="pt", **SIZE))
    handle.remove()
    assert calls == [8, 8, 8] + [4, 4] * 3  # CFG rows of at most 2 particles per chunk
    assert runs[0].stats.ancestry == runs[1].stats.ancestry
    assert torch.allclose(runs[0].images, runs[1].images, atol=1e-5)
    assert "_diffusers_hook" not in vars(pipe.unet) and "forward" not in vars(pipe.unet)  # hook removed


def test_flow_pipeline_and_video_pipeline():
    pipe = tiny_pipeline("flux")
    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.7)
    config = FKSteeringConfig(num_particles=2, resample_every=2)
    out = steer(pipe, config, BRIGHT)(PROMPT, num_inference_steps=3, output_type="np", **TINY_CALL_KWARGS["flux"])
    assert out.images.shape == (2, 64, 64, 3) and out.stats.resampled_steps == [0, 2]
    video = tiny_pipeline("ltx")
    video.scheduler = FlowMatchSDEScheduler.from_config(video.scheduler.config, noise_level=0.7)
    out = steer(video, config, BRIGHT)(PROMPT, num_inference_steps=2, output_type="pil", **TINY_CALL_KWARGS["ltx"])
    assert len(out.frames) == 2 and len(out.frames[0]) == 9 and len(out.best) == 1
    # CogVideoX: its DPM scheduler returns tuples and the loop keeps the previous x0 per sample.
    cog = tiny_pipeline("cogvideox")
    extra = stochastic_call(cog)
    assert type(cog.scheduler).__name__ == "CogVideoXDPMScheduler"
    out = steer(cog, config, BRIGHT)(PROMPT, num_inference_steps=3, output_type="pt", **extra, **TINY_CALL_KWARGS["cogvideox"])
    assert out.frames.shape == (2, 9, 3, 32, 32) and out.stats.resampled_steps == [0, 2]


def test_nan_rewards_count_as_worst_and_are_reported():
    pipe = tiny_pipeline("sd", scheduler="ddpm")
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        scores = _brightness(images, prompts)
        if calls["n"] > 1:  # the probe before sampling stays finite
            scores[0] = float("nan")
        return scores

    out = steer(pipe, FKSteeringConfig(num_particles=2, resample_every=1), FunctionReward(flaky))(
        PROMPT, num_inference_steps=3, generator=_gen(), output_type="pt", **SIZE
    )
    assert out.stats.nan_scores >= 3 and not torch.isnan(out.rewards).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_particles": 0}, "num_particles"),
        ({"lmbda": -1.0}, "lmbda"),
        ({"resample_start": 5, "resample_end": 2}, "resample_start"),
        ({"potential": "median"}, "potential"),
        ({"resampling": "residual"}, "resampling"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_bad_configs_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FKSteeringConfig(**kwargs)


def test_bad_calls_fail_before_sampling():
    pipe = tiny_pipeline("sd", scheduler="ddpm")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    wrong = FunctionReward(lambda images, prompts: torch.zeros(1), name="wrong")
    with pytest.raises(ValueError, match=r"wrong must return one score per sample, shape \(2,\)"):
        steer(pipe, FKSteeringConfig(num_particles=2), wrong)(PROMPT, num_inference_steps=3)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        steer(pipe, FKSteeringConfig(), BRIGHT)(PROMPT, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="resample_start"):
        steer(pipe, FKSteeringConfig(resample_start=7), BRIGHT)(PROMPT, num_inference_steps=3)
    with pytest.raises(ValueError, match="output_type"):
        steer(pipe, FKSteeringConfig(), BRIGHT)(PROMPT, output_type="latent")
    with pytest.raises(TypeError, match="Reward"):
        steer(pipe, FKSteeringConfig(), lambda x, p: x)(PROMPT, num_inference_steps=3)
    assert calls == []


def test_potentials_and_final_correction():
    from diffaccel.steering.resampling import PotentialState

    rewards = [torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.1]), torch.tensor([0.3, 0.3])]
    expected = {
        "immediate": [[0.2, 0.5], [0.4, 0.1], [0.3, 0.3]],
        "difference": [[0.2, 0.5], [0.2, -0.4], [-0.1, 0.2]],
        "max": [[0.2, 0.5], [0.4, 0.5], [0.4, 0.5]],
        "sum": [[0.2, 0.5], [0.6, 0.6], [0.9, 0.9]],
    }
    for potential, steps in expected.items():
        state = PotentialState.start(2)
        for r, log_g in zip(rewards, steps):
            assert state.update(potential, 2.0, r).tolist() == pytest.approx([2 * x for x in log_g])
        final = torch.tensor([1.0, 0.0])
        # After the correction, a path's total weight is exp(lambda * final reward), whatever the potential.
        corrected = state.final_log_weights(2.0, final) - state.log_weights + state.log_potentials
        assert corrected.tolist() == pytest.approx([2.0, 0.0])


def test_adaptive_resampling_waits_for_a_low_effective_sample_size():
    pipe = tiny_pipeline("sd", scheduler="ddpm")
    constant = FunctionReward(lambda images, prompts: torch.zeros(images.shape[0]), name="constant")
    config = FKSteeringConfig(num_particles=3, resample_every=1, ess_threshold=0.5, final_correction=False)
    out = steer(pipe, config, constant)(PROMPT, num_inference_steps=4, generator=_gen(), output_type="pt", **SIZE)
    assert out.stats.scored_steps == [0, 1, 2] and out.stats.resampled_steps == []
    assert out.stats.ess == pytest.approx([3.0, 3.0, 3.0])
    config = FKSteeringConfig(num_particles=3, resample_every=1, ess_threshold=0.5, lmbda=1e4, final_correction=False)
    out = steer(pipe, config, BRIGHT)(PROMPT, num_inference_steps=4, generator=_gen(), output_type="pt", **SIZE)
    low = [step for step, ess in zip(out.stats.scored_steps, out.stats.ess) if ess < 1.5]  # threshold 0.5 x 3
    assert out.stats.resampled_steps == low and low
