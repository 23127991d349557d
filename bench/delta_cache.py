"""Benchmark: the temporal delta cache on Wan and Flux against the untouched pipelines, side by side.

For each model every variant (the untouched pipeline, the delta cache at several thresholds, and
diffusers' own First Block Cache as the peer) runs on the same pipeline object, prompt and seeds,
in interleaved rounds (machine noise hits all variants alike). Times are medians over rounds and
seeds of the whole pipeline call (text encoding, denoising, VAE decoding); fidelity is the PSNR of
the decoded output against the untouched pipeline's (median over seeds); ``delta_cache`` holds the
first seed's statistics. Diffusers' First Block Cache keeps no statistics: a PSNR of inf there
means it skipped nothing. Results go to ``bench/results/delta_cache/`` as JSON.

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
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

import diffaccel
from benchkit import psnr, write_report
from diffaccel.features.delta_cache import DeltaCacheConfig
from diffaccel.testing import tiny_pipeline

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

Variant = tuple[Callable[[], None], Callable[[], None]]


def make_variants(
    pipe: Any, thresholds: list[float], max_skips: int, fbc_thresholds: list[float]
) -> dict[str, Variant]:
    """name -> (setup, teardown) applied around each timed call."""
    from diffusers.hooks import FirstBlockCacheConfig

    def delta(threshold: float) -> Variant:
        config = DeltaCacheConfig(threshold=threshold, max_consecutive_skips=max_skips)
        return (lambda: diffaccel.accelerate(pipe, config)), (lambda: diffaccel.restore(pipe))

    def first_block_cache(threshold: float) -> Variant:
        return (
            lambda: pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold)),
            lambda: pipe.transformer.disable_cache(),
        )

    variants: dict[str, Variant] = {"baseline": ((lambda: None), (lambda: None))}
    for threshold in thresholds:
        variants[f"delta-cache-{threshold:g}"] = delta(threshold)
    for threshold in fbc_thresholds:
        variants[f"diffusers-fbc-{threshold:g}"] = first_block_cache(threshold)
    return variants


def run_once(pipe: Any, call: dict[str, Any], steps: int, seed: int) -> tuple[float, np.ndarray, dict[str, Any] | None]:
    """One timed call: seconds, the decoded output and the delta cache's stats (if attached)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    result = pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="np", **call)
    seconds = time.perf_counter() - start
    output = result.frames if hasattr(result, "frames") else result.images
    stats = getattr(pipe, "acceleration_stats", None)
    delta = stats.features.get("delta_cache") if stats is not None else None
    return seconds, np.asarray(output), delta.to_dict() if delta is not None else None


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant on one model, interleaved over rounds (each round runs every seed)."""
    name, overrides, call = MODELS[model][args.quick]
    pipe = tiny_pipeline(name, **overrides)
    variants = make_variants(pipe, args.thresholds, args.max_consecutive_skips, args.fbc_thresholds)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    outputs: dict[str, dict[int, np.ndarray]] = {variant: {} for variant in variants}
    stats: dict[str, dict[int, dict[str, Any] | None]] = {variant: {} for variant in variants}
    for variant, (setup, teardown) in variants.items():  # warm-up, and the outputs for PSNR
        setup()
        try:
            for seed in args.seeds:
                _, outputs[variant][seed], stats[variant][seed] = run_once(pipe, call, args.steps, seed)
        finally:
            teardown()
    for round_index in range(args.rounds):
        for variant, (setup, teardown) in variants.items():
            setup()
            try:
                for seed in args.seeds:
                    times[variant].append(run_once(pipe, call, args.steps, seed)[0])
            finally:
                teardown()
        print(f"{model}: round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(times["baseline"])
    results = {}
    for variant in variants:
        median = statistics.median(times[variant])
        seed_stats = [stats[variant][seed] for seed in args.seeds]
        fidelity = [psnr(outputs[variant][seed], outputs["baseline"][seed]) for seed in args.seeds]
        results[variant] = {
            "median_seconds": median,
            "speedup_vs_baseline": base / median,
            "skipped_block_fraction": (
                statistics.mean(row["skipped_fraction"] for row in seed_stats) if seed_stats[0] else None
            ),
            "psnr_vs_baseline_db": None if variant == "baseline" else statistics.median(fidelity),
            "seconds": times[variant],
            "delta_cache": seed_stats[0],
        }
    return {
        "pipeline": type(pipe).__name__,
        "transformer_overrides": overrides,
        "call": call,
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
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
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (--quick: 0)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, --quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, 6 steps, 1 seed, 1 round")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/delta_cache/delta_cache_cpu[_quick].json)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.quick else 20)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1])
    torch.set_num_threads(args.threads)

    models = {model: bench_model(model, args) for model in args.models}
    report = {
        "benchmark": "delta_cache",
        "command": "python bench/delta_cache.py" + (" --quick" if args.quick else ""),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} torch threads)",
        "weights": "random (diffaccel.testing tiny pipelines, widened)",
        "steps": args.steps,
        "seeds": args.seeds,
        "rounds": args.rounds,
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
                f"{model:6s} {variant:22s} {row['median_seconds']:9.3f} {row['speedup_vs_baseline']:7.2f}x "
                f"{'-' if skipped is None else f'{skipped:.2f}':>8s} {row['psnr_vs_baseline_db'] or float('inf'):8.2f}"
            )
    suffix = "_quick" if args.quick else ""
    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "delta_cache")
    out = args.out or os.path.join(results_dir, f"delta_cache_cpu{suffix}.json")
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
