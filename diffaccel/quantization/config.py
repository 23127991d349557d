"""``QuantizationConfig``: which Linear (and Conv2d) layers of a denoiser get which weight format.

Per layer, in this order:

1. Only layers in the model's *scope* are considered. ``scope="blocks"`` (the default): every
   ``nn.Linear`` of a diffusers transformer; for a ``UNet2DConditionModel`` only those inside its
   transformer blocks (the ``attentions`` of the down/mid/up blocks), not the time embedding or the
   resnets. ``scope="all"``: every ``nn.Linear`` and ``nn.Conv2d`` of the model (a UNet's
   resnets and samplers hold most of its weights).
2. A layer matching an ``exclude`` pattern, or with fewer than ``min_weight_numel`` weights, stays
   as it is.
3. Otherwise the first ``overrides`` pattern that matches decides its precision, else ``precision``.

Precisions: ``"nvfp4"`` (4.5 bits per weight, W4A16; see :class:`~diffaccel.quantization.QuantizedLinear`),
``"nvfp4+residual"`` (nested NVFP4: 9 bits per weight, about 8-bit precision; the residual is
applied from the start, ``refine=False`` stores it for :class:`~diffaccel.quantization.DynamicPrecisionConfig`
to switch per step; ``residual=True`` makes every ``"nvfp4"`` layer nested), ``"int8"`` (W8A8: the
activations are quantized too, the format INT8 tensor cores run fast), ``"w8a16"`` (INT8 weights,
activations in their dtype: the better quality per byte; per channel, or per ``group_size`` input
columns) and ``"bf16"`` (leave the layer as it is). Convolutions are weight-only: a Conv2d planned
``"int8"`` gets ``"w8a16"``, one planned ``"nvfp4+residual"`` gets ``"nvfp4"``.

4. A layer whose weights would mostly round to zero in its precision (a few outliers push the
   other blocks' E4M3 scales below their smallest value: NVFP4 then zeroes whole blocks) is kept
   in a higher precision, as ``fallback`` says, with a warning naming it; see
   :mod:`diffaccel.quantization.safety`. Patterns are :func:`fnmatch.fnmatchcase` patterns on the module's qualified name
(``"transformer_blocks.0.attn.to_q"``).

The default ``exclude`` (:data:`DEFAULT_EXCLUDE`) keeps unquantized the layers that are small in
real models or sensitive to error, picked by reading the Flux, SD3, PixArt, Wan, CogVideoX, LTX
transformers and the UNet:

* ``*embed*``: time / text / guidance / pooled embeddings, ``context_embedder``, ``x_embedder``,
  ``patch_embed.*``, Wan's ``condition_embedder.*`` (incl. its ``time_proj``), LTX's ``time_embed.*``;
* ``*caption_proj*``: PixArt's and LTX's caption projections;
* ``*adaln*`` and ``*norm*``: adaLN modulation Linears (``norm1.linear``, ``norm1_context.linear``,
  ``norm.linear``, ``norm2.linear``, ``norm_out.linear``, PixArt's ``adaln_single.*``): they scale
  and shift every token, so their error is amplified. They are not small (about 27% of Flux.1's
  12B weights, 3.2B): pass ``exclude=EMBEDDING_EXCLUDE`` (or your own tuple) to quantize them too;
* ``*time_emb_proj*``: the UNet resnets' time projections (outside the UNet scope anyway);
* ``proj_in`` and ``proj_out``: the model-level input patch projection (LTX) and the final output
  projection (only the top-level modules: ``single_transformer_blocks.0.proj_out`` is quantized);
* ``conv_in`` and ``conv_out``: a UNet's first and last convolutions (``scope="all"``), tiny and
  the closest to the pixels.

Example:
    >>> config = QuantizationConfig("nvfp4", overrides={"*.ff.*": "int8"}, min_weight_numel=0)
    >>> config.overrides
    (('*.ff.*', 'int8'),)
    >>> QuantizationConfig.from_dict(config.to_dict()) == config
    True
    >>> config.precision_for("transformer_blocks.0.ff.net.2", 4096)
    'int8'
    >>> config.precision_for("transformer_blocks.0.norm1.linear", 4096)
    'bf16'
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Union

from ..features.base import FeatureConfig
from ..features.checks import check_bool, check_choice, check_int
from ..kernels._triton import IMPLS

#: Values of ``QuantizationConfig.precision`` and of its ``overrides``.
CONFIG_PRECISIONS: tuple[str, ...] = ("nvfp4", "nvfp4+residual", "int8", "w8a16", "bf16")

#: Values of ``QuantizationConfig.scope``.
SCOPES: tuple[str, ...] = ("blocks", "all")

#: Values of ``QuantizationConfig.fallback``.
FALLBACKS: tuple[str, ...] = ("auto", "int8", "bf16", "none")

#: The embedding and input/output projection patterns of :data:`DEFAULT_EXCLUDE`, without the norms.
EMBEDDING_EXCLUDE: tuple[str, ...] = (
    "*embed*",
    "*caption_proj*",
    "*time_emb_proj*",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
)

#: The default ``exclude``: embeddings and projections plus the adaLN / norm modulation Linears.
DEFAULT_EXCLUDE: tuple[str, ...] = EMBEDDING_EXCLUDE + ("*adaln*", "*norm*")

OverridesLike = Union[Mapping[str, str], Iterable[tuple[str, str]]]


@dataclass(frozen=True)
class QuantizationConfig(FeatureConfig, attach_order=10):
    """How :func:`~diffaccel.quantization.quantize_` quantizes a denoiser's Linear layers.

    Also a :func:`diffaccel.accelerate` feature (``name = "quantization"``) that quantizes the
    pipeline's ``transformer`` or ``unet``; see :mod:`diffaccel.quantization.feature`, whose
    :class:`~diffaccel.quantization.QuantizationFeature` attaches it (and loads a saved quantized
    denoiser back for ``from_pretrained``). Saved as JSON with ``overrides`` as a list of pairs.

    Args:
        precision: format of the eligible layers no override names: ``"nvfp4"``, ``"nvfp4+residual"``,
            ``"int8"``, ``"w8a16"`` or ``"bf16"``.
        overrides: ``{pattern: precision}`` (or ``(pattern, precision)`` pairs), first match wins;
            stored as a tuple of pairs so the config stays hashable.
        exclude: patterns of layers that stay unquantized (default :data:`DEFAULT_EXCLUDE`).
        min_weight_numel: layers with fewer weights stay unquantized (too small to gain).
        residual: store the nested NVFP4 residual on every nvfp4 layer;
            ``"nvfp4+residual"`` in ``overrides`` does it for chosen layers only.
        refine: whether nested layers apply their residual from the start (default True: a stored
            residual is used); False stores it unused until something switches
            ``QuantizedLinear.refine`` on (:class:`~diffaccel.quantization.DynamicPrecisionConfig`
            per timestep band: its ``quantization_config()`` sets False).
        fallback: what happens to a layer whose weights would mostly (over half of the nonzero
            ones) round to zero in its precision: ``"auto"`` (default: INT8 if INT8 keeps them,
            else unquantized), ``"int8"``, ``"bf16"`` (unquantized) or ``"none"`` (quantize it
            anyway). Every such layer is named in a warning and recorded in the plan
            (``model._diffaccel_quantization["fallbacks"]``) and in the stats.
        impl: kernel choice, ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"reference"``.
        fp4_activations: run the nvfp4 layers in W4A4 (activations quantized to NVFP4 per call) on
            Blackwell's FP4 tensor cores (the reference elsewhere); costs accuracy, off by default.
        scope: ``"blocks"`` (default: a UNet's attention Linears, a transformer's every Linear) or
            ``"all"`` (every Linear and Conv2d of the model).
        group_size: the ``"w8a16"`` layers' scale groups (input columns per scale; None, the
            default: one scale per output channel); a config with no ``"w8a16"`` precision warns that it does nothing.

    Example:
        >>> QuantizationConfig(precision="fp8")
        Traceback (most recent call last):
        ...
        ValueError: QuantizationConfig.precision must be one of ('nvfp4', 'nvfp4+residual', 'int8', 'w8a16', 'bf16'), got 'fp8'
    """

    name = "quantization"

    precision: str = "nvfp4"
    overrides: OverridesLike = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    min_weight_numel: int = 16384
    residual: bool = False
    impl: str = "auto"
    fp4_activations: bool = False
    refine: bool = True
    fallback: str = "auto"
    scope: str = "blocks"
    group_size: int | None = None

    def __post_init__(self) -> None:
        check_choice("QuantizationConfig", "precision", self.precision, CONFIG_PRECISIONS)
        pairs = tuple(self.overrides.items()) if isinstance(self.overrides, Mapping) else self.overrides
        try:
            pairs = tuple((pattern, value) for pattern, value in pairs)
        except (TypeError, ValueError):
            raise ValueError(
                "QuantizationConfig.overrides must be a mapping {pattern: precision} or (pattern, precision) "
                f"pairs, got {self.overrides!r}"
            ) from None
        for pattern, value in pairs:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"QuantizationConfig.overrides patterns must be non-empty strings, got {pattern!r}")
            if value not in CONFIG_PRECISIONS:
                raise ValueError(
                    f"QuantizationConfig.overrides[{pattern!r}] must be one of {CONFIG_PRECISIONS}, got {value!r}"
                )
        object.__setattr__(self, "overrides", pairs)
        if isinstance(self.exclude, str):
            raise ValueError(f"QuantizationConfig.exclude must be a tuple of patterns, got the string {self.exclude!r}")
        exclude = tuple(self.exclude)
        if not all(isinstance(p, str) and p for p in exclude):
            raise ValueError(f"QuantizationConfig.exclude must hold non-empty strings, got {exclude!r}")
        object.__setattr__(self, "exclude", exclude)
        check_int("QuantizationConfig", "min_weight_numel", self.min_weight_numel, minimum=0)
        for name in ("residual", "fp4_activations", "refine"):
            check_bool("QuantizationConfig", name, getattr(self, name))
        check_choice("QuantizationConfig", "impl", self.impl, IMPLS)
        check_choice("QuantizationConfig", "fallback", self.fallback, FALLBACKS)
        check_choice("QuantizationConfig", "scope", self.scope, SCOPES)
        check_int("QuantizationConfig", "group_size", self.group_size, minimum=1, optional=True)
        if self.group_size is not None and "w8a16" not in (self.precision, *(value for _, value in pairs)):
            warnings.warn(f"QuantizationConfig.group_size={self.group_size} does nothing: no layer of this config is "
                          "'w8a16', the only format with scale groups", UserWarning, stacklevel=3)

    @property
    def quantizes_anything(self) -> bool:
        """Whether some precision of this config is not ``"bf16"`` (an all-bf16 config leaves every layer as is).

        Example:
            >>> QuantizationConfig("bf16").quantizes_anything
            False
            >>> QuantizationConfig("bf16", overrides={"*.ff.*": "int8"}).quantizes_anything
            True
        """
        return any(p != "bf16" for p in (self.precision, *(value for _, value in self.overrides)))

    def skip_reason(self, name: str, weight_numel: int) -> str | None:
        """Why the layer ``name`` stays unquantized whatever its precision: ``"exclude"``, ``"min_weight_numel"`` or None.

        Example:
            >>> QuantizationConfig().skip_reason("blocks.0.attn1.to_q", 100)
            'min_weight_numel'
            >>> QuantizationConfig().skip_reason("proj_out", 10**6), QuantizationConfig().skip_reason("blocks.0.ffn", 10**6)
            ('exclude', None)
        """
        if any(fnmatchcase(name, pattern) for pattern in self.exclude):
            return "exclude"
        return "min_weight_numel" if weight_numel < self.min_weight_numel else None

    def precision_for(self, name: str, weight_numel: int) -> str:
        """The precision of the in-scope Linear ``name`` with ``weight_numel`` weights (``"bf16"``: untouched).

        ``"nvfp4"`` comes out as ``"nvfp4+residual"`` when ``residual`` is set.

        Example:
            >>> QuantizationConfig().precision_for("blocks.0.attn1.to_q", 100)   # below min_weight_numel
            'bf16'
            >>> QuantizationConfig(residual=True).precision_for("blocks.0.attn1.to_q", 10**6)
            'nvfp4+residual'
        """
        if self.skip_reason(name, weight_numel) is not None:
            return "bf16"
        precision = next((value for pattern, value in self.overrides if fnmatchcase(name, pattern)), self.precision)
        return "nvfp4+residual" if precision == "nvfp4" and self.residual else precision
