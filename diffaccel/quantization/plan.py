"""What :func:`~diffaccel.quantization.quantize_` and :mod:`~diffaccel.quantization.serialization`
both read: the supported model classes and their Linear scope, and the plan recorded on a
quantized model (``model._diffaccel_quantization``, written by
:func:`~diffaccel.quantization.serialization.record_plan`).

Example:
    >>> from diffaccel.testing import tiny_pipeline
    >>> supported_class(tiny_pipeline("sd").unet), in_scope("UNet2DConditionModel", "time_embedding.linear_1")
    ('UNet2DConditionModel', False)
    >>> in_scope("UNet2DConditionModel", "down_blocks.0.resnets.0.conv1", "all")
    True
"""

from __future__ import annotations

from typing import Any

import diffusers
from torch import nn

from ..errors import UnsupportedPipelineError
from .conv import QuantizedConv2d
from .linear import QuantizedLinear

#: Module types :func:`~diffaccel.quantization.quantize_` swaps in.
QUANTIZED_TYPES = (QuantizedLinear, QuantizedConv2d)

#: Model classes :func:`~diffaccel.quantization.quantize_` accepts (diffusers class names), and their
#: layers in ``QuantizationConfig.scope="blocks"`` (``"all"``: every Linear and Conv2d of any of them).
SUPPORTED_MODELS: dict[str, str] = {
    "FluxTransformer2DModel": "every Linear",
    "SD3Transformer2DModel": "every Linear",
    "PixArtTransformer2DModel": "every Linear",
    "WanTransformer3DModel": "every Linear",
    "CogVideoXTransformer3DModel": "every Linear",
    "LTXVideoTransformer3DModel": "every Linear",
    "UNet2DConditionModel": "Linear layers inside the attentions' transformer blocks",
}

#: Attribute of a quantized model holding its plan.
PLAN_ATTR = "_diffaccel_quantization"


def supported_class(model: nn.Module) -> str:
    """The :data:`SUPPORTED_MODELS` name of ``model``'s class; raises
    :class:`~diffaccel.errors.UnsupportedPipelineError` for other models.

    Example:
        >>> supported_class(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        diffaccel.errors.UnsupportedPipelineError: quantize_ does not support Linear; supported models: ...
    """
    for name in SUPPORTED_MODELS:
        if isinstance(model, getattr(diffusers, name)):
            return name
    raise UnsupportedPipelineError(
        f"quantize_ does not support {type(model).__name__}; supported models: {', '.join(SUPPORTED_MODELS)}"
    )


def in_scope(model_class: str, name: str, scope: str = "blocks") -> bool:
    """Whether the layer ``name`` of a ``model_class`` model may be quantized in ``scope``
    (``"blocks"``: a UNet's Linears only inside its attentions; ``"all"``: any)."""
    return scope == "all" or model_class != "UNet2DConditionModel" or "attentions" in name.split(".")


def scope_layers(model: nn.Module, scope: str) -> dict[str, nn.Module]:
    """The float layers ``scope`` considers, by name: ``nn.Linear`` (``"all"``: and ``nn.Conv2d``) in scope.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sd").unet
        >>> len(scope_layers(unet, "blocks")), len(scope_layers(unet, "all"))
        (70, 132)
    """
    model_class = supported_class(model)
    types = (nn.Linear, nn.Conv2d) if scope == "all" else (nn.Linear,)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, types) and in_scope(model_class, name, scope)}


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear | QuantizedConv2d]:
    """The model's :class:`QuantizedLinear` and :class:`QuantizedConv2d` modules by qualified name.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> quantized_layers(tiny_pipeline("wan").transformer)
        {}
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, QUANTIZED_TYPES)}


def is_quantized(model: nn.Module) -> bool:
    """Whether :func:`~diffaccel.quantization.quantize_` (or :func:`~diffaccel.quantization.load_quantized`) made ``model``.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> is_quantized(tiny_pipeline("wan").transformer)
        False
    """
    return getattr(model, PLAN_ATTR, None) is not None or bool(quantized_layers(model))


def plan_of(model: nn.Module) -> dict[str, Any]:
    """The recorded plan ``{"config": QuantizationConfig, "layers": {...}}`` of a quantized model.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> plan_of(tiny_pipeline("wan").transformer)
        Traceback (most recent call last):
        ...
        ValueError: this WanTransformer3DModel has no quantize_ plan recorded (quantize it with quantize_)
    """
    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise ValueError(f"this {type(model).__name__} has no quantize_ plan recorded (quantize it with quantize_)")
    return plan
