"""Quantized attention (SageAttention family): a drop-in for ``scaled_dot_product_attention``.

Algorithm, for each (batch, head):

1. **K smoothing**: subtract K's mean over tokens. Every score of a query row shifts by the same
   ``q . mean(k)``, which softmax ignores, while the channel-wise outliers that make K hard to
   quantize disappear.
2. **INT8 Q and K per block** of :data:`Q_BLOCK` queries / :data:`K_BLOCK` keys (symmetric,
   ``amax / 127``, round to nearest even); ``softmax_scale * log2(e)`` is folded into Q's scale.
   This op is :mod:`~diffaccel.kernels.int8_blocks`; this module holds the attention op over its output.
3. ``Q . K^T`` in INT8 with INT32 accumulation, dequantized by the two block scales.
4. Online softmax in FP32 with ``exp2``; ``P`` is rounded to FP16 and ``P . V`` runs in FP16 with
   FP32 accumulation (``V`` is converted to FP16).

Supported: non-causal self- and cross-attention (any query and key lengths; tails are masked),
layouts ``"HND"`` ``(B, H, S, D)`` and ``"NHD"`` ``(B, S, H, D)``, contiguous or not, float16 /
bfloat16 / float32 inputs (output in the query's dtype), grouped-query attention
(``enable_gqa=True``), and any ``attn_mask`` broadcastable to ``(B, H, Sq, Skv)`` (boolean: True
attends; float: added to the scores). Head dims up to 256: the Triton kernel is tuned for 64 and
128 and zero-pads other head dims inside the kernel to the next power of two, at least 32 (e.g.
SD1.5's 40 -> 64, 160 -> 256; zero channels change no dot product, only cost time). ``dropout_p > 0`` and
``is_causal=True`` raise ``ValueError``. FP8 ``P . V`` is not implemented.

Non-finite input never crashes or hangs; it spreads, never silently vanishes: a NaN/inf in a
query makes the output rows of its whole Q block NaN (its INT8 scale is NaN); a NaN/inf in a key
(through K's mean and scales) or a value makes every output row of that (batch, head) NaN or inf.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 2, 100, 64, generator=g) for _ in range(3))
    >>> out = quantized_sdpa(q, k, v)
    >>> exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    >>> out.shape, bool(torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.999)
    (torch.Size([1, 2, 100, 64]), True)
"""

from __future__ import annotations

import math

import torch

from ._triton import check_float, interpreting, jit, resolve_impl, tl, triton
from .int8_blocks import head_dim_block, program_batch_head, quantize_blocks_reference, quantize_blocks_triton

#: Queries per INT8 block (one scale each) and per kernel program.
Q_BLOCK = 128
#: Keys per INT8 block (one scale each) and per kernel iteration.
K_BLOCK = 64
MAX_HEAD_DIM = 256
LAYOUTS = ("HND", "NHD")
LOG2E = 1.4426950408889634
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Attention over the quantized operands
# ----------------------------------------------------------------------------------------------


def attention_reference(
    qi8: torch.Tensor,
    q_scale: torch.Tensor,
    ki8: torch.Tensor,
    k_scale: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    chunk: int = 1024,
) -> torch.Tensor:
    """Plain-torch attention over per-block INT8 Q/K (HND), ``bias`` in log2 units; output HND.

    Heads of ``ki8``/``v`` are repeated for grouped-query attention. Queries are processed in
    chunks of ``chunk`` rows to bound memory.
    """
    hq, hk = qi8.shape[1], ki8.shape[1]
    if hk != hq:
        ki8, k_scale = ki8.repeat_interleave(hq // hk, 1), k_scale.repeat_interleave(hq // hk, 1)
        v = v.repeat_interleave(hq // hk, 1)
    sq, skv = qi8.shape[2], ki8.shape[2]
    ks = k_scale.repeat_interleave(K_BLOCK, dim=-1)[..., :skv]
    qs = q_scale.repeat_interleave(Q_BLOCK, dim=-1)[..., :sq]
    kf = ki8.float().transpose(-1, -2)
    vh = v.to(torch.float16).float()
    outs = []
    for start in range(0, sq, chunk):
        rows = slice(start, start + chunk)
        s = (qi8[:, :, rows].float() @ kf) * qs[..., rows, None] * ks[..., None, :]
        if bias is not None:
            s = s + bias[:, :, rows]
        m = s.amax(dim=-1, keepdim=True)
        p = torch.exp2(s - m)
        outs.append((p.to(torch.float16).float() @ vh) / p.sum(dim=-1, keepdim=True))
    return torch.cat(outs, dim=2).to(out_dtype)


@jit
def _attention_kernel(
    q_ptr,
    qs_ptr,
    k_ptr,
    ks_ptr,
    v_ptr,
    bias_ptr,
    o_ptr,
    H,
    HK,
    SQ,
    SKV,
    D,
    DV,
    NQB,
    NKB,
    svb,
    svh,
    svs,
    svd,
    sbb,
    sbh,
    sbq,
    sbk,
    sob,
    soh,
    sos,
    sod,
    HAS_BIAS: tl.constexpr,
    QB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    mb = tl.program_id(0)
    bh, b, h = program_batch_head(H)
    hk = h // (H // HK)
    bhk = b * HK + hk
    rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    rn = tl.arange(0, BLOCK_N)
    q = tl.load(
        q_ptr + bh.to(tl.int64) * SQ * D + rm[:, None].to(tl.int64) * D + rd[None, :],
        mask=(rm[:, None] < SQ) & (rd[None, :] < D),
        other=0,
    )
    q_scale = tl.load(qs_ptr + bh * NQB + (mb * BLOCK_M) // QB)  # BLOCK_M divides QB
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    k_base = k_ptr + bhk.to(tl.int64) * SKV * D
    v_base = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    for kb in range(NKB):
        cols = kb * BLOCK_N + rn
        k = tl.load(
            k_base + cols[:, None].to(tl.int64) * D + rd[None, :],
            mask=(cols[:, None] < SKV) & (rd[None, :] < D),
            other=0,
        )
        k_scale = tl.load(ks_ptr + bhk * NKB + kb)
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
        if HAS_BIAS:
            s += tl.load(
                bias_ptr
                + b.to(tl.int64) * sbb
                + h.to(tl.int64) * sbh
                + rm[:, None].to(tl.int64) * sbq
                + cols[None, :].to(tl.int64) * sbk,
                mask=(rm[:, None] < SQ) & (cols[None, :] < SKV),
                other=0.0,
            )
        s = tl.where(cols[None, :] < SKV, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(
            v_base + cols[:, None].to(tl.int64) * svs + rdv[None, :] * svd,
            mask=(cols[:, None] < SKV) & (rdv[None, :] < DV),
            other=0.0,
        ).to(tl.float16)
        p16 = p.to(tl.float16)
        if DOT_F32:  # the interpreter rounds like the GPU only through an explicit fp32 dot
            acc = acc * alpha[:, None] + tl.dot(p16.to(tl.float32), vt.to(tl.float32))
        else:
            acc = tl.dot(p16, vt, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    o = (
        o_ptr
        + b.to(tl.int64) * sob
        + h.to(tl.int64) * soh
        + rm[:, None].to(tl.int64) * sos
        + rdv[None, :] * sod
    )
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < SQ) & (rdv[None, :] < DV))


def attention_triton(
    qi8: torch.Tensor,
    q_scale: torch.Tensor,
    ki8: torch.Tensor,
    k_scale: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """The Triton kernel of :func:`attention_reference`; ``v``, ``bias`` and ``out`` are HND views."""
    b, h, sq, d = qi8.shape
    hk, skv = ki8.shape[1], ki8.shape[2]
    dv = v.shape[-1]
    nqb, nkb = q_scale.shape[-1], k_scale.shape[-1]
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    block_m = Q_BLOCK if max(d, dv) <= 128 else Q_BLOCK // 2  # keeps the accumulator in registers
    _attention_kernel[(triton.cdiv(sq, block_m), b * h)](
        qi8,
        q_scale,
        ki8,
        k_scale,
        v,
        bias if bias is not None else out,
        out,
        h,
        hk,
        sq,
        skv,
        d,
        dv,
        nqb,
        nkb,
        *v.stride(),
        *bias_strides,
        *out.stride(),
        HAS_BIAS=bias is not None,
        QB=Q_BLOCK,
        BLOCK_M=block_m,
        BLOCK_N=K_BLOCK,
        BLOCK_D=head_dim_block(d),
        BLOCK_DV=head_dim_block(dv),
        DOT_F32=interpreting(),
        num_warps=8 if d > 64 else 4,
        num_stages=3,
    )
    return out


# ----------------------------------------------------------------------------------------------
# The drop-in
# ----------------------------------------------------------------------------------------------


def _bias_log2(
    attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int]
) -> torch.Tensor | None:
    """``attn_mask`` as an additive float32 bias in log2 units, broadcast (stride 0) to ``shape``."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device)
        bias = bias.masked_fill(~attn_mask, float("-inf"))
    else:
        bias = attn_mask.float() * LOG2E
    try:
        return bias.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Sq, Skv) = {shape}"
        ) from None


def quantized_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    tensor_layout: str = "HND",
    impl: str = "auto",
) -> torch.Tensor:
    """INT8-QK / FP16-PV attention with the signature of ``F.scaled_dot_product_attention``.

    ``tensor_layout`` is ``"HND"`` (``(B, H, S, D)``, SDPA's) or ``"NHD"`` (``(B, S, H, D)``); the
    output uses the same layout and the query's dtype. ``impl`` picks ``"triton"`` (default on
    CUDA) or ``"reference"`` (plain torch, the default elsewhere; same quantization).

    Example:
        >>> import torch
        >>> q = torch.randn(2, 77, 4, 16)  # NHD, cross-attention to 10 keys
        >>> kv = torch.randn(2, 10, 4, 16)
        >>> quantized_sdpa(q, kv, kv, tensor_layout="NHD").shape
        torch.Size([2, 77, 4, 16])
    """
    if tensor_layout not in LAYOUTS:
        raise ValueError(f"tensor_layout must be one of {LAYOUTS}, got {tensor_layout!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float(name, t, _FLOATS)
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D ({', '.join('B' + tensor_layout.replace('N', 'S'))}), "
                f"got shape {tuple(t.shape)}"
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p must be 0.0 (quantized attention is inference only), got {dropout_p}"
        )
    if is_causal:
        raise ValueError("is_causal=True is not supported: quantized_sdpa is non-causal")
    if tensor_layout == "NHD":
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    b, h, sq, d = query.shape
    hk, skv = key.shape[1], key.shape[2]
    if key.shape[0] != b or value.shape[:3] != key.shape[:3] or key.shape[3] != d:
        raise ValueError(
            f"incompatible shapes (HND view): query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    if hk != h and not (enable_gqa and h % hk == 0):
        raise ValueError(
            f"query has {h} heads and key {hk}: equal, or enable_gqa=True with a divisor"
        )
    if not 0 < d <= MAX_HEAD_DIM or not 0 < value.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dims must be in [1, {MAX_HEAD_DIM}], got {d} (q/k) and {value.shape[-1]} (v)"
        )
    if sq == 0 or skv == 0:
        raise ValueError(f"sequence lengths must be >= 1, got {sq} queries and {skv} keys")
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    bias = _bias_log2(attn_mask, (b, h, sq, skv))
    mean = key.mean(dim=2, keepdim=True, dtype=torch.float32)
    which = resolve_impl(impl, query, key, value)
    quant = quantize_blocks_triton if which == "triton" else quantize_blocks_reference
    qi8, q_scale = quant(query, Q_BLOCK, None, sm_scale * LOG2E)
    ki8, k_scale = quant(key, K_BLOCK, mean)
    if which == "reference":
        out = attention_reference(qi8, q_scale, ki8, k_scale, value, bias, query.dtype)
        return out.transpose(1, 2) if tensor_layout == "NHD" else out
    dv = value.shape[-1]
    if tensor_layout == "NHD":
        out = torch.empty(b, sq, h, dv, dtype=query.dtype, device=query.device)
        attention_triton(qi8, q_scale, ki8, k_scale, value, bias, out.transpose(1, 2))
        return out
    out = torch.empty(b, h, sq, dv, dtype=query.dtype, device=query.device)
    return attention_triton(qi8, q_scale, ki8, k_scale, value, bias, out)
