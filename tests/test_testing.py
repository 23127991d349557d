"""Tests for diffaccel.testing (tiny random-weight pipelines) and diffaccel.tokenizers (offline tokenizers)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import doctest  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import diffaccel.testing as dt  # noqa: E402
import diffaccel.testing.components as dt_components  # noqa: E402
import diffaccel.tokenizers as dtok  # noqa: E402
from diffaccel.testing import (  # noqa: E402
    IMAGE_CONDITIONED_NAMES,
    PIPELINE_NAMES,
    SCHEDULER_NAMES,
    TINY_CALL_KWARGS,
    VIDEO_PIPELINE_NAMES,
    sd15_layout_pipeline,
    tiny_call_inputs,
    tiny_pipeline,
)
from diffaccel.tokenizers import clip_tokenizer, t5_tokenizer  # noqa: E402

PROMPT = "a red circle"
#: The modules of diffaccel.testing besides components: the registry, the call inputs, one per family.
FAMILY_MODULES = ("pipelines", "call_inputs", "sd", "sdxl", "sd15_layout", "pixart", "sd3", "flux", "cogvideox", "wan", "ltx")


@functools.lru_cache(maxsize=None)
def _cached_pipe(name: str):
    """One seed-0 pipeline per name, shared by the read-only tests."""
    return tiny_pipeline(name, seed=0)


def _run(pipe, name: str, *, seed: int = 0, batch_size: int = 1, steps: int = 2, **extra) -> np.ndarray:
    prompt = PROMPT if batch_size == 1 else [f"{PROMPT} {i}" for i in range(batch_size)]
    inputs = tiny_call_inputs(name, batch_size=batch_size)
    inputs.update(extra)
    out = pipe(
        prompt,
        num_inference_steps=steps,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **inputs,
    )
    return np.asarray(out.frames if name in VIDEO_PIPELINE_NAMES else out.images)


def _expected_shape(name: str, batch_size: int = 1) -> tuple[int, ...]:
    kw = tiny_call_inputs(name)
    if name == "sd-img2img":  # output follows the input image
        h, w = kw["image"].height, kw["image"].width
    else:
        h, w = kw["height"], kw["width"]
    if name in VIDEO_PIPELINE_NAMES:
        return (batch_size, kw["num_frames"], h, w, 3)
    return (batch_size, h, w, 3)


def _components_state(pipe) -> dict[str, torch.Tensor]:
    state = {}
    for comp_name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for key, value in comp.state_dict().items():
                state[f"{comp_name}.{key}"] = value
    return state


# ------------------------------------------------------------------------------------------------
# (1) every pipeline builds and runs 2 steps offline
# ------------------------------------------------------------------------------------------------


def test_names_and_call_kwargs_are_consistent():
    assert len(PIPELINE_NAMES) == 11 and len(set(PIPELINE_NAMES)) == 11
    assert set(TINY_CALL_KWARGS) == set(PIPELINE_NAMES)
    for name in VIDEO_PIPELINE_NAMES:
        assert (TINY_CALL_KWARGS[name]["num_frames"] - 1) % 4 == 0
    for name in IMAGE_CONDITIONED_NAMES:
        assert "image" in tiny_call_inputs(name)
    assert "mask_image" in tiny_call_inputs("sd-inpaint")
    # a fresh copy every time: callers may mutate it
    kw = tiny_call_inputs("sd")
    kw["height"] = 1
    assert TINY_CALL_KWARGS["sd"]["height"] != 1


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_pipeline_runs_two_steps(name):
    pipe = _cached_pipe(name)
    assert pipe.__class__.__name__ == {
        "sd": "StableDiffusionPipeline",
        "sdxl": "StableDiffusionXLPipeline",
        "sd-controlnet": "StableDiffusionControlNetPipeline",
        "sd-img2img": "StableDiffusionImg2ImgPipeline",
        "sd-inpaint": "StableDiffusionInpaintPipeline",
        "pixart-sigma": "PixArtSigmaPipeline",
        "sd3": "StableDiffusion3Pipeline",
        "flux": "FluxPipeline",
        "cogvideox": "CogVideoXPipeline",
        "wan": "WanPipeline",
        "ltx": "LTXPipeline",
    }[name]
    if name not in IMAGE_CONDITIONED_NAMES:  # the documented call pattern
        out = pipe(PROMPT, **TINY_CALL_KWARGS[name], num_inference_steps=2, output_type="np")
        arr = np.asarray(out.frames if name in VIDEO_PIPELINE_NAMES else out.images)
    else:
        arr = _run(pipe, name)
    assert arr.shape == _expected_shape(name)
    assert np.isfinite(arr).all()
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    assert arr.std() > 1e-3, "random-weight pipelines should still produce a non-constant output"
    if hasattr(pipe, "safety_checker"):
        assert pipe.safety_checker is None


@pytest.mark.parametrize("name", ["sd-inpaint", "sd-controlnet", "sd-img2img", "wan"])
def test_batched_call(name):
    arr = _run(_cached_pipe(name), name, batch_size=2)
    assert arr.shape == _expected_shape(name, batch_size=2)
    assert np.isfinite(arr).all()
    assert not np.array_equal(arr[0], arr[1])


def test_controlnet_control_image_matters():
    pipe = _cached_pipe("sd-controlnet")
    a = _run(pipe, "sd-controlnet")
    inputs = tiny_call_inputs("sd-controlnet", seed=1)
    b = _run(pipe, "sd-controlnet", image=inputs["image"])
    assert np.abs(a - b).max() > 1e-3


def test_unet_overrides_and_inpaint_channels():
    assert _cached_pipe("sd-inpaint").unet.config.in_channels == 9
    pipe = tiny_pipeline("sd", layers_per_block=2, sample_size=4)
    assert pipe.unet.config.layers_per_block == 2
    assert _run(pipe, "sd", height=32, width=32, steps=1).shape == (1, 32, 32, 3)
    pipe = tiny_pipeline("flux", guidance_embeds=True)
    assert pipe.transformer.config.guidance_embeds


def test_tiny_unet_config_is_sd_like():
    config = dt.tiny_unet_config()
    assert sum(t.startswith("CrossAttn") for t in config["down_block_types"]) >= 2
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert len(config["up_block_types"]) == len(config["down_block_types"])
    assert config["up_block_types"] == tuple(
        t.replace("Down", "Up") for t in reversed(config["down_block_types"])
    )
    assert dt.tiny_unet_config(cross_attention_dim=64)["cross_attention_dim"] == 64


# ------------------------------------------------------------------------------------------------
# (2) seeding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_same_seed_same_weights_and_outputs(name):
    rng_before = torch.get_rng_state()
    a, b = _cached_pipe(name), tiny_pipeline(name, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not touch the global RNG"
    sa, sb = _components_state(a), _components_state(b)
    assert sa.keys() == sb.keys() and len(sa) > 0
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    np.testing.assert_array_equal(_run(a, name, seed=3), _run(b, name, seed=3))

    c = tiny_pipeline(name, seed=1)
    sc = _components_state(c)
    differing = [k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], sc[k])]
    denoiser = "unet" if hasattr(a, "unet") else "transformer"
    assert any(k.startswith(f"{denoiser}.") for k in differing)
    assert any(k.startswith("text_encoder.") for k in differing)
    assert any(k.startswith("vae.") for k in differing)


def test_generator_seed_changes_output():
    pipe = _cached_pipe("sd")
    assert not np.array_equal(_run(pipe, "sd", seed=0), _run(pipe, "sd", seed=1))


# ------------------------------------------------------------------------------------------------
# (3) schedulers and prediction types
# ------------------------------------------------------------------------------------------------

_SCHEDULER_CLASS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
    "lms": "LMSDiscreteScheduler",
}


def _scipy_available() -> bool:
    from diffusers.utils import is_scipy_available

    return is_scipy_available()


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_scheduler_options_on_sd(scheduler):
    if scheduler == "lms" and not _scipy_available():
        with pytest.raises(ImportError, match="scipy"):
            tiny_pipeline("sd", scheduler="lms")
        return
    prediction_type = "v_prediction" if scheduler in ("euler", "ddim") else "epsilon"
    pipe = tiny_pipeline("sd", scheduler=scheduler, prediction_type=prediction_type)
    assert type(pipe.scheduler).__name__ == _SCHEDULER_CLASS[scheduler]
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # built from SD's config
    arr = _run(pipe, "sd")
    assert arr.shape == _expected_shape("sd") and np.isfinite(arr).all()


def test_default_schedulers_and_prediction_type():
    assert type(_cached_pipe("sd").scheduler).__name__ == "DDIMScheduler"
    assert _cached_pipe("sd").scheduler.config.prediction_type == "epsilon"
    assert type(_cached_pipe("sdxl").scheduler).__name__ == "EulerDiscreteScheduler"
    pipe = tiny_pipeline("sdxl", scheduler="unipc", prediction_type="v_prediction")
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_bad_scheduler_arguments():
    with pytest.raises(ValueError, match="ddim"):
        tiny_pipeline("sd", scheduler="heun")
    with pytest.raises(ValueError, match="v_prediction"):
        tiny_pipeline("sd", prediction_type="sample")
    with pytest.raises(ValueError, match="only supported"):
        tiny_pipeline("flux", scheduler="ddim")


# ------------------------------------------------------------------------------------------------
# (4) CLIP tokenizer == open_clip's SimpleTokenizer
# ------------------------------------------------------------------------------------------------

_CLIP_TEXTS = [
    "a red circle",
    "A painting of a squirrel eating a burger!",
    "Hello   WORLD, it's 2024 -- don't stop (ok?)",
    "photo of an astronaut riding a horse on mars, 4k, highly detailed",
]


def test_clip_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    tok = clip_tokenizer()
    assert len(tok) == 49408 == dtok.CLIP_VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok(PROMPT).input_ids == [49406, 320, 736, 7117, 49407]
    for text in _CLIP_TEXTS:
        ids = tok(text).input_ids
        assert ids[0] == ref.sot_token_id and ids[-1] == ref.eot_token_id
        assert ids[1:-1] == ref.encode(text), text
    padded = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert tok.model_max_length == 77 and len(padded.input_ids) == 77


def test_clip_tokenizer_calls_are_independent():
    a, b = clip_tokenizer(), clip_tokenizer(pad_token="!")
    assert a is not b
    assert a.pad_token_id == 49407 and b.pad_token_id == 0
    a.add_tokens(["<my-new-token>"])
    assert len(clip_tokenizer()) == 49408


# ------------------------------------------------------------------------------------------------
# (5) T5 tokenizer
# ------------------------------------------------------------------------------------------------


def test_t5_tokenizer_round_trip_and_determinism():
    tok = t5_tokenizer()
    assert len(tok) == dtok.T5_DEFAULT_VOCAB_SIZE
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    texts = [
        PROMPT,
        "A Painting of a squirrel, eating a burger! (4K) #1 @home ~50% [x] {y} <z>",
        "supercalifragilisticexpialidocious zzzz QWERTY 1234567890",
    ]
    for text in texts:
        ids = tok(text).input_ids
        assert ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids, text  # every printable ASCII character is covered
        assert max(ids) < len(tok)
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert t5_tokenizer()(text).input_ids == ids  # deterministic across builds
    assert tok.convert_ids_to_tokens(tok(PROMPT).input_ids) == ["▁a", "▁red", "▁circle", "</s>"]
    # non-ASCII degrades to <unk> instead of failing
    assert tok.unk_token_id in tok("café 日本").input_ids
    batch = tok([PROMPT, "x " * 40], padding="max_length", max_length=16, truncation=True)
    assert [len(x) for x in batch.input_ids] == [16, 16]
    assert batch.input_ids[0][4:] == [tok.pad_token_id] * 12


def test_t5_tokenizer_sizes_and_extra_ids():
    small = t5_tokenizer(vocab_size=200, model_max_length=64)
    assert len(small) == 200 and small.model_max_length == 64
    assert small.decode(small("hello world").input_ids, skip_special_tokens=True) == "hello world"
    tok = t5_tokenizer(vocab_size=1100, extra_ids=100)
    assert len(tok) == 1100
    # T5's layout: <extra_id_0> is the last id, <extra_id_99> comes right after the regular pieces
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 1099
    assert tok.convert_tokens_to_ids("<extra_id_99>") == 1000
    assert tok("a <extra_id_0> b").input_ids[1] == 1099
    with pytest.raises(ValueError):
        t5_tokenizer(vocab_size=50)


# ------------------------------------------------------------------------------------------------
# (6) unknown names
# ------------------------------------------------------------------------------------------------


def test_unknown_name_raises():
    with pytest.raises(ValueError) as excinfo:
        tiny_pipeline("sd4")
    for name in PIPELINE_NAMES:
        assert name in str(excinfo.value)
    with pytest.raises(ValueError, match="pixart-sigma"):
        tiny_call_inputs("nope")


# ------------------------------------------------------------------------------------------------
# (7) SD 1.5 layout
# ------------------------------------------------------------------------------------------------


def test_sd15_layout_pipeline_small():
    pipe = sd15_layout_pipeline(width=32, sample_size=16)
    unet = pipe.unet.config
    assert tuple(unet.down_block_types) == (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    assert tuple(unet.up_block_types) == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert unet.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert tuple(unet.block_out_channels) == (32, 64, 128, 128)
    assert unet.layers_per_block == 2 and unet.attention_head_dim == 8 and unet.sample_size == 16
    assert pipe.text_encoder.config.hidden_size == unet.cross_attention_dim
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 8
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    latents = pipe(PROMPT, num_inference_steps=1, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


def test_sd15_layout_full_width_config_without_building(monkeypatch):
    """width=320 must produce SD 1.5's real configs; check them without allocating 1B parameters."""
    import diffusers

    seen = {}

    class _Stop(Exception):
        pass

    def fake_unet(**config):
        seen["unet"] = config
        raise _Stop

    monkeypatch.setattr(diffusers, "UNet2DConditionModel", fake_unet)
    with pytest.raises(_Stop):
        sd15_layout_pipeline()
    config = seen["unet"]
    assert config["block_out_channels"] == (320, 640, 1280, 1280)
    assert config["cross_attention_dim"] == 768 and config["sample_size"] == 64
    assert config["norm_num_groups"] == 32


# ------------------------------------------------------------------------------------------------
# docs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [dtok, dt_components, *(importlib.import_module(f"diffaccel.testing.{name}") for name in FAMILY_MODULES)],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
