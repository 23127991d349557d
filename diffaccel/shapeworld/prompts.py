"""Parse ShapeWorld prompts back into what they ask for: objects, count, relation, motion.

Every caption template of :mod:`.scenes` parses, and so do close paraphrases ("two red
circles", "a blue square is left of a red circle", "a green triangle moving to the left"). A
prompt with an unknown word, a color or shape outside the vocabulary, or no object raises
``ValueError`` naming it.

Example:
    >>> parse_prompt("a red circle to the left of a blue square")
    PromptSpec(objects=(('red', 'circle'), ('blue', 'square')), count=1, relation='left of', motion=None)
    >>> parse_prompt("there are three green triangles moving up").count
    3
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .scenes import COLORS, MOTIONS, RELATIONS, SHAPES

_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "1": 1, "two": 2, "2": 2, "three": 3, "3": 3}
_FILLER = {"a", "an", "the", "picture", "image", "photo", "drawing", "of", "there", "is", "are"}
_OBJECT = re.compile(
    rf"\b(?:({'|'.join(_COUNT_WORDS)})\s+)?({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})(s?)\b"
)
_MOTION = re.compile(
    rf"\b(?:moving|moves|move|sliding|slides|going|goes)\s+(?:to\s+the\s+)?({'|'.join(MOTIONS)})(?:wards?)?\b"
)
_RELATION = re.compile(
    r"\b(?:(?:to|on)\s+the\s+)?(left|right)(?:\s+side)?\s+of\b|\b(above|below)\b"
)


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: 1 or 2 ``(color, shape)`` objects, how many of the first (for a
    single object: 1), the relation of object 0 to object 1, and the motion."""

    objects: tuple[tuple[str, str], ...]
    count: int = 1
    relation: str | None = None
    motion: str | None = None

    def __post_init__(self) -> None:
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        if self.motion is not None and self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {self.motion!r}")
        if len(self.objects) != (2 if self.relation else 1):
            raise ValueError("a prompt names 2 objects with a relation, or 1 object without")


def _unparseable(prompt: str, why: str) -> ValueError:
    return ValueError(f"cannot parse ShapeWorld prompt {prompt!r}: {why}")


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse one ShapeWorld prompt; raises ``ValueError`` naming the prompt if it is not one."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    text = " ".join(re.sub(r"[^a-z0-9 ]", " ", prompt.lower()).split())
    motion = None
    if m := _MOTION.search(text):
        motion, text = m.group(1), text[: m.start()] + text[m.end() :]
    relations = list(_RELATION.finditer(text))
    if len(relations) > 1:
        raise _unparseable(prompt, "more than one relation")
    relation = None
    parts = [text]
    if relations:
        r = relations[0]
        relation = {"left": "left of", "right": "right of"}.get(r.group(1)) or r.group(2)
        parts = [text[: r.start()], text[r.end() :]]
    objects, counts = [], []
    for part in parts:
        found = list(_OBJECT.finditer(part))
        if len(found) != 1:
            raise _unparseable(prompt, f"expected one '<color> <shape>' in {part.strip()!r}")
        leftover = set((part[: found[0].start()] + " " + part[found[0].end() :]).split()) - _FILLER
        if leftover:
            raise _unparseable(prompt, f"unknown words {sorted(leftover)}")
        number, color, shape, _ = found[0].groups()
        objects.append((color, shape))
        counts.append(_COUNT_WORDS[number] if number else 1)
    if relation is not None and counts != [1, 1]:
        raise _unparseable(prompt, "counts are only supported without a relation")
    return PromptSpec(tuple(objects), counts[0], relation, motion)
