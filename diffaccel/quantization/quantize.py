"""``quantize_(model, config)``: swap a diffusers denoiser's Linear layers for quantized ones, in place.

In the style of torchao's ``quantize_``: one :class:`~diffaccel.quantization.QuantizationConfig`
decides, per Linear layer, whether it becomes a
:class:`~diffaccel.quantization.QuantizedLinear` and in which format. The plan is recorded on the
model as ``model._diffaccel_quantization = {"config": QuantizationConfig, "layers": {name:
layout}, "fallbacks": {name: precision}}`` and ``model.save_pretrained`` then also writes it (see
:mod:`diffaccel.quantization.serialization`).

Supported models (:data:`~diffaccel.quantization.plan.SUPPORTED_MODELS`): the transformers of Flux, SD3, PixArt, Wan,
CogVideoX and LTX (every ``nn.Linear`` is in scope) and ``UNet2DConditionModel`` (only the Linear
layers inside its ``attentions`` transformer blocks); with ``QuantizationConfig(scope="all")`` every
``nn.Linear`` and ``nn.Conv2d`` of any of them (convolutions become
:class:`~diffaccel.quantization.QuantizedConv2d`).

Example:
    >>> import torch
    >>> from diffaccel.testing import tiny_pipeline
    >>> from diffaccel.quantization import QuantizationConfig
    >>> transformer = tiny_pipeline("flux").transformer
    >>> _ = quantize_(transformer, QuantizationConfig("nvfp4", min_weight_numel=0))
    >>> type(transformer.transformer_blocks[0].attn.to_q).__name__
    'QuantizedLinear'
    >>> transformer._diffaccel_quantization["layers"]["transformer_blocks.0.attn.to_q"]["precision"]
    'nvfp4'
    >>> type(transformer.proj_out).__name__   # excluded by default
    'Linear'
"""

from __future__ import annotations

import warnings
from typing import TypeVar

from torch import nn
from tqdm.auto import tqdm

from .config import QuantizationConfig
from .plan import is_quantized, scope_layers
from .safety import check_weights, coverage_warning, fallback_warning, quantize_layer
from .serialization import record_plan

M = TypeVar("M", bound=nn.Module)


def quantization_plan(model: nn.Module, config: QuantizationConfig) -> dict[str, str]:
    """The precision :func:`quantize_` would give each in-scope layer.

    Values are ``"nvfp4"``, ``"nvfp4+residual"``, ``"int8"``, ``"w8a16"`` or ``"bf16"`` (left
    untouched), the names :func:`~diffaccel.quantization.memory_report` uses. Convolutions are
    weight-only: ``"int8"`` becomes ``"w8a16"`` and ``"nvfp4+residual"`` ``"nvfp4"`` for them.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> plan = quantization_plan(tiny_pipeline("sd").unet, QuantizationConfig("int8", min_weight_numel=0))
        >>> plan["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"], "time_embedding.linear_1" in plan
        ('int8', False)
        >>> plan = quantization_plan(tiny_pipeline("sd").unet, QuantizationConfig("int8", min_weight_numel=0, scope="all"))
        >>> plan["down_blocks.0.resnets.0.conv1"]
        'w8a16'
    """
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"config must be a QuantizationConfig, got {type(config).__name__}")
    plan = {}
    for name, module in scope_layers(model, config.scope).items():
        precision = config.precision_for(name, module.weight.numel())
        if isinstance(module, nn.Conv2d):
            precision = _CONV_PRECISION.get(precision, precision)
        plan[name] = precision
    return plan


#: What a convolution gets for a precision that has no convolution path (weight-only formats only).
_CONV_PRECISION = {"int8": "w8a16", "nvfp4+residual": "nvfp4"}


def quantize_(model: M, config: QuantizationConfig | None = None) -> M:
    """Quantize ``model``'s in-scope Linear layers per ``config`` (default ``QuantizationConfig()``), in place.

    Shows a progress bar on terminals. Returns ``model``. Raises
    :class:`~diffaccel.errors.UnsupportedPipelineError` for models not in
    :data:`SUPPORTED_MODELS` and ``ValueError`` for a model that is already quantized or a layer
    whose weight cannot be quantized (NaN or inf, not loaded): every weight is checked before any
    layer is swapped, so a refused model is left as it was. Warns (``UserWarning``) when the config
    quantizes no layer, or under half of the model's Linear weights with ``min_weight_numel``
    leaving layers out, and names the layers ``config.fallback`` kept in a higher precision because
    their weights would mostly round to zero (:mod:`~diffaccel.quantization.safety`).

    Example:
        >>> import torch
        >>> from diffaccel.testing import tiny_pipeline
        >>> unet = quantize_(tiny_pipeline("sd").unet, QuantizationConfig("int8", min_weight_numel=0))
        >>> len(unet._diffaccel_quantization["layers"])
        70
    """
    config = QuantizationConfig() if config is None else config
    plan = quantization_plan(model, config)
    if is_quantized(model):
        raise ValueError(
            f"this {type(model).__name__} is already quantized; quantize the original weights instead "
            "(reload the model) rather than quantizing twice"
        )
    todo = [(name, precision) for name, precision in plan.items() if precision != "bf16"]
    check_weights(model, [name for name, _ in todo])
    coverage = coverage_warning(model, plan, config)
    if coverage:
        warnings.warn(coverage, UserWarning, stacklevel=2)
    fallbacks = []
    for name, precision in tqdm(todo, desc="quantize_", leave=False, disable=None):  # a bar on terminals only
        layer, fallback = quantize_layer(name, model.get_submodule(name), precision, config)
        model.set_submodule(name, layer)
        fallbacks += [fallback] if fallback else []
    if fallbacks:
        warnings.warn(fallback_warning(fallbacks, config), UserWarning, stacklevel=2)
    record_plan(model, config, {f.name: f.precision for f in fallbacks})
    return model
