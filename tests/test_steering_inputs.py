"""Per-prompt inputs (init images, masks, control images, embeddings) follow the particles, noise
search counts the steps the loop executes, and scheduler advice fits the model."""

import warnings

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel.rewards import FunctionReward
from diffaccel.steering import FKSteeringConfig, NoiseSearchConfig, steer
from diffaccel.steering.inputs import particle_kwargs
from diffaccel.steering.session import check_stochastic
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]
BRIGHT = FunctionReward(lambda images, prompts: images.mean(dim=tuple(range(1, images.ndim))), name="brightness")
NO_RESAMPLING = FKSteeringConfig(num_particles=2, resample_every=0, final_correction=False)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _repeat_each(items, k):
    return [item for item in items for _ in range(k)]


@pytest.mark.parametrize("name", ["sd-img2img", "sd-inpaint"])
def test_fk_particles_get_their_own_prompts_image(name):
    """Two prompts with one init image (and mask) each: particles 0, 1 start from image 0 and
    particles 2, 3 from image 1, exactly as a plain call given the images repeated per particle;
    diffusers' "more prompts than images" deprecation path is never taken."""
    pipe = tiny_pipeline(name, scheduler="ddpm")
    inputs = tiny_call_inputs(name, batch_size=2)
    repeated = {key: _repeat_each(value, 2) if isinstance(value, list) else value for key, value in inputs.items()}
    reference = pipe(
        _repeat_each(PROMPTS, 2), num_inference_steps=2, generator=_gen(), output_type="pt", **repeated
    ).images
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = steer(pipe, NO_RESAMPLING, BRIGHT)(PROMPTS, num_inference_steps=2, generator=_gen(), output_type="pt", **inputs)
    assert torch.allclose(out.images, reference, atol=1e-6)


def test_search_on_img2img_repeats_the_image_without_deprecation():
    pipe = tiny_pipeline("sd-img2img", scheduler="ddpm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = diffaccel.search(
            pipe, PROMPTS[0], NoiseSearchConfig("random", budget_nfe=6, batch_size=3), BRIGHT,
            num_inference_steps=2, strength=1.0, generator=_gen(), **tiny_call_inputs("sd-img2img"),
        )
    assert out.nfe == 6 and len(out.trace) == 3


@pytest.mark.parametrize("method, candidates", [("random", 6), ("zero-order", 6), ("paths", 6)])
def test_img2img_search_fills_its_budget_with_the_executed_steps(method, candidates):
    """strength=0.5 of 4 steps runs 2 steps: a 12 NFE budget buys 6 samples, not 12 // 4 = 3."""
    pipe = tiny_pipeline("sd-img2img", scheduler="ddpm")
    rows = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0] // 2))  # CFG
    config = NoiseSearchConfig(method, budget_nfe=12, batch_size=3, num_paths=2)
    out = diffaccel.search(
        pipe, PROMPTS[0], config, BRIGHT, num_inference_steps=4, strength=0.5, generator=_gen(),
        **tiny_call_inputs("sd-img2img"),
    )
    assert out.nfe == sum(rows) == 12
    assert all(stats.num_steps == 2 for stats in out.stats)
    finals = [c for c in out.trace if c.round == 1] if method == "paths" else out.trace
    assert len(finals) == candidates


def test_search_budget_error_names_the_executed_steps():
    pipe = tiny_pipeline("sd-img2img")
    with pytest.raises(ValueError, match="smaller than one sample's 2 denoising steps"):
        diffaccel.search(
            pipe, PROMPTS[0], NoiseSearchConfig(budget_nfe=1), BRIGHT, num_inference_steps=4, strength=0.5,
            **tiny_call_inputs("sd-img2img"),
        )


def test_rbf_on_an_epsilon_unet_says_flow_matching_models_only():
    pipe = tiny_pipeline("sd", scheduler="ddpm")
    rows = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    with pytest.raises(diffaccel.UnsupportedPipelineError, match="flow-matching models only") as error:
        diffaccel.search(pipe, PROMPTS[0], NoiseSearchConfig("rbf", budget_nfe=8), BRIGHT, num_inference_steps=2)
    assert "FlowMatchSDEScheduler" not in str(error.value)
    assert rows == []


def test_deterministic_scheduler_advice_fits_the_model():
    with pytest.warns(UserWarning, match="deterministic") as record:
        check_stochastic(tiny_pipeline("sd", scheduler="ddim").scheduler, {})
    assert "FlowMatchSDEScheduler" not in str(record[0].message) and "DDPM" in str(record[0].message)
    with pytest.warns(UserWarning, match="FlowMatchSDEScheduler"):
        check_stochastic(tiny_pipeline("flux").scheduler, {})


def test_particle_kwargs_repeats_every_per_prompt_input():
    embeds = torch.arange(2.0).view(2, 1, 1)
    call = particle_kwargs(
        {
            "negative_prompt": ["n0", "n1"],
            "prompt_2": "shared",
            "image": torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]),
            "mask_image": ["m"],
            "control_image": np.zeros((2, 4, 4, 3)),
            "negative_prompt_embeds": embeds,
            "latents": torch.zeros(5, 4),  # not one row per prompt: left to the pipeline
        },
        _repeat_each(PROMPTS, 3),
        3,
    )
    assert call["prompt"] == _repeat_each(PROMPTS, 3) and call["output_type"] == "pt"
    assert call["negative_prompt"] == ["n0"] * 3 + ["n1"] * 3 and call["prompt_2"] == "shared"
    assert call["image"][:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert call["mask_image"] == ["m"] * 6
    assert call["control_image"].shape == (6, 4, 4, 3)
    assert call["negative_prompt_embeds"].flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert call["latents"].shape == (5, 4)
    single = particle_kwargs({"image": "one image"}, ["p"] * 4, 4)
    assert single["image"] == ["one image"] * 4


def test_multi_controlnet_images_are_repeated_per_controlnet():
    from diffusers import MultiControlNetModel

    pipe = tiny_pipeline("sd-controlnet")
    pipe.controlnet = MultiControlNetModel([pipe.controlnet, pipe.controlnet])
    call = particle_kwargs({"image": [["c0", "c1"], "shared"]}, _repeat_each(PROMPTS, 2), 2, pipe)
    assert call["image"] == [["c0", "c0", "c1", "c1"], ["shared"] * 4]
