"""Train micro-SD's VAE: a small ``diffusers.AutoencoderKL`` (4x down, 4 latent channels).

64x64 ShapeWorld images become 4x16x16 latents. ShapeWorld is flat-colored, so a short L1 + MSE
reconstruction training with a tiny KL term suffices. The export sets ``scaling_factor`` to
1 / std of the training latents (as SD's VAE config does), so micro-SD's UNet sees unit variance.

    python train/micro_vae.py --steps 1500 --resume --export runs/micro-vae/vae

The exported folder loads with ``AutoencoderKL.from_pretrained``; ``train/micro_sd.py`` reads it.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import trainkit
from diffaccel.shapeworld import ShapeWorldImages

IMAGE_SIZE = 64
KL_WEIGHT = 1e-6


def vae_config(size: str = "micro") -> dict:
    """The micro (bundled) or tiny (tests) ``AutoencoderKL`` config."""
    channels = {"micro": (16, 32, 64), "tiny": (8, 8, 8)}[size]
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
            "block_out_channels": channels, "layers_per_block": 1, "norm_num_groups": 8,
            "sample_size": IMAGE_SIZE}


@torch.no_grad()
def evaluate(vae, n: int = 128, seed: int = 1) -> dict[str, float]:
    """Reconstruction PSNR on held-out renders, and the verifier's pass rate on the
    reconstructions next to its pass rate on the renders themselves."""
    from diffaccel.shapeworld import Verifier

    data = ShapeWorldImages("heldout", IMAGE_SIZE, length=n, seed=seed)
    pixels = torch.stack([data[i][0] for i in range(n)]).to(next(vae.parameters()).device)
    captions = [data[i][1] for i in range(n)]
    recon = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    mse = F.mse_loss(recon, pixels).item()
    verifier = Verifier()
    real = [v.passed for v in verifier.verify(((pixels + 1) / 2).cpu(), captions)]
    rec = [v.passed for v in verifier.verify(((recon + 1) / 2).cpu(), captions)]
    return {"psnr_db": 10 * torch.log10(torch.tensor(4.0 / mse)).item(),
            "verifier_renders": sum(real) / n, "verifier_reconstructions": sum(rec) / n}


@torch.no_grad()
def latent_std(vae, n: int = 256, seed: int = 2) -> float:
    """Standard deviation of the (mode) latents of ``n`` training images."""
    data = ShapeWorldImages("train", IMAGE_SIZE, length=n, seed=seed)
    pixels = torch.stack([data[i][0] for i in range(n)]).to(next(vae.parameters()).device)
    return vae.encode(pixels).latent_dist.mode().std().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    from diffusers import AutoencoderKL

    args = trainkit.parse_args("micro-vae", argv, batch_size=16, steps=1500, lr=1e-3, eval_images=128)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config(args.config)).to(args.device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt = trainkit.Checkpoint(args.run_dir)
    start = ckpt.load(vae, optimizer) if args.resume else 0
    data = ShapeWorldImages("train", IMAGE_SIZE, length=trainkit.DATA_LENGTH, seed=args.seed)
    timer = trainkit.Timer(args.save_every)
    for step in (bar := trainkit.train_loop(args, start, "micro-vae")):
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = args.lr * (0.55 + 0.45 * math.cos(math.pi * step / max(1, args.steps)))
        pixels, _ = trainkit.collate(data, step, args.batch_size)
        posterior = vae.encode(pixels.to(args.device)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=trainkit.step_generator(args.seed, step))
        latents = posterior.mean + posterior.std * noise.to(args.device)
        recon = vae.decode(latents).sample
        target = pixels.to(args.device)
        loss = F.l1_loss(recon, target) + F.mse_loss(recon, target) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if timer.due():
            ckpt.save(step + 1, vae, optimizer)
            if timer.stop:
                break
    if timer.stop:
        print(f"stopped after step {step + 1}; continue with --resume")
        return {}
    if start < args.steps:
        ckpt.save(args.steps, vae, optimizer)
    vae.eval()
    scores = evaluate(vae, n=args.eval_images) if args.eval_images else {}
    print(json.dumps({"step": args.steps, **scores}))
    if args.export is not None:
        vae.register_to_config(scaling_factor=round(1.0 / latent_std(vae), 5))
        trainkit.export_fp16(vae, args.export)
        (args.export / "scores.json").write_text(json.dumps({"steps": args.steps, **scores}, indent=2))
    return scores


if __name__ == "__main__":
    main()
