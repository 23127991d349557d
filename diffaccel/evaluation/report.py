"""The report of an evaluation run: ``report.md`` and PNG plots drawn from its ``summary.json``.

:func:`write_report` puts at the top of a run folder ``report.md`` (:func:`render_report`: one
table row per variant, the run's notes, links to the plots), ``pareto_<metric>.png`` per quality
metric (:func:`plot_pareto`: quality against speedup, with the :func:`pareto_front`), when the
variants' weights differ in size (quantization, weight peers), ``memory_<metric>.png``
(:func:`plot_memory`: quality against weight bytes) and, when the run has steering variants,
``reward_vs_nfe_<metric>.png`` (:func:`plot_reward_vs_nfe`).

The plots need matplotlib (``pip install matplotlib``), imported when a plot is first drawn and
used through its Agg canvas only (no pyplot, no change to the process's backend). Every file is
written to a temporary file and moved into place with :func:`os.replace`.

Example::

    >>> import json, pathlib, tempfile
    >>> summary = {"model": "micro-sd", "metrics": ["verifier"], "variants": {
    ...     "untouched": {"spec": "none", "kind": "untouched", "speedup": 1.0,
    ...                   "metrics": {"verifier": {"n": 2, "mean": 0.5, "low": 0.4, "high": 0.6}}},
    ...     "dc3": {"spec": "deepcache:interval=3", "kind": "peer", "speedup": 1.7,
    ...             "metrics": {"verifier": {"n": 2, "mean": 0.45, "low": 0.3, "high": 0.6}}}}}
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> [path.name for path in write_report(folder, json.loads(json.dumps(summary)))]
    ['pareto_verifier.png', 'report.md']
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .runs import _atomic_write

__all__ = ["pareto_front", "plot_memory", "plot_pareto", "plot_reward_vs_nfe", "render_report", "write_report"]

# marker, colour and size of each variant kind on the plots; other kinds get _OTHER_STYLE
_KIND_STYLES = {"untouched": ("*", "black", 14), "diffaccel": ("o", "tab:blue", 7), "peer": ("s", "tab:orange", 7),
                "steering": ("^", "tab:green", 8)}
_OTHER_STYLE = ("D", "tab:gray", 7)


@dataclass(frozen=True)
class _Point:
    """One variant on a plot: its name and kind, its x value and its metric's mean and interval."""

    name: str
    kind: str
    x: float
    mean: float
    low: float | None
    high: float | None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """The indices of the ``(speed, quality)`` points no other point dominates (at least as fast
    and at least as good, and better in one), ordered by speed, then index. Equal points do not
    dominate each other: all of them are on the front.

    Example::

        >>> pareto_front([(1.0, 0.9), (2.0, 0.7), (1.5, 0.6), (3.0, 0.7), (1.0, 0.9)])
        [0, 4, 3]
    """
    front = [i for i, (speed, quality) in enumerate(points)
             if not any(other_speed >= speed and other_quality >= quality and (other_speed, other_quality) != (speed, quality)
                        for other_speed, other_quality in points)]
    return sorted(front, key=lambda i: (points[i][0], i))


def render_report(summary: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """The markdown of a run's ``summary``: a title line (model, prompts, seeds, steps), a table
    with one row per variant in the summary's order (speedup, median seconds, mean NFE, weight
    and peak memory MB, FID, and each of ``summary["main_metrics"]`` (default ``summary["metrics"]``)
    as ``mean [low, high]``; ``-``
    where missing), the run's notes, and an image link to each of ``plots`` (paths relative to
    the report).

    Example::

        >>> summary = {"model": "micro-sd", "prompts": {"source": "shapeworld:relation:heldout:16", "count": 16},
        ...            "seeds": [0, 1], "call": {"num_inference_steps": 25}, "metrics": ["psnr"],
        ...            "variants": {"untouched": {"spec": "none", "kind": "untouched", "speedup": 1.0,
        ...                                       "metrics": {"psnr": {"n": 32, "mean": float("inf")}}},
        ...                         "dc3": {"spec": "deepcache:interval=3", "kind": "peer", "speedup": 1.6621,
        ...                                 "weight_bytes": 3456789, "metrics": {}}}}
        >>> print(render_report(summary))
        # micro-sd: 16 prompts (shapeworld:relation:heldout:16), seeds 0, 1, 25 steps
        <BLANKLINE>
        | variant | spec | kind | speedup | seconds | NFE | weight MB | peak memory MB | FID | psnr |
        | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
        | untouched | none | untouched | 1.00x | - | - | - | - | - | inf |
        | dc3 | deepcache:interval=3 | peer | 1.66x | - | - | 3.457 | - | - | - |
        <BLANKLINE>
        - Call: num_inference_steps=25.
    """
    metrics = list(summary.get("main_metrics", summary.get("metrics")) or [])
    header = ["variant", "spec", "kind", "speedup", "seconds", "NFE", "weight MB", "peak memory MB", "FID", *metrics]
    lines = [f"# {_title(summary)}", "", _row(header), _row(["---"] * 3 + ["---:"] * (len(header) - 3))]
    for name, variant in (summary.get("variants") or {}).items():
        speedup = variant.get("speedup")
        weight = variant.get("weight_bytes")
        cells = [name, variant.get("spec") or "-", variant.get("kind") or "-",
                 "-" if speedup is None else f"{speedup:.2f}x", _number(variant.get("seconds_median")),
                 _number(variant.get("nfe_mean")), _number(None if weight is None else weight / 1e6),
                 _number(variant.get("peak_memory_mb")), _number(variant.get("fid"))]
        cells += [_interval_cell((variant.get("metrics") or {}).get(metric)) for metric in metrics]
        lines.append(_row(cells))
    lines += ["", *_notes(summary)]
    if plots:
        lines += ["", "## Plots"]
        for plot in plots:
            lines += ["", f"![{pathlib.PurePath(plot).stem}]({plot})"]
    return "\n".join(lines) + "\n"


def plot_pareto(summary: Mapping[str, Any], path: str | os.PathLike[str], metric: str) -> pathlib.Path:
    """Draw ``metric``'s mean (its interval as error bars) against speedup for every variant with
    both finite, to the PNG ``path``: each point labelled with its variant's name, marker and
    colour by kind (the untouched variant a black star, or a dotted line at its speedup when its
    ``metric`` is not finite, like PSNR's inf), and the :func:`pareto_front` as a step line.
    Raises ValueError when no variant has both.

    Example::

        >>> import pathlib, tempfile
        >>> summary = {"model": "micro-sd", "variants": {
        ...     "untouched": {"kind": "untouched", "speedup": 1.0, "metrics": {"psnr": {"mean": float("inf")}}},
        ...     "dc3": {"kind": "peer", "speedup": 1.7, "metrics": {"psnr": {"mean": 31.0, "low": 29.0, "high": 33.0}}},
        ...     "ours": {"kind": "diffaccel", "speedup": 1.9, "metrics": {"psnr": {"mean": 32.0}}}}}
        >>> plot_pareto(summary, pathlib.Path(tempfile.mkdtemp()) / "pareto_psnr.png", "psnr").name
        'pareto_psnr.png'
    """
    points = _points(summary, metric, "speedup", kinds=None)
    if not points:
        raise ValueError(f"no variant has a finite speedup and a finite {metric!r} mean to plot")
    figure = _new_figure()
    axes = figure.add_subplot()
    _scatter(axes, points)
    front = [points[i] for i in pareto_front([(point.x, point.mean) for point in points])]
    axes.step([point.x for point in front], [point.mean for point in front], where="pre", color="gray", linestyle="--",
              linewidth=1, marker="o", markersize=14, markerfacecolor="none", label="Pareto front")
    untouched = _untouched(summary)
    if untouched is not None and untouched.get("speedup") is not None and all(point.kind != "untouched" for point in points):
        mean = ((untouched.get("metrics") or {}).get(metric) or {}).get("mean")
        axes.axvline(untouched["speedup"], color="black", linestyle=":", linewidth=1,
                     label=f"untouched ({metric} {_number(mean)})")
    axes.set_xlabel("speedup over untouched (x)")
    axes.set_ylabel(f"{metric} (mean, interval as error bars)")
    axes.set_title(f"{metric} vs speedup: {summary.get('model', '?')}")
    return _save(figure, axes, path)


def plot_memory(summary: Mapping[str, Any], path: str | os.PathLike[str], metric: str) -> pathlib.Path | None:
    """Draw ``metric``'s mean (its interval as error bars) against the denoiser's weight megabytes
    for every variant with both finite, to the PNG ``path``, with the front of the variants no
    other beats in both (smaller and better) as a step line. None, writing nothing, when the
    variants' weights do not differ in size (no quantized variant: nothing to compare).

    Example::

        >>> import pathlib, tempfile
        >>> summary = {"model": "micro-sd", "variants": {
        ...     "untouched": {"kind": "untouched", "weight_bytes": 8e6, "metrics": {"psnr": {"mean": float("inf")}}},
        ...     "q8": {"kind": "peer", "weight_bytes": 4e6, "metrics": {"psnr": {"mean": 45.0}}},
        ...     "mixed": {"kind": "diffaccel", "weight_bytes": 3e6, "metrics": {"psnr": {"mean": 46.0}}}}}
        >>> plot_memory(summary, pathlib.Path(tempfile.mkdtemp()) / "memory_psnr.png", "psnr").name
        'memory_psnr.png'
    """
    points = [replace(point, x=point.x / 1e6) for point in _points(summary, metric, "weight_bytes", kinds=None)]
    if len({point.x for point in points}) < 2:
        return None
    figure = _new_figure()
    axes = figure.add_subplot()
    _scatter(axes, points)
    front = sorted((points[i] for i in pareto_front([(-point.x, point.mean) for point in points])), key=lambda p: p.x)
    axes.step([point.x for point in front], [point.mean for point in front], where="post", color="gray",
              linestyle="--", linewidth=1, marker="o", markersize=14, markerfacecolor="none", label="front")
    axes.set_xlabel("denoiser weights (MB, as stored)")
    axes.set_ylabel(f"{metric} (mean, interval as error bars)")
    axes.set_title(f"{metric} vs weight bytes: {summary.get('model', '?')}")
    return _save(figure, axes, path)


def plot_reward_vs_nfe(summary: Mapping[str, Any], path: str | os.PathLike[str], metric: str) -> pathlib.Path | None:
    """Draw ``metric``'s mean (its interval as error bars) against the mean number of network
    evaluations per sample for the steering variants and the untouched one (a black star), to the
    PNG ``path``. None, writing nothing, when no steering variant has a finite NFE and ``metric``.

    Example::

        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> summary = {"model": "micro-sd", "variants": {
        ...     "untouched": {"kind": "untouched", "nfe_mean": 50.0, "metrics": {"verifier": {"mean": 0.5}}},
        ...     "fk4": {"kind": "steering", "nfe_mean": 200.0, "metrics": {"verifier": {"mean": 0.8}}}}}
        >>> plot_reward_vs_nfe(summary, folder / "reward_vs_nfe_verifier.png", "verifier").name
        'reward_vs_nfe_verifier.png'
        >>> del summary["variants"]["fk4"]
        >>> print(plot_reward_vs_nfe(summary, folder / "none.png", "verifier"))
        None
    """
    points = _points(summary, metric, "nfe_mean", kinds=("steering", "untouched"))
    if all(point.kind != "steering" for point in points):
        return None
    figure = _new_figure()
    axes = figure.add_subplot()
    _scatter(axes, points)
    axes.set_xlabel("network evaluations per sample (mean)")
    axes.set_ylabel(f"{metric} (mean, interval as error bars)")
    axes.set_title(f"{metric} vs NFE: {summary.get('model', '?')}")
    return _save(figure, axes, path)


#: Metrics of fidelity to the untouched sample (no reward-vs-NFE plot).
_FIDELITY = ("psnr", "ssim")


def write_report(run_dir: str | os.PathLike[str], summary: Mapping[str, Any]) -> list[pathlib.Path]:
    """Write ``report.md`` and the plots of ``summary`` at the top of ``run_dir``; return the paths
    written (plots first, in ``summary["metrics"]`` order, then ``report.md``).

    Each metric of ``summary["main_metrics"]`` (default: ``summary["metrics"]``) that at least two
    variants have with a finite mean and a finite speedup gets ``pareto_<metric>.png`` (and
    ``memory_<metric>.png`` when the variants' weight bytes differ, see :func:`plot_memory`); when some
    steering variant has it with a finite NFE (and it is not PSNR or SSIM), also
    ``reward_vs_nfe_<metric>.png``. Characters of a metric's name outside letters,
    digits, ``.``, ``_`` and ``-`` become ``_`` in file names. Without matplotlib only
    ``report.md`` is written (saying so) and a warning is emitted.

    Example::

        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> summary = {"model": "micro-sd", "metrics": ["verifier.color"], "variants": {
        ...     "untouched": {"kind": "untouched", "speedup": 1.0, "nfe_mean": 50.0,
        ...                   "metrics": {"verifier.color": {"mean": 0.5}}},
        ...     "fk4": {"kind": "steering", "speedup": 0.3, "nfe_mean": 200.0,
        ...             "metrics": {"verifier.color": {"mean": 0.8}}}}}
        >>> [path.name for path in write_report(folder, summary)]
        ['pareto_verifier.color.png', 'reward_vs_nfe_verifier.color.png', 'report.md']
        >>> "![pareto_verifier.color](pareto_verifier.color.png)" in (folder / "report.md").read_text()
        True
    """
    folder = pathlib.Path(run_dir)
    written: list[pathlib.Path] = []
    missing = None
    try:
        _matplotlib()
    except ModuleNotFoundError as error:
        missing = f"{error}; report.md is written without its plots"
        warnings.warn(missing, stacklevel=2)
    if missing is None:
        for metric in summary.get("main_metrics", summary.get("metrics")) or []:
            if len(_points(summary, metric, "speedup", kinds=None)) < 2:
                continue
            stem = re.sub(r"[^\w.-]", "_", metric)
            written.append(plot_pareto(summary, folder / f"pareto_{stem}.png", metric))
            memory = plot_memory(summary, folder / f"memory_{stem}.png", metric)
            if memory is not None:
                written.append(memory)
            if metric in _FIDELITY:  # how far steering moves a sample is not a reward
                continue
            reward = plot_reward_vs_nfe(summary, folder / f"reward_vs_nfe_{stem}.png", metric)
            if reward is not None:
                written.append(reward)
    text = render_report(summary, [path.name for path in written])
    if missing is not None:
        text += f"\nPlots not drawn: {missing}.\n"
    report = folder / "report.md"
    _atomic_write(report, text.encode("utf-8"))
    return [*written, report]


def _title(summary: Mapping[str, Any]) -> str:
    """The report's title line: model, prompts, seeds, steps (each only where the summary has it)."""
    parts = []
    prompts = summary.get("prompts") or {}
    if prompts.get("count") is not None:
        source = f" ({prompts['source']})" if prompts.get("source") else ""
        parts.append(f"{prompts['count']} prompts{source}")
    seeds = list(summary.get("seeds") or [])
    if seeds:
        shown = seeds if len(seeds) <= 6 else [*seeds[:3], "...", seeds[-1]]
        parts.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, shown))}"
                     + (f" ({len(seeds)} seeds)" if len(seeds) > 6 else ""))
    steps = (summary.get("call") or {}).get("num_inference_steps")
    if steps is not None:
        parts.append(f"{steps} steps")
    return f"{summary.get('model', '?')}: {', '.join(parts)}" if parts else str(summary.get("model", "?"))


def _notes(summary: Mapping[str, Any]) -> list[str]:
    """The report's notes: pipeline and call settings, timing, FID features, then processes, device and threads."""
    call = summary.get("call") or {}
    notes = [("Pipeline", summary.get("pipeline")),
             ("Call", ", ".join(f"{key}={value}" for key, value in call.items())),
             ("Timing", summary.get("timing")), ("FID features", summary.get("fid_features"))]
    lines = [f"- {label}: {str(value).rstrip('.')}." for label, value in notes if value not in (None, "")]
    run = "; ".join(f"{key}: {summary[key]}" for key in ("processes", "device", "threads") if summary.get(key) is not None)
    if run:
        lines.append(f"- {run[0].upper()}{run[1:]}.")
    return lines


def _row(cells: Sequence[str]) -> str:
    """A markdown table row, with ``|`` inside cells escaped."""
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _number(value: float | None) -> str:
    """``value`` to four significant digits; ``inf`` / ``nan`` as such; ``-`` for None."""
    if value is None:
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(float(value))


def _interval_cell(stats: Mapping[str, Any] | None) -> str:
    """A metric's ``mean [low, high]`` (just the mean without bounds; ``-`` without a mean)."""
    if not stats or stats.get("mean") is None:
        return "-"
    if stats.get("low") is None or stats.get("high") is None:
        return _number(stats["mean"])
    return f"{_number(stats['mean'])} [{_number(stats['low'])}, {_number(stats['high'])}]"


def _untouched(summary: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The summary's untouched variant (its kind ``untouched``), or None."""
    return next((variant for variant in (summary.get("variants") or {}).values() if variant.get("kind") == "untouched"), None)


def _points(summary: Mapping[str, Any], metric: str, x_field: str, kinds: Sequence[str] | None) -> list[_Point]:
    """The variants (of ``kinds``; all when None) with a finite ``x_field`` and ``metric`` mean."""
    points = []
    for name, variant in (summary.get("variants") or {}).items():
        stats = (variant.get("metrics") or {}).get(metric) or {}
        x, mean = variant.get(x_field), stats.get("mean")
        if kinds is not None and variant.get("kind") not in kinds:
            continue
        if x is None or mean is None or not (math.isfinite(x) and math.isfinite(mean)):
            continue
        points.append(_Point(name, variant.get("kind") or "-", float(x), float(mean), stats.get("low"), stats.get("high")))
    return points


def _matplotlib() -> tuple[type, type]:
    """matplotlib's ``Figure`` and Agg ``FigureCanvasAgg``, imported here on first use."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("diffaccel's report plots need matplotlib: pip install matplotlib") from error
    return Figure, FigureCanvasAgg


def _new_figure() -> Any:
    """A new matplotlib figure drawn on an Agg canvas."""
    figure_class, canvas_class = _matplotlib()
    figure = figure_class(figsize=(7, 5), dpi=100)
    canvas_class(figure)
    return figure


def _scatter(axes: Any, points: Sequence[_Point]) -> None:
    """Each point with its interval as error bars, styled by kind (one legend entry per kind), labelled by name."""
    for kind in dict.fromkeys(point.kind for point in points):
        marker, colour, size = _KIND_STYLES.get(kind, _OTHER_STYLE)
        group = [point for point in points if point.kind == kind]
        errors = [[point.mean - point.low if point.low is not None else 0.0 for point in group],
                  [point.high - point.mean if point.high is not None else 0.0 for point in group]]
        axes.errorbar([point.x for point in group], [point.mean for point in group], yerr=errors, fmt=marker,
                      color=colour, markersize=size, capsize=3, linestyle="none", label=kind)
    for point in points:
        axes.annotate(point.name, (point.x, point.mean), textcoords="offset points", xytext=(6, 6), fontsize=8)


def _save(figure: Any, axes: Any, path: str | os.PathLike[str]) -> pathlib.Path:
    """Add the legend and grid, and write ``figure`` as a PNG to ``path`` atomically."""
    axes.legend(fontsize=8)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    target = pathlib.Path(path)
    _atomic_write(target, buffer.getvalue())
    return target
