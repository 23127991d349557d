"""Pipelines that share modules (``from_pipe``) keep their own features, and features follow a
replaced denoiser (offline, CPU, tiny pipelines, 4 steps)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch
from diffusers import StableDiffusionPipeline, WanPipeline

import diffaccel
from diffaccel import DeltaCacheConfig, EncoderReuseConfig, QuantizationConfig, QuantizedAttentionConfig
from diffaccel.features.base import FeatureConfig
from diffaccel.quantization import quantized_layers
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

STEPS = 4
INF = float("inf")
PLAIN_CLASSES = {"sd": StableDiffusionPipeline, "wan": WanPipeline}

# (family, the source's feature, another feature for a copy made with acceleration=)
CASES = {
    "sd-encoder-reuse": ("sd", EncoderReuseConfig("uniform:2", parallel=False), EncoderReuseConfig("uniform:4", parallel=False)),
    "sd-delta-cache": ("sd", DeltaCacheConfig(threshold=INF), DeltaCacheConfig(threshold=INF, max_consecutive_skips=1)),
    "wan-delta-cache": ("wan", DeltaCacheConfig(threshold=INF), DeltaCacheConfig(threshold=INF, max_consecutive_skips=1)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(pipe: Any, family: str) -> torch.Tensor:
    output = pipe("a red circle", num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(0), **tiny_call_inputs(family))
    return output.frames if family == "wan" else output.images


def _denoiser_attribute(family: str) -> str:
    return "unet" if family == "sd" else "transformer"


def _reference(family: str, config: FeatureConfig | None, denoiser_seed: int = 0) -> torch.Tensor:
    """The output of a fresh pipeline of its own (no shared modules) with ``config``, whose
    denoiser is the one of ``tiny_pipeline(family, seed=denoiser_seed)``."""
    pipe = tiny_pipeline(family)
    if denoiser_seed:
        attribute = _denoiser_attribute(family)
        setattr(pipe, attribute, getattr(tiny_pipeline(family, seed=denoiser_seed), attribute))
    return _run(pipe if config is None else diffaccel.accelerate(pipe, config), family)


def _worked(pipe: Any, config: FeatureConfig) -> bool:
    """Whether the feature did its work in the pipeline's last call."""
    stats = pipe.acceleration_stats.features[config.name]
    if config.name == "encoder_reuse":
        return stats.encoder_evaluations == len(stats.key_steps) < STEPS
    return stats.blocks_skipped > 0


def _check(pipe: Any, family: str, config: FeatureConfig, expected: torch.Tensor) -> None:
    assert torch.equal(_run(pipe, family), expected)
    assert _worked(pipe, config)
    assert pipe.acceleration == (config,)


@pytest.mark.parametrize("case", list(CASES))
def test_source_and_copy_with_the_same_features_both_work(case):
    family, config, _ = CASES[case]
    expected, untouched = _reference(family, config), _reference(family, None)
    assert not torch.equal(expected, untouched)  # the feature changes the output: the check below means something
    source = diffaccel.accelerate(tiny_pipeline(family), config)
    _check(source, family, config, expected)
    copy = type(source).from_pipe(source)
    for pipe in (copy, source, copy, source):
        _check(pipe, family, config, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_source_and_copy_with_other_features_each_keep_their_own(case):
    family, config, other = CASES[case]
    expected, expected_other = _reference(family, config), _reference(family, other)
    assert not torch.equal(expected, expected_other)
    source = diffaccel.accelerate(tiny_pipeline(family), config)
    copy = type(source).from_pipe(source, acceleration=other)
    for _ in range(2):
        _check(source, family, config, expected)
        _check(copy, family, other, expected_other)
    _check(copy, family, other, expected_other)  # twice in a row, then the source again
    _check(source, family, config, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_a_plain_copy_sharing_the_hooked_denoiser_draws_the_untouched_output(case):
    family, config, _ = CASES[case]
    expected, untouched = _reference(family, config), _reference(family, None)
    source = diffaccel.accelerate(tiny_pipeline(family), config)
    plain = PLAIN_CLASSES[family].from_pipe(source)
    assert torch.equal(_run(plain, family), untouched)
    _check(source, family, config, expected)
    assert torch.equal(_run(plain, family), untouched)
    _check(source, family, config, expected)


def test_a_copy_without_features_neither_uses_nor_removes_the_sources():
    config = EncoderReuseConfig("uniform:2", parallel=False)
    expected, untouched = _reference("sd", config), _reference("sd", None)
    source = diffaccel.accelerate(tiny_pipeline("sd"), config)
    bare = type(source).from_pipe(source, acceleration=[])
    assert bare.acceleration == () and torch.equal(_run(bare, "sd"), untouched)
    _check(source, "sd", config, expected)
    assert torch.equal(_run(bare, "sd"), untouched)


def test_restoring_the_source_leaves_the_copy_working():
    config = DeltaCacheConfig(threshold=INF)
    expected = _reference("wan", config)
    source = diffaccel.accelerate(tiny_pipeline("wan"), config)
    copy = type(source).from_pipe(source)
    diffaccel.restore(source)
    _check(copy, "wan", config, expected)
    diffaccel.restore(copy)
    assert not any(hasattr(module, "_diffusers_hook") for module in copy.transformer.modules())


def test_a_plain_copy_keeps_its_attention_when_the_source_quantizes_it():
    config = QuantizedAttentionConfig(impl="reference")
    untouched = _reference("sd", None)
    source = diffaccel.accelerate(tiny_pipeline("sd"), config)
    originals = dict(source.unet.attn_processors)
    plain = StableDiffusionPipeline.from_pipe(source)
    assert torch.equal(_run(plain, "sd"), untouched)
    quantized = _run(source, "sd")
    assert source.acceleration_stats.features["quantized_attention"].calls > 0
    assert not torch.equal(quantized, untouched)
    assert all(plain.unet.attn_processors[name] is p for name, p in originals.items())  # installed only during calls
    assert torch.equal(_run(plain, "sd"), untouched)


@pytest.mark.parametrize("family, config", [
    ("sd", EncoderReuseConfig("all")),
    ("sd", EncoderReuseConfig("uniform:2", parallel=False)),
    ("sd", DeltaCacheConfig(threshold=INF)),
    ("wan", DeltaCacheConfig(threshold=INF)),
])
def test_features_follow_a_replaced_denoiser(family, config):
    attribute = _denoiser_attribute(family)
    expected = _reference(family, config, denoiser_seed=1)  # a pipeline with the replacement from the start
    pipe = diffaccel.accelerate(tiny_pipeline(family), config)
    _run(pipe, family)
    old = getattr(pipe, attribute)
    setattr(pipe, attribute, getattr(tiny_pipeline(family, seed=1), attribute))
    assert torch.equal(_run(pipe, family), expected)
    assert pipe.acceleration == (config,)
    assert not any(hasattr(module, "_diffusers_hook") for module in old.modules())  # detached from the old one
    if config == EncoderReuseConfig("all"):  # every step a key step: the untouched output of the new denoiser
        assert torch.equal(expected, _reference(family, None, denoiser_seed=1))


def test_quantization_and_quantized_attention_follow_a_replaced_unet():
    pipe = diffaccel.accelerate(tiny_pipeline("sd"), QuantizationConfig("int8", min_weight_numel=0),
                                QuantizedAttentionConfig(impl="reference"))
    _run(pipe, "sd")
    new = tiny_pipeline("sd", seed=1).unet
    originals = dict(new.attn_processors)
    pipe.unet = new
    assert not quantized_layers(new)
    _run(pipe, "sd")
    assert quantized_layers(new)  # quantized at the first call after the swap
    assert pipe.acceleration_stats.features["quantized_attention"].calls > 0
    assert all(new.attn_processors[name] is p for name, p in originals.items())  # removed after the call
