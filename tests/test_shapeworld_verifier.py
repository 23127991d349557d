"""The ShapeWorld verifier: exact on ground truth, robust to corruption, rejects what is wrong."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from diffaccel.shapeworld import (
    Scene,
    ShapeObject,
    ShapeWorldClips,
    Verifier,
    eval_prompts,
    render,
    sample_scene,
)

VERIFIER = Verifier()


def _still(n_per_kind: int, seed: int = 0, size: int = 64) -> tuple[list[Scene], list[Image.Image]]:
    rng = np.random.default_rng(seed)
    scenes = [
        sample_scene(rng, ("train", "heldout")[i % 2], kind)
        for kind in ("single", "count", "relation")
        for i in range(n_per_kind)
    ]
    return scenes, [render(s, size) for s in scenes]


def _clips(n: int, frames: int = 9) -> tuple[list[Scene], torch.Tensor, list[str]]:
    data = ShapeWorldClips("heldout", size=64, frames=frames, length=n, seed=1)
    items = [data[i] for i in range(n)]
    return (
        [data.scene(i) for i in range(n)],
        torch.stack([x for x, _ in items]).add(1).div(2),
        [c for _, c in items],
    )


@pytest.mark.parametrize("size", [64, 128])
def test_exact_on_ground_truth(size):
    scenes, images = _still(60, seed=size, size=size)
    results = VERIFIER.verify(images, [s.caption for s in scenes])
    failed = [(r.prompt, r.criteria) for r in results if not r.passed]
    assert not failed
    assert all(r.score == 1.0 for r in results)
    # the detections are the scene's objects, no more
    for scene, result in zip(scenes, results):
        found = sorted((d.color, d.shape) for d in result.detections[0])
        assert found == sorted(o.pair for o in scene.objects)


def test_exact_on_ground_truth_clips():
    _, clips, prompts = _clips(24)
    results = VERIFIER.verify_clips(clips, prompts)
    assert all(r.passed for r in results), [(r.prompt, r.criteria) for r in results if not r.passed]
    assert all(
        set(r.criteria) == {"object_0_color", "object_0_shape", "no_extra_objects", "motion"}
        for r in results
    )


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


def _noisy(image: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, np.float32) / 255 + rng.normal(
        0, std, (image.height, image.width, 3)
    )
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))


@pytest.mark.parametrize(
    "corruption",
    [
        lambda im, rng: im.filter(ImageFilter.GaussianBlur(1.5)),
        lambda im, rng: _noisy(im, 0.1, rng),
        lambda im, rng: _noisy(im.filter(ImageFilter.GaussianBlur(1.0)), 0.1, rng),
        lambda im, rng: im.resize((32, 32), Image.Resampling.BILINEAR).resize(
            (64, 64), Image.Resampling.BILINEAR
        ),
        lambda im, rng: _jpeg(im, 30),
    ],
    ids=["blur1.5", "noise0.1", "blur1+noise0.1", "resample2x", "jpeg30"],
)
def test_robust_to_corruption(corruption):
    scenes, images = _still(20, seed=3)
    rng = np.random.default_rng(0)
    results = VERIFIER.verify([corruption(im, rng) for im in images], [s.caption for s in scenes])
    assert np.mean([r.passed for r in results]) >= 0.95


def test_robust_to_corruption_clips():
    _, clips, prompts = _clips(8)
    blurred = [
        [
            Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(1.5)
            )
            for f in clip
        ]
        for clip in clips
    ]
    assert all(r.passed for r in VERIFIER.verify_clips(blurred, prompts))


def test_every_criterion_can_fail():
    red_circle = ShapeObject("circle", "red", 0.3, 0.5, 0.25)
    blue_square = ShapeObject("square", "blue", 0.7, 0.5, 0.25)
    pair = render(Scene((red_circle, blue_square), relation="left of"))
    cases = {  # prompt -> the criteria that must fail
        "a red circle to the left of a blue square": set(),
        "a red circle to the right of a blue square": {"relation"},
        "a red circle above a blue square": {"relation"},
        "a red square to the left of a blue square": {"object_0_shape", "relation"},
        "a green circle to the left of a blue square": {
            "object_0_color",
            "object_0_shape",
            "relation",
        },
        "a red circle to the left of a blue triangle": {"object_1_shape", "relation"},
        "two red circles": {"count"},  # the blue square is the attempt at the second one
        "a purple triangle": {"object_0_color", "object_0_shape", "no_extra_objects"},
        "a red circle": {"no_extra_objects"},  # the blue square was not asked for
    }
    results = VERIFIER.verify([pair] * len(cases), list(cases))
    for (prompt, failing), result in zip(cases.items(), results):
        assert {k for k, ok in result.criteria.items() if not ok} == failing, prompt
        assert result.passed == (not failing)
        assert result.score == pytest.approx(1 - len(failing) / len(result.criteria))
    three = render(
        Scene(tuple(ShapeObject("triangle", "green", x, 0.5, 0.22) for x in (0.2, 0.5, 0.8)))
    )
    counts = VERIFIER.verify(
        [three] * 3, ["two green triangles", "three green triangles", "a green triangle"]
    )
    assert [r.criteria.get("count") for r in counts] == [False, True, None]


def test_layout_mode_ignores_shapes_but_not_colors_positions_or_motion():
    red_circle = ShapeObject("circle", "red", 0.3, 0.5, 0.25)
    blue_square = ShapeObject("square", "blue", 0.7, 0.5, 0.25)
    pair = render(Scene((red_circle, blue_square), relation="left of"))
    cases = {  # prompt -> the layout criteria that must fail
        "a red triangle to the left of a blue circle": set(),  # wrong shapes: still the right layout
        "a red square to the right of a blue square": {"relation"},
        "a green circle to the left of a blue square": {"object_0_color", "relation"},
        "two red squares": {"count"},
        "a red triangle": {"no_extra_objects"},
    }
    results = VERIFIER.verify([pair] * len(cases), list(cases), shapes=False)
    for (prompt, failing), result in zip(cases.items(), results):
        assert not any(name.endswith("_shape") for name in result.criteria), prompt
        assert {k for k, ok in result.criteria.items() if not ok} == failing, prompt
    scenes, clips, prompts = _clips(4)
    reshaped = [p.replace(s.objects[0].shape, "circle" if s.objects[0].shape != "circle" else "square")
                for s, p in zip(scenes, prompts)]
    assert all(r.passed for r in VERIFIER.verify_clips(clips, reshaped, shapes=False))
    assert not any(r.passed for r in VERIFIER.verify_clips(clips, reshaped))


def test_motion_criterion_fails_for_the_wrong_direction_and_for_still_clips():
    scenes, clips, prompts = _clips(8)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = [p.replace(s.motion, opposite[s.motion]) for s, p in zip(scenes, prompts)]
    results = VERIFIER.verify_clips(clips, wrong)
    assert not any(r.criteria["motion"] for r in results)
    assert all(r.criteria["object_0_shape"] for r in results)
    still = clips[:, :1].expand_as(clips)  # the first frame repeated
    assert not any(r.criteria["motion"] for r in VERIFIER.verify_clips(still, prompts))


def test_rejects_random_images():
    scenes, images = _still(10)
    prompts = [s.caption for s in scenes]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (len(prompts), 64, 64, 3), dtype=np.uint8)
    smooth = [Image.fromarray(x).filter(ImageFilter.GaussianBlur(3)) for x in noise]
    blank = [Image.new("RGB", (64, 64), (240, 240, 240))] * len(prompts)
    for images in (noise, smooth, blank):
        assert not any(r.passed for r in VERIFIER.verify(images, prompts))


def test_random_weight_generator_fails():
    from diffaccel.testing import tiny_call_inputs, tiny_pipeline

    pipe = tiny_pipeline("sd", seed=0)
    prompts = [p for kind in ("single", "count", "relation") for p in eval_prompts(kind, 3)]
    images = pipe(
        prompts,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **tiny_call_inputs("sd"),
    ).images
    assert images.shape[1] == 3
    results = VERIFIER.verify(images, prompts)
    assert not any(r.passed for r in results)
    assert np.mean([r.score for r in results]) < 0.5


def test_input_formats_agree():
    scenes, images = _still(3, seed=5)
    prompts = [s.caption for s in scenes]
    uint8 = np.stack([np.asarray(im) for im in images])
    as_float = uint8.astype(np.float32) / 255
    as_tensor = torch.from_numpy(as_float).permute(0, 3, 1, 2)
    expected = [r.criteria for r in VERIFIER.verify(images, prompts)]
    for batch in (uint8, as_float, as_tensor):
        assert [r.criteria for r in VERIFIER.verify(batch, prompts)] == expected
    assert VERIFIER.verify(images[0], prompts[0])[0].criteria == expected[0]  # one image
    assert [r.criteria for r in VERIFIER.verify(images[:3], prompts[0])] == [
        r.criteria for r in VERIFIER.verify(images[:3], [prompts[0]] * 3)
    ]  # one prompt for all
    _, clips, clip_prompts = _clips(2, frames=5)
    pil_clips = [
        [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for f in c]
        for c in clips
    ]
    expected = [r.criteria for r in VERIFIER.verify_clips(clips, clip_prompts)]
    assert [r.criteria for r in VERIFIER.verify_clips(pil_clips, clip_prompts)] == expected
    as_numpy = clips.permute(0, 1, 3, 4, 2).numpy()  # (N, T, H, W, 3), as WanPipeline's "np"
    assert [r.criteria for r in VERIFIER.verify_clips(as_numpy, clip_prompts)] == expected


def test_deterministic():
    scenes, images = _still(5, seed=9)
    blurred = [im.filter(ImageFilter.GaussianBlur(2.5)) for im in images]
    prompts = [s.caption for s in scenes]
    first = VERIFIER.verify(blurred, prompts)
    assert [r.criteria for r in first] == [r.criteria for r in Verifier().verify(blurred, prompts)]
    assert [r.criteria for r in first] == [
        r.criteria for r in VERIFIER.verify(blurred[::-1], prompts[::-1])
    ][::-1]


def test_bad_input_raises():
    image = render(sample_scene(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="cannot parse ShapeWorld prompt 'a cat'"):
        VERIFIER.verify([image], ["a cat"])
    with pytest.raises(ValueError, match="2 prompts for 1"):
        VERIFIER.verify([image], ["a red circle", "a blue square"])
    with pytest.raises(ValueError, match="shape"):
        VERIFIER.verify(np.zeros((1, 64, 64)), ["a red circle"])
    with pytest.raises(ValueError, match="clips"):
        VERIFIER.verify_clips(torch.zeros(1, 3, 64, 64), ["a red circle moving left"])
    with pytest.raises(ValueError, match="at least 2 frames"):
        VERIFIER.verify_clips([[image]], ["a red circle moving left"])
    for field, value in [("min_iou", 1.5), ("size", 8), ("color_threshold", 0), ("min_area", -0.1)]:
        with pytest.raises(ValueError, match=field):
            Verifier(**{field: value})
