"""Train micro-DiT: a flow-matching ``SD3Transformer2DModel`` (12 MMDiT blocks) on ShapeWorld.

SD3's architecture rather than Flux's: SD3 runs true classifier-free guidance by default (the
steering and guidance-reuse features need a negative branch) and every block is the same joint
block, as in SD3-medium's 24. Flux reads 512 T5 tokens by default and needs a guidance-distilled
transformer for its default call.

The transformer denoises the 4x16x16 latents of micro-SD's VAE (64x64 images; patch 2, 64 image
tokens). Both CLIP slots hold micro-CLIP's frozen text tower (``CLIPTextModelWithProjection``, its
vocabulary cut to the ShapeWorld words with :func:`diffaccel.tokenizers.clip_tokenizer_for_words`,
bit-identical on ShapeWorld prompts), read at 24 tokens. The T5 slot holds a 2-layer
``T5EncoderModel`` (width 128) trained from scratch with the transformer: micro-CLIP's tower all
but erases relation words (micro-CLIP's card), a trained encoder need not. SD3's pipeline pads T5's
tokens to ``max_sequence_length`` (256 by default); a tenth of the training steps use 256 and the
rest 16 (4.4x cheaper), so the default call and the faster ``max_sequence_length=16`` both work.
Rectified-flow objective (velocity ``noise - x0``, logit-normal timesteps as in SD3), 10% captions
dropped to "" for guidance, EMA of the transformer and T5 exported.

    python train/micro_dit.py --cache 120000 --resume --export assets/models/micro-dit
    python train/micro_dit.py --init DIR --steps 3000 --lr 2e-4 ...   # fine-tune an export

The export is a ``StableDiffusion3Pipeline`` folder (fp16 safetensors, flow-matching Euler
scheduler) that loads offline with ``StableDiffusion3Pipeline.from_pretrained``.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import trainkit
from diffaccel.shapeworld import WORDS, ShapeWorldImages
from diffaccel.tokenizers import t5_tokenizer

IMAGE_SIZE = 64
CAPTION_DROPOUT = 0.1
TEXT_TOKENS = 24
T5_TOKENS = (16, 256)  # short (fast) and SD3's default max_sequence_length
LONG_TEXT_FRACTION = 0.1
FLOW_SHIFT = 1.0

def transformer_config(size: str = "micro", sample_size: int = 16, text_dim: int = 128) -> dict:
    """12 joint blocks at width 64 (micro, bundled) or 2 blocks at width 16 (tiny, tests)."""
    layers, heads, head_dim = {"micro": (12, 4, 16), "tiny": (2, 2, 8)}[size]
    return {
        "sample_size": sample_size, "patch_size": 2, "in_channels": 4, "out_channels": 4,
        "num_layers": layers, "attention_head_dim": head_dim, "num_attention_heads": heads,
        "joint_attention_dim": text_dim, "caption_projection_dim": heads * head_dim,
        "pooled_projection_dim": text_dim, "pos_embed_max_size": sample_size,
    }


def load_text_encoder(clip_path: pathlib.Path):
    """micro-CLIP's text tower with its projection, vocabulary cut to :data:`WORDS`, and its tokenizer."""
    from transformers import CLIPModel, CLIPTextModelWithProjection

    clip = CLIPModel.from_pretrained(str(clip_path), dtype=torch.float32)
    config = clip.config.text_config
    config.projection_dim = clip.config.projection_dim
    tower = CLIPTextModelWithProjection(config)
    tower.text_model.load_state_dict(clip.text_model.state_dict())
    tower.text_projection.load_state_dict(clip.text_projection.state_dict())
    tokenizer = trainkit.cut_clip_vocab(tower, WORDS, model_max_length=TEXT_TOKENS)
    return tower.eval().requires_grad_(False), tokenizer


def t5_encoder(size: str, width: int):
    """The trained T5 slot: 2 layers (micro) or 1 (tiny) at ``width``, a small Unigram vocabulary."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer()
    layers = {"micro": 2, "tiny": 1}[size]
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=width // 4, d_ff=2 * width,
                      num_layers=layers, num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config), tokenizer


def build_pipeline(transformer, vae, text_encoder, tokenizer, text_encoder_3, tokenizer_3):
    """The ``StableDiffusion3Pipeline`` that is exported (both CLIP slots: micro-CLIP)."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=copy.deepcopy(text_encoder),
        tokenizer_2=copy.deepcopy(tokenizer), text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def load_vae(path: str, device: str):
    """micro-SD's VAE; SD3's pipeline adds ``shift_factor`` when decoding, so it is set to 0."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32)
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    return vae.to(device).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    from diffusers import SD3Transformer2DModel
    from diffusers.training_utils import EMAModel

    args = trainkit.parse_args(
        "micro-dit", argv, batch_size=64, steps=7000, lr=4e-4, ema_decay=0.999, cache=0, init="",
        clip=str(trainkit.REPO / "assets/models/micro-clip"),
        vae=str(trainkit.REPO / "assets/models/micro-sd/vae"))
    data = ShapeWorldImages("train", IMAGE_SIZE, length=trainkit.DATA_LENGTH, seed=args.seed)
    if args.cache:  # render before any torch work: the renderers are spawned processes
        start_time = time.perf_counter()
        cached = trainkit.render_cache(data, args.cache)
        print(f"rendered {args.cache} images in {time.perf_counter() - start_time:.0f} s", flush=True)
    text_encoder, tokenizer = load_text_encoder(pathlib.Path(args.clip))
    text_encoder = text_encoder.to(args.device)
    vae = load_vae(args.vae, args.device)
    latent_size = IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    if vae.config.latent_channels != 4:
        raise ValueError(f"--vae has {vae.config.latent_channels} latent channels; micro-DiT expects 4")
    text_dim = 2 * text_encoder.config.hidden_size
    torch.manual_seed(args.seed)
    transformer = SD3Transformer2DModel(**transformer_config(args.config, latent_size, text_dim))
    text_encoder_3, tokenizer_3 = t5_encoder(args.config, text_dim)
    if args.init:  # fine-tune an exported micro-DiT (its transformer and T5) instead
        from transformers import T5EncoderModel

        transformer = SD3Transformer2DModel.from_pretrained(args.init, subfolder="transformer", dtype=torch.float32)
        text_encoder_3 = T5EncoderModel.from_pretrained(args.init, subfolder="text_encoder_3", dtype=torch.float32)
    trained = torch.nn.ModuleDict({"transformer": transformer, "text_encoder_3": text_encoder_3})
    trained = trained.to(args.device).train()
    ema = EMAModel(trained.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=0.01)
    ckpt = trainkit.Checkpoint(args.run_dir)
    start = ckpt.load(trained, optimizer, ema) if args.resume else 0
    ema.to(args.device)
    pipe = build_pipeline(transformer, vae, text_encoder, tokenizer, text_encoder_3, tokenizer_3)
    if args.cache:
        start_time = time.perf_counter()
        data = trainkit.LatentCache(*cached, vae, args.device)
        print(f"encoded {args.cache} latents in {time.perf_counter() - start_time:.0f} s", flush=True)
    timer = trainkit.Timer(args.save_every)
    warmup = min(300, max(1, args.steps // 20))
    for step in (bar := trainkit.train_loop(args, start, "micro-dit")):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup)
        g = trainkit.step_generator(args.seed, step)
        if args.cache:
            mean, std, captions = data.batch(step, args.batch_size)
        else:
            pixels, captions = trainkit.collate(data, step, args.batch_size)
        drop = torch.rand(len(captions), generator=g) < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        t5_tokens = T5_TOKENS[int(torch.rand((), generator=g) < LONG_TEXT_FRACTION)]
        states, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, device=args.device, do_classifier_free_guidance=False,
            max_sequence_length=t5_tokens)
        with torch.no_grad():
            if not args.cache:
                posterior = vae.encode(pixels.to(args.device)).latent_dist
                mean, std = posterior.mean, posterior.std
            eps = torch.randn(mean.shape, generator=g).to(args.device)
            latents = (mean + std * eps - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(args.device)
        sigma = torch.sigmoid(torch.randn(len(captions), generator=g)).to(args.device)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        pred = transformer(noisy, encoder_hidden_states=states, pooled_projections=pooled,
                           timestep=sigma * 1000).sample
        loss = F.mse_loss(pred, noise - latents)
        trainkit.optimizer_step(loss, trained.parameters(), optimizer, ema, bar, step)
        if timer.due():
            ckpt.save(step + 1, trained, optimizer, ema, clip=args.clip, vae=args.vae)
            if timer.stop:
                break
    if timer.stop:
        print(f"stopped after step {step + 1}; continue with --resume")
        return
    if start < args.steps:
        ckpt.save(args.steps, trained, optimizer, ema, clip=args.clip, vae=args.vae)
    print(json.dumps({"step": max(start, args.steps), "run_dir": str(args.run_dir)}))
    if args.export is not None:
        ema.copy_to(trained.parameters())
        trained.eval()
        if args.export.exists():
            shutil.rmtree(args.export)
        trainkit.export_pipeline_fp16(pipe, args.export)
        (args.export / "training.json").write_text(json.dumps(
            {"steps": max(start, args.steps), "batch_size": args.batch_size, "lr": args.lr,
             "ema_decay": args.ema_decay, "seed": args.seed, "init": args.init or None, "clip": args.clip, "vae": args.vae,
             "t5_tokens": T5_TOKENS, "long_text_fraction": LONG_TEXT_FRACTION},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
