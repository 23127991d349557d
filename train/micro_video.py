"""Train micro-video: a Wan-architecture text-to-video model on moving-ShapeWorld clips.

Two stages, each resumable:

* ``--stage vae``: an ``AutoencoderKLWan`` (4x spatial, 2x temporal, 8 latent channels) learns to
  reconstruct 64x64 clips; its export records the per-channel latent mean and std, which
  ``WanPipeline`` uses to de-normalize latents. It trains on 5-frame clips (``--vae-frames``): the
  causal VAE encodes the first frame alone and every later group of 4 frames with the same weights
  and a feature cache, so 5 frames exercise every path at about half the cost of 9. It trains as
  an autoencoder: the decoder reads the posterior mean plus fixed noise of std 0.05 (a tiny L2
  keeps the latents' scale), not a sample of the learned posterior; with the usual 1e-6 KL, Adam
  let the posterior's log-variance drift to 0 while the decoder was still flat, the noise then
  drowned the latents and the decoder never started to draw. The pipeline and the DiT use the
  posterior mean only (``latent_dist.mode()``). The decoder
  sits for a few hundred steps at the flat mean image before it starts to draw, and needs ~2k
  steps to get colors right (CPU, batch 8: 19 dB at step 400, 33 dB at 3000); ``--vae-frames 1``
  (still scenes, 4x cheaper) does that, then a short run on clips learns the temporal taps
  (commands below; the cosine schedule spans both).
* ``--stage dit``: a ``WanTransformer3DModel`` and a small ``UMT5EncoderModel`` (the offline
  ``diffaccel.tokenizers.t5_tokenizer()``) train together with the flow-matching objective
  (``x_t = (1 - s) x_0 + s noise``, target ``noise - x_0``, ``s`` shifted by 3 like the
  ``FlowMatchEulerDiscreteScheduler(shift=3)`` that samples it); an EMA of the weights is
  exported. Prompts are encoded by the
  pipeline's own ``encode_prompt`` at the batch's caption length; :class:`ShortContext` makes the
  transformer read them exactly as the 512-token context of inference. ``--cache N`` encodes N
  training clips with the frozen VAE once and cycles through them (in the vae stage it renders N
  items once, on all CPUs: what a GPU needs).

    python train/micro_video.py --stage vae --steps 3000 --lr 1e-3 --vae-frames 1
    python train/micro_video.py --stage vae --steps 3300 --lr 1e-3 --resume --export runs/micro-video-vae/vae
    python train/micro_video.py --stage dit --steps 1500 --batch-size 32 --lr 8e-4 --warmup 100 --cache 4000
    python train/micro_video.py --stage dit --steps 9000 --batch-size 32 --lr 8e-4 --warmup 100 --cache 4000 \
        --resume --compile
    python train/micro_video.py --stage dit --steps 12000 --batch-size 32 --lr 8e-4 --warmup 100 --cache 4000 \
        --resume --compile --export assets/models/micro-video

(the bundled micro-video: ~2 h 10 min on the 2-core CPU in all; its card has the scores). The
later DiT runs are warm restarts of the cosine schedule; ``--compile`` (``torch.compile`` of the
transformer) shortened these runs' CPU steps (~0.60 vs ~0.73 s at batch 32, read off the progress
bars, not a benchmark); the encoded clips are kept beside the checkpoint, so a
resumed run starts at once.

The ``dit`` export is a ``WanPipeline`` folder (fp16 safetensors) that loads offline with
``WanPipeline.from_pretrained``; call it with ``height=64, width=64, num_frames=9``.
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
from diffaccel.shapeworld import ShapeWorldClips, ShapeWorldImages
from diffaccel.tokenizers import t5_tokenizer

SIZE, FRAMES, SHIFT = 64, 9, 3.0
CAPTION_DROPOUT = 0.1
LATENT_NOISE, LATENT_L2 = 0.05, 1e-6  # the VAE trains as a lightly noised, L2-regularized autoencoder
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default


def vae_config(size: str = "micro") -> dict:
    base, z = {"micro": (16, 8), "tiny": (4, 4)}[size]
    return {"base_dim": base, "z_dim": z, "dim_mult": [1, 2, 2], "num_res_blocks": 1,
            "temperal_downsample": [False, True], "latents_mean": [0.0] * z, "latents_std": [1.0] * z,
            "scale_factor_temporal": 2, "scale_factor_spatial": 4}


def transformer_config(z_dim: int, text_dim: int, size: str = "micro") -> dict:
    heads, head_dim, layers = {"micro": (4, 24, 4), "tiny": (2, 4, 1)}[size]
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


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan.decode`` without its final clamp to [-1, 1]: the clamp has no gradient,
    so a decoder that overshoots anywhere stops learning there (training stalls at a flat image).
    The same frame-by-frame causal decoding as ``AutoencoderKLWan._decode`` (no tiling, no patching)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, 2)


def init_per_frame(vae) -> None:
    """Start the causal video VAE as a per-frame image VAE: every 3D convolution's taps on past
    frames are zeroed (only the current frame's 2D kernel remains), the temporal downsampler keeps
    the last frame of each pair and the upsampler repeats a frame (as Wan's original code
    initializes them; diffusers leaves them random). A still trained on stills then decodes the
    same in every frame of a clip, and clip training learns the temporal taps from zero instead of
    random ones wrecking what the stills taught."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    with torch.no_grad():
        resamplers = {id(m.time_conv) for m in vae.modules() if isinstance(m, WanResample) and hasattr(m, "time_conv")}
        for module in vae.modules():
            if not isinstance(module, WanCausalConv3d) or module.weight.shape[2] == 1:
                continue
            if id(module) in resamplers:
                weight, dim = module.weight, module.weight.shape[1]
                weight.zero_()
                module.bias.zero_()
                for copy in range(weight.shape[0] // dim):  # 2 for the upsampler, 1 for the downsampler
                    weight[copy * dim:(copy + 1) * dim, :, -1, 0, 0] = torch.eye(dim)
            else:
                module.weight[:, :, :-1] = 0


def _rendered(args, data):
    """``data`` rendered once (``--cache N``) when this run has steps to train, else ``data``.
    Called before any model work, so the renderer processes start before the model is in memory."""
    ckpt = trainkit.Checkpoint(args.run_dir)
    done = args.resume and ckpt.exists() and ckpt.info()["step"] >= args.steps
    return trainkit.Rendered(data, args.cache) if args.cache and not done else data


def train_vae(args) -> None:
    from diffusers import AutoencoderKLWan

    if args.vae_frames == 1:  # still scenes (time axis of length 1): the cheap way off the plateau
        data = ShapeWorldImages("train", SIZE, length=trainkit.DATA_LENGTH, seed=args.seed)
    else:
        data = ShapeWorldClips("train", SIZE, args.vae_frames, length=trainkit.DATA_LENGTH, seed=args.seed)
    data = _rendered(args, data)
    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**vae_config(args.config)).to(args.device).train()
    init_per_frame(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt = trainkit.Checkpoint(args.run_dir)
    start = ckpt.load(vae, optimizer) if args.resume else 0
    timer = trainkit.Timer(args.save_every)
    for step in (bar := trainkit.train_loop(args, start, "micro-video vae")):
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = args.lr * (0.55 + 0.45 * math.cos(math.pi * step / max(1, args.steps)))
        if args.vae_frames == 1:
            pixels, _ = trainkit.collate(data, step, args.batch_size)
            video = pixels.unsqueeze(2).to(args.device)
        else:
            video, _ = clips(data, step, args.batch_size, args.device)
        mean = vae.encode(video).latent_dist.mean
        noise = torch.randn(mean.shape, generator=trainkit.step_generator(args.seed, step)).to(args.device)
        recon = decode_unclamped(vae, mean + LATENT_NOISE * noise)
        loss = F.l1_loss(recon, video) + F.mse_loss(recon, video) + LATENT_L2 * mean.pow(2).mean()
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
        scores = evaluate_vae(vae, args.eval_clips, args.device) if args.eval_clips else {}
        (args.export / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        print("held-out reconstructions:", json.dumps(scores))


def evaluate_vae(vae, n: int, device: str, batch: int = 16) -> dict[str, float]:
    """PSNR of held-out 9-frame reconstructions, and the verifier's pass rate on them next to its
    pass rate on the renders themselves (what a perfect VAE would get)."""
    from diffaccel.shapeworld import Verifier

    data = ShapeWorldClips("heldout", SIZE, FRAMES, length=n, seed=1)
    mse, real, recon, prompts = [], [], [], []
    with torch.no_grad():
        for step in range(math.ceil(n / batch)):
            video, captions = clips(data, step, batch, device)
            video, captions = video[:n - step * batch], captions[:n - step * batch]
            out = vae.decode(vae.encode(video).latent_dist.mode()).sample.clamp(-1, 1)
            mse.append(((out - video) ** 2).flatten(1).mean(1).cpu())
            real.append(video.permute(0, 2, 1, 3, 4).add(1).div(2).cpu())
            recon.append(out.permute(0, 2, 1, 3, 4).add(1).div(2).cpu())
            prompts += captions
    verifier = Verifier()
    psnr = (10 * torch.log10(4.0 / torch.cat(mse))).mean()
    passed = [sum(r.passed for r in verifier.verify_clips(torch.cat(x), prompts)) / n for x in (recon, real)]
    return {"psnr_db": round(float(psnr), 2), "verifier_pass_reconstructions": passed[0],
            "verifier_pass_renders": passed[1], "clips": n}


class _Denoiser(torch.nn.Module):
    """The trained parts of the dit stage, in one module for checkpointing."""

    def __init__(self, transformer: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder


class ShortContext:
    """Prompt embeddings of a short context that the transformer reads exactly as the pipeline's
    512-token one.

    ``WanPipeline.encode_prompt`` zero-pads every prompt to ``max_sequence_length`` (512), so each
    caption of ``L`` tokens is followed by ``512 - L`` identical padding rows: identical keys and
    values in every cross-attention. Attending over a context of ``K`` rows (``K - L`` of them
    padding) with ``log((512 - L) / (K - L))`` added to the padding logits gives the same softmax
    sums, hence the same outputs, at a fraction of the cost (``K`` is the batch's longest caption
    plus one). The UMT5 encoder masks padding, so encoding at length ``K`` is exact too.
    """

    def __init__(self, pipe, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.pipe, self.full = pipe, max_sequence_length
        self.bias: torch.Tensor | None = None
        context = self

        class _BiasedCrossAttention(WanAttnProcessor):
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                         rotary_emb=None):
                if encoder_hidden_states is not None:
                    attention_mask = context.bias
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                        rotary_emb)

        for block in pipe.transformer.blocks:
            block.attn2.set_processor(_BiasedCrossAttention())

    def encode(self, captions: list[str], device: str) -> torch.Tensor:
        """Embeddings ``(B, K, D)``; sets the cross-attention bias that makes them exact."""
        tokens = max(len(ids) for ids in self.pipe.tokenizer(captions).input_ids)
        k = min(self.full, tokens + 1)
        embeds, _ = self.pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                            max_sequence_length=k, device=device)
        lengths = embeds.detach().abs().sum(-1).gt(0).sum(1).cpu()  # the pipeline pads with zero rows
        pad = torch.arange(k).view(1, -1) >= lengths.view(-1, 1)
        weight = ((self.full - lengths) / (k - lengths).clamp(min=1)).clamp(min=1e-30).log()
        bias = torch.where(pad, weight.view(-1, 1), torch.zeros(()))
        self.bias = bias.view(len(captions), 1, 1, k).to(device=device, dtype=embeds.dtype)
        return embeds


class LatentClips:
    """Training clips encoded once by the frozen VAE (its latent mode, normalized as the pipeline
    de-normalizes): step ``s`` reads items ``batch_indices(s) mod n``, so epochs repeat exactly.

    :meth:`save` / :meth:`load` keep them beside the checkpoint (``latents.safetensors``), keyed by
    what produced them (clip count, data seed, a digest of the VAE folder): a resumed run skips
    rendering and encoding, and a stale file (another VAE, seed or count) is encoded again.
    """

    def __init__(self, latents: torch.Tensor, captions: list[str]) -> None:
        self.latents, self.captions, self.n = latents, captions, len(captions)

    @classmethod
    def encode(cls, data, n: int, vae, mean: torch.Tensor, std: torch.Tensor, device: str,
               chunk: int = 64) -> LatentClips:
        from tqdm.auto import tqdm

        latents, captions = [], []
        with torch.no_grad():
            for start in tqdm(range(0, n, chunk), desc="encoding clips", mininterval=5.0):
                items = [data[i] for i in range(start, min(n, start + chunk))]
                video = torch.stack([p for p, _ in items]).permute(0, 2, 1, 3, 4).to(device)
                latents.append((vae.encode(video).latent_dist.mode() - mean) / std)
                captions += [c for _, c in items]
        return cls(torch.cat(latents), captions)

    def save(self, path: pathlib.Path, key: dict) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"latents": self.latents.cpu().contiguous()}, str(tmp),
                  metadata={"key": json.dumps(key, sort_keys=True), "captions": json.dumps(self.captions)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: pathlib.Path, key: dict, device: str) -> LatentClips | None:
        """The clips saved at ``path`` under ``key``; ``None`` when absent or made differently."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            if meta.get("key") != json.dumps(key, sort_keys=True):
                return None
            return cls(f.get_tensor("latents").to(device), json.loads(meta["captions"]))

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        idx = [i % self.n for i in trainkit.batch_indices(step, batch_size)]
        return self.latents[torch.tensor(idx, device=self.latents.device)], [self.captions[i] for i in idx]


def latent_cache_key(args) -> dict:
    """What a saved :class:`LatentClips` must match: clip count, data seed, the VAE folder's bytes."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(pathlib.Path(args.vae).rglob("*")):
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    return {"clips": args.cache, "seed": args.seed, "frames": FRAMES, "size": SIZE, "vae": digest.hexdigest()}


def train_dit(args) -> None:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from diffusers.training_utils import EMAModel
    from transformers import UMT5EncoderModel

    latent_file, key = args.run_dir / "latents.safetensors", latent_cache_key(args) if args.cache else {}
    saved = LatentClips.load(latent_file, key, args.device) if args.cache else None
    data = ShapeWorldClips("train", SIZE, FRAMES, length=trainkit.DATA_LENGTH, seed=args.seed)
    if saved is None:
        data = _rendered(args, data)
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
    context = ShortContext(pipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ema = EMAModel(model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    ckpt = trainkit.Checkpoint(args.run_dir)
    start = ckpt.load(model, optimizer, ema) if args.resume else 0
    ema.to(args.device)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(args.device)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(args.device)
    cache = saved
    if cache is None and isinstance(data, trainkit.Rendered):
        cache = LatentClips.encode(data, args.cache, vae, mean, std, args.device)
        cache.save(latent_file, key)
    forward = torch.compile(transformer) if args.compile else transformer
    timer = trainkit.Timer(args.save_every)
    for step in (bar := trainkit.train_loop(args, start, "micro-video dit")):
        for group in optimizer.param_groups:  # linear warmup, then cosine decay to 10%
            progress = step / max(1, args.steps)
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) * (0.55 + 0.45 * math.cos(math.pi * progress))
        g = trainkit.step_generator(args.seed, step)
        if cache is not None:
            x0, captions = cache.batch(step, args.batch_size)
        else:
            video, captions = clips(data, step, args.batch_size, args.device)
            with torch.no_grad():
                x0 = (vae.encode(video).latent_dist.mode() - mean) / std
        drop = (torch.rand(len(captions), generator=g) < CAPTION_DROPOUT).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
        embeds = context.encode(captions, args.device)
        noise = torch.randn(x0.shape, generator=g).to(args.device)
        u = torch.rand(len(captions), generator=g)
        sigma = (SHIFT * u / (1 + (SHIFT - 1) * u)).to(args.device)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = forward((1 - s) * x0 + s * noise, timestep=sigma * 1000,
                       encoder_hidden_states=embeds, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.step(model.parameters())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if timer.due():
            ckpt.save(step + 1, model, optimizer, ema, vae=str(args.vae))
            if timer.stop:
                break
    if timer.stop:
        print(f"stopped after step {step + 1}; continue with --resume")
        return
    if start < args.steps:
        ckpt.save(args.steps, model, optimizer, ema, vae=str(args.vae))
    if args.export is not None:
        ema.copy_to(model.parameters())
        trainkit.export_pipeline_fp16(pipe, args.export)
        (args.export / "training.json").write_text(json.dumps(
            {"steps": max(start, args.steps), "batch_size": args.batch_size, "lr": args.lr,
             "warmup": args.warmup, "cache": args.cache, "ema_decay": args.ema_decay, "seed": args.seed}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = trainkit.parse_args("micro-video", argv, batch_size=8, steps=2000, lr=3e-4, stage="dit",
                               vae=str(trainkit.REPO / "runs/micro-video-vae/vae"), vae_frames=5, cache=0,
                               warmup=200, eval_clips=64, ema_decay=0.999, compile=False)
    if args.vae_frames < 1 or (args.vae_frames - 1) % 4:
        raise ValueError(f"--vae-frames must be 1 + 4k (the causal VAE's chunking), got {args.vae_frames}")
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
