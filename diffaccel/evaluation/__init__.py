"""Evaluation of pipelines and accelerations: run folders, per-sample records, metrics.

- :mod:`.driver`: :func:`evaluate` (``diffaccel.evaluate``, the ``diffaccel eval`` command), :class:`EvaluationError`.
- :mod:`.attachments`: :func:`build_attachment` binds a variant to a pipeline; :func:`module_bytes`.
- :mod:`.measure`: :func:`measured_call` (seconds, NFE, peak memory of a call).
- :mod:`.scoring`: :class:`SampleScorer` (per-sample metrics), :func:`check_metrics`, :func:`frechet_distances`.
- :mod:`.runs`: :class:`RunFolder` (``run.json``, ``samples.jsonl``, sample files, ``summary.json``;
  resumable after a kill, sharded across processes), :func:`dist_env`.
- :mod:`.metrics`: :func:`psnr`, :func:`ssim`, :class:`FeatureFID`, :func:`summarize`.
- :mod:`.prompts`: :func:`load_prompts` reads prompt lists, files and built-in sets into :class:`PromptRecord` s.
- :mod:`.variants`: :func:`parse_variants` turns ``NAME=SPEC`` strings and grids into :class:`Variant` s;
  :func:`check_variant_applies`, :func:`missing_peer_packages`.
- :mod:`.peers`: :func:`peer_attachment` binds a peer variant to a pipeline as a :class:`PeerAttachment`.
- :mod:`.report`: :func:`write_report` writes ``report.md`` (:func:`render_report`) and PNG plots
  (:func:`plot_pareto`, :func:`plot_reward_vs_nfe`, :func:`pareto_front`) from a run's summary.
"""

from .attachments import build_attachment, module_bytes
from .driver import EvaluationError, evaluate
from .measure import measured_call
from .metrics import FeatureFID, psnr, ssim, summarize
from .peers import PeerAttachment, peer_attachment
from .prompts import PromptFileError, PromptRecord, load_prompts
from .report import pareto_front, plot_pareto, plot_reward_vs_nfe, render_report, write_report
from .runs import DuplicateSampleError, RunFolder, RunSpecMismatch, SampleKey, dist_env
from .scoring import SampleScorer, check_metrics, frechet_distances
from .variants import Variant, VariantSpecError, check_variant_applies, missing_peer_packages, parse_variant, parse_variants

__all__ = [
    "DuplicateSampleError",
    "EvaluationError",
    "SampleScorer",
    "build_attachment",
    "check_metrics",
    "evaluate",
    "frechet_distances",
    "measured_call",
    "module_bytes",
    "FeatureFID",
    "PeerAttachment",
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
    "pareto_front",
    "parse_variant",
    "parse_variants",
    "peer_attachment",
    "plot_pareto",
    "plot_reward_vs_nfe",
    "psnr",
    "render_report",
    "ssim",
    "summarize",
    "write_report",
]
