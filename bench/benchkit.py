"""Helpers the benchmark scripts share: image fidelity and writing their JSON reports.

The scripts run as ``python bench/NAME.py``, which puts this folder on ``sys.path``.

Example:
    >>> import numpy as np
    >>> round(psnr(np.full((2, 2), 0.5), np.full((2, 2), 0.4)), 6)
    20.0
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of float images in [0, 1] against a reference (inf when identical)."""
    mse = float(np.mean((np.asarray(images, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def write_report(report: dict[str, Any], path: str | os.PathLike, **dump_kwargs: Any) -> str:
    """Write ``report`` as indented JSON to ``path`` (folders created), print and return the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, **dump_kwargs)
        handle.write("\n")
    print(f"wrote {path}")
    return path
