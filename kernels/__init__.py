"""Triton kernels, each beside a plain-torch reference, with a dispatcher per op.

Every op takes ``impl="auto" | "triton" | "reference"``; ``"auto"`` runs the Triton kernel on
CUDA tensors (or anywhere under ``TRITON_INTERPRET=1``) and the reference elsewhere. Triton is
optional (pyproject installs it on Linux only): without it every op runs its reference and
``impl="triton"`` raises ``ImportError``.

* :mod:`~diffaccel.kernels.nvfp4`: NVFP4 quantize / dequantize, :class:`NVFP4Tensor`.
* :mod:`~diffaccel.kernels.nvfp4_gemm`: ``y = x @ W^T + b`` with NVFP4 weights (W4A16).
* :mod:`~diffaccel.kernels.nvfp4_w4a4_gemm`: the same with NVFP4 activations too (W4A4), on
  Blackwell's FP4 tensor cores (``native_fp4_supported``).
* :mod:`~diffaccel.kernels.int8_quant`: INT8 per-channel weights, per-token activations.
* :mod:`~diffaccel.kernels.int8_gemm`: ``y = x @ W^T + b`` in W8A8 with INT32 accumulation.
* :mod:`~diffaccel.kernels.w8a16_gemm`: ``y = x @ W^T + b`` with INT8 weights only (W8A16), per
  channel or per group of columns.
* :mod:`~diffaccel.kernels.int8_blocks`: per-block INT8 of attention's Q and smoothed K.
* :mod:`~diffaccel.kernels.quantized_attention`: ``quantized_sdpa``, SageAttention-style.

The GEMM kernels share their tile plumbing (grouped program order, the bias-and-store epilogue,
the grid) from ``_tiles``; the JIT/interpreter choice and the ``impl`` rule are in ``_triton``.
"""

from .int8_gemm import int8_linear
from .int8_quant import int8_quantize_per_channel, int8_quantize_per_token
from .nvfp4 import NVFP4Tensor, nvfp4_dequantize, nvfp4_quantize
from .nvfp4_gemm import nvfp4_linear
from .nvfp4_w4a4_gemm import native_fp4_supported, nvfp4_w4a4_linear
from .quantized_attention import quantized_sdpa
from .w8a16_gemm import int8_dequantize_per_group, int8_quantize_per_group, w8a16_linear

__all__ = [
    "NVFP4Tensor",
    "int8_dequantize_per_group",
    "int8_linear",
    "int8_quantize_per_channel",
    "int8_quantize_per_group",
    "int8_quantize_per_token",
    "native_fp4_supported",
    "nvfp4_dequantize",
    "nvfp4_linear",
    "nvfp4_quantize",
    "nvfp4_w4a4_linear",
    "quantized_sdpa",
    "w8a16_linear",
]
