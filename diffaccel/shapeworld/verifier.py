"""Score generated ShapeWorld images and clips against their prompts, GenEval-style: exact,
deterministic, per criterion, in batches. It is the reward of the steering features and the
metric by which accelerated pipelines are judged.

Criteria (all booleans; ``score`` is the fraction met, ``passed`` all of them):

- ``object_{i}_color``: an object of prompt object ``i``'s color is present;
- ``object_{i}_shape``: an object of that color *and* shape is present;
- ``count`` (prompts with two or three objects): exactly that many objects of that color and shape;
- ``relation``: an object matching object 0 and a different one matching object 1 whose centroids
  differ along the relation's axis by more than ``relation_margin`` of the image, and by more
  than half their offset along the other axis;
- ``no_extra_objects``: no object beyond those the prompt asks for. Each requested object takes
  one detected object (one of its color and shape if there is one, else of its color, else any);
  none may be left over. An extra object beside the requested ones fails it; a wrong object in
  place of a requested one fails only that object's criteria, and an empty image has none extra.
  For count prompts every object of the counted kind goes to ``count`` (which judges how many),
  so only objects of other kinds can be extra. Extras are detections like any other: components
  of a palette color above ``min_area``, whatever their shape;
- ``motion`` (clips): the least-squares track of object 0's centroid travels more than
  ``min_travel`` of the image in the named direction, and more along it than across it.

For clips, the still criteria are judged per frame and pass if they hold in at least half the
frames; object 0 must be found in at least half the frames for the motion to be judged.

``shapes=False`` judges the layout only: objects are matched by color alone, so the shape criteria
drop out and count, relation and motion hold whatever the objects' shapes. Blurry predictions of
early sampling steps already show colored blobs and where they sit, long before their shapes.
Extra objects count there too (by color for the counted kind): a blob too many is the wrong
layout, and a layout reward that forgave it would steer towards images the full check rejects.

Example:
    >>> from diffaccel.shapeworld import Scene, ShapeObject, Verifier, render
    >>> scene = Scene((ShapeObject("circle", "red", 0.3, 0.5, 0.25),
    ...                ShapeObject("square", "blue", 0.7, 0.5, 0.25)), relation="left of")
    >>> image = render(scene)
    >>> result = Verifier().verify([image], [scene.caption])[0]
    >>> result.passed, result.score
    (True, 1.0)
    >>> Verifier().verify([image], ["a blue square to the left of a red circle"])[0].criteria
    {'object_0_color': True, 'object_0_shape': True, 'object_1_color': True, 'object_1_shape': True,
     'relation': False, 'no_extra_objects': True}
    >>> Verifier().verify([image], ["two purple triangles"])[0].score
    0.25
    >>> Verifier().verify([image], ["a red square to the left of a blue circle"], shapes=False)[0].criteria
    {'object_0_color': True, 'object_1_color': True, 'relation': True, 'no_extra_objects': True}
    >>> Verifier().verify([image], ["a red circle"])[0].criteria  # the blue square was not asked for
    {'object_0_color': True, 'object_0_shape': True, 'no_extra_objects': False}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .detect import Detection, detect
from .prompts import PromptSpec, parse_prompt

_AXES = {  # relation / motion -> (axis, sign): 0 is x, 1 is y (downwards)
    "left of": (0, 1),
    "right of": (0, -1),
    "above": (1, 1),
    "below": (1, -1),
    "left": (0, -1),
    "right": (0, 1),
    "up": (1, -1),
    "down": (1, 1),
}


@dataclass(frozen=True)
class Verification:
    """The verdict on one image or clip: ``criteria`` (name -> met), ``score`` (fraction met),
    ``passed`` (all met), and the objects detected (per frame for clips)."""

    prompt: str
    criteria: dict[str, bool]
    detections: tuple[tuple[Detection, ...], ...] = field(repr=False, default=())

    @property
    def score(self) -> float:
        return sum(self.criteria.values()) / len(self.criteria)

    @property
    def passed(self) -> bool:
        return all(self.criteria.values())

    def summary(self) -> str:
        """The score and the criteria that failed, as the CLI and the demo print them.

        Example:
            >>> Verification("a red circle", {"count": True, "color": False}).summary()
            'score 0.50 (failed: color)'
            >>> Verification("a red circle", {"count": True}).summary()
            'score 1.00 (all criteria met)'
        """
        failed = [name for name, ok in self.criteria.items() if not ok]
        return f"score {self.score:.2f} " + (f"(failed: {', '.join(failed)})" if failed else "(all criteria met)")


def _matches(detections: list[Detection], pair: tuple[str, str], shapes: bool = True) -> list[Detection]:
    """The detections of ``pair``'s color and shape (its color alone without ``shapes``)."""
    return [d for d in detections if d.color == pair[0] and (not shapes or d.shape == pair[1])]


def _extras(spec: PromptSpec, detections: list[Detection], shapes: bool = True) -> int:
    """How many detections are left over once every object the prompt asks for has taken one
    (which one it takes does not change how many are left); the objects of a counted kind are
    all taken by ``count``."""
    counted = len(_matches(detections, spec.objects[0], shapes)) if spec.count > 1 else 0
    return max(0, len(detections) - max(spec.count * len(spec.objects), counted))


@dataclass(frozen=True)
class Verifier:
    """Detects objects by color segmentation and shape templates and checks them against prompts.

    Args:
        size: images are resized to ``size`` x ``size`` before detection.
        color_threshold: CIELAB distance within which a pixel takes a palette color.
        min_area: smallest object, as a fraction of the image (smaller blobs are noise).
        min_iou: smallest IoU with a shape template for a blob to count as that shape.
        max_aspect: largest bounding-box aspect ratio of a recognized shape.
        relation_margin: smallest centroid distance along a relation's axis (image fraction).
        min_travel: smallest travel of a moving object over a clip (image fraction).

    Example:
        >>> import torch
        >>> from diffaccel.shapeworld import ShapeWorldClips
        >>> clip, caption = ShapeWorldClips(length=1)[0]
        >>> Verifier().verify_clips((clip[None] + 1) / 2, [caption])[0].passed
        True
    """

    size: int = 64
    color_threshold: float = 45.0
    min_area: float = 0.01
    min_iou: float = 0.8
    max_aspect: float = 2.0
    relation_margin: float = 0.05
    min_travel: float = 0.1

    def __post_init__(self) -> None:
        checks = {
            "size": (self.size, 16, 1024),
            "color_threshold": (self.color_threshold, 1e-6, 200.0),
            "min_area": (self.min_area, 0.0, 0.5),
            "min_iou": (self.min_iou, 0.0, 1.0),
            "max_aspect": (self.max_aspect, 1.0, 100.0),
            "relation_margin": (self.relation_margin, 0.0, 1.0),
            "min_travel": (self.min_travel, 0.0, 1.0),
        }
        for name, (value, lo, hi) in checks.items():
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")

    def detect(self, images) -> list[list[Detection]]:
        """Objects found in each image, largest first (see :mod:`.detect`)."""
        return detect(
            images,
            size=self.size,
            color_threshold=self.color_threshold,
            min_area=self.min_area,
            min_iou=self.min_iou,
            max_aspect=self.max_aspect,
        )

    def verify(self, images, prompts, shapes: bool = True) -> list[Verification]:
        """Score images (list of PIL, numpy (N, H, W, 3) uint8 or float in [0, 1], or tensor
        (N, 3, H, W) in [0, 1]) against prompts (one per image, or one str for all); ``shapes=False``
        judges the layout only (see the module docs)."""
        specs, prompts = self._parse(prompts, _length(images))
        detections = self.detect(images)
        return [
            Verification(p, self._still(s, d, shapes), (tuple(d),))
            for p, s, d in zip(prompts, specs, detections)
        ]

    def verify_clips(self, clips, prompts, shapes: bool = True) -> list[Verification]:
        """Score clips (list of lists of PIL frames, tensor (N, T, 3, H, W) in [0, 1], or numpy
        (N, T, H, W, 3) uint8 or float in [0, 1]) against prompts (one per clip, or one str);
        ``shapes=False`` judges the layout only (see the module docs)."""
        if isinstance(clips, (torch.Tensor, np.ndarray)):
            if clips.ndim != 5:
                raise ValueError(
                    f"clips must be 5-dimensional (N, T, ...), got shape {clips.shape}"
                )
            lengths = [clips.shape[1]] * clips.shape[0]
            frames = clips.reshape(-1, *clips.shape[2:])
        elif isinstance(clips, (list, tuple)) and all(isinstance(c, (list, tuple)) for c in clips):
            lengths = [len(c) for c in clips]
            frames = [frame for clip in clips for frame in clip]
        else:
            raise ValueError(
                "clips must be a tensor, a numpy array or a list of lists of PIL frames"
            )
        specs, prompts = self._parse(prompts, len(lengths))
        if any(t < 2 for t in lengths):
            raise ValueError(f"every clip needs at least 2 frames, got lengths {lengths}")
        detections = self.detect(frames)
        results, start = [], 0
        for prompt, spec, t in zip(prompts, specs, lengths):
            per_frame = detections[start : start + t]
            start += t
            results.append(
                Verification(prompt, self._clip(spec, per_frame, shapes), tuple(map(tuple, per_frame)))
            )
        return results

    def _parse(self, prompts, n: int) -> tuple[list[PromptSpec], list[str]]:
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} images or clips")
        return [parse_prompt(p) for p in prompts], prompts

    def _still(self, spec: PromptSpec, detections: list[Detection], shapes: bool = True) -> dict[str, bool]:
        criteria = {}
        for i, (color, shape) in enumerate(spec.objects):
            criteria[f"object_{i}_color"] = any(d.color == color for d in detections)
            if shapes:
                criteria[f"object_{i}_shape"] = bool(_matches(detections, (color, shape)))
        if spec.count > 1:
            criteria["count"] = len(_matches(detections, spec.objects[0], shapes)) == spec.count
        if spec.relation is not None:
            axis, sign = _AXES[spec.relation]
            criteria["relation"] = any(
                self._related(a, b, axis, sign)
                for a in _matches(detections, spec.objects[0], shapes)
                for b in _matches(detections, spec.objects[1], shapes)
                if a is not b
            )
        criteria["no_extra_objects"] = not _extras(spec, detections, shapes)
        return criteria

    def _related(self, a: Detection, b: Detection, axis: int, sign: int) -> bool:
        delta = np.array([b.x - a.x, b.y - a.y])
        along, across = sign * delta[axis], abs(delta[1 - axis])
        return bool(along > self.relation_margin and along > across / 2)

    def _clip(self, spec: PromptSpec, frames: list[list[Detection]], shapes: bool = True) -> dict[str, bool]:
        votes = [self._still(spec, d, shapes) for d in frames]
        criteria = {k: 2 * sum(v[k] for v in votes) >= len(votes) for k in votes[0]}
        if spec.motion is not None:
            criteria["motion"] = self._moves(spec, frames, shapes)
        return criteria

    def _moves(self, spec: PromptSpec, frames: list[list[Detection]], shapes: bool = True) -> bool:
        t, points = [], []
        for i, detections in enumerate(frames):
            found = _matches(detections, spec.objects[0], shapes)
            if found:  # the mean centroid of the matching objects
                t.append(i / (len(frames) - 1))
                points.append([np.mean([d.x for d in found]), np.mean([d.y for d in found])])
        if 2 * len(t) < len(frames) or len(t) < 2:
            return False
        t, points = np.array(t), np.array(points)
        slope = np.polyfit(t, points, 1)[0]  # travel per clip, (x, y)
        axis, sign = _AXES[spec.motion]
        along, across = sign * slope[axis], abs(slope[1 - axis])
        return bool(along > self.min_travel and along > across)


def _length(images) -> int:
    if isinstance(images, Image.Image):
        return 1
    return len(images)
