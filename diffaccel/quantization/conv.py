"""``QuantizedConv2d``: a drop-in ``nn.Conv2d`` with weight-only NVFP4 (W4A16) or INT8 (W8A16) weights.

A UNet's weights are mostly convolutions (micro-SD's: 3.0 of its 3.7 M weights), so quantizing
only Linear layers leaves most of its bytes in bf16. The convolution's weight ``(out, in / groups,
kh, kw)`` is stored as the 2-D matrix ``(out, in / groups * kh * kw)`` in the formats of
:mod:`~diffaccel.quantization.formats` (NVFP4 blocks of 16 and INT8 scale groups then run along
each output channel's input-channel-and-kernel window, the GEMM's K in an im2col convolution). The
forward decodes the weight to the activation's dtype and runs ``torch.nn.functional.conv2d``
(the reference path, on every device: on CPU it is slower than the float convolution; the claim
here is memory and quality, not speed). W8A8 has no convolution path: a layer planned ``"int8"``
gets ``"w8a16"`` (see :func:`~diffaccel.quantization.quantization_plan`).

Example:
    >>> import torch
    >>> conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    >>> q = QuantizedConv2d.from_conv(conv, "w8a16")
    >>> q
    QuantizedConv2d(8, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), precision=w8a16)
    >>> x = torch.randn(1, 8, 12, 12)
    >>> bool((q(x) - conv(x)).abs().max() < 1e-2), round(q.bits_per_weight, 2)
    (True, 8.44)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels._triton import IMPLS
from .formats import (
    QuantizedBuffersModule,
    check_group_size,
    decode_weight,
    encode_weight,
    register_weight,
    weight_tensors,
)

#: Precisions a :class:`QuantizedConv2d` can hold (weight-only).
CONV_PRECISIONS: tuple[str, ...] = ("nvfp4", "w8a16")

#: ``nn.Conv2d`` attributes a quantized convolution keeps, to rebuild it and to run it.
CONV_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


class QuantizedConv2d(QuantizedBuffersModule):
    """A ``Conv2d`` whose weight is stored in NVFP4 or INT8 (weight-only).

    Build one with :meth:`from_conv`. Attributes: the ``nn.Conv2d`` geometry (``in_channels``,
    ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``,
    ``padding_mode``), ``precision``, ``group_size``, ``bias``, ``impl``; ``has_residual`` and
    ``refine`` are always False (no nested format for convolutions).

    Example:
        >>> import torch
        >>> q = QuantizedConv2d.from_conv(torch.nn.Conv2d(4, 4, 1), "nvfp4")
        >>> sorted(q.state_dict())
        ['bias', 'weight_block_scale', 'weight_packed', 'weight_tensor_scale']
    """

    has_residual = False
    refine = False
    fp4_activations = False

    def __init__(self, conv_geometry: dict[str, Any], precision: str, *, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 impl: str = "auto", group_size: int | None = None) -> None:
        """An *empty* layer of ``conv_geometry`` (the :data:`CONV_GEOMETRY` attributes of an ``nn.Conv2d``),
        to load a state dict into; use :meth:`from_conv` to quantize a convolution."""
        super().__init__()
        if precision not in CONV_PRECISIONS:
            raise ValueError(f"a convolution's precision must be one of {CONV_PRECISIONS}, got {precision!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        check_group_size(precision, group_size)
        missing = [key for key in CONV_GEOMETRY if key not in conv_geometry]
        if missing:
            raise ValueError(f"conv_geometry lacks {missing}")
        for key in CONV_GEOMETRY:
            value = conv_geometry[key]
            setattr(self, key, tuple(value) if isinstance(value, list) else value)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(
                f"QuantizedConv2d supports padding_mode='zeros' with numeric padding, got "
                f"padding_mode={self.padding_mode!r}, padding={self.padding!r}"
            )
        self.precision, self.group_size, self.impl = precision, group_size, impl
        register_weight(self, precision, self.out_channels, self.matrix_in_features, group_size=group_size, device=device)
        self.bias = nn.Parameter(torch.empty(self.out_channels, dtype=dtype, device=device)) if bias else None

    @property
    def matrix_in_features(self) -> int:
        """Columns of the stored 2-D weight: ``in_channels / groups * kh * kw``."""
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, precision: str, *, impl: str = "auto",
                  group_size: int | None = None) -> QuantizedConv2d:
        """Quantize ``conv``'s weight to ``precision`` (``"nvfp4"`` or ``"w8a16"``).

        Example:
            >>> import torch
            >>> conv = torch.nn.Conv2d(16, 8, 3)
            >>> q = QuantizedConv2d.from_conv(conv, "nvfp4")
            >>> err = (q.dequantized_weight() - conv.weight).norm() / conv.weight.norm()
            >>> bool(err < 0.15)
            True
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        weight = conv.weight.detach()
        module = cls({key: getattr(conv, key) for key in CONV_GEOMETRY}, precision, bias=conv.bias is not None,
                     dtype=weight.dtype if conv.bias is None else conv.bias.dtype, device=weight.device,
                     impl=impl, group_size=group_size)
        encode_weight(module, precision, weight.reshape(weight.shape[0], -1), group_size=group_size, impl=impl)
        if conv.bias is not None:
            module.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective 4-D ``(out, in / groups, kh, kw)`` weight."""
        matrix = decode_weight(self, self.precision, self.out_channels, self.matrix_in_features, impl=self.impl)
        return matrix.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv2d(x, dequantized weight, bias)`` in ``x``'s dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.dequantized_weight(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)

    @property
    def weight_nbytes(self) -> int:
        """Storage bytes of the weight: codes and scales (not the bias)."""
        return sum(t.numel() * t.element_size() for t in weight_tensors(self, self.precision))

    @property
    def weight_numel(self) -> int:
        """Weights of the float convolution: ``out * in / groups * kh * kw``."""
        return self.out_channels * self.matrix_in_features

    @property
    def bits_per_weight(self) -> float:
        """``weight_nbytes * 8 / weight_numel``."""
        return self.weight_nbytes * 8 / self.weight_numel

    def extra_repr(self) -> str:
        """``in, out, kernel_size=..., stride=..., padding=..., precision=...``."""
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
        text += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        text += f", groups={self.groups}" if self.groups != 1 else ""
        text += f", precision={self.precision}"
        return text + (f", group_size={self.group_size}" if self.group_size is not None else "")

    def layout(self) -> dict[str, Any]:
        """What rebuilding this layer needs besides its tensors and the float model's config.

        Example:
            >>> import torch
            >>> QuantizedConv2d.from_conv(torch.nn.Conv2d(4, 4, 1), "w8a16").layout()
            {'kind': 'conv2d', 'precision': 'w8a16', 'residual': False, 'refine': False, 'act_scale': False, 'fp4_activations': False}
        """
        layout = {"kind": "conv2d", "precision": self.precision, "residual": False, "refine": False,
                  "act_scale": False, "fp4_activations": False}
        return layout if self.group_size is None else {**layout, "group_size": self.group_size}
