"""Quantized Linear and Conv2d layers for diffusers denoisers: NVFP4 (W4A16, optionally nested),
INT8 (W8A8) and weight-only INT8 (W8A16).

* :class:`QuantizedLinear`: the drop-in Linear module (:mod:`.linear`); :class:`QuantizedConv2d`:
  the drop-in Conv2d (weight-only, :mod:`.conv`); the stored formats (:mod:`.formats`).
* :class:`QuantizationConfig`: which layer gets which format (:mod:`.config`); also a
  :func:`diffaccel.accelerate` feature (:mod:`.feature`).
* :func:`quantize_`: swap a model's Linear layers in place (:mod:`.quantize`).
* :func:`memory_report`: bits per weight and bytes against bf16 (:mod:`.report`);
  :func:`planned_memory`: the same for a plan, before quantizing (meta-device models too).
* :func:`load_quantized`: load what a quantized model's ``save_pretrained`` wrote (:mod:`.serialization`);
  :class:`QuantizationFileError` names a missing or broken plan file.
* What ``quantize_`` checks (:mod:`.safety`): weights it cannot quantize (refused by layer name,
  before anything is swapped), layers their precision would mostly zero (kept in a higher one per
  ``QuantizationConfig.fallback``), configs that quantize (almost) nothing (a warning).
* :func:`calibrate` / :class:`PrecisionPredictor`: 6Bit-Diffusion's sensitivity predictor;
  :func:`calibrate_activation_scales`: static INT8 activation scales (:mod:`.calibration`).
* :func:`measure_sensitivity` / :class:`LayerSensitivity`: each layer's measured output error per
  format (:mod:`.sensitivity`); :func:`allocate_static` with ``bits_per_weight=`` fills a memory
  budget from it (a :class:`BudgetAllocation`).
* :func:`allocate_static` / :func:`allocate_dynamic`: per-block INT8, or the nested residual per
  timestep band with :class:`DynamicPrecisionConfig` (:mod:`.allocation` makes it, :mod:`.dynamic` runs it).

Example:
    >>> import diffaccel, torch
    >>> from diffaccel.testing import tiny_pipeline
    >>> from diffaccel.quantization import QuantizationConfig, memory_report, quantize_
    >>> pipe = tiny_pipeline("pixart-sigma")
    >>> _ = quantize_(pipe.transformer, QuantizationConfig("int8", min_weight_numel=0))
    >>> memory_report(pipe.transformer).counts
    {'int8': 20, 'bf16': 6}
"""

from .allocation import BudgetAllocation, StaticAllocation, allocate_dynamic, allocate_static
from .calibration import CalibrationData, PrecisionPredictor, calibrate, calibrate_activation_scales, calibration_prompts
from .conv import CONV_PRECISIONS, QuantizedConv2d
from .config import CONFIG_PRECISIONS, SCOPES, DEFAULT_EXCLUDE, EMBEDDING_EXCLUDE, FALLBACKS, QuantizationConfig
from .dynamic import DynamicPrecisionConfig, DynamicPrecisionStats
from .feature import QuantizationFeature, QuantizationStats
from .linear import PRECISIONS, QuantizedLinear
from .plan import SUPPORTED_MODELS, is_quantized, quantized_layers
from .quantize import quantization_plan, quantize_
from .report import LayerMemory, MemoryReport, memory_report, planned_memory
from .sensitivity import SENSITIVITY_FORMATS, LayerSensitivity, measure_sensitivity
from .serialization import QUANTIZATION_FILE, QuantizationFileError, load_quantized

__all__ = [
    "BudgetAllocation",
    "LayerSensitivity",
    "SENSITIVITY_FORMATS",
    "measure_sensitivity",
    "CalibrationData",
    "DynamicPrecisionConfig",
    "DynamicPrecisionStats",
    "PrecisionPredictor",
    "StaticAllocation",
    "allocate_dynamic",
    "allocate_static",
    "calibrate",
    "calibrate_activation_scales",
    "calibration_prompts",
    "CONFIG_PRECISIONS",
    "CONV_PRECISIONS",
    "DEFAULT_EXCLUDE",
    "EMBEDDING_EXCLUDE",
    "FALLBACKS",
    "LayerMemory",
    "MemoryReport",
    "PRECISIONS",
    "QUANTIZATION_FILE",
    "QuantizationConfig",
    "QuantizationFeature",
    "QuantizationFileError",
    "QuantizationStats",
    "QuantizedConv2d",
    "QuantizedLinear",
    "SCOPES",
    "SUPPORTED_MODELS",
    "is_quantized",
    "load_quantized",
    "memory_report",
    "planned_memory",
    "quantization_plan",
    "quantize_",
    "quantized_layers",
]
