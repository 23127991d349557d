"""Benchmark: the temporal delta cache on Wan and Flux against the untouched pipelines, side by side.

For each model ``diffaccel.evaluate`` runs every variant (the untouched pipeline, the delta cache at
several thresholds, and diffusers' own First Block Cache as the peer) on the same pipeline object,
prompt and seeds: a warm-up call per variant, then one call per seed and variant, interleaved seed
by seed (each seed is one timing round; machine noise hits all variants alike). Times are of the
whole pipeline call (text encoding, denoising, VAE decoding); the speedup is the median over rounds
of untouched / variant seconds; fidelity is the PSNR of the decoded output against the untouched
pipeline's of the same seed (mean over seeds, with its interval). ``delta_cache`` and
``skipped_block_fraction`` are the first seed's statistics, as evaluate recorded them with its
samples. Diffusers' First Block Cache keeps no statistics: a PSNR of inf there means it skipped
nothing. Results go to ``bench/results/delta_cache/`` as JSON,
evaluate's run folders (samples, report, plots) to ``out/bench-runs/delta_cache/<model>/``.

    python bench/delta_cache.py            # CPU, widened tiny Wan and Flux, random weights (~4 min)
    python bench/delta_cache.py --quick    # smoke run: narrow models, few steps, 1 round

The models are ``diffaccel.testing`` pipelines with **random weights**, widened so that the
transformer dominates the call: PSNR says how far skipping moves the output, not how good a
picture is, and the skip rates random blocks reach need not match a trained model's.
Torch runs one thread by default: on a shared 2-core machine a second OpenMP thread stalls
whenever its core is taken, which makes timings swing by 10x and more.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

import torch

import diffaccel
from benchkit import recorded_features, round_seeds, run_folder, write_report
from diffaccel.features.delta_cache import DeltaCacheConfig
from diffaccel.testing import tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle to the left of a blue square"

#: model -> (tiny pipeline name, transformer overrides, call kwargs), full and --quick sizes.
MODELS: dict[str, dict[bool, tuple[str, dict[str, Any], dict[str, Any]]]] = {
    "wan": {
        False: (
            "wan",
            dict(num_layers=8, num_attention_heads=4, attention_head_dim=32, ffn_dim=512),
            dict(height=128, width=128, num_frames=17, max_sequence_length=16),
        ),
        True: ("wan", {}, dict(height=32, width=32, num_frames=9, max_sequence_length=16)),
    },
    "flux": {
        False: (
            "flux",
            dict(
                num_layers=4,
                num_single_layers=8,
                num_attention_heads=4,
                attention_head_dim=64,
                axes_dims_rope=(16, 24, 24),
            ),
            dict(height=256, width=256, max_sequence_length=16),
        ),
        True: ("flux", {}, dict(height=64, width=64, max_sequence_length=16)),
    },
}

def make_variants(thresholds: list[float], max_skips: int, fbc_thresholds: list[float],
                  presets: list[str] = ()) -> dict[str, Any]:
    """name -> what ``diffaccel.evaluate`` attaches (a delta cache config, or the peer's spec)."""
    variants: dict[str, Any] = {}
    for threshold in thresholds:
        variants[f"delta-cache-{threshold:g}"] = DeltaCacheConfig(threshold=threshold, max_consecutive_skips=max_skips)
    for preset in presets:
        variants[f"preset-{preset}"] = diffaccel.dit_preset(preset)
    for threshold in fbc_thresholds:
        variants[f"diffusers-fbc-{threshold:g}"] = f"diffusers-cache:FirstBlockCache:threshold={threshold}"
    return variants


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant on one model through ``diffaccel.evaluate`` (each seed one interleaved round)."""
    name, overrides, call = MODELS[model][args.quick]
    pipe = tiny_pipeline(name, **overrides)
    variants = make_variants(args.thresholds, args.max_consecutive_skips, args.fbc_thresholds, args.presets)
    out_dir = run_folder("delta_cache", f"{model}_quick" if args.quick else model)
    call = {"num_inference_steps": args.steps, **call}
    summary = diffaccel.evaluate(pipe, [PROMPT], variants, out_dir=out_dir, seeds=args.seeds, metrics=["psnr"],
                                 batch_size=1, progress=False, **call)
    results = {}
    for variant, row in summary["variants"].items():
        stats = (recorded_features(out_dir, variant, args.seeds[0]) or {}).get("delta_cache")
        results[variant] = {
            "spec": row["spec"],
            "seconds_median": row["seconds_median"],
            "speedup": row["speedup"],
            "nfe_mean": row["nfe_mean"],
            "skipped_block_fraction": stats["skipped_fraction"] if stats else None,
            "psnr": None if variant == "untouched" else row["metrics"]["psnr"],
            "delta_cache": stats,
        }
        print(f"{model}: {variant} done", file=sys.stderr)
    return {
        "pipeline": type(pipe).__name__,
        "transformer_overrides": overrides,
        "call": call,
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "timing": summary["timing"],
        "run_folder": os.path.relpath(out_dir, REPO),
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20, --quick 6)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--max-consecutive-skips", type=int, default=2)
    parser.add_argument(
        "--fbc-thresholds", type=float, nargs="*", default=[0.05, 0.2], help="diffusers First Block Cache (the peer)"
    )
    parser.add_argument("--presets", nargs="*", default=[], choices=diffaccel.PRESETS,
                        help="the DiT presets too (diffaccel.dit_preset)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (--quick: 0)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timing rounds (default 5, --quick 1): --seeds is extended with the next seeds to this "
                             "many; each seed is one interleaved round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, 6 steps, 1 seed, 1 round")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/delta_cache/delta_cache_cpu[_quick].json)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.quick else 20)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.seeds = round_seeds(args.seeds or ([0] if args.quick else [0, 1]), args.rounds)
    torch.set_num_threads(args.threads)

    models = {model: bench_model(model, args) for model in args.models}
    report = {
        "benchmark": "delta_cache",
        "command": ("python bench/delta_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} torch threads)",
        "weights": "random (diffaccel.testing tiny pipelines, widened)",
        "steps": args.steps,
        "seeds": args.seeds,
        "rounds": len(args.seeds),
        "max_consecutive_skips": args.max_consecutive_skips,
        "first_steps": DeltaCacheConfig().first_steps,
        "last_steps": DeltaCacheConfig().last_steps,
        "torch": torch.__version__,
        "models": models,
    }
    print(f"\n{'model':6s} {'variant':22s} {'median s':>9s} {'speedup':>8s} {'skipped':>8s} {'PSNR dB':>8s}")
    for model, entry in models.items():
        for variant, row in entry["results"].items():
            skipped = row["skipped_block_fraction"]
            print(
                f"{model:6s} {variant:22s} {row['seconds_median']:9.3f} {row['speedup']:7.2f}x "
                f"{'-' if skipped is None else f'{skipped:.2f}':>8s} {row['psnr']['mean'] if row['psnr'] else float('inf'):8.2f}"
            )
    suffix = "_quick" if args.quick else ""
    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "delta_cache")
    out = args.out or os.path.join(results_dir, f"delta_cache_cpu{suffix}.json")
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
