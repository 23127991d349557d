"""bench/steering_pool.py: pooling steering tables and the paired FK - best-of-N difference."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from steering_pool import main, paired_difference, pool  # noqa: E402


def test_paired_difference_counts_discordant_pairs_and_brackets_the_mean():
    row = paired_difference([1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0])
    assert row["difference"] == pytest.approx(1 / 6)
    assert (row["a_only"], row["b_only"], row["pairs"]) == (2, 1, 6)
    assert row["ci95"][0] <= row["difference"] <= row["ci95"][1]


def test_paired_difference_of_identical_outcomes_is_exactly_zero():
    assert paired_difference([1, 0, 1], [1, 0, 1])["ci95"] == [0.0, 0.0]


def test_paired_difference_rejects_unpaired_outcomes():
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1, 0], [1])


def test_pool_concatenates_rows_present_in_every_table():
    tables = [{"fk k=4": {"passed": [1, 0]}, "best-of-4": {"passed": [0, 0]}},
              {"fk k=4": {"passed": [1]}, "best-of-4": {"passed": [1]}, "fk k=8": {"passed": [1]}}]
    assert pool(tables) == {"fk k=4": [1, 0, 1], "best-of-4": [0, 0, 1]}


def test_main_pools_files_and_writes_the_report(tmp_path):
    paths = []
    for i, (fk, best) in enumerate([([1, 1], [1, 0]), ([0, 1], [0, 1])]):
        path = tmp_path / f"run{i}.json"
        scaling = {"k=1": {"passed": [0, 0]}, "fk k=4": {"passed": fk}, "best-of-4": {"passed": best}}
        path.write_text(json.dumps({"image": {"steer=shapeworld": {"scaling": scaling}}}))
        paths.append(str(path))
    out = tmp_path / "pooled.json"
    report = main([*paths, "--out", str(out)])
    assert report["pass_rate"]["fk k=4"] == pytest.approx(0.75)
    assert report["fk_minus_best_of_k"]["4"]["difference"] == pytest.approx(0.25)
    assert json.loads(out.read_text())["pass_rate"] == report["pass_rate"]
