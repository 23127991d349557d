"""W8A16 linear: ``y = x @ W^T + b`` with an INT8 weight and bf16/fp16/fp32 activations.

Weight-only quantization: the weight is stored as symmetric INT8 codes with float32 scales, per
output channel (``scale (N,)``, as :func:`~diffaccel.kernels.int8_quant.int8_quantize_per_channel`)
or per group of ``G`` consecutive input columns (``scale (N, ceil(K / G))``,
:func:`int8_quantize_per_group`); the activations stay in their own dtype. The kernel loads INT8
weight tiles and decodes them inside the K loop: with group scales, each element is multiplied by
its group's scale and cast to the activation dtype; with channel scales, the codes themselves are
cast (exact in fp16 and bf16) and the scale is applied in the epilogue. The tiles are multiplied
on the tensor cores with fp32 accumulation; the epilogue adds the bias and writes ``x``'s dtype.
The gain over bf16 weights is memory (2x smaller) and bandwidth, which is what matters for small
M. Any M, N and K (tails are masked), any strides of ``x`` and of the weight.

The group size is not stored; the shapes encode it (:func:`group_columns`). A scale of shape
``(N, n_groups)`` means groups of ``G`` consecutive columns, group ``g`` covering columns
``[g * G, min((g + 1) * G, K))`` (the last one may be shorter), where ``G`` is the power of two
that makes ``n_groups`` groups of K columns if there is one, else ``ceil(K / n_groups)``.
:func:`int8_quantize_per_group` writes that layout: asked for ``group_size``, it keeps the number
of groups, ``ceil(K / group_size)``, so it keeps ``group_size`` itself whenever that is a power of
two (any K: 40 columns in groups of 16 are 16 + 16 + 8); another size is kept when no power of
two makes as many groups and it equals ``ceil(K / n_groups)`` (60 columns in groups of 20), and
is otherwise replaced by the size the shapes encode (60 columns asked in groups of 30 become
32 + 28, in groups of 27 become 20 + 20 + 20).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w, x = torch.randn(32, 64, generator=g), torch.randn(4, 64, generator=g)
    >>> q, scale = int8_quantize_per_group(w, group_size=32)
    >>> y = w8a16_linear(x, q, scale, bias=torch.zeros(32))
    >>> y.shape, bool(((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.01)
    (torch.Size([4, 32]), True)
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ._tiles import GROUP_M, gemm_grid, grouped_tile, store_tile, tile_config
from ._triton import check_float, interpreting, jit, resolve_impl, tl
from .int8_quant import int8_quantize_per_channel

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_columns(k: int, n_groups: int) -> int:
    """The group size that ``n_groups`` scales per row of ``k`` columns encode (module docstring):
    the power of two that makes ``n_groups`` groups if there is one, else ``ceil(k / n_groups)``.

    Example:
        >>> group_columns(40, 3), group_columns(60, 3), group_columns(4096, 32), group_columns(40, 1)
        (16, 20, 128, 40)
    """
    if n_groups > 1:
        power = 1 << (_cdiv(k, n_groups) - 1).bit_length()  # the smallest power of two >= k / n_groups
        if _cdiv(k, power) == n_groups:
            return power
    return _cdiv(k, n_groups)


def int8_quantize_per_group(
    w: torch.Tensor, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``(N, K)`` to symmetric INT8: ``(int8 (N, K), float32 scale)``.

    ``group_size=None``: one scale per output channel, shape ``(N,)``, exactly
    :func:`~diffaccel.kernels.int8_quant.int8_quantize_per_channel`. ``group_size=G``: one scale
    per row and group of consecutive columns, shape ``(N, ceil(K / G))``; group ``g`` covers
    columns ``[g * Ge, min((g + 1) * Ge, K))`` with ``Ge = group_columns(K, ceil(K / G))``, which is
    ``G`` for any power of two (other sizes: see the module docstring): the layout that
    :func:`int8_dequantize_per_group` and :func:`w8a16_linear` read back from the shapes alone.
    Each scale is ``amax / 127`` of its group (``1.0`` for an all-zero group) and
    ``q = round(clamp(w / scale, -127, 127))``, rounding half to even. Non-finite weights raise ``ValueError``.

    Example:
        >>> import torch
        >>> q, s = int8_quantize_per_group(torch.tensor([[0.5, -1.0, 0.0, 0.0, 254.0]]), group_size=2)
        >>> q.tolist(), s.mul(127).tolist()
        ([[64, -127, 0, 0, 127]], [[1.0, 127.0, 254.0]])
    """
    if group_size is None:
        return int8_quantize_per_channel(w)
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    check_float("w", w, _FLOATS)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    n, k = w.shape
    if k == 0:
        raise ValueError("w must have at least one in_feature (column) to quantize per group")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w must be finite to quantize to INT8 (found NaN or inf)")
    groups = _cdiv(k, int(group_size))
    size = group_columns(k, groups)  # group_size itself, unless the shapes can't encode it
    wf = F.pad(w.float(), (0, groups * size - k)).reshape(n, groups, size)  # zeros leave amax alone
    amax = wf.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(torch.clamp(wf / scale[:, :, None], -127.0, 127.0)).to(torch.int8)
    return q.reshape(n, groups * size)[:, :k].contiguous(), scale


def weight_group_size(weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> int | None:
    """Validate an INT8 weight and its scale; the group size, or ``None`` for per-channel scales.

    A scale ``(N,)`` is per output channel; ``(N, n_groups)`` means groups of
    :func:`group_columns` columns, which must make exactly ``n_groups`` groups.

    Example:
        >>> import torch
        >>> q = torch.zeros(4, 40, dtype=torch.int8)
        >>> weight_group_size(q, torch.ones(4)), weight_group_size(q, torch.ones(4, 3))
        (None, 16)
    """
    for name, tensor in (("weight_int8", weight_int8), ("weight_scale", weight_scale)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
        raise ValueError(
            "weight_int8 must be a 2-D int8 tensor (out_features, in_features), "
            f"got {str(weight_int8.dtype).removeprefix('torch.')} {tuple(weight_int8.shape)}"
        )
    n, k = weight_int8.shape
    if k == 0:
        raise ValueError("weight_int8 must have at least one in_feature (column)")
    if weight_scale.dtype != torch.float32:
        raise ValueError(
            f"weight_scale must be float32, got {str(weight_scale.dtype).removeprefix('torch.')}"
        )
    if weight_scale.shape == (n,):
        return None
    if weight_scale.dim() == 2 and weight_scale.shape[0] == n and 1 <= weight_scale.shape[1] <= k:
        groups = weight_scale.shape[1]
        size = group_columns(k, groups)
        if _cdiv(k, size) == groups:
            return size
        raise ValueError(
            f"weight_scale's {groups} groups do not fit in_features {k}: groups of "
            f"ceil({k} / {groups}) = {size} columns make {_cdiv(k, size)} groups "
            "(quantize with int8_quantize_per_group)"
        )
    raise ValueError(
        f"weight_scale must have shape ({n},) (per channel) or ({n}, n_groups) with "
        f"1 <= n_groups <= {k} (per group), got {tuple(weight_scale.shape)}"
    )


def int8_dequantize_per_group(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Decode INT8 codes ``(N, K)`` with per-channel ``(N,)`` or per-group ``(N, n_groups)`` scales
    to float32 ``(N, K)``: ``q * scale`` of each element's channel or group.

    The group size is ``group_columns(K, n_groups)`` (the layout of :func:`int8_quantize_per_group`);
    shapes that do not fit raise ``ValueError``.

    Example:
        >>> import torch
        >>> w = torch.tensor([[0.5, -1.0, 0.0, 0.0, 254.0]])
        >>> int8_dequantize_per_group(*int8_quantize_per_group(w, group_size=2))
        tensor([[  0.5039,  -1.0000,   0.0000,   0.0000, 254.0000]])
    """
    size = weight_group_size(q, scale)
    if size is None:
        return q.float() * scale[:, None]
    return q.float() * scale.repeat_interleave(size, dim=1)[:, : q.shape[1]]


def w8a16_linear_reference(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch: decode the weight, multiply in fp32, add the bias, cast to ``x``'s dtype.

    The output has shape ``(*x.shape[:-1], N)``. Decoded as the kernel does: with group scales the
    weight ``q * scale`` is rounded to ``x``'s dtype (what the tensor cores take); per-channel codes
    are exact and their scale multiplies the product. The kernel differs by summation order only.

    Example:
        >>> import torch
        >>> q, s = int8_quantize_per_group(torch.tensor([[127.0, -1.0], [0.0, 254.0]]))
        >>> w8a16_linear_reference(torch.tensor([[1.0, 1.0]]), q, s, bias=torch.tensor([0.5, 0.0]))
        tensor([[126.5000, 254.0000]])
    """
    x2 = x.reshape(-1, x.shape[-1])
    if weight_scale.dim() == 1:
        y = (x2.float() @ weight_int8.float().T) * weight_scale.float()
    else:
        y = x2.float() @ int8_dequantize_per_group(weight_int8, weight_scale).to(x.dtype).float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight_int8.shape[0])


@jit
def _w8a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_cm,
    stride_cn,
    PER_GROUP: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm[:, None] < M
    n_mask = rn[None, :] < N
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk
    s_row = s_ptr + rn.to(tl.int64) * stride_sn  # this tile's scale rows (per group)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + rk < K
        xt = tl.load(x_ptrs, mask=m_mask & k_mask[None, :], other=0.0)
        q = tl.load(w_ptrs, mask=n_mask & k_mask[:, None], other=0)
        if PER_GROUP:
            if TILE_IN_GROUP:  # G is a multiple of BLOCK_K: the whole K tile is in one group
                scale = tl.load(s_row + k0 // G, mask=rn < N, other=0.0)[None, :]
            else:  # each K element's own group
                scale = tl.load(
                    s_row[None, :] + ((k0 + rk) // G)[:, None],
                    mask=n_mask & k_mask[:, None],
                    other=0.0,
                )
            wt = q.to(tl.float32) * scale
            if ROUND_BF16:  # the interpreter truncates fp32 to bfloat16: round to nearest even first
                bits = wt.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                wt = bits.to(tl.float32, bitcast=True)
            wt = wt.to(x_ptr.dtype.element_ty)
        else:  # codes are exact in the activation dtype; the channel scale is in the epilogue
            wt = q.to(tl.float32).to(x_ptr.dtype.element_ty)  # the interpreter can't cast int8 to bf16
        if DOT_F32:  # the interpreter's tl.dot is wrong for bfloat16 (numpy has none)
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if not PER_GROUP:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    store_tile(c_ptr, acc, bias_ptr, rm, rn, M, N, stride_cm, stride_cn, HAS_BIAS)


# Tiles by row count (see _tiles.tile_config), those of the W4A16 kernel; not timed.
_TILES = (
    (16, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}),
    (64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}),
    (None, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}),
)


def _config(m: int) -> dict[str, int]:
    return tile_config(m, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4}, _TILES)


def w8a16_linear_triton(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton W8A16 GEMM (same contract as :func:`w8a16_linear_reference`).

    Needs CUDA tensors, or ``TRITON_INTERPRET=1`` for CPU ones; :func:`w8a16_linear` checks the
    operands and picks this or the reference.

    Example:
        >>> import os, torch
        >>> from unittest import mock
        >>> from diffaccel.kernels._triton import TRITON_AVAILABLE
        >>> g = torch.Generator().manual_seed(0)
        >>> x, (q, s) = torch.randn(3, 40, generator=g), int8_quantize_per_group(torch.randn(8, 40, generator=g), 16)
        >>> with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):  # CPU: Triton's interpreter
        ...     y = w8a16_linear_triton(x, q, s) if TRITON_AVAILABLE else w8a16_linear_reference(x, q, s)
        >>> y.shape, torch.allclose(y, w8a16_linear_reference(x, q, s), rtol=1e-5, atol=1e-5)
        (torch.Size([3, 8]), True)
    """
    size = weight_group_size(weight_int8, weight_scale)
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight_int8.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = _config(m)
    if size is not None and size % cfg["BLOCK_K"] and cfg["BLOCK_K"] % size == 0 and size >= 32:
        cfg["BLOCK_K"] = size  # K tiles of one group each: one scale per column and tile, no gather
    tile_in_group = size is not None and size % cfg["BLOCK_K"] == 0
    if size is not None and not tile_in_group and "num_stages" in cfg:
        cfg["num_stages"] = min(cfg["num_stages"], 2)  # the gathered fp32 scales take shared memory
    scale = weight_scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()  # the epilogue reads it with unit stride
    _w8a16_kernel[gemm_grid(m, n, cfg)](
        x2,
        weight_int8,
        scale,
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        size or k,
        x2.stride(0),
        x2.stride(1),
        weight_int8.stride(0),
        weight_int8.stride(1),
        scale.stride(0),
        out.stride(0),
        out.stride(1),
        PER_GROUP=size is not None,
        TILE_IN_GROUP=tile_in_group,
        HAS_BIAS=bias is not None,
        # fp32 activations: exact fp32 products, not TF32's 10-bit mantissa
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        GROUP_M=GROUP_M,
        DOT_F32=interpreting(),
        ROUND_BF16=interpreting() and x.dtype == torch.bfloat16,
        **cfg,
    )
    return out.reshape(*x.shape[:-1], n)


def check_w8a16_operands(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> int:
    """Validate the operands of :func:`w8a16_linear`; returns ``out_features``.

    Example:
        >>> import torch
        >>> check_w8a16_operands(torch.zeros(3, 16), *int8_quantize_per_group(torch.ones(8, 16), 8), None)
        8
    """
    check_float("x", x, _FLOATS)
    weight_group_size(weight_int8, weight_scale)
    n, k = weight_int8.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x's last dimension ({x.shape[-1] if x.dim() else 'none'}) must equal "
            f"weight_int8's in_features ({k})"
        )
    if bias is not None:
        check_float("bias", bias, _FLOATS)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    for name, tensor in (("weight_int8", weight_int8), ("weight_scale", weight_scale), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device}, x on {x.device}: move them to one device")
    return n


def w8a16_linear(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x (..., K)`` and an INT8 weight ``(N, K)`` with float32 scales.

    ``weight_scale`` is per output channel ``(N,)`` or per group ``(N, n_groups)``, as
    :func:`int8_quantize_per_group` returns. The output has ``x``'s dtype and shape ``(..., N)``;
    non-finite activations propagate to their own rows. ``impl``: see :mod:`diffaccel.kernels`.

    Example:
        >>> import torch
        >>> q, s = int8_quantize_per_group(torch.eye(4) * 2)
        >>> w8a16_linear(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16), q, s)
        tensor([[2., 4., 6., 8.]], dtype=torch.bfloat16)
    """
    n = check_w8a16_operands(x, weight_int8, weight_scale, bias)
    which = resolve_impl(impl, x, weight_int8)
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], n)
    if which == "triton":
        return w8a16_linear_triton(x, weight_int8, weight_scale, bias)
    return w8a16_linear_reference(x, weight_int8, weight_scale, bias)
