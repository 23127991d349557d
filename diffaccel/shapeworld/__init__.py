"""ShapeWorld: a procedural world of colored shapes with exact captions, for training micro
models offline and scoring what they draw.

- :mod:`.scenes`: vocabulary (``SHAPES``, ``COLORS``, ``RELATIONS``, ``MOTIONS``), the held-out
  color-shape pairs, :class:`Scene`, :func:`sample_scene` and :func:`sample_extra` (an object a
  scene's caption does not name).
- :mod:`.render`: :func:`render` a scene (or one frame of a moving scene), extra objects besides.
- :mod:`.datasets`: :class:`ShapeWorldImages`, :class:`ShapeWorldClips`, :func:`eval_prompts`.
- :mod:`.prompts`: :func:`parse_prompt` reads a prompt back into a :class:`PromptSpec`.
- :mod:`.detect`: finds colored shapes in images (color segmentation, shape templates).
- :mod:`.verifier`: :class:`Verifier` scores images and clips against prompts, per criterion.

Example:
    >>> import numpy as np
    >>> from diffaccel.shapeworld import render, sample_scene
    >>> scene = sample_scene(np.random.default_rng(0), "train", kind="count")
    >>> render(scene, size=64).size
    (64, 64)
"""

from .datasets import ShapeWorldClips, ShapeWorldImages, eval_prompts
from .detect import Detection
from .prompts import PromptSpec, parse_prompt
from .render import render
from .scenes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    KINDS,
    MOTIONS,
    RELATIONS,
    SHAPES,
    WORDS,
    Scene,
    ShapeObject,
    sample_extra,
    sample_scene,
)
from .verifier import Verification, Verifier

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "HELDOUT_PAIRS",
    "KINDS",
    "MOTIONS",
    "RELATIONS",
    "SHAPES",
    "WORDS",
    "Detection",
    "PromptSpec",
    "Scene",
    "ShapeObject",
    "ShapeWorldClips",
    "ShapeWorldImages",
    "Verification",
    "Verifier",
    "eval_prompts",
    "parse_prompt",
    "render",
    "sample_extra",
    "sample_scene",
]
