"""The evaluation run folder: records round trip, spec mismatches refused, resume after SIGKILL and
after a torn line loses and duplicates nothing, shards merge to what one process writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffaccel.evaluation.runs import DuplicateSampleError, RunFolder, RunSpecMismatch

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"model": "micro-sd", "prompts": "sha256:abc", "variants": {"untouched": None, "fast": {"delta_cache": {}}},
        "seeds": [0, 1, 2], "call": {"num_inference_steps": 4}}
KEYS = [(variant, prompt, seed) for variant in ("fast", "untouched") for prompt in range(4) for seed in (0, 1, 2)]


def make_samples(folder: Path, rank: int = 0, world_size: int = 1, pause: float = 0.0) -> None:
    """Make every sample of KEYS not yet recorded (this rank's share of them): an image written
    first, then (``pause`` seconds later) the record; print each key once recorded."""
    run = RunFolder(folder, SPEC, rank=rank, world_size=world_size)
    done = run.done()
    for number, (variant, prompt, seed) in enumerate(KEYS):
        if number % world_size != rank or (variant, prompt, seed) in done:
            continue
        pixels = np.random.default_rng([prompt, seed, len(variant)]).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        path = run.save_image(variant, prompt, seed, Image.fromarray(pixels))
        time.sleep(pause)
        run.record(variant, prompt, seed, {"value": prompt * 10 + seed + 0.25, "image": str(path.relative_to(folder)),
                                           "tags": [variant, "x" * 2000]})
        print(variant, prompt, seed, flush=True)


# The same in another process, its rank and world size read from the environment as under torchrun.
WORKER = """
import os, sys
sys.path.insert(0, sys.argv[2])
from diffaccel.evaluation.runs import dist_env
from test_eval_runs import make_samples
rank, world_size = dist_env()
make_samples(sys.argv[1], rank, world_size, float(os.environ.get("PAUSE", "0")))
"""


def _worker(folder: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def _sorted(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda record: (record["variant"], record["prompt_index"], record["seed"]))


def _file_keys(folder: Path, name: str = "samples.jsonl") -> list[tuple]:
    lines = (folder / name).read_text().splitlines()
    return [(r["variant"], r["prompt_index"], r["seed"]) for r in map(json.loads, lines)]


def test_records_round_trip_with_their_files(tmp_path):
    run = RunFolder(tmp_path / "run", SPEC)
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == SPEC
    image = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    path = run.save_image("untouched", 2, 1, image)
    clip = run.save_clip("fast", 2, 1, frames, fps=4)
    written = [run.record("untouched", 2, 1, {"psnr": float("inf"), "seconds": 0.125, "image": path.name}),
               run.record("fast", 2, 1, {"psnr": 31.0625, "nfe": 4, "clip": clip.name, "scores": {"count": 1.0}})]
    assert path == tmp_path / "run" / "untouched" / "p00002_s1.png"
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert Image.open(clip).n_frames == 2 and clip.parent.name == "fast"
    reopened = RunFolder(tmp_path / "run", json.loads(json.dumps(SPEC)))  # same spec, another object
    assert reopened.records() == written == run.records()
    assert reopened.records()[0]["psnr"] == float("inf")
    assert reopened.done() == {("untouched", 2, 1), ("fast", 2, 1)}
    summary = reopened.write_summary({"fast": {"speedup": 2.5}})
    assert json.loads(summary.read_text()) == {"fast": {"speedup": 2.5}}
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]


def test_a_different_spec_is_refused_naming_the_keys(tmp_path):
    run = RunFolder(tmp_path, SPEC)
    run.record("fast", 0, 0, {"value": 1.0})
    changed = {**SPEC, "model": "micro-video", "variants": {**SPEC["variants"], "fast": {"delta_cache": {"threshold": 0.1}}}}
    with pytest.raises(RunSpecMismatch, match=r"differs in: model, variants\.fast\.delta_cache\.threshold\.") as info:
        RunFolder(tmp_path, changed)
    assert "seeds" not in str(info.value)
    with pytest.raises(RunSpecMismatch, match="differs in: extra"):
        RunFolder(tmp_path, {**SPEC, "extra": 1})
    assert json.loads((tmp_path / "run.json").read_text()) == SPEC  # nothing was mixed in
    assert RunFolder(tmp_path, dict(reversed(list(SPEC.items())))).done() == {("fast", 0, 0)}


def test_a_duplicate_key_is_refused_also_after_reopening(tmp_path):
    RunFolder(tmp_path, SPEC).record("fast", 1, 2, {"value": 1.0})
    run = RunFolder(tmp_path, SPEC)
    with pytest.raises(DuplicateSampleError, match=r"\('fast', 1, 2\)"):
        run.record("fast", 1, 2, {"value": 2.0})
    with pytest.raises(ValueError, match="key fields"):
        run.record("fast", 1, 3, {"seed": 4})
    with pytest.raises(ValueError, match="variant must be"):
        run.record("../escape", 0, 0, {})
    assert _file_keys(tmp_path) == [("fast", 1, 2)]


def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path):
    run = RunFolder(tmp_path, SPEC)
    kept = [run.record("fast", i, 0, {"value": float(i)}) for i in range(3)]
    size = (tmp_path / "samples.jsonl").stat().st_size
    with open(tmp_path / "samples.jsonl", "a") as file:
        file.write(json.dumps({"variant": "fast", "prompt_index": 3, "seed": 0, "value": 3.0})[:-7])
    reopened = RunFolder(tmp_path, SPEC)
    assert reopened.records() == kept
    assert (tmp_path / "samples.jsonl").stat().st_size == size
    reopened.record("fast", 3, 0, {"value": 3.0})
    assert _file_keys(tmp_path) == [("fast", i, 0) for i in range(4)]
    with open(tmp_path / "samples.jsonl", "a") as file:  # a broken line that is not the last is not silently dropped
        file.write("{broken\n" + json.dumps({"variant": "fast", "prompt_index": 9, "seed": 0}) + "\n")
    with pytest.raises(ValueError, match="line 5 is not a sample record"):
        RunFolder(tmp_path, SPEC)


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    make_samples(reference)

    interrupted = tmp_path / "interrupted"
    process = _worker(interrupted, {"PAUSE": "0.2"})  # slow enough to be killed long before the end
    for _ in range(7):
        assert process.stdout.readline()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    after_kill = RunFolder(interrupted, SPEC)
    keys = _file_keys(interrupted)
    assert 7 <= len(keys) < len(KEYS) and len(set(keys)) == len(keys)
    assert set(keys) == after_kill.done() <= set(KEYS)
    for record in after_kill.records():  # every record points at a complete file
        image = np.asarray(Image.open(interrupted / record["image"]))
        assert image.shape == (16, 16, 3)

    make_samples(interrupted)
    final = RunFolder(interrupted, SPEC).records()
    assert _sorted(final) == _sorted(RunFolder(reference, SPEC).records())
    assert len(_file_keys(interrupted)) == len(KEYS)
    for record in final:
        assert (interrupted / record["image"]).read_bytes() == (reference / record["image"]).read_bytes()


def test_two_processes_writing_shards_merge_to_a_single_process_run(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    make_samples(single)
    workers = [_worker(sharded, {"RANK": str(rank), "WORLD_SIZE": "2"}) for rank in (0, 1)]
    for worker in workers:
        worker.communicate(timeout=120)
        assert worker.returncode == 0
    assert sorted(path.name for path in sharded.glob("samples*.jsonl")) == ["samples.rank0.jsonl", "samples.rank1.jsonl"]
    assert RunFolder(sharded, SPEC, rank=1, world_size=2).done() == set(KEYS)  # every shard counts as done
    with pytest.raises(RuntimeError, match="rank 0 only"):
        RunFolder(sharded, SPEC, rank=1, world_size=2).merge_shards()

    merged = RunFolder(sharded, SPEC, rank=0, world_size=2).merge_shards()
    assert merged == _sorted(RunFolder(single, SPEC).records())
    assert _file_keys(sharded) == sorted(KEYS) and not list(sharded.glob("samples.rank*.jsonl"))
    assert RunFolder(sharded, SPEC).records() == merged
    assert RunFolder(sharded, SPEC).merge_shards() == merged  # merging again changes nothing


def test_merge_survives_an_interrupted_merge_and_refuses_conflicts(tmp_path):
    shards = [RunFolder(tmp_path, SPEC, rank=rank, world_size=2) for rank in (0, 1)]
    shards[0].record("fast", 0, 0, {"value": 1.0})
    shards[1].record("fast", 1, 0, {"value": 2.0})
    shard_bytes = (tmp_path / "samples.rank1.jsonl").read_bytes()
    merged = shards[0].merge_shards()
    (tmp_path / "samples.rank1.jsonl").write_bytes(shard_bytes)  # as if killed before removing the shards
    assert RunFolder(tmp_path, SPEC).merge_shards() == merged
    (tmp_path / "samples.rank1.jsonl").write_text(json.dumps({"variant": "fast", "prompt_index": 1, "seed": 0,
                                                              "value": 9.0}) + "\n")
    with pytest.raises(DuplicateSampleError, match=r"\('fast', 1, 0\) is recorded differently"):
        RunFolder(tmp_path, SPEC)
