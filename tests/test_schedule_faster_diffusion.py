"""The faster-diffusion key-step schedule saves work at every step count a sampler uses, keeps the
paper's 50-step schedule, and counts the steps img2img executes."""

import warnings

import pytest

import diffaccel
from diffaccel import EncoderReuseConfig
from diffaccel.features.key_steps import FASTER_DIFFUSION_KEY_STEPS_50, FasterDiffusionSchedule
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

SCHEDULE = FasterDiffusionSchedule()


@pytest.mark.parametrize(
    "steps, key_steps",
    [
        (4, (0, 2)),
        (6, (0, 1, 3)),
        (8, (0, 1, 2, 4)),
        (10, (0, 1, 2, 3, 5)),
        (20, (0, 1, 2, 4, 6, 10, 14)),
        (50, FASTER_DIFFUSION_KEY_STEPS_50),
    ],
)
def test_key_steps_per_step_count(steps, key_steps):
    assert SCHEDULE.key_steps(steps) == key_steps


def test_the_50_step_schedule_is_the_papers():
    assert SCHEDULE.key_steps(50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert SCHEDULE.key_steps(100) == (0, 2, 4, 6, 10, 20, 30, 50, 70)


@pytest.mark.parametrize("steps", range(2, 101))
def test_every_step_count_reuses_the_encoder_at_half_its_steps_or_more(steps):
    key_steps = SCHEDULE.key_steps(steps)
    assert key_steps[0] == 0 and list(key_steps) == sorted(set(key_steps)) and key_steps[-1] < steps
    assert len(key_steps) <= (steps + 1) // 2


@pytest.mark.parametrize("steps", range(11, 101))
def test_from_11_steps_on_the_schedule_is_the_proportional_one(steps):
    proportional = sorted({min(steps - 1, round(k * steps / 50)) for k in FASTER_DIFFUSION_KEY_STEPS_50})
    assert SCHEDULE.key_steps(steps) == tuple(proportional)


def test_a_one_step_loop_warns_that_reuse_saves_nothing():
    with pytest.warns(UserWarning, match="saves nothing"):
        assert SCHEDULE.key_steps(1) == (0,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SCHEDULE.key_steps(2)


@pytest.mark.parametrize("steps, encoder_runs", [(6, 3), (4, 2)])
def test_text_to_image_runs_the_encoder_at_the_key_steps_only(steps, encoder_runs):
    pipe = tiny_pipeline("sd")
    diffaccel.accelerate(pipe, EncoderReuseConfig("faster-diffusion", parallel=False))
    pipe("a red circle", num_inference_steps=steps, output_type="np", **tiny_call_inputs("sd"))
    stats = pipe.acceleration_stats.features["encoder_reuse"]
    assert stats.num_steps == steps and stats.encoder_evaluations == encoder_runs


@pytest.mark.parametrize("strength, executed, key_steps", [(0.6, 3, (0, 1)), (0.7, 4, (0, 2))])
def test_img2img_schedules_the_steps_it_executes(strength, executed, key_steps):
    """img2img at 6 steps runs int(strength * 6) of them; the schedule covers those and saves work."""
    pipe = tiny_pipeline("sd-img2img")
    diffaccel.accelerate(pipe, EncoderReuseConfig("faster-diffusion", parallel=False))
    pipe("a red circle", num_inference_steps=6, strength=strength, output_type="np", **tiny_call_inputs("sd-img2img"))
    stats = pipe.acceleration_stats.features["encoder_reuse"]
    assert stats.num_steps == executed and stats.key_steps == key_steps
    assert stats.encoder_evaluations == len(key_steps) < executed
