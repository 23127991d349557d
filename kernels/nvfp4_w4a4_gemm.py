"""Native NVFP4 linear (W4A4): ``y = x @ W^T + b`` on Blackwell's block-scaled FP4 tensor cores.

Both operands are NVFP4: the weight is quantized once (:func:`~diffaccel.kernels.nvfp4.nvfp4_quantize`)
and the activations on every call (same recipe: an amax-based FP32 tensor scale, an E4M3 scale per
16 elements along K). The kernel hands the packed codes and their E4M3 block scales to
``tl.dot_scaled(..., "e2m1", ..., "e2m1")``, which Triton lowers to the block-scaled MMA
(``tcgen05.mma ... kind::mxf4nvf4.block_scale.block16`` on sm_100, ``mma.sync ... kind::mxf4nvf4
.block_scale.scale_vec::4X ... ue4m3`` on sm_120); the two tensor scales and the bias are
applied in the epilogue in FP32. Unlike the W4A16 path (:mod:`~diffaccel.kernels.nvfp4_gemm`),
the activations lose precision too: this is the compute-bound path, for large M.

Capability is detected, never assumed: :func:`native_fp4_supported` is true only on GPUs whose
block-scaled FP4 MMA Triton targets (compute capability 10.x and 12.x); elsewhere Triton would
emulate ``dot_scaled`` in bf16, so ``impl="auto"`` runs the plain-torch reference instead, and
``impl="triton"`` on a CUDA GPU without FP4 tensor cores raises. Under ``TRITON_INTERPRET=1`` the
kernel runs on CPU (Triton 3.8's interpreter decodes every ``dot_scaled`` scale as E8M0; the
launch teaches it E4M3 for this kernel's scope).

Non-finite activations: the activation tensor scale is shared by all tokens, so one NaN or inf
in ``x`` makes the whole output NaN (no error, no hang). K is padded to 16 (zeros); any M, N and
input strides.

Example:
    >>> import torch
    >>> from diffaccel.kernels.nvfp4 import nvfp4_quantize
    >>> g = torch.Generator().manual_seed(0)
    >>> w, x = torch.randn(32, 64, generator=g), torch.randn(4, 64, generator=g)
    >>> y = nvfp4_w4a4_linear(x, nvfp4_quantize(w))
    >>> y.shape, bool(((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.2)
    (torch.Size([4, 32]), True)
"""

from __future__ import annotations

import torch

from ._tiles import GROUP_M, gemm_grid, grouped_tile, store_tile, tile_config
from ._triton import interpreted_e4m3_scales, interpreting, jit, resolve_impl, tl
from .nvfp4 import (
    BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    NVFP4Tensor,
    check_linear_operands,
    nvfp4_dequantize_reference,
    nvfp4_quantize_reference,
    nvfp4_quantize_triton,
)

#: Compute-capability majors with block-scaled FP4 tensor cores that Triton targets.
NATIVE_FP4_MAJORS = (10, 12)


def native_fp4_supported(device: torch.device | str | int | None = None) -> bool:
    """Whether ``device`` (default: the current CUDA device) has block-scaled FP4 tensor cores.

    Example:
        >>> native_fp4_supported() if torch.cuda.is_available() else False
        False
    """
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] in NATIVE_FP4_MAJORS


def _quantize_activations(x2: torch.Tensor, impl: str) -> NVFP4Tensor:
    """NVFP4 activations without :func:`nvfp4_quantize`'s finiteness check (a host sync per call)."""
    k = x2.shape[1]
    flat = torch.nn.functional.pad(x2, (0, -k % BLOCK_SIZE)) if k % BLOCK_SIZE else x2
    amax = flat.abs().amax().float()
    # nvfp4_quantize's recipe, except that a NaN or inf amax stays in the scale (and so reaches
    # every output) instead of falling back to 1.0 as an all-zero tensor does
    tensor_scale = torch.where(amax == 0, torch.ones_like(amax), amax / (E2M1_MAX * E4M3_MAX))
    if impl == "triton":
        packed, scale = nvfp4_quantize_triton(flat, tensor_scale)
    else:
        packed, scale = nvfp4_quantize_reference(flat, tensor_scale)
    return NVFP4Tensor(packed, scale, tensor_scale, tuple(x2.shape))


def nvfp4_w4a4_linear_reference(
    x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain torch: quantize ``x`` to NVFP4, decode both operands, multiply in fp32, scale, add bias."""
    x2 = x.reshape(-1, x.shape[-1])
    qx = _quantize_activations(x2, "reference")
    one = torch.ones((), device=x.device)
    xd = nvfp4_dequantize_reference(qx.packed, qx.block_scale, one)
    wd = nvfp4_dequantize_reference(w.packed, w.block_scale, one)
    y = (xd @ wd.T) * (qx.tensor_scale * w.tensor_scale.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], wd.shape[0])


@jit
def _w4a4_kernel(
    a_ptr,
    sa_ptr,
    b_ptr,
    sb_ptr,
    tsa_ptr,
    tsb_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    KP,
    stride_am,
    stride_sam,
    stride_bn,
    stride_sbn,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    jb = tl.arange(0, BLOCK_K // 2)  # packed bytes of a K tile
    js = tl.arange(0, BLOCK_K // 16)  # its E4M3 block scales
    m_mask = (rm < M)[:, None]
    n_mask = (rn < N)[:, None]
    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    b_rows = b_ptr + rn[:, None].to(tl.int64) * stride_bn
    sa_rows = sa_ptr + rm[:, None].to(tl.int64) * stride_sam
    sb_rows = sb_ptr + rn[:, None].to(tl.int64) * stride_sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        kb = (k0 // 2 + jb)[None, :]
        ks = (k0 // 16 + js)[None, :]
        # Out-of-range bytes and scales load as 0: codes 0 times scale 0 add nothing.
        a = tl.load(a_rows + kb, mask=m_mask & (kb < KP // 2), other=0)
        b = tl.load(b_rows + kb, mask=n_mask & (kb < KP // 2), other=0)
        sa = tl.load(sa_rows + ks, mask=m_mask & (ks < KP // 16), other=0.0)
        sb = tl.load(sb_rows + ks, mask=n_mask & (ks < KP // 16), other=0.0)
        acc = tl.dot_scaled(a, sa, "e2m1", b.T, sb, "e2m1", acc)
    y = acc * (tl.load(tsa_ptr) * tl.load(tsb_ptr))
    store_tile(c_ptr, y, bias_ptr, rm, rn, M, N, stride_cm, stride_cn, HAS_BIAS)


# Tiles by row count (see _tiles.tile_config). BLOCK_K = 128 elements: one block-scaled MMA K step takes
# 64 FP4 elements; not timed yet.
_TILES = (
    (64, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}),
    (None, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}),
)


def _config(m: int) -> dict[str, int]:
    return tile_config(m, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4}, _TILES)


def nvfp4_w4a4_linear_triton(
    x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton W4A4 GEMM (same contract as :func:`nvfp4_w4a4_linear_reference`)."""
    x2 = x.reshape(-1, x.shape[-1])
    qx = _quantize_activations(x2, "triton")
    m, n = x2.shape[0], w.packed.shape[0]
    kp = w.packed.shape[1] * 2
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = _config(m)
    packed, scale = w.packed.contiguous(), w.block_scale.contiguous()
    with interpreted_e4m3_scales():
        _w4a4_kernel[gemm_grid(m, n, cfg)](
            qx.packed,
            qx.block_scale,
            packed,
            scale,
            qx.tensor_scale.reshape(1),
            w.tensor_scale.float().reshape(1),
            bias if bias is not None else out,
            out,
            m,
            n,
            kp,
            qx.packed.stride(0),
            qx.block_scale.stride(0),
            packed.stride(0),
            scale.stride(0),
            out.stride(0),
            out.stride(1),
            HAS_BIAS=bias is not None,
            GROUP_M=GROUP_M,
            **cfg,
        )
    return out.reshape(*x.shape[:-1], n)


def nvfp4_w4a4_linear(
    x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """``x @ W^T + bias`` with ``x`` quantized to NVFP4 per call and an NVFP4 weight ``(N, K)``.

    ``impl="auto"`` runs the Triton kernel on GPUs with FP4 tensor cores
    (:func:`native_fp4_supported`) or under ``TRITON_INTERPRET=1``, the reference elsewhere.
    """
    n = check_linear_operands(x, w, bias)
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], n)
    resolved = resolve_impl(impl, x, w.packed)
    # the capability is read only for the Triton path: CPU tensors on a CUDA machine have none
    if resolved == "triton" and not (interpreting() or native_fp4_supported(x.device)):
        if impl == "triton":
            raise ValueError(
                "impl='triton' needs a GPU with FP4 tensor cores (compute capability 10.x or 12.x), "
                f"got {torch.cuda.get_device_name(x.device)}; use nvfp4_linear (W4A16) there"
            )
        resolved = "reference"
    if resolved == "triton":
        return nvfp4_w4a4_linear_triton(x, w, bias)
    return nvfp4_w4a4_linear_reference(x, w, bias)
