"""The ShapeWorld verifier as a reward: the fraction of the prompt's criteria an image meets.

Clips go to the verifier's own clip check (motion included), not to sampled frames.

Example:
    >>> from diffaccel.shapeworld import Scene, ShapeObject, render
    >>> scene = Scene((ShapeObject("circle", "red", 0.3, 0.5, 0.25),))
    >>> extra = ShapeObject("circle", "green", 0.7, 0.5, 0.25)  # not asked for
    >>> ShapeWorldReward()([render(scene), render(scene, extra=(extra,))], scene.caption).tolist()
    [1.0, 0.6666666...]
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Reward


class ShapeWorldReward(Reward):
    """``Verification.score`` of :class:`diffaccel.shapeworld.Verifier` (in [0, 1]; 0 is the worst):
    the fraction of the prompt's criteria met, ``no_extra_objects`` among them, so steering and
    search cannot raise the reward by drawing objects the prompt did not ask for.

    ``shapes=False`` scores the layout only (colors, counts, relations, motion and extra objects,
    matched by color whatever their shapes; named ``shapeworld-layout``): an intermediate reward
    that blurry early x0 predictions can already satisfy.
    """

    name = "shapeworld"
    worst = 0.0

    def __init__(self, verifier: Any = None, shapes: bool = True) -> None:
        if verifier is None:
            from ..shapeworld import (
                Verifier,  # imported lazily: the verifier lives in its own subpackage
            )

            verifier = Verifier()
        self.verifier, self.shapes = verifier, shapes
        if not shapes:
            self.name = "shapeworld-layout"

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        verdicts = self.verifier.verify(images.cpu(), prompts, shapes=self.shapes)
        return torch.tensor([v.score for v in verdicts], dtype=torch.float32)

    def score_clips(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        verdicts = self.verifier.verify_clips(clips.cpu(), prompts, shapes=self.shapes)
        return torch.tensor([v.score for v in verdicts], dtype=torch.float32)
