"""FeatureConfig's shared to_dict / from_dict and validation, self-registration with an explicit
attach order, the saved-JSON format of every built-in feature, and the quantization package
without import circles."""

from __future__ import annotations

import ast
import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any

import pytest

import diffaccel
from diffaccel.acceleration import ACCELERATION_CONFIG_NAME, load_acceleration_config
from diffaccel.attention import QuantizedAttentionConfig
from diffaccel.errors import DiffaccelError
from diffaccel.features import base
from diffaccel.features.base import FEATURE_CONFIGS, AttachedFeature, FeatureConfig
from diffaccel.features.checks import check_int
from diffaccel.features.delta_cache import DeltaCacheConfig
from diffaccel.features.encoder_reuse import EncoderReuseConfig
from diffaccel.quantization import DynamicPrecisionConfig, PrecisionPredictor, QuantizationConfig
from diffaccel.testing import tiny_pipeline

#: One non-default config of every built-in feature.
EXAMPLES: dict[str, FeatureConfig] = {
    "quantization": QuantizationConfig("int8", overrides={"*.ff.*": "nvfp4+residual"}, exclude=("*embed*",),
                                       min_weight_numel=0, residual=True, impl="reference", refine=False,
                                       fallback="bf16"),
    "dynamic_precision": DynamicPrecisionConfig({"blocks.0": (True, False), "blocks.1": (False, True)},
                                                PrecisionPredictor(0.5, -1.0, 0.9, 12), online_threshold=0.25),
    "encoder_reuse": EncoderReuseConfig("0,2,3", parallel=False, max_parallel_steps=2, noise_injection=0.003,
                                        noise_injection_below=0.4),
    "delta_cache": DeltaCacheConfig(threshold=math.inf, max_consecutive_skips=3, first_steps=0, last_steps=2,
                                    blocks=["transformer_blocks", "single_transformer_blocks"]),
    "quantized_attention": QuantizedAttentionConfig("reference"),
}

#: Settings as the hand-written ``to_dict`` methods wrote them into ``diffaccel_config.json`` before
#: the shared default, and the config each must load as (older files lack later settings).
OLD_FORMAT: dict[str, tuple[dict[str, Any], FeatureConfig]] = {
    "quantization": (
        {"precision": "nvfp4", "overrides": [["*.ff.*", "int8"]], "exclude": ["*embed*", "proj_out"],
         "min_weight_numel": 0, "residual": False, "impl": "reference"},
        QuantizationConfig("nvfp4", overrides=(("*.ff.*", "int8"),), exclude=("*embed*", "proj_out"),
                           min_weight_numel=0, impl="reference"),
    ),
    "dynamic_precision": (
        {"schedule": {"transformer_blocks.0": [True, False]},
         "predictor": {"slope": 2.0, "intercept": 0.1, "correlation": 0.8, "points": 6}, "online_threshold": None},
        DynamicPrecisionConfig((("transformer_blocks.0", (True, False)),), PrecisionPredictor(2.0, 0.1, 0.8, 6)),
    ),
    "encoder_reuse": (
        {"schedule": "uniform:3", "parallel": None, "max_parallel_steps": None, "noise_injection": 0.003,
         "noise_injection_below": 0.5},
        EncoderReuseConfig("uniform:3", noise_injection=0.003),
    ),
    "delta_cache": (
        {"threshold": 0.1, "max_consecutive_skips": 2, "first_steps": 1, "last_steps": 1,
         "blocks": ["transformer_blocks"]},
        DeltaCacheConfig(threshold=0.1, blocks=("transformer_blocks",)),
    ),
    "quantized_attention": ({"impl": "reference"}, QuantizedAttentionConfig("reference")),
}


def test_builtin_features_are_registered_in_todays_attach_order():
    assert list(FEATURE_CONFIGS) == ["quantization", "dynamic_precision", "encoder_reuse", "delta_cache",
                                     "quantized_attention"]
    assert diffaccel.acceleration.FEATURE_CONFIGS is FEATURE_CONFIGS
    with pytest.raises(TypeError):
        FEATURE_CONFIGS["mine"] = EncoderReuseConfig  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_config_round_trips_through_json(name):
    config = EXAMPLES[name]
    assert type(config) is FEATURE_CONFIGS[name]
    data = json.loads(json.dumps(config.to_dict()))
    assert data == config.to_dict()
    assert type(config).from_dict(data) == config
    assert config != type(config)()  # the example is not the default, so the round trip checks every field


def test_to_dict_writes_json_types():
    assert EXAMPLES["delta_cache"].to_dict()["blocks"] == ["transformer_blocks", "single_transformer_blocks"]
    assert EXAMPLES["quantization"].to_dict()["overrides"] == [["*.ff.*", "nvfp4+residual"]]
    assert EXAMPLES["encoder_reuse"].to_dict()["schedule"] == "0,2,3"
    assert EXAMPLES["dynamic_precision"].to_dict()["schedule"] == {"blocks.0": [True, False], "blocks.1": [False, True]}
    assert EXAMPLES["dynamic_precision"].to_dict()["predictor"] == PrecisionPredictor(0.5, -1.0, 0.9, 12).to_dict()


@pytest.mark.parametrize("name", sorted(OLD_FORMAT))
def test_a_folder_saved_in_the_old_format_loads_the_same(tmp_path, name):
    settings, expected = OLD_FORMAT[name]
    (tmp_path / ACCELERATION_CONFIG_NAME).write_text(json.dumps({name: settings}, indent=2, sort_keys=True))
    assert load_acceleration_config(tmp_path) == [expected]


def test_all_old_format_features_load_together_in_attach_order(tmp_path):
    data = {name: settings for name, (settings, _) in reversed(OLD_FORMAT.items())}
    (tmp_path / ACCELERATION_CONFIG_NAME).write_text(json.dumps(data))
    assert load_acceleration_config(tmp_path) == [expected for _, expected in OLD_FORMAT.values()]


@pytest.mark.parametrize("config_type", [type(config) for config in EXAMPLES.values()])
def test_unknown_settings_are_named(config_type):
    with pytest.raises(ValueError, match=r"has no settings \['bogus', 'zzz'\]; its settings are \["):
        config_type.from_dict({"zzz": 1, "bogus": 2})


def test_unknown_setting_in_a_saved_folder_names_file_feature_and_key(tmp_path):
    (tmp_path / ACCELERATION_CONFIG_NAME).write_text(json.dumps({"delta_cache": {"treshold": 0.1}}))
    with pytest.raises(DiffaccelError, match=r"invalid settings for 'delta_cache': .*\['treshold'\]"):
        load_acceleration_config(tmp_path)


def test_from_dict_validates_like_the_constructor():
    with pytest.raises(ValueError, match="DeltaCacheConfig.first_steps must be an int >= 0, got -1"):
        DeltaCacheConfig.from_dict({"first_steps": -1})
    with pytest.raises(ValueError, match=r"EncoderReuseConfig.noise_injection_below must be in \(0, 1\], got 0"):
        EncoderReuseConfig.from_dict({"noise_injection_below": 0})
    with pytest.raises(ValueError, match="QuantizationConfig.fallback must be one of"):
        QuantizationConfig.from_dict({"fallback": "fp8"})
    with pytest.raises(ValueError, match="QuantizationConfig.refine must be True or False, got 1"):
        QuantizationConfig.from_dict({"refine": 1})


@pytest.fixture
def registry():
    """Registrations made by a test are removed after it."""
    before = dict(base._REGISTERED)
    yield
    base._REGISTERED.clear()
    base._REGISTERED.update(before)


_ATTACHED: list[str] = []


class _RecordingFeature(AttachedFeature):
    def __init__(self, config: FeatureConfig, pipe: Any) -> None:
        self.config = config
        _ATTACHED.append(config.name)

    def end_call(self) -> dict[str, int]:
        return {"calls": 1}


def test_a_new_feature_registers_itself_and_attaches_in_its_order(registry):
    @dataclass(frozen=True)
    class FirstConfig(FeatureConfig, attach_order=5):
        name = "first_dummy"
        level: int = 1

        def __post_init__(self) -> None:
            check_int("FirstConfig", "level", self.level)

        def attach(self, pipe: Any) -> AttachedFeature:
            return _RecordingFeature(self, pipe)

    @dataclass(frozen=True)
    class LastConfig(FeatureConfig, attach_order=55):
        name = "last_dummy"

    class LastFeature(_RecordingFeature, config=LastConfig):
        pass

    assert list(FEATURE_CONFIGS)[0] == "first_dummy" and list(FEATURE_CONFIGS)[-1] == "last_dummy"
    assert LastConfig.feature_type is LastFeature and FirstConfig.attach_order == 5
    _ATTACHED.clear()
    pipe = diffaccel.accelerate(tiny_pipeline("sd"), LastConfig(), EncoderReuseConfig("uniform:2"), FirstConfig(2))
    assert [feature.config.name for feature in pipe._diffaccel_features] == [
        "first_dummy", "encoder_reuse", "last_dummy"]
    assert _ATTACHED == ["first_dummy", "last_dummy"]
    pipe("a red circle", num_inference_steps=2, output_type="latent")
    assert pipe.acceleration_stats.features["last_dummy"] == {"calls": 1}
    diffaccel.restore(pipe)


def test_a_registered_feature_saves_and_loads(tmp_path, registry):
    @dataclass(frozen=True)
    class LevelConfig(FeatureConfig, attach_order=60):
        name = "level_dummy"
        levels: tuple[int, ...] = (1,)

    (tmp_path / ACCELERATION_CONFIG_NAME).write_text(json.dumps({"level_dummy": LevelConfig((2, 3)).to_dict()}))
    assert LevelConfig((2, 3)).to_dict() == {"levels": [2, 3]}
    assert load_acceleration_config(tmp_path) == [LevelConfig((2, 3))]


def test_registration_refuses_a_taken_name_or_order(registry):
    with pytest.raises(ValueError, match="feature name 'delta_cache' of .*Copy is taken by DeltaCacheConfig"):
        class Copy(FeatureConfig, attach_order=99):
            name = "delta_cache"
    with pytest.raises(ValueError, match="attach_order 10 of .*Early is taken by QuantizationConfig"):
        class Early(FeatureConfig, attach_order=10):
            name = "early_dummy"
    assert "early_dummy" not in FEATURE_CONFIGS and FEATURE_CONFIGS["delta_cache"] is DeltaCacheConfig


def test_a_config_without_attach_or_feature_type_says_how_to_add_one():
    @dataclass(frozen=True)
    class BareConfig(FeatureConfig):
        name = "bare"

    with pytest.raises(NotImplementedError, match=r"class MyFeature\(AttachedFeature, config=BareConfig\)"):
        BareConfig().attach(None)
    assert "bare" not in FEATURE_CONFIGS and BareConfig().pretrained_components("/nowhere", {}) == {}


def _imports(path: pathlib.Path, package: str) -> set[str]:
    """The sibling modules of ``package`` that ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{package}."):
            found.add(node.module.split(".")[2])
    return found


def test_the_quantization_package_has_no_import_circle():
    folder = pathlib.Path(diffaccel.__file__).parent / "quantization"
    graph = {path.stem: _imports(path, "diffaccel.quantization") for path in folder.glob("*.py")
             if path.stem != "__init__"}
    assert "feature" not in graph["config"] and "serialization" in graph["quantize"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
                   for nxt in graph.get(start, ()))

    circles = sorted(module for module in graph if reaches(module, module, {module}))
    assert circles == []
