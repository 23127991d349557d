"""Prompt sets for ``diffaccel eval``: read a list, a file or a built-in set into :class:`PromptRecord` s.

Sources (:func:`load_prompts`):

* a list of strings;
* a text file (``.txt`` or no suffix): one prompt a line, blank lines and ``#`` comments skipped;
* a JSONL file (``.jsonl``): one object a line with a ``prompt`` field, an optional ``seed``, and
  any other fields (GenEval's ``tag``, ``include``, ...) kept as metadata;
* a CSV or TSV file (``.csv``, ``.tsv``): a ``prompt`` column (DrawBench's ``Prompts``, PartiPrompts'
  ``Prompt`` too), an optional ``seed`` column, the other non-empty cells as metadata under their
  lower-cased column names (``category``);
* a built-in set ``shapeworld:KIND[+KIND...][:SPLIT][:N]``: ``N`` (default 64) ShapeWorld prompts of each ``KIND``
  (``single``, ``count``, ``relation``, ``motion``, ``relation-motion``: two objects moving together, the
  harder clip prompts) from ``SPLIT`` (``train`` or ``heldout``, the
  default), the same on every run.

Everything is checked before any model work: a malformed input raises :class:`PromptFileError`
naming the file and line. Reading files needs no torch.

Example:
    >>> records = load_prompts(["a red circle", "two blue squares"])
    >>> [r.prompt for r in records], records[0].seed
    (['a red circle', 'two blue squares'], None)
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

from ..errors import DiffaccelError

#: The prefix of the built-in prompt sets.
BUILTIN_PREFIX = "shapeworld:"

#: Header names (lower-cased) taken as the prompt column of a CSV/TSV file.
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "prompts")

#: Prompts in a built-in set when its ``N`` is not given.
DEFAULT_BUILTIN_SIZE = 64

PromptSource = Union[str, os.PathLike, Sequence[str]]


class PromptFileError(DiffaccelError, ValueError):
    """A prompt source is malformed; the message names the file (or set) and the line."""


def _frozen(value: Any) -> Any:
    """``value`` with its dicts read-only and its lists tuples, all the way down."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: _frozen(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    return value


@dataclass(frozen=True)
class PromptRecord:
    """One prompt to evaluate: its text, its own seed (``None``: the run's seeds) and read-only metadata.

    Example:
        >>> record = PromptRecord("a red circle", seed=3, metadata={"category": "Colors"})
        >>> record.seed, record.metadata["category"]
        (3, 'Colors')
        >>> record.metadata["category"] = "Counting"
        Traceback (most recent call last):
        ...
        TypeError: 'mappingproxy' object does not support item assignment
    """

    prompt: str
    seed: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"PromptRecord.prompt must be a non-empty string, got {self.prompt!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ValueError(f"PromptRecord.seed must be None or an int >= 0, got {self.seed!r}")
        object.__setattr__(self, "metadata", _frozen(dict(self.metadata)))


def _record(where: str, prompt: Any, seed: Any, metadata: Mapping[str, Any]) -> PromptRecord:
    if not isinstance(prompt, str):
        raise PromptFileError(f"{where}: the prompt must be a string, got {prompt!r}")
    if not prompt.strip():
        raise PromptFileError(f"{where}: empty prompt")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise PromptFileError(f"{where}: seed must be an integer >= 0, got {seed!r}")
    return PromptRecord(prompt.strip(), seed, metadata)


def _from_list(prompts: Sequence[Any]) -> list[PromptRecord]:
    return [_record(f"prompts[{i}]", prompt, None, {}) for i, prompt in enumerate(prompts)]


def _from_text(path: Path, lines: list[str]) -> list[PromptRecord]:
    return [
        _record(f"{path}:{number}", line.strip(), None, {})
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _from_jsonl(path: Path, lines: list[str]) -> list[PromptRecord]:
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(item, dict):
            raise PromptFileError(f"{where}: expected a JSON object with a 'prompt' field, got {type(item).__name__}")
        if "prompt" not in item:
            raise PromptFileError(f"{where}: no 'prompt' field (fields: {sorted(item)})")
        metadata = {key: value for key, value in item.items() if key not in ("prompt", "seed")}
        records.append(_record(where, item["prompt"], item.get("seed"), metadata))
    return records


def _csv_seed(where: str, text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise PromptFileError(f"{where}: seed must be an integer >= 0, got {text!r}") from None


def _from_csv(path: Path, text: str, delimiter: str) -> list[PromptRecord]:
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    header = reader.fieldnames or []
    columns = [name for name in header if name.strip().lower() in PROMPT_COLUMNS]
    if len(columns) != 1:
        found = "none" if not columns else f"several: {columns}"
        raise PromptFileError(
            f"{path}:1: expected one prompt column (one of {PROMPT_COLUMNS}, any case), found {found} in {header}"
        )
    prompt_column = columns[0]
    seed_column = next((name for name in header if name.strip().lower() == "seed"), None)
    records = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise PromptFileError(f"{where}: more cells than the {len(header)} columns of the header")
        metadata = {
            name.strip().lower(): value
            for name, value in row.items()
            if name not in (prompt_column, seed_column) and value is not None and value.strip()
        }
        prompt = row[prompt_column] or ""
        records.append(_record(where, prompt, _csv_seed(where, row.get(seed_column) if seed_column else None), metadata))
    return records


def _from_builtin(name: str) -> list[PromptRecord]:
    from ..shapeworld import KINDS, eval_prompts  # function-local: ShapeWorld loads torch, prompt files do not
    from ..shapeworld.scenes import SPLITS

    usage = (f"built-in prompt set {name!r}: expected 'shapeworld:KIND[+KIND...][:SPLIT][:N]' with KIND in {KINDS}, "
             f"SPLIT in {SPLITS}")
    kind, *rest = name[len(BUILTIN_PREFIX) :].split(":")
    kinds = kind.split("+")
    if not all(k in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise PromptFileError(f"unknown {usage}")
    split = rest.pop(0) if rest and rest[0] in SPLITS else "heldout"
    count = DEFAULT_BUILTIN_SIZE
    if rest:
        text = rest.pop(0)
        if not text.isdigit() or int(text) < 1:
            raise PromptFileError(f"{usage}: N must be an integer >= 1, got {text!r}")
        count = int(text)
    if rest:
        raise PromptFileError(f"{usage}: unexpected {':'.join(rest)!r}")
    return [PromptRecord(prompt, None, {"set": "shapeworld", "kind": k, "split": split})
            for k in kinds for prompt in eval_prompts(k, count, split=split)]


def _from_file(path: Path) -> list[PromptRecord]:
    suffix = path.suffix.lower()
    if suffix not in ("", ".txt", ".jsonl", ".csv", ".tsv"):
        raise PromptFileError(f"{path}: unknown prompt file type {suffix!r}: use .txt, .jsonl, .csv or .tsv")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such prompt file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PromptFileError(f"{path}: cannot read the prompt file ({err})") from None
    if suffix == ".jsonl":
        records = _from_jsonl(path, text.splitlines())
    elif suffix in (".csv", ".tsv"):
        records = _from_csv(path, text, "," if suffix == ".csv" else "\t")
    else:
        records = _from_text(path, text.splitlines())
    if not records:
        raise PromptFileError(f"{path}: no prompts in the file")
    return records


def load_prompts(source: PromptSource) -> list[PromptRecord]:
    """Read ``source`` (a list of strings, a ``.txt`` / ``.jsonl`` / ``.csv`` / ``.tsv`` file or
    ``shapeworld:KIND[:SPLIT][:N]``) into prompt records; see the module docs for the formats.

    Raises :class:`PromptFileError` naming the file and line of the first malformed entry.

    Example:
        >>> records = load_prompts("shapeworld:relation:heldout:2")
        >>> len(records), dict(records[0].metadata)
        (2, {'set': 'shapeworld', 'kind': 'relation', 'split': 'heldout'})
        >>> load_prompts("shapeworld:relation:2") == records
        True
        >>> load_prompts("shapeworld:spiral")
        Traceback (most recent call last):
        ...
        diffaccel.evaluation.prompts.PromptFileError: unknown built-in prompt set 'shapeworld:spiral': ...
    """
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        return _from_builtin(source)
    if isinstance(source, (str, os.PathLike)):
        return _from_file(Path(source))
    if isinstance(source, Sequence):
        records = _from_list(source)
        if not records:
            raise PromptFileError("prompts: the list is empty")
        return records
    raise PromptFileError(f"prompts must be a list of strings, a file path or a built-in set, got {type(source).__name__}")
