"""ShapeWorld: scene sampling, splits, rendering, datasets, prompt parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffaccel.shapeworld import (
    COLORS,
    HELDOUT_PAIRS,
    KINDS,
    MOTIONS,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    ShapeWorldClips,
    ShapeWorldImages,
    Verifier,
    eval_prompts,
    parse_prompt,
    render,
    sample_scene,
)
from diffaccel.shapeworld.scenes import MOTION_DISTANCE


def _scenes(split: str, n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, KINDS[i % len(KINDS)]) for i in range(n)]


def test_vocabulary():
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert len(COLORS) >= 6
    assert RELATIONS == ("left of", "right of", "above", "below")
    assert MOTIONS == ("left", "right", "up", "down")
    rgb = np.array(list(COLORS.values()), float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distances[~np.eye(len(rgb), dtype=bool)].min() > 80  # well separated


def test_sampling_is_deterministic_by_seed():
    assert _scenes("train", 40, seed=1) == _scenes("train", 40, seed=1)
    assert _scenes("train", 40, seed=1) != _scenes("train", 40, seed=2)
    a = ShapeWorldImages("train", size=32, length=10, seed=3)
    b = ShapeWorldImages("train", size=32, length=10, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in (0, 7))
    other = ShapeWorldImages("train", size=32, length=10, seed=4)
    assert [a[i][1] for i in range(10)] != [other[i][1] for i in range(10)]


def test_train_split_never_holds_a_heldout_pair():
    for scene in _scenes("train", 2000):
        assert not {o.pair for o in scene.objects} & HELDOUT_PAIRS, scene
    data = ShapeWorldImages("train", length=500)
    assert all(not {o.pair for o in data.scene(i).objects} & HELDOUT_PAIRS for i in range(500))
    clips = ShapeWorldClips("train", length=200)
    assert all(clips.scene(i).objects[0].pair not in HELDOUT_PAIRS for i in range(200))
    # every held-out scene has one; every held-out pair occurs; train covers all other pairs
    heldout = _scenes("heldout", 800)
    assert all({o.pair for o in s.objects} & HELDOUT_PAIRS for s in heldout)
    assert {o.pair for s in heldout for o in s.objects} >= HELDOUT_PAIRS
    all_pairs = {(c, s) for c in COLORS for s in SHAPES}
    assert {o.pair for s in _scenes("train", 2000) for o in s.objects} == all_pairs - HELDOUT_PAIRS


def _box(obj: ShapeObject, dx: float = 0.0, dy: float = 0.0) -> tuple[float, float, float, float]:
    half = obj.size / 2
    return (obj.x + dx - half, obj.y + dy - half, obj.x + dx + half, obj.y + dy + half)


def test_scene_geometry_is_unambiguous():
    rng = np.random.default_rng(0)
    for _ in range(300):
        for kind in KINDS:
            scene = sample_scene(rng, "train", kind)
            for obj in scene.objects:
                assert (
                    0 < _box(obj)[0] and _box(obj)[2] < 1 and 0 < _box(obj)[1] and _box(obj)[3] < 1
                )
                assert obj.size >= 0.2  # recognizable at 64x64
            boxes = [_box(o) for o in scene.objects]
            for i in range(len(boxes)):
                for j in range(i):  # never overlapping: a gap along x or y
                    a, b = boxes[i], boxes[j]
                    gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                    assert gap >= 0.08 - 1e-9
            if kind in ("relation", "relation-motion"):
                a, b = scene.objects
                axis = 0 if scene.relation in ("left of", "right of") else 1
                sign = 1 if scene.relation in ("left of", "above") else -1
                along = sign * ((b.x - a.x, b.y - a.y)[axis])
                across = abs((b.x - a.x, b.y - a.y)[1 - axis])
                assert along >= (a.size + b.size) / 2 + 0.08 and across <= along / 2
            if kind in ("motion", "relation-motion"):
                step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[
                    scene.motion
                ]
                for obj in scene.objects:
                    x0, y0, x1, y1 = _box(obj, *(MOTION_DISTANCE * s for s in step))
                    assert 0 < x0 and x1 < 1 and 0 < y0 and y1 < 1  # still inside at the last frame


def test_render_draws_the_scene():
    scene = Scene((ShapeObject("square", "blue", 0.25, 0.5, 0.3),), background="white")
    image = np.asarray(render(scene, size=64)).astype(int)
    assert image.shape == (64, 64, 3)
    assert np.abs(image[32, 16] - COLORS["blue"]).max() <= 2  # inside the square
    assert np.abs(image[32, 48] - (248, 248, 248)).max() <= 2  # background
    moving = Scene(scene.objects, motion="right")
    first, last = (np.asarray(render(moving, 64, f, 5)).astype(int) for f in (0, 4))
    assert np.abs(first[32, 16] - COLORS["blue"]).max() <= 2
    assert np.abs(last[32, 16] - COLORS["blue"]).max() > 100  # the square moved away...
    assert np.abs(last[32, 42] - COLORS["blue"]).max() <= 2  # ...by 0.4 of the image
    with pytest.raises(ValueError, match="frame"):
        render(moving, 64, frame=5, frames=5)
    with pytest.raises(ValueError, match="size"):
        render(scene, size=8)


def test_datasets_return_the_contracted_tensors():
    pixels, caption = ShapeWorldImages("heldout", size=48, length=3)[2]
    assert pixels.shape == (3, 48, 48) and pixels.dtype == torch.float32
    assert -1 <= pixels.min() < 0 < pixels.max() <= 1
    assert isinstance(caption, str) and parse_prompt(caption)
    clip, caption = ShapeWorldClips("train", size=32, frames=7, length=2)[1]
    assert clip.shape == (7, 3, 32, 32) and clip.dtype == torch.float32
    assert parse_prompt(caption).motion in MOTIONS
    assert not torch.equal(clip[0], clip[-1])
    assert len(ShapeWorldImages(length=5)) == 5
    with pytest.raises(IndexError):
        ShapeWorldImages(length=5)[5]
    with pytest.raises(ValueError, match="split"):
        ShapeWorldImages("test")
    with pytest.raises(ValueError, match="kinds"):
        ShapeWorldImages(kinds=("motion",))
    with pytest.raises(ValueError, match="frames"):
        ShapeWorldClips(frames=1)
    kinds = {ShapeWorldImages(length=50, kinds=("count",)).scene(i).kind for i in range(50)}
    assert kinds == {"count"}


def test_captions_parse_back_to_their_scene():
    templates_seen = set()
    for scene in _scenes("train", 600) + _scenes("heldout", 600, seed=1):
        spec = parse_prompt(scene.caption)
        templates_seen.add((scene.kind, scene.template))
        assert spec.objects[0] == scene.objects[0].pair
        assert spec.relation == scene.relation and spec.motion == scene.motion
        if scene.relation:
            assert spec.objects[1] == scene.objects[1].pair
        else:
            assert spec.count == len(scene.objects)
    assert len(templates_seen) == 13  # every template of every kind was exercised
    assert parse_prompt("Two RED circles!").count == 2
    assert parse_prompt("a blue square is left of a red circle").relation == "left of"
    assert parse_prompt("an orange triangle moving to the left").motion == "left"


@pytest.mark.parametrize(
    "prompt",
    [
        "a pink circle",
        "a red hexagon",
        "hello",
        "a red circle and a blue square",
        "a red circle above a blue square below a green circle",
        "a big red circle",
    ],
)
def test_unparseable_prompts_raise_naming_the_prompt(prompt):
    with pytest.raises(ValueError, match="cannot parse ShapeWorld prompt"):
        parse_prompt(prompt)


def test_eval_prompts():
    for kind in KINDS:
        prompts = eval_prompts(kind, 20, seed=0)
        assert len(prompts) == 20 and prompts == eval_prompts(kind, 20, seed=0)
        assert prompts != eval_prompts(kind, 20, seed=1)
        for prompt in prompts:
            spec = parse_prompt(prompt)
            assert set(spec.objects) & HELDOUT_PAIRS  # held-out split by default
            assert (spec.relation is not None) == (kind in ("relation", "relation-motion"))
            assert (spec.motion is not None) == (kind in ("motion", "relation-motion"))
            assert (spec.count > 1) == (kind == "count")
        assert not any(
            set(parse_prompt(p).objects) & HELDOUT_PAIRS
            for p in eval_prompts(kind, 20, split="train")
        )
    with pytest.raises(ValueError, match="kind"):
        eval_prompts("colors", 3)
    with pytest.raises(ValueError, match="split"):
        eval_prompts("single", 3, split="val")


def test_scene_validation():
    obj = ShapeObject("circle", "red", 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match="shape"):
        ShapeObject("star", "red", 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match="color"):
        ShapeObject("circle", "pink", 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match="relation"):
        Scene((obj, obj), relation="near")
    with pytest.raises(ValueError, match="objects"):
        Scene(())
    with pytest.raises(ValueError, match="motion"):
        Scene((obj,), motion="sideways")
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), "val")
    with pytest.raises(ValueError, match="kind"):
        sample_scene(np.random.default_rng(0), kind="pairs")


def test_relation_motion_clips_keep_the_relation_in_every_frame():
    """The harder clip prompts: two objects moving together; the renders pass the clip verifier
    (relation in every frame, object 0's motion), and a clip of one object alone fails."""
    rng = np.random.default_rng(5)
    verifier = Verifier()
    scenes = [sample_scene(rng, "heldout", "relation-motion") for _ in range(6)]
    assert {s.kind for s in scenes} == {"relation"} and all(s.motion in MOTIONS for s in scenes)
    clips = [[render(s, 64, f, 9) for f in range(9)] for s in scenes]
    assert all(v.passed for v in verifier.verify_clips(clips, [s.caption for s in scenes]))
    alone = Scene(scenes[0].objects[:1], motion=scenes[0].motion)
    lonely = verifier.verify_clips([[render(alone, 64, f, 9) for f in range(9)]], [scenes[0].caption])[0]
    assert not lonely.passed and lonely.criteria["motion"]
