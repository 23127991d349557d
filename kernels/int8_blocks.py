"""Per-block INT8 quantization of attention operands: Q, and K smoothed by its mean over tokens.

Each (batch, head) of ``x (B, H, S, D)`` is cut into blocks of ``block`` tokens; a block's codes are
symmetric INT8 (``amax / 127``, round to nearest even) with one FP32 scale, optionally times an
``extra_scale`` (:func:`~diffaccel.kernels.quantized_attention.quantized_sdpa` folds
``softmax_scale * log2(e)`` into Q's). A block holding NaN or inf gets zero codes and a NaN scale,
so non-finite input spreads instead of vanishing. The Triton kernel and the plain-torch reference
give the same codes and scales.

Example:
    >>> import torch
    >>> x = torch.tensor([[[[1.0, -2.0], [0.5, 4.0], [8.0, 0.0]]]])   # (B, H, S, D) = (1, 1, 3, 2)
    >>> codes, scales = quantize_blocks_reference(x, block=2)
    >>> codes[0, 0].tolist(), [round(s, 4) for s in scales[0, 0].tolist()]
    ([[32, -64], [16, 127], [127, 0]], [0.0315, 0.063])
"""

from __future__ import annotations

import torch

from ._triton import device_function, jit, tl, triton

__all__ = ["head_dim_block", "program_batch_head", "quantize_blocks_reference", "quantize_blocks_triton"]


@device_function
def program_batch_head(H):
    """This program's flat (batch, head) index (grid axis 1) and its batch and head: ``(bh, b, h)``."""
    bh = tl.program_id(1)
    return bh, bh // H, bh % H


def quantize_blocks_reference(
    x: torch.Tensor, block: int, mean: torch.Tensor | None = None, extra_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block INT8 of ``x (B, H, S, D)`` (any strides): ``(int8 (B, H, S, D), fp32 (B, H, nblocks))``.

    ``mean`` (``(B, H, 1, D)``) is subtracted first; the stored scale is ``amax / 127 * extra_scale``.
    A block holding NaN or inf gets zeros and a NaN scale.
    """
    b, h, s, d = x.shape
    xf = x.float() if mean is None else x.float() - mean
    nb = -(-s // block)
    padded = torch.nn.functional.pad(xf, (0, 0, 0, nb * block - s)).reshape(b, h, nb, block * d)
    finite = torch.isfinite(padded).all(dim=-1)
    amax = padded.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    v = torch.clamp(padded / scale[..., None], -127.0, 127.0)
    q = torch.where(finite[..., None], torch.round(v), torch.zeros_like(v)).to(torch.int8)
    q = q.reshape(b, h, nb * block, d)[:, :, :s]
    return q, torch.where(finite, scale * extra_scale, torch.full_like(scale, float("nan")))


@jit
def _quant_blocks_kernel(
    x_ptr,
    mean_ptr,
    q_ptr,
    s_ptr,
    S,
    D,
    H,
    extra_scale,
    sxb,
    sxh,
    sxs,
    sxd,
    smb,
    smh,
    nblocks,
    HAS_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    blk = tl.program_id(0)
    bh, b, h = program_batch_head(H)
    rs = blk * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, BLOCK_D)
    mask = (rs[:, None] < S) & (rd[None, :] < D)
    base = b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    x = tl.load(
        x_ptr + base + rs[:, None].to(tl.int64) * sxs + rd[None, :] * sxd, mask=mask, other=0.0
    )
    x = x.to(tl.float32)
    if HAS_MEAN:
        mu = tl.load(mean_ptr + b * smb + h * smh + rd, mask=rd < D, other=0.0)
        x = tl.where(mask, x - mu[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    bad = tl.sum(
        tl.sum(1 - (tl.abs(x) <= 3.4028234663852886e38).to(tl.int32), axis=1), axis=0
    )  # NaN, inf
    scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)
    v = tl.minimum(tl.maximum(tl.div_rn(x, scale), -127.0), 127.0)
    v = (v + 12582912.0) - 12582912.0  # round half to even (exact for |v| < 2**22)
    v = tl.where(bad == 0, v, 0.0)
    out = q_ptr + bh.to(tl.int64) * S * D + rs[:, None].to(tl.int64) * D + rd[None, :]
    tl.store(out, v.to(tl.int8), mask=mask)
    tl.store(s_ptr + bh * nblocks + blk, tl.where(bad == 0, scale * extra_scale, float("nan")))


def quantize_blocks_triton(
    x: torch.Tensor, block: int, mean: torch.Tensor | None = None, extra_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton version of :func:`quantize_blocks_reference` (same contract, same codes)."""
    b, h, s, d = x.shape
    nb = triton.cdiv(s, block)
    q = torch.empty(b, h, s, d, dtype=torch.int8, device=x.device)
    scale = torch.empty(b, h, nb, dtype=torch.float32, device=x.device)
    m = mean if mean is not None else scale
    smb, smh = (mean.stride(0), mean.stride(1)) if mean is not None else (0, 0)
    _quant_blocks_kernel[(nb, b * h)](
        x,
        m,
        q,
        scale,
        s,
        d,
        h,
        extra_scale,
        *x.stride(),
        smb,
        smh,
        nb,
        HAS_MEAN=mean is not None,
        BLOCK=block,
        BLOCK_D=head_dim_block(d),
        num_warps=4,
    )
    return q, scale


def head_dim_block(d: int) -> int:
    """The power-of-two head-dim tile (at least 32) a kernel zero-pads head dim ``d`` to."""
    return max(32, triton.next_power_of_2(d))  # int8 tensor-core dots need K >= 32
