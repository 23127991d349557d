"""``diffaccel generate --particles K`` and ``--search METHOD`` (offline, tiny random model)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from diffaccel.cli import main
from diffaccel.cli.models import RANDOM_MODEL

PROMPT = "a red circle to the left of a blue square"  # a ShapeWorld caption: the default reward parses it


def test_particles_write_the_best_image_and_steering_stats(tmp_path, capsys):
    out, stats_path = tmp_path / "fk.png", tmp_path / "stats.json"
    main(["generate", PROMPT, "--steps", "3", "--height", "32", "--width", "32", "--particles", "2",
          "--resample-every", "1", "--resample-start", "0", "--ess-threshold", "off", "--out", str(out),
          "--stats-json", str(stats_path)])
    printed = capsys.readouterr().out
    assert Image.open(out).size == (32, 32)
    assert "FK steering: 2 particles, resampled at steps [0, 1], NFE 6" in printed
    steering = json.loads(stats_path.read_text())["steering"]
    assert steering["method"] == "fk" and len(steering["rewards"]) == 2
    assert all(0.0 <= r <= 1.0 for r in steering["rewards"])  # verifier scores


def test_particles_resample_only_from_the_start_step(tmp_path, capsys):
    main(["generate", PROMPT, "--steps", "4", "--height", "32", "--width", "32", "--particles", "2",
          "--resample-every", "1", "--resample-start", "2", "--ess-threshold", "off", "--out", str(tmp_path / "fk.png")])
    assert "resampled at steps [2]" in capsys.readouterr().out


def test_particles_default_to_the_measured_settings(tmp_path):
    stats_path = tmp_path / "stats.json"
    main(["generate", PROMPT, "--steps", "5", "--height", "32", "--width", "32", "--particles", "2",
          "--out", str(tmp_path / "fk.png"), "--stats-json", str(stats_path)])
    from diffaccel.steering import FKSteeringConfig

    config = json.loads(stats_path.read_text())["steering"]["config"]
    assert config == FKSteeringConfig.measured(2, 5).to_dict() and config["resample_start"] == 3


def test_search_spends_the_budget(tmp_path, capsys):
    stats_path = tmp_path / "stats.json"
    main(["generate", PROMPT, "--steps", "2", "--height", "32", "--width", "32", "--search", "random",
          "--budget", "5", "--out", str(tmp_path / "search.png"), "--stats-json", str(stats_path)])
    assert "random search: 2 candidates scored, NFE 4/5" in capsys.readouterr().out
    steering = json.loads(stats_path.read_text())["steering"]
    assert steering["nfe"] == 4 and len(steering["trace"]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--particles", "0"], "must be >= 1"),
        (["--particles", "2", "--search", "random"], "not allowed with argument"),
        (["--search", "grid"], "invalid choice"),
        (["--particles", "2", "--resample-start", "-1"], "must be >= 0"),
        (["--particles", "2", "--ess-threshold", "1.5"], "must be in (0, 1]"),
    ],
)
def test_bad_steering_flags(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, "--out", str(tmp_path / "x.png"), *argv])
    assert message in capsys.readouterr().err


def test_bundled_clip_reward_by_name_from_any_folder(tmp_path, capsys, monkeypatch):
    """``transformers-clip:micro-clip`` needs no repository-relative path."""
    from diffaccel.cli.steering import make_reward
    from diffaccel.rewards import CLIPScoreReward

    monkeypatch.chdir(tmp_path)
    assert CLIPScoreReward.from_transformers("micro-clip").image_size == 64
    assert make_reward("transformers-clip:micro-clip").name == "clip_score"
    main(["generate", PROMPT, "--model", RANDOM_MODEL, "--steps", "2", "--height", "32", "--width", "32",
          "--particles", "2", "--reward", "transformers-clip:micro-clip", "--out", "fk.png"])
    assert "rewards (clip_score):" in capsys.readouterr().out and (tmp_path / "fk.png").is_file()
