"""Save a quantized model once, load it without re-quantizing: safetensors plus a JSON plan.

:func:`~diffaccel.quantization.quantize_` makes the model's ``save_pretrained`` (diffusers'
``ModelMixin.save_pretrained``, which saves ``state_dict()`` with safetensors, the quantized
buffers included) also write :data:`QUANTIZATION_FILE` beside ``config.json``: the config and, per
quantized layer, its layout (precision, residual, refine, static activation scale, FP4 activations).
``safe_serialization=False`` is refused: quantized weights are saved with safetensors only.

``config.json`` also gets a ``quantization_config`` entry (:func:`quantization_config_entry`), the
way diffusers records torchao / quanto models: its ``quant_method`` is no diffusers quantizer, so
the plain diffusers class (``WanTransformer3DModel.from_pretrained``, ``DiffusionPipeline.from_pretrained``)
refuses the folder with an error whose text says how to load it, before reading any weight,
instead of loading float layers without weights.

:func:`load_quantized` rebuilds the architecture from ``config.json`` without allocating its
float weights, swaps in empty :class:`~diffaccel.quantization.QuantizedLinear` layers per the plan
and loads every tensor from the safetensors file(s) (sharded checkpoints included) into fresh,
allocator-aligned storage (not views of the memory-mapped file, whose alignment changes which CPU
kernels run); nothing is re-quantized and nothing is unpickled, so outputs are bit-identical to
the saved model's.

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
from typing import Any, Mapping, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import DiffaccelError
from .config import QuantizationConfig
from .conv import CONV_GEOMETRY, QuantizedConv2d
from .linear import QuantizedLinear
from .plan import PLAN_ATTR, plan_of, quantized_layers, supported_class

#: The plan file written beside a quantized model's ``config.json``.
QUANTIZATION_FILE = "diffaccel_quantization.json"
_FORMAT_VERSION = 1

#: Names of the safetensors keys only quantized layers hold.
_QUANTIZED_KEY_SUFFIXES = (".weight_packed", ".weight_int8")


class QuantizationFileError(DiffaccelError, ValueError):
    """A saved quantized model's files are missing or unreadable; the message names the file."""

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
    plan = plan_of(model)
    layers = {name: module.layout() for name, module in quantized_layers(model).items()}
    return {"format_version": _FORMAT_VERSION, "config": plan["config"].to_dict(), "layers": layers,
            "fallbacks": dict(plan.get("fallbacks", {}))}


def quantization_config_entry(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` a quantized model's ``save_pretrained`` adds to its ``config.json``.

    diffusers' ``from_pretrained`` refuses an unknown ``quant_method`` with ``ValueError("Unknown
    quantization type, got <quant_method> - supported types are: [...]")``, before loading any
    weight; the ``quant_method`` here is the sentence that says how to load the folder.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> entry = quantization_config_entry(tiny_pipeline("wan").transformer)
        >>> entry["quant_method"].startswith("diffaccel"), entry["plan"]
        (True, 'diffaccel_quantization.json')
    """
    name = type(model).__name__
    how = (
        f"diffaccel (quantized by diffaccel, not a diffusers quantizer: load this model with "
        f"diffaccel.load_quantized({name}, folder), a pipeline holding it with "
        "diffaccel.acceleration.accelerated_class(PipelineClass).from_pretrained(pipeline_folder), or pass "
        "the model loaded by load_quantized to the plain pipeline's from_pretrained as a component)"
    )
    return {"quant_method": how, "plan": QUANTIZATION_FILE, "format_version": _FORMAT_VERSION}


def _is_diffaccel_entry(entry: Any) -> bool:
    return isinstance(entry, Mapping) and str(entry.get("quant_method", "")).startswith("diffaccel")


def _add_quantization_config(directory: str, model: nn.Module) -> None:
    from diffusers.utils import CONFIG_NAME

    path = os.path.join(directory, CONFIG_NAME)
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["quantization_config"] = quantization_config_entry(model)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def record_plan(model: nn.Module, config: QuantizationConfig, fallbacks: Mapping[str, str] | None = None) -> None:
    """Record ``config`` and the model's quantized layers on it and make ``save_pretrained`` keep them.

    ``fallbacks`` maps the layers kept in a higher precision than planned to that precision (see
    :mod:`~diffaccel.quantization.safety`). :func:`~diffaccel.quantization.quantize_` calls it;
    call it yourself after swapping in :class:`QuantizedLinear` layers by hand.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> from diffaccel.quantization import QuantizationConfig, QuantizedLinear
        >>> from diffaccel.quantization.plan import plan_of
        >>> model = tiny_pipeline("wan").transformer
        >>> model.blocks[0].ffn.net[2] = QuantizedLinear.from_linear(model.blocks[0].ffn.net[2], "int8")
        >>> record_plan(model, QuantizationConfig("int8"))
        >>> list(plan_of(model)["layers"]), plan_of(model)["fallbacks"]
        (['blocks.0.ffn.net.2'], {})
    """
    layers = {name: module.layout() for name, module in quantized_layers(model).items()}
    setattr(model, PLAN_ATTR, {"config": config, "layers": layers, "fallbacks": dict(fallbacks or {})})
    install_save_pretrained(model)


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
            _add_quantization_config(os.fspath(save_directory), self)

    model.save_pretrained = types.MethodType(save_pretrained, model)


def read_quantization_plan(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The plan saved in ``directory`` (``None`` when it holds no :data:`QUANTIZATION_FILE`).

    Raises :class:`QuantizationFileError` naming the file when it is not valid JSON or not a plan.

    Example:
        >>> read_quantization_plan("/nonexistent") is None
        True
    """
    path = os.path.join(os.fspath(directory), QUANTIZATION_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            plan = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QuantizationFileError(
            f"{path} is not valid JSON ({error}); restore the file saved with the model or re-save the quantized model"
        ) from None
    if not isinstance(plan, dict) or plan.get("format_version") != _FORMAT_VERSION:
        found = plan.get("format_version") if isinstance(plan, dict) else type(plan).__name__
        raise QuantizationFileError(f"{path}: unknown format_version {found!r}, expected {_FORMAT_VERSION}")
    if not isinstance(plan.get("config"), dict) or not isinstance(plan.get("layers"), dict):
        raise QuantizationFileError(f"{path} is not a quantization plan: it needs 'config' and 'layers' objects")
    return plan


def holds_quantized_weights(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a model saved quantized: its ``config.json`` has the diffaccel
    ``quantization_config``, or its safetensors hold quantized layers' tensors.

    Example:
        >>> holds_quantized_weights("/nonexistent")
        False
    """
    from diffusers.utils import CONFIG_NAME

    directory = os.fspath(directory)
    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as handle:
            if _is_diffaccel_entry(json.load(handle).get("quantization_config")):
                return True
    except (OSError, ValueError, AttributeError):
        pass
    try:
        files = _safetensors_files(directory)
    except (FileNotFoundError, ValueError, KeyError):
        return False
    for path in files:
        with safe_open(path, "pt") as handle:
            if any(key.endswith(_QUANTIZED_KEY_SUFFIXES) for key in handle.keys()):
                return True
    return False


def saved_plan(directory: str | os.PathLike) -> dict[str, Any] | None:
    """:func:`read_quantization_plan`, but a folder that holds quantized weights without its plan
    raises :class:`QuantizationFileError` naming the missing file (``None``: not a quantized model).

    Example:
        >>> saved_plan("/nonexistent") is None
        True
    """
    plan = read_quantization_plan(directory)
    if plan is None and holds_quantized_weights(directory):
        directory = os.fspath(directory)
        raise QuantizationFileError(
            f"{os.path.join(directory, QUANTIZATION_FILE)} is missing, but {directory} holds quantized weights: the "
            "plan of its quantized layers is needed to load them; restore the file saved with the model or re-save it"
        )
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


def _target_dtype(key: str, tensor: torch.Tensor, quantized: tuple[str, ...], keep: set[str],
                  torch_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a loaded tensor gets: ``torch_dtype`` for float parameters, not quantized buffers."""
    is_quantized_buffer = key.startswith(quantized) and not key.endswith(".bias")
    if torch_dtype is None or not tensor.is_floating_point() or is_quantized_buffer:
        return tensor.dtype
    keep_fp32 = torch_dtype == torch.float16 and bool(keep & set(key.split(".")))
    return torch.float32 if keep_fp32 else torch_dtype


def _load_state(directory: str, plan: dict[str, Any], model: nn.Module, *, torch_dtype: torch.dtype | None,
                device: str | torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file(s), copied into fresh storage on ``device``.

    ``load_file`` hands out views of the memory-mapped file: their addresses follow the file's
    layout (8-byte aligned at best), not the allocator's 64-byte alignment, and CPU matmul kernels
    pick their code path (so their rounding) by alignment. Copying each tensor into its own
    allocation makes a loaded model compute bit-identically to the one that was saved.
    """
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    quantized = tuple(name + "." for name in plan["layers"])
    state: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(directory):
        for key, tensor in load_file(path).items():
            dtype = _target_dtype(key, tensor, quantized, keep, torch_dtype)
            state[key] = tensor.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return state


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
    plan = saved_plan(directory)
    if plan is None:
        raise FileNotFoundError(f"{directory} has no {QUANTIZATION_FILE}: it was not saved from a quantized model")
    config = model_cls.load_config(directory)
    if _is_diffaccel_entry(config.get("quantization_config")):
        config = {key: value for key, value in config.items() if key != "quantization_config"}  # save writes it anew
    with init_empty_weights():  # parameters on the meta device; buffers (e.g. rotary tables) real
        model = model_cls.from_config(config)
    supported_class(model)
    for name, layout in plan["layers"].items():
        model.set_submodule(name, _empty_layer(directory, name, model.get_submodule(name), layout, plan["config"]))
    state = _load_state(directory, plan, model, torch_dtype=torch_dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    for name, layout in plan["layers"].items():
        if layout.get("kind", "linear") == "linear":
            model.get_submodule(name).refine = layout["refine"]
            model.get_submodule(name).fp4_activations = layout.get("fp4_activations", False)  # absent before 2026-12
    model.to(device)
    model.eval()
    record_plan(model, _saved_config(directory, plan), plan.get("fallbacks"))
    return model


def _empty_layer(directory: str, name: str, float_layer: nn.Module, layout: dict[str, Any],
                 config: dict[str, Any]) -> QuantizedLinear | QuantizedConv2d:
    """The empty quantized layer (on the meta device) the plan's ``layout`` names for ``float_layer``."""
    kind = layout.get("kind", "linear")  # plans before 2026-12 hold Linear layers only
    expected = {"linear": nn.Linear, "conv2d": nn.Conv2d}.get(kind)
    if expected is None or not isinstance(float_layer, expected):
        raise ValueError(f"{directory}: plan names {name!r} as a {kind} layer, but it is a {type(float_layer).__name__}")
    impl = config.get("impl", "auto")
    if kind == "conv2d":
        geometry = {key: getattr(float_layer, key) for key in CONV_GEOMETRY}
        return QuantizedConv2d(geometry, layout["precision"], bias=float_layer.bias is not None, device="meta",
                               impl=impl, group_size=layout.get("group_size"))
    layer = QuantizedLinear(
        float_layer.in_features,
        float_layer.out_features,
        layout["precision"],
        residual=layout["residual"],
        bias=float_layer.bias is not None,
        device="meta",
        impl=impl,
        group_size=layout.get("group_size"),
    )
    if layout.get("act_scale"):
        layer.act_scale = torch.empty((), device="meta")
    return layer


def _saved_config(directory: str, plan: dict[str, Any]) -> QuantizationConfig:
    try:
        return QuantizationConfig.from_dict(plan["config"])
    except (TypeError, ValueError) as error:
        raise QuantizationFileError(f"{os.path.join(directory, QUANTIZATION_FILE)}: its config is not valid: {error}") from None
