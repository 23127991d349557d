"""The verifier's ``no_extra_objects`` criterion: an object the prompt did not ask for fails it (and
so the image fails), in the full and the layout check, for stills and clips, and in the reward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from diffaccel.rewards import ShapeWorldReward
from diffaccel.shapeworld import (
    Scene,
    ShapeObject,
    ShapeWorldClips,
    Verifier,
    render,
    sample_extra,
    sample_scene,
)
from diffaccel.shapeworld.scenes import MOTION_DISTANCE

VERIFIER = Verifier()
GREEN_CIRCLE = ShapeObject("circle", "green", 0.5, 0.78, 0.22)  # below the objects of SCENES
SCENES = {
    "single": Scene((ShapeObject("square", "red", 0.5, 0.3, 0.25),)),
    "count": Scene(tuple(ShapeObject("triangle", "blue", x, 0.3, 0.25) for x in (0.25, 0.75))),
    "relation": Scene(
        (ShapeObject("circle", "red", 0.25, 0.3, 0.25), ShapeObject("square", "blue", 0.75, 0.3, 0.25)),
        relation="left of",
    ),
}


def _failing(result) -> set[str]:
    return {name for name, ok in result.criteria.items() if not ok}


@pytest.mark.parametrize("shapes", [True, False], ids=["full", "layout"])
@pytest.mark.parametrize("kind", list(SCENES))
def test_an_extra_green_circle_fails_the_image(kind, shapes):
    scene = SCENES[kind]
    clean, extra = VERIFIER.verify(
        [render(scene), render(scene, extra=(GREEN_CIRCLE,))], scene.caption, shapes=shapes
    )
    assert clean.passed and clean.criteria["no_extra_objects"]
    assert _failing(extra) == {"no_extra_objects"}  # everything asked for is still there
    assert not extra.passed
    assert extra.score == pytest.approx(1 - 1 / len(extra.criteria))


def test_an_extra_object_of_a_requested_kind_is_extra_too():
    scene = SCENES["relation"]  # a red circle to the left of a blue square, plus a red circle
    second = dataclasses.replace(GREEN_CIRCLE, color="red")
    assert _failing(VERIFIER.verify([render(scene, extra=(second,))], scene.caption)[0]) == {
        "no_extra_objects"
    }


def test_a_wrong_object_in_place_of_a_requested_one_fails_only_its_own_criteria():
    def alone(shape: str, color: str) -> Image.Image:
        return render(Scene((ShapeObject(shape, color, 0.5, 0.5, 0.3),)))

    red_circle, red_square, blue_circle = alone("circle", "red"), alone("square", "red"), alone("circle", "blue")
    both = render(Scene((ShapeObject("circle", "red", 0.3, 0.5, 0.25),)),
                  extra=(ShapeObject("square", "red", 0.7, 0.5, 0.25),))
    blank = Image.new("RGB", (64, 64), (248, 248, 248))
    results = VERIFIER.verify([red_circle, red_square, blue_circle, both, blank], "a red circle")
    assert [_failing(r) for r in results] == [
        set(),
        {"object_0_shape"},
        {"object_0_color", "object_0_shape"},
        {"no_extra_objects"},  # the red square beside the red circle is extra
        {"object_0_color", "object_0_shape"},  # an empty image holds nothing extra
    ]


def test_count_prompts_leave_the_counted_kind_to_count():
    def triangles(n: int, extra: tuple[ShapeObject, ...] = ()) -> Image.Image:
        xs = (0.2, 0.5, 0.8)[:n]
        return render(Scene(tuple(ShapeObject("triangle", "green", x, 0.3, 0.22) for x in xs)), extra=extra)

    red = (ShapeObject("circle", "red", 0.5, 0.75, 0.22),)
    images = [triangles(3), triangles(2, red), triangles(1, red), triangles(3, red)]
    results = VERIFIER.verify(images, "two green triangles")
    assert [_failing(r) for r in results] == [
        {"count"},  # three: wrong count, and not extra as well
        {"no_extra_objects"},  # two and a red circle
        {"count"},  # one, and a red circle in place of the second
        {"count", "no_extra_objects"},  # three and a red circle
    ]
    # the layout check counts by color: a green circle is of the counted kind there
    green = (dataclasses.replace(GREEN_CIRCLE, y=0.75),)
    layout = VERIFIER.verify([triangles(2, green)], "two green triangles", shapes=False)[0]
    assert _failing(layout) == {"count"}


def test_sampled_scenes_with_an_extra_object_never_pass():
    rng = np.random.default_rng(7)
    scenes = [
        sample_scene(rng, split, kind)
        for kind in ("single", "count", "relation")
        for split in ("train", "heldout")
        for _ in range(20)
    ]
    extras = [(sample_extra(rng, scene),) for scene in scenes]
    captions = [scene.caption for scene in scenes]
    clean = VERIFIER.verify([render(s) for s in scenes], captions)
    extra = VERIFIER.verify([render(s, extra=e) for s, e in zip(scenes, extras)], captions)
    assert all(r.passed for r in clean)
    assert not any(r.passed for r in extra)
    # the extra object is found as an object and disturbs nothing else: only the new criterion (or,
    # for an extra of a counted kind, count) catches it
    others = [all(ok for k, ok in r.criteria.items() if k != "no_extra_objects") for r in extra]
    assert np.mean(others) > 0.9


def test_a_clip_with_an_extra_moving_object_fails():
    clips = ShapeWorldClips("heldout", size=64, frames=5, length=4, seed=2)
    rng = np.random.default_rng(0)
    frames, prompts = [], []
    for i in range(len(clips)):
        scene = clips.scene(i)
        extra = sample_extra(rng, scene)
        frames.append([render(scene, 64, t, 5, extra=(extra,)) for t in range(5)])
        prompts.append(scene.caption)
        for t in (0, 4):  # the extra object stays inside the image all clip long
            shift = MOTION_DISTANCE * t / 4
            dx, dy = {"left": (-shift, 0), "right": (shift, 0), "up": (0, -shift), "down": (0, shift)}[scene.motion]
            for c in (extra.x + dx, extra.y + dy):
                assert extra.size / 2 <= c <= 1 - extra.size / 2
    results = VERIFIER.verify_clips(frames, prompts)
    assert all(_failing(r) == {"no_extra_objects"} for r in results), [r.criteria for r in results]


def test_the_shapeworld_reward_includes_the_criterion():
    scene = SCENES["relation"]
    images = [render(scene), render(scene, extra=(GREEN_CIRCLE,))]
    assert ShapeWorldReward()(images, scene.caption).tolist() == pytest.approx([1.0, 5 / 6])
    assert ShapeWorldReward(shapes=False)(images, scene.caption).tolist() == pytest.approx([1.0, 3 / 4])


def test_sample_extra_and_render_extra_refuse_what_they_cannot_do():
    huge = Scene((ShapeObject("circle", "red", 0.5, 0.5, 1.0),))
    with pytest.raises(ValueError, match="no room for an extra object"):
        sample_extra(np.random.default_rng(0), huge, tries=20)
    with pytest.raises(TypeError, match="extra must hold ShapeObject"):
        render(huge, extra=("a green circle",))
