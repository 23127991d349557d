"""Quantized Linear layers, quantize_, memory_report and save/load of quantized models (offline, CPU)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from diffusers import FluxTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel, WanPipeline
from safetensors import safe_open
from torch import nn

import diffaccel
from diffaccel.acceleration import accelerated_class, load_acceleration_config
from diffaccel.errors import UnsupportedPipelineError
from diffaccel.kernels import int8_linear, int8_quantize_per_channel, nvfp4_linear, nvfp4_quantize
from diffaccel.pipelines import AcceleratedStableDiffusionPipeline
from diffaccel.quantization import (
    DEFAULT_EXCLUDE,
    QUANTIZATION_FILE,
    QuantizationConfig,
    QuantizedLinear,
    load_quantized,
    memory_report,
    quantization_plan,
    quantize_,
    quantized_layers,
)
from diffaccel.quantization import feature as feature_module
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_NAMES = ("sd", "sdxl", "pixart-sigma", "sd3", "flux", "cogvideox", "wan", "ltx")


def _linear(in_features: int = 40, out_features: int = 24, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).to(dtype)


def _x(*shape: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _denoiser(pipe):
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def _run(pipe, name: str, steps: int = 2, seed: int = 0) -> torch.Tensor:
    kwargs = tiny_call_inputs(name)
    if name in ("sd", "sdxl"):
        steps, kwargs["guidance_scale"] = 1, 1.0  # one UNet call: the tiny UNets are the slow ones on CPU
    out = pipe(
        "a red circle", num_inference_steps=steps, output_type="latent",
        generator=torch.Generator().manual_seed(seed), **kwargs,
    )
    return out.images if hasattr(out, "images") else out.frames


# ---------------------------------------------------------------------------------------------
# QuantizedLinear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_layer_equals_kernel_reference(dtype):
    linear = _linear(dtype=dtype)
    layer = QuantizedLinear.from_linear(linear, "nvfp4", residual=True, impl="reference")
    q = nvfp4_quantize(linear.weight.detach())
    assert torch.equal(layer.weight_packed, q.packed) and torch.equal(layer.weight_tensor_scale, q.tensor_scale)
    assert torch.equal(layer.weight_block_scale.view(torch.uint8), q.block_scale.view(torch.uint8))
    r = nvfp4_quantize(linear.weight.detach().float() - q.dequantize())
    x = _x(2, 3, 40, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 24)
    assert torch.equal(y, nvfp4_linear(x, q, linear.bias, impl="reference"))
    layer.refine = True
    expected = nvfp4_linear(x, q, linear.bias, impl="reference") + nvfp4_linear(x, r, None, impl="reference")
    assert torch.equal(layer(x), expected)
    assert layer.bias.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_layer_equals_kernel_reference(dtype):
    linear = _linear(dtype=dtype)
    layer = QuantizedLinear.from_linear(linear, "int8", impl="reference")
    qw, scale = int8_quantize_per_channel(linear.weight.detach())
    assert torch.equal(layer.weight_int8, qw) and torch.equal(layer.weight_scale, scale)
    x = _x(5, 40, dtype=dtype)
    assert torch.equal(layer(x), int8_linear(x, qw, scale, linear.bias, impl="reference"))
    layer.act_scale = torch.tensor(0.02)
    assert "act_scale" in layer.state_dict()
    assert torch.equal(layer(x), int8_linear(x, qw, scale, linear.bias, 0.02, impl="reference"))
    assert layer(x).dtype == dtype


@pytest.mark.parametrize(
    ("precision", "residual", "bound"), [("nvfp4", False, 0.15), ("nvfp4", True, 0.03), ("int8", False, 0.03)]
)
def test_layer_close_to_float(precision, residual, bound):
    linear = _linear(256, 64)
    layer = QuantizedLinear.from_linear(linear, precision, residual=residual)
    layer.refine = residual
    x = _x(4, 7, 256)
    with torch.no_grad():
        reference = linear(x)
    assert 0 < _rel(layer(x), reference) < bound
    assert 0 < _rel(layer.dequantized_weight(), linear.weight.detach()) < bound


def test_refine_is_strictly_closer_to_the_float_weight():
    linear = _linear(128, 32)
    layer = QuantizedLinear.from_linear(linear, "nvfp4", residual=True)
    x, w = _x(16, 128), linear.weight.detach()
    with torch.no_grad():
        reference = linear(x)
    coarse_w, coarse_y = _rel(layer.dequantized_weight(), w), _rel(layer(x), reference)
    layer.refine = True
    fine_w, fine_y = _rel(layer.dequantized_weight(), w), _rel(layer(x), reference)
    assert fine_w < coarse_w / 4 and fine_y < coarse_y / 4
    layer.refine = False
    assert _rel(layer.dequantized_weight(), w) == coarse_w


def test_layer_contract_errors_and_dtype_casts():
    with pytest.raises(ValueError, match="precision"):
        QuantizedLinear.from_linear(_linear(), "fp8")
    with pytest.raises(ValueError, match="residual"):
        QuantizedLinear.from_linear(_linear(), "int8", residual=True)
    with pytest.raises(ValueError, match="impl"):
        QuantizedLinear.from_linear(_linear(), "int8", impl="cuda")
    with pytest.raises(TypeError):
        QuantizedLinear.from_linear(nn.Conv2d(3, 3, 1), "int8")
    layer = QuantizedLinear.from_linear(_linear(), "nvfp4")
    with pytest.raises(ValueError, match="refine"):
        layer.refine = True
    layer.to(torch.bfloat16)  # casts the bias, never the quantized buffers
    assert layer.bias.dtype == torch.bfloat16
    assert layer.weight_block_scale.dtype == torch.float8_e4m3fn and layer.weight_tensor_scale.dtype == torch.float32
    assert layer(_x(3, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert "precision=nvfp4" in repr(layer) and "refine=False" in repr(layer)


def test_bits_per_weight():
    n, k = 48, 64
    nvfp4 = QuantizedLinear.from_linear(_linear(k, n), "nvfp4")
    assert nvfp4.bits_per_weight == pytest.approx(4.5 + 32 / (n * k))
    nested = QuantizedLinear.from_linear(_linear(k, n), "nvfp4", residual=True)
    assert nested.bits_per_weight == pytest.approx(9 + 64 / (n * k))
    int8 = QuantizedLinear.from_linear(_linear(k, n), "int8")
    assert int8.bits_per_weight == pytest.approx(8 + 32 / k)
    assert int8.weight_nbytes == n * k + 4 * n


# ---------------------------------------------------------------------------------------------
# QuantizationConfig
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"precision": "fp4"}, "precision"),
        ({"overrides": {"*": "int4"}}, "overrides"),
        ({"overrides": {"": "int8"}}, "overrides"),
        ({"overrides": 3}, "overrides"),
        ({"exclude": "proj_out"}, "exclude"),
        ({"exclude": ("",)}, "exclude"),
        ({"min_weight_numel": -1}, "min_weight_numel"),
        ({"min_weight_numel": 1.5}, "min_weight_numel"),
        ({"residual": 1}, "residual"),
        ({"impl": "cuda"}, "impl"),
        ({"fp4_activations": "yes"}, "fp4_activations"),
    ],
)
def test_bad_configs_raise(kwargs, field):
    with pytest.raises(ValueError, match=f"QuantizationConfig.{field}"):
        QuantizationConfig(**kwargs)


def test_config_round_trip_and_hashable():
    config = QuantizationConfig("int8", overrides={"*.ff.*": "nvfp4", "*": "bf16"}, residual=True, min_weight_numel=0)
    assert config.overrides == (("*.ff.*", "nvfp4"), ("*", "bf16"))
    assert hash(config) == hash(QuantizationConfig.from_dict(json.loads(json.dumps(config.to_dict()))))
    assert QuantizationConfig.from_dict(config.to_dict()) == config
    assert QuantizationConfig().exclude == DEFAULT_EXCLUDE


# ---------------------------------------------------------------------------------------------
# quantize_
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "sd"])
def test_bf16_everywhere_is_bit_identical(name):
    pipe = tiny_pipeline(name)
    reference = _run(pipe, name)
    quantize_(_denoiser(pipe), QuantizationConfig("bf16", min_weight_numel=0, exclude=()))
    assert not quantized_layers(_denoiser(pipe))
    assert torch.equal(_run(pipe, name), reference)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_pipeline_runs_quantized(name):
    pipe = tiny_pipeline(name)
    reference = _run(pipe, name)
    original = copy.deepcopy(_denoiser(pipe))
    for precision, bound in (("nvfp4", 0.25), ("int8", 0.05)):
        model = copy.deepcopy(original)
        setattr(pipe, "transformer" if hasattr(pipe, "transformer") else "unet", model)
        config = QuantizationConfig(precision, min_weight_numel=0)
        plan = quantization_plan(model, config)
        quantize_(model, config)
        layers = quantized_layers(model)
        assert set(layers) == {n for n, p in plan.items() if p != "bf16"} and layers
        assert {layer.precision for layer in layers.values()} == {precision}
        assert set(model._diffaccel_quantization["layers"]) == set(layers)
        out = _run(pipe, name)
        assert torch.isfinite(out).all()
        assert 0 < _rel(out, reference) < bound, (name, precision)


def test_exclusions_overrides_and_scope():
    model = tiny_pipeline("flux").transformer
    overrides = {"*.ff.net.2": "bf16", "*.ff.*": "int8", "single_transformer_blocks.*": "int8"}
    quantize_(model, QuantizationConfig("nvfp4", overrides=overrides, min_weight_numel=0))
    layers = quantized_layers(model)
    for name in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear", "transformer_blocks.0.norm1.linear",
                 "single_transformer_blocks.0.norm.linear", "time_text_embed.timestep_embedder.linear_1",
                 "transformer_blocks.0.ff.net.2"):
        assert type(model.get_submodule(name)) is nn.Linear, name
    assert layers["transformer_blocks.0.ff.net.0.proj"].precision == "int8"
    assert layers["transformer_blocks.0.ff_context.net.2"].precision == "nvfp4"
    assert layers["transformer_blocks.0.attn.to_q"].precision == "nvfp4"
    assert layers["single_transformer_blocks.0.proj_out"].precision == "int8"  # only the top-level proj_out is excluded

    small = tiny_pipeline("flux").transformer  # default min_weight_numel: every tiny layer is too small
    quantize_(small, QuantizationConfig())
    assert not quantized_layers(small)

    unet = tiny_pipeline("sd").unet  # the UNet's scope: Linear layers inside the attentions only
    quantize_(unet, QuantizationConfig("int8", exclude=(), min_weight_numel=0))
    names = set(quantized_layers(unet))
    assert names and all(".attentions." in n for n in names)
    assert type(unet.time_embedding.linear_1) is nn.Linear and type(unet.down_blocks[0].resnets[0].time_emb_proj) is nn.Linear


def test_residual_only_on_nvfp4_layers():
    model = tiny_pipeline("wan").transformer
    quantize_(model, QuantizationConfig("nvfp4", overrides={"*.ffn.*": "int8"}, residual=True, min_weight_numel=0))
    layers = quantized_layers(model)
    assert all(layer.has_residual == (layer.precision == "nvfp4") for layer in layers.values())
    assert model._diffaccel_quantization["layers"]["blocks.0.attn1.to_q"]["residual"] is True

    chosen = tiny_pipeline("wan").transformer  # "nvfp4+residual" nests the matching layers only
    config = QuantizationConfig("nvfp4", overrides={"blocks.0.attn1.*": "nvfp4+residual"}, min_weight_numel=0)
    plan = quantization_plan(chosen, config)
    assert plan["blocks.0.attn1.to_q"] == "nvfp4+residual" and plan["blocks.0.attn2.to_q"] == "nvfp4"
    quantize_(chosen, config)
    nested = {name for name, layer in quantized_layers(chosen).items() if layer.has_residual}
    assert nested == {f"blocks.0.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert all(layer.precision == "nvfp4" for layer in quantized_layers(chosen).values())


def test_unsupported_and_twice_quantized_models_raise():
    with pytest.raises(UnsupportedPipelineError, match="FluxTransformer2DModel.*UNet2DConditionModel"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), QuantizationConfig())
    pipe = tiny_pipeline("pixart-sigma")
    with pytest.raises(UnsupportedPipelineError, match="AutoencoderKL"):
        quantize_(pipe.vae, QuantizationConfig())
    quantize_(pipe.transformer, QuantizationConfig(min_weight_numel=0))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(pipe.transformer, QuantizationConfig(min_weight_numel=0))


# ---------------------------------------------------------------------------------------------
# memory_report
# ---------------------------------------------------------------------------------------------


def test_memory_report_numbers():
    model = tiny_pipeline("flux").transformer
    numel = sum(p.numel() for p in model.parameters())
    config = QuantizationConfig("nvfp4", overrides={"*.ff.*": "int8", "*.ff_context.*": "bf16"}, residual=True,
                                min_weight_numel=0)
    quantize_(model, config)
    report = memory_report(model)
    assert report.bf16_nbytes == 2 * numel == 2 * report.numel
    by_name = {layer.name: layer for layer in report.layers}
    q = quantized_layers(model)
    expected = 2 * sum(p.numel() for p in model.parameters()) + sum(m.weight_nbytes for m in q.values())
    assert report.nbytes == expected and report.ratio == pytest.approx(expected / (2 * numel))
    attn = by_name["transformer_blocks.0.attn.to_q"]  # 32 x 32
    assert attn.precision == "nvfp4+residual" and attn.bits_per_weight == pytest.approx(9 + 64 / 1024)
    ff = by_name["transformer_blocks.0.ff.net.0.proj"]  # 128 x 32 (K = 32)
    assert ff.precision == "int8" and ff.bits_per_weight == pytest.approx(8 + 32 / 32)
    assert by_name["transformer_blocks.0.ff_context.net.2"].precision == "bf16"
    assert by_name["proj_out"].bits_per_weight == 16
    assert report.counts == {"bf16": 13, "nvfp4+residual": 13, "int8": 2}
    data = report.to_dict()
    assert data["nbytes"] == report.nbytes and len(data["layers"]) == len(report.layers)
    text = str(report)
    assert "transformer_blocks.0.attn.to_q" in text and "nvfp4+residual" in text and "ratio" in text

    nvfp4 = quantize_(tiny_pipeline("flux").transformer, QuantizationConfig("nvfp4", min_weight_numel=0))
    layer = {lay.name: lay for lay in memory_report(nvfp4).layers}["transformer_blocks.0.ff.net.2"]  # 32 x 128
    assert layer.precision == "nvfp4" and layer.bits_per_weight == pytest.approx(4.5 + 32 / 4096)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------


def _flux_inputs(model: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, model.config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 4, model.config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, model.config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(4, 3),
        "return_dict": False,
    }


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_model_save_load_round_trip(tmp_path, max_shard_size):
    model = tiny_pipeline("flux").transformer
    config = QuantizationConfig("nvfp4", overrides={"*.ff.*": "int8"}, residual=True, min_weight_numel=0)
    quantize_(model, config)
    layers = quantized_layers(model)
    layers["transformer_blocks.0.attn.to_q"].refine = True
    layers["transformer_blocks.0.ff.net.2"].act_scale = torch.tensor(0.05)
    with torch.no_grad():
        expected = model(**_flux_inputs(model))[0]
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(tmp_path, **kwargs)
    files = os.listdir(tmp_path)
    assert QUANTIZATION_FILE in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    if max_shard_size is not None:
        assert "diffusion_pytorch_model.safetensors.index.json" in files
    else:
        with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", "pt") as handle:
            assert handle.get_tensor("transformer_blocks.0.attn.to_q.weight_packed").dtype == torch.uint8
            assert handle.get_tensor("transformer_blocks.0.attn.to_q.residual_block_scale").dtype == torch.float8_e4m3fn
            assert "transformer_blocks.0.attn.to_q.weight" not in handle.keys()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "FluxTransformer2DModel"

    def no_requantize(*args, **kwargs):
        raise AssertionError("loading must not quantize")

    original_from_linear = QuantizedLinear.from_linear
    QuantizedLinear.from_linear = no_requantize
    try:
        loaded = load_quantized(FluxTransformer2DModel, tmp_path)
    finally:
        QuantizedLinear.from_linear = original_from_linear
    loaded_layers = quantized_layers(loaded)
    assert set(loaded_layers) == set(layers)
    assert loaded_layers["transformer_blocks.0.attn.to_q"].refine is True
    assert float(loaded_layers["transformer_blocks.0.ff.net.2"].act_scale) == pytest.approx(0.05)
    assert loaded._diffaccel_quantization["config"] == config
    with torch.no_grad():
        assert torch.equal(loaded(**_flux_inputs(loaded))[0], expected)
    assert memory_report(loaded).nbytes == memory_report(model).nbytes

    half = load_quantized(FluxTransformer2DModel, tmp_path, torch_dtype=torch.bfloat16)
    to_q = half.transformer_blocks[0].attn.to_q
    assert to_q.bias.dtype == half.proj_out.weight.dtype == torch.bfloat16
    assert to_q.weight_block_scale.dtype == torch.float8_e4m3fn and to_q.weight_tensor_scale.dtype == torch.float32
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in _flux_inputs(half).items()}
    with torch.no_grad():
        out = half(**inputs)[0]
    assert out.dtype == torch.bfloat16 and _rel(out, expected) < 0.1


def test_fp4_activations_run_w4a4_and_survive_save_load(tmp_path):
    from diffaccel.kernels import nvfp4_w4a4_linear

    linear = nn.Linear(64, 32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    layer = QuantizedLinear.from_linear(linear, "nvfp4", fp4_activations=True)
    assert torch.equal(layer(x), nvfp4_w4a4_linear(x, layer.weight_nvfp4, layer.bias))
    assert not torch.equal(layer(x), nvfp4_linear(x, layer.weight_nvfp4, layer.bias))  # x is quantized too
    assert "fp4_activations=True" in repr(layer)
    layer.fp4_activations = False
    assert torch.equal(layer(x), nvfp4_linear(x, layer.weight_nvfp4, layer.bias))
    with pytest.raises(ValueError, match="fp4_activations=True needs precision 'nvfp4'"):
        QuantizedLinear.from_linear(linear, "int8", fp4_activations=True)

    model = tiny_pipeline("flux").transformer
    config = QuantizationConfig("nvfp4", overrides={"*.ff.*": "int8"}, fp4_activations=True, min_weight_numel=0)
    quantize_(model, config)
    layers = quantized_layers(model)
    assert layers["transformer_blocks.0.attn.to_q"].fp4_activations
    assert not layers["transformer_blocks.0.ff.net.2"].fp4_activations  # int8 layers stay W8A8
    with torch.no_grad():
        expected = model(**_flux_inputs(model))[0]
    model.save_pretrained(tmp_path)
    loaded = load_quantized(FluxTransformer2DModel, tmp_path)
    assert quantized_layers(loaded)["transformer_blocks.0.attn.to_q"].fp4_activations
    with torch.no_grad():
        assert torch.equal(loaded(**_flux_inputs(loaded))[0], expected)


def test_model_save_refuses_pickle_and_load_needs_the_plan(tmp_path):
    unet = quantize_(tiny_pipeline("sd").unet, QuantizationConfig("int8", min_weight_numel=0))
    with pytest.raises(ValueError, match="safetensors"):
        unet.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    plain = tiny_pipeline("sd").unet
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match=QUANTIZATION_FILE):
        load_quantized(UNet2DConditionModel, tmp_path / "plain")


def test_pipeline_save_load_round_trip_sd(tmp_path, monkeypatch):
    config = QuantizationConfig("nvfp4", overrides={"*.ff.*": "int8"}, min_weight_numel=0)
    pipe = diffaccel.accelerate(tiny_pipeline("sd"), config)
    expected = _run(pipe, "sd")
    stats = pipe.acceleration_stats.features["quantization"]
    assert stats.layers == {"bf16": 13, "int8": 14, "nvfp4": 56} and stats.bf16_nbytes > stats.nbytes and stats.refined == 0
    assert stats.ratio == pytest.approx(stats.nbytes / stats.bf16_nbytes)
    pipe.save_pretrained(tmp_path)
    assert load_acceleration_config(tmp_path) == [config]
    assert (tmp_path / "unet" / QUANTIZATION_FILE).is_file()
    monkeypatch.setattr(feature_module, "quantize_", lambda *a, **k: pytest.fail("from_pretrained re-quantized"))
    loaded = AcceleratedStableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert len(quantized_layers(loaded.unet)) == 70
    assert torch.equal(_run(loaded, "sd"), expected)
    assert loaded.acceleration_stats.features["quantization"] == stats
    without = AcceleratedStableDiffusionPipeline.from_pretrained(tmp_path, acceleration=[])  # still loads quantized
    without.set_progress_bar_config(disable=True)
    assert without.acceleration == () and torch.equal(_run(without, "sd"), expected)


def test_pipeline_save_load_round_trip_wan(tmp_path):
    config = QuantizationConfig("nvfp4", residual=True, refine=False, min_weight_numel=0)  # one layer refined by hand
    pipe = diffaccel.accelerate(tiny_pipeline("wan"), config)
    quantized_layers(pipe.transformer)["blocks.0.attn1.to_q"].refine = True
    expected = _run(pipe, "wan")
    pipe.save_pretrained(tmp_path)
    loaded = accelerated_class(WanPipeline).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, WanPipeline) and loaded.acceleration == (config,)
    assert torch.equal(_run(loaded, "wan"), expected)
    assert loaded.acceleration_stats.features["quantization"].refined == 1


def test_detach_leaves_the_denoiser_quantized():
    config = QuantizationConfig("int8", min_weight_numel=0)
    pipe = diffaccel.accelerate(tiny_pipeline("ltx"), config)
    layers = quantized_layers(pipe.transformer)
    pipe = diffaccel.restore(pipe)
    assert type(pipe).__name__ == "LTXPipeline" and quantized_layers(pipe.transformer) == layers
    diffaccel.accelerate(pipe, config)  # the same config adopts the quantized denoiser
    assert quantized_layers(pipe.transformer) == layers
    with pytest.raises(ValueError, match="already quantized"):
        diffaccel.accelerate(pipe, QuantizationConfig("nvfp4", min_weight_numel=0))
    assert type(pipe).__name__ == "LTXPipeline"  # a failed accelerate restores the pipeline


def test_from_pipe_shares_the_quantized_denoiser():
    config = QuantizationConfig("nvfp4", min_weight_numel=0)
    pipe = diffaccel.accelerate(tiny_pipeline("sd"), config)
    layers = quantized_layers(pipe.unet)
    other = AcceleratedStableDiffusionPipeline.from_pipe(pipe)
    assert other.acceleration == (config,) and quantized_layers(other.unet) == layers


def test_plain_diffusers_save_of_an_accelerated_pipeline_stays_loadable(tmp_path):
    pipe = diffaccel.accelerate(tiny_pipeline("sd"), QuantizationConfig("int8", min_weight_numel=0))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    unet = load_quantized(UNet2DConditionModel, tmp_path / "unet")
    plain = StableDiffusionPipeline.from_pretrained(tmp_path, unet=unet)
    assert quantized_layers(plain.unet)


@pytest.mark.parametrize("precision, residual", [("nvfp4", False), ("nvfp4", True), ("int8", False)])
def test_quantized_linear_triton_path_matches_the_reference(monkeypatch, precision, residual):
    """The layer's Triton kernels (interpreted on CPU, compiled on CUDA) agree with its reference path."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 32, generator=g))
    x = torch.randn(5, 32, generator=g, dtype=torch.float32).to(device=device, dtype=torch.float16)
    layers = {impl: QuantizedLinear.from_linear(linear, precision, residual=residual, impl=impl).to(device)
              for impl in ("triton", "reference")}
    for layer in layers.values():
        layer.refine = residual
    with torch.no_grad():
        triton_out, reference_out = (layers[impl](x).float() for impl in ("triton", "reference"))
    assert triton_out.dtype == reference_out.dtype == torch.float32
    assert torch.allclose(triton_out, reference_out, rtol=2e-2, atol=2e-2)
