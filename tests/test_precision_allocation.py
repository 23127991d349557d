"""Calibration, the sensitivity predictor and the static / dynamic precision allocations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel.errors import UnsupportedCombinationError, UnsupportedPipelineError
from diffaccel.kernels import nvfp4_quantize
from diffaccel.quantization import QuantizationConfig, QuantizedLinear, quantize_
from diffaccel.quantization.allocation import allocate_dynamic, allocate_static
from diffaccel.quantization.calibration import (
    CalibrationData,
    PrecisionPredictor,
    calibrate,
    calibration_prompts,
    transformer_blocks,
)
from diffaccel.quantization.dynamic import DynamicPrecisionConfig
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

STEPS = 4


def _run(pipe, name="pixart-sigma", steps=STEPS):
    return pipe("a red circle", num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **tiny_call_inputs(name))


def _latents(output):
    return output.images if hasattr(output, "images") else output.frames


@pytest.fixture(scope="module")
def pixart():
    pipe = tiny_pipeline("pixart-sigma")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _synthetic(difference: np.ndarray, slope=2.0, intercept=0.01) -> CalibrationData:
    blocks = tuple(f"b{i}" for i in range(difference.shape[-1]))
    return CalibrationData(blocks, ("p",) * difference.shape[0], difference, slope * difference + intercept)


def test_transformer_blocks_are_found_in_every_denoiser():
    for name, attr in [("sd", "unet"), ("pixart-sigma", "transformer"), ("sd3", "transformer"),
                       ("flux", "transformer"), ("wan", "transformer"), ("cogvideox", "transformer"),
                       ("ltx", "transformer")]:
        blocks = transformer_blocks(getattr(tiny_pipeline(name), attr))
        assert blocks, name
        names = [n for n, _ in blocks]
        assert len(set(names)) == len(names)


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def test_calibration_matches_a_direct_measurement_and_changes_nothing(pixart):
    before = _latents(_run(pixart))
    block_name, block = transformer_blocks(pixart.transformer)[1]
    captured = []

    def capture(module, args, kwargs):
        if not captured:
            captured.append((_clone(args), _clone(kwargs)))

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        data = calibrate(pixart, ["a red circle"], num_inference_steps=STEPS, progress=False,
                         config=QuantizationConfig(min_weight_numel=0), **tiny_call_inputs("pixart-sigma"))
    finally:
        handle.remove()
    args, kwargs = captured[0]  # the block's inputs at step 0
    hidden_in = kwargs.get("hidden_states", args[0] if args else None)
    with torch.no_grad():
        out = block(*args, **kwargs)
        quantized = copy.deepcopy(block)
        for module in quantized.modules():
            if type(module) is torch.nn.Linear:
                module.weight.data = nvfp4_quantize(module.weight.data).dequantize(module.weight.dtype)
        out_q = quantized(*args, **kwargs)
    index = data.blocks.index(block_name)
    assert data.difference[0, 0, index] == pytest.approx(float((out - hidden_in).norm() / hidden_in.norm()), rel=1e-5)
    assert data.error[0, 0, index] == pytest.approx(float((out_q - out).norm() / out.norm()), rel=1e-4)
    assert data.difference.shape == data.error.shape == (1, STEPS, len(data.blocks))
    assert np.isfinite(data.difference).all() and (data.error > 0).all()
    assert torch.equal(_latents(_run(pixart)), before)  # no hooks left, weights restored, outputs unchanged


def test_calibration_only_counts_the_layers_the_config_quantizes(pixart):
    data = calibrate(pixart, ["a red circle"], num_inference_steps=2, progress=False,
                     config=QuantizationConfig(min_weight_numel=0, exclude=("*",)), **tiny_call_inputs("pixart-sigma"))
    assert (data.error == 0).all() and (data.difference > 0).all()


def test_calibration_counts_steps_with_separate_cfg_calls():
    pipe = tiny_pipeline("wan")
    data = calibrate(pipe, ["a red circle", "a blue square"], num_inference_steps=3, progress=False,
                     config=QuantizationConfig(min_weight_numel=0), guidance_scale=3.0, **tiny_call_inputs("wan"))
    assert data.difference.shape == (2, 3, 2)
    assert np.isfinite(data.difference).all() and np.isfinite(data.error).all()


def test_calibration_rejects_bad_input(pixart):
    with pytest.raises(ValueError, match="prompts"):
        calibrate(pixart, "a red circle")
    with pytest.raises(ValueError, match="num_inference_steps"):
        calibrate(pixart, ["a red circle"], num_inference_steps=0)

    class NoDenoiser:
        pass

    with pytest.raises(UnsupportedPipelineError, match="supported"):
        calibrate(NoDenoiser(), ["a red circle"])


def test_calibration_save_load_round_trip(tmp_path):
    data = _synthetic(np.random.default_rng(0).random((2, 3, 4)))
    data.save(tmp_path)
    back = CalibrationData.load(tmp_path)
    assert back.blocks == data.blocks and np.array_equal(back.difference, data.difference)
    assert np.array_equal(back.error, data.error)


def test_predictor_recovers_a_linear_relation():
    data = _synthetic(np.random.default_rng(1).random((3, 5, 4)), slope=0.3, intercept=0.02)
    data.error[0, 0, 0] = np.nan  # a block that did not run is ignored
    predictor = PrecisionPredictor.fit(data)
    assert predictor.slope == pytest.approx(0.3) and predictor.intercept == pytest.approx(0.02)
    assert predictor.correlation == pytest.approx(1.0) and predictor.points == 3 * 5 * 4 - 1
    assert PrecisionPredictor.from_dict(predictor.to_dict()) == predictor


def test_static_allocation_takes_the_most_sensitive_blocks():
    difference = np.tile(np.array([0.1, 0.4, 0.2, 0.3]), (1, 2, 1))
    data = _synthetic(difference)
    assert allocate_static(data, int8_fraction=0.5).int8_blocks == ("b1", "b3")
    assert allocate_static(data, int8_fraction=0.0).int8_blocks == ()
    assert allocate_static(data, error_threshold=2.0 * 0.25 + 0.01).int8_blocks == ("b1", "b3")
    config = allocate_static(data, int8_fraction=0.25).quantization_config(QuantizationConfig(min_weight_numel=0))
    assert dict(config.overrides)["b1.*"] == "int8" and config.precision == "nvfp4"
    data.error[..., 0] = 10.0  # measured: b0 is the most sensitive, whatever the differences say
    assert allocate_static(data, int8_fraction=0.25, by="measured").int8_blocks == ("b0",)
    with pytest.raises(ValueError, match="by must be"):
        allocate_static(data, int8_fraction=0.25, by="oracle")
    with pytest.raises(ValueError, match="exactly one"):
        allocate_static(data)
    with pytest.raises(ValueError, match="int8_fraction"):
        allocate_static(data, int8_fraction=1.5)


def test_dynamic_allocation_bands():
    # block b0 is volatile early, b1 late; four steps in two bands
    difference = np.array([[[0.9, 0.1], [0.8, 0.1], [0.1, 0.7], [0.1, 0.9]]])
    config = allocate_dynamic(_synthetic(difference), num_bands=2, refine_fraction=0.5)
    assert config.schedule == (("b0", (True, False)), ("b1", (False, True)))
    assert config.predictor.slope == pytest.approx(2.0)
    assert allocate_dynamic(_synthetic(difference), num_bands=2, refine_fraction=0.0).schedule == ()
    assert DynamicPrecisionConfig.from_dict(config.to_dict()) == config
    nested = config.quantization_config()
    assert dict(nested.overrides) == {"b0.*": "nvfp4+residual", "b1.*": "nvfp4+residual"}
    with pytest.raises(ValueError, match="num_bands"):
        allocate_dynamic(_synthetic(difference), num_bands=5, refine_fraction=0.5)
    with pytest.raises(ValueError, match="band tuple"):
        DynamicPrecisionConfig({"a": (True,), "b": (True, False)})


def _quantized(pipe, config):
    pipe = copy.deepcopy(pipe)
    quantize_(pipe.transformer, config)
    return pipe


def test_dynamic_precision_switches_refine_per_band(pixart):
    blocks = [name for name, _ in transformer_blocks(pixart.transformer)]
    config = DynamicPrecisionConfig({blocks[0]: (True, False), blocks[1]: (False, True)})
    pipe = diffaccel.accelerate(_quantized(pixart, config.quantization_config(QuantizationConfig(min_weight_numel=0))),
                                config)
    layer_of = {b: next(m for m in dict(transformer_blocks(pipe.transformer))[b].modules()
                        if isinstance(m, QuantizedLinear)) for b in blocks}
    seen = {b: [] for b in blocks}
    handles = [layer.register_forward_pre_hook(lambda m, a, b=b: seen[b].append(m.refine))
               for b, layer in layer_of.items()]
    _run(pipe)
    for handle in handles:
        handle.remove()
    assert seen[blocks[0]] == [True, True, False, False]
    assert seen[blocks[1]] == [False, False, True, True]
    stats = pipe.acceleration_stats.features["dynamic_precision"]
    assert stats.num_steps == STEPS and len(stats.bits_per_weight) == STEPS
    assert all(4.5 < bits < 9.0 for bits in stats.bits_per_weight)
    assert not any(layer.refine for layer in layer_of.values())  # reset after the call


def test_refinement_brings_the_output_closer_to_float(pixart):
    reference = _latents(_run(pixart))
    blocks = [name for name, _ in transformer_blocks(pixart.transformer)]
    base = QuantizationConfig(min_weight_numel=0)
    never = DynamicPrecisionConfig({b: (False,) for b in blocks})
    always = DynamicPrecisionConfig({b: (True,) for b in blocks})
    nested = always.quantization_config(base)
    plain = _latents(_run(_quantized(pixart, base)))
    off = _latents(_run(diffaccel.accelerate(_quantized(pixart, nested), never)))
    on = _latents(_run(diffaccel.accelerate(_quantized(pixart, nested), always)))
    assert torch.equal(off, plain)  # the residual unused == plain NVFP4, bit for bit
    assert (on - reference).norm() < 0.5 * (plain - reference).norm()


def test_static_int8_blocks_are_closer_than_nvfp4(pixart):
    reference = _latents(_run(pixart))
    data = calibrate(pixart, calibration_prompts(2), num_inference_steps=STEPS, progress=False,
                     config=QuantizationConfig(min_weight_numel=0), **tiny_call_inputs("pixart-sigma"))
    base = QuantizationConfig(min_weight_numel=0)
    allocation = allocate_static(data, int8_fraction=1.0)
    mixed = _quantized(pixart, allocation.quantization_config(base))
    assert all(m.precision == "int8" for m in mixed.transformer.modules()
               if isinstance(m, QuantizedLinear) and any(m is x for _, b in transformer_blocks(mixed.transformer)
                                                         for x in b.modules()))
    nvfp4 = _latents(_run(_quantized(pixart, base)))
    assert (_latents(_run(mixed)) - reference).norm() < (nvfp4 - reference).norm()


def test_dynamic_precision_refuses_unprepared_denoisers(pixart):
    blocks = [name for name, _ in transformer_blocks(pixart.transformer)]
    config = DynamicPrecisionConfig({blocks[0]: (True,)})
    with pytest.raises(UnsupportedCombinationError, match="quantize"):
        diffaccel.accelerate(copy.deepcopy(pixart), config)
    with pytest.raises(UnsupportedCombinationError, match="residual"):
        diffaccel.accelerate(_quantized(pixart, QuantizationConfig(min_weight_numel=0)), config)
    with pytest.raises(UnsupportedCombinationError, match="does not have"):
        diffaccel.accelerate(_quantized(pixart, QuantizationConfig(min_weight_numel=0)),
                             DynamicPrecisionConfig({"nope": (True,)}))


def test_calibration_prompts_are_training_captions():
    from diffaccel.shapeworld import parse_prompt

    prompts = calibration_prompts(6)
    assert len(set(prompts)) > 1
    for prompt in prompts:
        parse_prompt(prompt)


def test_quantized_pipeline_with_dynamic_precision_saves_and_loads(pixart, tmp_path):
    from diffaccel.acceleration import accelerated_class

    blocks = [name for name, _ in transformer_blocks(pixart.transformer)]
    dynamic = DynamicPrecisionConfig({blocks[0]: (True, False)})
    quantization = dynamic.quantization_config(QuantizationConfig(min_weight_numel=0))
    # given in the "wrong" order: accelerate quantizes first, then attaches the switch
    pipe = diffaccel.accelerate(copy.deepcopy(pixart), dynamic, quantization)
    expected = _latents(_run(pipe))
    pipe.save_pretrained(tmp_path)
    loaded = accelerated_class(type(pixart)).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.acceleration == (quantization, dynamic)
    assert torch.equal(_latents(_run(loaded)), expected)
    assert loaded.acceleration_stats.features["dynamic_precision"].refined_fraction[0] > 0


@pytest.mark.parametrize("name", ["sd", "pixart-sigma", "sd3", "flux", "wan", "cogvideox", "ltx"])
def test_every_pipeline_runs_with_a_dynamic_allocation(name):
    pipe = tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    base = QuantizationConfig(min_weight_numel=0)
    data = calibrate(pipe, ["a red circle"], num_inference_steps=2, progress=False, config=base,
                     **tiny_call_inputs(name))
    dynamic = allocate_dynamic(data, num_bands=2, refine_fraction=0.5)
    quantize_(getattr(pipe, "unet" if name == "sd" else "transformer"), dynamic.quantization_config(base))
    pipe = diffaccel.accelerate(pipe, dynamic)
    output = _latents(_run(pipe, name, steps=2))
    assert torch.isfinite(output).all()
    stats = pipe.acceleration_stats.features["dynamic_precision"]
    assert stats.num_steps == 2 and max(stats.refined_fraction) > 0


def test_quantization_composes_with_encoder_reuse():
    pipe = tiny_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    quantize_(pipe.unet, QuantizationConfig(min_weight_numel=0))
    quantized = _latents(_run(pipe, "sd"))
    every_step = diffaccel.accelerate(pipe, diffaccel.EncoderReuseConfig("all"))
    assert torch.equal(_latents(_run(every_step, "sd")), quantized)  # every step a key step: nothing reused
    reuse = diffaccel.accelerate(pipe, diffaccel.EncoderReuseConfig("uniform:2"))
    reused = _latents(_run(reuse, "sd"))
    assert reuse.acceleration_stats.features["encoder_reuse"].encoder_evaluations == STEPS // 2
    assert torch.isfinite(reused).all() and not torch.equal(reused, quantized)


@pytest.mark.parametrize("name", ["sd", "flux", "wan"])
@pytest.mark.parametrize("overrides", [{}, {"*.ff*": "int8", "*attn*": "nvfp4+residual"}])
def test_planned_memory_is_what_quantizing_gives(name, overrides):
    from diffaccel.quantization import memory_report, planned_memory

    model = getattr(tiny_pipeline(name), "unet" if name == "sd" else "transformer")
    config = QuantizationConfig(min_weight_numel=0, overrides=overrides)
    planned = planned_memory(model, config)
    actual = memory_report(quantize_(model, config))
    assert planned.nbytes == actual.nbytes and planned.bf16_nbytes == actual.bf16_nbytes
    assert planned.counts == actual.counts and planned.layers == actual.layers


def test_planned_memory_reads_shapes_only():
    from diffusers import WanTransformer3DModel

    from diffaccel.quantization import planned_memory

    with torch.device("meta"):
        model = WanTransformer3DModel(num_layers=2, num_attention_heads=2, attention_head_dim=64, ffn_dim=512,
                                      text_dim=64, freq_dim=32, in_channels=4, out_channels=4)
    report = planned_memory(model, QuantizationConfig())
    assert report.counts["nvfp4"] > 0 and 1 / report.ratio > 2


def test_online_allocation_threshold_and_blocks():
    difference = np.array([[[0.9, 0.1, 0.2], [0.8, 0.1, 0.3], [0.1, 0.1, 0.7], [0.1, 0.1, 0.6]]])
    config = allocate_dynamic(_synthetic(difference, slope=1.0, intercept=0.0), num_bands=2,
                              refine_fraction=0.25, online=True)
    # 3 of the 12 points (0.9, 0.8, 0.7) lie above the threshold; b1 never does and stores nothing
    assert config.online_threshold == pytest.approx(0.6)
    assert [block for block, _ in config.schedule] == ["b0", "b2"] and config.refined_blocks == ("b0", "b2")
    assert DynamicPrecisionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="needs a predictor"):
        DynamicPrecisionConfig({"b0": (True,)}, online_threshold=0.1)


def test_online_decisions_follow_the_measured_differences(pixart):
    blocks = [name for name, _ in transformer_blocks(pixart.transformer)]
    measured = {b: [] for b in blocks}
    probes = []
    for name, block in transformer_blocks(pixart.transformer):
        def probe(module, args, kwargs, output, name=name):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            measured[name].append(float((output - hidden).norm() / hidden.norm()))
        probes.append(block.register_forward_hook(probe, with_kwargs=True))
    _run(pixart)
    for handle in probes:
        handle.remove()
    # a threshold between the two blocks' step-1 differences: only the larger one is refined at step 2
    low, high = sorted(measured[b][1] for b in blocks)
    identity = PrecisionPredictor(slope=1.0, intercept=0.0)
    config = DynamicPrecisionConfig({b: (False,) for b in blocks}, identity, online_threshold=(low + high) / 2)
    pipe = diffaccel.accelerate(_quantized(pixart, config.quantization_config(QuantizationConfig(min_weight_numel=0))),
                                config)
    seen = {b: [] for b in blocks}
    layers = {b: next(m for m in dict(transformer_blocks(pipe.transformer))[b].modules() if isinstance(m, QuantizedLinear))
              for b in blocks}
    handles = [layer.register_forward_pre_hook(lambda m, a, b=b: seen[b].append(m.refine)) for b, layer in layers.items()]
    _run(pipe)
    for handle in handles:
        handle.remove()
    for block in blocks:
        expected = [False] + [d > (low + high) / 2 for d in measured[block][:-1]]
        assert seen[block] == expected, block
    assert any(seen[b][2] for b in blocks) and not all(seen[b][2] for b in blocks)
    diffaccel.restore(pipe)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook("diffaccel.dynamic_precision.probe")
                   for _, m in transformer_blocks(pipe.transformer))


@pytest.mark.filterwarnings("ignore:FlowMatchEulerDiscreteScheduler is deterministic")
def test_fk_steering_on_a_quantized_cached_pipeline():
    """Every feature at once under FK steering: particles that all copy one stay identical."""
    from diffaccel.rewards import FunctionReward
    from diffaccel.steering import FKSteeringConfig, steer

    pipe = tiny_pipeline("wan")
    pipe.set_progress_bar_config(disable=True)
    base = QuantizationConfig(min_weight_numel=0)
    data = calibrate(pipe, ["a red circle"], num_inference_steps=5, progress=False, config=base,
                     **tiny_call_inputs("wan"))
    dynamic = allocate_dynamic(data, num_bands=2, refine_fraction=0.5, online=True)
    pipe = diffaccel.accelerate(pipe, dynamic.quantization_config(base), dynamic,
                                diffaccel.DeltaCacheConfig(threshold=float("inf")), diffaccel.QuantizedAttentionConfig())
    config = FKSteeringConfig(num_particles=3, potential="immediate", lmbda=1e6, resample_every=100,
                              final_correction=False)
    reward = FunctionReward(lambda media, prompts: media.mean(dim=tuple(range(1, media.ndim))), name="brightness")
    out = steer(pipe, config, reward)("a red circle", num_inference_steps=5, output_type="pt",
                                      generator=torch.Generator().manual_seed(0), **tiny_call_inputs("wan"))
    assert out.stats.resampled_steps == [0] and len(set(out.stats.ancestry[0])) == 1
    assert float((out.frames - out.frames[:1]).abs().max()) < 1e-5
    features = pipe.acceleration_stats.features
    assert features["delta_cache"].blocks_skipped > 0 and features["quantization"].layers["nvfp4+residual"] > 0
    assert max(features["dynamic_precision"].refined_fraction) > 0
    assert features["quantized_attention"].calls > 0


def test_static_activation_scales_from_calibration(tmp_path):
    from diffusers import WanTransformer3DModel

    from diffaccel.quantization import load_quantized
    from diffaccel.quantization.calibration import calibrate_activation_scales

    pipe = tiny_pipeline("wan")
    pipe.set_progress_bar_config(disable=True)
    quantize_(pipe.transformer, QuantizationConfig("int8", min_weight_numel=0))
    dynamic = _latents(_run(pipe, "wan"))
    layer_name, layer = next((n, m) for n, m in pipe.transformer.named_modules() if isinstance(m, QuantizedLinear))
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, inputs: seen.append(float(inputs[0].abs().amax())))
    scales = calibrate_activation_scales(pipe, ["a red circle", "a blue square"], num_inference_steps=STEPS,
                                         progress=False, **tiny_call_inputs("wan"))
    handle.remove()
    assert scales[layer_name] == pytest.approx(max(seen) / 127, rel=1e-6)
    assert float(layer.act_scale) == pytest.approx(scales[layer_name])
    static = _latents(_run(pipe, "wan"))
    assert not torch.equal(static, dynamic)
    assert (static - dynamic).norm() / dynamic.norm() < 0.05
    pipe.transformer.save_pretrained(tmp_path)
    loaded = load_quantized(WanTransformer3DModel, tmp_path)
    assert float(loaded.get_submodule(layer_name).act_scale) == float(layer.act_scale)
    with pytest.raises(ValueError, match="clip"):
        calibrate_activation_scales(pipe, ["a red circle"], clip=0.0)
    with pytest.raises(UnsupportedPipelineError, match="INT8"):
        calibrate_activation_scales(tiny_pipeline("wan"), ["a red circle"])
