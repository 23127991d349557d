"""use_quantized_attention routes every attention call of each tiny pipeline through quantized SDPA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import diffaccel
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

PIPELINES = ["sd", "pixart-sigma", "sd3", "cogvideox", "flux", "wan", "ltx"]


class _CountSDPA(TorchFunctionMode):
    """Counts the SDPA calls of the untouched pipeline (diffusers' native backend included)."""

    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _run(pipe, name):
    """The pipeline's latents after two steps (the VAE would only add time)."""
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **tiny_call_inputs(name),
    )
    return np.asarray((out.images if hasattr(out, "images") else out.frames).float())


@pytest.mark.parametrize("name", PIPELINES)
def test_every_attention_call_is_quantized_and_output_stays_close(name):
    pipe = tiny_pipeline(name)
    model = _denoiser(pipe)
    originals = dict(model.attn_processors)
    counter = _CountSDPA()  # active inside the denoiser only (the text encoders use SDPA too)

    def enter(*_):
        counter.__enter__()

    def leave(*_):
        counter.__exit__(None, None, None)

    hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    baseline = _run(pipe, name)
    for hook in hooks:
        hook.remove()
    assert counter.calls > 0

    handle = diffaccel.use_quantized_attention(model)
    assert all(isinstance(p, type(originals[n])) for n, p in model.attn_processors.items())
    quantized = _run(pipe, name)
    assert handle.calls == counter.calls and handle.fallback_calls == 0
    rel = np.abs(quantized - baseline).mean() / np.abs(baseline).mean()
    assert 0 < rel < 0.01  # it did quantize, and stayed close

    assert diffaccel.remove_quantized_attention(model) is model
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    np.testing.assert_array_equal(_run(pipe, name), baseline)


def test_triton_kernel_through_a_pipeline(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's interpreter on CPU
    pipe = tiny_pipeline("flux")
    baseline = _run(pipe, "flux")
    handle = diffaccel.use_quantized_attention(pipe.transformer, impl="triton")
    rel = np.abs(_run(pipe, "flux") - baseline).mean() / np.abs(baseline).mean()
    assert 0 < rel < 0.01 and handle.calls > 0
    diffaccel.remove_quantized_attention(pipe.transformer)


def test_causal_calls_fall_back_and_are_counted():
    handle = diffaccel.QuantizedAttention()
    q = torch.randn(1, 2, 8, 16)
    out = handle.attend(F.scaled_dot_product_attention, q, q, q, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert (handle.calls, handle.fallback_calls) == (0, 1)
    handle.attend(F.scaled_dot_product_attention, q, q, q)
    assert (handle.calls, handle.fallback_calls) == (1, 1)
    handle.reset()
    assert (handle.calls, handle.fallback_calls) == (0, 0)


def test_refusals():
    with pytest.raises(diffaccel.UnsupportedPipelineError, match="pipe.unet or pipe.transformer"):
        diffaccel.use_quantized_attention(torch.nn.Linear(2, 2))
    model = _denoiser(tiny_pipeline("flux"))
    with pytest.raises(ValueError, match="impl"):
        diffaccel.use_quantized_attention(model, impl="cuda")
    with pytest.raises(ValueError, match="not on"):
        diffaccel.remove_quantized_attention(model)
    processor = next(iter(model.attn_processors.values()))
    processor._parallel_config = object()  # what enable_parallelism() leaves on the processors
    with pytest.raises(diffaccel.UnsupportedCombinationError, match="context-parallel"):
        diffaccel.use_quantized_attention(model)
    processor._parallel_config = None
    diffaccel.use_quantized_attention(model)
    with pytest.raises(ValueError, match="already on"):
        diffaccel.use_quantized_attention(model)
    diffaccel.remove_quantized_attention(model)


def test_as_an_accelerate_feature_with_per_call_stats():
    pipe = tiny_pipeline("sd")
    baseline = _run(pipe, "sd")
    config = diffaccel.QuantizedAttentionConfig(impl="reference")
    assert diffaccel.QuantizedAttentionConfig.from_dict(config.to_dict()) == config
    pipe = diffaccel.accelerate(pipe, config, diffaccel.EncoderReuseConfig("uniform:2"))
    _run(pipe, "sd")
    stats = pipe.acceleration_stats.features["quantized_attention"]
    first = stats.calls
    _run(pipe, "sd")
    again = pipe.acceleration_stats.features["quantized_attention"].calls
    assert first > 0 and again == first  # counted per call
    assert stats.to_dict() == {"impl": "reference", "calls": first, "fallback_calls": 0}
    pipe = diffaccel.restore(pipe)
    np.testing.assert_array_equal(_run(pipe, "sd"), baseline)
    with pytest.raises(ValueError, match="QuantizedAttentionConfig.impl"):
        diffaccel.QuantizedAttentionConfig(impl="fast")


def test_config_survives_save_pretrained(tmp_path):
    """save_pretrained records quantized attention beside encoder reuse; from_pretrained restores both."""
    from diffaccel import EncoderReuseConfig, QuantizedAttentionConfig
    from diffaccel.acceleration import load_acceleration_config
    from diffaccel.pipelines import AcceleratedStableDiffusionPipeline

    configs = (EncoderReuseConfig("uniform:2", parallel=False), QuantizedAttentionConfig(impl="reference"))
    pipe = AcceleratedStableDiffusionPipeline.from_pipe(tiny_pipeline("sd"), acceleration=configs)
    pipe.save_pretrained(tmp_path)
    assert tuple(load_acceleration_config(tmp_path)) == configs
    loaded = AcceleratedStableDiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.acceleration == configs
