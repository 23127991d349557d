"""Train micro-video: a Wan-architecture text-to-video model on moving-ShapeWorld clips.

Two stages, each resumable:

* ``--stage vae``: an ``AutoencoderKLWan`` (4x spatial, 2x temporal, 8 latent channels) learns to
  reconstruct 9-frame 64x64 clips; its export records the per-channel latent mean and std, which
  ``WanPipeline`` uses to de-normalize latents.
* ``--stage dit``: a ``WanTransformer3DModel`` and a small ``UMT5EncoderModel`` (the offline
  ``diffaccel.tokenizers.t5_tokenizer()``) train together with the flow-matching objective
  (``x_t = (1 - s) x_0 + s noise``, target ``noise - x_0``, ``s`` shifted by 3 like the
  ``FlowMatchEulerDiscreteScheduler(shift=3)`` that samples it). Prompts are encoded by the
  pipeline's own ``encode_prompt`` (512 tokens), exactly as at inference.

    python train/micro_video.py --stage vae --steps 2000 --resume --export runs/micro-video-vae/vae
    python train/micro_video.py --stage dit --steps 20000 --resume --export assets/models/micro-video

The ``dit`` export is a ``WanPipeline`` folder (fp16 safetensors) that loads offline with
``WanPipeline.from_pretrained``; call it with ``height=64, width=64, num_frames=9``.
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import trainkit

from diffaccel.shapeworld import ShapeWorldClips
from diffaccel.tokenizers import t5_tokenizer

SIZE, FRAMES, SHIFT = 64, 9, 3.0
CAPTION_DROPOUT = 0.1
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default


def vae_config(size: str = "micro") -> dict:
    base, z = {"micro": (16, 8), "tiny": (4, 4)}[size]
    return {"base_dim": base, "z_dim": z, "dim_mult": [1, 2, 2], "num_res_blocks": 1,
            "temperal_downsample": [False, True], "latents_mean": [0.0] * z, "latents_std": [1.0] * z,
            "scale_factor_temporal": 2, "scale_factor_spatial": 4}


def transformer_config(z_dim: int, text_dim: int, size: str = "micro") -> dict:
    heads, head_dim, layers = {"micro": (4, 16, 4), "tiny": (2, 4, 1)}[size]
    return {"patch_size": (1, 2, 2), "num_attention_heads": heads, "attention_head_dim": head_dim,
            "in_channels": z_dim, "out_channels": z_dim, "text_dim": text_dim, "freq_dim": 64,
            "ffn_dim": 4 * heads * head_dim, "num_layers": layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}


def text_encoder_config(vocab_size: int, size: str = "micro"):
    from transformers import UMT5Config

    d = {"micro": 64, "tiny": 8}[size]
    return UMT5Config(vocab_size=vocab_size, d_model=d, d_kv=d // 4, d_ff=2 * d, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def clips(data, step: int, batch_size: int, device: str) -> tuple[torch.Tensor, list[str]]:
    """A batch as (B, C, T, H, W) in [-1, 1] (the VAE's layout) and its captions."""
    pixels, captions = trainkit.collate(data, step, batch_size)
    return pixels.permute(0, 2, 1, 3, 4).to(device), captions


def train_vae(args) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**vae_config(args.config)).to(args.device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt = trainkit.Checkpoint(args.run_dir)
    start = ckpt.load(vae, optimizer) if args.resume else 0
    data = ShapeWorldClips("train", SIZE, FRAMES, length=trainkit.DATA_LENGTH, seed=args.seed)
    timer = trainkit.Timer(args.save_every)
    for step in (bar := trainkit.train_loop(args, start, "micro-video vae")):
        video, _ = clips(data, step, args.batch_size, args.device)
        posterior = vae.encode(video).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=trainkit.step_generator(args.seed, step))
        recon = vae.decode(posterior.mean + posterior.std * noise.to(args.device)).sample
        loss = F.l1_loss(recon, video) + F.mse_loss(recon, video) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if timer.due():
            ckpt.save(step + 1, vae, optimizer)
            if timer.stop:
                break
    if timer.stop:
        print(f"stopped after step {step + 1}; continue with --resume")
        return
    if start < args.steps:
        ckpt.save(args.steps, vae, optimizer)
    if args.export is not None:
        vae.eval()
        with torch.no_grad():
            video, _ = clips(ShapeWorldClips("train", SIZE, FRAMES, length=32, seed=args.seed + 1), 0, 32,
                             args.device)
            z = vae.encode(video).latent_dist.mode()
        vae.register_to_config(latents_mean=z.mean(dim=(0, 2, 3, 4)).tolist(),
                               latents_std=z.std(dim=(0, 2, 3, 4)).tolist())
        trainkit.export_fp16(vae, args.export)


class _Denoiser(torch.nn.Module):
    """The trained parts of the dit stage, in one module for checkpointing."""

    def __init__(self, transformer: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder


def train_dit(args) -> None:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5EncoderModel

    vae = AutoencoderKLWan.from_pretrained(args.vae, torch_dtype=torch.float32).to(args.device).eval()
    vae.requires_grad_(False)
    tokenizer = t5_tokenizer()
    torch.manual_seed(args.seed)
    text_encoder = UMT5EncoderModel(text_encoder_config(len(tokenizer), args.config))
    transformer = WanTransformer3DModel(**transformer_config(
        vae.config.z_dim, text_encoder.config.d_model, args.config))
    model = _Denoiser(transformer, text_encoder).to(args.device).train()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), transformer=transformer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ckpt = trainkit.Checkpoint(args.run_dir)
    start = ckpt.load(model, optimizer) if args.resume else 0
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(args.device)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(args.device)
    data = ShapeWorldClips("train", SIZE, FRAMES, length=trainkit.DATA_LENGTH, seed=args.seed)
    timer = trainkit.Timer(args.save_every)
    for step in (bar := trainkit.train_loop(args, start, "micro-video dit")):
        g = trainkit.step_generator(args.seed, step)
        video, captions = clips(data, step, args.batch_size, args.device)
        drop = (torch.rand(len(captions), generator=g) < CAPTION_DROPOUT).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            x0 = (vae.encode(video).latent_dist.mode() - mean) / std
        embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                       max_sequence_length=MAX_SEQUENCE_LENGTH, device=args.device)
        noise = torch.randn(x0.shape, generator=g).to(args.device)
        u = torch.rand(len(captions), generator=g)
        sigma = (SHIFT * u / (1 + (SHIFT - 1) * u)).to(args.device)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = transformer((1 - s) * x0 + s * noise, timestep=sigma * 1000,
                           encoder_hidden_states=embeds, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if timer.due():
            ckpt.save(step + 1, model, optimizer, vae=str(args.vae))
            if timer.stop:
                break
    if timer.stop:
        print(f"stopped after step {step + 1}; continue with --resume")
        return
    if start < args.steps:
        ckpt.save(args.steps, model, optimizer, vae=str(args.vae))
    if args.export is not None:
        pipe.to(torch.float16).save_pretrained(str(args.export), safe_serialization=True)
        (args.export / "training.json").write_text(json.dumps(
            {"steps": max(start, args.steps), "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = trainkit.parse_args("micro-video", argv, batch_size=8, steps=2000, lr=3e-4, stage="dit",
                               vae=str(trainkit.REPO / "runs/micro-video-vae/vae"))
    if args.stage not in ("vae", "dit"):
        raise ValueError(f"--stage must be 'vae' or 'dit', got {args.stage!r}")
    if args.stage == "vae":
        if args.run_dir == trainkit.REPO / "runs" / "micro-video":
            args.run_dir = trainkit.REPO / "runs" / "micro-video-vae"
        train_vae(args)
    else:
        train_dit(args)


if __name__ == "__main__":
    main()
