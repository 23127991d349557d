"""``diffaccel.evaluate`` / ``diffaccel eval``: the run on tiny pipelines, resuming after SIGKILL,
sharding under torchrun, refusing bad input before any model work."""

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
import torch
from PIL import Image

import diffaccel.loading
from diffaccel.evaluation import driver
from diffaccel.evaluation.driver import EvaluationError, evaluate
from diffaccel.evaluation.prompts import PromptFileError
from diffaccel.evaluation.runs import RunSpecMismatch
from diffaccel.evaluation.variants import VariantSpecError

REPO = Path(__file__).resolve().parents[1]
TINY = "diffaccel/tiny-random-sd"
PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SMALL = {"num_inference_steps": 4, "height": 64, "width": 64}
#: Record fields that are measurements of the machine, not of the samples.
TIMING_FIELDS = {"seconds", "batch_seconds", "peak_memory_mb", "processes"}
SUMMARY_TIMING = {"speedup", "seconds_median", "peak_memory_mb"}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1"}


def _records(folder: Path) -> list[dict]:
    lines = (folder / "samples.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _without(record: dict, fields: set[str]) -> dict:
    return {key: value for key, value in record.items() if key not in fields}


def _quality(summary: dict) -> dict:
    """The summary without what depends on the machine's speed."""
    out = {key: value for key, value in summary.items() if key not in ("processes", "timing", "threads")}
    out["variants"] = {name: _without(row, SUMMARY_TIMING) for name, row in summary["variants"].items()}
    return out


def test_untouched_variant_equals_a_plain_pipeline_call(tmp_path):
    summary = evaluate(TINY, PROMPTS, {"reuse": "encoder-reuse:uniform:2"}, out_dir=tmp_path, seeds=[0, 3],
                       metrics=["psnr"], batch_size=2, warmup=False, progress=False, **SMALL)
    pipe = diffaccel.loading.load_pipeline(TINY, "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for record in _records(tmp_path):
        if record["variant"] != "untouched":
            continue
        plain = pipe(record["prompt"], generator=torch.Generator().manual_seed(record["seed"]), output_type="np",
                     **SMALL).images[0]
        saved = np.asarray(Image.open(tmp_path / record["file"]))
        # batched with other prompts vs alone: the same image up to float rounding in the batched matmuls
        assert np.abs(saved.astype(int) - (plain * 255).round().astype(int)).max() <= 1, record
    assert summary["variants"]["untouched"]["n"] == 6
    assert summary["variants"]["reuse"]["metrics"]["psnr"]["mean"] < 100  # it did change the images
    assert (tmp_path / "report.md").is_file() and (tmp_path / "summary.json").is_file()


def test_untouched_samples_equal_the_plain_batched_call_bitwise(tmp_path):
    evaluate(TINY, PROMPTS[:2], None, out_dir=tmp_path, seeds=[5], metrics=["psnr"], batch_size=2,
             warmup=False, progress=False, **SMALL)
    pipe = diffaccel.loading.load_pipeline(TINY, "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPTS[:2], generator=[torch.Generator().manual_seed(5) for _ in range(2)], output_type="np",
                 **SMALL).images
    for index in range(2):
        saved = np.asarray(Image.open(tmp_path / "untouched" / f"p{index:05d}_s5.png"))
        np.testing.assert_array_equal(saved, (plain[index] * 255).round().astype(np.uint8))


def test_rerun_skips_what_is_recorded_and_a_changed_spec_is_refused(tmp_path, monkeypatch):
    kwargs = dict(metrics=["psnr", "ssim"], batch_size=2, warmup=False, progress=False, **SMALL)
    first = evaluate(TINY, PROMPTS, {"dc": "delta-cache:0.2"}, out_dir=tmp_path, **kwargs)
    calls = []
    monkeypatch.setattr(driver._Run, "generate", lambda self, *a: calls.append(a) or pytest.fail("regenerated"))
    again = evaluate(TINY, PROMPTS, {"dc": "delta-cache:0.2"}, out_dir=tmp_path, **kwargs)
    assert calls == [] and _quality(again) == _quality(first)
    assert len(_records(tmp_path)) == 6
    with pytest.raises(RunSpecMismatch, match="seeds"):
        evaluate(TINY, PROMPTS, {"dc": "delta-cache:0.2"}, out_dir=tmp_path, seeds=[1], **kwargs)
    with pytest.raises(RunSpecMismatch, match="variants"):
        evaluate(TINY, PROMPTS, {"dc": "delta-cache:0.1"}, out_dir=tmp_path, **kwargs)


EVAL_ARGS = ["eval", "--model", TINY, "--prompts", "PROMPTS", "--variant", "reuse=encoder-reuse:uniform:2",
             "--metrics", "psnr,ssim,fid", "--steps", "4", "--height", "64", "--width", "64", "--batch-size", "1",
             "--no-warmup", "--quiet"]


def _eval_command(prompt_file: Path, out: Path) -> list[str]:
    args = [str(prompt_file) if a == "PROMPTS" else a for a in EVAL_ARGS]
    return [sys.executable, "-m", "diffaccel", *args, "--out", str(out)]


def test_resume_after_sigkill_gives_the_uninterrupted_summary(tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS * 2) + "\n")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_eval_command(prompt_file, whole), env=_env(), check=True, capture_output=True, timeout=600)
    process = subprocess.Popen(_eval_command(prompt_file, killed), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once a few samples are recorded, mid-run
        samples = killed / "samples.jsonl"
        if samples.exists() and len(samples.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists(), "the run ended before it was killed: kill it earlier"
    subprocess.run(_eval_command(prompt_file, killed), env=_env(), check=True, capture_output=True, timeout=600)
    records = _records(killed)
    keys = [(r["variant"], r["prompt_index"], r["seed"]) for r in records]
    assert len(keys) == len(set(keys)) == 12
    by_key = {(r["variant"], r["prompt_index"], r["seed"]): _without(r, TIMING_FIELDS) for r in _records(whole)}
    assert {k: _without(r, TIMING_FIELDS) for k, r in zip(keys, records)} == by_key
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (whole, killed)]
    assert _quality(summaries[0]) == _quality(summaries[1])
    assert summaries[0]["variants"]["reuse"]["fid"] is not None


def test_two_process_torchrun_gives_the_one_process_records(tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_eval_command(prompt_file, one), env=_env(), check=True, capture_output=True, timeout=600)
    command = _eval_command(prompt_file, two)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                "-m", "diffaccel", *command[3:], "--timing-rounds", "1"]
    result = subprocess.run(torchrun, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(two.glob("samples.rank*.jsonl")), "rank 0 merges the shards"
    key = lambda r: (r["variant"], r["prompt_index"], r["seed"])  # noqa: E731
    assert sorted(map(key, _records(two))) == sorted(map(key, _records(one)))
    assert {key(r): _without(r, TIMING_FIELDS) for r in _records(two)} == \
        {key(r): _without(r, TIMING_FIELDS) for r in _records(one)}
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and "rank 0 alone" in summary["timing"]
    assert summary["variants"]["reuse"]["speedup"] is not None
    assert len(json.loads((two / "timing.json").read_text())) == 2  # 1 round x 2 variants


@pytest.fixture
def no_model_work(monkeypatch):
    """Fails the test if a model would load."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(diffaccel.loading, "load_any_pipeline", refuse)
    monkeypatch.setattr(diffaccel.loading, "load_pipeline", refuse)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"prompts": "PROMPT_FILE"}, PromptFileError, r"prompts\.jsonl:2"),
    ({"variants": {"x": "delta-cache:fast"}}, VariantSpecError, "variant 'x'"),
    ({"variants": ["reuse=encoder-reuse:sometimes"]}, VariantSpecError, "variant 'reuse'"),
    ({"variants": {"x": "nosuch:1"}}, VariantSpecError, "unknown feature or peer 'nosuch:1'"),
    ({"model": "diffaccel/tiny-random-wan", "variants": {"r": "encoder-reuse:uniform:2"}}, VariantSpecError,
     "needs a unet denoiser"),
    ({"metrics": ["psnr", "sharpness"]}, EvaluationError, "unknown metric 'sharpness'"),
    ({"metrics": ["verifier"], "prompts": ["a cat on a mat"]}, EvaluationError, "ShapeWorld captions only"),
    ({"out_dir": "FILE/sub"}, EvaluationError, "cannot write there"),
    ({"seeds": [0, 0]}, EvaluationError, "must not repeat"),
    ({"num_inference_steps": 0}, EvaluationError, "num_inference_steps"),
    ({"num_inference_steps": 5000}, EvaluationError, "at most 1000 steps"),
    ({"height": 65}, EvaluationError, "height=65"),
    ({"model": "./no/such/model"}, EvaluationError, "no such folder"),
    ({"scheduler": "NoSuchScheduler"}, EvaluationError, "not a diffusers scheduler"),
    ({"batch_size": 0}, EvaluationError, "batch_size"),
])
def test_bad_input_is_refused_before_model_work(tmp_path, no_model_work, kwargs, error, message):
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text('{"prompt": "a red circle"}\n{"prompt": 3}\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    call = {"model": TINY, "prompts": PROMPTS, "variants": None, "out_dir": tmp_path / "run", **kwargs}
    if call["prompts"] == "PROMPT_FILE":
        call["prompts"] = prompt_file
    if call["out_dir"] == "FILE/sub":
        call["out_dir"] = blocker / "sub"
    with pytest.raises(error, match=message):
        evaluate(call.pop("model"), call.pop("prompts"), call.pop("variants"), progress=False, **call)
    assert not (tmp_path / "run" / "samples.jsonl").exists()


def test_a_missing_peer_package_is_refused_before_model_work(tmp_path, no_model_work, monkeypatch):
    monkeypatch.setattr(driver, "missing_peer_packages", lambda variants: {"q": "optimum.quanto"})
    with pytest.raises(VariantSpecError, match="q needs optimum.quanto"):
        evaluate(TINY, PROMPTS, {"q": "quanto:int8"}, out_dir=tmp_path, progress=False)


def test_cli_bad_input_is_a_one_line_error(tmp_path):
    command = [sys.executable, "-m", "diffaccel", "eval", "--prompts", "shapeworld:spiral", "--out", str(tmp_path)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("diffaccel: error: unknown built-in prompt set")
    assert "Traceback" not in result.stderr


def test_variants_accept_configs_and_none(tmp_path):
    import diffaccel

    summary = evaluate(TINY, PROMPTS[:2], {"base": None, "dc": diffaccel.DeltaCacheConfig(threshold=0.2),
                                           "both": [diffaccel.EncoderReuseConfig("uniform:2"),
                                                    diffaccel.DeltaCacheConfig(threshold=0.2)]},
                       out_dir=tmp_path, metrics=["psnr"], batch_size=2, warmup=False, progress=False, **SMALL)
    assert list(summary["variants"]) == ["untouched", "base", "dc", "both"]
    assert summary["variants"]["base"]["metrics"]["psnr"]["mean"] == float("inf")
    assert set(summary["variants"]["both"]["settings"]["features"]) == {"encoder_reuse", "delta_cache"}


def test_in_memory_pipelines_are_fingerprinted_and_feature_stats_recorded(tmp_path):
    from diffaccel.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    kwargs = dict(metrics=["psnr"], warmup=False, progress=False, **SMALL)
    evaluate(pipe, PROMPTS[:1], {"dc": "delta-cache:0.2"}, out_dir=tmp_path, **kwargs)
    features = {r["variant"]: r["features"] for r in _records(tmp_path)}
    assert features["untouched"] is None and features["dc"]["delta_cache"]["blocks_skipped"] >= 0
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)
    with pytest.raises(RunSpecMismatch, match="model"):
        evaluate(pipe, PROMPTS[:1], {"dc": "delta-cache:0.2"}, out_dir=tmp_path, **kwargs)


def test_steering_variants_keep_their_best_candidate_and_count_every_evaluation(tmp_path):
    summary = evaluate(TINY, PROMPTS[:2], {"one": "best-of:1", "two": "best-of:2",
                                           "fk": "fk:particles=2,resample_every=1,resample_start=1"},
                       out_dir=tmp_path, metrics=["psnr"], batch_size=2, warmup=False, progress=False, **SMALL)
    rewards = {(r["variant"], r["prompt_index"]): r.get("steering_reward") for r in _records(tmp_path)}
    for index in range(2):  # candidate 0 of best-of-2 is best-of-1's sample: the best of two is at least as good
        assert rewards[("two", index)] >= rewards[("one", index)] - 1e-4
    rows = summary["variants"]
    assert rows["untouched"]["kind"] == "untouched" and rows["two"]["kind"] == "steering"
    assert rows["two"]["nfe_mean"] == 2 * rows["one"]["nfe_mean"] == 2 * rows["untouched"]["nfe_mean"]
    assert rows["fk"]["settings"]["steering"]["num_particles"] == 2
    assert "steering_reward" in summary["metrics"] and rows["untouched"]["metrics"].get("steering_reward") is None


def test_steering_reward_without_steering_warns_and_rbf_needs_a_flow_model(tmp_path, no_model_work):
    with pytest.raises(VariantSpecError, match="flow-matching models only"):
        evaluate(TINY, PROMPTS, {"r": "search:rbf,budget_nfe=40"}, out_dir=tmp_path, progress=False)
    with pytest.raises(EvaluationError, match="steering_reward"):
        evaluate(TINY, PROMPTS, {"b": "best-of:2"}, out_dir=tmp_path, steering_reward="nosuch", progress=False)
    with pytest.warns(UserWarning, match="steering_reward is unused"), pytest.raises(AssertionError, match="loaded"):
        evaluate(TINY, PROMPTS, None, out_dir=tmp_path, steering_reward="shapeworld", progress=False)
