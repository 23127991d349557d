"""Memory and quality of NVFP4 / INT8 weights and of the static and dynamic precision allocations.

Side by side in one run, on the bundled micro-SD (its UNet's transformer blocks) and on a small
random-weight Wan transformer: the untouched float pipeline, all-INT8, all-NVFP4, static mixed
(INT8 for the blocks the predictor ranks most sensitive) and dynamic mixed (NVFP4 everywhere,
the nested 4-bit residual switched on per block and timestep band, or online from each block's
difference at the previous step). ``diffaccel.evaluate`` makes every variant's samples (seed 0,
one batch; its run folders go to ``out/bench-runs/mixed_precision/<model>/``) and scores them: PSNR
against the untouched pipeline's samples of the same seed and, on micro-SD, the ShapeWorld
verifier's accuracy and mean score on held-out prompts. Each variant also reports the denoiser's
weight bytes against bf16 and the bits per weight the quantized layers read
(``diffaccel.memory_report``; ``planned_memory`` for a quantized variant, which reads the same
totals off the float model), and, for variants with features, their statistics (bits in use,
blocks skipped, encoder passes) as evaluate recorded them with the samples. The calibration (prompts from
the training split, never the evaluated ones) and the fitted predictor are reported too, with
two controls for the static allocation (as many INT8 blocks ranked by measured error, and drawn
at random), the delta cache and its composition with quantization, quantized attention and (on
micro-SD) encoder reuse. Writes ``bench/results/quantization/mixed_precision_<device>.json``.

    python bench/mixed_precision.py                    # micro-SD and Wan, CPU: ~10 minutes
    python bench/mixed_precision.py --quick            # smoke run on tiny pipelines

It also sizes full-size Wan 2.1 (1.3B, 14B) and FLUX.1-dev weights under each format with
``planned_memory`` on meta-device models (no weights are loaded or downloaded).

CPU timings are not reported: on the CPU the kernels' reference path dequantizes weights at
every call, so only memory and quality are meaningful here; speed is ``bench/kernel_speed.py``'s job.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
from typing import Any, Callable, Sequence

import numpy as np
import torch

from benchkit import recorded_features, run_folder, write_report

REPO = pathlib.Path(__file__).resolve().parents[1]


def _memory(report: Any) -> dict[str, Any]:
    """The report's totals (the per-layer rows are left out of the JSON)."""
    return {key: value for key, value in report.to_dict().items() if key != "layers"}


def _static(calibration: Any, blocks: Sequence[str], predictor: Any) -> Any:
    from diffaccel.quantization.allocation import StaticAllocation

    return StaticAllocation(predictor, {}, tuple(sorted(blocks, key=calibration.blocks.index)))


def _variants(calibration: Any, args: argparse.Namespace, base: Any, transformer: bool) -> dict[str, tuple[Any, list]]:
    """name -> (QuantizationConfig or None, extra feature configs for ``diffaccel.accelerate``).

    Controls for the predictor: the same number of INT8 blocks ranked by the *measured* NVFP4
    error instead of the predicted one, and drawn at random (seeded).
    """
    from dataclasses import replace

    import diffaccel
    from diffaccel.quantization import PrecisionPredictor
    from diffaccel.quantization.allocation import allocate_dynamic, allocate_static

    predictor = PrecisionPredictor.fit(calibration)
    rng = np.random.default_rng(0)
    variants: dict[str, tuple[Any, list]] = {
        "int8": (replace(base, precision="int8"), []),
        "nvfp4": (replace(base, precision="nvfp4"), []),
    }
    for fraction in args.fractions:
        static = allocate_static(calibration, int8_fraction=fraction)
        count = len(static.int8_blocks)
        variants[f"static-int8-{fraction:.2f}"] = (static.quantization_config(base), [])
        by_error = allocate_static(calibration, int8_fraction=fraction, by="measured")
        variants[f"control-measured-{fraction:.2f}"] = (by_error.quantization_config(base), [])
        drawn = list(rng.choice(calibration.blocks, size=count, replace=False))
        variants[f"control-random-{fraction:.2f}"] = (_static(calibration, drawn, predictor).quantization_config(base), [])
        dynamic = allocate_dynamic(calibration, num_bands=args.bands, refine_fraction=fraction)
        variants[f"dynamic-refine-{fraction:.2f}"] = (dynamic.quantization_config(base), [dynamic])
        online = allocate_dynamic(calibration, num_bands=args.bands, refine_fraction=fraction, online=True)
        variants[f"dynamic-online-{fraction:.2f}"] = (online.quantization_config(base), [online])
    cache = diffaccel.DeltaCacheConfig(threshold=args.delta_threshold)
    variants[f"delta-cache-{args.delta_threshold:g}"] = (None, [cache])
    fraction = args.fractions[0]
    static = allocate_static(calibration, int8_fraction=fraction).quantization_config(base)
    variants[f"static-{fraction:.2f}_cache_qattn"] = (static, [cache, diffaccel.QuantizedAttentionConfig()])
    if not transformer:
        reuse = diffaccel.EncoderReuseConfig("faster-diffusion", parallel=False)
        variants[f"static-{fraction:.2f}_cache_encoder-reuse"] = (static, [cache, reuse])
    return variants


def run_model(
    label: str,
    make_pipe: Callable[[], Any],
    prompts: Sequence[str],
    call: dict[str, Any],
    args: argparse.Namespace,
    metrics: Sequence[str] = ("psnr",),
) -> dict[str, Any]:
    """Calibrate one model, then every variant through ``diffaccel.evaluate`` on ``prompts`` (seed 0, one
    batch; no warm-up: CPU timings are not reported) with the call settings ``call``."""
    import diffaccel
    from diffaccel.quantization import QuantizationConfig, memory_report, planned_memory
    from diffaccel.quantization.calibration import PrecisionPredictor, calibrate, calibration_prompts, denoiser_of

    pipe = make_pipe()
    base = QuantizationConfig(min_weight_numel=0)
    calibration = calibrate(pipe, calibration_prompts(args.calibration_prompts), config=base, progress=True, **call)
    predictor = PrecisionPredictor.fit(calibration)
    print(f"[{label}] predictor: error = {predictor.slope:.4f} * difference + {predictor.intercept:.4f} "
          f"(r = {predictor.correlation:.3f}, {predictor.points} points)", flush=True)
    float_model = denoiser_of(pipe)
    variants = _variants(calibration, args, base, hasattr(pipe, "transformer"))
    out_dir = run_folder("mixed_precision", f"{label}_quick" if args.quick else label)
    summary = diffaccel.evaluate(pipe, list(prompts), {name: [c for c in (config, *features) if c is not None]
                                                       for name, (config, features) in variants.items()},
                                 out_dir=out_dir, seeds=[0], metrics=list(metrics), batch_size=len(prompts), warmup=False,
                                 progress=False, **call)
    result: dict[str, Any] = {"predictor": predictor.to_dict(), "calibration": calibration.to_dict(), "variants": {}}
    for name, evaluated in summary["variants"].items():
        config, features = variants.get(name, (None, []))
        row: dict[str, Any] = {"psnr": evaluated["metrics"]["psnr"]["mean"] if name != "untouched" else float("inf"),
                               "memory": _memory(memory_report(float_model) if config is None
                                                 else planned_memory(float_model, config))}
        stats = (recorded_features(out_dir, name, seed=0) or {}) if features else {}
        if "dynamic_precision" in stats:
            row["schedule"] = features[0].to_dict()["schedule"]
            row["bits_in_use"] = stats["dynamic_precision"]["mean_bits_per_weight"]
        if "delta_cache" in stats:
            row["skipped_blocks"] = stats["delta_cache"]["skipped_fraction"]
        if "encoder_reuse" in stats:
            row["encoder_evaluations"] = stats["encoder_reuse"]["encoder_evaluations"]
        if config is not None:
            row["int8_blocks"] = sorted({pattern[:-2] for pattern, value in config.overrides if value == "int8"})
        if "verifier" in evaluated["metrics"]:
            row["accuracy"] = evaluated["metrics"]["verifier"]["mean"]
            row["mean_score"] = evaluated["metrics"]["verifier_score"]["mean"]
        result["variants"][name] = row
        memory = row["memory"]
        extra = "".join(f", {key} {row[key]:.3f}" for key in ("accuracy", "mean_score", "bits_in_use", "skipped_blocks")
                        if key in row)
        print(f"[{label}] {name:30s} PSNR {row['psnr']:6.2f} dB, weights {memory['nbytes'] / 1e6:.3f} MB "
              f"({1 / memory['ratio']:.2f}x smaller than bf16){extra}", flush=True)
    return result


def micro_sd(args: argparse.Namespace) -> dict[str, Any]:
    from diffaccel.micro_models import load_micro_sd
    from diffaccel.shapeworld import eval_prompts

    prompts = eval_prompts("single", args.prompts, seed=0, split="heldout") + \
        eval_prompts("relation", args.prompts, seed=0, split="heldout")
    return run_model("micro-sd", load_micro_sd, prompts, {"num_inference_steps": args.steps, "guidance_scale": 5.0},
                     args, ("psnr", "verifier", "verifier_score"))


def wan(args: argparse.Namespace, quick: bool) -> dict[str, Any]:
    from diffaccel.testing import tiny_call_inputs, tiny_pipeline

    size = {} if quick else {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512}
    return run_model("wan", lambda: tiny_pipeline("wan", seed=0, **size),
                     ["a red circle moving left", "two blue squares"],
                     {"num_inference_steps": args.steps, **tiny_call_inputs("wan")}, args)


#: Full-size architectures (public configs), built on the meta device to size their quantized weights.
FULL_SIZE = {
    "Wan2.1-T2V-1.3B": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads")),
    "Wan2.1-T2V-14B": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads")),
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)),
}


def full_size_memory() -> dict[str, Any]:
    """Planned weight bytes of full-size models (``planned_memory`` on meta-device models)."""
    import diffusers

    from diffaccel.quantization import EMBEDDING_EXCLUDE, QuantizationConfig, planned_memory
    from diffaccel.quantization.calibration import transformer_blocks

    configs = {
        "nvfp4": QuantizationConfig("nvfp4"),
        "nvfp4, adaLN too": QuantizationConfig("nvfp4", exclude=EMBEDDING_EXCLUDE),
        "nested nvfp4 everywhere": QuantizationConfig("nvfp4", residual=True),
        "int8": QuantizationConfig("int8"),
    }
    out: dict[str, Any] = {}
    for label, (cls, kwargs) in FULL_SIZE.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**kwargs)
        blocks = [name for name, _ in transformer_blocks(model)]
        quarter = blocks[: -(-len(blocks) // 4)]  # memory only: which quarter does not matter here
        per_model = dict(configs)
        per_model["INT8 on 25% of blocks"] = QuantizationConfig("nvfp4", overrides={f"{b}.*": "int8" for b in quarter})
        per_model["nested on 25% of blocks"] = QuantizationConfig(
            "nvfp4", overrides={f"{b}.*": "nvfp4+residual" for b in quarter})
        out[label] = {}
        for name, config in per_model.items():
            report = planned_memory(model, config)
            out[label][name] = {"nbytes": report.nbytes, "bf16_nbytes": report.bf16_nbytes,
                                "times_smaller": 1 / report.ratio}
            print(f"[full size] {label:16s} {name:24s} {report.nbytes / 1e9:6.2f} GB vs {report.bf16_nbytes / 1e9:6.2f} GB "
                  f"bf16 ({1 / report.ratio:.2f}x smaller)", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pipelines, few steps (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 25; quick 3)")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts per kind on micro-SD")
    parser.add_argument("--calibration-prompts", type=int, default=4)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--bands", type=int, default=4, help="timestep bands of the dynamic allocation")
    parser.add_argument("--delta-threshold", type=float, default=0.05, help="delta cache threshold of the composed run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 25)
    if args.steps < args.bands:
        args.bands = args.steps
    if args.prompts < 1 or args.calibration_prompts < 1:
        raise ValueError("--prompts and --calibration-prompts must be >= 1")
    if not all(0.0 <= f <= 1.0 for f in args.fractions):
        raise ValueError(f"--fractions must be in [0, 1], got {args.fractions}")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
                              "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()}}
    if args.quick:
        args.prompts = min(args.prompts, 2)
    report["full_size_memory"] = full_size_memory()
    report["micro_sd"] = micro_sd(args)
    report["wan"] = wan(args, args.quick)
    out = args.out or REPO / "bench" / "results" / "quantization" / (
        "mixed_precision_quick.json" if args.quick else "mixed_precision_cpu.json")
    write_report(report, out, default=float)
    return report


if __name__ == "__main__":
    main()
