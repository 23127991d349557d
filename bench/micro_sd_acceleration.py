"""Speed and quality of the step-skipping features on the trained micro-SD, side by side.

On the bundled micro-SD (the only trained model here) with held-out ShapeWorld prompts,
``diffaccel.evaluate`` runs every variant on the same prompts and seeds: the untouched pipeline,
encoder reuse (Faster Diffusion's schedule), the temporal delta cache at several thresholds,
DeepCache (the peer, ``pip install -e ".[bench]"``), NVFP4 weights and everything composed.
Quality is the ShapeWorld verifier's accuracy (all criteria met) and mean score, and PSNR against
the untouched images of the same seed; speed is evaluate's: a warm-up call per variant, then one
batched call of every prompt per seed and variant, interleaved seed by seed (each seed is one
timing round; ``--rounds N`` runs seeds 0..N-1), and the speedup is the median over rounds of
untouched / variant seconds. One torch thread: on the shared 2-core CPU a second thread makes
timings swing. Writes ``bench/results/micro_sd_acceleration/micro_sd_acceleration_cpu.json``
and evaluate's run folder (samples, report, plots) under ``out/bench-runs/micro_sd_acceleration/``.

    python bench/micro_sd_acceleration.py               # 32 prompts, 25 DDIM steps, 3 rounds (~8 min)
    python bench/micro_sd_acceleration.py --quick       # smoke run

NVFP4 on the CPU runs the kernels' reference path (it dequantizes at every call), so its time
here is not a speed claim; it is in the table for the quality of the composition.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import torch

from benchkit import recorded_features, round_seeds, run_folder, write_report

REPO = pathlib.Path(__file__).resolve().parents[1]


def variants(args: argparse.Namespace) -> dict[str, Any]:
    """name -> what ``diffaccel.evaluate`` attaches (configs, or a peer's spec)."""
    import diffaccel
    from diffaccel.quantization import QuantizationConfig

    nvfp4 = QuantizationConfig("nvfp4", min_weight_numel=0)
    reuse = diffaccel.EncoderReuseConfig("faster-diffusion", parallel=False)
    table: dict[str, Any] = {"encoder-reuse": reuse}
    for threshold in args.thresholds:
        table[f"delta-cache-{threshold:g}"] = diffaccel.DeltaCacheConfig(
            threshold=threshold, max_consecutive_skips=args.max_consecutive_skips)
    if not args.no_deepcache:
        table["deepcache-3"] = "deepcache:interval=3"
    cache = diffaccel.DeltaCacheConfig(threshold=args.thresholds[0], max_consecutive_skips=args.max_consecutive_skips)
    table["encoder-reuse_delta-cache"] = [reuse, cache]
    table["nvfp4"] = nvfp4
    table["nvfp4_encoder-reuse_delta-cache"] = [nvfp4, reuse, cache]
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import diffaccel
    from diffaccel.micro_models import load_micro_sd
    from diffaccel.shapeworld import eval_prompts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts, 10 steps, 1 round")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts per kind (single, relation)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3, help="seeds, one interleaved timing round each")
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
    table = variants(args)
    call = {"num_inference_steps": args.steps, "guidance_scale": 5.0}
    seeds = round_seeds([0], args.rounds)
    out_dir = run_folder("micro_sd_acceleration", "quick" if args.quick else "full")
    summary = diffaccel.evaluate(pipe, prompts, table, out_dir=out_dir, seeds=seeds,
                                 metrics=["psnr", "verifier", "verifier_score"], batch_size=len(prompts), **call)
    rows: dict[str, Any] = {}
    for name, row in summary["variants"].items():
        features = recorded_features(out_dir, name, seeds[0]) or {}
        metrics = row["metrics"]
        rows[name] = {
            "spec": row["spec"], "speedup": row["speedup"], "seconds_median": row["seconds_median"],
            "nfe_mean": row["nfe_mean"], "weight_bytes": row["weight_bytes"],
            "accuracy": metrics["verifier"]["mean"], "mean_score": metrics["verifier_score"]["mean"],
            "psnr_vs_untouched": metrics["psnr"]["mean"] if name != "untouched" else None,
            "metrics": metrics, "features": features,
        }
        skipped = features.get("delta_cache", {}).get("skipped_fraction")
        psnr = rows[name]["psnr_vs_untouched"]
        print(f"{name:32s} {row['seconds_median']:7.3f} s/sample {row['speedup']:5.2f}x  "
              f"accuracy {rows[name]['accuracy']:.3f}  score {rows[name]['mean_score']:.3f}  "
              f"PSNR {'-' if psnr is None else f'{psnr:6.2f} dB'}"
              + (f"  blocks skipped (seed {seeds[0]}) {skipped:.2f}" if skipped is not None else ""), flush=True)
    report = {"device": summary["device"], "model": "micro-sd", "timing": summary["timing"],
              "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
              "seeds": seeds, "prompts": prompts, "variants": rows}
    out = args.out or REPO / "bench" / "results" / "micro_sd_acceleration" / ("micro_sd_acceleration_quick.json" if args.quick
                                                    else "micro_sd_acceleration_cpu.json")
    write_report(report, out, default=float)
    return report


if __name__ == "__main__":
    main()
