"""``QuantizedLinear``: a drop-in ``nn.Linear`` with NVFP4 (W4A16), INT8 (W8A8) or weight-only INT8 (W8A16) weights.

The quantized weight lives in buffers, so ``state_dict()`` holds it and safetensors saves it:

* ``"nvfp4"``: ``weight_packed`` (uint8, two E2M1 codes a byte), ``weight_block_scale``
  (float8_e4m3fn, one per 16 weights) and ``weight_tensor_scale`` (float32, 0-d): 4.5 bits per
  weight. With ``residual=True`` the layer also stores the NVFP4 quantization of the residual
  ``W - dequant(nvfp4(W))`` as ``residual_packed`` / ``residual_block_scale`` /
  ``residual_tensor_scale`` (the *nested* format: about 8-bit precision at 9 bits per weight).
  The residual is applied only while :attr:`QuantizedLinear.refine` is True, so precision can be
  raised or lowered per layer at run time without touching the weights.
* ``"int8"`` (W8A8): ``weight_int8`` (int8) and ``weight_scale`` (float32 per output channel); the
  activations are quantized per token on the fly, or with the static ``act_scale`` buffer
  (float32, 0-d) when calibration set one. The format that buys speed on INT8 tensor cores.
* ``"w8a16"`` (weight-only INT8): the same buffers, ``weight_scale`` per output channel or, with
  ``group_size``, per group of that many input columns (``(out, ceil(in / group_size))``); the
  activations stay in their dtype, so the only error is the weights' rounding. The format for
  quality per byte (what optimum-quanto's ``qint8`` and torchao's ``int8wo`` store).

``fp4_activations=True`` (nvfp4 layers) quantizes the activations to NVFP4 too and runs
:func:`~diffaccel.kernels.nvfp4_w4a4_linear` (W4A4): the FP4 tensor cores of Blackwell GPUs, the
plain-torch reference elsewhere. It costs accuracy (both operands are 4-bit) and is off by default.

The forward runs :func:`~diffaccel.kernels.nvfp4_linear` / :func:`~diffaccel.kernels.int8_linear` /
:func:`~diffaccel.kernels.w8a16_linear` (Triton on CUDA, the plain-torch reference elsewhere, or as ``impl`` says). The output has the
activation's dtype. ``bias`` stays an ``nn.Parameter`` in the original dtype. Casting the module
(``.to(torch.bfloat16)``, ``.half()``) casts the bias only: the quantized buffers keep their
dtypes and only follow device moves.

Not supported on quantized layers: diffusers' ``fuse_qkv_projections`` (it concatenates
``.weight`` tensors, which a quantized layer does not have).

Example:
    >>> import torch
    >>> linear = torch.nn.Linear(64, 32)
    >>> q = QuantizedLinear.from_linear(linear, "nvfp4", residual=True)
    >>> q
    QuantizedLinear(in_features=64, out_features=32, precision=nvfp4, residual=True, refine=False, bias=True)
    >>> q(torch.randn(2, 5, 64)).shape
    torch.Size([2, 5, 32])
    >>> round(q.bits_per_weight, 3)
    9.031
    >>> q.refine = True   # add the 4-bit correction: about 8-bit precision
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import NVFP4Tensor, int8_linear, nvfp4_dequantize, nvfp4_linear, nvfp4_quantize, nvfp4_w4a4_linear, w8a16_linear
from ..kernels._triton import IMPLS
from .formats import (
    QuantizedBuffersModule,
    WEIGHT_FORMATS,
    check_group_size,
    decode_weight,
    encode_weight,
    nvfp4_of,
    register_weight,
    set_nvfp4,
    weight_tensors,
)

#: Precisions a :class:`QuantizedLinear` can hold.
PRECISIONS: tuple[str, ...] = WEIGHT_FORMATS


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


class QuantizedLinear(QuantizedBuffersModule):
    """A Linear layer whose weight is stored in NVFP4 (optionally nested) or INT8.

    Build one with :meth:`from_linear`. Attributes: ``in_features``, ``out_features``,
    ``precision`` (``"nvfp4"``, ``"int8"`` or ``"w8a16"``), ``group_size`` (W8A16's scale groups, None:
    per channel), ``has_residual``, ``refine``, ``fp4_activations``, ``bias``, ``impl``.

    Example:
        >>> import torch
        >>> q = QuantizedLinear.from_linear(torch.nn.Linear(32, 16), "int8")
        >>> sorted(q.state_dict())
        ['bias', 'weight_int8', 'weight_scale']
        >>> q.bits_per_weight
        9.0
    """

    act_scale: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        precision: str,
        *,
        residual: bool = False,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        impl: str = "auto",
        fp4_activations: bool = False,
        group_size: int | None = None,
    ) -> None:
        """An *empty* layer of the given layout (buffers uninitialised), to load a state dict into.

        Use :meth:`from_linear` to quantize an existing ``nn.Linear``; ``dtype`` is the bias dtype.
        """
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if residual and precision != "nvfp4":
            raise ValueError(f"residual=True needs precision 'nvfp4', got {precision!r}")
        _check_impl(impl)
        check_group_size(precision, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.precision = precision
        self.group_size = group_size
        self.has_residual = residual
        self.impl = impl
        self._refine = False
        self.fp4_activations = fp4_activations
        for prefix in ("weight_",) + (("residual_",) if residual else ()):
            register_weight(self, precision, out_features, in_features, group_size=group_size, prefix=prefix,
                            device=device)
        if precision == "int8":
            self.register_buffer("act_scale", None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, precision: str, *, residual: bool = False, impl: str = "auto",
        fp4_activations: bool = False, group_size: int | None = None,
    ) -> QuantizedLinear:
        """Quantize ``linear``'s weight to ``precision`` (``"nvfp4"``, ``"int8"`` or ``"w8a16"``).

        ``residual=True`` (nvfp4 only) also stores the NVFP4 residual, applied while ``refine``;
        ``fp4_activations=True`` (nvfp4 only) runs the layer in W4A4; ``group_size`` (w8a16 only)
        keeps one scale per that many input columns instead of one per output channel.

        Example:
            >>> import torch
            >>> linear = torch.nn.Linear(16, 8)
            >>> q = QuantizedLinear.from_linear(linear, "nvfp4")
            >>> err = (q.dequantized_weight() - linear.weight).norm() / linear.weight.norm()
            >>> bool(err < 0.15)
            True
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            precision,
            residual=residual,
            bias=linear.bias is not None,
            dtype=weight.dtype if linear.bias is None else linear.bias.dtype,
            device=weight.device,
            impl=impl,
            fp4_activations=fp4_activations,
            group_size=group_size,
        )
        encode_weight(module, precision, weight, group_size=group_size, impl=impl)
        if residual:
            remainder = weight.float() - nvfp4_dequantize(module.weight_nvfp4, impl=impl)
            set_nvfp4(module, nvfp4_quantize(remainder, impl=impl), "residual_")
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return module

    def _nvfp4(self, prefix: str) -> NVFP4Tensor:
        return nvfp4_of(self, self.out_features, self.in_features, prefix)

    @property
    def refine(self) -> bool:
        """Whether the nested residual is applied (``has_residual`` layers only); settable any time."""
        return self._refine

    @refine.setter
    def refine(self, value: bool) -> None:
        if value and not self.has_residual:
            raise ValueError(
                f"refine=True needs a layer quantized with residual=True (this one: {self.precision}, no residual)"
            )
        self._refine = bool(value)

    @property
    def fp4_activations(self) -> bool:
        """Whether the activations are quantized to NVFP4 too (W4A4; ``"nvfp4"`` layers only); settable."""
        return self._fp4_activations

    @fp4_activations.setter
    def fp4_activations(self, value: bool) -> None:
        if value and self.precision != "nvfp4":
            raise ValueError(f"fp4_activations=True needs precision 'nvfp4', got {self.precision!r}")
        self._fp4_activations = bool(value)

    @property
    def weight_nvfp4(self) -> NVFP4Tensor:
        """The NVFP4 weight as an :class:`~diffaccel.kernels.NVFP4Tensor` (``"nvfp4"`` layers only).

        Example:
            >>> import torch
            >>> from diffaccel.kernels import nvfp4_linear
            >>> q = QuantizedLinear.from_linear(torch.nn.Linear(16, 4), "nvfp4")
            >>> x = torch.randn(2, 16)
            >>> torch.equal(q(x), nvfp4_linear(x, q.weight_nvfp4, q.bias))
            True
        """
        if self.precision != "nvfp4":
            raise AttributeError(f"weight_nvfp4 exists on nvfp4 layers only, this one is {self.precision}")
        return self._nvfp4("weight_")

    @property
    def residual_nvfp4(self) -> NVFP4Tensor | None:
        """The NVFP4 residual (``None`` without one)."""
        return self._nvfp4("residual_") if self.has_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias`` with the quantized weight; output dtype = ``x``'s dtype."""
        if self.precision == "int8":
            return int8_linear(x, self.weight_int8, self.weight_scale, self.bias, self.act_scale, impl=self.impl)
        if self.precision == "w8a16":
            return w8a16_linear(x, self.weight_int8, self.weight_scale, self.bias, impl=self.impl)
        linear = nvfp4_w4a4_linear if self.fp4_activations else nvfp4_linear
        y = linear(x, self.weight_nvfp4, self.bias, impl=self.impl)
        if self._refine:
            y = y + linear(x, self.residual_nvfp4, None, impl=self.impl)
        return y

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective ``(out_features, in_features)`` weight (with the residual while ``refine``).

        Example:
            >>> import torch
            >>> q = QuantizedLinear.from_linear(torch.nn.Linear(16, 4), "int8")
            >>> q.dequantized_weight(torch.bfloat16).dtype
            torch.bfloat16
        """
        weight = decode_weight(self, self.precision, self.out_features, self.in_features, impl=self.impl)
        if self._refine:
            weight = weight + nvfp4_dequantize(self.residual_nvfp4, impl=self.impl)
        return weight.to(dtype)

    def _weight_tensors(self) -> list[torch.Tensor]:
        return weight_tensors(self, self.precision, ("weight_",) + (("residual_",) if self.has_residual else ()))

    @property
    def weight_nbytes(self) -> int:
        """Storage bytes of the weight: codes, residual and weight scales (not the bias, not ``act_scale``)."""
        return sum(t.numel() * t.element_size() for t in self._weight_tensors())

    @property
    def weight_numel(self) -> int:
        """Weights of the float layer: ``out_features * in_features``."""
        return self.out_features * self.in_features

    @property
    def bits_per_weight(self) -> float:
        """``weight_nbytes * 8 / (in_features * out_features)``: 4.5 (+ a little) for nvfp4, 9 nested, 8 (+ scales) for INT8."""
        return self.weight_nbytes * 8 / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        """``in_features=..., out_features=..., precision=..., residual=..., refine=..., bias=...``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, precision={self.precision}, "
            f"residual={self.has_residual}, refine={self._refine}, bias={self.bias is not None}"
            + (", fp4_activations=True" if self._fp4_activations else "")
            + (f", group_size={self.group_size}" if self.group_size is not None else "")
        )

    def layout(self) -> dict[str, Any]:
        """What rebuilding this layer needs besides its tensors (see :mod:`.serialization`).

        Example:
            >>> import torch
            >>> QuantizedLinear.from_linear(torch.nn.Linear(16, 4), "nvfp4").layout()
            {'precision': 'nvfp4', 'residual': False, 'refine': False, 'act_scale': False, 'fp4_activations': False}
            >>> QuantizedLinear.from_linear(torch.nn.Linear(64, 4), "w8a16", group_size=32).layout()["group_size"]
            32
        """
        layout = {
            "precision": self.precision,
            "residual": self.has_residual,
            "refine": self._refine,
            "act_scale": getattr(self, "act_scale", None) is not None,
            "fp4_activations": self._fp4_activations,
        }
        return layout if self.group_size is None else {**layout, "group_size": self.group_size}
