"""Quantization that is exact on reload, refuses what it cannot do, and says when a setting does nothing (offline, CPU)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel, WanPipeline, WanTransformer3DModel
from torch import nn

import diffaccel
from diffaccel.acceleration import accelerated_class
from diffaccel.errors import DiffaccelError
from diffaccel.pipelines import AcceleratedStableDiffusionPipeline
from diffaccel.quantization import (
    QUANTIZATION_FILE,
    CalibrationData,
    QuantizationConfig,
    QuantizedLinear,
    allocate_static,
    calibrate,
    is_quantized,
    load_quantized,
    memory_report,
    quantize_,
    quantized_layers,
)
from diffaccel.quantization.safety import MAX_ZEROED_FRACTION, quantize_layer, zeroed_fraction
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

PLAIN_LOAD_HINT = r"diffaccel\.load_quantized\({}, folder\).*accelerated_class\(PipelineClass\)\.from_pretrained"


def _run(pipe, name: str, steps: int = 2) -> torch.Tensor:
    kwargs = tiny_call_inputs(name)
    if name == "sd":
        steps, kwargs["guidance_scale"] = 1, 1.0
    out = pipe("a red circle", num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images if hasattr(out, "images") else out.frames


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _outlier_weight() -> torch.Tensor:
    """2048 weights of magnitude 1e-2 (random signs) and three of 1e4."""
    signs = torch.randint(0, 2, (32, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1
    weight = signs.float() * 1e-2
    weight.view(-1)[[5, 700, 1500]] = 1e4
    return weight


def _outlier_wan() -> WanTransformer3DModel:
    """A tiny Wan transformer whose ``blocks.1.ffn.net.2`` (32 x 64) holds :func:`_outlier_weight`."""
    model = tiny_pipeline("wan", ffn_dim=64, attention_head_dim=16).transformer
    model.blocks[1].ffn.net[2].weight.data = _outlier_weight()
    return model


# ---------------------------------------------------------------------------------------------
# 1. reloading gives the saved model's numbers
# ---------------------------------------------------------------------------------------------


def test_loaded_tensors_own_aligned_storage(tmp_path):
    """safetensors hands out views of the mapped file at the file's offsets; CPU matmuls pick their
    kernel (and rounding) by alignment, so load_quantized copies every tensor into its own allocation."""
    model = quantize_(tiny_pipeline("flux").transformer, QuantizationConfig("nvfp4", residual=True, min_weight_numel=0))
    model.save_pretrained(tmp_path)
    loaded = load_quantized(FluxTransformer2DModel, tmp_path)
    tensors = _tensors(loaded)
    misaligned = [name for name, t in tensors.items() if t.data_ptr() % 64]
    assert not misaligned, misaligned[:5]
    assert all(t.is_contiguous() for t in tensors.values())
    assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == len(tensors)  # no shared storage


def test_pipeline_load_gives_aligned_denoiser_tensors(tmp_path):
    pipe = diffaccel.accelerate(tiny_pipeline("sd"), QuantizationConfig("int8", min_weight_numel=0))
    pipe.save_pretrained(tmp_path)
    loaded = AcceleratedStableDiffusionPipeline.from_pretrained(tmp_path)  # via QuantizationConfig.pretrained_components
    assert not [name for name, t in _tensors(loaded.unet).items() if t.data_ptr() % 64]


# ---------------------------------------------------------------------------------------------
# 5. the plain diffusers class refuses a quantized save, saying how to load it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "pipeline_cls", "model_cls"), [
    ("wan", WanPipeline, WanTransformer3DModel), ("flux", FluxPipeline, FluxTransformer2DModel)])
def test_plain_diffusers_load_refuses_a_quantized_save(tmp_path, name, pipeline_cls, model_cls):
    pipe = diffaccel.accelerate(tiny_pipeline(name), QuantizationConfig("nvfp4", min_weight_numel=0))
    expected = _run(pipe, name)
    pipe.save_pretrained(tmp_path)
    entry = json.loads((tmp_path / "transformer" / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"].startswith("diffaccel") and entry["plan"] == QUANTIZATION_FILE
    hint = PLAIN_LOAD_HINT.format(model_cls.__name__)
    with pytest.raises(ValueError, match=hint):
        DiffusionPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=hint):
        model_cls.from_pretrained(tmp_path / "transformer")

    loaded = accelerated_class(pipeline_cls).from_pretrained(tmp_path)  # diffaccel's own loaders still work
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_run(loaded, name), expected)
    assert "quantization_config" not in loaded.transformer.config
    model = load_quantized(model_cls, tmp_path / "transformer")
    plain = pipeline_cls.from_pretrained(tmp_path, transformer=model)
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(_run(plain, name), expected)
    model.save_pretrained(tmp_path / "again")  # a re-save records itself again
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"] == entry


# ---------------------------------------------------------------------------------------------
# 6a. a config that quantizes (almost) nothing says so
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "wan", "sd"])
def test_default_threshold_quantizing_nothing_warns_and_reports(name):
    pipe = tiny_pipeline(name)
    with pytest.warns(UserWarning, match=r"quantizes 0 of \d+ in-scope Linear layers.*min_weight_numel=16384"):
        pipe = diffaccel.accelerate(pipe, QuantizationConfig("nvfp4"))
    _run(pipe, name)
    stats = pipe.acceleration_stats.features["quantization"]
    assert stats.quantized == 0 and stats.quantized_fraction == 0.0
    denoiser = pipe.unet if name == "sd" else pipe.transformer
    report = memory_report(denoiser)
    assert report.quantized_layers == 0 and report.quantized_fraction == 0.0
    assert report.to_dict()["quantized_layers"] == 0 and "quantized: 0 of" in str(report)


def test_static_allocation_with_the_default_base_warns():
    model = tiny_pipeline("wan").transformer
    blocks = ("blocks.0", "blocks.1")
    data = CalibrationData(blocks, ("p",), np.array([[[0.1, 0.5]]]), np.array([[[0.01, 0.05]]]))
    with pytest.warns(UserWarning, match="min_weight_numel=16384"):
        quantize_(model, allocate_static(data, int8_fraction=0.5).quantization_config())


def test_counts_in_stats_and_no_warning_when_most_weights_are_quantized():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = diffaccel.accelerate(tiny_pipeline("flux"), QuantizationConfig("int8", min_weight_numel=0))
        quantize_(tiny_pipeline("flux").transformer, QuantizationConfig("bf16"))  # quantizes nothing, as asked
    _run(pipe, "flux")
    stats = pipe.acceleration_stats.features["quantization"]
    report = memory_report(pipe.transformer)
    assert stats.quantized == report.quantized_layers == len(quantized_layers(pipe.transformer)) == stats.layers["int8"]
    assert 0.5 < stats.quantized_fraction == report.quantized_fraction < 1.0


# ---------------------------------------------------------------------------------------------
# 6b. a stored residual is used
# ---------------------------------------------------------------------------------------------


def test_nested_precision_through_accelerate_applies_the_residual():
    reference = _run(tiny_pipeline("wan"), "wan")
    plain = _run(diffaccel.accelerate(tiny_pipeline("wan"), QuantizationConfig("nvfp4", min_weight_numel=0)), "wan")
    nested_pipe = diffaccel.accelerate(tiny_pipeline("wan"), QuantizationConfig("nvfp4+residual", min_weight_numel=0))
    nested = _run(nested_pipe, "wan")
    layers = quantized_layers(nested_pipe.transformer)
    assert layers and all(layer.has_residual and layer.refine for layer in layers.values())
    assert nested_pipe.acceleration_stats.features["quantization"].refined == len(layers)
    assert (nested - reference).norm() < 0.5 * (plain - reference).norm()
    stored_only = diffaccel.accelerate(  # refine=False: stored for DynamicPrecisionConfig, unused until switched on
        tiny_pipeline("wan"), QuantizationConfig("nvfp4+residual", refine=False, min_weight_numel=0))
    assert torch.equal(_run(stored_only, "wan"), plain)


def test_refine_config_is_validated_and_round_trips():
    with pytest.raises(ValueError, match="QuantizationConfig.refine"):
        QuantizationConfig(refine="yes")
    with pytest.raises(ValueError, match="QuantizationConfig.fallback"):
        QuantizationConfig(fallback="fp16")
    config = QuantizationConfig(refine=False, fallback="bf16")
    assert QuantizationConfig.from_dict(config.to_dict()) == config
    legacy = {k: v for k, v in config.to_dict().items() if k not in ("refine", "fallback")}  # saved before they existed
    assert QuantizationConfig.from_dict(legacy) == QuantizationConfig()


# ---------------------------------------------------------------------------------------------
# 8. a broken or missing plan file is named
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_wan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved_wan")
    diffaccel.accelerate(tiny_pipeline("wan"), QuantizationConfig("nvfp4", min_weight_numel=0)).save_pretrained(folder)
    return folder


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format_version": 1}'])
def test_invalid_plan_file_is_named(saved_wan, tmp_path, content):
    folder = _copy(saved_wan, tmp_path)
    plan = folder / "transformer" / QUANTIZATION_FILE
    plan.write_text(content)
    for load in (lambda: load_quantized(WanTransformer3DModel, folder / "transformer"),
                 lambda: accelerated_class(WanPipeline).from_pretrained(folder)):
        with pytest.raises(DiffaccelError, match=str(plan)) as error:
            load()
        assert isinstance(error.value, ValueError)


def test_missing_plan_file_is_named(saved_wan, tmp_path):
    folder = _copy(saved_wan, tmp_path)
    (folder / "transformer" / QUANTIZATION_FILE).unlink()
    expected = rf"{folder / 'transformer' / QUANTIZATION_FILE} is missing"
    with pytest.raises(DiffaccelError, match=expected):
        accelerated_class(WanPipeline).from_pretrained(folder)
    with pytest.raises(DiffaccelError, match=expected):
        load_quantized(WanTransformer3DModel, folder / "transformer")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    del config["quantization_config"]  # a save from before the config.json entry: found by its quantized tensors
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffaccelError, match=expected):
        accelerated_class(WanPipeline).from_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# 9. quantize_ is atomic, and does not silently zero a layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_bad_weight_in_a_late_layer_leaves_the_model_untouched(value):
    model = tiny_pipeline("flux").transformer
    late = model.single_transformer_blocks[0].proj_out
    good = late.weight.data[0, 0].item()
    late.weight.data[0, 0] = value
    config = QuantizationConfig("nvfp4", min_weight_numel=0)
    with pytest.raises(ValueError, match=r"'single_transformer_blocks\.0\.proj_out'.*NaN or inf"):
        quantize_(model, config)
    assert not quantized_layers(model) and not is_quantized(model)
    late.weight.data[0, 0] = good
    quantize_(model, config)
    assert type(model.single_transformer_blocks[0].proj_out) is QuantizedLinear


def test_unloaded_weights_are_refused_by_name():
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(tiny_pipeline("wan").transformer.config)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn1\.to_q'.*meta device"):
        quantize_(model, QuantizationConfig(min_weight_numel=0))
    assert not quantized_layers(model)


def test_outliers_zero_almost_every_nvfp4_weight():
    linear = nn.Linear(64, 32)
    linear.weight.data = _outlier_weight()
    nvfp4 = QuantizedLinear.from_linear(linear, "nvfp4")
    zeroed = int(((linear.weight != 0) & (nvfp4.dequantized_weight() == 0)).sum())
    assert zeroed == 2045  # all but the three outliers
    assert zeroed_fraction(linear.weight, nvfp4.dequantized_weight()) > MAX_ZEROED_FRACTION
    assert float((nvfp4.dequantized_weight() - linear.weight).norm() / linear.weight.norm()) < 1e-3  # the error hides it
    layer, fallback = quantize_layer("fc", linear, "nvfp4", QuantizationConfig())
    assert layer.precision == "int8" and fallback.precision == "int8" and fallback.zeroed > 0.99
    assert zeroed_fraction(linear.weight, layer.dequantized_weight()) < MAX_ZEROED_FRACTION
    assert quantize_layer("fc", linear, "nvfp4", QuantizationConfig(fallback="bf16"))[0] is linear
    assert quantize_layer("fc", linear, "int8", QuantizationConfig())[1] is None  # INT8 keeps them
    kept, record = quantize_layer("fc", linear, "nvfp4", QuantizationConfig(fallback="none"))
    assert kept.precision == "nvfp4" and record.precision == "nvfp4"


def test_quantize_keeps_an_outlier_layer_in_int8_and_records_it(tmp_path):
    model = _outlier_wan()
    with pytest.warns(UserWarning, match=r"'blocks\.1\.ffn\.net\.2' \(nvfp4 would zero 99\.9% .*kept in int8"):
        quantize_(model, QuantizationConfig("nvfp4", min_weight_numel=0))
    layers = quantized_layers(model)
    assert layers["blocks.1.ffn.net.2"].precision == "int8" and layers["blocks.0.ffn.net.2"].precision == "nvfp4"
    assert model._diffaccel_quantization["fallbacks"] == {"blocks.1.ffn.net.2": "int8"}
    model.save_pretrained(tmp_path)
    loaded = load_quantized(WanTransformer3DModel, tmp_path)
    assert loaded._diffaccel_quantization["fallbacks"] == {"blocks.1.ffn.net.2": "int8"}
    assert quantized_layers(loaded)["blocks.1.ffn.net.2"].precision == "int8"

    kept = _outlier_wan()
    with pytest.warns(UserWarning, match=r"'blocks\.1\.ffn\.net\.2' .*quantized to nvfp4 anyway"):
        quantize_(kept, QuantizationConfig("nvfp4", min_weight_numel=0, fallback="none"))
    assert quantized_layers(kept)["blocks.1.ffn.net.2"].precision == "nvfp4"


def test_fallback_shows_in_the_stats_and_the_static_allocation():
    pipe = tiny_pipeline("wan", ffn_dim=64, attention_head_dim=16)
    pipe.transformer.blocks[1].ffn.net[2].weight.data = _outlier_weight()
    base = QuantizationConfig("nvfp4", min_weight_numel=0)
    data = calibrate(pipe, ["a red circle"], num_inference_steps=2, progress=False, config=base, **tiny_call_inputs("wan"))
    unguarded = calibrate(pipe, ["a red circle"], num_inference_steps=2, progress=False,
                          config=QuantizationConfig("nvfp4", min_weight_numel=0, fallback="none"), **tiny_call_inputs("wan"))
    assert np.nanmean(data.error[:, :, 1]) < np.nanmean(unguarded.error[:, :, 1])  # calibrated as it will be deployed
    config = allocate_static(data, int8_fraction=0.0).quantization_config(base)
    with pytest.warns(UserWarning, match="blocks.1.ffn.net.2"):
        pipe = diffaccel.accelerate(pipe, config)
    _run(pipe, "wan")
    assert pipe.acceleration_stats.features["quantization"].fallbacks == {"blocks.1.ffn.net.2": "int8"}
