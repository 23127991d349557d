"""Speed and quality of the step-skipping features on the trained micro-SD, side by side.

On the bundled micro-SD (the only trained model here) with held-out ShapeWorld prompts, every
variant runs the same prompts and seeds: the untouched pipeline, encoder reuse (Faster
Diffusion's schedule), the temporal delta cache at several thresholds, DeepCache (the peer,
``pip install -e ".[bench]"``), NVFP4 weights and everything composed. Quality is the ShapeWorld
verifier's accuracy (all criteria met) and mean score, and PSNR against the untouched images;
speed is the median wall time of a batched call over interleaved rounds (one torch thread: on the
shared 2-core CPU a second thread makes timings swing), and the speedup against the untouched
pipeline. Writes ``bench/results/micro_sd_acceleration/micro_sd_acceleration_cpu.json``.

    python bench/micro_sd_acceleration.py               # 32 prompts, 25 DDIM steps, 3 rounds (~8 min)
    python bench/micro_sd_acceleration.py --quick       # smoke run

NVFP4 on the CPU runs the kernels' reference path (it dequantizes at every call), so its time
here is not a speed claim; it is in the table for the quality of the composition.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from benchkit import psnr, write_report

REPO = pathlib.Path(__file__).resolve().parents[1]


def variants(pipe: Any, args: argparse.Namespace) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """name -> (setup, teardown) around each timed call."""
    import diffaccel
    from diffaccel.quantization import QuantizationConfig, quantize_

    float_unet = pipe.unet
    nvfp4_unet = quantize_(copy.deepcopy(float_unet), QuantizationConfig("nvfp4", min_weight_numel=0))
    reuse = diffaccel.EncoderReuseConfig("faster-diffusion", parallel=False)

    def features(*configs: Any, unet: Any = None) -> tuple[Callable[[], None], Callable[[], None]]:
        def setup() -> None:
            pipe.unet = unet if unet is not None else float_unet
            diffaccel.accelerate(pipe, *configs)

        def teardown() -> None:
            diffaccel.restore(pipe)
            pipe.unet = float_unet

        return setup, teardown

    table = {"untouched": features(), "encoder reuse": features(reuse)}
    for threshold in args.thresholds:
        table[f"delta cache {threshold}"] = features(
            diffaccel.DeltaCacheConfig(threshold=threshold, max_consecutive_skips=args.max_consecutive_skips))
    if not args.no_deepcache:
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError as err:
            raise SystemExit("DeepCache is not installed: pip install -e '.[bench]' (or pass --no-deepcache)") from err
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        table["DeepCache, interval 3"] = (helper.enable, helper.disable)
    cache = diffaccel.DeltaCacheConfig(threshold=args.thresholds[0], max_consecutive_skips=args.max_consecutive_skips)
    table["encoder reuse + delta cache"] = features(reuse, cache)
    table["nvfp4"] = features(unet=nvfp4_unet)
    table["nvfp4 + encoder reuse + delta cache"] = features(reuse, cache, unet=nvfp4_unet)
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from diffaccel.micro_models import load_micro_sd
    from diffaccel.shapeworld import Verifier, eval_prompts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts, 10 steps, 1 round")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts per kind (single, relation)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--max-consecutive-skips", type=int, default=2)
    parser.add_argument("--no-deepcache", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.steps, args.rounds = 2, 10, 1
    if args.prompts < 1 or args.steps < 3 or args.rounds < 1:
        raise ValueError("--prompts >= 1, --steps >= 3 and --rounds >= 1 are needed")
    torch.set_num_threads(args.threads)
    prompts = eval_prompts("single", args.prompts, seed=0, split="heldout") + \
        eval_prompts("relation", args.prompts, seed=0, split="heldout")
    pipe = load_micro_sd()
    pipe.set_progress_bar_config(disable=True)
    table = variants(pipe, args)
    seconds: dict[str, list[float]] = {name: [] for name in table}
    images: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, (setup, teardown) in table.items():
            setup()
            try:
                start = time.perf_counter()
                out = pipe(prompts, num_inference_steps=args.steps, guidance_scale=5.0, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images
                elapsed = time.perf_counter() - start
                if round_index == 0:
                    images[name] = out
                    features = getattr(pipe, "acceleration_stats", None)
                    stats[name] = features.to_dict()["features"] if features is not None else {}
            finally:
                teardown()
            if round_index:
                seconds[name].append(elapsed)
        print(f"round {round_index}/{args.rounds} done", flush=True)
    verifier = Verifier()
    baseline = statistics.median(seconds["untouched"])
    rows: dict[str, Any] = {}
    for name in table:
        results = verifier.verify(images[name], prompts)
        median = statistics.median(seconds[name])
        rows[name] = {
            "median_seconds": median, "speedup": baseline / median, "seconds": seconds[name],
            "accuracy": sum(r.passed for r in results) / len(results),
            "mean_score": sum(r.score for r in results) / len(results),
            "psnr_vs_untouched": psnr(images[name], images["untouched"]), "features": stats.get(name, {}),
        }
        skipped = stats.get(name, {}).get("delta_cache", {}).get("skipped_fraction")
        print(f"{name:38s} {median:7.2f} s {rows[name]['speedup']:5.2f}x  accuracy {rows[name]['accuracy']:.3f}  "
              f"score {rows[name]['mean_score']:.3f}  PSNR {rows[name]['psnr_vs_untouched']:6.2f} dB"
              + (f"  blocks skipped {skipped:.2f}" if skipped is not None else ""), flush=True)
    report = {"device": f"cpu ({platform.machine()}, {args.threads} torch threads)", "model": "micro-sd",
              "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
              "prompts": prompts, "variants": rows}
    out = args.out or REPO / "bench" / "results" / "micro_sd_acceleration" / ("micro_sd_acceleration_quick.json" if args.quick
                                                    else "micro_sd_acceleration_cpu.json")
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
