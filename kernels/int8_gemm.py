"""W8A8 linear: ``y = x @ W^T + b`` with INT8 weights and per-token INT8 activations.

The activations are quantized per token by the fused kernel of
:mod:`diffaccel.kernels.int8_quant` (or with a static calibration scale), multiplied with the
per-channel INT8 weight on the tensor cores (int8 x int8 -> int32 accumulation), and the
epilogue dequantizes (``acc * x_scale[m] * w_scale[n]``), adds the bias and writes the
activation dtype. Any M, N and K (tails are masked), any input strides.

Accuracy on Gaussian data (norm of the error over norm of the fp32 product): about 0.009 at
K = 128 and 0.012 at K = 4096; the rounding noise of both operands grows with the row amax,
which grows with K. Outlier-heavy activations want smoothing (SmoothQuant) before this GEMM.

Example:
    >>> import torch
    >>> from diffaccel.kernels.int8_quant import int8_quantize_per_channel
    >>> g = torch.Generator().manual_seed(0)
    >>> w, x = torch.randn(32, 64, generator=g), torch.randn(4, 64, generator=g)
    >>> qw, w_scale = int8_quantize_per_channel(w)
    >>> y = int8_linear(x, qw, w_scale, bias=torch.zeros(32))
    >>> y.shape, bool((y - x @ w.T).norm() / (x @ w.T).norm() < 0.02)
    (torch.Size([4, 32]), True)
"""

from __future__ import annotations

import torch

from ._tiles import GROUP_M, gemm_grid, grouped_tile, store_tile, tile_config
from ._triton import check_float, jit, resolve_impl, tl
from .int8_quant import int8_quantize_per_token

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def int8_gemm_reference(
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    qw: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Plain-torch GEMM of quantized operands: the int32 product (exact, via float64), same epilogue."""
    acc = (qx.double() @ qw.double().T).float()
    y = acc * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@jit
def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    sa_ptr,
    sb_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge re-read valid ones (their results are not stored), so the
    # main loop needs no masks unless K has a tail.
    a_ptrs = a_ptr + (rm % M)[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + (rn % N)[None, :].to(tl.int64) * stride_bn + rk[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] + k0 < K, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] + k0 < K, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    store_tile(c_ptr, y, bias_ptr, rm, rn, M, N, stride_cm, stride_cn, HAS_BIAS)


# Tiles by row count (see _tiles.tile_config). The last was chosen so that ptxas reports no register
# spills on sm_90 (checked without a GPU); not timed.
_TILES = (
    (16, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}),
    (64, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}),
    (None, {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}),
)


def _gemm_config(m: int) -> dict[str, int]:
    return tile_config(m, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4}, _TILES)


def int8_gemm_triton(
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    qw: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The Triton GEMM of quantized operands (same contract as :func:`int8_gemm_reference`)."""
    m, k = qx.shape
    n = qw.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
    cfg = _gemm_config(m)
    _int8_gemm_kernel[gemm_grid(m, n, cfg)](
        qx,
        qw,
        x_scale,
        w_scale.float().contiguous(),
        bias if bias is not None else w_scale,
        out,
        m,
        n,
        k,
        qx.stride(0),
        qx.stride(1),
        qw.stride(0),
        qw.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        GROUP_M=GROUP_M,
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        **cfg,
    )
    return out


def int8_linear(
    x: torch.Tensor,
    qw: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_scale: torch.Tensor | float | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x (..., K)`` and an INT8 weight ``qw (N, K)`` with ``w_scale (N,)``.

    Activations are quantized per token (dynamic) or with the static ``act_scale``; the output
    has ``x``'s dtype and shape ``(..., N)``. See :func:`~diffaccel.kernels.int8_quant.int8_quantize_per_channel`.
    """
    check_float("x", x, _FLOATS)
    if qw.dtype != torch.int8 or qw.dim() != 2:
        raise ValueError(f"qw must be a 2-D int8 tensor (N, K), got {qw.dtype} {tuple(qw.shape)}")
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal qw's in_features ({k})")
    if w_scale.shape != (n,):
        raise ValueError(f"w_scale must have shape ({n},), got {tuple(w_scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], n)
    which = resolve_impl(impl, x, qw)
    qx, x_scale = int8_quantize_per_token(x, act_scale, impl=which)
    gemm = int8_gemm_triton if which == "triton" else int8_gemm_reference
    return gemm(qx, x_scale, qw, w_scale, bias, x.dtype).reshape(*x.shape[:-1], n)
