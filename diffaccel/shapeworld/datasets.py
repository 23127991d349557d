"""ShapeWorld as ``torch`` datasets of (pixels in [-1, 1], caption), deterministic per
(seed, index): item ``i`` is the same on every machine, worker and epoch.

Example:
    >>> from diffaccel.shapeworld import ShapeWorldClips, ShapeWorldImages
    >>> pixels, caption = ShapeWorldImages("train", size=32, length=4)[1]
    >>> tuple(pixels.shape), pixels.dtype, bool(pixels.min() >= -1 and pixels.max() <= 1)
    ((3, 32, 32), torch.float32, True)
    >>> clip, caption = ShapeWorldClips("train", size=32, frames=5, length=4)[0]
    >>> tuple(clip.shape), caption
    ((5, 3, 32, 32), 'an orange square moving up')
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .render import render
from .scenes import KINDS, SPLITS, Scene, sample_scene

_STILL_KINDS = ("single", "count", "relation")


def to_pixels(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a float32 tensor (3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)


class _ShapeWorld(Dataset):
    def __init__(self, split: str, size: int, length: int, seed: int, stream: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 16:
            raise ValueError(f"size must be >= 16, got {size}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self._stream = stream  # keeps images and clips of one seed independent

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        return np.random.default_rng([self.seed, self._stream, index])


class ShapeWorldImages(_ShapeWorld):
    """Still ShapeWorld images: ``(pixels (3, size, size) float32 in [-1, 1], caption)``.

    ``kinds`` restricts the scene kinds (default: single, count and relation, mixed 40/25/35).
    ``scene(i)`` gives the :class:`~diffaccel.shapeworld.Scene` behind item ``i``.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        length: int = 10000,
        seed: int = 0,
        *,
        kinds: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(split, size, length, seed, stream=0)
        if kinds is not None and (not kinds or any(k not in _STILL_KINDS for k in kinds)):
            raise ValueError(f"kinds must be a non-empty subset of {_STILL_KINDS}, got {kinds!r}")
        self.kinds = kinds

    def scene(self, index: int) -> Scene:
        rng = self._rng(index)
        kind = None if self.kinds is None else self.kinds[rng.integers(len(self.kinds))]
        return sample_scene(rng, self.split, kind)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        return to_pixels(render(scene, self.size)), scene.caption


class ShapeWorldClips(_ShapeWorld):
    """Moving ShapeWorld clips: one object travelling left, right, up or down over ``frames``
    frames; ``(pixels (frames, 3, size, size) float32 in [-1, 1], caption)``, the caption naming
    the motion ("a red circle moving left")."""

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        frames: int = 9,
        length: int = 10000,
        seed: int = 0,
    ) -> None:
        super().__init__(split, size, length, seed, stream=1)
        if frames < 2:
            raise ValueError(f"frames must be >= 2, got {frames}")
        self.frames = frames

    def scene(self, index: int) -> Scene:
        return sample_scene(self._rng(index), self.split, "motion")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        clip = [to_pixels(render(scene, self.size, f, self.frames)) for f in range(self.frames)]
        return torch.stack(clip), scene.caption


def eval_prompts(kind: str, n: int, seed: int = 0, split: str = "heldout") -> list[str]:
    """``n`` evaluation prompts of ``kind`` (``"single"``, ``"count"``, ``"relation"``,
    ``"motion"`` or ``"relation-motion"``) from ``split``, deterministic per (kind, n, seed, split).

    Example:
        >>> eval_prompts("relation", 2, seed=0) == eval_prompts("relation", 2, seed=0)
        True
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([seed, 2, KINDS.index(kind)])
    return [sample_scene(rng, split, kind).caption for _ in range(n)]
