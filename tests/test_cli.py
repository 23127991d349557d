"""The ``diffaccel`` command line and the demo's generation function (offline, tiny model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

import diffaccel
from diffaccel.cli import main
from diffaccel.cli.models import RANDOM_MODEL
from diffaccel.quantization import QuantizedLinear
from diffaccel.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_generate_writes_image_and_summary(tmp_path, capsys):
    out, stats_path = tmp_path / "image.png", tmp_path / "stats.json"
    main(["generate", "a red circle", "--model", RANDOM_MODEL, "--steps", "6", "--encoder-reuse", "uniform:3", "--parallel",
          "--max-parallel-steps", "2", "--out", str(out), "--stats-json", str(stats_path)])
    printed = capsys.readouterr().out
    assert Image.open(out).size == (256, 256)
    assert "UNet encoder evaluations: 2/6" in printed and "key steps: [0, 3]" in printed
    assert "decoder evaluations: 6 in 4 calls (parallel)" in printed  # (0,1) (2) (3,4) (5)
    stats = json.loads(stats_path.read_text())
    assert stats["features"]["encoder_reuse"]["decoder_evaluations"] == 6 and stats["seconds"] > 0


def test_generate_with_a_preset_uses_its_config(tmp_path, capsys):
    stats_path = tmp_path / "stats.json"
    main(["generate", "a red circle", "--model", RANDOM_MODEL, "--steps", "8", "--preset", "fast", "--out",
          str(tmp_path / "fast.png"), "--stats-json", str(stats_path)])
    assert "preset: fast" in capsys.readouterr().out
    reuse = json.loads(stats_path.read_text())["features"]["encoder_reuse"]
    expected = diffaccel.preset_configs(tiny_pipeline("sd"), "fast")[0]
    assert reuse["shallow_layers"] == expected.shallow_layers == 1
    assert reuse["encoder_evaluations"] == len(reuse["key_steps"]) < 8
    assert reuse["guidance_reused"] == 8 - len(reuse["key_steps"])  # guidance 7.5: every non-key step


def test_generate_without_reuse(tmp_path, capsys):
    main(["generate", "a red circle", "--model", RANDOM_MODEL, "--steps", "3", "--out", str(tmp_path / "plain.png")])
    assert "3 full (encoder reuse off)" in capsys.readouterr().out


def test_default_model_draws_the_prompt(tmp_path, capsys):
    """The bundled micro-SD is the default; the verifier's verdict is printed and saved."""
    out, stats_path = tmp_path / "micro.png", tmp_path / "stats.json"
    main(["generate", "a red circle", "--steps", "25", "--encoder-reuse", "faster-diffusion", "--out", str(out),
          "--stats-json", str(stats_path)])
    printed = capsys.readouterr()
    assert "model: micro-sd" in printed.err and Image.open(out).size == (64, 64)
    verdict = json.loads(stats_path.read_text())["verifier"]
    assert verdict["criteria"] == {"object_0_color": True, "object_0_shape": True, "no_extra_objects": True}
    assert verdict["score"] == 1.0
    assert "verifier: score 1.00 (all criteria met)" in printed.out


def test_verifier_skips_prompts_outside_shapeworld(tmp_path, capsys):
    main(["generate", "a photo of a cat", "--model", RANDOM_MODEL, "--steps", "2", "--out", str(tmp_path / "cat.png")])
    assert "verifier: skipped (not a ShapeWorld caption)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--encoder-reuse", "sometimes"], "unknown key-step schedule"),
        (["--encoder-reuse", "0,3,9", "--steps", "5"], "out of range"),
        (["--steps", "0"], "must be >= 1"),
        (["--delta-cache", "-1"], "must be >= 0"),
        (["--quantize", "fp8"], "invalid choice"),
    ],
)
def test_bad_arguments_fail_before_model_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["generate", "a red circle", "--out", str(tmp_path / "x.png"), *argv])
    assert message in str(info.value) + capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bad_output_suffix(tmp_path):
    with pytest.raises(SystemExit, match="--out must end with"):
        main(["generate", "a red circle", "--out", str(tmp_path / "x.txt")])


def test_demo_compare_reports_and_restores():
    spec = importlib.util.spec_from_file_location("diffaccel_demo", ROOT / "app" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    pipe = tiny_pipeline("sd")
    base, fast, summary = demo.compare(pipe, "a blue square", 6, 0, "uniform:2", False)
    assert base.size == fast.size and base.tobytes() != fast.tobytes()
    assert "encoder evaluations: 3/6" in summary
    assert not hasattr(pipe.unet, "_diffusers_hook")
    with pytest.raises(ValueError, match="empty"):
        demo.compare(pipe, "  ", 6, 0, "uniform:2", False)
    with pytest.raises(ValueError, match="weights must be"):
        demo.compare(pipe, "a blue square", 6, 0, "uniform:2", False, "fp8")
    _, quantized, summary = demo.compare(pipe, "a blue square", 6, 0, "uniform:2", False, "nvfp4")
    assert "nvfp4 weights: UNet" in summary and quantized.tobytes() != fast.tobytes()
    assert not any(isinstance(m, QuantizedLinear) for m in pipe.unet.modules())  # the float UNet is kept
    base_again, _, _ = demo.compare(pipe, "a blue square", 6, 0, "uniform:2", False)
    assert base_again.tobytes() == base.tobytes()


def test_demo_builds_every_tab_with_its_inputs():
    gr = pytest.importorskip("gradio")
    spec = importlib.util.spec_from_file_location("diffaccel_demo", ROOT / "app" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for video, prompts in ((None, 2), ((None, "micro-video", {}), 3)):  # image (+ video) + steering
        blocks = demo.build_demo(None, "micro-sd", video)
        boxes = [b for b in blocks.blocks.values() if isinstance(b, gr.Textbox) and b.label == "prompt"]
        assert len(boxes) == prompts
        assert sum(isinstance(b, gr.Slider) and b.label == "steps" for b in blocks.blocks.values()) == prompts


def test_quantized_cached_default_model_still_draws_the_prompt(tmp_path, capsys):
    out, stats_path = tmp_path / "int8.png", tmp_path / "stats.json"
    main(["generate", "a red circle", "--steps", "25", "--quantize", "int8", "--delta-cache", "0.05",
          "--out", str(out), "--stats-json", str(stats_path)])
    printed = capsys.readouterr().out
    stats = json.loads(stats_path.read_text())
    assert stats["features"]["quantization"]["layers"]["int8"] > 0 and "quantized weights:" in printed
    assert stats["features"]["delta_cache"]["blocks_skipped"] > 0 and "delta cache:" in printed
    assert stats["verifier"]["passed"]


def test_delta_cache_on_a_transformer_pipeline(tmp_path, capsys):
    folder = tmp_path / "sd3"
    tiny_pipeline("sd3").save_pretrained(folder)
    stats_path = tmp_path / "stats.json"
    main(["generate", "a red circle", "--model", str(folder), "--steps", "6", "--height", "64", "--width", "64",
          "--delta-cache", "1e9", "--quantize", "nvfp4", "--out", str(tmp_path / "x.png"), "--stats-json", str(stats_path)])
    cache = json.loads(stats_path.read_text())["features"]["delta_cache"]
    assert cache["blocks_skipped"] > 0
    assert f"delta cache: {cache['blocks_skipped']}/" in capsys.readouterr().out


def test_generate_video_writes_a_gif_with_the_features(tmp_path, capsys):
    from diffaccel.cli.models import RANDOM_VIDEO_MODEL

    out, stats_path = tmp_path / "clip.gif", tmp_path / "stats.json"
    main(["generate-video", "a red circle moving to the left", "--model", RANDOM_VIDEO_MODEL, "--steps", "4",
          "--delta-cache", "1e9", "--quantize", "int8", "--out", str(out), "--stats-json", str(stats_path)])
    printed = capsys.readouterr().out
    gif = Image.open(out)
    assert gif.n_frames == 9 and gif.size == (32, 32)
    stats = json.loads(stats_path.read_text())
    assert stats["features"]["delta_cache"]["blocks_skipped"] > 0 and stats["features"]["quantization"]["layers"]["int8"] > 0
    assert "motion" in stats["verifier"]["criteria"] and "verifier: score" in printed


def test_default_generate_video_draws_the_prompt_with_micro_video(tmp_path, capsys):
    from diffaccel.micro_models import models_dir

    if not (models_dir() / "micro-video" / "model_index.json").is_file():
        pytest.skip("micro-video has not been exported to assets/models yet")
    out, stats_path = tmp_path / "clip.gif", tmp_path / "stats.json"
    main(["generate-video", "a yellow square moving left", "--steps", "20", "--out", str(out),
          "--stats-json", str(stats_path)])
    gif = Image.open(out)
    assert gif.n_frames == 9 and gif.size == (64, 64)
    criteria = json.loads(stats_path.read_text())["verifier"]["criteria"]
    assert criteria["object_0_color"] and criteria["object_0_shape"]  # random weights draw no object
    assert "verifier: score" in capsys.readouterr().out


def test_generate_video_preset_is_the_delta_cache(tmp_path):
    from diffaccel.cli.models import RANDOM_VIDEO_MODEL

    stats_path = tmp_path / "stats.json"
    main(["generate-video", "a red circle moving to the left", "--model", RANDOM_VIDEO_MODEL, "--steps", "6",
          "--preset", "balanced", "--out", str(tmp_path / "clip.gif"), "--stats-json", str(stats_path)])
    cache = json.loads(stats_path.read_text())["features"]["delta_cache"]
    assert cache["skipped_per_step"][:4] == [0, 0, 0, 0]  # "balanced" computes the first 4 steps in full


def test_generate_video_refuses_bad_input_before_model_work(tmp_path):
    from diffaccel.micro_models import models_dir

    with pytest.raises(SystemExit, match="must end with .gif"):
        main(["generate-video", "a red circle", "--out", str(tmp_path / "clip.mp4")])
    with pytest.raises(SystemExit, match="no such folder"):
        main(["generate-video", "a red circle", "--model", str(tmp_path / "missing") + "/", "--out", str(tmp_path / "c.gif")])
    if not (models_dir() / "micro-video" / "model_index.json").is_file():
        with pytest.raises(SystemExit, match="(?s)not been exported yet.*--model PATH"):
            main(["generate-video", "a red circle", "--out", str(tmp_path / "c.gif")])
    assert not (tmp_path / "c.gif").exists()


def test_demo_compare_video_reports_and_keeps_the_transformer():
    spec = importlib.util.spec_from_file_location("diffaccel_demo", ROOT / "app" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    from diffaccel.testing import tiny_call_inputs

    pipe = tiny_pipeline("wan")
    call = tiny_call_inputs("wan")
    base, fast, summary = demo.compare_video(pipe, "a red circle", 6, 0, 1e9, "nvfp4", **call)
    assert len(base) == len(fast) == call["num_frames"] and "blocks skipped" in summary and "nvfp4 weights" in summary
    assert [f.tobytes() for f in base] != [f.tobytes() for f in fast]
    assert not any(isinstance(m, QuantizedLinear) for m in pipe.transformer.modules())
    again, _, _ = demo.compare_video(pipe, "a red circle", 6, 0, 0.0, **call)
    assert [f.tobytes() for f in again] == [f.tobytes() for f in base]
    with pytest.raises(ValueError, match="empty"):
        demo.compare_video(pipe, " ", 6, 0, 0.1, **call)
