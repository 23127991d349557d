"""``diffaccel`` checks every input before the model loads: one-line errors, warnings for options
that do nothing, caps a user raises on purpose, and a parser that imports no torch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffaccel.cli import build_parser, image, main, models, report, steering
from diffaccel.cli.checks import ModelInfo, describe_model
from diffaccel.cli.models import RANDOM_MODEL, RANDOM_MODEL_INFO, RANDOM_VIDEO_INFO, RANDOM_VIDEO_MODEL

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle"


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading its model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_pipeline", refuse)
    monkeypatch.setattr(models, "load_video_pipeline", refuse)


def _error(argv: list[str], capsys) -> str:
    """The one-line error ``main(argv)`` stops with (SystemExit), stderr included."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    text = (info.value.code if isinstance(info.value.code, str) else "") + capsys.readouterr().err
    return text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "100000"], "--steps 100000 is above --max-steps 1000; pass --max-steps 100000"),
        (["--steps", "1500", "--max-steps", "2000"], "DDIMScheduler has 1000 training timesteps"),
        (["--height", "100000", "--width", "100000"], "--height 100000 is above --max-size 2048"),
        (["--height", "65"], "--height 65: micro-sd needs a multiple of 8 (e.g. 64 or 72)"),
        (["--width", "36", "--model", RANDOM_MODEL], "--width 36: diffaccel/tiny-random-sd needs a multiple of 8"),
        (["--encoder-reuse", "0,1,80", "--steps", "20"], "--encoder-reuse: key step 80 is out of range"),
        (["--preset", "fast", "--encoder-reuse", "uniform:2"],
         "--preset fast and --encoder-reuse both configure the UNet's reuse: give one"),
        (["--preset", "fastest"], "argument --preset: invalid choice: 'fastest'"),
        (["--search", "rbf"], "--search rbf is for flow-matching models (Flux, SD3, LTX, Wan); micro-sd's scheduler"),
        (["--search", "rbf", "--quantize", "int8"], "cannot go with --quantize"),
        (["--search", "random", "--budget", "10"], "--budget 10: --search random needs at least 1 x --steps = 50 NFE"),
        (["--search", "paths", "--steps", "4", "--budget", "7"], "needs at least 2 x --steps = 8 NFE"),
        (["--model", "micro-video"], "is a text-to-video pipeline (WanPipeline): use `diffaccel generate-video`"),
        (["--model", RANDOM_VIDEO_MODEL], "is a text-to-video pipeline"),
        (["--model", "./no/such/model"], "--model ./no/such/model: no such folder (nor a hub id like org/name)"),
        (["--model", "typo-model"], "no such folder (nor a hub id"),
        (["--device", "nosuch"], "--device nosuch:"),
    ],
)
def test_generate_refuses_bad_input_before_loading(tmp_path, capsys, no_loading, extra, message):
    out = tmp_path / "x.png"
    error = _error(["generate", PROMPT, "--out", str(out), *extra], capsys)
    assert message in error
    assert "Traceback" not in error and not out.exists()


def test_a_folder_that_is_not_a_diffusers_model(tmp_path, capsys, no_loading):
    (tmp_path / "weights").mkdir()
    error = _error(["generate", PROMPT, "--model", str(tmp_path / "weights"), "--out", str(tmp_path / "x.png")], capsys)
    assert f"--model {tmp_path / 'weights'} is not a diffusers pipeline folder (no model_index.json)" in error


def test_a_path_under_an_existing_folder_is_not_taken_for_a_hub_id(tmp_path, capsys, no_loading, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert "models/sd15: no such folder" in _error(["generate", PROMPT, "--model", "models/sd15", "--out", "x.png"], capsys)


def test_unwritable_out_fails_before_the_generation(tmp_path, capsys, no_loading):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "plain.png").write_bytes(b"an earlier image")
    out = tmp_path / "out" / "plain.png" / "sub" / "x.png"  # the case: a file where a folder must be
    assert "plain.png is a file, not a folder" in _error(["generate", PROMPT, "--out", str(out)], capsys)
    assert (tmp_path / "out" / "plain.png").read_bytes() == b"an earlier image"
    (tmp_path / "folder.png").mkdir()
    assert "folder.png is a folder" in _error(["generate", PROMPT, "--out", str(tmp_path / "folder.png")], capsys)


def test_unwritable_stats_json_fails_before_the_generation(tmp_path, capsys, no_loading):
    (tmp_path / "file").write_text("x")
    error = _error(["generate", PROMPT, "--out", str(tmp_path / "x.png"), "--stats-json",
                    str(tmp_path / "file" / "stats.json")], capsys)
    assert "--stats-json" in error and "is a file, not a folder" in error


def test_the_out_folder_is_made_before_the_model_loads(tmp_path, monkeypatch):
    def loaded(*args, **kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr(models, "load_pipeline", loaded)
    with pytest.raises(RuntimeError, match="stop here"):
        main(["generate", PROMPT, "--out", str(tmp_path / "new" / "deeper" / "x.png")])
    assert (tmp_path / "new" / "deeper").is_dir()


@pytest.mark.parametrize(
    "reward, message",
    [
        ("nosuch", "unknown reward 'nosuch'"),
        ("transformers-clip:no/such/folder", "not a transformers CLIPModel folder"),
        ("aesthetic:missing.safetensors", "no such aesthetic head file"),
        ("shapeworld:extra", "unknown reward"),
    ],
)
def test_bad_reward_is_a_usage_error(tmp_path, capsys, no_loading, reward, message):
    with pytest.raises(SystemExit) as info:
        main(["generate", PROMPT, "--out", str(tmp_path / "x.png"), "--particles", "2", "--reward", reward])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_options_that_do_nothing_warn(tmp_path, capsys, no_loading):
    """Warned before anything else runs (here a later error stops the command before loading)."""
    error = _error(["generate", PROMPT, "--out", str(tmp_path / "x.png"), "--reward", "shapeworld", "--budget", "8",
                    "--lmbda", "3", "--resample-start", "2", "--no-parallel", "--noise-injection", "0.1",
                    "--height", "65"], capsys)
    for flag, needs in (("--reward", "--particles or --search"), ("--budget", "--search"), ("--lmbda", "--particles"),
                        ("--resample-start", "--particles"), ("--parallel", "--encoder-reuse"),
                        ("--noise-injection", "--encoder-reuse")):
        assert f"diffaccel: warning: {flag} has no effect without {needs}; ignored" in error
    assert "--potential" not in error and "needs a multiple of 8" in error


def test_steering_options_keep_their_defaults_when_not_given():
    args = build_parser().parse_args(["generate", PROMPT, "--out", "x.png", "--particles", "2"])
    image.preflight(args)
    assert (args.reward, args.potential, args.lmbda, args.resample_every, args.resample_start, args.ess_threshold) == (
        "shapeworld", "max", 10.0, 2, round(0.6 * args.steps), 0.5)  # FKSteeringConfig.measured's


def test_generate_video_refuses_bad_input_before_loading(tmp_path, capsys, no_loading):
    out = str(tmp_path / "c.gif")
    cases = [
        (["--frames", "1000"], "--frames 1000 is above --max-frames 257"),
        (["--steps", "5000"], "is above --max-steps 1000"),
        (["--model", RANDOM_VIDEO_MODEL, "--height", "40"], "--height 40: diffaccel/tiny-random-wan needs a multiple of 16"),
        (["--model", RANDOM_VIDEO_MODEL, "--frames", "10"], "needs 4k + 1 frames (e.g. 9 or 13)"),
        (["--model", RANDOM_MODEL], "is not a text-to-video pipeline (StableDiffusionPipeline)"),
        (["--model", str(tmp_path)], "is not a diffusers pipeline folder"),
    ]
    for extra, message in cases:
        assert message in _error(["generate-video", PROMPT, "--out", out, *extra], capsys), extra
    (tmp_path / "taken").write_text("x")
    assert "is a file, not a folder" in _error(["generate-video", PROMPT, "--model", RANDOM_VIDEO_MODEL, "--out",
                                                str(tmp_path / "taken" / "c.gif")], capsys)
    assert not os.path.exists(out)


def test_bundled_micro_video_frames_and_size(tmp_path, capsys, no_loading):
    from diffaccel.micro_models import models_dir

    if not (models_dir() / "micro-video" / "model_index.json").is_file():
        pytest.skip("micro-video has not been exported to assets/models yet")
    out = str(tmp_path / "c.gif")
    assert "--frames 10: micro-video needs 2k + 1 frames (e.g. 9 or 11)" in _error(
        ["generate-video", PROMPT, "--frames", "10", "--out", out], capsys)
    assert "--height 72: micro-video needs a multiple of 16" in _error(
        ["generate-video", PROMPT, "--height", "72", "--out", out], capsys)


def test_a_hub_id_reaches_from_pretrained_and_its_oserror_is_one_line(tmp_path, capsys, monkeypatch):
    from diffusers import DiffusionPipeline

    asked = []

    def offline(model, **kwargs):
        asked.append((model, kwargs))
        raise OSError("Cannot load model org/name: offline mode is enabled.\nSecond line.")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", offline)
    error = _error(["generate", PROMPT, "--model", "org/name", "--out", str(tmp_path / "x.png")], capsys)
    assert asked and asked[0][0] == "org/name" and asked[0][1]["use_safetensors"] is True
    assert "diffaccel: error: --model org/name: Cannot load model org/name: offline mode is enabled. Second line." in error
    error = _error(["generate-video", PROMPT, "--model", "org/wan", "--out", str(tmp_path / "c.gif")], capsys)
    assert asked[-1][0] == "org/wan" and "--model org/wan: Cannot load model" in error


def test_a_hub_id_offline_fails_with_diffusers_message(tmp_path):  # conftest: HF_HUB_OFFLINE=1
    with pytest.raises(SystemExit) as info:  # not diffusers' OSError: no traceback
        main(["generate", PROMPT, "--model", "diffaccel-test/no-such-model", "--out", str(tmp_path / "x.png")])
    message = info.value.code
    assert message.startswith("diffaccel: error: --model diffaccel-test/no-such-model: ") and "\n" not in message
    assert "diffaccel-test/no-such-model" in message.removeprefix("diffaccel: error: --model diffaccel-test/no-such-model: ")


def test_a_hub_model_is_checked_once_loaded_before_generating(tmp_path, capsys, monkeypatch):
    from diffusers import DiffusionPipeline

    from diffaccel.testing import tiny_pipeline

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda model, **kwargs: tiny_pipeline("sd3"))
    base = ["generate", PROMPT, "--model", "org/sd3", "--steps", "2", "--out", str(tmp_path / "x.png")]
    assert "--encoder-reuse needs a UNet pipeline (Stable Diffusion, SDXL); org/sd3 has a transformer" in _error(
        [*base, "--encoder-reuse", "uniform:2"], capsys)
    assert "--preset fast and --delta-cache both configure org/sd3's delta cache: give one" in (
        _error([*base, "--preset", "fast", "--delta-cache", "0.1"], capsys))
    assert "--height 40: org/sd3 needs a multiple of 16" in _error([*base, "--height", "40"], capsys)
    assert not (tmp_path / "x.png").exists()


def test_errors_are_one_line_with_a_non_zero_exit(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffaccel.cli", "generate", PROMPT, "--height", "65", "--out",
                             str(tmp_path / "x.png")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "diffaccel: error: --height 65: micro-sd needs a multiple of 8 (e.g. 64 or 72)"


def test_parsing_imports_no_heavy_library_and_the_drop_ins_still_register():
    code = (
        "import sys; from diffaccel.cli import build_parser; build_parser(); "
        "print([m for m in ('torch','diffusers','transformers') if m in sys.modules]); "
        "import diffaccel; from diffaccel.testing import tiny_pipeline; "
        "from diffaccel.pipelines import AcceleratedStableDiffusionPipeline; "
        "pipe = diffaccel.accelerate(tiny_pipeline('sd')); print(type(pipe) is AcceleratedStableDiffusionPipeline)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_lazy_package_keeps_every_public_name():
    import diffaccel

    for name in diffaccel.__all__:
        assert getattr(diffaccel, name) is getattr(__import__("diffaccel", fromlist=[name]), name)
    assert set(diffaccel.__all__) <= set(dir(diffaccel))
    assert diffaccel.steering.SEARCH_METHODS == steering.SEARCH_METHODS  # the parser's copy stays in step
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        diffaccel.nosuch  # noqa: B018


def test_built_in_model_infos_match_the_pipelines_they_build():
    from diffaccel.testing import tiny_pipeline

    assert ModelInfo.from_pipeline(tiny_pipeline("sd", sample_size=32)) == RANDOM_MODEL_INFO
    assert ModelInfo.from_pipeline(tiny_pipeline("wan")) == RANDOM_VIDEO_INFO


@pytest.mark.parametrize("name, flow, multiple", [("sd", False, 8), ("sd3", True, 16), ("flux", True, 16),
                                                  ("wan", True, 16), ("pixart-sigma", False, 16)])
def test_a_saved_folder_reads_as_its_loaded_pipeline(tmp_path, name, flow, multiple):
    from diffaccel.testing import tiny_pipeline

    pipe = tiny_pipeline(name)
    pipe.save_pretrained(tmp_path)
    info = describe_model(str(tmp_path), {})
    assert info == ModelInfo.from_pipeline(pipe)
    assert (info.flow, info.size_multiple, info.video) == (flow, multiple, name == "wan")


def test_a_resized_output_is_reported(capsys):
    report.warn_if_resized(argparse.Namespace(width=100, height=None), 96, 64)
    assert "diffaccel: warning: the pipeline drew 96x64, not the 100x64 asked for" in capsys.readouterr().err
    report.warn_if_resized(argparse.Namespace(width=None, height=None), 96, 64)
    assert capsys.readouterr().err == ""
