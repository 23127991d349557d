"""The ShapeWorld verifier as a reward: the fraction of the prompt's criteria an image meets.

Clips go to the verifier's own clip check (motion included), not to sampled frames.

Example:
    >>> reward = ShapeWorldReward()  # doctest: +SKIP
    >>> reward(images, ["a red circle to the left of a blue square"] * len(images))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Reward


class ShapeWorldReward(Reward):
    """``Verification.score`` of :class:`diffaccel.shapeworld.Verifier` (in [0, 1]; 0 is the worst)."""

    name = "shapeworld"
    worst = 0.0

    def __init__(self, verifier: Any = None) -> None:
        if verifier is None:
            from ..shapeworld import (
                Verifier,  # imported lazily: the verifier lives in its own subpackage
            )

            verifier = Verifier()
        self.verifier = verifier

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([v.score for v in self.verifier.verify(images.cpu(), prompts)], dtype=torch.float32)

    def score_clips(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([v.score for v in self.verifier.verify_clips(clips.cpu(), prompts)], dtype=torch.float32)
