"""diffaccel: make diffusers pipelines faster, smaller and steerable without forking them.

Example:
    >>> import diffaccel
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = diffaccel.accelerate(tiny_pipeline("sd"), diffaccel.EncoderReuseConfig("uniform:3"))
    >>> _ = pipe("a red circle", num_inference_steps=6, output_type="np")
    >>> pipe.acceleration_stats.features["encoder_reuse"].key_steps
    (0, 3)
    >>> pipe = diffaccel.restore(pipe)

The public names load on first use (PEP 562), so ``import diffaccel`` -- and the ``diffaccel``
command's argument parsing -- does not import torch or diffusers.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

#: Where each public name lives (relative to this package).
_LAZY_NAMES: dict[str, str] = {
    **dict.fromkeys(("AccelerationStats", "accelerate", "restore"), ".acceleration"),
    **dict.fromkeys(("DiffaccelError", "UnsupportedCombinationError", "UnsupportedPipelineError"), ".errors"),
    **dict.fromkeys(("DeltaCacheConfig", "DeltaCacheStats"), ".features.delta_cache"),
    **dict.fromkeys(("EncoderReuseConfig", "EncoderReuseStats"), ".features.encoder_reuse"),
    **dict.fromkeys(
        ("DynamicPrecisionConfig", "MemoryReport", "QuantizationConfig", "QuantizationStats", "QuantizedConv2d",
         "QuantizedLinear", "allocate_dynamic", "allocate_static", "calibrate", "load_quantized", "measure_sensitivity", "memory_report",
         "quantize_"),
        ".quantization",
    ),
    **dict.fromkeys(
        ("AdaptiveSchedule", "ExplicitSchedule", "FasterDiffusionSchedule", "UniformSchedule", "parse_schedule"),
        ".features.key_steps",
    ),
    **dict.fromkeys(("FKSteeringConfig", "FlowMatchSDEScheduler", "NoiseSearchConfig", "search", "steer"), ".steering"),
    **dict.fromkeys(
        ("QuantizedAttention", "QuantizedAttentionConfig", "remove_quantized_attention", "use_quantized_attention"),
        ".features.quantized_attention",
    ),
    "quantized_sdpa": ".kernels.quantized_attention",
    "evaluate": ".evaluation.driver",
    **dict.fromkeys(("PRESETS", "dit_preset", "preset_configs"), ".presets"),
}

#: Modules that need no torch: loading a name from them does not load the drop-in pipelines.
_LIGHT_MODULES = (".errors", ".features.key_steps")

__all__ = [
    "AccelerationStats",
    "AdaptiveSchedule",
    "DeltaCacheConfig",
    "DeltaCacheStats",
    "DiffaccelError",
    "DynamicPrecisionConfig",
    "EncoderReuseConfig",
    "EncoderReuseStats",
    "ExplicitSchedule",
    "FKSteeringConfig",
    "FasterDiffusionSchedule",
    "FlowMatchSDEScheduler",
    "MemoryReport",
    "NoiseSearchConfig",
    "PRESETS",
    "QuantizationConfig",
    "QuantizationStats",
    "QuantizedAttention",
    "QuantizedAttentionConfig",
    "QuantizedConv2d",
    "QuantizedLinear",
    "UniformSchedule",
    "UnsupportedCombinationError",
    "UnsupportedPipelineError",
    "accelerate",
    "allocate_dynamic",
    "allocate_static",
    "calibrate",
    "dit_preset",
    "evaluate",
    "load_quantized",
    "measure_sensitivity",
    "memory_report",
    "parse_schedule",
    "preset_configs",
    "quantize_",
    "quantized_sdpa",
    "remove_quantized_attention",
    "restore",
    "search",
    "steer",
    "use_quantized_attention",
]


def _register_drop_in_pipelines() -> None:
    """Import the drop-in classes (``diffaccel.pipelines``): importing them registers them, so
    ``accelerate()`` uses them for their base classes."""
    importlib.import_module(".pipelines", __name__)


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        module_name = _LAZY_NAMES[name]
        value = getattr(importlib.import_module(module_name, __name__), name)
        registers = module_name not in _LIGHT_MODULES
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # ``import diffaccel`` used to load them all
        registers = name == "acceleration"
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if registers:
        _register_drop_in_pipelines()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})
