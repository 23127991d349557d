"""The per-sample metrics of ``diffaccel eval`` on ShapeWorld ground truth, blanks and clips."""

from __future__ import annotations

import numpy as np
import pytest

from diffaccel.evaluation.scoring import SampleScorer, check_metrics, frechet_distances, to_uint8
from diffaccel.shapeworld import ShapeWorldClips, ShapeWorldImages


def _renders(n: int, kind: str = "relation") -> tuple[np.ndarray, list[str]]:
    data = ShapeWorldImages("heldout", length=n, kinds=(kind,))
    pixels, captions = zip(*(data[i] for i in range(n)))
    images = np.stack([((p.numpy().transpose(1, 2, 0) + 1) / 2) for p in pixels])
    return to_uint8(images), list(captions)


def test_default_metrics_follow_the_prompts():
    assert check_metrics(None, ["a red circle"]) == ["psnr", "ssim", "verifier", "verifier_score", "clip_score", "fid"]
    assert "verifier" not in check_metrics(None, ["a photo of a cat"])
    assert check_metrics(["psnr", "psnr", "fid"], ["a cat"]) == ["psnr", "fid"]
    with pytest.raises(ValueError, match="unknown reward"):
        check_metrics(["reward:nosuch"], ["a cat"])


def test_verifier_and_clip_score_tell_ground_truth_from_blanks_and_wrong_captions():
    images, captions = _renders(8)
    scorer = SampleScorer(["verifier", "verifier_score", "clip_score", "psnr"])
    truth = scorer.score(images, captions, reference=None)
    assert all(row["verifier"] == 1.0 and row["psnr"] is None for row in truth)
    assert {k for k in truth[0] if k.startswith("verifier.")} >= {"verifier.object_0_color", "verifier.relation"}
    blank = scorer.score(np.full_like(images, 255), captions, reference=images)
    assert all(row["verifier"] == 0.0 and row["verifier_score"] < 1 for row in blank)
    assert all(np.isfinite(row["psnr"]) and row["psnr"] < 20 for row in blank)
    shuffled = scorer.score(images, captions[1:] + captions[:1], reference=None)
    matched = np.mean([row["clip_score"] for row in truth])
    assert matched > np.mean([row["clip_score"] for row in shuffled])


def test_clips_are_scored_frame_by_frame():
    data = ShapeWorldClips("heldout", length=2)
    clips, captions = zip(*(data[i] for i in range(2)))
    uint8 = to_uint8(np.stack([((c.numpy().transpose(0, 2, 3, 1) + 1) / 2) for c in clips]))
    rows = SampleScorer(["verifier", "psnr", "ssim"]).score(uint8, list(captions), reference=uint8)
    assert [row["verifier"] for row in rows] == [1.0, 1.0]
    assert all(row["psnr"] == float("inf") and row["ssim"] == pytest.approx(1.0) for row in rows)


def test_fid_is_about_zero_on_the_same_set_and_larger_on_another_distribution():
    images, _ = _renders(16)
    singles, _ = _renders(16, kind="single")
    distances = frechet_distances({"untouched": images, "same": images.copy(), "other": singles,
                                   "noise": np.random.default_rng(0).integers(0, 255, images.shape, dtype=np.uint8)},
                                  "untouched")
    assert distances["untouched"] is None and abs(distances["same"]) < 1e-2
    assert distances["noise"] > distances["other"] > 10 * max(abs(distances["same"]), 1e-3)
