"""The models the ``diffaccel`` commands know by name (:mod:`diffaccel.loading`'s), and how the
commands load a pipeline: the library's loaders, with a ``model: ...`` line on stderr for the named
models and the library's :class:`~diffaccel.loading.ModelLoadError` as a one-line error.

Example:
    >>> RANDOM_MODEL_INFO.size_multiple, RANDOM_VIDEO_INFO.video
    (8, True)
    >>> sorted(BUILTIN_INFO) == sorted([RANDOM_MODEL, RANDOM_VIDEO_MODEL])
    True
"""

from __future__ import annotations

import sys
from typing import Any

from .. import loading
from ..loading import (  # noqa: F401  (the names the commands, the demo and the tests know them by)
    BUILTIN_INFO,
    DEFAULT_MODEL,
    MICRO_VIDEO,
    RANDOM_MODEL,
    RANDOM_MODEL_INFO,
    RANDOM_VIDEO_INFO,
    RANDOM_VIDEO_MODEL,
)
from .checks import fail

#: The ``model: ...`` line each loader prints for a named model, before it loads (or after, when True).
_IMAGE_NOTES = {
    DEFAULT_MODEL: (f"model: {DEFAULT_MODEL} (bundled, trained on ShapeWorld, 64x64)", False),
    RANDOM_MODEL: (f"model: {RANDOM_MODEL} (tiny, RANDOM weights: the image is noise)", False),
}
_VIDEO_NOTES = {
    RANDOM_VIDEO_MODEL: (f"model: {RANDOM_VIDEO_MODEL} (tiny, RANDOM weights: the clip is noise)", False),
    MICRO_VIDEO: (f"model: {MICRO_VIDEO} (bundled, trained on moving ShapeWorld, 64x64)", True),
}


def resolve_device(name: str | None) -> str:
    """``--device``, checked (default: cuda if available, else cpu).

    Example:
        >>> resolve_device("nosuch")
        Traceback (most recent call last):
        ...
        SystemExit: diffaccel: error: --device nosuch: ...
    """
    try:
        return loading.resolve_device(name)
    except loading.ModelLoadError as err:
        fail(str(err))


def from_pretrained(model: str, dtype: Any) -> Any:
    """``DiffusionPipeline.from_pretrained`` (safetensors only); an ``OSError`` becomes a one-line error."""
    try:
        return loading.from_pretrained(model, dtype)
    except loading.ModelLoadError as err:
        fail(str(err))


def _load(loader: Any, notes: dict[str, tuple[str, bool]], model: str, device: str, dtype: Any) -> Any:
    """``loader(model, device, dtype)`` with ``model``'s note on stderr and its error as a one-line error."""
    note, after = notes.get(model, (None, False))
    if note and not after:
        print(note, file=sys.stderr)
    try:
        loaded = loader(model, device, dtype)
    except loading.ModelLoadError as err:
        fail(str(err))
    if note and after:
        print(note, file=sys.stderr)
    return loaded


def load_pipeline(model: str, device: str, dtype: Any) -> Any:
    """Load ``model`` (a local folder, a hub id, :data:`DEFAULT_MODEL` or :data:`RANDOM_MODEL`);
    diffusers' own loading errors (``OSError``: offline, no such repo, no safetensors) end the
    command with diffusers' message on one line.

    Example:
        >>> import torch
        >>> type(load_pipeline(DEFAULT_MODEL, "cpu", torch.float32)).__name__
        'StableDiffusionPipeline'
    """
    return _load(loading.load_pipeline, _IMAGE_NOTES, model, device, dtype)


def load_video_pipeline(model: str, device: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """The pipeline for ``model`` and the call arguments it needs (sizes, text length).

    Example:
        >>> import torch
        >>> pipe, call = load_video_pipeline(RANDOM_VIDEO_MODEL, "cpu", torch.float32)
        >>> type(pipe).__name__, call["height"]
        ('WanPipeline', 32)
    """
    return _load(loading.load_video_pipeline, _VIDEO_NOTES, model, device, dtype)
