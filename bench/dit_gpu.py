"""GPU benchmark of the DiT features on a Wan 2.1 1.3B-shaped transformer, side by side in one run.

The transformer has Wan2.1-T2V-1.3B's exact architecture (30 blocks, 12 heads x 128, FFN 8960,
text dim 4096) with **random weights** (no download); the text encoder and VAE are tiny, since
only the denoising loop is timed (``output_type="latent"``). Variants, on the same prompt and seed:

* ``baseline``: bf16;
* ``delta cache``: the temporal delta cache (``DeltaCacheConfig``); ``preset fast`` / ``preset balanced``:
  the DiT presets (:func:`diffaccel.dit_preset`);
* ``FirstBlockCache 0.1`` / ``0.2``: diffusers' own cache hook (``transformer.enable_cache``), the peer;
* ``nvfp4`` / ``int8``: every eligible Linear in NVFP4 (W4A16) / INT8 (W8A8); on GPUs with FP4
  tensor cores (Blackwell) also ``nvfp4 w4a4 native`` (``fp4_activations=True``);
* ``static mixed``: INT8 for the quarter of the blocks the calibrated predictor ranks most sensitive,
  NVFP4 elsewhere (calibrated on one prompt at the benchmark's size);
* ``quantized attention``: ``QuantizedAttentionConfig``;
* ``all``: static mixed + delta cache + quantized attention.

Each reports the median seconds of a pipeline call over ``--rounds`` timed rounds (after one warm-up
call, rounds interleaved across variants), the speedup, the peak CUDA memory of the call, the
transformer's weight bytes (``memory_report``) and the relative L2 error and cosine similarity of the
final latents against the baseline's. A variant that fails records its error and the run goes on.
Writes ``bench/results/dit_gpu/dit_gpu_<device>.json``.

    python bench/dit_gpu.py                               # GPU: 480x832, 33 frames, 20 steps (~6 min on H100)
    python bench/dit_gpu.py --frames 81 --steps 50        # the paper's setting, much longer
    python bench/dit_gpu.py --quick                       # CPU smoke run on the tiny Wan
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import pathlib
import platform
import re
import statistics
import time
from typing import Any

import torch

from benchkit import write_report

REPO = pathlib.Path(__file__).resolve().parents[1]

#: Wan2.1-T2V-1.3B's transformer (overrides of ``tiny_wan_pipeline``'s config).
WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, rope_max_seq_len=1024)


def build(args: argparse.Namespace) -> Any:
    """The pipeline: Wan 1.3B transformer (random), tiny text encoder and VAE, on ``args.device``."""
    from diffaccel.testing import tiny_pipeline

    pipe = tiny_pipeline("wan", seed=0, **({} if args.quick else WAN_1_3B))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)


def call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
                guidance_scale=5.0, max_sequence_length=args.text_tokens, output_type="latent")


def variants(pipe: Any, args: argparse.Namespace) -> dict[str, tuple[Any, list]]:
    """name -> (QuantizationConfig or None, feature configs)."""
    from diffusers.hooks import FirstBlockCacheConfig

    import diffaccel
    from diffaccel.kernels import native_fp4_supported
    from diffaccel.quantization import QuantizationConfig, calibrate
    from diffaccel.quantization.allocation import allocate_static

    base = QuantizationConfig(min_weight_numel=0 if args.quick else 16384)
    calibration = calibrate(pipe, ["a red circle moving to the left"], config=base, progress=False,
                            **{k: v for k, v in call_kwargs(args).items() if k != "output_type"})
    static = allocate_static(calibration, int8_fraction=0.25).quantization_config(base)
    cache = diffaccel.DeltaCacheConfig(threshold=args.delta_threshold)
    attention = diffaccel.QuantizedAttentionConfig()
    table = {
        "baseline": (None, []),
        f"delta cache {args.delta_threshold}": (None, [cache]),
        "preset fast": (None, [diffaccel.dit_preset("fast")]),
        "preset balanced": (None, [diffaccel.dit_preset("balanced")]),
        **{f"FirstBlockCache {t}": (None, [DiffusersCache(FirstBlockCacheConfig(threshold=t))]) for t in (0.1, 0.2)},
        "nvfp4": (QuantizationConfig("nvfp4", min_weight_numel=base.min_weight_numel), []),
        "int8": (QuantizationConfig("int8", min_weight_numel=base.min_weight_numel), []),
        "static mixed 25% int8": (static, []),
        "quantized attention": (None, [attention]),
        "all: static + cache + attention": (static, [cache, attention]),
    }
    if native_fp4_supported():  # Blackwell: NVFP4 activations too, on the FP4 tensor cores
        table["nvfp4 w4a4 native"] = (
            QuantizationConfig("nvfp4", min_weight_numel=base.min_weight_numel, fp4_activations=True), [])
    return table


@dataclasses.dataclass(frozen=True)
class DiffusersCache:
    """A diffusers cache hook config, enabled on the transformer for one call (the peer variants)."""

    config: Any


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffaccel
    from diffaccel.quantization import memory_report, quantize_

    pipe = build(args)
    float_model = pipe.transformer
    table = variants(pipe, args)
    models: dict[str, Any] = {}
    for name, (config, _) in table.items():
        if config is not None:
            try:
                models[name] = quantize_(copy.deepcopy(float_model), config)
            except Exception as error:  # noqa: BLE001  (recorded, the other variants go on)
                models[name] = error
    rows: dict[str, dict[str, Any]] = {name: {"seconds": []} for name in table}
    latents: dict[str, torch.Tensor] = {}

    def one_call(name: str) -> float:
        config, features = table[name]
        pipe.transformer = models.get(name, float_model)
        peers = [f.config for f in features if isinstance(f, DiffusersCache)]
        diffaccel.accelerate(pipe, *(f for f in features if not isinstance(f, DiffusersCache)))
        for peer in peers:
            pipe.transformer.enable_cache(peer)
        try:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            _sync(args.device)
            start = time.perf_counter()
            out = pipe("a red circle moving to the left", generator=torch.Generator().manual_seed(0),
                       **call_kwargs(args)).frames
            _sync(args.device)
            seconds = time.perf_counter() - start
            latents[name] = out.float().cpu()
            stats = pipe.acceleration_stats.features
            if "delta_cache" in stats:
                rows[name]["skipped_blocks"] = stats["delta_cache"].skipped_fraction
            if args.device.startswith("cuda"):
                rows[name]["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            return seconds
        finally:
            if peers:
                pipe.transformer.disable_cache()
            diffaccel.restore(pipe)
            pipe.transformer = float_model

    for round_index in range(args.rounds + 1):  # round 0 warms up (Triton compiles, autotunes)
        for name in table:
            if isinstance(models.get(name), Exception) or "error" in rows[name]:
                rows[name].setdefault("error", repr(models.get(name)))
                continue
            try:
                seconds = one_call(name)
            except Exception as error:  # noqa: BLE001
                rows[name]["error"] = repr(error)
                print(f"{name}: failed: {error!r}", flush=True)
                continue
            if round_index:
                rows[name]["seconds"].append(seconds)
        print(f"round {round_index}/{args.rounds} done", flush=True)
    baseline = statistics.median(rows["baseline"]["seconds"])
    reference = latents["baseline"]
    for name, row in rows.items():
        if "error" in row:
            continue
        row["median_seconds"] = statistics.median(row["seconds"])
        row["speedup_vs_baseline"] = baseline / row["median_seconds"]
        model = models.get(name, float_model)
        report = memory_report(model)
        row["weight_gb"], row["weights_vs_bf16"] = report.nbytes / 1e9, report.ratio
        diff = latents[name] - reference
        row["relative_l2_error"] = float(diff.norm() / reference.norm())
        row["cosine"] = float(torch.nn.functional.cosine_similarity(latents[name].flatten(), reference.flatten(), dim=0))
    return rows


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: the tiny Wan, 32x32, 9 frames, 3 steps")
    parser.add_argument("--height", type=int, default=None, help="default 480 (quick 32)")
    parser.add_argument("--width", type=int, default=None, help="default 832 (quick 32)")
    parser.add_argument("--frames", type=int, default=None, help="4k + 1; default 33 (quick 9)")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (quick 3)")
    parser.add_argument("--text-tokens", type=int, default=None, help="default 512 (quick 16)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--delta-threshold", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    defaults = (32, 32, 9, 3, 16) if args.quick else (480, 832, 33, 20, 512)
    for key, value in zip(("height", "width", "frames", "steps", "text_tokens"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.frames % 4 != 1 or args.height % 16 or args.width % 16:
        raise ValueError("--frames must be 4k + 1 and --height/--width multiples of 16")
    if args.rounds < 1 or args.steps < 2:
        raise ValueError("--rounds must be >= 1 and --steps >= 2")
    if not args.quick and not args.device.startswith("cuda"):
        raise SystemExit("the full-size run needs a CUDA GPU; use --quick on the CPU")
    label = device_label(args.device)
    print(f"device: {label}", flush=True)
    rows = run(args)
    report = {"device": label, "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
              "torch": torch.__version__, "variants": rows}
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:34s} error: {row['error']}")
        else:
            print(f"{name:34s} {row['median_seconds']:8.3f} s {row['speedup_vs_baseline']:6.2f}x  "
                  f"weights {row['weight_gb']:.3f} GB ({1 / row['weights_vs_bf16']:.2f}x smaller than bf16)  "
                  f"rel. L2 {row['relative_l2_error']:.4f}")
    tag = "quick" if args.quick else re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
    out = args.out or REPO / "bench" / "results" / "dit_gpu" / f"dit_gpu_{tag}.json"
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
