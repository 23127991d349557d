"""ShapeWorld scenes: the vocabulary, the held-out split, scene sampling and captions.

A scene holds 1 to 3 objects (shape, color, center, size in image fractions), an optional spatial
relation between its two objects, a background and an optional motion. Positions are sampled so
that what the caption says is unambiguous: objects never overlap, counted objects keep a gap,
and related objects are separated along the relation's axis by a clear margin that dominates
their offset along the other axis.

Splits: the color-shape pairs in :data:`HELDOUT_PAIRS` never appear in ``"train"`` scenes; every
``"heldout"`` scene has at least one of them (both objects of a relation may be held out).

Example:
    >>> import numpy as np
    >>> from diffaccel.shapeworld import sample_scene
    >>> scene = sample_scene(np.random.default_rng(0), "train", kind="relation")
    >>> scene.kind, len(scene.objects), scene.relation in ("left of", "right of", "above", "below")
    ('relation', 2, True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape names; every shape is drawn upright in a square bounding box."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 160, 55),
    "blue": (35, 80, 225),
    "yellow": (245, 205, 25),
    "purple": (145, 50, 185),
    "orange": (250, 125, 15),
}
"""Color name -> sRGB; saturated colors, far apart from each other and from the backgrounds."""

BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str | None]] = {
    "white": ((248, 248, 248), None),
    "light gray": ((222, 222, 222), None),
    "cream": ((244, 236, 216), None),
    "grain": ((236, 236, 232), "grain"),
    "stripes": ((244, 244, 244), "stripes"),
}
"""Background name -> (sRGB, texture or None); light and low-chroma, textures are faint."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")
KINDS: tuple[str, ...] = ("single", "count", "relation", "motion", "relation-motion")
SPLITS: tuple[str, ...] = ("train", "heldout")

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle")}
)
"""(color, shape) pairs that only ever appear in the ``"heldout"`` split."""

NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

WORDS: tuple[str, ...] = tuple(sorted(
    set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS) | set(MOTIONS) | set(NUMBERS.values())
    | {w for phrase in (*RELATIONS, *BACKGROUNDS) for w in phrase.split()}
    | set("a an the of to is are there one picture image photo drawing moving moves sliding on and with "
          "background next beside small large big".split())
))
"""Every word of a ShapeWorld caption or prompt, and a few more: the vocabulary the micro models'
text encoders keep whole (:func:`diffaccel.tokenizers.clip_tokenizer_for_words`)."""
MOTION_DISTANCE = 0.4
"""How far a moving object travels from the first to the last frame, as a fraction of the image."""

_SINGLE_TEMPLATES = ("a {o}", "a picture of a {o}", "one {o}", "an image of a {o}")
_COUNT_TEMPLATES = ("{n} {o}", "a picture of {n} {o}", "there are {n} {o}")
_RELATION_TEMPLATES = ("a {a} {r} a {b}", "a {a} is {r} a {b}", "a picture of a {a} {r} a {b}")
_MOTION_TEMPLATES = ("a {o} moving {m}", "a {o} moves {m}", "a {o} sliding {m}")
_RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_TEMPLATES = {
    "single": _SINGLE_TEMPLATES,
    "count": _COUNT_TEMPLATES,
    "relation": _RELATION_TEMPLATES,
    "motion": _MOTION_TEMPLATES,
}
_MOTION_BOUNDS = {  # motion -> the (x, y) ranges a moving object's first-frame box stays in
    None: ((0.0, 1.0), (0.0, 1.0)),
    "left": ((MOTION_DISTANCE, 1.0), (0.0, 1.0)),
    "right": ((0.0, 1 - MOTION_DISTANCE), (0.0, 1.0)),
    "up": ((0.0, 1.0), (MOTION_DISTANCE, 1.0)),
    "down": ((0.0, 1.0), (0.0, 1 - MOTION_DISTANCE)),
}
_EDGE = 0.04  # minimum distance from an object's bounding box to the image border
_GAP = 0.08  # minimum gap between two objects' bounding boxes


@dataclass(frozen=True)
class ShapeObject:
    """One object: its shape, color, center ``(x, y)`` and bounding-box side, in image fractions
    (``y`` grows downwards). For moving scenes the center is the first frame's."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {self.color!r}")
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"size must be in (0, 1], got {self.size}")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    """A ShapeWorld scene. ``relation`` relates ``objects[0]`` to ``objects[1]``; ``motion``
    moves every object; ``template`` picks the caption wording.

    Example:
        >>> Scene((ShapeObject("circle", "red", 0.3, 0.5, 0.25),
        ...        ShapeObject("square", "blue", 0.7, 0.5, 0.25)), relation="left of").caption
        'a red circle to the left of a blue square'
    """

    objects: tuple[ShapeObject, ...]
    relation: str | None = None
    background: str = "white"
    motion: str | None = None
    template: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"objects must hold 1 to 3 objects, got {len(self.objects)}")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
            if len(self.objects) != 2:
                raise ValueError("a scene with a relation must hold exactly 2 objects")
        elif len({o.pair for o in self.objects}) != 1:
            raise ValueError("objects of a scene without a relation must share color and shape")
        if self.motion is not None and self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS} or None, got {self.motion!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}"
            )
        if self.template < 0:
            raise ValueError(f"template must be >= 0, got {self.template}")

    @property
    def kind(self) -> str:
        """``"relation"``, ``"count"`` (several identical objects), ``"motion"`` or ``"single"``."""
        if self.relation is not None:
            return "relation"
        if len(self.objects) > 1:
            return "count"
        return "motion" if self.motion is not None else "single"

    @property
    def caption(self) -> str:
        """The scene described in words, in the wording picked by ``template``."""
        templates = _TEMPLATES[self.kind]
        template = templates[self.template % len(templates)]
        first = self.objects[0]
        noun = f"{first.color} {first.shape}"
        if self.kind == "relation":
            second = self.objects[1]
            text = template.format(
                a=noun, r=_RELATION_PHRASES[self.relation], b=f"{second.color} {second.shape}"
            )
        elif self.kind == "count":
            text = template.format(n=NUMBERS[len(self.objects)], o=noun + "s")
        else:
            text = template.format(o=noun, m=self.motion)
        if self.motion is not None and self.kind != "motion":
            text += f" moving {self.motion}"
        return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _check(split: str, kind: str | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")


def _pair(rng: np.random.Generator, heldout: bool) -> tuple[str, str]:
    """A (color, shape) pair from the held-out set or from its complement."""
    pairs = [(c, s) for c in COLORS for s in SHAPES if ((c, s) in HELDOUT_PAIRS) == heldout]
    return pairs[rng.integers(len(pairs))]


def _center(rng: np.random.Generator, size: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """A center coordinate keeping the box of side ``size`` inside ``[lo, hi]`` with an edge."""
    return float(rng.uniform(lo + _EDGE + size / 2, hi - _EDGE - size / 2))


def _separated(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """True if the boxes ``(x, y, size)`` are at least ``_GAP`` apart along some axis."""
    half = (a[2] + b[2]) / 2 + _GAP
    return abs(a[0] - b[0]) >= half or abs(a[1] - b[1]) >= half


def _place_count(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    size = float(rng.uniform(0.2, 0.28 if n == 3 else 0.32))
    while True:  # rejection sampling; succeeds within a few tries at these sizes
        boxes = [(_center(rng, size), _center(rng, size), size) for _ in range(n)]
        if all(_separated(boxes[i], boxes[j]) for i in range(n) for j in range(i)):
            return boxes


def _place_relation(rng: np.random.Generator, relation: str, motion: str | None = None
                    ) -> list[tuple[float, float, float]]:
    """Boxes for objects 0 and 1 such that object 0 is ``relation`` object 1: separated along the
    relation's axis by at least ``_GAP``, and offset along the other axis by at most half their
    distance along the relation's axis; with ``motion``, first-frame boxes that stay inside the
    image all clip long (both objects move together, so the relation holds in every frame)."""
    sizes = rng.uniform(0.2, 0.215, size=2) if motion is not None else rng.uniform(0.2, 0.3, size=2)
    (x_lo, x_hi), (y_lo, y_hi) = _MOTION_BOUNDS[motion]
    while True:
        boxes = [(_center(rng, s, x_lo, x_hi), _center(rng, s, y_lo, y_hi), float(s)) for s in sizes]
        (xa, ya, sa), (xb, yb, sb) = boxes
        along, across = (
            (xb - xa, yb - ya) if relation in ("left of", "right of") else (yb - ya, xb - xa)
        )
        if relation in ("right of", "below"):
            along = -along
        if along >= (sa + sb) / 2 + _GAP and abs(across) <= along / 2:
            return boxes


def _place_motion(rng: np.random.Generator, motion: str) -> tuple[float, float, float]:
    size = float(rng.uniform(0.22, 0.3))
    x, y = _center(rng, size), _center(rng, size)
    (x_lo, x_hi), (y_lo, y_hi) = _MOTION_BOUNDS[motion]
    if motion in ("left", "right"):
        x = _center(rng, size, x_lo, x_hi)
    else:
        y = _center(rng, size, y_lo, y_hi)
    return x, y, size


def sample_extra(rng: np.random.Generator, scene: Scene, tries: int = 1000) -> ShapeObject:
    """An object that ``scene``'s caption does not name: any color and shape, as large as the
    scene's objects, ``_GAP`` clear of them and (if the scene moves) inside the image all clip
    long. Drawn with ``render(scene, extra=(obj,))``: an image a verifier must reject.
    Raises ``ValueError`` if ``tries`` placements all collide.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> scene = sample_scene(rng, kind="relation")
        >>> extra = sample_extra(rng, scene)
        >>> from diffaccel.shapeworld import Verifier, render
        >>> verifier = Verifier()
        >>> verifier.verify([render(scene), render(scene, extra=(extra,))], scene.caption)[1].criteria
        {'object_0_color': True, 'object_0_shape': True, 'object_1_color': True, 'object_1_shape': True,
         'relation': True, 'no_extra_objects': False}
    """
    (x_lo, x_hi), (y_lo, y_hi) = _MOTION_BOUNDS[scene.motion]
    boxes = [(o.x, o.y, o.size) for o in scene.objects]
    color, shape = tuple(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
    for _ in range(tries):
        size = float(rng.uniform(0.2, 0.3))
        box = (_center(rng, size, x_lo, x_hi), _center(rng, size, y_lo, y_hi), size)
        if all(_separated(box, other) for other in boxes):
            return ShapeObject(shape, color, *box)
    raise ValueError(f"no room for an extra object in {scene.caption!r} after {tries} tries")


def sample_scene(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> Scene:
    """Sample a scene of ``split`` (``"train"`` or ``"heldout"``).

    ``kind``: ``"single"`` (one object), ``"count"`` (two or three identical objects),
    ``"relation"`` (two different objects and a relation), ``"motion"`` (one moving object),
    ``"relation-motion"`` (a relation whose two objects move together: the harder clip prompts,
    "a red circle above a blue square moving left"), or ``None`` for a still scene of a random
    kind (single 40%, count 25%, relation 35%).

    Example:
        >>> import numpy as np
        >>> scene = sample_scene(np.random.default_rng(3), "heldout", kind="single")
        >>> (scene.objects[0].color, scene.objects[0].shape) in HELDOUT_PAIRS
        True
    """
    _check(split, kind)
    if kind is None:
        kind = ("single", "count", "relation")[rng.choice(3, p=[0.4, 0.25, 0.35])]
    heldout = split == "heldout"
    relation = motion = None
    if kind in ("relation", "relation-motion"):
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        if kind == "relation-motion":
            motion = MOTIONS[rng.integers(len(MOTIONS))]
        boxes = _place_relation(rng, relation, motion)
        first = _pair(rng, heldout)
        while True:  # in "heldout", the second object may come from either set
            second = _pair(rng, heldout and bool(rng.integers(2)))
            if second != first:
                break
        if heldout and rng.integers(2):  # the held-out object is first or second
            first, second = second, first
        pairs = [first, second]
    elif kind == "count":
        n = int(rng.integers(2, 4))
        boxes = _place_count(rng, n)
        pairs = [_pair(rng, heldout)] * n
    elif kind == "motion":
        motion = MOTIONS[rng.integers(len(MOTIONS))]
        boxes = [_place_motion(rng, motion)]
        pairs = [_pair(rng, heldout)]
    else:
        size = float(rng.uniform(0.22, 0.34))
        boxes = [(_center(rng, size), _center(rng, size), size)]
        pairs = [_pair(rng, heldout)]
    objects = tuple(
        ShapeObject(shape, color, x, y, s) for (color, shape), (x, y, s) in zip(pairs, boxes)
    )
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    template = int(rng.integers(len(_TEMPLATES["relation" if kind == "relation-motion" else kind])))
    return Scene(objects, relation, background, motion, template)
