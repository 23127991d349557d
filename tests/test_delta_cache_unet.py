"""The temporal delta cache on UNet pipelines: the transformer blocks inside the UNet's attentions."""

from __future__ import annotations

import pytest
import torch

import diffaccel
from diffaccel.features.delta_cache import DeltaCacheConfig
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

STEPS = 6


def _run(pipe, name="sd", steps=STEPS):
    return pipe("a red circle", num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **tiny_call_inputs(name)).images


def _unet_blocks(pipe) -> int:
    return sum(1 for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock")


def _expected_skips(steps: int, first: int, last: int, max_skips: int) -> int:
    """Skips of one block under the rule when every allowed skip is taken (threshold inf)."""
    skipped, run = 0, 0
    for step in range(steps):
        if step > 0 and first <= step < steps - last and run < max_skips:
            skipped, run = skipped + 1, run + 1
        else:
            run = 0
    return skipped


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_threshold_zero_is_the_untouched_unet_pipeline(name):
    pipe = tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    expected = _run(pipe, name)
    accelerated = diffaccel.accelerate(pipe, DeltaCacheConfig(threshold=0.0))
    assert torch.equal(_run(accelerated, name), expected)
    stats = accelerated.acceleration_stats.features["delta_cache"]
    assert stats.blocks_skipped == 0 and stats.blocks_computed == STEPS * _unet_blocks(pipe)
    assert torch.equal(_run(diffaccel.restore(pipe), name), expected)


@pytest.mark.parametrize("first, last, max_skips", [(1, 1, 2), (2, 0, 1), (0, 2, 3)])
def test_unet_skip_counts_follow_the_rule(first, last, max_skips):
    pipe = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    config = DeltaCacheConfig(threshold=float("inf"), first_steps=first, last_steps=last, max_consecutive_skips=max_skips)
    pipe = diffaccel.accelerate(pipe, config)
    output = _run(pipe)
    stats = pipe.acceleration_stats.features["delta_cache"]
    blocks = _unet_blocks(pipe)
    assert stats.blocks == blocks and stats.branches == ("default",)
    assert stats.blocks_skipped == blocks * _expected_skips(STEPS, first, last, max_skips)
    assert stats.blocks_computed + stats.blocks_skipped == STEPS * blocks
    assert torch.isfinite(output).all()


def test_unet_delta_cache_composes_with_encoder_reuse():
    pipe = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    reuse = diffaccel.EncoderReuseConfig("uniform:2", parallel=False)
    reuse_only = _run(diffaccel.accelerate(pipe, reuse))
    # threshold 0: the delta cache changes nothing on top of encoder reuse
    assert torch.equal(_run(diffaccel.accelerate(pipe, DeltaCacheConfig(threshold=0.0), reuse)), reuse_only)
    both = diffaccel.accelerate(pipe, DeltaCacheConfig(threshold=float("inf")), reuse)
    output = _run(both)
    features = both.acceleration_stats.features
    assert features["encoder_reuse"].encoder_evaluations == STEPS // 2
    assert features["delta_cache"].blocks_skipped > 0 and torch.isfinite(output).all()
    assert not torch.equal(output, reuse_only)
    diffaccel.restore(pipe)


def test_micro_sd_with_the_delta_cache_still_draws_the_prompt():
    from diffaccel.micro_models import load_micro_sd
    from diffaccel.shapeworld import Verifier

    pipe = diffaccel.accelerate(load_micro_sd(), DeltaCacheConfig(threshold=0.1))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert pipe.acceleration_stats.features["delta_cache"].blocks_skipped > 0
    results = Verifier().verify(images, prompts)
    assert sum(r.passed for r in results) >= 2
