"""Noise search: exact NFE budgets, traces, reproducible best noise, video pipelines."""

import pytest
import torch

import diffaccel
from diffaccel.rewards import FunctionReward
from diffaccel.steering import FlowMatchSDEScheduler, NoiseSearchConfig
from diffaccel.testing import TINY_CALL_KWARGS, tiny_pipeline

PROMPT = "a red circle"
SIZE = {"height": 32, "width": 32}
BRIGHT = FunctionReward(lambda images, prompts: images.mean(dim=tuple(range(1, images.ndim))), name="brightness")


def _counting_pipe(scheduler="ddpm"):
    pipe = tiny_pipeline("sd", scheduler=scheduler)
    rows = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0] // 2))  # CFG
    return pipe, rows


@pytest.mark.parametrize(
    "method, budget, candidates",
    [("random", 23, 5), ("zero-order", 20, 5), ("paths", 17, 4)],
)
def test_search_spends_exactly_its_budget(method, budget, candidates):
    pipe, rows = _counting_pipe()
    config = NoiseSearchConfig(method, budget_nfe=budget, batch_size=2, num_paths=2, branch_every=2)
    out = diffaccel.search(
        pipe, PROMPT, config, BRIGHT, num_inference_steps=4, generator=torch.Generator().manual_seed(0), **SIZE
    )
    assert out.nfe == sum(rows) == candidates * 4 <= budget
    finals = [c for c in out.trace if c.round == 3] if method == "paths" else out.trace
    assert len(finals) == candidates
    assert out.reward == max(c.reward for c in finals)
    assert max(c.nfe for c in out.trace) == out.nfe
    assert all(batch <= 2 for batch in rows)  # batch_size bounds every denoiser call


def test_random_search_returns_the_noise_of_the_best_sample():
    pipe = tiny_pipeline("sd", scheduler="ddim")
    config = NoiseSearchConfig("random", budget_nfe=12, batch_size=2)
    out = diffaccel.search(
        pipe, PROMPT, config, BRIGHT, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0), **SIZE
    )
    again = pipe(PROMPT, num_inference_steps=3, latents=out.latents, output_type="pt", **SIZE).images
    assert torch.allclose(again[0], out.image, atol=1e-5)
    assert abs(float(BRIGHT(again, PROMPT)[0]) - out.reward) < 1e-5
    assert sum(c.accepted for c in out.trace) >= 1


def test_zero_order_moves_the_pivot_only_on_improvement():
    pipe = tiny_pipeline("sd", scheduler="ddim")
    config = NoiseSearchConfig("zero-order", budget_nfe=21, batch_size=2, step_size=1.0)
    out = diffaccel.search(
        pipe, PROMPT, config, BRIGHT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), **SIZE
    )
    pivot = out.trace[0].reward
    for round_index in range(1, max(c.round for c in out.trace) + 1):
        batch = [c for c in out.trace if c.round == round_index]
        best = max(c.reward for c in batch)
        assert any(c.accepted for c in batch) == (best > pivot)
        pivot = max(pivot, best)
    assert out.reward == pivot >= out.trace[0].reward
    radius = out.latents.flatten().norm()
    assert abs(float(radius) - float(out.latents.numel() ** 0.5)) < 0.2 * out.latents.numel() ** 0.5


def test_search_on_a_video_pipeline():
    pipe = tiny_pipeline("ltx")
    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.7)
    config = NoiseSearchConfig("paths", budget_nfe=4, batch_size=2, num_paths=1)
    out = diffaccel.search(pipe, PROMPT, config, BRIGHT, num_inference_steps=2, output_type="np", **TINY_CALL_KWARGS["ltx"])
    assert out.frames.shape == (9, 32, 32, 3) and out.nfe == 4


def test_bad_search_arguments_fail_before_sampling():
    pipe, rows = _counting_pipe()
    with pytest.raises(ValueError, match="budget_nfe"):
        diffaccel.search(pipe, PROMPT, NoiseSearchConfig(budget_nfe=3), BRIGHT, num_inference_steps=4)
    with pytest.raises(ValueError, match="latents"):
        diffaccel.search(pipe, PROMPT, NoiseSearchConfig(budget_nfe=8), BRIGHT, num_inference_steps=4, latents=None)
    with pytest.raises(ValueError, match="method"):
        NoiseSearchConfig("beam")
    with pytest.raises(ValueError, match="step_size"):
        NoiseSearchConfig("zero-order", step_size=0.0)
    wrong = FunctionReward(lambda images, prompts: torch.zeros(3), name="wrong")
    with pytest.raises(ValueError, match="wrong must return one score per sample"):
        diffaccel.search(pipe, PROMPT, NoiseSearchConfig(budget_nfe=8), wrong, num_inference_steps=4)
    assert rows == []


@pytest.mark.parametrize("name", ["sd3", "flux", "wan"])
def test_rollover_budget_forcing_look_ahead_matches_the_next_step(name):
    pipe = tiny_pipeline(name)
    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.7)
    logged = []

    def logging_reward(images, prompts):
        scores = images.mean(dim=(1, 2, 3))
        logged.append(scores.clone())
        return scores

    reward = FunctionReward(logging_reward, name="brightness")
    config = NoiseSearchConfig("rbf", budget_nfe=7, batch_size=1)  # 4 loop steps + 1 look-ahead per step
    out = diffaccel.search(pipe, PROMPT, config, reward, num_inference_steps=4, **TINY_CALL_KWARGS[name])
    assert out.nfe == 7 and [c.nfe for c in out.trace] == [2, 4, 6, 7]
    # Calls: probe, then per step [current x0, candidate look-ahead], then the final image.
    scores = [float(s[0]) for s in logged[1:]]
    current, lookahead = scores[0:6:2], scores[1:6:2]
    # The only candidate of a step is taken, so the next step's own x0 is the look-ahead's x0.
    assert current[1:] == pytest.approx(lookahead[:2], abs=1e-5)
    assert out.reward == pytest.approx(float(logged[-1].mean()))  # clips: the mean of the sampled frames


def test_rollover_budget_forcing_needs_the_sde_scheduler():
    pipe = tiny_pipeline("flux")
    with pytest.raises(diffaccel.UnsupportedPipelineError, match="FlowMatchSDEScheduler"):
        diffaccel.search(pipe, PROMPT, NoiseSearchConfig("rbf", budget_nfe=8), BRIGHT, num_inference_steps=2,
                         **TINY_CALL_KWARGS["flux"])
