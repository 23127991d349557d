"""Rewards: input formats, CLIP scores (open_clip and transformers), the aesthetic head,
optional-package errors, ensembles, clips, NaN handling and the ShapeWorld verifier."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffaccel.rewards import (
    AestheticHead,
    AestheticReward,
    CLIPScoreReward,
    FunctionReward,
    HPSv2Reward,
    ImageRewardReward,
    ShapeWorldReward,
    WeightedReward,
    as_media_tensor,
    nan_to_worst,
)
from diffaccel.rewards.clip import preprocess

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def open_clip_reward(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    (folder / "diffaccel-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    return CLIPScoreReward.from_open_clip("diffaccel-tiny-clip", pretrained=None)


def _brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_media_formats_agree():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(2, 8, 6, 3), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255
    pil = [Image.fromarray(a) for a in array]
    for media in (array, array.astype(np.float32) / 255, pil, tensor):
        assert torch.allclose(as_media_tensor(media), tensor, atol=1e-6)
    clips = as_media_tensor([pil, pil])
    assert clips.shape == (2, 2, 3, 8, 6)
    with pytest.raises(ValueError, match="3 channels"):
        as_media_tensor(torch.zeros(2, 4, 8, 8))


def test_clip_score_matches_a_direct_computation(open_clip_reward):
    import open_clip

    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square", "a red circle"]
    scores = open_clip_reward(images, prompts)
    model = open_clip_reward.model
    tokens = open_clip.get_tokenizer("diffaccel-tiny-clip")(prompts)
    with torch.no_grad():
        image_emb = model.encode_image(preprocess(images, 32, open_clip_reward.mean, open_clip_reward.std))
        text_emb = model.encode_text(tokens)
    expected = 100 * torch.nn.functional.cosine_similarity(image_emb, text_emb)
    assert scores.shape == (3,) and torch.allclose(scores, expected, atol=1e-4)
    assert len(open_clip_reward._text_cache) == 2  # one text embedding per distinct prompt


def test_clip_score_from_a_transformers_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from diffaccel.tokenizers import clip_tokenizer

    config = CLIPConfig(
        text_config={
            "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
        },
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    clip_tokenizer().save_pretrained(tmp_path)
    reward = CLIPScoreReward.from_transformers(tmp_path)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = reward(images, ["a red circle", "a green triangle"])
    tokens = clip_tokenizer()(["a red circle", "a green triangle"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=preprocess(images, 32, reward.mean, reward.std), **tokens)
    expected = 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert torch.allclose(scores, expected, atol=1e-4)
    with pytest.raises(ValueError, match="local folder"):
        CLIPScoreReward.from_transformers(tmp_path / "missing")


def test_aesthetic_head_from_safetensors(open_clip_reward, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    head = AestheticHead(16).eval()
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    reward = AestheticReward(open_clip_reward, AestheticHead.from_file(tmp_path / "head.safetensors"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = head(open_clip_reward.image_embeddings(images)).squeeze(-1)
    assert torch.allclose(reward(images, "ignored"), expected.detach(), atol=1e-5)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    with pytest.raises(ValueError, match="safetensors"):
        AestheticHead.from_file(tmp_path / "head.pth")


@pytest.mark.parametrize("cls, extra", [(ImageRewardReward, "imagereward"), (HPSv2Reward, "hpsv2")])
def test_missing_optional_packages_name_the_extra(cls, extra):
    with pytest.raises(ImportError, match=rf"diffaccel\[{extra}\]"):
        cls()


def test_weighted_ensemble_and_clips():
    red = FunctionReward(lambda x, p: x[:, 0].mean(dim=(1, 2)), name="red")
    bright = FunctionReward(_brightness, name="bright")
    ensemble = WeightedReward([red, bright], [2.0, -1.0])
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = 2 * images[:, 0].mean(dim=(1, 2)) - images.mean(dim=(1, 2, 3))
    assert torch.allclose(ensemble(images, "x"), expected, atol=1e-6)
    # Clips: the mean over evenly sampled frames (first and last included).
    clips = torch.zeros(2, 9, 3, 4, 4)
    clips[:, 8] = 1.0  # only the last frame is bright
    bright.frames_per_clip = 3  # frames 0, 4, 8
    assert torch.allclose(bright(clips, "x"), torch.full((2,), 1 / 3))
    with pytest.raises(ValueError, match="2 rewards and 1 weights"):
        WeightedReward([red, bright], [1.0])


def test_nan_scores_become_the_worst_and_shape_is_checked():
    scores, count = nan_to_worst(torch.tensor([0.3, float("nan"), -0.2]))
    assert count == 1 and scores.tolist() == pytest.approx([0.3, -0.2, -0.2])
    scores, count = nan_to_worst(torch.tensor([float("nan")] * 2), worst=-100.0)
    assert count == 2 and scores.tolist() == [-100.0, -100.0]
    wrong = FunctionReward(lambda x, p: torch.zeros(len(x), 2), name="wrong")
    with pytest.raises(ValueError, match=r"shape \(2,\); got shape \(2, 2\)"):
        wrong(torch.zeros(2, 3, 4, 4), "x")
    with pytest.raises(ValueError, match="3 prompts for 2 samples"):
        FunctionReward(_brightness)(torch.zeros(2, 3, 4, 4), ["a", "b", "c"])


def test_shapeworld_reward_scores_rendered_scenes():
    shapeworld = pytest.importorskip("diffaccel.shapeworld")
    if not hasattr(shapeworld, "Verifier"):
        pytest.skip("diffaccel.shapeworld.Verifier is not available yet")
    rng = np.random.default_rng(0)
    scenes = [shapeworld.sample_scene(rng, kind="relation") for _ in range(3)]
    images = [shapeworld.render(scene, size=64) for scene in scenes]
    captions = [scene.caption for scene in scenes]
    reward = ShapeWorldReward()
    assert reward(images, captions).tolist() == [1.0, 1.0, 1.0]
    blank = torch.ones(3, 3, 64, 64)
    assert (reward(blank, captions) < 1.0).all()


def test_shapeworld_layout_reward_forgives_wrong_shapes_only():
    from diffaccel.shapeworld import Scene, ShapeObject, render

    image = render(Scene((ShapeObject("circle", "red", 0.3, 0.5, 0.25), ShapeObject("square", "blue", 0.7, 0.5, 0.25)),
                         relation="left of"))
    prompts = ["a red triangle to the left of a blue triangle", "a red circle to the right of a blue square"]
    layout = ShapeWorldReward(shapes=False)
    assert layout.name == "shapeworld-layout"
    # criteria: colors, (shapes,) relation and no_extra_objects (nothing beyond the two objects here)
    assert layout([image] * 2, prompts).tolist() == pytest.approx([1.0, 3 / 4])
    assert ShapeWorldReward()([image] * 2, prompts).tolist() == pytest.approx([3 / 6, 5 / 6])


def test_shapeworld_reward_checks_the_motion_of_clips():
    shapeworld = pytest.importorskip("diffaccel.shapeworld")
    if not hasattr(shapeworld, "Verifier"):
        pytest.skip("diffaccel.shapeworld.Verifier is not available yet")
    pixels, caption = shapeworld.ShapeWorldClips(length=1, frames=5, size=64)[0]
    clips = ((torch.stack([pixels, pixels.flip(0)]) + 1) / 2).clamp(0, 1)  # the second one moves backwards
    scores = ShapeWorldReward()(clips, caption)
    assert scores[0] == 1.0 and scores[1] < 1.0
