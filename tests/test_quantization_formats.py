"""Weight-only INT8 (W8A16) Linear layers, quantized convolutions and ``scope="all"`` (offline, CPU).

Each format against its reference, save/load bit-exact through ``save_pretrained`` / ``load_quantized``,
adversarial weights with their documented behaviour.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
from torch import nn
from torch.nn import functional as F

from diffaccel.kernels import int8_dequantize_per_group, int8_quantize_per_group, w8a16_linear
from diffaccel.quantization import (
    QuantizationConfig,
    QuantizedConv2d,
    QuantizedLinear,
    load_quantized,
    memory_report,
    planned_memory,
    quantization_plan,
    quantize_,
    quantized_layers,
)
from diffaccel.testing import tiny_call_inputs, tiny_pipeline


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _conv(cin: int = 8, cout: int = 16, k: int = 3, seed: int = 0, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, **kwargs)


def _unet_args(unet: UNet2DConditionModel) -> dict:
    return dict(sample=torch.randn(2, 4, 16, 16, generator=_gen(0)), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim, generator=_gen(1)))


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_layer_equals_its_reference(group_size, dtype):
    linear = nn.Linear(40, 24).to(dtype)
    q = QuantizedLinear.from_linear(linear, "w8a16", group_size=group_size)
    codes, scale = int8_quantize_per_group(linear.weight.detach(), group_size)
    assert torch.equal(q.weight_int8, codes) and torch.equal(q.weight_scale, scale)
    x = torch.randn(3, 5, 40, generator=_gen(2)).to(dtype)
    weight = int8_dequantize_per_group(codes, scale)
    weight = weight if group_size is None else weight.to(dtype).float()  # grouped: decoded in x's dtype
    want = (x.float() @ weight.T + linear.bias.float()).to(dtype)
    assert torch.equal(q(x), w8a16_linear(x, codes, scale, linear.bias, impl="reference")) and q(x).dtype == dtype
    assert torch.allclose(q(x).float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert q.layout()["precision"] == "w8a16" and q.layout().get("group_size") == group_size
    bound = (scale if scale.dim() == 1 else scale.repeat_interleave(16, dim=1)[:, :40]).reshape(24, -1) / 2
    assert ((q.dequantized_weight() - linear.weight.float()).abs() <= bound + 1e-6).all()


def test_w8a16_beats_w8a8_and_groups_beat_channels_on_output_error():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    linear.weight.data[:, ::37] *= 20  # a few large columns: one scale per row must cover them
    x = torch.randn(64, 256, generator=_gen(3))
    x[:, 5] *= 30  # an activation outlier: W8A8's per-token scale loses the other columns
    ref = linear(x)
    errors = {name: float((layer(x) - ref).norm() / ref.norm()) for name, layer in {
        "int8": QuantizedLinear.from_linear(linear, "int8"),
        "w8a16": QuantizedLinear.from_linear(linear, "w8a16"),
        "w8a16-g32": QuantizedLinear.from_linear(linear, "w8a16", group_size=32),
    }.items()}
    assert errors["w8a16"] < errors["int8"] * 0.75, errors
    assert errors["w8a16-g32"] < errors["w8a16"], errors


def test_layer_contracts_refuse_bad_combinations():
    with pytest.raises(ValueError, match="group_size applies to precision 'w8a16' only"):
        QuantizedLinear.from_linear(nn.Linear(16, 4), "int8", group_size=8)
    with pytest.raises(ValueError, match="residual=True needs precision 'nvfp4'"):
        QuantizedLinear.from_linear(nn.Linear(16, 4), "w8a16", residual=True)
    with pytest.raises(ValueError, match="fp4_activations=True needs precision 'nvfp4'"):
        QuantizedLinear.from_linear(nn.Linear(16, 4), "w8a16", fp4_activations=True)
    with pytest.raises(ValueError, match="a convolution's precision must be one of"):
        QuantizedConv2d.from_conv(_conv(), "int8")
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        QuantizedConv2d.from_conv(_conv(padding=1, padding_mode="reflect"), "w8a16")
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        QuantizedConv2d.from_conv(nn.Linear(4, 4), "w8a16")
    with pytest.raises(ValueError, match="QuantizationConfig.scope must be one of"):
        QuantizationConfig(scope="everything")
    with pytest.raises(ValueError, match="QuantizationConfig.group_size must be an int >= 1"):
        QuantizationConfig("w8a16", group_size=0)
    with pytest.warns(UserWarning, match="group_size=64 does nothing"):
        QuantizationConfig("nvfp4", group_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantizationConfig("nvfp4", overrides={"*.ff.*": "w8a16"}, group_size=64)  # used by the ff layers


@pytest.mark.parametrize("precision", ["nvfp4", "w8a16"])
@pytest.mark.parametrize("geometry", [
    dict(cin=8, cout=16, k=3, padding=1),
    dict(cin=6, cout=4, k=1),
    dict(cin=8, cout=8, k=3, stride=2, padding=1, groups=2),
    dict(cin=4, cout=12, k=3, dilation=2, padding=2, bias=False),
])
def test_conv_equals_dequantize_then_conv(precision, geometry):
    geometry = dict(geometry)
    conv = _conv(geometry.pop("cin"), geometry.pop("cout"), geometry.pop("k"), **geometry)
    q = QuantizedConv2d.from_conv(conv, precision)
    weight = q.dequantized_weight()
    assert weight.shape == conv.weight.shape
    x = torch.randn(2, conv.in_channels, 11, 9, generator=_gen(4))
    want = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert torch.equal(q(x), want)
    bound = 0.15 if precision == "nvfp4" else 0.01
    assert float((weight - conv.weight).norm() / conv.weight.norm()) < bound
    if precision == "w8a16":  # the stored matrix is the weight flattened per output channel
        codes, scale = int8_quantize_per_group(conv.weight.detach().reshape(conv.out_channels, -1))
        assert torch.equal(q.weight_int8, codes) and torch.equal(q.weight_scale, scale)


def test_conv_keeps_buffer_dtypes_and_runs_in_half_precision():
    q = QuantizedConv2d.from_conv(_conv(), "nvfp4").to(torch.bfloat16)
    assert q.weight_block_scale.dtype == torch.float8_e4m3fn and q.bias.dtype == torch.bfloat16
    y = q(torch.randn(1, 8, 6, 6).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.isfinite().all()


def test_scope_all_quantizes_every_linear_and_conv_of_a_unet():
    unet = tiny_pipeline("sd").unet
    config = QuantizationConfig("int8", scope="all", min_weight_numel=0)
    plan = quantization_plan(unet, config)
    convs = [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)]
    assert {plan[n] for n in convs if n not in ("conv_in", "conv_out")} == {"w8a16"}  # no W8A8 convolution
    assert "conv_in" in plan and plan["conv_in"] == plan["conv_out"] == "bf16"  # excluded by default
    assert plan["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == "int8"
    blocks_only = quantization_plan(unet, QuantizationConfig("int8", min_weight_numel=0))
    assert set(blocks_only) < set(plan) and not any(n in blocks_only for n in convs)
    planned = planned_memory(unet, config)
    model = quantize_(copy.deepcopy(unet), config)
    report = memory_report(model)
    assert report.nbytes == planned.nbytes and report.kind == "Linear and Conv2d"
    assert report.counts == planned.counts
    assert isinstance(model.down_blocks[0].resnets[0].conv1, QuantizedConv2d)
    assert report.nbytes < memory_report(quantize_(copy.deepcopy(unet), QuantizationConfig(
        "int8", min_weight_numel=0))).nbytes * 0.75  # the convolutions are most of the bytes


@pytest.mark.parametrize("precision", ["w8a16", "nvfp4"])
def test_scope_all_unet_stays_close_and_round_trips_bit_exactly(tmp_path, precision):
    unet = tiny_pipeline("sd").unet
    args = _unet_args(unet)
    with torch.no_grad():
        ref = unet(**args).sample
        model = quantize_(copy.deepcopy(unet), QuantizationConfig(precision, scope="all", min_weight_numel=0,
                                                                  group_size=16 if precision == "w8a16" else None))
        out = model(**args).sample
    assert float((out - ref).norm() / ref.norm()) < (0.02 if precision == "w8a16" else 0.3)
    model.save_pretrained(tmp_path)
    loaded = load_quantized(UNet2DConditionModel, tmp_path)
    assert {n: m.layout() for n, m in quantized_layers(loaded).items()} == \
        {n: m.layout() for n, m in quantized_layers(model).items()}
    with torch.no_grad():
        assert torch.equal(loaded(**args).sample, out)
    assert loaded._diffaccel_quantization["config"].scope == "all"


def test_w8a16_transformer_pipeline_round_trips(tmp_path):
    pipe = tiny_pipeline("pixart-sigma")
    model = quantize_(pipe.transformer, QuantizationConfig("w8a16", min_weight_numel=0, group_size=8))
    assert {m.precision for m in quantized_layers(model).values()} == {"w8a16"}
    model.save_pretrained(tmp_path)
    loaded = load_quantized(PixArtTransformer2DModel, tmp_path)
    for name, layer in quantized_layers(model).items():
        twin = loaded.get_submodule(name)
        assert torch.equal(twin.weight_int8, layer.weight_int8) and torch.equal(twin.weight_scale, layer.weight_scale)
        assert twin.group_size == 8
    out = pipe("a red circle", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
               **tiny_call_inputs("pixart-sigma")).images
    assert out.isfinite().all()


def test_adversarial_weights_have_the_documented_behaviour():
    # all-zero rows: scale 1, codes 0, exactly zero back
    weight = torch.randn(8, 64, generator=_gen(5))
    weight[2] = 0
    codes, scale = int8_quantize_per_group(weight, 16)
    assert torch.equal(codes[2], torch.zeros(64, dtype=torch.int8)) and torch.equal(scale[2], torch.ones(4))
    # 1e4 outliers among 1e-2 values: per channel the rest of the row rounds to zero and the layer falls back
    # (fallback="auto": bf16, since W8A16 is already the 8-bit format); with groups of 16 only the outliers' groups lose
    model = tiny_pipeline("pixart-sigma").transformer
    target = model.transformer_blocks[0].ff.net[2]
    target.weight.data = torch.full_like(target.weight, 1e-2)
    target.weight.data[:, 0] = 1e4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(model, QuantizationConfig("w8a16", min_weight_numel=0))
    assert type(model.transformer_blocks[0].ff.net[2]) is nn.Linear  # kept unquantized
    assert isinstance(model.transformer_blocks[0].ff.net[0].proj, QuantizedLinear)
    assert any("transformer_blocks.0.ff.net.2" in str(w.message) and "kept unquantized" in str(w.message)
               for w in caught)
    linear = nn.Linear(64, 8)
    linear.weight.data = torch.full((8, 64), 1e-2)
    linear.weight.data[:, 0] = 1e4
    grouped = QuantizedLinear.from_linear(linear, "w8a16", group_size=16)
    weight = grouped.dequantized_weight()
    assert (weight[:, 16:] != 0).all() and torch.allclose(weight[:, 16:], linear.weight[:, 16:].detach(), rtol=1e-2)
    # subnormal weights stay representable: scales are float32 (no underflow to a zero scale)
    tiny = torch.full((4, 32), 1e-40) * torch.randn(4, 32, generator=_gen(6)).sign()
    codes, scale = int8_quantize_per_group(tiny)
    assert (scale > 0).all() and (int8_dequantize_per_group(codes, scale) != 0).all()
    # NaN / inf: refused before any layer is swapped, naming the layer
    conv_model = tiny_pipeline("sd").unet
    conv_model.down_blocks[0].resnets[0].conv1.weight.data[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="down_blocks.0.resnets.0.conv1.*NaN or inf"):
        quantize_(conv_model, QuantizationConfig("w8a16", scope="all", min_weight_numel=0))
    assert not quantized_layers(conv_model)
