"""What the ``diffaccel`` commands print after a call and write with ``--stats-json``: each
statistics object's own ``summary()``, and the ShapeWorld verifier's verdict."""

from __future__ import annotations

import json
from typing import Any


def print_verdict(media: Any, prompt: str, *, clip: bool = False) -> dict[str, Any] | None:
    """Print and return the ShapeWorld verifier's result on an image (or a clip, ``clip=True``:
    frames ``(T, H, W, 3)``), or None when ``prompt`` is not a caption.

    Example:
        >>> from diffaccel.shapeworld import Scene, ShapeObject, render
        >>> scene = Scene((ShapeObject("circle", "red", 0.3, 0.5, 0.25),
        ...                ShapeObject("square", "blue", 0.7, 0.5, 0.25)), relation="left of")
        >>> print_verdict(render(scene), scene.caption)["score"]
        verifier: score 1.00 (all criteria met)
        1.0
    """
    from ..shapeworld import Verifier, parse_prompt

    try:
        parse_prompt(prompt)
    except ValueError:
        print("verifier: skipped (not a ShapeWorld caption)")
        return None
    verifier = Verifier()
    result = (verifier.verify_clips(media[None], [prompt]) if clip else verifier.verify([media], [prompt]))[0]
    print(f"verifier: {result.summary()}")
    return {"score": result.score, "passed": result.passed, "criteria": dict(result.criteria)}


def write_stats_json(path: str | None, stats: dict[str, Any]) -> None:
    """Write ``stats`` as indented JSON to ``path`` (``--stats-json``); nothing when ``path`` is None."""
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(stats, handle, indent=2)


def warn_if_resized(args: Any, width: int, height: int) -> None:
    """Say so when the pipeline drew another size than ``--width``/``--height`` asked for."""
    from .checks import warn

    if (args.width or width, args.height or height) != (width, height):
        warn(f"the pipeline drew {width}x{height}, not the {args.width or width}x{args.height or height} asked for")
