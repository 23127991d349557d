"""Save a quantized model once, load it without re-quantizing: safetensors plus a JSON plan.

:func:`~diffaccel.quantization.quantize_` makes the model's ``save_pretrained`` (diffusers'
``ModelMixin.save_pretrained``, which saves ``state_dict()`` with safetensors, the quantized
buffers included) also write :data:`QUANTIZATION_FILE` beside ``config.json``: the config and, per
quantized layer, its layout (precision, residual, refine, static activation scale, FP4 activations).
``safe_serialization=False`` is refused: quantized weights are saved with safetensors only.

:func:`load_quantized` rebuilds the architecture from ``config.json`` without allocating its
float weights, swaps in empty :class:`~diffaccel.quantization.QuantizedLinear` layers per the plan
and loads every tensor from the safetensors file(s) (sharded checkpoints included); nothing is
re-quantized and nothing is unpickled, so outputs are bit-identical to the saved model's.

Example:
    >>> import tempfile, torch
    >>> from diffusers import WanTransformer3DModel
    >>> from diffaccel.testing import tiny_pipeline
    >>> from diffaccel.quantization import QuantizationConfig, quantize_
    >>> model = quantize_(tiny_pipeline("wan").transformer, QuantizationConfig(min_weight_numel=0))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     model.save_pretrained(folder)
    ...     loaded = load_quantized(WanTransformer3DModel, folder)
    >>> torch.equal(loaded.blocks[0].attn1.to_q.weight_packed, model.blocks[0].attn1.to_q.weight_packed)
    True
"""

from __future__ import annotations

import functools
import json
import os
import types
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from .config import QuantizationConfig
from .linear import QuantizedLinear
from .quantize import _supported_class, plan_of, quantized_layers, record_plan

#: The plan file written beside a quantized model's ``config.json``.
QUANTIZATION_FILE = "diffaccel_quantization.json"
_FORMAT_VERSION = 1

M = TypeVar("M", bound=nn.Module)


def quantization_plan_dict(model: nn.Module) -> dict[str, Any]:
    """The JSON form of a quantized model's plan, read from its current layers.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> from diffaccel.quantization import QuantizationConfig, quantize_
        >>> model = quantize_(tiny_pipeline("wan").transformer, QuantizationConfig("int8", min_weight_numel=0))
        >>> quantization_plan_dict(model)["layers"]["blocks.0.ffn.net.2"]
        {'precision': 'int8', 'residual': False, 'refine': False, 'act_scale': False, 'fp4_activations': False}
    """
    config = plan_of(model)["config"]
    layers = {name: module.layout() for name, module in quantized_layers(model).items()}
    return {"format_version": _FORMAT_VERSION, "config": config.to_dict(), "layers": layers}


def install_save_pretrained(model: nn.Module) -> None:
    """Make this model instance's ``save_pretrained`` also write :data:`QUANTIZATION_FILE`.

    The override is an instance attribute (the class, and so ``config.json``'s ``_class_name``
    and the pipeline's ``model_index.json``, stay diffusers'); it keeps the original signature,
    which diffusers' pipeline ``save_pretrained`` inspects. :func:`~diffaccel.quantization.quantize_`
    installs it.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> model = tiny_pipeline("wan").transformer
        >>> install_save_pretrained(model)
        >>> "save_pretrained" in model.__dict__, "save_pretrained" in tiny_pipeline("wan").transformer.__dict__
        (True, False)
    """
    if "save_pretrained" in model.__dict__:
        return
    original = type(model).save_pretrained

    @functools.wraps(original)
    def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("safe_serialization", True) is False:
            raise ValueError("a quantized model is saved with safetensors only: drop safe_serialization=False")
        original(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            with open(os.path.join(save_directory, QUANTIZATION_FILE), "w", encoding="utf-8") as handle:
                json.dump(quantization_plan_dict(self), handle, indent=2, sort_keys=True)

    model.save_pretrained = types.MethodType(save_pretrained, model)


def read_quantization_plan(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The plan saved in ``directory`` (``None`` when it holds no :data:`QUANTIZATION_FILE`).

    Example:
        >>> read_quantization_plan("/nonexistent") is None
        True
    """
    path = os.path.join(os.fspath(directory), QUANTIZATION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        plan = json.load(handle)
    if plan.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unknown format_version {plan.get('format_version')!r}, expected {_FORMAT_VERSION}")
    return plan


def _safetensors_files(directory: str) -> list[str]:
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    single = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        return [os.path.join(directory, shard) for shard in shards]
    raise FileNotFoundError(
        f"{directory} has no {SAFETENSORS_WEIGHTS_NAME} (or sharded index): quantized models load from safetensors only"
    )


def load_quantized(
    model_cls: type[M],
    directory: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> M:
    """Load a model saved by a quantized model's ``save_pretrained`` (see :func:`~diffaccel.quantization.quantize_`).

    ``model_cls`` is the diffusers class (e.g. ``FluxTransformer2DModel``); ``directory`` the local
    folder holding ``config.json``, :data:`QUANTIZATION_FILE` and the safetensors weights.
    ``torch_dtype`` casts the float parameters (not the quantized buffers), keeping the model's
    ``_keep_in_fp32_modules`` in float32 as diffusers does; ``device`` is where tensors are loaded.

    Example:
        >>> import tempfile, torch
        >>> from diffusers import PixArtTransformer2DModel
        >>> from diffaccel.testing import tiny_pipeline
        >>> from diffaccel.quantization import QuantizationConfig, quantize_
        >>> model = quantize_(tiny_pipeline("pixart-sigma").transformer, QuantizationConfig(min_weight_numel=0))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     model.save_pretrained(folder)
        ...     loaded = load_quantized(PixArtTransformer2DModel, folder, torch_dtype=torch.bfloat16)
        >>> loaded.proj_out.weight.dtype, loaded.transformer_blocks[0].attn1.to_q.weight_block_scale.dtype
        (torch.bfloat16, torch.float8_e4m3fn)
    """
    from accelerate import init_empty_weights

    directory = os.fspath(directory)
    plan = read_quantization_plan(directory)
    if plan is None:
        raise FileNotFoundError(f"{directory} has no {QUANTIZATION_FILE}: it was not saved from a quantized model")
    with init_empty_weights():  # parameters on the meta device; buffers (e.g. rotary tables) real
        model = model_cls.from_config(model_cls.load_config(directory))
    _supported_class(model)
    for name, layout in plan["layers"].items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{directory}: plan names {name!r}, which is a {type(linear).__name__}, not a Linear")
        layer = QuantizedLinear(
            linear.in_features,
            linear.out_features,
            layout["precision"],
            residual=layout["residual"],
            bias=linear.bias is not None,
            device="meta",
            impl=plan["config"]["impl"],
        )
        if layout.get("act_scale"):
            layer.act_scale = torch.empty((), device="meta")
        model.set_submodule(name, layer)
    state: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(directory):
        state.update(load_file(path, device=str(device)))
    if torch_dtype is not None:
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
        quantized_prefixes = tuple(name + "." for name in plan["layers"])
        for key, tensor in state.items():
            is_quantized_buffer = key.startswith(quantized_prefixes) and not key.endswith(".bias")
            if tensor.is_floating_point() and not is_quantized_buffer:
                keep_fp32 = torch_dtype == torch.float16 and bool(keep & set(key.split(".")))
                state[key] = tensor.to(torch.float32 if keep_fp32 else torch_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for name, layout in plan["layers"].items():
        model.get_submodule(name).refine = layout["refine"]
        model.get_submodule(name).fp4_activations = layout.get("fp4_activations", False)  # absent before 2026-12
    model.to(device)
    model.eval()
    record_plan(model, QuantizationConfig.from_dict(plan["config"]))
    return model
