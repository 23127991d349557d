"""Symmetric INT8 quantization: per-output-channel weights, per-token (dynamic or static) activations.

* Weights (offline, plain torch): ``scale[n] = amax(|w[n, :]|) / 127`` (``1.0`` for an all-zero
  row), ``q = round(w / scale)``; non-finite weights raise ``ValueError``.
* Activations (the fused Triton kernel on CUDA): each token (row) gets
  ``scale[m] = amax(|x[m, :]|) / 127`` computed on the fly, or one static ``act_scale`` from
  calibration for every row (values beyond ``127 * act_scale`` saturate). Rounding is to nearest
  even. A row holding NaN or inf quantizes to zeros with a NaN scale, so the GEMM's output row is
  NaN: non-finite input spreads to its own token only, never crashes.

Example:
    >>> import torch
    >>> q, s = int8_quantize_per_token(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]))
    >>> q
    tensor([[  64, -127,   32],
            [   0,    0,    0]], dtype=torch.int8)
    >>> s
    tensor([0.0157, 1.0000])
"""

from __future__ import annotations

import torch

from ._triton import check_float, jit, resolve_impl, tl, triton

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def int8_quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``(N, K)`` per output channel: ``(int8 (N, K), float32 scale (N,))``.

    Example:
        >>> import torch
        >>> q, s = int8_quantize_per_channel(torch.tensor([[0.5, -1.0], [2.0, 1.0]]))
        >>> q.tolist(), s.mul(127).tolist()
        ([[64, -127], [127, 64]], [1.0, 2.0])
    """
    check_float("w", w, _FLOATS)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w must be finite to quantize to INT8 (found NaN or inf)")
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(torch.clamp(wf / scale[:, None], -127.0, 127.0)).to(torch.int8)
    return q, scale


def int8_quantize_per_token_reference(
    x: torch.Tensor, act_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch per-token quantization of a 2-D ``x``."""
    xf = x.float()
    finite = torch.isfinite(xf).all(dim=1)
    if act_scale is None:
        amax = xf.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    else:
        scale = act_scale.float().reshape(1).expand(x.shape[0])
    v = torch.clamp(xf / scale[:, None], -127.0, 127.0)
    q = torch.where(finite[:, None], torch.round(v), torch.zeros_like(v)).to(torch.int8)
    return q, torch.where(finite, scale, torch.full_like(scale, float("nan")))


@jit
def _per_token_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    static_ptr,
    K,
    stride_xm,
    stride_xk,
    STATIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
        bad += 1 - (tl.abs(x) <= 3.4028234663852886e38).to(tl.int32)  # NaN and inf fail this
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        row_amax = tl.max(amax, axis=0)
        scale = tl.where(row_amax > 0, tl.div_rn(row_amax, 127.0), 1.0)
    finite = tl.sum(bad, axis=0) == 0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.div_rn(x, scale), -127.0), 127.0)
        v = (v + 12582912.0) - 12582912.0  # round half to even (exact for |v| < 2**22)
        v = tl.where(finite, v, 0.0)
        tl.store(q_ptr + row.to(tl.int64) * K + offs, v.to(tl.int8), mask=offs < K)
    tl.store(scale_ptr + row, tl.where(finite, scale, float("nan")))


def int8_quantize_per_token_triton(
    x: torch.Tensor, act_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton kernel: one pass for the scale, one for the codes; any strides."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    static = act_scale.float().reshape(1).contiguous() if act_scale is not None else scale
    block_k = min(triton.next_power_of_2(k), 64 if x.device.type == "cpu" else 2048)
    _per_token_kernel[(m,)](
        x,
        q,
        scale,
        static,
        k,
        x.stride(0),
        x.stride(1),
        STATIC=act_scale is not None,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return q, scale


def int8_quantize_per_token(
    x: torch.Tensor, act_scale: torch.Tensor | float | None = None, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``(..., K)`` per token: ``(int8 (M, K), float32 scale (M,))``.

    ``act_scale`` (a positive float or 0-d tensor) switches to one static scale for every row.

    Example:
        >>> import torch
        >>> q, s = int8_quantize_per_token(torch.tensor([[1.0, 300.0]]), act_scale=0.5)
        >>> q.tolist(), s.tolist()
        ([[2, 127]], [0.5])
    """
    check_float("x", x, _FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if isinstance(act_scale, (int, float)) and not 0 < act_scale < float("inf"):
        raise ValueError(f"act_scale must be a positive finite number, got {act_scale}")
    if act_scale is not None:
        act_scale = torch.as_tensor(act_scale, dtype=torch.float32, device=x.device)
        if act_scale.numel() != 1:
            raise ValueError(f"act_scale must hold one number, got shape {tuple(act_scale.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    if resolve_impl(impl, x2) == "triton" and x2.shape[0] > 0:
        return int8_quantize_per_token_triton(x2, act_scale)
    return int8_quantize_per_token_reference(x2, act_scale)
