"""Pool the FK-against-best-of-N tables of several ``bench/steering.py`` runs (e.g. one per seed range)
and say whether the difference is more than noise.

Every row of a steering table keeps ``passed``: one verifier pass flag per (seed, prompt), in the
same order for every method of a run. Pooling the runs pairs FK k and best-of-k on the same
(seed, prompt) and reports each pass rate, the paired difference and its bootstrap 95% interval
(resampling (seed, prompt) pairs).

Usage:
    python bench/steering_pool.py bench/results/steering/steering_micro_sd_cpu_64_fk_ess.json \\
        bench/results/steering/steering_micro_sd_cpu_64_fk_ess_seed1.json \\
        --out bench/results/steering/steering_micro_sd_pooled.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import paired_difference, write_report  # noqa: E402


def pool(tables: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Concatenate each row's ``passed`` flags over ``tables`` (rows present in all of them)."""
    names = [name for name in tables[0] if all("passed" in table.get(name, {}) for table in tables)]
    return {name: [flag for table in tables for flag in table[name]["passed"]] for name in names}


def scaling_tables(paths: list[str], label: str, steer: str) -> list[dict[str, Any]]:
    """The ``scaling`` table of ``label`` (image / video) steered on ``steer`` from each result file."""
    tables = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
        try:
            tables.append(result[label][f"steer={steer}"]["scaling"])
        except KeyError as error:
            raise SystemExit(f"{path} has no {label} run steered on {steer} ({error})") from None
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="bench/steering.py JSON files")
    parser.add_argument("--label", default="image", choices=("image", "video"))
    parser.add_argument("--steer", default="shapeworld", choices=("shapeworld", "clip"))
    parser.add_argument("--out", default=None, help="write the pooled report here (JSON)")
    args = parser.parse_args(argv)
    passed = pool(scaling_tables(args.results, args.label, args.steer))
    ks = sorted(int(name.split("=")[1]) for name in passed if name.startswith("fk k="))
    report: dict[str, Any] = {"results": args.results, "label": args.label, "steer": args.steer,
                              "pass_rate": {name: sum(flags) / len(flags) for name, flags in passed.items()},
                              "fk_minus_best_of_k": {}}
    for k in ks:
        fk, best = passed.get(f"fk k={k}"), passed.get(f"best-of-{k}")
        if fk is not None and best is not None:
            report["fk_minus_best_of_k"][str(k)] = paired_difference(fk, best)
    for name, rate in report["pass_rate"].items():
        print(f"  {name:12s} pass rate {rate:.3f} ({len(passed[name])} samples)")
    for k, row in report["fk_minus_best_of_k"].items():
        print(f"  FK - best-of-{k}: {row['difference']:+.3f}, 95% CI [{row['ci95'][0]:+.3f}, {row['ci95'][1]:+.3f}]"
              f" (FK only {row['a_only']}, best-of-{k} only {row['b_only']})")
    if args.out:
        write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
