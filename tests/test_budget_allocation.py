"""Measured per-layer sensitivity and the budget allocation that spends bytes by it (offline, CPU)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from diffaccel.quantization import (
    CalibrationData,
    LayerSensitivity,
    QuantizationConfig,
    allocate_static,
    calibrate,
    measure_sensitivity,
    memory_report,
    quantize_,
    quantized_layers,
)
from diffaccel.quantization.allocation import _layer_options
from diffaccel.testing import tiny_call_inputs, tiny_pipeline


@pytest.fixture(scope="module")
def sd_sensitivity():
    pipe = tiny_pipeline("sd")
    data = measure_sensitivity(pipe, ["a red circle"], formats=("nvfp4", "w8a16", "int8"), num_inference_steps=2,
                               steps_per_prompt=2, progress=False, **tiny_call_inputs("sd"))
    return pipe, data


def _synthetic(errors, nbytes, numel, total_numel) -> LayerSensitivity:
    layers = tuple(f"l{i}" for i in range(len(errors)))
    return LayerSensitivity(layers, ("nvfp4", "w8a16"), np.asarray(errors, dtype=np.float64),
                            np.asarray(nbytes, dtype=np.int64), np.asarray(numel, dtype=np.int64), total_numel,
                            QuantizationConfig(scope="all", min_weight_numel=0))


def test_sensitivity_is_measured_one_layer_at_a_time(sd_sensitivity):
    pipe, data = sd_sensitivity
    assert data.formats == ("nvfp4", "w8a16", "int8") and data.error.shape == (len(data.layers), 3)
    convs = [i for i, name in enumerate(data.layers) if isinstance(pipe.unet.get_submodule(name), torch.nn.Conv2d)]
    linears = [i for i in range(len(data.layers)) if i not in convs]
    assert convs and linears
    assert np.isnan(data.error[convs, 2]).all() and np.isfinite(data.error[linears, 2]).all()  # no W8A8 conv
    assert np.isfinite(data.error[:, :2]).all() and (data.error[:, :2] >= 0).all()
    assert (data.error[:, 0] > data.error[:, 1]).mean() > 0.9  # 4-bit moves the output more than 8-bit
    assert not quantized_layers(pipe.unet)  # every layer was put back
    again = LayerSensitivity.from_dict(data.to_dict())
    assert again.layers == data.layers and again.config == data.config and again.total_numel == data.total_numel
    np.testing.assert_array_equal(again.error, data.error)  # NaN where unavailable, on both sides
    np.testing.assert_array_equal(again.nbytes, data.nbytes)
    assert data.error[:, 0].max() > 10 * np.median(data.error[:, 0])  # sensitivities differ: something to allocate


@pytest.mark.parametrize("bits", [5.8, 6.5, 8.0, 11.0])
def test_budget_is_never_exceeded_and_the_config_realises_it_exactly(sd_sensitivity, bits):
    pipe, data = sd_sensitivity
    allocation = allocate_static(data, bits_per_weight=bits)
    assert allocation.bits_per_weight <= bits and allocation.nbytes <= allocation.budget_nbytes
    model = quantize_(copy.deepcopy(pipe.unet), allocation.quantization_config())
    report = memory_report(model)
    assert report.nbytes == allocation.nbytes
    got = {layer.name: layer.precision for layer in report.layers if layer.name in allocation.precisions}
    assert got == dict(allocation.precisions)
    assert set(allocation.precisions.values()) <= {"nvfp4", "w8a16", "bf16"}  # W8A8 only when asked for


def test_more_bytes_never_predict_more_error(sd_sensitivity):
    _, data = sd_sensitivity
    errors = [allocate_static(data, bits_per_weight=b).predicted_error for b in (5.8, 6.5, 8.0, 11.0, 16.0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] == 0.0


def test_w8a8_is_used_only_when_asked(sd_sensitivity):
    _, data = sd_sensitivity
    allocation = allocate_static(data, bits_per_weight=7.0, formats=("nvfp4", "int8"))
    assert "int8" in allocation.precisions.values() and "w8a16" not in allocation.precisions.values()


def test_greedy_matches_brute_force_on_convex_options():
    rng = np.random.default_rng(0)
    numel = np.array([256, 512, 128, 1024, 64])
    nbytes = np.stack([numel * 9 // 16 + 4, numel + 16], axis=1)
    nvfp4_error = rng.uniform(1e-4, 1e-2, len(numel)) * numel / 256
    errors = np.stack([nvfp4_error, nvfp4_error / 300], axis=1)
    data = _synthetic(errors, nbytes, numel, int(numel.sum()) + 100)
    hulls = [_layer_options(errors[i], nbytes[i], ("nvfp4", "w8a16"), int(numel[i])) for i in range(len(numel))]
    for budget in (1500, 2200, 3000, 4500):
        allocation = allocate_static(data, max_bytes=budget)
        best = min(
            (sum(h[c][1] for h, c in zip(hulls, choice)), choice)
            for choice in itertools.product(*(range(len(h)) for h in hulls))
            if 200 + sum(h[c][0] for h, c in zip(hulls, choice)) <= budget
        )
        # the greedy fill of a multiple-choice knapsack is within one layer's step of the optimum
        worst_step = max(h[i][1] - h[i + 1][1] for h in hulls for i in range(len(h) - 1))
        assert allocation.nbytes <= budget and allocation.predicted_error <= best[0] + worst_step


def test_options_hull_drops_dominated_formats():
    # w8a16 costs more than bf16 and is worse: never an option; an option above the hull is dropped too
    hull = _layer_options(np.array([1e-2, 2e-3]), np.array([600, 3000]), ("nvfp4", "w8a16"), 1024)
    assert [o[2] for o in hull] == ["nvfp4", "bf16"]
    hull = _layer_options(np.array([1e-2, 9.9e-3]), np.array([600, 1100]), ("nvfp4", "w8a16"), 1024)
    assert [o[2] for o in hull] == ["nvfp4", "bf16"]  # 8-bit saves almost nothing here: straight to bf16
    hull = _layer_options(np.array([np.nan, 1e-4]), np.array([600, 1100]), ("nvfp4", "w8a16"), 1024)
    assert [o[2] for o in hull] == ["w8a16", "bf16"]  # unavailable NVFP4 (it would fall back)


def test_calibrate_with_sensitivity_feeds_the_budget_allocation():
    pipe = tiny_pipeline("pixart-sigma")
    data = calibrate(pipe, ["a red circle"], num_inference_steps=2, progress=False, sensitivity=True,
                     config=QuantizationConfig(min_weight_numel=0), **tiny_call_inputs("pixart-sigma"))
    assert data.sensitivity is not None
    assert CalibrationData.from_dict(data.to_dict()).sensitivity.layers == data.sensitivity.layers
    allocation = allocate_static(data, bits_per_weight=12.0)  # the tiny model's embeddings and norms stay bf16
    assert allocation.bits_per_weight <= 12.0 and set(allocation.counts) >= {"nvfp4", "w8a16"}
    assert allocate_static(data, int8_fraction=0.5).int8_blocks  # the predictor's policy stays


def test_bad_budgets_raise_before_any_work(sd_sensitivity):
    _, data = sd_sensitivity
    with pytest.raises(ValueError, match="below the smallest allocation"):
        allocate_static(data, bits_per_weight=2.0)
    with pytest.raises(ValueError, match="exactly one of"):
        allocate_static(data, bits_per_weight=6.0, max_bytes=10_000)
    with pytest.raises(ValueError, match="bits_per_weight must be a number > 0"):
        allocate_static(data, bits_per_weight=-1)
    with pytest.raises(ValueError, match="formats must be measured ones"):
        allocate_static(data, bits_per_weight=6.0, formats=("fp8",))
    with pytest.raises(ValueError, match="allocates by budget"):
        allocate_static(data, int8_fraction=0.5)
    no_layers = CalibrationData(("a",), ("p",), np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))
    with pytest.raises(ValueError, match="needs measured layer sensitivities"):
        allocate_static(no_layers, bits_per_weight=6.0)
    with pytest.raises(ValueError, match="formats must be distinct values"):
        measure_sensitivity(tiny_pipeline("sd"), ["a"], formats=("nvfp4", "nvfp4"))
    with pytest.raises(ValueError, match="steps_per_prompt must be an int >= 1"):
        measure_sensitivity(tiny_pipeline("sd"), ["a"], steps_per_prompt=0)


def test_trajectory_sensitivity_is_the_final_latents_error_of_one_quantized_layer():
    """measure="trajectory": each error is the relative error of a whole run's final latents with that one layer
    quantized, exactly as quantize_ quantizes it (checked against doing so by hand on a twin pipeline)."""
    inputs = {**tiny_call_inputs("pixart-sigma"), "num_inference_steps": 2}
    data = measure_sensitivity(tiny_pipeline("pixart-sigma"), ["a red circle"], formats=("nvfp4", "w8a16"),
                               measure="trajectory", progress=False, **inputs)
    assert np.isfinite(data.error).all() and (data.error[:, 0] > data.error[:, 1]).mean() > 0.8

    def latents(pipe):
        return pipe("a red circle", output_type="latent", generator=torch.Generator().manual_seed(0), **inputs).images

    twin = tiny_pipeline("pixart-sigma")
    reference = latents(twin)
    worst = int(np.argmax(data.error[:, 0]))
    quantize_(twin.transformer, QuantizationConfig(precision="bf16", scope="all", min_weight_numel=0,
                                                   overrides=((data.layers[worst], "nvfp4"),)))
    by_hand = float((latents(twin) - reference).pow(2).sum() / reference.pow(2).sum())
    assert data.error[worst, 0] == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(ValueError, match="measure must be one of"):
        measure_sensitivity(tiny_pipeline("pixart-sigma"), ["a red circle"], measure="final")
    with pytest.warns(UserWarning, match="steps_per_prompt has no effect"):
        measure_sensitivity(tiny_pipeline("pixart-sigma"), ["a red circle"], formats=("w8a16",), measure="trajectory",
                            steps_per_prompt=5, progress=False, **inputs)
