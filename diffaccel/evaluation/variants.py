"""Variants for ``diffaccel eval``: ``NAME=SPEC`` strings parsed into what each variant attaches.

A SPEC is ``none`` (the untouched pipeline), diffaccel parts joined by ``+``, or one peer:

* diffaccel parts (built with the real config classes, so their own checks run):
  ``encoder-reuse:SCHEDULE`` (``faster-diffusion``, ``uniform:N``, ``adaptive:T``, ``all``, ``0,1,5``;
  deep reuse with ``,shallow_layers=1``), ``preset:fast|balanced|quality`` (the UNet presets of
  :mod:`diffaccel.presets`), ``dit-preset:fast|balanced|quality`` (its transformer presets),
  ``delta-cache:THRESHOLD``, a :class:`~diffaccel.QuantizationConfig` precision (``nvfp4``,
  ``nvfp4+residual``, ``int8``, ``w8a16``), ``quantization-file:PATH`` (a ``QuantizationConfig``
  saved as JSON, e.g. a budget allocation's), ``quantized-attention``; e.g.
  ``encoder-reuse:uniform:2+delta-cache:0.05``; each may end in ``,key=value`` options, the int,
  float and bool fields of its config (``delta-cache:0.2,max_consecutive_skips=4``,
  ``int8:min_weight_numel=0``) and, for the precisions, the string fields too (``w8a16:scope=all``);
* steering, at most one part, joinable with diffaccel parts (``encoder-reuse:uniform:2+fk:particles=4``):
  ``fk:particles=K[,key=value,...]`` (the fields of :class:`~diffaccel.FKSteeringConfig`, e.g.
  ``potential=max,lmbda=10,resample_every=2,resample_start=12``), ``best-of:N`` (N samples, the
  reward's best kept: FK without resampling) and ``search:METHOD[,key=value,...]`` (a
  :class:`~diffaccel.NoiseSearchConfig`, e.g. ``search:zero-order,budget_nfe=400``); the reward is the run's;
* peers: ``deepcache:interval=N[,branch=B]``, ``diffusers-cache:KIND[:key=value,...]`` (``KIND``:
  FirstBlockCache, TaylorSeer, MagCache, FasterCache, PyramidAttentionBroadcast; keys are the
  numeric and boolean fields of its diffusers config, e.g. ``FirstBlockCacheConfig.threshold``), ``cache-dit[:key=value,...]``,
  ``tomesd:ratio=R``, ``quanto:int8|int4|float8``, ``torchao:int8wo|int8dq|int4wo``.

:func:`parse_variants` always puts the untouched variant ``untouched=none`` first. A spec that does
not parse raises :class:`VariantSpecError` naming the variant and listing what is accepted;
:func:`check_variant_applies` refuses a variant the model's denoiser cannot take and
:func:`missing_peer_packages` names the peers whose package is not installed, so a caller can refuse
all of it before any model work.

Example:
    >>> variant = parse_variant("fast=encoder-reuse:uniform:2+delta-cache:0.05")
    >>> [type(config).__name__ for config in variant.configs]
    ['EncoderReuseConfig', 'DeltaCacheConfig']
    >>> parse_variant("dc=deepcache:interval=3").peer_options
    mappingproxy({'interval': 3, 'branch': 0})
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import diffusers.hooks

from ..errors import DiffaccelError
from ..features.base import FeatureConfig
from ..features.delta_cache import DeltaCacheConfig
from ..features.encoder_reuse import EncoderReuseConfig
from ..presets import dit_preset, unet_preset
from ..features.quantized_attention import QuantizedAttentionConfig
from ..quantization.config import CONFIG_PRECISIONS, QuantizationConfig
from ..steering.fk import FKSteeringConfig
from ..steering.searcher import SEARCH_METHODS, NoiseSearchConfig

#: The name and spec of the variant every evaluation runs first.
UNTOUCHED = "untouched"

#: The weight precisions a spec may name (those of ``QuantizationConfig`` that quantize something).
PRECISIONS: tuple[str, ...] = tuple(p for p in CONFIG_PRECISIONS if QuantizationConfig(p).quantizes_anything)

#: The diffaccel parts of a spec, with what follows their name.
DIFFACCEL_PARTS: tuple[str, ...] = (
    "encoder-reuse:SCHEDULE",
    "delta-cache:THRESHOLD",
    *PRECISIONS,
    "quantization-file:PATH",
    "quantized-attention",
    "preset:NAME",
    "dit-preset:NAME",
)

#: The steering parts of a spec (at most one, joinable with diffaccel parts), as written.
STEERING_PARTS: tuple[str, ...] = (
    "fk:particles=K[,key=value,...]",
    "best-of:N",
    "search:METHOD[,key=value,...]",
)

#: The peer specs, as written.
PEERS: tuple[str, ...] = (
    "deepcache:interval=N[,branch=B]",
    "diffusers-cache:KIND[:key=value,...]",
    "cache-dit[:key=value,...]",
    "tomesd:ratio=R",
    "quanto:int8|int4|float8",
    "torchao:int8wo|int8dq|int4wo",
)

#: The kinds of diffusers' ``enable_cache`` hooks, with their config class in ``diffusers.hooks``.
DIFFUSERS_CACHE_KINDS: dict[str, str] = {
    "FirstBlockCache": "FirstBlockCacheConfig",
    "TaylorSeer": "TaylorSeerCacheConfig",
    "MagCache": "MagCacheConfig",
    "FasterCache": "FasterCacheConfig",
    "PyramidAttentionBroadcast": "PyramidAttentionBroadcastConfig",
}

#: cache-dit's DBCache options a spec may set, with their types.
CACHE_DIT_OPTIONS: dict[str, type] = {
    "Fn_compute_blocks": int,
    "Bn_compute_blocks": int,
    "residual_diff_threshold": float,
    "max_warmup_steps": int,
    "max_cached_steps": int,
    "max_continuous_cached_steps": int,
}

QUANTO_WEIGHTS: tuple[str, ...] = ("int8", "int4", "float8")
TORCHAO_CONFIGS: tuple[str, ...] = ("int8wo", "int8dq", "int4wo")

#: The module each peer needs (checked with ``importlib.util.find_spec``).
PEER_PACKAGES: dict[str, str] = {
    "deepcache": "DeepCache",
    "cache-dit": "cache_dit",
    "tomesd": "tomesd",
    "quanto": "optimum.quanto",
    "torchao": "torchao",
}

#: Denoiser kinds :func:`check_variant_applies` knows.
DENOISER_KINDS: tuple[str, ...] = ("unet", "transformer")

#: Which denoiser kind each config class or peer needs; absent: any.
_NEEDS: dict[Union[type, str], str] = {
    EncoderReuseConfig: "unet",
    "deepcache": "unet",
    "tomesd": "unet",
    "diffusers-cache": "transformer",
    "cache-dit": "transformer",
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class VariantSpecError(DiffaccelError, ValueError):
    """A variant spec does not parse, names an unknown feature, peer or option, or does not apply to the model."""


@dataclass(frozen=True)
class Variant:
    """One evaluated variant: its name (a folder name in the run folder), its spec as written, and
    either the diffaccel configs it attaches or the peer it runs (``peer`` and read-only ``peer_options``).

    Example:
        >>> Variant("untouched", "none").untouched
        True
        >>> parse_variant("q=quanto:int4").peer, dict(parse_variant("q=quanto:int4").peer_options)
        ('quanto', {'weights': 'int4'})
    """

    name: str
    spec: str
    configs: tuple[FeatureConfig, ...] = ()
    peer: str | None = None
    peer_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    steering: Union[FKSteeringConfig, NoiseSearchConfig, None] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise _error(
                str(self.name), self.spec,
                "a variant name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        if (self.configs or self.steering is not None) and self.peer is not None:
            raise _error(self.name, self.spec, "a variant attaches diffaccel configs or runs a peer, not both")
        object.__setattr__(self, "configs", tuple(self.configs))
        object.__setattr__(self, "peer_options", MappingProxyType(dict(self.peer_options)))

    @property
    def untouched(self) -> bool:
        """Whether the variant attaches nothing."""
        return not self.configs and self.peer is None and self.steering is None

    @property
    def kind(self) -> str:
        """``"untouched"``, ``"steering"`` (FK, best-of-N or a search, maybe on accelerated
        features), ``"peer"`` or ``"diffaccel"``."""
        if self.untouched:
            return "untouched"
        return "steering" if self.steering is not None else "peer" if self.peer else "diffaccel"


def _error(name: str, spec: str, why: str) -> VariantSpecError:
    return VariantSpecError(f"variant {name!r} ({spec!r}): {why}")


def _accepted() -> str:
    return (f"accepted: 'none', diffaccel parts joined by '+' {DIFFACCEL_PARTS} with at most one steering part "
            f"{STEERING_PARTS}, or one peer {PEERS}")


def _value(text: str, kind: type) -> Any:
    """``text`` as a ``kind`` (int, float or bool); raises ``ValueError``."""
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    value = kind(text)
    if kind is float and not math.isfinite(value):
        raise ValueError(text)
    return value


def _options(name: str, spec: str, text: str, allowed: Mapping[str, type]) -> dict[str, Any]:
    """``key=value,...`` parsed against ``allowed`` (key -> type)."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise _error(name, spec, f"expected key=value, got {item!r}")
        if key not in allowed:
            raise _error(name, spec, f"unknown option {key!r}; accepted: {sorted(allowed)}")
        if key in options:
            raise _error(name, spec, f"option {key!r} given twice")
        try:
            options[key] = _value(raw.strip(), allowed[key])
        except ValueError:
            raise _error(name, spec, f"option {key!r} must be {allowed[key].__name__}, got {raw.strip()!r}") from None
    return options


def _scalar_type(annotation: Any) -> type | None:
    """int, float or bool for a field annotated so (``X | None`` included); None for anything else."""
    if annotation in (int, float, bool):
        return annotation
    text = str(annotation).replace("<class '", "").replace("'>", "").replace(" | None", "")
    return {"int": int, "float": float, "bool": bool}.get(text)


def _diffusers_cache_options(kind: str) -> dict[str, type]:
    config = getattr(diffusers.hooks, DIFFUSERS_CACHE_KINDS[kind])
    fields = ((f.name, _scalar_type(f.type)) for f in dataclasses.fields(config) if not f.name.startswith("_"))
    return {name: kind for name, kind in fields if kind is not None}


def _choice(name: str, spec: str, peer: str, arg: str, choices: tuple[str, ...]) -> str:
    if arg not in choices:
        raise _error(name, spec, f"{peer} takes one of {choices}, got {arg!r}")
    return arg


def _parse_peer(name: str, spec: str, peer: str, arg: str) -> dict[str, Any]:
    if peer == "deepcache":
        options = {"branch": 0, **_options(name, spec, arg, {"interval": int, "branch": int})}
        if options.get("interval", 0) < 1 or options["branch"] < 0:
            raise _error(name, spec, "deepcache needs interval=N with N >= 1 (and branch=B with B >= 0)")
        return {"interval": options["interval"], "branch": options["branch"]}
    if peer == "diffusers-cache":
        kind, _, rest = arg.partition(":")
        _choice(name, spec, peer, kind, tuple(DIFFUSERS_CACHE_KINDS))
        return {"kind": kind, **_options(name, spec, rest, _diffusers_cache_options(kind))}
    if peer == "cache-dit":
        return _options(name, spec, arg, CACHE_DIT_OPTIONS)
    if peer == "tomesd":
        options = _options(name, spec, arg, {"ratio": float})
        if not 0 < options.get("ratio", 0) < 1:
            raise _error(name, spec, "tomesd needs ratio=R with 0 < R < 1")
        return options
    if peer == "quanto":
        return {"weights": _choice(name, spec, peer, arg, QUANTO_WEIGHTS)}
    return {"config": _choice(name, spec, peer, arg, TORCHAO_CONFIGS)}


def _parts(spec: str) -> list[str]:
    """The ``+``-joined parts of ``spec``, ``nvfp4+residual`` kept as one."""
    parts: list[str] = []
    for part in (p.strip() for p in spec.split("+")):
        if parts and f"{parts[-1]}+{part}" in PRECISIONS:
            parts[-1] = f"{parts[-1]}+{part}"
        else:
            parts.append(part)
    return parts


def _number(text: str) -> float:
    value = float(text)  # raises ValueError
    if math.isnan(value):
        raise ValueError(text)
    return value


_BUILDERS: dict[str, tuple[bool, Callable[..., FeatureConfig]]] = {
    "encoder-reuse": (True, lambda arg, **options: EncoderReuseConfig(schedule=arg, **options)),
    "delta-cache": (True, lambda arg, **options: DeltaCacheConfig(threshold=_number(arg), **options)),
    "quantized-attention": (False, lambda arg, **options: QuantizedAttentionConfig(**options)),
    "preset": (True, lambda arg, **options: unet_preset(arg)),
    "dit-preset": (True, lambda arg, **options: dit_preset(arg)),
    "quantization-file": (True, lambda arg, **options: _quantization_file(arg)),
    **{p: (False, lambda arg, p=p, **options: QuantizationConfig(precision=p, **options)) for p in PRECISIONS},
}

#: The config class each diffaccel part builds (its scalar fields are the part's ``key=value`` options).
_PART_CONFIGS: dict[str, type] = {
    "encoder-reuse": EncoderReuseConfig,
    "delta-cache": DeltaCacheConfig,
    "quantized-attention": QuantizedAttentionConfig,
    **dict.fromkeys(PRECISIONS, QuantizationConfig),
}

#: Fields a part's value already sets (not given again as an option).
_POSITIONAL = {"encoder-reuse": "schedule", "delta-cache": "threshold", **dict.fromkeys(PRECISIONS, "precision")}


def _quantization_file(path: str) -> QuantizationConfig:
    """The ``QuantizationConfig`` saved as JSON at ``path`` (``to_dict``'s form)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return QuantizationConfig.from_dict(json.load(handle))
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None


def _part_options(key: str) -> dict[str, type]:
    """The ``key=value`` options of the diffaccel part ``key``: its config's int, float and bool fields
    (and a precision's string fields: ``scope``, ``fallback``, ``impl``)."""
    if key not in _PART_CONFIGS:  # a preset takes no options
        return {}
    config = _PART_CONFIGS[key]
    fields = ((f.name, _scalar_type(f.type) or (str if config is QuantizationConfig and str(f.type) == "str" else None))
              for f in dataclasses.fields(config))
    return {name: kind for name, kind in fields if kind is not None and name != _POSITIONAL.get(key)}


def _parse_config(name: str, spec: str, part: str) -> FeatureConfig:
    """One diffaccel part: ``KEY[:VALUE][,option=value...]`` (items holding ``=`` are options, e.g.
    ``delta-cache:0.2,max_consecutive_skips=4`` or ``int8:min_weight_numel=0``)."""
    key, sep, rest = part.partition(":")
    if key not in _BUILDERS:
        raise _error(name, spec, f"unknown feature or peer {part!r}; {_accepted()}")
    items = rest.split(",") if sep else []
    arg = ",".join(item for item in items if "=" not in item)
    options = _options(name, spec, ",".join(item for item in items if "=" in item), _part_options(key))
    takes_arg, build = _BUILDERS[key]
    if takes_arg != bool(arg):
        raise _error(name, spec, f"{key!r} {'needs a value after' if takes_arg else 'takes no value after'} ':'")
    try:
        return build(arg, **options)
    except (TypeError, ValueError) as err:
        raise _error(name, spec, f"bad {key!r}: {err}") from None


def _steering_options(config: type) -> dict[str, type]:
    fields = {f.name: _scalar_type(f.type) for f in dataclasses.fields(config)}
    options: dict[str, type] = {name: kind for name, kind in fields.items() if kind is not None}
    options.update({f.name: str for f in dataclasses.fields(config) if str(f.type) in ("str", "<class 'str'>")})
    return options


def _parse_steering(name: str, spec: str, part: str) -> FKSteeringConfig | NoiseSearchConfig | None:
    """A steering part (see :data:`STEERING_PARTS`), or None when ``part`` is not one."""
    key, _, rest = part.partition(":")
    try:
        if key == "best-of":
            if not rest.isdigit():
                raise _error(name, spec, f"best-of needs a number of samples, e.g. best-of:4, got {part!r}")
            return FKSteeringConfig(num_particles=int(rest), resample_every=0, final_correction=False)
        if key == "fk":
            allowed = {"particles": int, **_steering_options(FKSteeringConfig)}
            options = _options(name, spec, rest, allowed)
            if "particles" in options:
                options["num_particles"] = options.pop("particles")
            return FKSteeringConfig(**options)
        if key == "search":
            method, _, more = rest.partition(",")
            if method not in SEARCH_METHODS:
                raise _error(name, spec, f"search takes a method of {SEARCH_METHODS}, e.g. search:random,budget_nfe=200")
            options = _options(name, spec, more, {k: v for k, v in _steering_options(NoiseSearchConfig).items()
                                                  if k != "method"})
            return NoiseSearchConfig(method, **options)
    except (TypeError, ValueError) as err:
        if isinstance(err, VariantSpecError):
            raise
        raise _error(name, spec, f"bad {key!r}: {err}") from None
    return None


def parse_spec(name: str, spec: str) -> Variant:
    """The variant ``name`` that ``spec`` describes (the grammar is in the module docs).

    Example:
        >>> parse_spec("q", "nvfp4+residual+quantized-attention").configs[0].precision
        'nvfp4+residual'
        >>> parse_spec("x", "delta-cache:fast")
        Traceback (most recent call last):
        ...
        diffaccel.evaluation.variants.VariantSpecError: variant 'x' ('delta-cache:fast'): bad 'delta-cache': ...
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _error(name, str(spec), f"empty spec; {_accepted()}")
    spec = spec.strip()
    if spec == "none":
        return Variant(name, spec)
    peer, _, arg = spec.partition(":")
    if peer in PEER_PACKAGES or peer == "diffusers-cache":
        if "+" in arg:
            raise _error(name, spec, "a peer runs alone: it cannot be joined with '+' to other parts")
        if peer not in ("cache-dit",) and not arg:
            raise _error(name, spec, f"{peer!r} needs options; accepted: {[p for p in PEERS if p.startswith(peer)]}")
        return Variant(name, spec, peer=peer, peer_options=_parse_peer(name, spec, peer, arg))
    configs, steering = [], []
    for part in _parts(spec):
        found = _parse_steering(name, spec, part)
        if found is not None:
            steering.append(found)
        else:
            configs.append(_parse_config(name, spec, part))
    kinds = [type(config) for config in configs]
    if len(set(kinds)) != len(kinds):
        raise _error(name, spec, "each feature may be given once (one precision, one schedule, one threshold)")
    if len(steering) > 1:
        raise _error(name, spec, "a variant steers one way: at most one of fk, best-of, search")
    return Variant(name, spec, tuple(configs), steering=steering[0] if steering else None)


def parse_variant(text: str) -> Variant:
    """Parse one ``NAME=SPEC`` string.

    Example:
        >>> parse_variant("reuse=encoder-reuse:faster-diffusion").configs
        (EncoderReuseConfig(schedule=FasterDiffusionSchedule(), shallow_layers=None, forecast=0,
                            reuse_guidance=False, parallel=None, max_parallel_steps=None,
                            noise_injection=0.0, noise_injection_below=0.5),)
        >>> parse_variant("encoder-reuse:uniform:2")
        Traceback (most recent call last):
        ...
        diffaccel.evaluation.variants.VariantSpecError: variant 'encoder-reuse:uniform:2': expected NAME=SPEC, ...
    """
    name, sep, spec = text.partition("=")
    if not sep:
        raise VariantSpecError(f"variant {text!r}: expected NAME=SPEC, e.g. 'reuse=encoder-reuse:uniform:2'")
    return parse_spec(name.strip(), spec)


def _grid(path: Path) -> list[Variant]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise VariantSpecError(f"{path}: cannot read the variant grid ({err})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise VariantSpecError(f"{path}:{err.lineno}: bad JSON ({err.msg})") from None
    elif suffix in (".yaml", ".yml"):
        if importlib.util.find_spec("yaml") is None:
            raise VariantSpecError(f"{path}: reading a YAML grid needs PyYAML (pip install pyyaml), or write it as JSON")
        import yaml  # optional dependency, checked above

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise VariantSpecError(f"{path}: bad YAML ({err})") from None
    else:
        raise VariantSpecError(f"{path}: a variant grid is a .json, .yaml or .yml file")
    if not isinstance(data, dict) or not data:
        raise VariantSpecError(f"{path}: a variant grid maps variant names to specs, e.g. {{'reuse': 'encoder-reuse:uniform:2'}}")
    variants = []
    for name, spec in data.items():
        if not isinstance(spec, str):
            raise _error(str(name), str(spec), f"in {path}: the spec must be a string")
        variants.append(parse_spec(str(name), spec))
    return variants


def parse_variants(specs: Sequence[str] = (), grid: Union[str, Path, None] = None) -> list[Variant]:
    """The untouched variant, then the variants of ``specs`` (``NAME=SPEC`` strings), then those of
    ``grid`` (a JSON or YAML file mapping names to specs). Names must be unique, case-insensitively
    (they name folders); ``untouched`` may only be given as ``none``.

    Example:
        >>> [v.name for v in parse_variants(["reuse=encoder-reuse:uniform:3", "int8=int8"])]
        ['untouched', 'reuse', 'int8']
        >>> parse_variants(["a=int8", "A=nvfp4"])
        Traceback (most recent call last):
        ...
        diffaccel.evaluation.variants.VariantSpecError: variant 'A' ('nvfp4'): the name is taken by variant 'a' ...
    """
    if isinstance(specs, str):
        specs = [specs]
    variants = [parse_variant(text) for text in specs] + (_grid(Path(grid)) if grid is not None else [])
    chosen = [Variant(UNTOUCHED, "none")]
    seen = {UNTOUCHED: UNTOUCHED}
    for variant in variants:
        if variant.name == UNTOUCHED and variant.untouched:
            continue
        taken = seen.get(variant.name.lower())
        if taken is not None:
            raise _error(variant.name, variant.spec, f"the name is taken by variant {taken!r} (names are folder names)")
        seen[variant.name.lower()] = variant.name
        chosen.append(variant)
    return chosen


def _needs(variant: Variant) -> list[tuple[str, str]]:
    """(what, denoiser kind) for every part of ``variant`` that needs one kind of denoiser."""
    needs = [(type(c).__name__, _NEEDS[type(c)]) for c in variant.configs if type(c) in _NEEDS]
    if variant.peer in _NEEDS:
        needs.append((variant.peer, _NEEDS[variant.peer]))
    return needs


def check_variant_applies(variant: Variant, denoiser_kind: str) -> None:
    """Raise :class:`VariantSpecError` if ``variant`` cannot run on a ``denoiser_kind`` (``"unet"`` or
    ``"transformer"``) denoiser: encoder reuse, DeepCache and tomesd need a UNet; diffusers' cache
    hooks and cache-dit a transformer.

    Example:
        >>> check_variant_applies(parse_variant("r=encoder-reuse:uniform:2"), "unet")
        >>> check_variant_applies(parse_variant("r=encoder-reuse:uniform:2"), "transformer")
        Traceback (most recent call last):
        ...
        diffaccel.evaluation.variants.VariantSpecError: variant 'r' (...): EncoderReuseConfig needs a unet denoiser; ...
    """
    if denoiser_kind not in DENOISER_KINDS:
        raise ValueError(f"denoiser_kind must be one of {DENOISER_KINDS}, got {denoiser_kind!r}")
    for what, needed in _needs(variant):
        if needed != denoiser_kind:
            raise _error(variant.name, variant.spec, f"{what} needs a {needed} denoiser; this model's is a {denoiser_kind}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package ("optimum" of "optimum.quanto") is missing
        return False


def missing_peer_packages(variants: Sequence[Variant]) -> dict[str, str]:
    """``{variant name: module}`` for every peer variant whose package is not installed.

    Example:
        >>> missing_peer_packages(parse_variants(["fbc=diffusers-cache:FirstBlockCache:threshold=0.1"]))
        {}
    """
    return {
        v.name: PEER_PACKAGES[v.peer]
        for v in variants
        if v.peer in PEER_PACKAGES and not _installed(PEER_PACKAGES[v.peer])
    }
