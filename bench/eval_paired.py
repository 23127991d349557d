"""Paired differences between the variants of a ``diffaccel eval`` run folder, with bootstrap 95%
intervals: is a variant's verifier pass rate (or PSNR, or any per-sample metric) the same as a
reference variant's, within the run's paired noise?

Every (prompt, seed) sample of a variant pairs with the reference's sample of the same prompt and
seed (the run draws both from the same initial noise), so prompt difficulty cancels out.

    python bench/eval_paired.py out/eval/unet-ddim-25 --against deepcache-3 --metrics verifier,psnr
    python bench/eval_paired.py out/eval/unet-ddim-25 --against deepcache-3 --out bench/results/eval/unet-ddim-25/paired.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import paired_difference, write_report  # noqa: E402

from diffaccel.evaluation import RunFolder  # noqa: E402


def run_records(run: pathlib.Path) -> list[dict[str, Any]]:
    """The sample records of a run folder, through :class:`~diffaccel.evaluation.RunFolder` (its
    shards merged, a torn last line dropped), opened with the folder's own ``run.json``."""
    spec = run / "run.json"
    if not spec.is_file():
        raise SystemExit(f"{run}: not a diffaccel eval run folder (no run.json)")
    return RunFolder(run, json.loads(spec.read_text(encoding="utf-8"))).records()


def per_sample(records: list[dict[str, Any]], metric: str) -> dict[str, dict[tuple[int, int], float]]:
    """variant -> (prompt index, seed) -> the metric's value, for the records that have one."""
    values: dict[str, dict[tuple[int, int], float]] = {}
    for record in records:
        value = record.get(metric)
        if value is not None:
            values.setdefault(record["variant"], {})[(record["prompt_index"], record["seed"])] = float(value)
    return values


def compare(run: pathlib.Path, against: str, metrics: list[str]) -> dict[str, Any]:
    """For each metric and variant: the paired difference ``variant - against`` over their shared samples."""
    records = run_records(run)
    table: dict[str, Any] = {}
    for metric in metrics:
        values = per_sample(records, metric)
        if against not in values:
            raise SystemExit(f"{run}: no {metric!r} values for the reference variant {against!r}")
        reference = values[against]
        for variant, samples in values.items():
            if variant == against:
                continue
            keys = sorted(set(samples) & set(reference))
            if keys:
                row = paired_difference([samples[k] for k in keys], [reference[k] for k in keys])
                table.setdefault(metric, {})[variant] = {"mean": sum(samples[k] for k in keys) / len(keys), **row}
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=pathlib.Path, help="a diffaccel eval run folder")
    parser.add_argument("--against", default="untouched", help="the reference variant (default untouched)")
    parser.add_argument("--metrics", default="verifier,psnr", help="comma-separated per-sample metrics")
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)
    table = compare(args.run, args.against, [m for m in args.metrics.split(",") if m])
    for metric, rows in table.items():
        print(f"\n{metric}: variant - {args.against} (paired, bootstrap 95% interval)")
        for variant, row in rows.items():
            low, high = row["ci95"]
            print(f"  {variant:24s} mean {row['mean']:8.3f}  diff {row['difference']:+8.3f}  [{low:+.3f}, {high:+.3f}]"
                  f"  n={row['pairs']}")
    report = {"run": str(args.run), "against": args.against, "paired": table}
    if args.out:
        write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
