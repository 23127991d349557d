"""Benchmark: diffaccel's Triton kernels against cuBLAS bf16 and the fastest SDPA backend.

Side by side in one run, per shape: the W8A8 GEMM (quantization of the activations included),
the NVFP4-weight GEMM (W4A16), the INT8-weight GEMM (W8A16, per-channel scales), on GPUs with
FP4 tensor cores (Blackwell) also the native NVFP4 GEMM (W4A4, activations quantized in the call),
and ``torch.matmul`` in bf16; quantized attention and every SDPA backend that runs on the GPU
(flash, memory-efficient, cuDNN; the fastest is the baseline).
Times are medians of ``triton.testing.do_bench``; throughput counts ``2*M*N*K`` (GEMM) and
``4*B*H*Sq*Skv*D`` (attention) operations. Results go to ``bench/results/kernels/kernels_<device>.json``.

    python bench/kernel_speed.py             # a CUDA GPU: the full shape list (FLUX, Wan 1.3B, SD1.5, M = 1..16)
    python bench/kernel_speed.py --quick     # smoke test, CPU too: tiny shapes, reference paths off-GPU

Shapes: FLUX.1 (4096 image + 512 text tokens, hidden 3072, 24 heads x 128), Wan 2.1 1.3B at
480p x 81 frames (32760 tokens, hidden 1536, 12 heads x 128), SD1.5 at 512x512 (4096 / 1024 /
256 tokens at 320 / 640 / 1280 channels, head dim 40 / 80 / 160, padded in the kernel), and
M = 1, 4, 16 tokens for the memory-bound case. Targets (H100) are printed beside the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from diffaccel.kernels.int8_gemm import int8_linear
from diffaccel.kernels.int8_quant import int8_quantize_per_channel
from diffaccel.kernels.nvfp4 import nvfp4_quantize
from diffaccel.kernels.nvfp4_gemm import nvfp4_linear
from diffaccel.kernels.nvfp4_w4a4_gemm import native_fp4_supported, nvfp4_w4a4_linear
from diffaccel.kernels.quantized_attention import quantized_sdpa
from diffaccel.kernels.w8a16_gemm import w8a16_linear

# (label, M, K, N): y = x (M, K) @ W^T (N, K)
GEMMS = [
    ("flux qkv", 4608, 3072, 9216),
    ("flux mlp-up", 4608, 3072, 12288),
    ("flux mlp-down", 4608, 12288, 3072),
    ("wan qkv", 32760, 1536, 4608),
    ("wan mlp-up", 32760, 1536, 8960),
    ("wan mlp-down", 32760, 8960, 1536),
    ("sd15 320 proj", 4096, 320, 320),
    ("sd15 320 geglu", 4096, 320, 2560),
    ("sd15 640 geglu", 1024, 640, 5120),
    ("sd15 1280 geglu", 256, 1280, 10240),
] + [
    (f"decode M={m} {k}x{n}", m, k, n)
    for m in (1, 4, 16)
    for (k, n) in ((3072, 3072), (3072, 12288), (1536, 8960))
]

# (label, B, H, Sq, Skv, D)
ATTENTIONS = [
    ("flux joint", 1, 24, 4608, 4608, 128),
    ("wan self", 1, 12, 32760, 32760, 128),
    ("wan cross", 1, 12, 32760, 512, 128),
    ("8k tokens d64", 1, 16, 8192, 8192, 64),
    ("sd15 64x64 d40", 2, 8, 4096, 4096, 40),
    ("sd15 32x32 d80", 2, 8, 1024, 1024, 80),
    ("sd15 16x16 d160", 2, 8, 256, 256, 160),
]

QUICK_GEMMS = [("quick", 64, 256, 128), ("quick decode M=1", 1, 256, 128)]
QUICK_ATTENTIONS = [("quick self", 1, 2, 256, 256, 64), ("quick cross d40", 1, 2, 128, 77, 40)]

TARGETS = {
    "w8a8 vs bf16 at M >= 4096": ">= 1.5x",
    "w4a16 vs bf16 at M <= 16": ">= 2x",
    "w4a16 vs bf16 at M >= 4096": ">= 0.9x",
    "w4a16 weight bytes": "3.5x smaller",
    "attention vs fastest SDPA at >= 8k tokens": ">= 1.3x",
}


def median_ms(fn: Callable[[], Any], cuda: bool, reps: int) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, wall clock elsewhere."""
    if cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sdpa_backends(cuda: bool) -> dict[str, Any]:
    """The SDPA backends to race (each forced with ``sdpa_kernel``); off-GPU only the math one."""
    from torch.nn.attention import SDPBackend

    if not cuda:
        return {"math": SDPBackend.MATH}
    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }


def bench_gemm(label: str, m: int, k: int, n: int, device: str, reps: int) -> dict[str, Any]:
    cuda = device == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k**0.5
    qw, w_scale = int8_quantize_per_channel(w)
    w4 = nvfp4_quantize(w)
    exact = x.float() @ w.float().T
    ops = 2.0 * m * n * k
    row: dict[str, Any] = {
        "label": label,
        "M": m,
        "K": k,
        "N": n,
        "dtype": str(dtype),
        "ms": {},
        "tops": {},
        "rel_err": {},
    }
    candidates = [
        ("bf16 matmul", lambda: torch.matmul(x, w.T)),
        ("w8a8", lambda: int8_linear(x, qw, w_scale)),
        ("w4a16 nvfp4", lambda: nvfp4_linear(x, w4)),
        ("w8a16 int8", lambda: w8a16_linear(x, qw, w_scale)),  # weight-only, per-channel scales
    ]
    if cuda and native_fp4_supported():  # Blackwell: FP4 tensor cores (activations quantized too)
        candidates.append(("w4a4 nvfp4 native", lambda: nvfp4_w4a4_linear(x, w4)))
    for name, fn in candidates:
        out = fn()
        row["rel_err"][name] = float((out.float() - exact).norm() / exact.norm())
        row["ms"][name] = median_ms(fn, cuda, reps)
        row["tops"][name] = ops / row["ms"][name] / 1e9
    base = row["ms"]["bf16 matmul"]
    row["speedup"] = {name: base / ms for name, ms in row["ms"].items()}
    row["weight_bytes"] = {
        "bf16": n * k * 2,
        "int8": qw.numel() + w_scale.numel() * 4,
        "nvfp4": w4.nbytes,
    }
    return row


def bench_attention(
    label: str, b: int, h: int, sq: int, skv: int, d: int, device: str, reps: int
) -> dict[str, Any]:
    from torch.nn.attention import sdpa_kernel

    cuda = device == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    q = torch.randn(b, h, sq, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(b, h, skv, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, h, skv, d, device=device, dtype=dtype, generator=gen)
    ops = 4.0 * b * h * sq * skv * d
    row: dict[str, Any] = {
        "label": label,
        "B": b,
        "H": h,
        "Sq": sq,
        "Skv": skv,
        "D": d,
        "dtype": str(dtype),
        "ms": {},
        "tflops": {},
    }
    for name, backend in sdpa_backends(cuda).items():

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            row["ms"][f"sdpa {name}"] = median_ms(run, cuda, reps)
        except RuntimeError as err:  # a backend that does not take this shape or GPU
            row.setdefault("skipped", {})[f"sdpa {name}"] = str(err).splitlines()[0][:200]
    with sdpa_kernel(list(sdpa_backends(cuda).values())):
        exact = F.scaled_dot_product_attention(q, k, v).float()
    quantized = quantized_sdpa(q, k, v).float()
    row["ms"]["quantized"] = median_ms(lambda: quantized_sdpa(q, k, v), cuda, reps)
    row["cosine"] = float(F.cosine_similarity(quantized.flatten(), exact.flatten(), dim=0))
    row["mean_rel_err"] = float((quantized - exact).abs().mean() / exact.abs().mean())
    row["tflops"] = {name: ops / ms / 1e9 for name, ms in row["ms"].items()}
    sdpa = {name: ms for name, ms in row["ms"].items() if name.startswith("sdpa")}
    row["fastest_sdpa"] = min(sdpa, key=sdpa.get)
    row["speedup_vs_fastest_sdpa"] = sdpa[row["fastest_sdpa"]] / row["ms"]["quantized"]
    return row


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def summary(gemms: list[dict[str, Any]], attentions: list[dict[str, Any]]) -> dict[str, Any]:
    """The measured figure behind each target (medians over the matching shapes)."""

    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    big = [r for r in gemms if r["M"] >= 4096]
    small = [r for r in gemms if r["M"] <= 16]
    long = [r for r in attentions if r["Sq"] >= 8192]
    return {
        "w8a8 vs bf16 at M >= 4096": med([r["speedup"]["w8a8"] for r in big]),
        "w4a16 vs bf16 at M <= 16": med([r["speedup"]["w4a16 nvfp4"] for r in small]),
        "w4a16 vs bf16 at M >= 4096": med([r["speedup"]["w4a16 nvfp4"] for r in big]),
        "w4a16 weight bytes": med(
            [r["weight_bytes"]["bf16"] / r["weight_bytes"]["nvfp4"] for r in gemms]
        ),
        "attention vs fastest SDPA at >= 8k tokens": med(
            [r["speedup_vs_fastest_sdpa"] for r in long]
        ),
        # no target in the issue
        "w8a16 vs bf16 at M <= 16": med([r["speedup"]["w8a16 int8"] for r in small]),
        # no target in the issue; measured only where the GPU has FP4 tensor cores
        "w4a4 native vs bf16 at M >= 4096": med(
            [r["speedup"]["w4a4 nvfp4 native"] for r in big if "w4a4 nvfp4 native" in r["speedup"]]
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes; runs on CPU (reference paths)"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="timed repetitions off-GPU (do_bench decides on GPU)"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/kernels/kernels_<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.quick:
        parser.error("the full shape list needs a CUDA GPU; use --quick on CPU")
    gemm_shapes, attention_shapes = (
        (QUICK_GEMMS, QUICK_ATTENTIONS) if args.quick else (GEMMS, ATTENTIONS)
    )
    print(f"device: {device_name(args.device)}", file=sys.stderr)
    if args.device == "cpu":
        print(
            "CPU smoke test: reference paths in float32; the ratios say nothing about GPU speed",
            file=sys.stderr,
        )

    gemms = []
    print(
        f"{'GEMM':<28}{'bf16 TFLOPS':>12}{'W8A8 TOPS':>11}{'x':>7}{'W4A16 TFLOPS':>14}{'x':>7}"
        f"{'W8A16 TFLOPS':>14}{'x':>7}{'err8':>8}{'err4':>8}{'errw8':>8}"
    )
    for shape in gemm_shapes:
        r = bench_gemm(*shape, args.device, args.reps)
        gemms.append(r)
        t, s, e = r["tops"], r["speedup"], r["rel_err"]
        print(
            f"{r['label']:<28}{t['bf16 matmul']:>12.3g}{t['w8a8']:>11.3g}{s['w8a8']:>6.2f}x"
            f"{t['w4a16 nvfp4']:>14.3g}{s['w4a16 nvfp4']:>6.2f}x{t['w8a16 int8']:>14.3g}{s['w8a16 int8']:>6.2f}x"
            f"{e['w8a8']:>8.4f}{e['w4a16 nvfp4']:>8.4f}{e['w8a16 int8']:>8.4f}"
            + (f"  W4A4 native {t['w4a4 nvfp4 native']:.3g} TFLOPS {s['w4a4 nvfp4 native']:.2f}x"
               f" err {e['w4a4 nvfp4 native']:.4f}" if "w4a4 nvfp4 native" in t else "")
        )
    attentions = []
    print(
        f"\n{'attention':<22}{'fastest SDPA':>16}{'TFLOPS':>9}{'quantized TFLOPS':>18}{'x':>7}{'cosine':>9}{'MRE':>8}"
    )
    for shape in attention_shapes:
        r = bench_attention(*shape, args.device, args.reps)
        attentions.append(r)
        best = r["fastest_sdpa"]
        print(
            f"{r['label']:<22}{best:>16}{r['tflops'][best]:>9.3g}{r['tflops']['quantized']:>18.3g}"
            f"{r['speedup_vs_fastest_sdpa']:>6.2f}x{r['cosine']:>9.5f}{r['mean_rel_err']:>8.4f}"
        )
    measured = summary(gemms, attentions)
    print("\ntarget (H100)                                  wanted        measured (median)")
    for key, want in TARGETS.items():
        got = measured[key]
        print(f"{key:<47}{want:<14}{'-' if got is None else f'{got:.2f}x'}")
    w8a16 = measured["w8a16 vs bf16 at M <= 16"]
    print(f"{'w8a16 vs bf16 at M <= 16':<47}{'(no target)':<14}{'-' if w8a16 is None else f'{w8a16:.2f}x'}")
    native = measured["w4a4 native vs bf16 at M >= 4096"]
    if native is not None:
        print(f"{'w4a4 native vs bf16 at M >= 4096':<47}{'(no target)':<14}{native:.2f}x")

    device = (
        "cpu"
        if args.device == "cpu"
        else re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
    )
    report = {
        "device": device_name(args.device),
        "quick": args.quick,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "targets": TARGETS,
        "measured": measured,
        "gemm": gemms,
        "attention": attentions,
    }
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        "kernels",
        f"kernels_{device}{'_quick' if args.quick else ''}.json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
