"""The report of an evaluation run: the markdown table and notes, the Pareto front, the PNG plots,
the report without matplotlib, no reward-vs-NFE plot without steering variants."""

from __future__ import annotations

import builtins
import copy
import json
import math
import re

import pytest
from PIL import Image

from diffaccel.evaluation import report
from diffaccel.evaluation.report import pareto_front, plot_memory, plot_pareto, plot_reward_vs_nfe, render_report, write_report

TIMING = ("one process; a warm-up call per variant, then the variants interleaved batch by batch on the same inputs; "
          "speedup = median over batches of untouched seconds / variant seconds")
FID_FEATURES = "micro-CLIP image features (not comparable with Inception FID)"


def _stats(mean: float, low: float | None, high: float | None) -> dict:
    return {"n": 32, "mean": mean, "low": low, "high": high}


def _summary() -> dict:
    """A run's summary as ``diffaccel eval`` writes it, through JSON (so inf is JSON's Infinity)."""
    summary = {
        "model": "micro-sd", "pipeline": "StableDiffusionPipeline",
        "prompts": {"source": "shapeworld:relation:heldout:16", "count": 16}, "seeds": [0, 1],
        "call": {"num_inference_steps": 25, "guidance_scale": 5.0}, "device": "cpu", "threads": 2, "processes": 1,
        "timing": TIMING, "fid_features": FID_FEATURES,
        "metrics": ["verifier", "verifier.color", "clip_score", "psnr", "hps"],
        "variants": {
            "untouched": {"spec": "none", "kind": "untouched", "n": 32, "speedup": 1.0, "seconds_median": 0.52,
                          "nfe_mean": 50.0, "weight_bytes": 3456789, "peak_memory_mb": 812.0, "fid": None,
                          "metrics": {"verifier": _stats(0.5, 0.33, 0.67), "verifier.color": _stats(0.6, 0.5, 0.7),
                                      "clip_score": _stats(0.31, 0.3, 0.32), "psnr": _stats(math.inf, None, None)}},
            "zz_ours": {"spec": "delta_cache:threshold=0.1", "kind": "diffaccel", "n": 32, "speedup": 1.9,
                        "seconds_median": 0.27368, "nfe_mean": 50.0, "weight_bytes": 1234567, "peak_memory_mb": 790.5,
                        "fid": 10.125, "metrics": {"verifier": _stats(0.48, 0.31, 0.65), "psnr": _stats(30.2, 29.2, 31.2),
                                                   "clip_score": _stats(0.305, None, None)}},
            "dc3": {"spec": "deepcache:interval=3|grid", "kind": "peer", "n": 32, "speedup": 1.6612, "seconds_median": 0.313,
                    "nfe_mean": 50.0, "weight_bytes": 3456789, "peak_memory_mb": 820.0, "fid": 12.3,
                    "metrics": {"verifier": _stats(0.45, 0.28, 0.62), "psnr": _stats(28.1, 27.1, 29.1)}},
            "worse": {"spec": "delta_cache:threshold=0.5", "kind": "diffaccel", "n": 32, "speedup": 1.5,
                      "seconds_median": 0.35, "nfe_mean": 50.0,
                      "metrics": {"verifier": _stats(0.4, 0.23, 0.57), "psnr": _stats(25.0, 24.0, 26.0),
                                  "hps": _stats(0.2, 0.1, 0.3)}},
            "fk4": {"spec": "fk:particles=4", "kind": "steering", "n": 32, "speedup": 0.26, "seconds_median": 2.0,
                    "nfe_mean": 200.0, "metrics": {"verifier": _stats(0.8, 0.7, 0.9), "verifier.color": _stats(0.85, 0.8, 0.9),
                                                   "clip_score": _stats(0.32, 0.31, 0.33), "psnr": _stats(14.0, 13.0, 15.0)}},
        },
    }
    return json.loads(json.dumps(summary))


def _without_steering(summary: dict) -> dict:
    summary = copy.deepcopy(summary)
    summary["variants"] = {name: variant for name, variant in summary["variants"].items() if variant["kind"] != "steering"}
    return summary


def _cells(text: str) -> list[list[str]]:
    """The cells of the markdown table's rows (header and separator included), ``\\|`` read as ``|``."""
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.replace("\\|", "|") for cell in re.split(r"(?<!\\) \| ", row[2:-2])] for row in rows]


def _captured_figures(monkeypatch) -> list:
    """The matplotlib figures the plotting functions draw, kept for inspection."""
    figures = []
    new_figure = report._new_figure

    def keep():
        figure = new_figure()
        figures.append(figure)
        return figure

    monkeypatch.setattr(report, "_new_figure", keep)
    return figures


def test_the_table_has_one_row_per_variant_in_order_with_its_figures_formatted():
    summary = _summary()
    text = render_report(summary)
    assert text.splitlines()[0] == "# micro-sd: 16 prompts (shapeworld:relation:heldout:16), seeds 0, 1, 25 steps"
    header, separator, *rows = _cells(text)
    assert header == ["variant", "spec", "kind", "speedup", "seconds", "NFE", "weight MB", "peak memory MB", "FID",
                      "verifier", "verifier.color", "clip_score", "psnr", "hps"]
    assert len(separator) == len(header)
    assert [row[0] for row in rows] == list(summary["variants"])  # the run's order, not sorted
    assert all(len(row) == len(header) for row in rows)
    by_name = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_name["untouched"] == {
        "variant": "untouched", "spec": "none", "kind": "untouched", "speedup": "1.00x", "seconds": "0.52", "NFE": "50",
        "weight MB": "3.457", "peak memory MB": "812", "FID": "-", "verifier": "0.5 [0.33, 0.67]",
        "verifier.color": "0.6 [0.5, 0.7]", "clip_score": "0.31 [0.3, 0.32]", "psnr": "inf", "hps": "-"}
    assert by_name["dc3"]["spec"] == "deepcache:interval=3|grid"  # escaped in the markdown, one cell
    assert "deepcache:interval=3\\|grid" in text
    assert (by_name["dc3"]["speedup"], by_name["dc3"]["seconds"], by_name["dc3"]["FID"]) == ("1.66x", "0.313", "12.3")
    assert (by_name["zz_ours"]["seconds"], by_name["zz_ours"]["weight MB"], by_name["zz_ours"]["peak memory MB"],
            by_name["zz_ours"]["FID"]) == ("0.2737", "1.235", "790.5", "10.12")
    assert by_name["zz_ours"]["clip_score"] == "0.305"  # a mean without bounds
    assert by_name["zz_ours"]["psnr"] == "30.2 [29.2, 31.2]"
    assert (by_name["worse"]["weight MB"], by_name["worse"]["peak memory MB"], by_name["worse"]["FID"]) == ("-", "-", "-")
    assert (by_name["fk4"]["speedup"], by_name["fk4"]["NFE"]) == ("0.26x", "200")
    notes = text.split("\n\n")[2].splitlines()
    assert notes == ["- Pipeline: StableDiffusionPipeline.", "- Call: num_inference_steps=25, guidance_scale=5.0.",
                     f"- Timing: {TIMING}.", f"- FID features: {FID_FEATURES}.", "- Processes: 1; device: cpu; threads: 2."]
    assert "## Plots" not in text  # no plot files given, no links


def test_the_report_links_the_plots_it_is_given_by_relative_path():
    text = render_report(_summary(), ["pareto_verifier.png", "reward_vs_nfe_verifier.png"])
    assert "![pareto_verifier](pareto_verifier.png)" in text
    assert "![reward_vs_nfe_verifier](reward_vs_nfe_verifier.png)" in text


def test_pareto_front_keeps_exactly_the_points_nothing_dominates():
    points = [(1.0, 0.5), (1.66, 0.45), (1.9, 0.48), (1.5, 0.4), (0.26, 0.8)]
    assert pareto_front(points) == [4, 0, 2]  # by speed; 1.66x and 1.5x are dominated by 1.9x
    assert pareto_front([]) == []
    assert pareto_front([(2.0, 0.1)]) == [0]


def test_pareto_front_ties():
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # equal points do not dominate each other
    assert pareto_front([(1.0, 0.5), (1.0, 0.4)]) == [0]  # as fast, worse: dominated
    assert pareto_front([(2.0, 0.5), (1.0, 0.5)]) == [0]  # as good, slower: dominated
    assert pareto_front([(1.0, 0.5), (2.0, 0.3), (1.0, 0.5), (2.0, 0.3), (1.5, 0.3)]) == [0, 2, 1, 3]


def test_the_pareto_plot_draws_every_variant_and_the_front_through_the_undominated_ones(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    path = plot_pareto(_summary(), tmp_path / "pareto_verifier.png", "verifier")
    assert path == tmp_path / "pareto_verifier.png" and path.is_file()
    axes = figures[-1].axes[0]
    assert axes.get_title() == "verifier vs speedup: micro-sd"
    front = next(line for line in axes.get_lines() if line.get_label() == "Pareto front")
    assert list(front.get_xdata()) == [0.26, 1.0, 1.9] and list(front.get_ydata()) == [0.8, 0.5, 0.48]
    assert front.get_drawstyle() == "steps-pre"
    assert [container.get_label() for container in axes.containers] == ["untouched", "diffaccel", "peer", "steering"]
    assert sorted(text.get_text() for text in axes.texts) == sorted(_summary()["variants"])
    peer, ours = axes.containers[2], axes.containers[1]
    assert peer.lines[0].get_marker() != ours.lines[0].get_marker()
    assert peer.lines[0].get_color() != ours.lines[0].get_color()


def test_the_psnr_plot_leaves_out_the_untouched_point_and_marks_its_speed(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    plot_pareto(_summary(), tmp_path / "pareto_psnr.png", "psnr")
    axes = figures[-1].axes[0]
    assert "untouched" not in [container.get_label() for container in axes.containers]
    assert "untouched" not in [text.get_text() for text in axes.texts]
    marker = next(line for line in axes.get_lines() if line.get_label() == "untouched (psnr inf)")
    assert list(marker.get_xdata()) == [1.0, 1.0]
    front = next(line for line in axes.get_lines() if line.get_label() == "Pareto front")
    assert list(front.get_xdata()) == [1.9]  # 1.9x with the best PSNR dominates the rest


def test_a_pareto_plot_without_any_finite_point_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'nothing'"):
        plot_pareto(_summary(), tmp_path / "pareto_nothing.png", "nothing")
    assert not (tmp_path / "pareto_nothing.png").exists()


def test_write_report_writes_the_report_and_valid_pngs_for_the_metrics_with_two_finite_points(tmp_path):
    written = write_report(tmp_path, _summary())
    assert [path.name for path in written] == [
        "pareto_verifier.png", "memory_verifier.png", "reward_vs_nfe_verifier.png", "pareto_verifier.color.png",
        "reward_vs_nfe_verifier.color.png", "pareto_clip_score.png", "memory_clip_score.png", "reward_vs_nfe_clip_score.png",
        "pareto_psnr.png", "memory_psnr.png", "report.md"]  # PSNR is no reward; verifier.color has one weight size
    assert all(path.parent == tmp_path for path in written)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in written)  # no temp files left
    for path in written[:-1]:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == (700, 500)
            image.load()
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # drawn, not blank
        assert path.stat().st_size > 10_000
    text = (tmp_path / "report.md").read_text()
    assert text == render_report(_summary(), [path.name for path in written[:-1]])
    for path in written[:-1]:
        assert f"]({path.name})" in text


def test_without_matplotlib_the_report_is_still_written_and_a_warning_says_why(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match="pip install matplotlib"):
        written = write_report(tmp_path, _summary())
    assert written == [tmp_path / "report.md"]
    assert [path.name for path in tmp_path.iterdir()] == ["report.md"]
    text = (tmp_path / "report.md").read_text()
    assert text.startswith(render_report(_summary()))
    assert "Plots not drawn" in text and "pip install matplotlib" in text
    with pytest.raises(ModuleNotFoundError, match="pip install matplotlib"):
        plot_pareto(_summary(), tmp_path / "pareto_verifier.png", "verifier")


def test_without_steering_variants_no_reward_vs_nfe_plot_is_written(tmp_path):
    summary = _without_steering(_summary())
    assert plot_reward_vs_nfe(summary, tmp_path / "reward_vs_nfe_verifier.png", "verifier") is None
    assert not (tmp_path / "reward_vs_nfe_verifier.png").exists()
    written = write_report(tmp_path, summary)
    assert [path.name for path in written] == ["pareto_verifier.png", "memory_verifier.png", "pareto_clip_score.png",
                                               "memory_clip_score.png", "pareto_psnr.png", "memory_psnr.png", "report.md"]
    assert not list(tmp_path.glob("reward_vs_nfe_*"))


def test_the_reward_vs_nfe_plot_shows_steering_and_untouched_only(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    plot_reward_vs_nfe(_summary(), tmp_path / "reward_vs_nfe_verifier.png", "verifier")
    axes = figures[-1].axes[0]
    assert [container.get_label() for container in axes.containers] == ["untouched", "steering"]
    assert sorted(text.get_text() for text in axes.texts) == ["fk4", "untouched"]
    xs = sorted(x for container in axes.containers for x in container.lines[0].get_xdata())
    assert xs == [50.0, 200.0]
    assert axes.get_title() == "verifier vs NFE: micro-sd"


def test_main_metrics_choose_the_table_columns_and_the_plots(tmp_path):
    summary = dict(_summary(), main_metrics=["psnr"])
    header = render_report(summary).splitlines()[2]
    assert "psnr" in header and "verifier" not in header and "clip_score" not in header
    assert [path.name for path in write_report(tmp_path, summary)] == ["pareto_psnr.png", "memory_psnr.png", "report.md"]


def test_the_memory_plot_puts_quality_against_weight_bytes_with_the_front(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    summary = _summary()
    summary["variants"]["worse"]["weight_bytes"] = 999_999  # smaller still, and worse: on the front too
    plot_memory(summary, tmp_path / "memory_psnr.png", "psnr")
    axes = figures[-1].axes[0]
    xs = sorted(x for container in axes.containers for x in container.lines[0].get_xdata())
    assert xs == pytest.approx([0.999999, 1.234567, 3.456789])  # MB; the untouched PSNR (inf) is left out
    front = next(line for line in axes.lines if line.get_label() == "front")
    assert list(front.get_xdata()) == pytest.approx([0.999999, 1.234567])  # dc3: bigger and worse than zz_ours
    for variant in summary["variants"].values():
        variant["weight_bytes"] = 5
    assert plot_memory(summary, tmp_path / "same.png", "psnr") is None and not (tmp_path / "same.png").exists()
