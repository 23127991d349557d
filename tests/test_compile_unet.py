"""diffaccel's UNet features on a ``torch.compile``d UNet (compiled in place with ``unet.compile()``,
CPU inductor): the preset's images equal the eager preset's, its key steps are the same, a second
call compiles nothing new, and ``restore`` gives the compiled untouched UNet back. A
``torch.compile`` wrapper assigned to ``pipe.unet`` is refused with an error that says what to do.
GPU timings: bench/compile_unet.py."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import diffaccel
from diffaccel.errors import UnsupportedPipelineError
from diffaccel.testing import tiny_pipeline

STEPS = 6


def _images(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=STEPS, generator=generator, output_type="pt").images


@pytest.fixture(scope="module")
def eager():
    """The eager pipeline's images: untouched, and with the "fast" preset (and its key steps)."""
    pipe = tiny_pipeline("sd")
    untouched = _images(pipe)
    diffaccel.accelerate(pipe, "fast")
    fast = _images(pipe)
    return untouched, fast, pipe.acceleration_stats.features["encoder_reuse"]


def test_preset_on_an_inductor_compiled_unet_equals_the_eager_preset(eager):
    untouched, fast, stats = eager
    torch._dynamo.reset()
    pipe = tiny_pipeline("sd")
    pipe.unet.compile(backend="inductor")
    diffaccel.accelerate(pipe, "fast")
    compiled = _images(pipe)
    compiled_stats = pipe.acceleration_stats.features["encoder_reuse"]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # dynamo did compile the UNet (with the hooks' decisions as graph breaks)
    torch.testing.assert_close(compiled, fast, atol=1e-4, rtol=0)
    assert (compiled_stats.key_steps, compiled_stats.guidance_reused) == (stats.key_steps, stats.guidance_reused)
    assert 0 < len(stats.key_steps) < STEPS and stats.shallow_layers == 1
    torch.testing.assert_close(_images(pipe), compiled, atol=0, rtol=0)  # a second call: the same graphs
    assert counters["stats"]["unique_graphs"] == graphs
    diffaccel.restore(pipe)
    torch.testing.assert_close(_images(pipe), untouched, atol=1e-4, rtol=0)


def test_a_compile_wrapper_is_refused_with_what_to_do_instead():
    pipe = tiny_pipeline("sd")
    pipe.unet = torch.compile(pipe.unet)
    with pytest.raises(UnsupportedPipelineError, match=r"pipe.unet is a torch.compile wrapper \(OptimizedModule\).*"
                                                         r"pipe.unet.compile\(\)"):
        diffaccel.accelerate(pipe, "fast")
    assert not hasattr(pipe, "acceleration_stats") or not pipe.acceleration_stats.features
    diffaccel.accelerate(pipe)  # no features: nothing to hook, nothing refused
