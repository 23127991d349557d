"""Quantization as a :func:`diffaccel.accelerate` feature: ``accelerate(pipe, QuantizationConfig(...))``.

Attaching quantizes the pipeline's denoiser (``pipe.transformer`` or ``pipe.unet``) with
:func:`~diffaccel.quantization.quantize_`. A denoiser that is already quantized with the same
config (e.g. loaded back by ``from_pretrained``, or shared through ``from_pipe``) is used as is,
without re-quantizing; one quantized with a different config is refused.

**Detaching does not undo quantization** (``diffaccel.restore(pipe)``, or ``accelerate`` with
other features): the denoiser keeps its quantized layers, since keeping the float weights
around to put back would cost the memory quantization saves. Reload the pipeline to get the
float model back. Each call reports a :class:`QuantizationStats` in
``pipe.acceleration_stats.features["quantization"]``.

Saving: ``pipe.save_pretrained(folder)`` writes the quantized denoiser (safetensors plus its plan)
and ``diffaccel_config.json``; the accelerated class's ``from_pretrained(folder)`` loads the
denoiser back through :func:`~diffaccel.quantization.load_quantized` (no re-quantizing).

Example:
    >>> import diffaccel
    >>> from diffaccel.testing import tiny_pipeline
    >>> from diffaccel.quantization import QuantizationConfig
    >>> pipe = diffaccel.accelerate(tiny_pipeline("sd3"), QuantizationConfig(min_weight_numel=0))
    >>> _ = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="latent")
    >>> stats = pipe.acceleration_stats.features["quantization"]
    >>> stats.layers, stats.ratio < 0.7
    ({'bf16': 11, 'nvfp4': 21}, True)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from torch import nn

from ..errors import UnsupportedPipelineError
from ..features.base import AttachedFeature
from ..seams import DENOISER_ATTRIBUTES, denoiser
from .config import QuantizationConfig
from .plan import is_quantized, plan_of, quantized_layers
from .quantize import quantize_
from .report import memory_report
from .serialization import load_quantized, saved_plan


@dataclass(frozen=True)
class QuantizationStats:
    """Weight storage of the quantized denoiser during one call.

    ``nbytes`` / ``bf16_nbytes`` / ``ratio`` / ``bits_per_weight`` as in
    :class:`~diffaccel.quantization.MemoryReport`; ``layers`` counts Linear layers per precision;
    ``refined`` counts nested layers whose residual was on (``refine``) at the end of the call;
    ``quantized`` counts the quantized Linear layers and ``quantized_fraction`` is their share of
    the Linear weights (0 and 0.0: the config quantized nothing); ``fallbacks`` names the layers
    kept in a higher precision than planned (their weights would mostly round to zero) and the
    precision they got.
    """

    nbytes: int
    bf16_nbytes: int
    ratio: float
    bits_per_weight: float
    layers: dict[str, int] = field(default_factory=dict)
    refined: int = 0
    quantized: int = 0
    quantized_fraction: float = 0.0
    fallbacks: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON reports."""
        return asdict(self)

    def summary(self) -> str:
        """The weight storage against bf16 and the layers per precision, as the ``diffaccel`` commands
        print it.

        Example:
            >>> QuantizationStats(1_000_000, 3_000_000, 1 / 3, 5.33, {"nvfp4": 4, "bf16": 1}).summary()
            'quantized weights: 1.00 MB vs 3.00 MB in bf16 (5.33 bits per weight; Linear layers: 1 bf16, 4 nvfp4)'
        """
        layers = ", ".join(f"{count} {precision}" for precision, count in sorted(self.layers.items()))
        return (f"quantized weights: {self.nbytes / 1e6:.2f} MB vs {self.bf16_nbytes / 1e6:.2f} MB in bf16 "
                f"({self.bits_per_weight:.2f} bits per weight; Linear layers: {layers})")


class QuantizationFeature(AttachedFeature, config=QuantizationConfig):
    """The attached quantization feature: reports storage per call; detaching leaves the denoiser quantized.

    Example:
        >>> import diffaccel
        >>> from diffaccel.testing import tiny_pipeline
        >>> pipe = diffaccel.accelerate(tiny_pipeline("wan"), QuantizationConfig("int8", min_weight_numel=0))
        >>> type(diffaccel.restore(pipe).transformer.blocks[0].attn1.to_q).__name__
        'QuantizedLinear'
    """

    def __init__(self, config: QuantizationConfig, model: nn.Module) -> None:
        self.config = config
        self.model = model

    @classmethod
    def attach(cls, config: QuantizationConfig, pipe: Any) -> QuantizationFeature:
        """Quantize ``pipe``'s denoiser per ``config`` (or adopt it if already quantized with ``config``)."""
        model = denoiser(pipe)
        if is_quantized(model):
            existing = plan_of(model)["config"]
            if existing != config:
                raise ValueError(
                    f"the denoiser is already quantized with {existing}; it cannot be re-quantized with "
                    f"{config}: reload the pipeline first"
                )
        else:
            quantize_(model, config)
        return cls(config, model)

    @classmethod
    def pretrained_components(
        cls, config: QuantizationConfig, path: str, load_kwargs: Mapping[str, Any]
    ) -> dict[str, nn.Module]:
        """The saved quantized denoiser of ``path``, if any (:func:`load_quantized_components`):
        ``from_pretrained`` loads it back without re-quantizing."""
        return load_quantized_components(path, load_kwargs)

    def end_call(self) -> QuantizationStats:
        """What the denoiser stores now."""
        report = memory_report(self.model)
        return QuantizationStats(
            nbytes=report.nbytes,
            bf16_nbytes=report.bf16_nbytes,
            ratio=report.ratio,
            bits_per_weight=report.bits_per_weight,
            layers=dict(sorted(report.counts.items())),
            refined=sum(m.refine for m in quantized_layers(self.model).values()),
            quantized=report.quantized_layers,
            quantized_fraction=report.quantized_fraction,
            fallbacks=dict(plan_of(self.model).get("fallbacks", {})),
        )


def load_quantized_components(path: str | os.PathLike, load_kwargs: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The quantized denoiser saved in pipeline folder ``path``, as ``from_pretrained`` component kwargs.

    Empty when ``path`` is not a local folder, holds no quantized denoiser, or ``load_kwargs``
    already passes that component. ``torch_dtype`` in ``load_kwargs`` is honoured. A denoiser
    folder that holds quantized weights without its plan raises
    :class:`~diffaccel.quantization.serialization.QuantizationFileError` naming the missing file.

    Example:
        >>> load_quantized_components("/nonexistent", {})
        {}
    """
    import diffusers

    index_path = os.path.join(os.fspath(path), "model_index.json")
    if not os.path.isfile(index_path):
        return {}
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    for attr in DENOISER_ATTRIBUTES:
        folder = os.path.join(os.fspath(path), attr)
        if attr not in index or attr in load_kwargs or saved_plan(folder) is None:
            continue
        library, class_name = index[attr]
        if library != "diffusers":
            raise UnsupportedPipelineError(f"{folder}: quantized {attr} of library {library!r}; only diffusers models load")
        dtype = load_kwargs.get("torch_dtype")
        if isinstance(dtype, Mapping):
            dtype = dtype.get(attr, dtype.get("default"))
        return {attr: load_quantized(getattr(diffusers, class_name), folder, torch_dtype=dtype)}
    return {}
