"""W4A16 linear: ``y = x @ W^T + b`` with an NVFP4 weight and bf16/fp16 activations.

The kernel reads the packed 4-bit weight and its E4M3 block scales, decodes them to the
activation dtype inside the kernel (``code * block_scale`` is exact in fp16 and bf16), multiplies
on the tensor cores with fp32 accumulation and applies the FP32 tensor scale and the bias in the
epilogue. Hopper has no FP4 tensor cores: the gain is memory (3.56x smaller than bf16 weights:
4.5 bits per element) and bandwidth, which is what matters for small M. Any M, N; the weight's
K is padded to 16 by :func:`~diffaccel.kernels.nvfp4.nvfp4_quantize` and ``x`` may have the
logical (unpadded) K; any input strides.

Blackwell's native block-scaled FP4 MMA (both operands NVFP4) is
:mod:`~diffaccel.kernels.nvfp4_w4a4_gemm`.

Example:
    >>> import torch
    >>> from diffaccel.kernels.nvfp4 import nvfp4_quantize
    >>> g = torch.Generator().manual_seed(0)
    >>> w, x = torch.randn(32, 64, generator=g), torch.randn(4, 64, generator=g)
    >>> y = nvfp4_linear(x, nvfp4_quantize(w), bias=torch.zeros(32))
    >>> y.shape, bool(((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.15)
    (torch.Size([4, 32]), True)
"""

from __future__ import annotations

import torch

from ._tiles import GROUP_M, gemm_grid, grouped_tile, store_tile, tile_config
from ._triton import interpreting, jit, resolve_impl, tl
from .nvfp4 import NVFP4Tensor, check_linear_operands, e2m1_to_f32, e4m3_to_f32, nvfp4_dequantize_reference


def nvfp4_linear_reference(
    x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain torch: decode the weight to ``x``'s dtype, multiply in fp32, scale, add bias."""
    x2 = x.reshape(-1, x.shape[-1])
    # code x block scale is exact in fp16 and bf16; the tensor scale is applied after the product
    unscaled = nvfp4_dequantize_reference(w.packed, w.block_scale, torch.ones((), device=x.device))
    wd = unscaled.to(x.dtype)[:, : x.shape[-1]]
    y = (x2.float() @ wd.float().T) * w.tensor_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], wd.shape[0])


@jit
def _w4a16_kernel(
    x_ptr,
    p_ptr,
    s_ptr,
    ts_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_pn,
    stride_sn,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    j = tl.arange(0, BLOCK_K // 2)  # packed byte index within the K tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    n_mask = rn[None, :] < N
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + 2 * j  # the even element of each byte
        byte = tl.load(
            p_ptr + rn[None, :].to(tl.int64) * stride_pn + (k0 // 2 + j)[:, None],
            mask=n_mask & (kk[:, None] < K),
            other=0,
        )
        # One E4M3 scale per 16 elements: decode BLOCK_K // 16 of them, then repeat each for
        # the 8 bytes of its block.
        groups = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        scale = e4m3_to_f32(
            tl.load(
                s_ptr + rn[None, :].to(tl.int64) * stride_sn + groups[:, None],
                mask=n_mask & (groups[:, None] * 16 < K),
                other=0,
            )
        )
        scale = tl.reshape(
            tl.broadcast_to(scale[:, None, :], (BLOCK_K // 16, 8, BLOCK_N)), (BLOCK_K // 2, BLOCK_N)
        )
        for half in tl.static_range(2):
            wt = (e2m1_to_f32((byte >> (4 * half)) & 0xF) * scale).to(x_ptr.dtype.element_ty)
            xt = tl.load(
                x_rows + (kk + half)[None, :] * stride_xk,
                mask=(rm[:, None] < M) & ((kk + half)[None, :] < K),
                other=0.0,
            )
            if DOT_F32:  # the interpreter's tl.dot is wrong for bfloat16 (numpy has none)
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc)
    y = acc * tl.load(ts_ptr)
    store_tile(c_ptr, y, bias_ptr, rm, rn, M, N, stride_cm, stride_cn, HAS_BIAS)


# Tiles by row count (see _tiles.tile_config), chosen so that ptxas reports no register spills on sm_90
# (checked without a GPU); not timed.
_TILES = (
    (16, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}),
    (64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}),
    (None, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}),
)


def _config(m: int) -> dict[str, int]:
    return tile_config(m, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4}, _TILES)


def nvfp4_linear_triton(
    x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton W4A16 GEMM (same contract as :func:`nvfp4_linear_reference`)."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = w.packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = _config(m)
    packed = w.packed.contiguous()  # the kernel walks K with unit stride (a no-op normally)
    scale = w.block_scale.contiguous().view(torch.uint8)
    _w4a16_kernel[gemm_grid(m, n, cfg)](
        x2,
        packed,
        scale,
        w.tensor_scale.float().reshape(1),
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        packed.stride(0),
        scale.stride(0),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        GROUP_M=GROUP_M,
        DOT_F32=interpreting(),
        **cfg,
    )
    return out.reshape(*x.shape[:-1], n)


def nvfp4_linear(
    x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x (..., K)`` and an NVFP4 weight of logical shape ``(N, K)``.

    Non-finite activations propagate through the product to their own rows (no special casing).
    """
    n = check_linear_operands(x, w, bias)
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], n)
    if resolve_impl(impl, x, w.packed) == "triton":
        return nvfp4_linear_triton(x, w, bias)
    return nvfp4_linear_reference(x, w, bias)
