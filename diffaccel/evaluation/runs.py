"""The run folder of an evaluation: its spec, its per-sample records and files, its summary.

A run folder holds ``run.json`` (the run's spec: model, prompts fingerprint, variants' specs, seeds,
call settings), ``samples.jsonl`` (one JSON record per (variant, prompt index, seed)), the samples
themselves under ``<variant>/`` and ``summary.json``. Everything is written so that a process
killed at any moment (SIGKILL included) leaves a folder the same command resumes from:

* ``run.json`` and ``summary.json`` and every sample file are written to a temporary file and
  moved into place with :func:`os.replace`, so they are either complete or absent;
* a sample's file is written before its record, so a record always points at a complete file;
* each record is one line, flushed and fsynced; a torn last line (the write a kill interrupted)
  is dropped on reopening and the file truncated to the last complete record.

Several processes (``torchrun``; see :func:`dist_env`) each write their own shard
``samples.rank{r}.jsonl``; after a barrier, rank 0 calls :meth:`RunFolder.merge_shards`.

Example::

    >>> import tempfile
    >>> run = RunFolder(tempfile.mkdtemp(), {"model": "micro-sd", "seeds": [0, 1]})
    >>> run.record("untouched", 0, 0, {"seconds": 0.5})
    {'variant': 'untouched', 'prompt_index': 0, 'seed': 0, 'seconds': 0.5}
    >>> sorted(run.done())
    [('untouched', 0, 0)]
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import DiffaccelError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

__all__ = ["DuplicateSampleError", "RunFolder", "RunSpecMismatch", "SampleKey", "dist_env"]

SampleKey = tuple[str, int, int]
"""A sample's key: (variant name, prompt index, seed)."""

KEY_FIELDS = ("variant", "prompt_index", "seed")
_SHARD = re.compile(r"^samples\.rank(\d+)\.jsonl$")
_VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=:,-]*$")


class RunSpecMismatch(DiffaccelError, ValueError):
    """A run folder already holds a run with a different spec; the message names the keys that differ."""


class DuplicateSampleError(DiffaccelError, ValueError):
    """A (variant, prompt index, seed) was recorded twice with different contents."""


def dist_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from the environment ``torchrun`` and ``accelerate launch`` set
    (``RANK``, ``WORLD_SIZE``); ``(0, 1)`` when they are not set.

    Raises:
        ValueError: the values are not integers with ``0 <= rank < world_size``.

    Example::

        >>> dist_env({})
        (0, 1)
        >>> dist_env({"RANK": "1", "WORLD_SIZE": "2"})
        (1, 2)
        >>> dist_env({"RANK": "2", "WORLD_SIZE": "2"})
        Traceback (most recent call last):
        ...
        ValueError: RANK must be in [0, WORLD_SIZE=2), got 2
    """
    env = os.environ if environ is None else environ
    try:
        rank, world_size = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    except ValueError as error:
        raise ValueError(f"RANK and WORLD_SIZE must be integers: {error}") from None
    _check_rank(rank, world_size, "RANK", "WORLD_SIZE")
    return rank, world_size


def _check_rank(rank: int, world_size: int, rank_name: str, size_name: str) -> None:
    if world_size < 1:
        raise ValueError(f"{size_name} must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{rank_name} must be in [0, {size_name}={world_size}), got {rank}")


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and :func:`os.replace`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the keys where ``old`` and ``new`` differ (recursing into mappings)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}{key}"
            if key not in old or key not in new:
                found.append(path)
            else:
                found += _differences(old[key], new[key], path + ".")
        return found
    return [] if old == new else [prefix.rstrip(".") or "<spec>"]


def _key(record: Mapping[str, Any]) -> SampleKey:
    return (record["variant"], record["prompt_index"], record["seed"])


def _read_records(path: pathlib.Path, repair: bool) -> list[dict[str, Any]]:
    """The complete records of a JSONL file. A torn last line (no newline: the write a kill
    interrupted) is dropped and, with ``repair``, cut off the file; a complete line that is not a
    record raises ``ValueError`` naming the file and line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    *lines, torn = data.split(b"\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            _key(record)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: line {number} is not a sample record") from None
        records.append(record)
    if repair and torn:
        with open(path, "r+b") as file:
            file.truncate(len(data) - len(torn))
            file.flush()
            os.fsync(file.fileno())
    return records


def _collect(paths: Iterable[pathlib.Path], repair: pathlib.Path | None = None) -> dict[SampleKey, dict[str, Any]]:
    """The records of ``paths`` by key, in file order (only ``repair`` is repaired). A record found
    twice with the same contents (a merge interrupted before it removed the shards) is kept once;
    with different contents it is refused."""
    found: dict[SampleKey, dict[str, Any]] = {}
    for path in paths:
        for record in _read_records(path, repair=path == repair):
            key = _key(record)
            if key in found and found[key] != record:
                raise DuplicateSampleError(f"sample {key} is recorded differently in two places "
                                           f"(one of them {path})")
            found[key] = record
    return found


class RunFolder:
    """One evaluation's folder: ``run.json``, the sample records and files, ``summary.json``.

    Args:
        path: the folder (created with its parents).
        spec: the run's spec, JSON-serialisable. A folder holding a different spec is refused
            (:class:`RunSpecMismatch`) so that two runs are never mixed.
        rank, world_size: this process's place among the processes of the run (:func:`dist_env`).
            With ``world_size > 1`` it records into ``samples.rank{rank}.jsonl``.

    Opening the folder repairs this process's record file (drops a torn last line); what is
    already recorded (:meth:`done`) is what a resumed run skips.

    Example::

        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = RunFolder(folder, {"model": "micro-sd", "seeds": [0]})
        >>> RunFolder(folder, {"model": "micro-sd", "seeds": [0, 1]})
        Traceback (most recent call last):
        ...
        diffaccel.evaluation.runs.RunSpecMismatch: ... differs in: seeds. ...
    """

    def __init__(self, path: str | os.PathLike, spec: Mapping[str, Any], *, rank: int = 0,
                 world_size: int = 1) -> None:
        _check_rank(rank, world_size, "rank", "world_size")
        self.path = pathlib.Path(path)
        self.rank, self.world_size = rank, world_size
        try:
            self.spec: dict[str, Any] = json.loads(json.dumps(dict(spec), sort_keys=True))
        except (TypeError, ValueError) as error:
            raise ValueError(f"spec must be JSON-serialisable: {error}") from None
        self.path.mkdir(parents=True, exist_ok=True)
        spec_file = self.path / "run.json"
        if not spec_file.exists():
            _atomic_write(spec_file, _json_bytes(self.spec))
        stored = json.loads(spec_file.read_text(encoding="utf-8"))
        differ = _differences(stored, self.spec)
        if differ:
            raise RunSpecMismatch(
                f"{self.path} already holds a run whose spec differs in: {', '.join(differ)}. "
                "Use another output folder, or delete this one to start over; runs are never mixed.")
        self.samples_file = self.path / ("samples.jsonl" if world_size == 1 else f"samples.rank{rank}.jsonl")
        # Every record file counts (a merged samples.jsonl, the shards of this or an earlier world
        # size): what any process recorded is done. Only this process's own file is repaired.
        files = [self.path / "samples.jsonl", *self.shard_files()]
        self._records = _collect(files + ([self.samples_file] if self.samples_file not in files else []),
                                 repair=self.samples_file)

    def done(self) -> set[SampleKey]:
        """The keys ``(variant, prompt_index, seed)`` already recorded (by this process, and in a
        merged ``samples.jsonl`` when sharded).

        Example::

            >>> import tempfile
            >>> run = RunFolder(tempfile.mkdtemp(), {})
            >>> _ = run.record("a", 3, 7, {})
            >>> run.done()
            {('a', 3, 7)}
        """
        return set(self._records)

    def records(self) -> list[dict[str, Any]]:
        """The records :meth:`done` lists, in the order they were written.

        Example::

            >>> import tempfile
            >>> folder = tempfile.mkdtemp()
            >>> _ = RunFolder(folder, {}).record("a", 0, 0, {"psnr": 31.5})
            >>> RunFolder(folder, {}).records()
            [{'variant': 'a', 'prompt_index': 0, 'seed': 0, 'psnr': 31.5}]
        """
        return list(self._records.values())

    def record(self, variant: str, prompt_index: int, seed: int, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append the record of one sample (its key and ``fields``), flushed and fsynced; returns it.

        Raises:
            DuplicateSampleError: the key is already recorded.
            ValueError: ``fields`` repeats a key field or is not JSON-serialisable.

        Example::

            >>> import tempfile
            >>> run = RunFolder(tempfile.mkdtemp(), {})
            >>> run.record("a", 0, 0, {"seconds": 1.0})["seconds"]
            1.0
            >>> run.record("a", 0, 0, {"seconds": 2.0})
            Traceback (most recent call last):
            ...
            diffaccel.evaluation.runs.DuplicateSampleError: sample ('a', 0, 0) is already recorded in ...
        """
        key = self._check_key(variant, prompt_index, seed)
        clash = [name for name in KEY_FIELDS if name in fields]
        if clash:
            raise ValueError(f"fields must not hold the key fields {clash}")
        if key in self._records:
            raise DuplicateSampleError(f"sample {key} is already recorded in {self.path}")
        record = {"variant": variant, "prompt_index": prompt_index, "seed": seed, **fields}
        try:
            line = json.dumps(record) + "\n"
        except (TypeError, ValueError) as error:
            raise ValueError(f"fields must be JSON-serialisable: {error}") from None
        # Round trip through JSON so that what is kept in memory equals what a reopening reads.
        record = json.loads(line)
        with open(self.samples_file, "a", encoding="utf-8") as file:
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
        self._records[key] = record
        return record

    @staticmethod
    def _check_key(variant: str, prompt_index: int, seed: int) -> SampleKey:
        if not isinstance(variant, str) or not _VARIANT.match(variant):
            raise ValueError(f"variant must be a name of letters, digits and _.+=:,- (usable as a folder), got {variant!r}")
        for name, value in (("prompt_index", prompt_index), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        return (variant, prompt_index, seed)

    def sample_path(self, variant: str, prompt_index: int, seed: int, suffix: str) -> pathlib.Path:
        """Where a sample's file goes: ``<run>/<variant>/p<prompt_index>_s<seed><suffix>``.

        Example::

            >>> RunFolder(tempfile.mkdtemp(), {}).sample_path("a", 3, 7, ".png").name
            'p00003_s7.png'
        """
        self._check_key(variant, prompt_index, seed)
        if not re.fullmatch(r"\.?[A-Za-z0-9]+", suffix):
            raise ValueError(f"suffix must be a file extension such as '.png', got {suffix!r}")
        suffix = suffix if suffix.startswith(".") else "." + suffix
        return self.path / variant / f"p{prompt_index:05d}_s{seed}{suffix}"

    def _save(self, variant: str, prompt_index: int, seed: int, suffix: str, write: Any) -> pathlib.Path:
        path = self.sample_path(variant, prompt_index, seed, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        write(buffer)
        _atomic_write(path, buffer.getvalue())
        return path

    def save_image(self, variant: str, prompt_index: int, seed: int, image: Image.Image) -> pathlib.Path:
        """Write a sample's image as PNG, atomically; call it before :meth:`record`. Returns its path.

        Example::

            >>> from PIL import Image
            >>> run = RunFolder(tempfile.mkdtemp(), {})
            >>> path = run.save_image("a", 0, 0, Image.new("RGB", (8, 8), "red"))
            >>> Image.open(path).getpixel((0, 0))
            (255, 0, 0)
        """
        return self._save(variant, prompt_index, seed, ".png", lambda buffer: image.save(buffer, format="PNG"))

    def save_clip(self, variant: str, prompt_index: int, seed: int, frames: Sequence[Image.Image],
                  fps: float = 8.0) -> pathlib.Path:
        """Write a sample's clip as a looping GIF, atomically; call it before :meth:`record`.

        Example::

            >>> from PIL import Image
            >>> run = RunFolder(tempfile.mkdtemp(), {})
            >>> frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue", "lime")]
            >>> Image.open(run.save_clip("a", 0, 0, frames)).n_frames
            3
        """
        if not frames:
            raise ValueError("frames must hold at least one frame")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")

        def write(buffer: io.BytesIO) -> None:
            frames[0].save(buffer, format="GIF", save_all=True, append_images=list(frames[1:]),
                           duration=round(1000 / fps), loop=0, disposal=1)

        return self._save(variant, prompt_index, seed, ".gif", write)

    def write_summary(self, summary: Mapping[str, Any]) -> pathlib.Path:
        """Write ``summary.json`` atomically; returns its path.

        Example::

            >>> run = RunFolder(tempfile.mkdtemp(), {})
            >>> json.loads(run.write_summary({"fid": 1.5}).read_text())
            {'fid': 1.5}
        """
        path = self.path / "summary.json"
        _atomic_write(path, _json_bytes(dict(summary)))
        return path

    def shard_files(self) -> list[pathlib.Path]:
        """Every ``samples.rank{r}.jsonl`` in the folder (of any world size), by rank.

        Example::

            >>> folder = tempfile.mkdtemp()
            >>> _ = RunFolder(folder, {}, rank=1, world_size=2).record("a", 0, 0, {})
            >>> [path.name for path in RunFolder(folder, {}).shard_files()]
            ['samples.rank1.jsonl']
        """
        found = [(int(match.group(1)), path) for path in self.path.iterdir() if (match := _SHARD.match(path.name))]
        return [path for _, path in sorted(found)]

    def merge_shards(self) -> list[dict[str, Any]]:
        """Rank 0, after every rank has finished (a barrier): merge ``samples.jsonl`` and every
        shard into ``samples.jsonl``, ordered by key, and remove the shards. Returns the merged records.

        A record found in two files with the same contents (a merge interrupted between writing
        ``samples.jsonl`` and removing the shards) is kept once; with different contents it is
        refused. Merging again after a completed merge changes nothing.

        Raises:
            DuplicateSampleError: two files record the same key differently.
            RuntimeError: called on a rank other than 0.

        Example::

            >>> folder = tempfile.mkdtemp()
            >>> shards = [RunFolder(folder, {}, rank=r, world_size=2) for r in (0, 1)]
            >>> _ = shards[1].record("a", 1, 0, {}); _ = shards[0].record("a", 0, 0, {})
            >>> [record["prompt_index"] for record in shards[0].merge_shards()]
            [0, 1]
            >>> [record["prompt_index"] for record in RunFolder(folder, {}).records()]
            [0, 1]
        """
        if self.rank != 0:
            raise RuntimeError(f"merge_shards runs on rank 0 only (this is rank {self.rank})")
        shards = self.shard_files()
        merged = _collect([self.path / "samples.jsonl", *shards])
        ordered = [merged[key] for key in sorted(merged)]
        _atomic_write(self.path / "samples.jsonl", "".join(json.dumps(record) + "\n" for record in ordered).encode())
        for path in shards:
            path.unlink()
        self.samples_file = self.path / "samples.jsonl"
        self.world_size = 1
        self._records = {_key(record): record for record in ordered}
        return ordered
