"""The metrics of an evaluation, per sample and per variant, and the samples they are computed on.

Every metric is computed on the sample as written to the run folder (8-bit RGB, lossless PNG; a
clip as its frames stacked top to bottom, beside its GIF), so a resumed run, which reads the
untouched reference back from disk, computes exactly what an uninterrupted one does.

Metric names (:data:`SAMPLE_METRICS`, :data:`SET_METRICS`, and ``reward:SPEC`` for any reward of
:func:`diffaccel.rewards.reward_from_spec`, e.g. ``reward:aesthetic:head.pt``):

* ``psnr``, ``ssim``: fidelity to the untouched variant's sample of the same prompt and seed;
* ``verifier`` (all criteria met, 0/1), ``verifier_score`` (the fraction met) and one
  ``verifier.<criterion>`` each: the ShapeWorld verifier, for ShapeWorld prompts;
* ``clip_score``: CLIP score with micro-CLIP (offline) or the model :class:`SampleScorer` is given;
* ``fid``: per variant, Fréchet distance of its samples' features to the untouched variant's.

Example:
    >>> import numpy as np
    >>> scorer = SampleScorer(["psnr", "verifier"])
    >>> red = np.zeros((1, 64, 64, 3), np.uint8); red[0, 20:44, 20:44] = (230, 25, 75)
    >>> scores = scorer.score(red, ["a red square"], reference=red)[0]
    >>> scores["verifier"], scores["psnr"]
    (1.0, inf)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .metrics import FeatureFID, psnr, ssim

__all__ = ["DEFAULT_CLIP_MODEL", "SAMPLE_METRICS", "SET_METRICS", "SampleScorer", "check_metrics",
           "frechet_distances", "shapeworld_prompts", "to_uint8"]

#: Per-sample metrics (besides ``reward:SPEC`` and the verifier's per-criterion scores).
SAMPLE_METRICS: tuple[str, ...] = ("psnr", "ssim", "verifier", "verifier_score", "clip_score")
#: Metrics of a variant's whole sample set.
SET_METRICS: tuple[str, ...] = ("fid",)
#: The CLIP model of ``clip_score`` unless told otherwise (bundled, offline).
DEFAULT_CLIP_MODEL = "transformers-clip:micro-clip"
REWARD_PREFIX = "reward:"


def shapeworld_prompts(prompts: Iterable[str]) -> bool:
    """Whether every prompt is a ShapeWorld caption the verifier can judge.

    Example:
        >>> shapeworld_prompts(["a red circle", "a blue square above a green triangle"]), shapeworld_prompts(["a cat"])
        (True, False)
    """
    from ..shapeworld.prompts import parse_prompt

    try:
        for prompt in prompts:
            parse_prompt(prompt)
    except ValueError:
        return False
    return True


def check_metrics(names: Sequence[str] | None, prompts: Sequence[str]) -> list[str]:
    """The metrics to compute: ``names`` checked (unknown names, a verifier asked for on prompts
    it cannot judge and malformed reward specs raise ``ValueError``), or with ``names=None`` every
    metric that applies offline (the verifier only for ShapeWorld prompts).

    Example:
        >>> check_metrics(None, ["a cat"])
        ['psnr', 'ssim', 'clip_score', 'fid']
        >>> check_metrics(["psnr", "speed"], ["a cat"])
        Traceback (most recent call last):
        ...
        ValueError: unknown metric 'speed'; known: psnr, ssim, verifier, verifier_score, clip_score, fid, reward:SPEC ...
    """
    judged = shapeworld_prompts(prompts)
    if names is None:
        verifier = ["verifier", "verifier_score"] if judged else []
        return ["psnr", "ssim", *verifier, "clip_score", "fid"]
    chosen: list[str] = []
    for name in names:
        if name.startswith(REWARD_PREFIX):
            from ..rewards.spec import check_reward_spec

            check_reward_spec(name[len(REWARD_PREFIX):])
        elif name not in SAMPLE_METRICS + SET_METRICS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(SAMPLE_METRICS + SET_METRICS)}, "
                             f"reward:SPEC (a reward spec, e.g. reward:aesthetic:head.pt)")
        elif name.startswith("verifier") and not judged:
            raise ValueError(f"metric {name!r}: the ShapeWorld verifier judges ShapeWorld captions only, "
                             "and some prompts are not (e.g. use --prompts shapeworld:relation)")
        if name not in chosen:
            chosen.append(name)
    return chosen


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """Float samples in [0, 1] as 8-bit, rounded as diffusers' ``numpy_to_pil`` rounds them.

    Example:
        >>> to_uint8(np.array([0.0, 0.5, 1.0])).tolist()
        [0, 128, 255]
    """
    return (np.clip(samples, 0, 1) * 255).round().astype(np.uint8)


def _media(samples: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (N, F, H, W, 3) as float (N, 3, H, W) / (N, F, 3, H, W) in [0, 1]."""
    tensor = torch.from_numpy(samples).float() / 255
    return tensor.movedim(-1, -3)


class SampleScorer:
    """Computes the per-sample metrics of a batch of 8-bit samples.

    Args:
        metrics: metric names (see the module docs); set metrics are ignored here.
        clip_model: the reward spec of the CLIP model of ``clip_score``.
        device: where the scoring models run.
    """

    def __init__(self, metrics: Sequence[str], *, clip_model: str = DEFAULT_CLIP_MODEL, device: str = "cpu") -> None:
        from ..rewards.spec import reward_from_spec

        self.metrics = list(metrics)
        self.verifier = None
        if any(name.startswith("verifier") for name in self.metrics):
            from ..shapeworld import Verifier

            self.verifier = Verifier()
        self.rewards = {name: reward_from_spec(name[len(REWARD_PREFIX):], device)
                        for name in self.metrics if name.startswith(REWARD_PREFIX)}
        if "clip_score" in self.metrics:
            self.rewards["clip_score"] = reward_from_spec(clip_model, device)
        self.clip_model = clip_model

    def score(self, samples: np.ndarray, prompts: Sequence[str], reference: np.ndarray | None) -> list[dict[str, Any]]:
        """The metrics of each sample (uint8, images (N, H, W, 3) or clips (N, F, H, W, 3)) against
        its prompt and, for ``psnr``/``ssim``, the untouched ``reference`` samples (None: the samples
        are the untouched ones, and those metrics are None)."""
        rows: list[dict[str, Any]] = [{} for _ in prompts]
        media = _media(samples)
        for index, row in enumerate(rows):
            for name, fidelity in (("psnr", psnr), ("ssim", ssim)):
                if name in self.metrics:
                    if reference is None:
                        row[name] = None
                    else:  # a clip's frames are a batch
                        a = media[index] if media.ndim == 5 else media[index][None]
                        b = _media(reference[index : index + 1])[0]
                        row[name] = fidelity(a.double(), (b if b.ndim == 4 else b[None]).double())
        if self.verifier is not None:
            clips = media.ndim == 5
            verdicts = (self.verifier.verify_clips if clips else self.verifier.verify)(media, list(prompts))
            for row, verdict in zip(rows, verdicts):
                row["verifier"], row["verifier_score"] = float(verdict.passed), float(verdict.score)
                for criterion, met in verdict.criteria.items():
                    row[f"verifier.{criterion}"] = float(met)
        for name, reward in self.rewards.items():
            with torch.no_grad():
                values = reward(media, list(prompts))
            for row, value in zip(rows, values.tolist()):
                row[name] = float(value)
        for row in rows:  # keep only what was asked for (the verifier's criteria come with it)
            for name in list(row):
                if name not in self.metrics and not name.startswith("verifier."):
                    del row[name]
        return rows


def frechet_distances(sets: dict[str, np.ndarray], reference: str, fid: FeatureFID | None = None) -> dict[str, float | None]:
    """FID of every set of uint8 samples in ``sets`` against ``sets[reference]`` (clips: their frames
    pooled); None for the reference itself and for sets of fewer than two samples.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a = rng.integers(0, 255, (8, 4, 4, 3), dtype=np.uint8)
        >>> pool = FeatureFID(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()), name="pool")
        >>> distances = frechet_distances({"untouched": a, "same": a.copy(), "dark": a // 4}, "untouched", pool)
        >>> distances["untouched"], abs(distances["same"]) < 1e-3, distances["dark"] > 1
        (None, True, True)
    """
    fid = fid or FeatureFID()

    def frames(samples: np.ndarray) -> torch.Tensor:
        media = _media(samples)
        return media.flatten(0, 1) if media.ndim == 5 else media

    real = frames(sets[reference])
    distances: dict[str, float | None] = {}
    for name, samples in sets.items():
        if name == reference or len(samples) < 2 or len(real) < 2:
            distances[name] = None
            continue
        fid.reset()
        fid.update(real, real=True)
        fid.update(frames(samples), real=False)
        distances[name] = fid.compute()
    return distances
