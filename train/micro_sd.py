"""Train micro-SD: a ``UNet2DConditionModel`` with SD1.5's block structure at small width.

The UNet (CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D +
CrossAttnUpBlock2D x3) denoises the 4x16x16 latents of micro-SD's VAE (``train/micro_vae.py``)
of 64x64 ShapeWorld images, cross-attending to the hidden states of micro-CLIP's frozen text
tower (``train/micro_clip.py``). Standard epsilon objective on SD1.5's noise schedule; 10% of the
captions are dropped to "" for classifier-free guidance; an EMA of the weights is exported.

    python train/micro_sd.py --steps 20000 --resume --export assets/models/micro-sd
    python train/micro_sd.py --init assets/models/micro-sd --clip runs/micro-clip-rel/export \
        --vae assets/models/micro-sd/vae --steps 3000 --batch-size 64 --lr 2e-4 --cache 40000 --run-dir runs/micro-sd-ft

``--init`` fine-tunes the UNet of an exported micro-SD folder (e.g. onto a retrained text tower)
instead of starting from random weights; the EMA starts from those weights too.

The export is a ``StableDiffusionPipeline`` folder (fp16 safetensors, CLIP tokenizer, DDIM
scheduler, no safety checker) that loads offline with ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import trainkit
from diffaccel.shapeworld import WORDS, ShapeWorldImages
from diffaccel.testing.components import SD_SCHEDULER_CONFIG
from diffaccel.tokenizers import clip_tokenizer

IMAGE_SIZE = 64
CAPTION_DROPOUT = 0.1


def unet_config(cross_attention_dim: int, size: str = "micro", sample_size: int = 16) -> dict:
    """SD1.5's UNet layout at micro (bundled) or tiny (tests) width."""
    channels, groups = {"micro": ((32, 64, 96, 96), 16), "tiny": ((8, 8, 8, 8), 4)}[size]
    return {
        "sample_size": sample_size, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": channels, "layers_per_block": 1, "norm_num_groups": groups,
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": 4,
    }


def load_text_encoder(clip_path: pathlib.Path):
    """micro-CLIP's text tower as a stand-alone ``CLIPTextModel`` (what SD pipelines hold)."""
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(str(clip_path), dtype=torch.float32)
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval().requires_grad_(False)


def build_pipeline(unet, vae, text_encoder):
    """The ``StableDiffusionPipeline`` that is exported (DDIM on SD1.5's schedule), its text
    encoder's vocabulary cut to the ShapeWorld words (bit-identical on ShapeWorld prompts)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = trainkit.cut_clip_vocab(text_encoder, WORDS)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def main(argv: list[str] | None = None) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    args = trainkit.parse_args(
        "micro-sd", argv, batch_size=32, steps=20000, lr=3e-4, ema_decay=0.999, cache=0,
        clip=str(trainkit.REPO / "assets/models/micro-clip"), init="",
        vae=str(trainkit.REPO / "runs/micro-vae/vae"))
    data = ShapeWorldImages("train", IMAGE_SIZE, length=trainkit.DATA_LENGTH, seed=args.seed)
    if args.cache:  # render before CUDA starts: the renderers are forked processes
        start_time = time.perf_counter()
        cached = trainkit.render_cache(data, args.cache)
        print(f"rendered {args.cache} images in {time.perf_counter() - start_time:.0f} s", flush=True)
    text_encoder = load_text_encoder(pathlib.Path(args.clip)).to(args.device)
    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).to(args.device).eval()
    vae.requires_grad_(False)
    latent_size = IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(args.seed)
    if args.init:
        unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet", torch_dtype=torch.float32)
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(f"--init UNet cross-attends to {unet.config.cross_attention_dim} features, the "
                             f"--clip text tower gives {text_encoder.config.hidden_size}")
    else:
        unet = UNet2DConditionModel(**unet_config(text_encoder.config.hidden_size, args.config, latent_size))
    unet = unet.to(args.device).train()
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    ckpt = trainkit.Checkpoint(args.run_dir)
    start = ckpt.load(unet, optimizer, ema) if args.resume else 0
    ema.to(args.device)
    scheduler = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    tokenizer = clip_tokenizer()
    if args.cache:  # keep the latent distributions of the rendered items
        data = trainkit.LatentCache(*cached, vae, args.device)
    timer = trainkit.Timer(args.save_every)
    warmup = min(500, max(1, args.steps // 20))
    for step in (bar := trainkit.train_loop(args, start, "micro-sd")):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup)
        g = trainkit.step_generator(args.seed, step)
        if args.cache:
            mean, std, captions = data.batch(step, args.batch_size)
        else:
            pixels, captions = trainkit.collate(data, step, args.batch_size)
        drop = torch.rand(len(captions), generator=g) < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(args.device)
            states = text_encoder(ids)[0]
            if not args.cache:
                posterior = vae.encode(pixels.to(args.device)).latent_dist
                mean, std = posterior.mean, posterior.std
            eps = torch.randn(mean.shape, generator=g).to(args.device)
            latents = (mean + std * eps) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(args.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(captions),), generator=g)
        noisy = scheduler.add_noise(latents, noise, t.to(args.device))
        pred = unet(noisy, t.to(args.device), encoder_hidden_states=states).sample
        loss = F.mse_loss(pred, noise)
        trainkit.optimizer_step(loss, unet.parameters(), optimizer, ema, bar, step)
        if timer.due():
            ckpt.save(step + 1, unet, optimizer, ema, clip=args.clip, vae=args.vae)
            if timer.stop:
                break
    if timer.stop:
        print(f"stopped after step {step + 1}; continue with --resume")
        return
    if start < args.steps:
        ckpt.save(args.steps, unet, optimizer, ema, clip=args.clip, vae=args.vae)
    print(json.dumps({"step": max(start, args.steps), "run_dir": str(args.run_dir)}))
    if args.export is not None:
        ema.copy_to(unet.parameters())
        trainkit.export_pipeline_fp16(build_pipeline(unet.eval(), vae, text_encoder), args.export)
        (args.export / "training.json").write_text(json.dumps(
            {"steps": max(start, args.steps), "batch_size": args.batch_size, "lr": args.lr,
             "ema_decay": args.ema_decay, "seed": args.seed, "init": args.init or None, "clip": args.clip},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
