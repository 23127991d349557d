"""The drop-in classes keep their base class's call signature; a broken ``diffaccel_config.json``
names the file and what is wrong (offline, CPU)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, WanPipeline

import diffaccel
from diffaccel import DiffaccelError, EncoderReuseConfig
from diffaccel.acceleration import ACCELERATION_CONFIG_NAME, accelerated_class, load_acceleration_config
from diffaccel.pipelines import AcceleratedStableDiffusionPipeline, AcceleratedStableDiffusionXLPipeline
from diffaccel.testing import tiny_pipeline


@pytest.mark.parametrize("accelerated, base", [
    (AcceleratedStableDiffusionPipeline, StableDiffusionPipeline),
    (AcceleratedStableDiffusionXLPipeline, StableDiffusionXLPipeline),
    (accelerated_class(WanPipeline), WanPipeline),  # created on first use
    (accelerated_class(FluxPipeline), FluxPipeline),
])
def test_call_signature_and_docs_are_the_base_class(accelerated, base):
    assert inspect.signature(accelerated.__call__) == inspect.signature(base.__call__)
    assert "prompt" in inspect.signature(accelerated.__call__).parameters
    assert accelerated.__call__.__doc__ == base.__call__.__doc__
    assert accelerated.__call__ is not base.__call__  # still the wrapper that does the bookkeeping


def test_accelerate_gives_the_instance_the_base_signature():
    pipe = diffaccel.accelerate(tiny_pipeline("sd"), EncoderReuseConfig("uniform:2"))
    parameters = list(inspect.signature(StableDiffusionPipeline.__call__).parameters.values())[1:]
    assert list(inspect.signature(pipe.__call__).parameters.values()) == parameters


def test_subclasses_keep_their_own_call_and_the_bookkeeping():
    class Inherits(AcceleratedStableDiffusionPipeline):
        pass

    class Overrides(AcceleratedStableDiffusionPipeline):
        def __call__(self, prompt: str, steps: int = 2):
            return super().__call__(prompt, num_inference_steps=steps, output_type="np")

    assert Inherits.__call__ is AcceleratedStableDiffusionPipeline.__call__
    assert list(inspect.signature(Overrides.__call__).parameters) == ["self", "prompt", "steps"]
    pipe = Overrides.from_pipe(tiny_pipeline("sd"), acceleration=EncoderReuseConfig("uniform:2", parallel=False))
    pipe("a red circle", steps=4)
    assert pipe.acceleration_stats.features["encoder_reuse"].key_steps == (0, 2)


@pytest.mark.parametrize("text, message", [
    ('{"encoder_reuse": {"schedule": "all",}}', r"is not valid JSON: Expecting property name enclosed in double "
                                               r"quotes at line 1, column 38 \(character 37\)"),
    ("", r"is not valid JSON: Expecting value at line 1, column 1"),
    ('["encoder_reuse"]', r"must hold a JSON object .* got a list"),
    ('{"encoder_reuse": "all"}', r"the settings of 'encoder_reuse' must be a JSON object"),
    ('{"encoder_reuse": {"schedule": "all", "speed": 2}}', r"invalid settings for 'encoder_reuse': .*speed"),
    ('{"encoder_reuse": {"schedule": "sometimes"}}', r"invalid settings for 'encoder_reuse': .*unknown key-step"),
])
def test_a_broken_config_file_names_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / ACCELERATION_CONFIG_NAME
    path.write_text(text)
    with pytest.raises(DiffaccelError, match=message) as error:
        load_acceleration_config(tmp_path)
    assert str(error.value).startswith(str(path))


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    AcceleratedStableDiffusionPipeline.from_pipe(tiny_pipeline("sd")).save_pretrained(folder)
    (folder / ACCELERATION_CONFIG_NAME).write_text("{oops")
    return folder


def test_from_pretrained_refuses_an_invalid_saved_config(saved_folder):
    with pytest.raises(DiffaccelError, match=rf"{ACCELERATION_CONFIG_NAME} is not valid JSON: .* line 1, column 2"):
        AcceleratedStableDiffusionPipeline.from_pretrained(saved_folder)


def test_acceleration_argument_replaces_an_invalid_saved_config_with_a_warning(saved_folder):
    config = EncoderReuseConfig("uniform:2")
    with pytest.warns(UserWarning, match=rf"ignoring the saved acceleration config.*{ACCELERATION_CONFIG_NAME} is "
                                         r"not valid JSON: .* line 1, column 2"):
        pipe = AcceleratedStableDiffusionPipeline.from_pretrained(saved_folder, acceleration=config)
    assert pipe.acceleration == (config,)
    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert pipe.acceleration_stats.features["encoder_reuse"].encoder_evaluations == 1


def test_the_saved_config_file_is_read_back(tmp_path):
    config = EncoderReuseConfig("uniform:3", parallel=False)
    (tmp_path / ACCELERATION_CONFIG_NAME).write_text(json.dumps({"encoder_reuse": config.to_dict()}))
    assert load_acceleration_config(tmp_path) == [config]
