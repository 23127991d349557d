"""Quantized attention for diffusers models; the implementation lives in
:mod:`diffaccel.features.quantized_attention` (this module keeps ``diffaccel.attention.X`` working).

Example:
    >>> from diffaccel.attention import QuantizedAttentionConfig
    >>> QuantizedAttentionConfig().impl
    'auto'
"""

from .features.quantized_attention import (
    QuantizedAttention,
    QuantizedAttentionConfig,
    remove_quantized_attention,
    use_quantized_attention,
)

__all__ = ["QuantizedAttention", "QuantizedAttentionConfig", "remove_quantized_attention", "use_quantized_attention"]
