"""Metrics of an evaluation: fidelity to the untouched output (PSNR, SSIM), FID with a pluggable
feature extractor, and the per-variant summary of the per-sample records.

The image metrics are torchmetrics' own (``pip install torchmetrics``, in diffaccel's ``eval`` and
``bench`` extras); it is imported when a metric is first used.

Example::

    >>> import numpy as np
    >>> image = np.full((16, 16, 3), 0.5)
    >>> psnr(image, image), ssim(image, image)
    (inf, 1.0)
"""

from __future__ import annotations

import math
import os
import pathlib
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["FeatureFID", "psnr", "ssim", "summarize"]

ArrayLike = np.ndarray | torch.Tensor


def _torchmetrics_functional() -> Any:
    try:
        import torchmetrics.functional.image as functional
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("diffaccel's image metrics need torchmetrics: pip install torchmetrics "
                                  "(or diffaccel[eval])") from error
    return functional


def _as_batch(images: ArrayLike, name: str = "images") -> torch.Tensor:
    """``images`` (one HWC image or an NCHW batch, numpy or torch, values in [0, 1]) as a float64 NCHW tensor."""
    tensor = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if tensor.ndim == 3:
        tensor = tensor.permute(2, 0, 1).unsqueeze(0)
    elif tensor.ndim != 4:
        raise ValueError(f"{name} must be one HWC image or an NCHW batch, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be floats in [0, 1], got dtype {tensor.dtype}")
    tensor = tensor.detach().to("cpu", torch.float64)
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError(f"{name} must be in [0, 1], got values in [{tensor.min():.3g}, {tensor.max():.3g}]")
    return tensor


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_batch(a, "a"), _as_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def psnr(a: ArrayLike, b: ArrayLike) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (``10 log10(1 / MSE)`` over all the
    pixels of the inputs); ``inf`` for identical images.

    ``a`` and ``b``: one HWC image or an NCHW batch each (numpy or torch), of the same shape.

    Example::

        >>> import numpy as np
        >>> a = np.zeros((8, 8, 3))
        >>> round(psnr(a, a + 0.1), 3)   # MSE 0.01
        20.0
    """
    a, b = _pair(a, b)
    return float(_torchmetrics_functional().peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(a: ArrayLike, b: ArrayLike) -> float:
    """Structural similarity of images in [0, 1] (torchmetrics' SSIM: 11x11 Gaussian window,
    averaged over the batch); 1 for identical images. Images must be at least 11 pixels a side.

    Example::

        >>> import numpy as np
        >>> a = np.random.default_rng(0).random((1, 3, 32, 32))
        >>> ssim(a, a)
        1.0
        >>> ssim(a, 1 - a) < 0
        True
    """
    a, b = _pair(a, b)
    return float(_torchmetrics_functional().structural_similarity_index_measure(a, b, data_range=1.0))


class FeatureFID:
    """Fréchet distance between the feature statistics of two image sets (torchmetrics'
    ``FrechetInceptionDistance``), with the feature extractor chosen here and named in
    :attr:`extractor_name` (FIDs of different extractors are not comparable: report the name).

    Args:
        extractor: a module taking ``(N, 3, H, W)`` float images in [0, 1] and returning ``(N, D)``
            features. None: micro-CLIP's image embeddings (``MicroClipFeatures``, offline).
        name: :attr:`extractor_name` for a custom ``extractor`` (default: its class name).
        inception_weights: instead of ``extractor``, the path of a local file holding the
            Inception-v3 FID weights (torch-fidelity's ``pt_inception-2015-12-05`` file); nothing
            is downloaded.

    Example::

        >>> import torch
        >>> fid = FeatureFID(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()), name="pool2x2")
        >>> images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> fid.update(images, real=True); fid.update(images, real=False)
        >>> abs(fid.compute()) < 1e-6, fid.extractor_name
        (True, 'pool2x2')
        >>> FeatureFID(inception_weights="no/such/file.pth")
        Traceback (most recent call last):
        ...
        FileNotFoundError: inception_weights: no file at no/such/file.pth. ...
    """

    def __init__(self, extractor: torch.nn.Module | None = None, *, name: str | None = None,
                 inception_weights: str | os.PathLike | None = None) -> None:
        if inception_weights is not None and (extractor is not None or name is not None):
            raise ValueError("pass either extractor (and name) or inception_weights, not both")
        kwargs: dict[str, Any] = {}
        if inception_weights is not None:
            path = pathlib.Path(inception_weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"inception_weights: no file at {path}. Pass the local path of the Inception-v3 FID weights "
                    "(torch-fidelity's pt_inception-2015-12-05 file); nothing is downloaded. Without them, "
                    "FeatureFID() uses micro-CLIP's image features.")
            feature: int | torch.nn.Module = 2048
            kwargs["feature_extractor_weights_path"] = str(path)
            self.extractor_name = f"inception-v3-2048 ({path.name})"
        elif extractor is None:
            from ..micro_models import MicroClipFeatures, load_micro_clip

            feature, self.extractor_name = MicroClipFeatures(load_micro_clip()[0]), "micro-clip"
        else:
            feature, self.extractor_name = extractor, name or type(extractor).__name__
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError("FeatureFID needs torchmetrics: pip install torchmetrics (or diffaccel[eval])"
                                      ) from error
        try:
            # sync_on_compute=False: rank 0 computes over every sample itself (the others are not in this call)
            self.metric = FrechetInceptionDistance(feature=feature, normalize=True, sync_on_compute=False, **kwargs)
        except ModuleNotFoundError as error:  # torchmetrics' Inception path needs torch-fidelity
            raise ModuleNotFoundError(f"FID with Inception weights needs torch-fidelity: pip install torch-fidelity "
                                      f"({error})") from error

    def update(self, images: ArrayLike, real: bool) -> None:
        """Add images (one HWC image or an NCHW batch in [0, 1]) to the real or the generated set.

        Example::

            >>> import torch
            >>> fid = FeatureFID(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), name="rgb")
            >>> fid.update(torch.zeros(4, 3, 2, 2), real=True)
            >>> int(fid.metric.real_features_num_samples)
            4
        """
        self.metric.update(_as_batch(images).float(), real=real)

    def compute(self) -> float:
        """The FID between the two sets so far (each needs at least two images).

        Example::

            >>> import torch
            >>> fid = FeatureFID(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), name="rgb")
            >>> fid.update(torch.zeros(4, 3, 1, 1), real=True); fid.update(torch.ones(4, 3, 1, 1), real=False)
            >>> round(fid.compute(), 3)   # the means are 1 apart in each of 3 channels
            3.0
        """
        return float(self.metric.compute())

    def reset(self) -> None:
        """Forget both sets.

        Example::

            >>> import torch
            >>> fid = FeatureFID(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), name="rgb")
            >>> fid.update(torch.zeros(4, 3, 1, 1), real=True); fid.reset()
            >>> int(fid.metric.real_features_num_samples)
            0
        """
        self.metric.reset()


def _interval(values: Sequence[float], confidence: float) -> dict[str, Any]:
    """Mean and normal ``confidence`` interval of ``values`` (bounds None below two finite values)."""
    mean = float(np.mean(values))
    if len(values) < 2 or not all(math.isfinite(value) for value in values):
        return {"n": len(values), "mean": mean, "low": None, "high": None}
    half = statistics.NormalDist().inv_cdf(0.5 + confidence / 2) * statistics.stdev(values) / math.sqrt(len(values))
    return {"n": len(values), "mean": mean, "low": mean - half, "high": mean + half}


def summarize(records: Iterable[Mapping[str, Any]], metric_names: Iterable[str], *, baseline: str = "untouched",
              confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per variant (in order of first appearance): the number of records, the mean and normal
    ``confidence`` interval of each per-sample metric in ``metric_names`` (records without it, or
    with None, are skipped), the median of ``seconds`` and ``speedup``: the ``baseline`` variant's
    median seconds over this variant's (None without timings).

    Example::

        >>> records = [{"variant": "untouched", "seconds": 2.0, "psnr": float("inf")},
        ...            {"variant": "untouched", "seconds": 2.2, "psnr": float("inf")},
        ...            {"variant": "fast", "seconds": 1.0, "psnr": 30.0},
        ...            {"variant": "fast", "seconds": 1.1, "psnr": 32.0}]
        >>> summary = summarize(records, ["psnr"])
        >>> summary["fast"]["speedup"], summary["untouched"]["speedup"]
        (2.0, 1.0)
        >>> {key: round(value, 3) for key, value in summary["fast"]["metrics"]["psnr"].items()}
        {'n': 2, 'mean': 31.0, 'low': 29.04, 'high': 32.96}
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    names = list(metric_names)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["variant"], []).append(record)
    medians = {}
    for variant, group in groups.items():
        seconds = [record["seconds"] for record in group if record.get("seconds") is not None]
        medians[variant] = statistics.median(seconds) if seconds else None
    reference = medians.get(baseline)
    summary: dict[str, dict[str, Any]] = {}
    for variant, group in groups.items():
        metrics = {}
        for name in names:
            values = [float(record[name]) for record in group if record.get(name) is not None]
            if values:
                metrics[name] = _interval(values, confidence)
        median = medians[variant]
        speedup = reference / median if reference is not None and median else None
        summary[variant] = {"n": len(group), "metrics": metrics, "seconds_median": median, "speedup": speedup}
    return summary
