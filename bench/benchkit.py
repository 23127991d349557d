"""Helpers the benchmark scripts share: evaluate's run folders, seeds, feature statistics, JSON reports.

The scripts run as ``python bench/NAME.py``, which puts this folder on ``sys.path``. Timing,
interleaving and fidelity (PSNR, the verifier) are ``diffaccel.evaluate``'s; what is here is what
the scripts need around it.

Example:
    >>> round_seeds([0], 3), round_seeds([4, 9], 3), round_seeds([0, 1], 1)
    ([0, 1, 2], [4, 9, 10], [0, 1])
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import torch

#: Where the scripts put ``diffaccel.evaluate``'s run folders (``out/`` is gitignored).
RUNS = pathlib.Path(__file__).resolve().parents[1] / "out" / "bench-runs"


def run_folder(script: str, *parts: str) -> pathlib.Path:
    """``out/bench-runs/<script>/<parts...>``, emptied: every benchmark run measures afresh (a run
    folder would otherwise resume from, and reuse the timings of, an earlier run of the same spec)."""
    path = RUNS.joinpath(script, *parts)
    if path.exists():
        shutil.rmtree(path)
    return path


def round_seeds(seeds: Sequence[int], rounds: int) -> list[int]:
    """``seeds``, extended with the next integers to at least ``rounds`` seeds: the seeds of a run
    whose every seed is one interleaved timing round (``diffaccel.evaluate`` times batch by batch)."""
    out = list(seeds)
    while len(out) < rounds:
        out.append(max(out) + 1)
    return out


def feature_stats(pipe: Any, configs: Sequence[Any], prompts: Sequence[str], seed: int,
                  **call: Any) -> dict[str, Any]:
    """``pipe.acceleration_stats`` (per feature, as dicts) of one call with ``configs`` attached, on
    ``prompts`` with ``seed`` for each (as ``diffaccel.evaluate`` seeds a batch): the statistics of
    that batch, which ``evaluate``'s records do not keep."""
    from diffaccel.evaluation.attachments import FeatureAttachment
    from diffaccel.evaluation.variants import Variant

    attachment = FeatureAttachment(pipe, Variant("stats", "stats", tuple(configs)))
    attachment.attach()
    try:
        pipe(list(prompts), generator=[torch.Generator("cpu").manual_seed(seed) for _ in prompts],
             output_type="np", **call)
        return pipe.acceleration_stats.to_dict()["features"]
    finally:
        attachment.detach()


def write_report(report: dict[str, Any], path: str | os.PathLike, **dump_kwargs: Any) -> str:
    """Write ``report`` as indented JSON to ``path`` (folders created), print and return the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, **dump_kwargs)
        handle.write("\n")
    print(f"wrote {path}")
    return path
