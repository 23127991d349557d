"""Explore cheap, render exact: best-of-N and FK explored on an accelerated copy of micro-SD, the
winner rendered on the exact pipeline, against the same methods run plainly, with wall times.

For every (prompt, seed) it runs, with the verifier as the reward:

- ``plain``: best-of-``k`` (and FK, :meth:`~diffaccel.FKSteeringConfig.measured`) on the exact pipeline;
- ``cheap``: the same with ``--cheap-k`` candidates explored on a :func:`~diffaccel.steering.replay.cheap_copy`
  of it (``--cheap``: encoder reuse on a key-step schedule), only the winner rendered exactly;

and reports pass rates of the samples a user gets (the exact renders), median seconds per prompt,
and the rank agreement of the exploration: every cheap best-of candidate is also rendered exactly
(from its noise tape) to see whether the cheap winner is the exact winner, and whether a cheap
winner that passes still passes when rendered exactly.

Usage:
    python bench/explore_cheap.py --prompts 16 --seeds 0,1 --k 4 --cheap-k 6 --cheap uniform:2
    python bench/explore_cheap.py --quick      # tiny random SD: a smoke test, numbers meaningless

Writes ``bench/results/steering/explore_cheap_<tag>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import write_report  # noqa: E402
import diffaccel  # noqa: E402
from diffaccel.rewards import ShapeWorldReward  # noqa: E402
from diffaccel.shapeworld import eval_prompts  # noqa: E402
from diffaccel.steering import FKSteeringConfig, steer  # noqa: E402
from diffaccel.steering.replay import cheap_copy, render_exact  # noqa: E402
from steering import load  # noqa: E402


def _run(pipe: Any, config: FKSteeringConfig, reward: Any, prompt: str, call: dict[str, Any], explore: Any = None
         ) -> tuple[Any, float]:
    begin = time.perf_counter()
    out = steer(pipe, config, reward, explore_pipe=explore)(prompt, output_type="pt", **call)
    return out, time.perf_counter() - begin


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=4, help="candidates of the plain methods")
    parser.add_argument("--cheap-k", type=int, default=6, help="candidates explored on the cheap copy")
    parser.add_argument("--cheap", default="uniform:2", help="the cheap copy's encoder-reuse key-step schedule")
    parser.add_argument("--split", default="heldout", choices=("heldout", "train"))
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.seeds, args.steps, args.k, args.cheap_k = 1, "0", 4, 2, 3
    pipe, call = load(None if args.quick else "micro-sd", "sd", "cpu")
    cheap = cheap_copy(pipe, diffaccel.EncoderReuseConfig(args.cheap))
    verifier = ShapeWorldReward()
    prompts = eval_prompts("relation", args.prompts, seed=0, split=args.split)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[dict[str, float]]] = {"plain best-of": [], "cheap best-of": [], "plain fk": [], "cheap fk": []}
    agreement: list[dict[str, float]] = []
    for seed in seeds:
        for prompt in tqdm(prompts, desc=f"seed {seed}"):
            kwargs = dict(call, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(seed))
            best_of = FKSteeringConfig(num_particles=args.k, resample_every=0, final_correction=False, seed=seed,
                                       record_noise=True)
            out, seconds = _run(pipe, best_of, verifier, prompt, dict(kwargs))
            rows["plain best-of"].append({"pass": float(out.rewards[out.best_indices[0]] >= 1), "seconds": seconds})
            cheap_config = FKSteeringConfig(num_particles=args.cheap_k, resample_every=0, final_correction=False,
                                            seed=seed)
            kwargs["generator"] = torch.Generator().manual_seed(seed)
            out, seconds = _run(pipe, cheap_config, verifier, prompt, dict(kwargs), cheap)
            rows["cheap best-of"].append({"pass": float(out.exact_rewards[0] >= 1), "seconds": seconds})
            everything = render_exact(pipe, [prompt] * args.cheap_k, [out.tape] * args.cheap_k,
                                      list(range(args.cheap_k)), kwargs)
            exact_scores = verifier(everything, [prompt] * args.cheap_k)
            winner = out.best_indices[0]
            agreement.append({
                "same_winner": float(int(torch.argmax(exact_scores)) == winner),
                "winner_in_exact_top": float(exact_scores[winner] >= exact_scores.max()),
                "cheap_pass": float(out.rewards[winner] >= 1), "exact_pass": float(exact_scores[winner] >= 1),
            })
            for label, k, explore in (("plain fk", args.k, None), ("cheap fk", args.cheap_k, cheap)):
                kwargs["generator"] = torch.Generator().manual_seed(seed)
                config = FKSteeringConfig.measured(k, args.steps, seed=seed, record_noise=True)
                out, seconds = _run(pipe, config, verifier, prompt, dict(kwargs), explore)
                final = out.exact_rewards[0] if explore is not None else out.rewards[out.best_indices[0]]
                rows[label].append({"pass": float(final >= 1), "seconds": seconds})
    summary = {name: {"pass_rate": statistics.fmean(r["pass"] for r in rs),
                      "median_seconds": statistics.median(r["seconds"] for r in rs), "n": len(rs)}
               for name, rs in rows.items()}
    cheap_passes = [a for a in agreement if a["cheap_pass"]]
    report = {
        "args": vars(args), "threads": torch.get_num_threads(),
        "note": "quick: tiny RANDOM pipeline, numbers meaningless" if args.quick else "",
        "summary": summary,
        "rank_agreement": {
            "same_winner": statistics.fmean(a["same_winner"] for a in agreement),
            "winner_in_exact_top": statistics.fmean(a["winner_in_exact_top"] for a in agreement),
            "cheap_winner_passes_still_passes": (statistics.fmean(a["exact_pass"] for a in cheap_passes)
                                                 if cheap_passes else None),
            "n": len(agreement)},
        "rows": rows, "agreement": agreement, "prompts": prompts,
    }
    for name, row in summary.items():
        print(f"{name:14s} pass {row['pass_rate']:.3f}  median {row['median_seconds']:.2f} s  (n={row['n']})")
    print("rank agreement:", {k: v for k, v in report["rank_agreement"].items()})
    tag = args.tag or ("quick" if args.quick else f"micro_sd_{args.split}_cpu")
    write_report(report, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                                      "results", "steering", f"explore_cheap_{tag}.json"))
    return report


if __name__ == "__main__":
    main()
