"""The Gradio demo (app/demo.py) as its handlers see it: every control's default works on the
default models, images are shown enlarged, both sides carry the verifier's verdict, the queue and
the seed are bounded and clips do not pile up on disk. The page in a browser: test_demo_browser.py."""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffaccel.shapeworld import Scene, ShapeObject, render

ROOT = Path(__file__).resolve().parents[1]
VERDICT = "ShapeWorld verifier: untouched score "


@pytest.fixture(scope="module")
def demo() -> Any:
    spec = importlib.util.spec_from_file_location("diffaccel_demo", ROOT / "app" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gr() -> Any:
    return pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def models(demo) -> tuple:
    """What ``python app/demo.py`` loads with no arguments (the bundled micro-SD and micro-video)."""
    return demo.load_models()


def _handler(blocks: Any, output_id: str) -> Any:
    """The event whose first output is the component ``output_id``."""
    (fn,) = [fn for fn in blocks.fns.values() if fn.outputs and fn.outputs[0].elem_id == output_id]
    return fn


def _defaults(fn: Any) -> dict[str, Any]:
    """The built components' default values, by label."""
    return {component.label: component.value for component in fn.inputs}


def _few_steps(fn: Any) -> list[Any]:
    """The defaults of ``fn``'s inputs, the step count lowered to its slider's minimum (a short run)."""
    return [component.minimum if component.label == "steps" else component.value for component in fn.inputs]


def _frames(path: str) -> tuple[int, tuple[int, int]]:
    with Image.open(path) as gif:
        return gif.n_frames, gif.size


def test_every_default_passes_the_checks(demo, gr):
    blocks = demo.build_demo(None, "micro-sd", (None, "micro-video", {}))
    image = _defaults(_handler(blocks, "image-untouched"))
    demo.image_config(image["prompt"], image["steps"], image["preset or key-step schedule"], image["parallel decoding (schedules)"],
                      image["quantized weights"])
    video = _defaults(_handler(blocks, "clip-untouched"))
    demo.video_config(video["prompt"], video["delta cache threshold"], video["quantized weights"])
    for seed in (image["seed"], video["seed"]):
        assert demo.SEED_RANGE[0] <= seed <= demo.SEED_RANGE[1]


def test_image_tab_with_its_defaults_shows_enlarged_images_and_both_verdicts(demo, gr, models):
    blocks = demo.build_demo(*models)
    fn = _handler(blocks, "image-untouched")
    base, fast, summary = fn.fn(*_few_steps(fn))
    assert base.size == fast.size == (demo.DISPLAY_SIZE, demo.DISPLAY_SIZE)  # micro-SD draws 64x64
    assert "native size 64x64, shown enlarged 4x (nearest-neighbour) at 256x256" in summary
    assert VERDICT in summary and "; diffaccel score " in summary
    assert "encoder evaluations" in summary and "preset fast:" in summary and "shallow-path" in summary


def test_image_tab_starts_on_the_given_preset_and_takes_every_choice(demo, gr):
    for preset in demo.ACCELERATIONS:
        blocks = demo.build_demo(None, "micro-sd", preset=preset)
        assert _defaults(_handler(blocks, "image-untouched"))["preset or key-step schedule"] == preset
        config = demo.image_config("a red circle", 25, preset, False)
        assert (config.shallow_layers == 1) == (preset in demo.diffaccel.PRESETS)
    with pytest.raises(ValueError, match="preset must be one of"):
        demo.build_demo(None, "micro-sd", preset="turbo")


def test_video_tab_with_its_defaults_draws_the_micro_model_clip(demo, gr, models):
    gifs = demo.GifStore(keep=2)
    blocks = demo.build_demo(*models, gifs=gifs)
    fn = _handler(blocks, "clip-untouched")
    first = fn.fn(*_few_steps(fn))
    base, fast, summary = fn.fn(*_few_steps(fn))
    assert _frames(base) == _frames(fast) == (demo.VIDEO_FRAMES, (demo.DISPLAY_SIZE, demo.DISPLAY_SIZE))
    assert "clips: 9 frames, native size 64x64, shown enlarged 4x" in summary
    assert VERDICT in summary and "; diffaccel score " in summary and "blocks skipped" in summary
    assert sorted(gifs.folder.iterdir()) == sorted(Path(p) for p in (base, fast))  # the first call's are gone
    assert not any(Path(p).exists() for p in first[:2])


def test_gifs_do_not_accumulate(demo):
    gifs = demo.GifStore(keep=4)
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    paths = [gifs.write(frames) for _ in range(10)]
    assert sorted(gifs.folder.iterdir()) == sorted(Path(p) for p in paths[-4:])
    assert _frames(paths[-1]) == (2, (8, 8))
    with pytest.raises(ValueError, match="keep must be >= 1"):
        demo.GifStore(keep=0)


def test_queue_seed_and_cache_are_bounded(demo, gr):
    blocks = demo.build_demo(None, "micro-sd", (None, "micro-video", {}))
    assert blocks._queue.max_size == demo.QUEUE_SIZE and demo.QUEUE_SIZE > 0
    seeds = [b for b in blocks.blocks.values() if isinstance(b, gr.Number) and b.label == "seed"]
    assert len(seeds) == 3  # image, video and steering tabs
    for seed in seeds:
        assert (seed.minimum, seed.maximum, seed.precision) == (*demo.SEED_RANGE, 0)
    assert blocks.delete_cache == demo.DELETE_CACHE


def test_bad_input_is_a_one_line_error_before_model_work(demo, gr):
    blocks = demo.build_demo(None, "micro-sd", (None, "micro-video", {}))  # no pipelines: nothing may run
    for output in ("image-untouched", "clip-untouched"):
        fn = _handler(blocks, output)
        values = ["  " if c.label == "prompt" else c.value for c in fn.inputs]
        with pytest.raises(gr.Error, match="the prompt is empty"):
            fn.fn(*values)


def test_verdicts_show_a_changed_object(demo):
    objects = (ShapeObject("circle", "red", 0.3, 0.5, 0.25), ShapeObject("square", "blue", 0.7, 0.5, 0.25))
    scene = Scene(objects, relation="left of")
    changed = Scene((objects[0], ShapeObject("triangle", "blue", 0.7, 0.5, 0.25)), relation="left of")
    text = demo.verdicts(render(scene), render(changed), scene.caption)
    assert text.startswith(VERDICT + "1.00 (all criteria met); diffaccel score ")
    assert "(failed: object_1_shape" in text and text.endswith("-- the verdict changed")


def test_enlarge_is_nearest_neighbour(demo):
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (255, 0, 0))
    big = demo.enlarge(image, size=8)
    assert big.size == (8, 4)
    assert {big.getpixel((x, y)) for x in range(4) for y in range(4)} == {(255, 0, 0)}  # no blending
    assert demo.shown_as(image, image) == "native size 2x1"


def test_demo_docstring_examples(demo):
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(demo, "demo"):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_steering_tab_with_its_defaults_shows_every_candidate_and_the_winner(demo, gr, models):
    blocks = demo.build_demo(*models)
    fn = _handler(blocks, "steering-candidates")
    values = {c.label: c.value for c in fn.inputs}
    assert values["method"] == "fk" and values["reward"] == "verifier" and values["candidates (particles or samples)"] == 4
    shown, best, summary = fn.fn(*[4 if c.label == "steps" else c.value for c in fn.inputs])
    assert len(shown) == 4 and sum("(winner)" in caption for _, caption in shown) == 1
    assert best.size == (demo.DISPLAY_SIZE, demo.DISPLAY_SIZE)
    assert summary.startswith("fk: 4 candidates, NFE 16") and " s\nwinner: candidate " in summary


@pytest.mark.parametrize("method", ["best-of-n", "zero-order", "paths"])
def test_steering_methods_show_scored_candidates(demo, method):
    from diffaccel.rewards import ShapeWorldReward
    from diffaccel.testing import tiny_pipeline

    shown, best, summary = demo.steer_candidates(tiny_pipeline("sd"), "a red circle", 3, 0, method, 2, ShapeWorldReward())
    assert len(shown) >= 2 and all(caption.startswith("shapeworld ") for _, caption in shown)
    assert f"{method}: " in summary and "NFE 6" in summary


def test_steering_caps_and_bad_input_fail_before_model_work(demo, gr):
    blocks = demo.build_demo(None, "micro-sd")
    fn = _handler(blocks, "steering-candidates")
    base = {c.label: c.value for c in fn.inputs}
    for label, value, message in (("prompt", " ", "the prompt is empty"),
                                  ("candidates (particles or samples)", demo.MAX_CANDIDATES + 1, "a cap of this demo"),
                                  ("steps", demo.MAX_STEERING_STEPS + 1, "a cap of this demo"),
                                  ("reward", "hps", "reward must be one of")):
        with pytest.raises(gr.Error, match=message):
            fn.fn(*[value if c.label == label else base[c.label] for c in fn.inputs])
