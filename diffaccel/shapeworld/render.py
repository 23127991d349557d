"""Render ShapeWorld scenes with PIL: shapes are drawn at 4x resolution and box-filtered down
(anti-aliased edges) onto a plain or faintly textured background.

Example:
    >>> import numpy as np
    >>> from diffaccel.shapeworld import render, sample_scene
    >>> image = render(sample_scene(np.random.default_rng(0)), size=64)
    >>> image.size, image.mode
    ((64, 64), 'RGB')
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .scenes import BACKGROUNDS, COLORS, MOTION_DISTANCE, Scene, ShapeObject

_SUPERSAMPLE = 4
_MOTION_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _background(name: str, size: int) -> Image.Image:
    rgb, texture = BACKGROUNDS[name]
    pixels = np.broadcast_to(np.asarray(rgb, np.float32), (size, size, 3)).copy()
    if texture == "grain":  # fixed fine grain, the same in every image of this size
        pixels += np.random.default_rng(size).normal(0.0, 4.0, (size, size, 1))
    elif texture == "stripes":  # faint diagonal stripes, period 1/8 of the image
        yy, xx = np.mgrid[:size, :size]
        pixels -= 10.0 * (((xx + yy) * 8 // size) % 2 == 0)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill
) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright triangle whose base and height are the box side
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def render(
    scene: Scene,
    size: int = 64,
    frame: int | None = None,
    frames: int = 1,
    extra: tuple[ShapeObject, ...] = (),
) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image.

    For a moving scene, ``frame`` (default 0) of ``frames`` is drawn: every object travels
    ``MOTION_DISTANCE`` of the image from the first frame to the last, at constant speed.
    ``extra`` objects are drawn too (and move with the scene) though its caption does not name
    them: images a verifier must reject.

    Example:
        >>> from diffaccel.shapeworld import Scene, ShapeObject
        >>> scene = Scene((ShapeObject("circle", "red", 0.3, 0.5, 0.25),))
        >>> image = render(scene, extra=(ShapeObject("circle", "green", 0.7, 0.5, 0.25),))
        >>> image.getpixel((19, 32)), image.getpixel((45, 32))
        ((220, 35, 35), (30, 160, 55))
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not all(isinstance(obj, ShapeObject) for obj in extra):
        raise TypeError("extra must hold ShapeObject instances")
    frame = 0 if frame is None else frame
    if not 0 <= frame < frames:
        raise ValueError(f"frame must be in [0, {frames - 1}], got {frame}")
    dx = dy = 0.0
    if scene.motion is not None and frames > 1:
        step = MOTION_DISTANCE * frame / (frames - 1)
        dx, dy = (step * d for d in _MOTION_STEP[scene.motion])
    big = size * _SUPERSAMPLE
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for obj in scene.objects + tuple(extra):
        cx, cy, half = (obj.x + dx) * big, (obj.y + dy) * big, obj.size * big / 2
        _draw(
            draw,
            obj.shape,
            (cx - half, cy - half, cx + half - 1, cy + half - 1),
            COLORS[obj.color] + (255,),
        )
    image = _background(scene.background, size).convert("RGBA")
    image.alpha_composite(layer.resize((size, size), Image.Resampling.BOX))
    return image.convert("RGB")
