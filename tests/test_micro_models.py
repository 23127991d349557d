"""Micro models: training scripts (tiny configs) run, resume identically and export folders that the
stock diffusers/transformers classes load offline; the bundled models, when present, work."""

from __future__ import annotations

import pathlib
import re
import signal
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))

import micro_clip
import micro_dit
import micro_sd
import micro_vae
import micro_video
from diffaccel import micro_models


@pytest.fixture(autouse=True)
def _restore_process_state():
    """The scripts set torch's thread count and SIGINT/SIGTERM handlers: put them back."""
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    torch.set_num_threads(threads)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _tiny(run_dir: pathlib.Path, steps: int, *extra: str) -> list[str]:
    return ["--config", "tiny", "--steps", str(steps), "--run-dir", str(run_dir), "--threads", "1",
            "--save-every", "100", *extra]


def _assert_resumes_identically(script, tmp: pathlib.Path, *extra: str) -> None:
    """Two steps in one go == one step, stop, resume, one more step (weights and optimizer)."""
    script.main(_tiny(tmp / "straight", 2, *extra))
    script.main(_tiny(tmp / "resumed", 1, *extra))
    script.main(_tiny(tmp / "resumed", 2, "--resume", *extra))
    straight = load_file(str(tmp / "straight" / "last.safetensors"))
    resumed = load_file(str(tmp / "resumed" / "last.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    # and training did something: a one-step run differs from the two-step one
    script.main(_tiny(tmp / "one", 1, *extra))
    one = load_file(str(tmp / "one" / "last.safetensors"))
    assert any(not torch.equal(one[k], straight[k]) for k in straight if k.startswith("model."))


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Tiny micro-CLIP, VAE and micro-SD folders exported by the scripts (2 steps each)."""
    root = tmp_path_factory.mktemp("exports")
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    micro_clip.main(_tiny(root / "rc", 2, "--batch-size", "4", "--eval-images", "0",
                          "--export", str(root / "micro-clip")))
    micro_vae.main(_tiny(root / "rv", 2, "--batch-size", "2", "--eval-images", "0",
                         "--export", str(root / "vae")))
    micro_sd.main(_tiny(root / "rs", 2, "--batch-size", "2", "--clip", str(root / "micro-clip"),
                        "--vae", str(root / "vae"), "--export", str(root / "micro-sd")))
    torch.set_num_threads(threads)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    return {"root": root, "clip": root / "micro-clip", "vae": root / "vae", "sd": root / "micro-sd"}


def test_clip_training_resumes_identically(tmp_path):
    _assert_resumes_identically(micro_clip, tmp_path, "--batch-size", "4", "--eval-images", "0")


def test_clip_fine_tunes_from_an_exported_model(tmp_path, tiny_exports):
    from transformers import CLIPModel

    start = CLIPModel.from_pretrained(str(tiny_exports["clip"]), dtype=torch.float32)
    micro_clip.main(_tiny(tmp_path / "ft", 1, "--batch-size", "4", "--eval-images", "0",
                          "--init", str(tiny_exports["clip"]), "--export", str(tmp_path / "tuned")))
    tuned = CLIPModel.from_pretrained(str(tmp_path / "tuned"), dtype=torch.float32)
    deltas = [(a - b).abs().max() for a, b in zip(start.state_dict().values(), tuned.state_dict().values())]
    assert max(deltas) > 0 and max(deltas) < 0.1  # one small step away from the start, not a fresh init


def test_clip_training_with_the_relation_loss_resumes_identically(tmp_path):
    _assert_resumes_identically(micro_clip, tmp_path, "--batch-size", "6", "--eval-images", "0",
                                "--relation-weight", "1")
    weights = load_file(str(tmp_path / "straight" / "last.safetensors"))
    assert any(k.startswith("model.probe.") for k in weights)  # the probe trains along and is saved


def test_relation_loss_writes_the_relation_into_the_token_states():
    from transformers import CLIPTextModel

    from diffaccel.shapeworld import ShapeWorldImages
    from diffaccel.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    tower = CLIPTextModel(micro_clip.clip_config("tiny").text_config)
    probe = torch.nn.Linear(tower.config.hidden_size, 4)
    tokenizer = clip_tokenizer()
    data = ShapeWorldImages("train", 64, length=80, seed=4)
    scenes = [data.scene(i) for i in range(80) if data.scene(i).kind == "relation"][:12]
    assert micro_clip.relation_loss(tower, probe, [data.scene(i) for i in range(80)
                                                   if data.scene(i).kind != "relation"], tokenizer) == 0
    before = micro_clip.relation_token_change(tower, tokenizer, scenes)
    first = micro_clip.relation_loss(tower, probe, scenes, tokenizer).item()
    assert first == pytest.approx(np.log(4), rel=0.2)  # an untrained probe is near chance
    optimizer = torch.optim.Adam([*tower.parameters(), *probe.parameters()], lr=3e-3)
    for _ in range(30):
        loss = micro_clip.relation_loss(tower, probe, scenes, tokenizer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first
    assert micro_clip.relation_token_change(tower, tokenizer, scenes) > 2 * before


def test_vae_training_resumes_identically(tmp_path):
    _assert_resumes_identically(micro_vae, tmp_path, "--batch-size", "2", "--eval-images", "0")


def test_sd_training_resumes_identically(tmp_path, tiny_exports):
    _assert_resumes_identically(micro_sd, tmp_path, "--batch-size", "2", "--clip", str(tiny_exports["clip"]),
                                "--vae", str(tiny_exports["vae"]))
    ema = load_file(str(tmp_path / "straight" / "last.safetensors"))
    assert any(k.startswith("ema.") for k in ema)  # the EMA is checkpointed too


def test_sd_fine_tunes_from_an_exported_pipeline(tmp_path, tiny_exports):
    from diffusers import UNet2DConditionModel

    start = UNet2DConditionModel.from_pretrained(str(tiny_exports["sd"]), subfolder="unet", torch_dtype=torch.float32)
    micro_sd.main(_tiny(tmp_path / "ft", 1, "--batch-size", "2", "--clip", str(tiny_exports["clip"]),
                        "--vae", str(tiny_exports["vae"]), "--init", str(tiny_exports["sd"]),
                        "--export", str(tmp_path / "tuned")))
    tuned = UNet2DConditionModel.from_pretrained(str(tmp_path / "tuned"), subfolder="unet", torch_dtype=torch.float32)
    deltas = [(a - b).abs().max() for a, b in zip(start.state_dict().values(), tuned.state_dict().values())]
    assert max(deltas) > 0 and max(deltas) < 0.1  # one small step away from the start, not a fresh init


def _dit_args(tiny_exports, *extra: str) -> tuple[str, ...]:
    return ("--batch-size", "2", "--clip", str(tiny_exports["clip"]), "--vae", str(tiny_exports["vae"]), *extra)


def test_dit_training_resumes_identically(tmp_path, tiny_exports):
    _assert_resumes_identically(micro_dit, tmp_path, *_dit_args(tiny_exports))
    weights = load_file(str(tmp_path / "straight" / "last.safetensors"))
    # the transformer and the T5 encoder train together; both are in the EMA
    assert any(k.startswith("model.text_encoder_3.") for k in weights)
    assert any(k.startswith("ema.") for k in weights)


def test_dit_export_loads_with_the_stock_sd3_pipeline_and_fine_tunes(tmp_path, tiny_exports):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPModel

    from diffaccel.tokenizers import clip_tokenizer

    micro_dit.main(_tiny(tmp_path / "run", 2, *_dit_args(tiny_exports, "--export", str(tmp_path / "dit"))))
    for file in (tmp_path / "dit").rglob("*.safetensors"):
        assert all(t.dtype == torch.float16 for t in load_file(str(file)).values()), file
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "dit"), local_files_only=True)
    assert _module_dtypes(pipe) == {torch.float32}  # the stock class, no dtype argument
    assert pipe.transformer.config.num_layers == 2 and pipe.vae.config.shift_factor == 0.0
    prompt = "a red circle to the left of a blue square"
    image = pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # both CLIP slots are the tiny CLIP's text tower, its vocabulary cut to the ShapeWorld words
    clip = CLIPModel.from_pretrained(str(tiny_exports["clip"]), dtype=torch.float32)
    ids = pipe.tokenizer(prompt, return_tensors="pt").input_ids
    full_ids = clip_tokenizer()(prompt, return_tensors="pt").input_ids
    assert ids.shape == full_ids.shape and not torch.equal(ids, full_ids)
    with torch.no_grad():
        features = clip.get_text_features(input_ids=full_ids)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            out = encoder(ids)
            torch.testing.assert_close(out.last_hidden_state, clip.text_model(full_ids).last_hidden_state,
                                       atol=2e-3, rtol=0)  # fp16 storage
            torch.testing.assert_close(out.text_embeds, features, atol=2e-3, rtol=0)  # SD3's pooled input
    start = SD3Transformer2DModel.from_pretrained(str(tmp_path / "dit"), subfolder="transformer", torch_dtype=torch.float32)
    micro_dit.main(_tiny(tmp_path / "ft", 1, *_dit_args(tiny_exports, "--init", str(tmp_path / "dit"),
                                                         "--export", str(tmp_path / "tuned"))))
    tuned = SD3Transformer2DModel.from_pretrained(str(tmp_path / "tuned"), subfolder="transformer",
                                                  torch_dtype=torch.float32)
    deltas = [(a - b).abs().max() for a, b in zip(start.state_dict().values(), tuned.state_dict().values())]
    assert max(deltas) > 0 and max(deltas) < 0.1  # one small step away from the start, not a fresh init


def test_cut_clip_vocab_keeps_the_encoder_bit_identical_on_shapeworld_prompts():
    import trainkit
    from transformers import CLIPTextModel

    from diffaccel.shapeworld import WORDS, eval_prompts
    from diffaccel.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    encoder = CLIPTextModel(micro_clip.clip_config("tiny").text_config).eval()
    prompts = [p for kind in ("single", "count", "relation", "motion") for p in eval_prompts(kind, 6)]
    full = clip_tokenizer()
    with torch.no_grad():
        before = encoder(full(prompts, padding="max_length", return_tensors="pt").input_ids)
        tokenizer = trainkit.cut_clip_vocab(encoder, WORDS)
        ids = tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids
        after = encoder(ids)
    assert encoder.config.vocab_size == len(tokenizer) < 1000
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)
    assert torch.equal(before.pooler_output, after.pooler_output)  # read at the moved end-of-text id
    # a word outside the list still tokenizes (into shorter pieces), within the cut vocabulary
    other = tokenizer("a photograph of a zebra").input_ids
    assert max(other) < len(tokenizer) and len(other) > len(full("a photograph of a zebra").input_ids)


def test_video_training_resumes_identically(tmp_path):
    _assert_resumes_identically(micro_video, tmp_path, "--stage", "vae", "--batch-size", "1")
    _assert_resumes_identically(micro_video, tmp_path / "stills", "--stage", "vae", "--batch-size", "1",
                                "--vae-frames", "1", "--cache", "3")
    micro_video.main(_tiny(tmp_path / "v", 1, "--stage", "vae", "--batch-size", "1",
                           "--export", str(tmp_path / "vae")))
    _assert_resumes_identically(micro_video, tmp_path / "dit", "--stage", "dit", "--batch-size", "1",
                                "--vae", str(tmp_path / "vae"))
    _assert_resumes_identically(micro_video, tmp_path / "cached", "--stage", "dit", "--batch-size", "2",
                                "--cache", "3", "--vae", str(tmp_path / "vae"))
    # the resumed run read the clips its first part encoded (and still matched the straight run)
    assert (tmp_path / "cached" / "resumed" / "latents.safetensors").is_file()


def test_saved_latent_clips_are_reused_only_when_made_the_same_way(tmp_path):
    clips = micro_video.LatentClips(torch.randn(3, 4, 2, 2, 2), ["a red circle moving left", "b", "c"])
    path = tmp_path / "latents.safetensors"
    clips.save(path, {"clips": 3, "vae": "x"})
    loaded = micro_video.LatentClips.load(path, {"vae": "x", "clips": 3}, "cpu")
    assert torch.equal(loaded.latents, clips.latents) and loaded.captions == clips.captions
    assert micro_video.LatentClips.load(path, {"clips": 3, "vae": "y"}, "cpu") is None
    assert micro_video.LatentClips.load(tmp_path / "missing.safetensors", {"clips": 3}, "cpu") is None


def test_unclamped_decode_is_the_vaes_decode_before_its_clamp():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**micro_video.vae_config("tiny")).eval()
    z = torch.randn(2, 4, 3, 8, 8)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(10)  # overshoot [-1, 1], where the clamp bites
        clamped, raw = vae.decode(z).sample, micro_video.decode_unclamped(vae, z)
    assert raw.shape == clamped.shape == (2, 3, 5, 32, 32) and raw.abs().max() > 1
    torch.testing.assert_close(raw.clamp(-1, 1), clamped, rtol=0, atol=0)


def test_per_frame_init_makes_the_video_vae_an_image_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**micro_video.vae_config("tiny")).eval()
    still = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    clip = still.repeat(1, 1, 5, 1, 1)

    def spread(model):  # how much the frames of a static clip differ, in latents and decoded
        with torch.no_grad():
            z = model.encode(clip).latent_dist.mean
            out = micro_video.decode_unclamped(model, z)
        return (z - z[:, :, :1]).abs().max(), (out - out[:, :, :1]).abs().max()

    assert min(spread(vae)) > 1e-3  # random temporal taps: frames differ
    micro_video.init_per_frame(vae)
    assert max(spread(vae)) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(clip).latent_dist.mean[:, :, :1], vae.encode(still).latent_dist.mean)


def test_short_context_matches_the_pipelines_512_token_context():
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5EncoderModel

    tokenizer = micro_video.t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(micro_video.text_encoder_config(len(tokenizer), "tiny")).eval()
    transformer = WanTransformer3DModel(**micro_video.transformer_config(4, 8, "tiny")).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, scheduler=FlowMatchEulerDiscreteScheduler(),
                       vae=AutoencoderKLWan(**micro_video.vae_config("tiny")), transformer=transformer)
    captions = ["a red circle moving left", "", "two green triangles and a blue square moving up"]
    x, t = torch.randn(3, 4, 5, 8, 8), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        full, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512)
        reference = transformer(x, timestep=t, encoder_hidden_states=full, return_dict=False)[0]
        short = micro_video.ShortContext(pipe).encode(captions, "cpu")
        out = transformer(x, timestep=t, encoder_hidden_states=short, return_dict=False)[0]
    assert short.shape[1] < 32
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # without the padding bias the short context is not the same model input
        transformer.set_attn_processor(type(transformer.blocks[0].attn1.processor)())
        unbiased = transformer(x, timestep=t, encoder_hidden_states=short, return_dict=False)[0]
    assert (unbiased - reference).abs().max() > 1e-4


def test_video_export_loads_with_wan_pipeline(tmp_path):
    from diffusers import WanPipeline

    micro_video.main(_tiny(tmp_path / "v", 1, "--stage", "vae", "--batch-size", "1",
                           "--export", str(tmp_path / "vae")))
    micro_video.main(_tiny(tmp_path / "d", 1, "--stage", "dit", "--batch-size", "1",
                           "--vae", str(tmp_path / "vae"), "--export", str(tmp_path / "micro-video")))
    pipe = WanPipeline.from_pretrained(str(tmp_path / "micro-video"), torch_dtype=torch.float32,
                                       local_files_only=True)
    assert pipe.transformer.dtype == torch.float32
    frames = pipe("a red circle moving left", num_inference_steps=2, height=64, width=64, num_frames=9,
                  output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 64, 64, 3) and np.isfinite(frames).all()
    # the export loads with no dtype argument: every model in float32 (the weights stay fp16 on disk)
    plain = WanPipeline.from_pretrained(str(tmp_path / "micro-video"), local_files_only=True)
    assert {plain.text_encoder.dtype, plain.transformer.dtype, plain.vae.dtype} == {torch.float32}


def test_exports_are_fp16_and_load_offline(tiny_exports):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPModel

    clip = CLIPModel.from_pretrained(str(tiny_exports["clip"]), local_files_only=True)
    assert next(clip.parameters()).dtype == torch.float16  # stored dtype
    assert CLIPImageProcessor.from_pretrained(str(tiny_exports["clip"])).crop_size["height"] == 64
    for file in tiny_exports["sd"].rglob("*.safetensors"):
        assert all(t.dtype == torch.float16 for t in load_file(str(file)).values()), file
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_exports["sd"]), torch_dtype=torch.float32,
                                                   local_files_only=True)
    assert [b for b in pipe.unet.config.down_block_types] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert pipe.unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # the text encoder is micro-CLIP's text tower, weight for weight (its vocabulary cut to the ShapeWorld words)
    from diffaccel.shapeworld import WORDS
    from diffaccel.tokenizers import clip_tokenizer_for_words

    tokenizer, clip_ids = clip_tokenizer_for_words(list(WORDS))
    assert pipe.tokenizer.get_vocab() == tokenizer.get_vocab()
    torch.testing.assert_close(pipe.text_encoder.embeddings.token_embedding.weight,
                               clip.text_model.embeddings.token_embedding.weight.float()[torch.tensor(clip_ids)])
    image = pipe("a red circle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # and as the README loads the bundled one: the stock class, no dtype argument
    plain = StableDiffusionPipeline.from_pretrained(str(tiny_exports["sd"]), local_files_only=True)
    assert {plain.text_encoder.dtype, plain.unet.dtype, plain.vae.dtype} == {torch.float32}
    assert np.isfinite(plain("a red circle", num_inference_steps=2, output_type="np").images).all()


def test_loaders_and_clear_errors(tiny_exports, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        micro_models.micro_model_path("micro-gan")
    monkeypatch.setenv("DIFFACCEL_MODELS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="micro-sd is not at .* train/micro_sd.py"):
        micro_models.load_micro_sd()
    monkeypatch.setenv("DIFFACCEL_MODELS", str(tiny_exports["root"]))
    pipe = micro_models.load_micro_sd()
    image = pipe("a blue square", num_inference_steps=2, output_type="np").images
    assert np.isfinite(image).all()
    model, tokenizer = micro_models.load_micro_clip()
    features = micro_models.MicroClipFeatures(model)
    out = features(torch.randint(0, 256, (3, 3, 299, 299), dtype=torch.uint8))
    assert out.shape == (3, features.num_features) and torch.isfinite(out).all()
    assert tokenizer("a red circle").input_ids[-1] == model.config.text_config.eos_token_id


def test_eval_script_runs_on_a_tiny_export(tiny_exports, monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import eval_micro

    monkeypatch.setenv("DIFFACCEL_MODELS", str(tiny_exports["root"]))
    report = eval_micro.main(["--steps", "2", "--prompts", "2", "--kinds", "single", "--fid-images", "20",
                              "--batch", "20", "--threads", "1", "--skip-clip", "--out",
                              str(tmp_path / "r.json")])
    single = report["micro_sd"]["kinds"]["single"]
    assert 0 <= single["trained"]["accuracy"] <= 1 and 0 <= single["random_unet"]["mean_score"] <= 1
    criteria = single["trained"]["criteria"]
    assert set(criteria) == {"object_0_color", "object_0_shape", "no_extra_objects"}
    assert min(criteria.values()) >= single["trained"]["accuracy"]  # passing needs every criterion
    assert np.isfinite(report["micro_sd"]["fid_micro_clip"]) and report["micro_sd"]["fid_micro_clip"] >= 0
    assert (tmp_path / "r.json").is_file()
    with pytest.raises(ValueError, match="--steps"):
        eval_micro.main(["--steps", "0"])


def test_perturbed_captions_contradict_the_scene():
    from diffaccel.shapeworld import ShapeWorldImages, Verifier

    data = ShapeWorldImages("train", 64, length=24, seed=5)
    rng = np.random.default_rng(0)
    images = [data[i][0] for i in range(24)]
    scenes = [data.scene(i) for i in range(24)]
    negatives = [micro_clip.perturb(s, rng).caption for s in scenes]
    assert all(n != s.caption for n, s in zip(negatives, scenes))
    results = Verifier().verify((torch.stack(images) + 1) / 2, negatives)
    assert not any(r.passed for r in results)


@pytest.mark.skipif(not (micro_models.models_dir() / "micro-clip" / "config.json").is_file(),
                    reason="micro-CLIP has not been exported to assets/models yet")
def test_bundled_micro_clip_prefers_true_captions():
    model, tokenizer = micro_models.load_micro_clip()
    scores = micro_clip.evaluate(model, tokenizer, n=64, batch=32, seed=3)
    # a random CLIP is at ~0.5 on hard negatives and ~1/32 on retrieval
    assert scores["retrieval"] > 0.2
    assert scores["hard_single"] > 0.7


@pytest.mark.skipif(not (micro_models.models_dir() / "micro-clip" / "config.json").is_file(),
                    reason="micro-CLIP has not been exported to assets/models yet")
def test_relation_token_change_is_zero_when_the_tower_cannot_tell_relations_apart():
    from diffaccel.shapeworld import ShapeWorldImages

    model, tokenizer = micro_models.load_micro_clip()
    data = ShapeWorldImages("train", 64, length=48, seed=2)
    scenes = [data.scene(i) for i in range(48) if data.scene(i).kind == "relation"]
    change = micro_clip.relation_token_change(model.text_model, tokenizer, scenes)
    assert 0 < change < 1
    embeddings = model.text_model.embeddings.token_embedding.weight.data
    for a, b in (("left", "right"), ("above", "below")):  # make the flipped words the same vector
        ia, ib = (tokenizer.convert_tokens_to_ids(w + "</w>") for w in (a, b))
        embeddings[ia] = embeddings[ib]
    assert micro_clip.relation_token_change(model.text_model, tokenizer, scenes) == pytest.approx(0, abs=1e-5)


@pytest.mark.skipif(not (micro_models.models_dir() / "micro-sd" / "model_index.json").is_file(),
                    reason="micro-SD has not been exported to assets/models yet")
def test_bundled_micro_sd_draws_single_objects():
    from diffaccel.shapeworld import Verifier, eval_prompts

    pipe = micro_models.load_micro_sd()
    prompts = eval_prompts("single", 8, seed=0, split="train")
    images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()
    scores = [r.score for r in Verifier().verify(images, prompts)]
    assert sum(scores) / len(scores) > 0.5  # random weights draw no object at all (score ~0)


@pytest.mark.skipif(not (micro_models.models_dir() / "micro-video" / "model_index.json").is_file(),
                    reason="micro-video has not been exported to assets/models yet")
def test_bundled_micro_video_draws_the_object():
    from diffaccel.shapeworld import Verifier, eval_prompts

    pipe = micro_models.load_micro_video()
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts("motion", 4, seed=0, split="train")
    clips = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, height=64, width=64, num_frames=9,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert clips.shape == (4, 9, 3, 64, 64) and torch.isfinite(clips).all()
    results = Verifier().verify_clips(clips, prompts)
    # random weights draw no object at all (color and shape criteria fail in every frame)
    assert sum(r.criteria["object_0_color"] for r in results) >= 3


@pytest.mark.skipif(not (micro_models.models_dir() / "micro-dit" / "model_index.json").is_file(),
                    reason="micro-DiT has not been exported to assets/models yet")
def test_bundled_micro_dit_draws_single_objects():
    from diffaccel.shapeworld import Verifier, eval_prompts

    pipe = micro_models.load_micro_dit()
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts("single", 8, seed=0, split="train")
    images = pipe(prompts, num_inference_steps=12, max_sequence_length=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (8, 3, 64, 64) and torch.isfinite(images).all()
    scores = [r.score for r in Verifier().verify(images, prompts)]
    assert sum(scores) / len(scores) > 0.5  # random weights draw no object at all (score ~0)


_BUNDLED = all((micro_models.models_dir() / name).is_dir() for name in micro_models.MICRO_MODELS)
_README_LOADER = re.compile(r'`((?:StableDiffusionPipeline|StableDiffusion3Pipeline|WanPipeline|CLIPModel)\.from_pretrained\("assets/models/[\w-]+"\))`')


def _module_dtypes(obj) -> set[torch.dtype]:
    modules = [obj] if isinstance(obj, torch.nn.Module) else [
        c for c in obj.components.values() if isinstance(c, torch.nn.Module)]
    return {p.dtype for module in modules for p in module.parameters()}


def _draw_sd(pipe, steps: int = 2) -> np.ndarray:
    return pipe("a red circle above a blue square", num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.skipif(not _BUNDLED, reason="the micro models have not been exported to assets/models yet")
def test_readme_loaders_run_with_the_stock_classes(monkeypatch):
    """The README's ``X.from_pretrained("assets/models/...")`` calls, verbatim (stock classes, no dtype),
    load every component in one dtype and run (the text encoders loaded fp16 next to an fp32 UNet/VAE:
    the first call failed with "mat1 and mat2 must have the same dtype"). micro-SD draws the image
    of ``load_micro_sd(dtype=float32)``."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, WanPipeline
    from transformers import CLIPModel

    calls = _README_LOADER.findall((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(calls) == 4, calls
    monkeypatch.chdir(REPO)
    for call in calls:
        loaded = eval(call, {"StableDiffusionPipeline": StableDiffusionPipeline, "WanPipeline": WanPipeline,
                             "StableDiffusion3Pipeline": StableDiffusion3Pipeline, "CLIPModel": CLIPModel})
        assert len(_module_dtypes(loaded)) == 1, (call, _module_dtypes(loaded))
        if isinstance(loaded, StableDiffusionPipeline):
            assert _module_dtypes(loaded) == {torch.float32}
            np.testing.assert_array_equal(_draw_sd(loaded), _draw_sd(micro_models.load_micro_sd(dtype=torch.float32)))
        elif isinstance(loaded, StableDiffusion3Pipeline):
            assert _module_dtypes(loaded) == {torch.float32}
            image = loaded("a red circle above a blue square", num_inference_steps=2, output_type="np").images
            assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
        elif isinstance(loaded, WanPipeline):
            frames = loaded("a red circle moving left", height=64, width=64, num_frames=9, num_inference_steps=2,
                            output_type="np").frames
            assert frames.shape == (1, 9, 64, 64, 3) and np.isfinite(frames).all()
        else:
            features = loaded.get_image_features(pixel_values=torch.zeros(1, 3, 64, 64, dtype=loaded.dtype))
            assert torch.isfinite(features.pooler_output).all()


@pytest.mark.skipif(not _BUNDLED, reason="the micro models have not been exported to assets/models yet")
def test_the_drop_in_class_loads_micro_sd_in_one_dtype(monkeypatch):
    import diffaccel
    from diffaccel.pipelines import AcceleratedStableDiffusionPipeline

    monkeypatch.chdir(REPO)
    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(
        "assets/models/micro-sd", acceleration=diffaccel.EncoderReuseConfig("uniform:2"))
    assert _module_dtypes(pipe) == {torch.float32}
    assert np.isfinite(_draw_sd(pipe, steps=4)).all()
    assert pipe.acceleration_stats.features["encoder_reuse"].encoder_evaluations == 2
