"""Helpers the benchmark scripts share: evaluate's run folders, seeds, recorded feature statistics, JSON reports.

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


def recorded_features(run_folder: str | os.PathLike, variant: str, seed: int | None = None) -> dict[str, Any] | None:
    """The diffaccel feature statistics (``pipe.acceleration_stats.to_dict()["features"]``) that
    ``diffaccel.evaluate`` recorded in ``<run_folder>/samples.jsonl`` with ``variant``'s first record
    (with ``seed``: its first record of that seed), i.e. of the batch call that made that sample;
    None for a variant without diffaccel features (untouched, peers).

    Raises:
        LookupError: no record of ``variant`` (and ``seed``).

    Example:
        >>> import tempfile
        >>> from diffaccel.evaluation import RunFolder
        >>> folder = RunFolder(tempfile.mkdtemp(), {})
        >>> _ = folder.record("cache", 0, 0, {"features": {"delta_cache": {"skipped_fraction": 0.25}}})
        >>> _ = folder.record("cache", 0, 1, {"features": {"delta_cache": {"skipped_fraction": 0.5}}})
        >>> _ = folder.record("untouched", 0, 0, {"features": None})
        >>> recorded_features(folder.path, "cache"), recorded_features(folder.path, "cache", seed=1)
        ({'delta_cache': {'skipped_fraction': 0.25}}, {'delta_cache': {'skipped_fraction': 0.5}})
        >>> recorded_features(folder.path, "untouched") is None
        True
    """
    path = pathlib.Path(run_folder) / "samples.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("variant") == variant and seed in (None, record["seed"]):
            return record.get("features")
    raise LookupError(f"{path}: no record of variant {variant!r}" + ("" if seed is None else f" and seed {seed}"))


def write_report(report: dict[str, Any], path: str | os.PathLike, **dump_kwargs: Any) -> str:
    """Write ``report`` as indented JSON to ``path`` (folders created), print and return the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, **dump_kwargs)
        handle.write("\n")
    print(f"wrote {path}")
    return path


def paired_difference(a: Sequence[float], b: Sequence[float], draws: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over paired outcomes (0/1 pass flags or any per-sample metric), with a
    bootstrap 95% interval over the pairs.

    Example:
        >>> paired_difference([1, 1, 0, 1], [1, 0, 0, 1])["difference"]
        0.25
    """
    import torch

    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes need equal, non-zero lengths, got {len(a)} and {len(b)}")
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    picks = torch.randint(len(diff), (draws, len(diff)), generator=torch.Generator().manual_seed(seed))
    means = diff[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"difference": float(diff.mean()), "ci95": [low, high], "pairs": len(diff),
            "a_only": int((diff > 0).sum()), "b_only": int((diff < 0).sum())}
