"""FlowMatchSDEScheduler: exact Euler at zero noise, reproducible noise, marginals kept."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffaccel.steering import FlowMatchSDEScheduler
from diffaccel.testing import TINY_CALL_KWARGS, tiny_pipeline


def _run(pipe, name, seed=0, steps=3):
    generator = torch.Generator().manual_seed(seed)
    out = pipe("a red circle", num_inference_steps=steps, generator=generator, output_type="pt", **TINY_CALL_KWARGS[name])
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("name, interpolant", [("flux", "linear"), ("flux", "vp"), ("sd3", "vp"), ("wan", "linear")])
def test_zero_noise_reproduces_euler_exactly(name, interpolant):
    pipe = tiny_pipeline(name)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    reference = _run(pipe, name)
    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.0, interpolant=interpolant)
    assert torch.equal(_run(pipe, name), reference)
    if name != "flux":
        return
    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.8, interpolant=interpolant)
    pipe.scheduler.set_noise_generator(torch.Generator().manual_seed(1))
    noisy = _run(pipe, name)
    pipe.scheduler.set_noise_generator(torch.Generator().manual_seed(1))
    assert torch.equal(_run(pipe, name), noisy)  # same noise seed, same output
    assert not torch.allclose(noisy, reference, atol=1e-4)


def _gaussian_velocity(x, t, mean, std):
    """Exact velocity of the linear path from N(mean, std^2) data to N(0, 1) noise."""
    var = (1 - t) ** 2 * std**2 + t**2
    centered = x - (1 - t) * mean
    return t / var * centered - (mean + (1 - t) * std**2 / var * centered)


@pytest.mark.parametrize("interpolant", ["linear", "vp"])
@pytest.mark.parametrize("noise_level", [0.5, 1.0])
def test_sde_keeps_the_marginals(interpolant, noise_level):
    mean, std = 2.0, 0.5
    scheduler = FlowMatchSDEScheduler(noise_level=noise_level, interpolant=interpolant)
    scheduler.set_timesteps(100)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, generator=generator)
    for t in scheduler.timesteps:
        sigma = float(scheduler.sigmas[scheduler.step_index or 0])
        x = scheduler.step(_gaussian_velocity(x, sigma, mean, std), t, x, generator=generator).prev_sample
    assert abs(float(x.mean()) - mean) < 0.03
    assert abs(float(x.std()) - std) < 0.03


def test_bad_config():
    with pytest.raises(ValueError, match="noise_level"):
        FlowMatchSDEScheduler(noise_level=-1.0)
    with pytest.raises(ValueError, match="interpolant"):
        FlowMatchSDEScheduler(interpolant="cosine")
