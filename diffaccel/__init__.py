"""diffaccel: make diffusers pipelines faster, smaller and steerable without forking them.

Example:
    >>> import diffaccel
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = diffaccel.accelerate(tiny_pipeline("sd"), diffaccel.EncoderReuseConfig("uniform:3"))
    >>> _ = pipe("a red circle", num_inference_steps=6, output_type="np")
    >>> pipe.acceleration_stats.features["encoder_reuse"].key_steps
    (0, 3)
    >>> pipe = diffaccel.restore(pipe)
"""

from .acceleration import AccelerationStats, accelerate, restore
from .errors import DiffaccelError, UnsupportedCombinationError, UnsupportedPipelineError
from .features.delta_cache import DeltaCacheConfig, DeltaCacheStats
from .features.encoder_reuse import EncoderReuseConfig, EncoderReuseStats
from .quantization import (
    DynamicPrecisionConfig,
    MemoryReport,
    QuantizationConfig,
    QuantizationStats,
    QuantizedLinear,
    allocate_dynamic,
    allocate_static,
    calibrate,
    load_quantized,
    memory_report,
    quantize_,
)
from .features.key_steps import ExplicitSchedule, FasterDiffusionSchedule, UniformSchedule, parse_schedule
from .steering import FKSteeringConfig, FlowMatchSDEScheduler, NoiseSearchConfig, search, steer
from .attention import (
    QuantizedAttention,
    QuantizedAttentionConfig,
    remove_quantized_attention,
    use_quantized_attention,
)
from .kernels.quantized_attention import quantized_sdpa

# Importing the drop-in classes registers them, so accelerate() uses them for their base classes.
from . import pipelines as _pipelines  # noqa: E402,F401  (diffaccel.pipelines maps to ./pipelines)

__version__ = "0.1.0"

__all__ = [
    "AccelerationStats",
    "DeltaCacheConfig",
    "DeltaCacheStats",
    "DiffaccelError",
    "DynamicPrecisionConfig",
    "EncoderReuseConfig",
    "EncoderReuseStats",
    "ExplicitSchedule",
    "FKSteeringConfig",
    "FlowMatchSDEScheduler",
    "FasterDiffusionSchedule",
    "MemoryReport",
    "NoiseSearchConfig",
    "QuantizedAttention",
    "QuantizedAttentionConfig",
    "QuantizationConfig",
    "QuantizationStats",
    "QuantizedLinear",
    "UniformSchedule",
    "UnsupportedCombinationError",
    "UnsupportedPipelineError",
    "accelerate",
    "allocate_dynamic",
    "allocate_static",
    "calibrate",
    "load_quantized",
    "memory_report",
    "parse_schedule",
    "quantize_",
    "quantized_sdpa",
    "remove_quantized_attention",
    "restore",
    "search",
    "steer",
    "use_quantized_attention",
]
