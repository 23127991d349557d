"""Evaluation metrics: PSNR and SSIM against their definitions, FID with micro-CLIP features,
the per-variant summary."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from diffaccel.evaluation.metrics import FeatureFID, psnr, ssim, summarize
from diffaccel.shapeworld import render, sample_scene


def _images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, (2, 3, 24, 24))


def test_psnr_is_inf_for_identical_images_and_follows_its_formula():
    a = _images(0)
    assert psnr(a, a) == math.inf
    assert psnr(a[0].transpose(1, 2, 0), torch.from_numpy(a[0].transpose(1, 2, 0))) == math.inf  # HWC, numpy or torch
    noisy = a + np.random.default_rng(1).uniform(-0.1, 0.1, a.shape)
    expected = 10 * math.log10(1 / np.mean((a - noisy) ** 2))
    assert psnr(a, noisy) == pytest.approx(expected, rel=1e-5)
    assert psnr(a, a + 0.05) == pytest.approx(20 * math.log10(1 / 0.05), rel=1e-5)
    assert psnr(a[:1], noisy[:1]) == pytest.approx(10 * math.log10(1 / np.mean((a[:1] - noisy[:1]) ** 2)), rel=1e-5)


def test_image_metrics_refuse_bad_inputs():
    a = _images(0)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ssim(a, a * 2)
    with pytest.raises(ValueError, match="floats"):
        psnr(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="HWC image or an NCHW batch"):
        psnr(a[0, 0], a[0, 0])


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    a = _images(0)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(2)
    scores = [ssim(a, np.clip(a + rng.normal(0, sigma, a.shape), 0, 1)) for sigma in (0.02, 0.1, 0.3)]
    assert 1 > scores[0] > scores[1] > scores[2]


def _shapeworld(seed: int, n: int = 64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = [np.asarray(render(sample_scene(rng, "train"), size=64), dtype=np.float32) / 255 for _ in range(n)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def micro_clip_fid():
    return FeatureFID()


def _fid(metric: FeatureFID, real: torch.Tensor, fake: torch.Tensor) -> float:
    metric.reset()
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute()


def test_fid_with_micro_clip_features_separates_distributions(micro_clip_fid):
    assert micro_clip_fid.extractor_name == "micro-clip"
    shapes, other_shapes = _shapeworld(0), _shapeworld(1)
    noise = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    same = _fid(micro_clip_fid, shapes, shapes)
    resampled = _fid(micro_clip_fid, shapes, other_shapes)
    different = _fid(micro_clip_fid, shapes, noise)
    assert abs(same) < 1e-3 * different
    assert resampled < different / 10  # another sample of the same world is closer than noise
    assert different > 0


def test_fid_refuses_missing_inception_weights_and_names_custom_extractors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        FeatureFID(inception_weights=tmp_path / "pt_inception.pth")
    with pytest.raises(ValueError, match="not both"):
        FeatureFID(torch.nn.Flatten(), inception_weights=tmp_path / "pt_inception.pth")
    pooled = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert FeatureFID(pooled).extractor_name == "Sequential"


def test_summarize_gives_means_intervals_and_speedups():
    rng = np.random.default_rng(0)
    records = []
    for variant, seconds, center in (("untouched", 2.0, None), ("fast", 0.5, 30.0), ("faster", 0.25, 25.0)):
        for index in range(9):
            record = {"variant": variant, "prompt_index": index, "seed": 0, "seconds": seconds + 0.01 * index}
            if center is not None:
                record["psnr"] = center + float(rng.normal())
            records.append(record)
    records.append({"variant": "fast", "prompt_index": 9, "seed": 0, "seconds": None, "psnr": None})
    summary = summarize(records, ["psnr", "clip_score"])
    assert list(summary) == ["untouched", "fast", "faster"]
    psnrs = [r["psnr"] for r in records if r["variant"] == "fast" and r["psnr"] is not None]
    half = 1.959964 * statistics.stdev(psnrs) / 3
    stats = summary["fast"]["metrics"]["psnr"]
    assert stats["n"] == 9 and summary["fast"]["n"] == 10
    assert stats["mean"] == pytest.approx(np.mean(psnrs))
    assert (stats["low"], stats["high"]) == pytest.approx((np.mean(psnrs) - half, np.mean(psnrs) + half), rel=1e-6)
    assert "psnr" not in summary["untouched"]["metrics"] and "clip_score" not in summary["fast"]["metrics"]
    assert summary["untouched"]["speedup"] == 1.0
    assert summary["fast"]["seconds_median"] == pytest.approx(0.54)
    assert summary["fast"]["speedup"] == pytest.approx(2.04 / 0.54)
    assert summary["faster"]["speedup"] == pytest.approx(2.04 / 0.29)
    assert summarize(records, ["psnr"], baseline="missing")["fast"]["speedup"] is None
    with pytest.raises(ValueError, match="confidence"):
        summarize(records, ["psnr"], confidence=1.5)
