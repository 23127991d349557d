"""Benchmark: UNet encoder reuse, deep reuse and the presets against the untouched pipeline and
DeepCache (intervals 2 to 5), side by side.

``diffaccel.evaluate`` runs every variant on the same pipeline object, prompts and seeds: a warm-up
call per variant, then one call per seed and variant, interleaved seed by seed (each seed is one
timing round, so machine noise hits all variants alike); the speedup is the median over rounds of
untouched / variant seconds, fidelity is PSNR against the untouched image of the same seed. Results
go to ``bench/results/encoder_reuse/`` as JSON, evaluate's run folder to ``out/bench-runs/encoder_reuse/``.

    python bench/encoder_reuse.py                      # CPU: SD1.5 layout, reduced width, random weights
    python bench/encoder_reuse.py --device cuda        # GPU: full SD1.5 architecture, fp16, 512x512
    python bench/encoder_reuse.py --model PATH         # a trained diffusers folder (PSNR is meaningful)
    python bench/encoder_reuse.py --quick              # smoke run: narrow UNet, 128x128, 6 steps, 1 seed
    python bench/encoder_reuse.py --device cuda --compile  # every variant on the UNet compiled in place (inductor)

With ``--compile`` the UNet is compiled in place (``pipe.unet.compile()``) before any variant
runs: the features run inside the compiled UNet, their decisions as graph breaks, and each
variant's warm-up call pays its compilation, so only the presets run, against the untouched compiled
UNet. DeepCache is left out there (its helper replaces the forward functions of the UNet and its
blocks; this bench does not measure it compiled).

On random weights PSNR says little about picture quality (every variant draws noise); use a
trained model for fidelity claims and say which model a figure comes from.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from typing import Any

import numpy as np
import torch

import diffaccel
from benchkit import recorded_features, round_seeds, run_folder, write_report
from diffaccel import EncoderReuseConfig
from diffaccel.presets import unet_preset

PROMPTS = ["a red circle to the left of a blue square", "two green triangles", "a yellow square above a purple circle"]


def build_pipeline(args: argparse.Namespace) -> tuple[Any, str]:
    """The benchmarked pipeline and a description of its weights."""
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    if args.model:
        from diffusers import DDIMScheduler, DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, use_safetensors=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        description = f"trained model at {args.model}"
    else:
        from diffaccel.testing import sd15_layout_pipeline

        width = args.width or (320 if args.device == "cuda" else 64)
        sample_size = args.sample_size or 64
        pipe = sd15_layout_pipeline(width=width, sample_size=sample_size, dtype=dtype, device=args.device, scheduler="ddim")
        description = f"random weights, SD1.5 UNet layout, width {width}, latent {sample_size}x{sample_size}"
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, description


def make_variants(args: argparse.Namespace) -> dict[str, Any]:
    """name -> what ``diffaccel.evaluate`` attaches (a config, or the peer's spec)."""
    if args.compile:  # each variant compiles its own graphs: the presets only
        print("--compile: the presets against the untouched compiled UNet (DeepCache not measured compiled)",
              file=sys.stderr)
        return {f"preset-{preset}": unet_preset(preset) for preset in diffaccel.PRESETS}
    variants: dict[str, Any] = {}
    for parallel in (False, True):
        mode = "parallel" if parallel else "sequential"
        variants[f"uniform-3-{mode}"] = EncoderReuseConfig("uniform:3", parallel=parallel)
        variants[f"faster-diffusion-{mode}"] = EncoderReuseConfig("faster-diffusion", parallel=parallel)
    variants["deep-uniform-3"] = EncoderReuseConfig("uniform:3", shallow_layers=1)
    variants["deep-uniform-3-guidance"] = EncoderReuseConfig("uniform:3", shallow_layers=1, reuse_guidance=True)
    for preset in diffaccel.PRESETS:
        variants[f"preset-{preset}"] = unet_preset(preset)
    if not args.no_deepcache and importlib.util.find_spec("DeepCache") is None:
        print("DeepCache is not installed (pip install DeepCache==0.1.1): measuring without it", file=sys.stderr)
    elif not args.no_deepcache:
        for interval in (2, 3, 4, 5):
            variants[f"deepcache-{interval}"] = f"deepcache:interval={interval}"
    return variants


def fit_step_costs(results: dict[str, Any], steps: int) -> dict[str, float] | None:
    """Fit ``seconds = fixed + encoder_passes * full_step + other_steps * decoder_step`` to the
    sequential variants (least squares); the decoder's share of a full UNet step bounds what
    encoder reuse alone can save.
    """
    rows = [(steps, 0, results["untouched"]["seconds_median"])]
    for name, row in results.items():
        reuse = row["encoder_reuse"]
        if name.endswith("-sequential") and reuse:
            keys = reuse["encoder_evaluations"]
            rows.append((keys, steps - keys, row["seconds_median"]))
    if len(rows) < 3:
        return None
    design = np.array([[1.0, full, decoder] for full, decoder, _ in rows])
    fixed, full_step, decoder_step = np.linalg.lstsq(design, np.array([r[2] for r in rows]), rcond=None)[0]
    return {
        "fixed_seconds": float(fixed),
        "full_step_seconds": float(full_step),
        "decoder_step_seconds": float(decoder_step),
        "decoder_share": float(decoder_step / full_step),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default=None, help="diffusers folder of a trained SD model (default: random SD1.5 layout)")
    parser.add_argument("--width", type=int, default=None, help="UNet base width (default 64 on CPU, 320 on CUDA)")
    parser.add_argument("--sample-size", type=int, default=None, help="latent size (default 64, i.e. 512x512 images)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50, --quick 6)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the first seeds (one prompt each)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds: --seeds is extended with the next seeds to this many; each seed is one "
                             "interleaved round")
    parser.add_argument("--no-deepcache", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="compile the UNet in place with torch.compile (inductor) before the variants run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a shared 2-core CPU a second thread stalls and timings swing 10x+)")
    parser.add_argument("--quick", action="store_true", help="smoke run: width 32, 128x128, 6 steps, 1 seed")
    parser.add_argument("--out", default=None,
                        help="JSON path (default bench/results/encoder_reuse/encoder_reuse_<device>[_quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.sample_size, args.seeds, args.rounds = args.width or 32, args.sample_size or 16, [0], 1
    args.steps = args.steps or (6 if args.quick else 50)
    seeds = round_seeds(args.seeds, args.rounds)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe, weights = build_pipeline(args)
    if args.compile:
        torch._dynamo.config.cache_size_limit = 64  # each variant's hooks make their own graphs
        pipe.unet.compile()
        weights += ", UNet compiled in place (torch.compile, inductor)"
    variants = make_variants(args)
    name = ("compiled_" if args.compile else "") + (f"{args.device}_quick" if args.quick else args.device)
    out_dir = run_folder("encoder_reuse", name)
    out_dir.mkdir(parents=True)
    prompts = out_dir.parent / f"{name}.prompts.jsonl"  # seed i draws prompt i, as the rounds always did
    prompts.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "seed": seed}) + "\n"
                               for i, seed in enumerate(seeds)))
    print(f"weights: {weights}; {args.steps} DDIM steps; device {args.device}; {len(seeds)} seeds (rounds)",
          file=sys.stderr)
    call = {"num_inference_steps": args.steps, "guidance_scale": 7.5}
    summary = diffaccel.evaluate(pipe, prompts, variants, out_dir=out_dir, seeds=seeds[:1], metrics=["psnr"],
                                 batch_size=1, **call)
    results = {}
    for variant, row in summary["variants"].items():
        stats = recorded_features(out_dir, variant, seeds[0]) or {}
        results[variant] = {
            "spec": row["spec"],
            "seconds_median": row["seconds_median"],
            "speedup": row["speedup"],
            "nfe_mean": row["nfe_mean"],
            "psnr": None if variant == "untouched" else row["metrics"]["psnr"],
            "encoder_reuse": stats.get("encoder_reuse"),
            "key_steps": (stats.get("encoder_reuse") or {}).get("key_steps"),
        }
    report = {
        "sequential_cost_model": fit_step_costs(results, args.steps),
        "benchmark": "encoder_reuse",
        "device": torch.cuda.get_device_name() if args.device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "timing": summary["timing"],
        "weights": weights,
        "steps": args.steps,
        "seeds": seeds,
        "rounds": len(seeds),
        "torch": torch.__version__,
        "results": results,
    }
    print(f"\n{'variant':28s} {'median s':>9s} {'speedup':>8s} {'PSNR dB':>8s} {'key steps':>9s}")
    for variant, row in results.items():
        psnr = row["psnr"]["mean"] if row["psnr"] else float("inf")
        keys = len(row["key_steps"]) if row["key_steps"] else "-"
        print(f"{variant:28s} {row['seconds_median']:9.3f} {row['speedup']:7.2f}x {psnr:8.2f} {keys:>9}")
    if report["sequential_cost_model"]:
        share = report["sequential_cost_model"]["decoder_share"]
        print(f"decoder share of a full UNet step (fitted): {share:.2f}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "encoder_reuse",
                                    f"encoder_reuse_{name}.json")
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
