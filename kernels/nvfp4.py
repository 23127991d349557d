"""NVFP4 quantization: E2M1 elements, an FP8 E4M3 scale per 16 elements, an FP32 tensor scale.

The format is NVIDIA's NVFP4. Elements are 4-bit E2M1 (magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
a sign bit; code ``c`` has sign ``c >> 3``), two per byte: element ``2j`` in the low nibble of byte
``j``, element ``2j + 1`` in the high nibble. Blocks of 16 consecutive elements along the last
(reduction) dimension share one E4M3 scale; one FP32 scale covers the tensor.

Scale recipe (amax based, as in NVIDIA's ModelOpt):

* ``tensor_scale = amax(|x|) / (6 * 448)`` (``1.0`` for an all-zero tensor), so that every block
  scale below fits E4M3's largest finite value, 448;
* ``block_scale = e4m3(min(amax(|block|) / 6 / tensor_scale, 448))``, rounded to nearest even;
* ``code = e2m1(|x| / (float(block_scale) * tensor_scale))``, rounded to nearest even and
  saturating at 6; a block whose scale is 0 (all zeros, or so small beside the tensor's amax that
  its E4M3 scale underflows) quantizes to zeros.

Dequantization is ``value(code) * float(block_scale) * tensor_scale``. An outlier takes its
block's scale: small values in the same block round to 0 while other blocks keep their own
precision. Non-finite values raise ``ValueError``: weights are quantized once, offline.

The last dimension is zero-padded to a multiple of 16; :class:`NVFP4Tensor` keeps the logical
shape and saves to / loads from safetensors through :meth:`NVFP4Tensor.to_dict` /
:meth:`NVFP4Tensor.from_dict`.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 0.5, -1.0, 1.5, 2.0, -3.0, 4.0, 6.0] * 2])
    >>> q = nvfp4_quantize(w)
    >>> q.packed.dtype, tuple(q.packed.shape), q.block_scale.dtype
    (torch.uint8, (1, 8), torch.float8_e4m3fn)
    >>> torch.equal(nvfp4_dequantize(q), w)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import check_float, device_function, jit, resolve_impl, tl, triton

#: The eight E2M1 magnitudes, indexed by the code's low three bits.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK_SIZE = 16
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class NVFP4Tensor:
    """An NVFP4-quantized tensor: packed codes, E4M3 block scales, FP32 tensor scale.

    ``packed`` is ``uint8 (..., Kp // 2)``, ``block_scale`` is ``float8_e4m3fn (..., Kp // 16)``,
    ``tensor_scale`` a 0-d ``float32`` tensor; ``shape`` is the logical shape (``Kp`` is its last
    dimension rounded up to 16).
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    tensor_scale: torch.Tensor
    shape: tuple[int, ...]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized tensor (see :func:`nvfp4_dequantize`)."""
        return nvfp4_dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        """Storage in bytes (codes, block scales, tensor scale)."""
        return sum(
            t.numel() * t.element_size() for t in (self.packed, self.block_scale, self.tensor_scale)
        )

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Plain tensors for ``safetensors.torch.save_file`` (keys ``prefix + field``)."""
        return {
            prefix + "packed": self.packed.contiguous(),
            prefix + "block_scale": self.block_scale.contiguous(),
            prefix + "tensor_scale": self.tensor_scale.reshape(()),
            prefix + "shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> NVFP4Tensor:
        """Rebuild from :meth:`to_dict`'s tensors (e.g. ``safetensors.torch.load_file``)."""
        return cls(
            packed=tensors[prefix + "packed"],
            block_scale=tensors[prefix + "block_scale"],
            tensor_scale=tensors[prefix + "tensor_scale"],
            shape=tuple(int(s) for s in tensors[prefix + "shape"].tolist()),
        )


def _tensor_scale(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax().float()
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def _e2m1_code(v: torch.Tensor) -> torch.Tensor:
    """Round non-negative ``v`` to the nearest E2M1 magnitude, ties to even; returns the code."""
    code = (v > 0.25).to(torch.uint8) + (v >= 0.75) + (v > 1.25) + (v >= 1.75)
    return code + (v > 2.5) + (v >= 3.5) + (v > 5.0)


def nvfp4_quantize_reference(
    x: torch.Tensor, tensor_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch quantization of a 2-D ``(R, Kp)`` tensor, ``Kp % 16 == 0``: (packed, block scales)."""
    groups = x.float().reshape(-1, BLOCK_SIZE)
    amax = groups.abs().amax(dim=1)
    scale = torch.clamp((amax / E2M1_MAX) / tensor_scale, max=E4M3_MAX).to(torch.float8_e4m3fn)
    full = scale.float() * tensor_scale
    v = torch.where(full[:, None] > 0, groups.abs() / full[:, None], torch.zeros_like(groups))
    code = _e2m1_code(v) | ((groups < 0).to(torch.uint8) << 3)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.reshape(x.shape[0], -1), scale.reshape(x.shape[0], -1)


@device_function
def e2m1_to_f32(code):
    """E2M1 code(s) (low 4 bits; bit 3 is the sign) -> float32 value."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(
        e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0))
    )
    return tl.where((code & 8) != 0, -mag, mag)


@device_function
def e4m3_to_f32(code):
    """Unsigned E4M3 bits (exponent bias 7, subnormals in steps of 2**-9) -> float32, no fp8 dtype."""
    code = code.to(tl.int32)
    e = (code >> 3) & 15
    m = code & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)


@device_function
def f32_to_e4m3(x):
    """Non-negative float32 <= 448 -> E4M3 bits, rounded to nearest even (integer arithmetic only)."""
    bits = x.to(tl.int32, bitcast=True)
    r = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
    subnormal = ((x * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)  # 2**-6 comes out as 8: right
    return tl.where(x < 0.015625, subnormal, normal).to(tl.uint8)


@device_function
def f32_to_e2m1(x, full):
    """E2M1 code of ``x / full`` (``full`` > 0, else code 0), nearest even, saturating at 6."""
    v = tl.where(full > 0, tl.div_rn(tl.abs(x), tl.where(full > 0, full, 1.0)), 0.0)
    c = (v > 0.25).to(tl.uint8) + (v >= 0.75).to(tl.uint8) + (v > 1.25).to(tl.uint8)
    c += (v >= 1.75).to(tl.uint8) + (v > 2.5).to(tl.uint8) + (v >= 3.5).to(tl.uint8)
    c += (v > 5.0).to(tl.uint8)
    return c | ((x < 0).to(tl.uint8) << 3)


@jit
def _quantize_kernel(
    x_ptr, packed_ptr, scale_ptr, tensor_scale_ptr, n_groups, BLOCK_G: tl.constexpr
):
    pid = tl.program_id(0)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, 8)
    mask = (g < n_groups)[:, None]
    offs = g[:, None] * 16 + 2 * j[None, :]
    even = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(x_ptr + offs + 1, mask=mask, other=0.0).to(tl.float32)
    ts = tl.load(tensor_scale_ptr)
    amax = tl.maximum(tl.max(tl.abs(even), axis=1), tl.max(tl.abs(odd), axis=1))
    scale8 = f32_to_e4m3(tl.minimum(tl.div_rn(tl.div_rn(amax, 6.0), ts), 448.0))
    full = (e4m3_to_f32(scale8) * ts)[:, None]
    low, high = f32_to_e2m1(even, full), f32_to_e2m1(odd, full)
    tl.store(packed_ptr + g[:, None] * 8 + j[None, :], low | (high << 4), mask=mask)
    tl.store(scale_ptr + g, scale8, mask=g < n_groups)


def nvfp4_quantize_triton(
    x: torch.Tensor, tensor_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton quantization, same contract and same bits as :func:`nvfp4_quantize_reference`."""
    x = x.contiguous()
    n_groups = x.numel() // BLOCK_SIZE
    packed = torch.empty(x.shape[0], x.shape[1] // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(x.shape[0], x.shape[1] // BLOCK_SIZE, dtype=torch.uint8, device=x.device)
    block_g = 64
    _quantize_kernel[(triton.cdiv(n_groups, block_g),)](
        x, packed, scale, tensor_scale.reshape(1).contiguous(), n_groups, BLOCK_G=block_g
    )
    return packed, scale.view(torch.float8_e4m3fn)


def nvfp4_quantize(x: torch.Tensor, *, impl: str = "auto") -> NVFP4Tensor:
    """Quantize ``x`` (any shape, float32/float16/bfloat16) to NVFP4 along its last dimension.

    Example:
        >>> import torch
        >>> q = nvfp4_quantize(torch.randn(32, 64))
        >>> q.shape, tuple(q.block_scale.shape), q.nbytes
        ((32, 64), (32, 4), 1156)
    """
    check_float("x", x, _FLOATS)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(
            f"x must have at least one dimension and one element, got shape {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite to quantize to NVFP4 (found NaN or inf)")
    shape = tuple(x.shape)
    flat = x.reshape(-1, shape[-1])
    pad = -shape[-1] % BLOCK_SIZE
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    tensor_scale = _tensor_scale(flat)
    if resolve_impl(impl, x) == "triton":
        packed, scale = nvfp4_quantize_triton(flat, tensor_scale)
    else:
        packed, scale = nvfp4_quantize_reference(flat, tensor_scale)
    lead = shape[:-1]
    return NVFP4Tensor(packed.reshape(*lead, -1), scale.reshape(*lead, -1), tensor_scale, shape)


def check_linear_operands(x: torch.Tensor, w: NVFP4Tensor, bias: torch.Tensor | None) -> int:
    """Validate the operands of an NVFP4 linear ``x @ W^T + bias``; returns ``out_features``.

    Example:
        >>> import torch
        >>> check_linear_operands(torch.zeros(3, 16), nvfp4_quantize(torch.ones(8, 16)), None)
        8
    """
    check_float("x", x, _FLOATS)
    if not isinstance(w, NVFP4Tensor) or len(w.shape) != 2:
        raise ValueError(
            "w must be a 2-D NVFP4Tensor (out_features, in_features) from nvfp4_quantize"
        )
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must equal the weight's in_features ({k})"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    return n


def nvfp4_dequantize_reference(
    packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor
) -> torch.Tensor:
    """Plain-torch decoding of 2-D ``packed``/``block_scale`` to float32 ``(R, Kp)``."""
    values = torch.tensor(E2M1_VALUES, device=packed.device)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1).long()
    magnitude = values[codes & 7]
    signed = torch.where(codes >= 8, -magnitude, magnitude)
    scale = (block_scale.float() * tensor_scale).repeat_interleave(BLOCK_SIZE, dim=1)
    return signed * scale


@jit
def _dequantize_kernel(
    packed_ptr, scale_ptr, tensor_scale_ptr, out_ptr, n_groups, BLOCK_G: tl.constexpr
):
    pid = tl.program_id(0)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, 8)
    mask = (g < n_groups)[:, None]
    byte = tl.load(packed_ptr + g[:, None] * 8 + j[None, :], mask=mask, other=0)
    scale = e4m3_to_f32(tl.load(scale_ptr + g, mask=g < n_groups, other=0))
    full = (scale * tl.load(tensor_scale_ptr))[:, None]
    for half in tl.static_range(2):
        value = e2m1_to_f32((byte >> (4 * half)) & 0xF) * full
        tl.store(out_ptr + g[:, None] * 16 + 2 * j[None, :] + half, value, mask=mask)


def nvfp4_dequantize_triton(
    packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor
) -> torch.Tensor:
    """Triton decoding, same contract and same values as :func:`nvfp4_dequantize_reference`."""
    packed = packed.contiguous()
    out = torch.empty(
        packed.shape[0], packed.shape[1] * 2, dtype=torch.float32, device=packed.device
    )
    n_groups = out.numel() // BLOCK_SIZE
    block_g = 64
    _dequantize_kernel[(triton.cdiv(n_groups, block_g),)](
        packed,
        block_scale.contiguous().view(torch.uint8),
        tensor_scale.reshape(1).float().contiguous(),
        out,
        n_groups,
        BLOCK_G=block_g,
    )
    return out


def nvfp4_dequantize(
    q: NVFP4Tensor, dtype: torch.dtype = torch.float32, *, impl: str = "auto"
) -> torch.Tensor:
    """Decode an :class:`NVFP4Tensor` to ``dtype`` with its logical shape.

    Example:
        >>> import torch
        >>> nvfp4_dequantize(nvfp4_quantize(torch.full((2, 16), 3.0)), torch.float16)[0, :4]
        tensor([3., 3., 3., 3.], dtype=torch.float16)
    """
    if not isinstance(q, NVFP4Tensor):
        raise TypeError(f"q must be an NVFP4Tensor, got {type(q).__name__}")
    packed = q.packed.reshape(-1, q.packed.shape[-1])
    scale = q.block_scale.reshape(-1, q.block_scale.shape[-1])
    if resolve_impl(impl, packed) == "triton":
        out = nvfp4_dequantize_triton(packed, scale, q.tensor_scale)
    else:
        out = nvfp4_dequantize_reference(packed, scale, q.tensor_scale)
    return out[:, : q.shape[-1]].reshape(q.shape).to(dtype)
