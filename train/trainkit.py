"""Shared plumbing of the micro-model training scripts: arguments, seeding, data, checkpoints.

Every script trains a fixed number of optimizer steps. Step ``s`` reads the dataset items
``[s * batch, (s + 1) * batch)`` and draws its noise from a generator seeded with ``(seed, s)``,
so a run resumed from a checkpoint continues exactly as if it had never stopped.

Checkpoints are safetensors files (``runs/<model>/last.safetensors``), written atomically
(temporary file, then ``os.replace``): model tensors under ``model.``, optimizer state under
``optim.``, EMA weights under ``ema.``; the step and optimizer hyper-parameters sit in the
metadata as JSON. Nothing is pickled.

Usage (inside a script)::

    args = parse_args("micro-clip", argv, batch_size=128, steps=6000, lr=5e-4)
    ckpt = Checkpoint(args.run_dir)
    step = ckpt.load(model, optimizer) if args.resume else 0
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import threading
import time
import zlib
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "Checkpoint", "LatentCache", "Rendered", "Timer", "batch_indices", "collate", "cut_clip_vocab", "export_fp16",
    "optimizer_step", "parse_args", "render_cache", "step_generator", "train_loop",
]

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_LENGTH = 10_000_000  # virtual dataset length: items are rendered on demand from (seed, index)


def parse_args(
    name: str, argv: list[str] | None, *, batch_size: int, steps: int, lr: float, **extra: Any
) -> argparse.Namespace:
    """The options every training script shares; ``extra`` adds ``--key value`` options."""
    parser = argparse.ArgumentParser(description=f"Train {name} on ShapeWorld (CPU or CUDA).")
    parser.add_argument("--steps", type=int, default=steps, help="total optimizer steps of the run")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", choices=("micro", "tiny"), default="micro",
                        help="model size: 'micro' (the bundled model) or 'tiny' (tests)")
    parser.add_argument("--run-dir", type=pathlib.Path, default=REPO / "runs" / name)
    parser.add_argument("--resume", action="store_true", help="continue from run-dir/last.safetensors")
    parser.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    parser.add_argument("--export", type=pathlib.Path, default=None,
                        help="after training, write the fp16 diffusers/transformers folder here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for key, value in extra.items():
        if isinstance(value, bool):  # a switch: off unless given
            parser.add_argument("--" + key.replace("_", "-"), action="store_true")
        else:
            parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    for field in ("steps", "batch_size"):
        if getattr(args, field) < (0 if field == "steps" else 1):
            raise ValueError(f"--{field.replace('_', '-')} must be >= {0 if field == 'steps' else 1}")
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return args


def step_generator(seed: int, step: int, salt: str = "") -> torch.Generator:
    """A CPU generator that depends only on ``(seed, step, salt)``: resumed runs draw the same noise."""
    value = (seed * 1_000_003 + step * 7_919 + zlib.crc32(salt.encode())) % (2**63)
    return torch.Generator().manual_seed(value)


def batch_indices(step: int, batch_size: int) -> range:
    """Dataset items read by optimizer step ``step``."""
    start = (step * batch_size) % DATA_LENGTH
    return range(start, start + batch_size)


def collate(dataset: Any, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """Stack the ``(pixels, caption)`` items of one step."""
    items = [dataset[i % len(dataset)] for i in batch_indices(step, batch_size)]
    return torch.stack([p for p, _ in items]), [c for _, c in items]


def _render_range(spec: tuple[Any, int, int]) -> tuple[torch.Tensor, list[str]]:
    dataset, start, stop = spec
    items = [dataset[i] for i in range(start, stop)]
    pixels = torch.stack([p for p, _ in items]).add(1).mul(127.5).round().to(torch.uint8)
    return pixels, [c for _, c in items]


def render_cache(dataset: Any, n: int, workers: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Items ``0 .. n-1`` of ``dataset`` as uint8 pixels (exact: renders are 8-bit) and captions,
    rendered by a pool of ``spawn``-ed processes (``workers``: default all CPUs; in this process
    for small ``n`` or one worker). Spawn, not fork: a child forked after torch's thread pool has
    run can deadlock."""
    import multiprocessing

    workers = workers or os.cpu_count() or 1
    if workers == 1 or n <= 256:
        return _render_range((dataset, 0, n))
    chunk = max(1, min(2000, n // workers))
    specs = [(dataset, a, min(n, a + chunk)) for a in range(0, n, chunk)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_render_range, specs)
    return torch.cat([p for p, _ in parts]), [c for _, cs in parts for c in cs]


class Rendered:
    """Items ``0 .. n-1`` of ``dataset`` rendered once (:func:`render_cache`, all CPUs) and kept as
    uint8; indexing returns what ``dataset`` would (pixels in [-1, 1], caption), ``i`` modulo ``n``.
    Where rendering on the fly would starve a GPU."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.pixels, self.captions = render_cache(dataset, n)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        index %= self.n
        return self.pixels[index].float().div(127.5).sub(1), self.captions[index]


class LatentCache:
    """Rendered items (``trainkit.render_cache``) encoded once by the VAE: the latent mean and std
    of every item stay on ``device``. Fast data for a GPU, where rendering on the fly would be
    the bottleneck; step ``s`` reads items ``batch_indices(s) mod n``."""

    def __init__(self, pixels: torch.Tensor, captions: list[str], vae: Any, device: str,
                 chunk: int = 512) -> None:
        n, self.captions = len(pixels), captions
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, n, chunk):
                x = pixels[start:start + chunk].to(device).float().div(127.5).sub(1)
                dist = vae.encode(x).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        self.mean, self.std, self.n = torch.cat(means), torch.cat(stds), n

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        idx = [i % self.n for i in batch_indices(step, batch_size)]
        index = torch.tensor(idx, device=self.mean.device)
        return self.mean[index], self.std[index], [self.captions[i] for i in idx]


class Checkpoint:
    """Atomic safetensors checkpoints of a model, its optimizer and (optionally) an EMA."""

    def __init__(self, run_dir: pathlib.Path) -> None:
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / "last.safetensors"

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             ema: Any = None, **meta: Any) -> None:
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
        state = optimizer.state_dict()
        for index, slots in state["state"].items():
            for key, value in slots.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous()
        info: dict[str, Any] = {"step": step, "param_groups": state["param_groups"], **meta}
        if ema is not None:
            ema_state = ema.state_dict()
            for i, p in enumerate(ema_state.pop("shadow_params")):
                tensors[f"ema.{i}"] = p.detach().contiguous()
            info["ema"] = ema_state
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp),
                  metadata={"info": json.dumps(info)})
        os.replace(tmp, self.path)

    def exists(self) -> bool:
        return self.path.is_file()

    def info(self) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            return json.loads(f.metadata()["info"])

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             ema: Any = None) -> int:
        """Restore the states in place; returns the step to continue from (0 without a checkpoint)."""
        if not self.exists():
            return 0
        tensors = load_file(str(self.path))
        info = self.info()
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if optimizer is not None:
            slots: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, index, name = key.split(".", 2)
                    slots.setdefault(int(index), {})[name] = value
            optimizer.load_state_dict({"state": slots, "param_groups": info["param_groups"]})
        if ema is not None and "ema" in info:
            shadow = [tensors[f"ema.{i}"] for i in range(len(ema.shadow_params))]
            ema.load_state_dict({**info["ema"], "shadow_params": shadow})
        return int(info["step"])


def train_loop(args: argparse.Namespace, start: int, desc: str) -> Any:
    """The steps ``start .. args.steps - 1`` as a tqdm progress bar (iterate it; ``set_postfix``)."""
    from tqdm.auto import tqdm

    return tqdm(range(start, args.steps), initial=start, total=args.steps, desc=desc,
                    dynamic_ncols=True, mininterval=2.0)


class Timer:
    """Says when ``minutes`` have passed since the last checkpoint, or a stop was asked for.

    SIGTERM/SIGINT set :attr:`stop`: the script saves a checkpoint and leaves its loop, so
    ``kill PID`` loses no work and ``--resume`` continues from exactly there.
    """

    def __init__(self, minutes: float) -> None:
        self.seconds, self.last, self.stop = minutes * 60.0, time.monotonic(), False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop = True

    def due(self) -> bool:
        if self.stop or time.monotonic() - self.last >= self.seconds:
            self.last = time.monotonic()
            return True
        return False


def optimizer_step(loss: torch.Tensor, parameters: Any, optimizer: Any, ema: Any, bar: Any, step: int) -> None:
    """Backward, clip the gradient norm to 1, step the optimizer and the EMA; show the loss every 20 steps.

        optimizer_step(F.mse_loss(pred, target), model.parameters(), optimizer, ema, bar, step)
    """
    parameters = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    ema.step(parameters)
    if step % 20 == 0:
        bar.set_postfix(loss=f"{loss.item():.4f}")


def cut_clip_vocab(text_encoder: Any, words: Any, model_max_length: int = 77) -> Any:
    """Cut a CLIP text encoder's vocabulary (in place) to the tokens that spell ``words``.

    Gathers the token-embedding rows of :func:`diffaccel.tokenizers.clip_tokenizer_for_words` and
    moves the special-token ids in the config, so the encoder is bit-identical to the full one on
    prompts made of ``words`` (a few hundred rows instead of 49408: 6 MB less per micro model).
    Returns the matching tokenizer.

        tokenizer = cut_clip_vocab(text_encoder, WORDS)
    """
    from diffaccel.tokenizers import clip_tokenizer_for_words

    tokenizer, clip_ids = clip_tokenizer_for_words(list(words), model_max_length=model_max_length)
    rows = text_encoder.get_input_embeddings().weight.data[torch.tensor(clip_ids)]
    embedding = torch.nn.Embedding(*rows.shape, dtype=rows.dtype, device=rows.device)
    embedding.weight.data.copy_(rows)
    text_encoder.set_input_embeddings(embedding)
    config = text_encoder.config
    config.vocab_size = len(clip_ids)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    for module in text_encoder.modules():  # the pooled output reads the id the model was built with
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = tokenizer.eos_token_id
    return tokenizer


def export_fp16(model: Any, path: pathlib.Path) -> None:
    """``save_pretrained`` in fp16 safetensors, leaving ``model`` in its own dtype."""
    dtype = next(model.parameters()).dtype
    model.to(torch.float16).save_pretrained(str(path), safe_serialization=True)
    model.to(dtype)


def export_pipeline_fp16(pipe: Any, path: pathlib.Path) -> None:
    """``save_pretrained`` with fp16 weights (half the bytes in ``assets/``) that load as float32.

    diffusers loads the UNet/transformer and VAE in float32 unless told otherwise, but transformers
    honours the text encoder's saved ``dtype``; a text encoder that came back in fp16 next to fp32
    models fails the first call (``mat1 and mat2 must have the same dtype``). So the text encoder's
    config says ``float32``, and ``StableDiffusionPipeline.from_pretrained(path)`` works as is.
    """
    pipe.to(torch.float16).save_pretrained(str(path), safe_serialization=True)
    for config_path in sorted(path.glob("text_encoder*/config.json")):
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
