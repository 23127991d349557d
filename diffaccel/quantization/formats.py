"""Stored weight formats shared by :class:`~diffaccel.quantization.QuantizedLinear` and
:class:`~diffaccel.quantization.QuantizedConv2d`: which buffers a format holds, how a 2-D weight
``(out, in)`` is encoded into them and decoded back.

* ``"nvfp4"``: ``{prefix}packed`` (uint8, two E2M1 codes a byte), ``{prefix}block_scale``
  (float8_e4m3fn, one per 16 weights), ``{prefix}tensor_scale`` (float32, 0-d): 4.5 bits per weight.
* ``"int8"`` (W8A8) and ``"w8a16"`` (weight-only INT8): ``weight_int8`` (int8) and ``weight_scale``
  (float32, one per output channel, or ``(out, ceil(in / group_size))`` with per-group scales, W8A16 only).

Example:
    >>> import torch
    >>> module = torch.nn.Module()
    >>> register_weight(module, "w8a16", 8, 64, group_size=32)
    >>> encode_weight(module, "w8a16", torch.randn(8, 64), group_size=32)
    >>> module.weight_int8.dtype, tuple(module.weight_scale.shape)
    (torch.int8, (8, 2))
    >>> decode_weight(module, "w8a16", 8, 64).shape
    torch.Size([8, 64])
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import NVFP4Tensor, int8_dequantize_per_group, int8_quantize_per_group, nvfp4_dequantize, nvfp4_quantize
from ..kernels.nvfp4 import BLOCK_SIZE

#: Weight formats: the buffers each stores.
WEIGHT_FORMATS: tuple[str, ...] = ("nvfp4", "int8", "w8a16")

NVFP4_FIELDS = ("packed", "block_scale", "tensor_scale")


def check_group_size(precision: str, group_size: int | None) -> None:
    """``group_size`` must be None or a positive int, and only W8A16 takes one.

    Example:
        >>> check_group_size("int8", 64)
        Traceback (most recent call last):
        ...
        ValueError: group_size applies to precision 'w8a16' only (int8 keeps one scale per output channel), got 64
    """
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
    if precision != "w8a16":
        raise ValueError(
            f"group_size applies to precision 'w8a16' only ({precision} keeps one scale per output channel), got {group_size!r}"
        )


def register_weight(module: nn.Module, precision: str, out_features: int, in_features: int, *,
                    group_size: int | None = None, prefix: str = "weight_",
                    device: torch.device | str | None = None) -> None:
    """Register the (uninitialised) buffers of a ``(out_features, in_features)`` weight in ``precision`` on ``module``."""
    if precision == "nvfp4":
        padded = in_features + (-in_features % BLOCK_SIZE)
        module.register_buffer(prefix + "packed", torch.empty(out_features, padded // 2, dtype=torch.uint8, device=device))
        module.register_buffer(prefix + "block_scale", torch.empty(out_features, padded // BLOCK_SIZE,
                                                                   dtype=torch.float8_e4m3fn, device=device))
        module.register_buffer(prefix + "tensor_scale", torch.empty((), dtype=torch.float32, device=device))
        return
    if precision not in WEIGHT_FORMATS:
        raise ValueError(f"precision must be one of {WEIGHT_FORMATS}, got {precision!r}")
    check_group_size(precision, group_size)
    scale_shape = (out_features,) if group_size is None else (out_features, -(-in_features // group_size))
    module.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
    module.register_buffer("weight_scale", torch.empty(scale_shape, dtype=torch.float32, device=device))


def nvfp4_of(module: nn.Module, out_features: int, in_features: int, prefix: str = "weight_") -> NVFP4Tensor:
    """The NVFP4 weight stored under ``prefix`` as an :class:`~diffaccel.kernels.NVFP4Tensor`."""
    return NVFP4Tensor(*(getattr(module, prefix + f) for f in NVFP4_FIELDS), (out_features, in_features))


def set_nvfp4(module: nn.Module, q: NVFP4Tensor, prefix: str = "weight_") -> None:
    """Store an :class:`~diffaccel.kernels.NVFP4Tensor` in the buffers under ``prefix``."""
    for field in NVFP4_FIELDS:
        setattr(module, prefix + field, getattr(q, field))


def encode_weight(module: nn.Module, precision: str, weight: torch.Tensor, *, group_size: int | None = None,
                  impl: str = "auto") -> None:
    """Quantize the 2-D ``weight`` into ``module``'s buffers (registered by :func:`register_weight`)."""
    if precision == "nvfp4":
        set_nvfp4(module, nvfp4_quantize(weight, impl=impl))
    else:
        module.weight_int8, module.weight_scale = int8_quantize_per_group(weight, group_size)


def decode_weight(module: nn.Module, precision: str, out_features: int, in_features: int,
                  impl: str = "auto") -> torch.Tensor:
    """The float32 ``(out_features, in_features)`` weight ``module``'s buffers hold (no residual)."""
    if precision == "nvfp4":
        return nvfp4_dequantize(nvfp4_of(module, out_features, in_features), impl=impl)
    return int8_dequantize_per_group(module.weight_int8, module.weight_scale)


def weight_tensors(module: nn.Module, precision: str, prefixes: tuple[str, ...] = ("weight_",)) -> list[torch.Tensor]:
    """The stored tensors of the weight (codes and scales), for byte counts."""
    if precision == "nvfp4":
        return [getattr(module, p + f) for p in prefixes for f in NVFP4_FIELDS]
    return [module.weight_int8, module.weight_scale]


class QuantizedBuffersModule(nn.Module):
    """A module whose quantized buffers keep their dtypes under casts: ``Module.to(dtype)`` / ``.half()``
    would cast float8 block scales and float32 scales; here they follow only the device moves
    (parameters, e.g. the bias, are cast as usual). The base of the quantized layers."""

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN201 (nn.Module's signature)
        quantized = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in quantized.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self


def planned_nbytes(precision: str, out_features: int, in_features: int, group_size: int | None = None) -> int:
    """Bytes a weight of this shape stores in ``precision`` (``"nvfp4+residual"``: twice NVFP4).

    Example:
        >>> planned_nbytes("nvfp4", 64, 64), planned_nbytes("w8a16", 64, 64), planned_nbytes("w8a16", 64, 64, 32)
        (2308, 4352, 4608)
    """
    if precision in ("int8", "w8a16"):
        scales = out_features if group_size is None else out_features * -(-in_features // group_size)
        return out_features * in_features + 4 * scales
    padded = -(-in_features // BLOCK_SIZE) * BLOCK_SIZE
    nvfp4 = out_features * padded // 2 + out_features * padded // BLOCK_SIZE + 4
    return 2 * nvfp4 if precision == "nvfp4+residual" else nvfp4
