"""Evaluation of pipelines and accelerations: run folders, per-sample records, metrics.

- :mod:`.runs`: :class:`RunFolder` (``run.json``, ``samples.jsonl``, sample files, ``summary.json``;
  resumable after a kill, sharded across processes), :func:`dist_env`.
- :mod:`.metrics`: :func:`psnr`, :func:`ssim`, :class:`FeatureFID`, :func:`summarize`.
- :mod:`.prompts`: :func:`load_prompts` reads prompt lists, files and built-in sets into :class:`PromptRecord` s.
- :mod:`.variants`: :func:`parse_variants` turns ``NAME=SPEC`` strings and grids into :class:`Variant` s;
  :func:`check_variant_applies`, :func:`missing_peer_packages`.
"""

from .metrics import FeatureFID, psnr, ssim, summarize
from .prompts import PromptFileError, PromptRecord, load_prompts
from .runs import DuplicateSampleError, RunFolder, RunSpecMismatch, SampleKey, dist_env
from .variants import Variant, VariantSpecError, check_variant_applies, missing_peer_packages, parse_variant, parse_variants

__all__ = [
    "DuplicateSampleError",
    "FeatureFID",
    "PromptFileError",
    "PromptRecord",
    "RunFolder",
    "RunSpecMismatch",
    "SampleKey",
    "Variant",
    "VariantSpecError",
    "check_variant_applies",
    "dist_env",
    "load_prompts",
    "missing_peer_packages",
    "parse_variant",
    "parse_variants",
    "psnr",
    "ssim",
    "summarize",
]
