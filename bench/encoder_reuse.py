"""Benchmark: UNet encoder reuse against the untouched pipeline and DeepCache, side by side.

Every variant runs on the same pipeline object, the same prompts and seeds, in interleaved
rounds (so machine noise hits all variants alike); times are medians over rounds, fidelity is
PSNR against the baseline image of the same seed. Results go to ``bench/results/encoder_reuse/`` as JSON.

    python bench/encoder_reuse.py                      # CPU: SD1.5 layout, reduced width, random weights
    python bench/encoder_reuse.py --device cuda        # GPU: full SD1.5 architecture, fp16, 512x512
    python bench/encoder_reuse.py --model PATH         # a trained diffusers folder (PSNR is meaningful)

On random weights PSNR says little about picture quality (every variant draws noise); use a
trained model for fidelity claims and say which model a figure comes from.
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
from diffaccel import EncoderReuseConfig

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


def deepcache_variant(pipe: Any, interval: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """Enable/disable functions for DeepCache's SD helper (the peer), or a clear error if absent."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError as err:
        raise SystemExit("DeepCache is not installed: pip install -e '.[bench]' (or pass --no-deepcache)") from err
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    return helper.enable, helper.disable


def make_variants(pipe: Any, args: argparse.Namespace) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """name -> (setup, teardown) applied around each timed call."""

    def features(*configs: Any) -> tuple[Callable[[], None], Callable[[], None]]:
        return (lambda: diffaccel.accelerate(pipe, *configs)), (lambda: diffaccel.restore(pipe))

    variants = {"baseline": ((lambda: None), (lambda: None))}
    for parallel in (False, True):
        mode = "parallel" if parallel else "sequential"
        variants[f"uniform-3/{mode}"] = features(EncoderReuseConfig("uniform:3", parallel=parallel))
        variants[f"faster-diffusion/{mode}"] = features(EncoderReuseConfig("faster-diffusion", parallel=parallel))
    if not args.no_deepcache:
        variants["deepcache-3"] = deepcache_variant(pipe, 3)
    return variants


def run_once(pipe: Any, prompt: str, seed: int, args: argparse.Namespace) -> tuple[float, np.ndarray, dict[str, Any]]:
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = pipe(
        prompt,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images[0]
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = pipe.acceleration_stats.to_dict() if getattr(pipe, "acceleration_stats", None) else {}
    return seconds, image, stats


def fit_step_costs(results: dict[str, Any], steps: int) -> dict[str, float] | None:
    """Fit ``seconds = fixed + encoder_passes * full_step + other_steps * decoder_step`` to the
    sequential variants (least squares); the decoder's share of a full UNet step bounds what
    encoder reuse alone can save.
    """
    rows = [(steps, 0, results["baseline"]["median_seconds"])]
    for name, row in results.items():
        reuse = row["encoder_reuse"]
        if name.endswith("/sequential") and reuse:
            keys = reuse["encoder_evaluations"]
            rows.append((keys, steps - keys, row["median_seconds"]))
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
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant and seed")
    parser.add_argument("--no-deepcache", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/encoder_reuse/encoder_reuse_<device>.json)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    pipe, weights = build_pipeline(args)
    variants = make_variants(pipe, args)
    times: dict[str, list[float]] = {name: [] for name in variants}
    images: dict[str, dict[int, np.ndarray]] = {name: {} for name in variants}
    call_stats: dict[str, dict[str, Any]] = {}

    cases = [(PROMPTS[i % len(PROMPTS)], seed) for i, seed in enumerate(args.seeds)]
    print(f"weights: {weights}; {args.steps} DDIM steps; device {args.device}; {len(cases)} seeds x {args.rounds} rounds",
          file=sys.stderr)
    for name, (setup, teardown) in variants.items():  # warm-up, and the images for PSNR
        setup()
        for prompt, seed in cases:
            _, images[name][seed], call_stats[name] = run_once(pipe, prompt, seed, args)
        teardown()
    for round_index in range(args.rounds):
        for name, (setup, teardown) in variants.items():
            setup()
            for prompt, seed in cases:
                seconds, _, _ = run_once(pipe, prompt, seed, args)
                times[name].append(seconds)
            teardown()
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    base_median = statistics.median(times["baseline"])
    results = {}
    for name in variants:
        median = statistics.median(times[name])
        fidelity = [psnr(images[name][seed], images["baseline"][seed]) for _, seed in cases]
        results[name] = {
            "median_seconds": median,
            "speedup_vs_baseline": base_median / median,
            "psnr_vs_baseline_db": None if name == "baseline" else statistics.median(fidelity),
            "encoder_reuse": call_stats.get(name, {}).get("features", {}).get("encoder_reuse"),
        }
    report = {
        "sequential_cost_model": fit_step_costs(results, args.steps),
        "benchmark": "encoder_reuse",
        "device": torch.cuda.get_device_name() if args.device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "weights": weights,
        "steps": args.steps,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "results": results,
    }
    print(f"\n{'variant':28s} {'median s':>9s} {'speedup':>8s} {'PSNR dB':>8s}")
    for name, row in results.items():
        psnr = row["psnr_vs_baseline_db"] or float("inf")
        print(f"{name:28s} {row['median_seconds']:9.3f} {row['speedup_vs_baseline']:7.2f}x {psnr:8.2f}")
    if report["sequential_cost_model"]:
        share = report["sequential_cost_model"]["decoder_share"]
        print(f"decoder share of a full UNet step (fitted): {share:.2f}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "encoder_reuse",
                                    f"encoder_reuse_{args.device}.json")
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
