"""Peer libraries as ``diffaccel eval`` variants: :func:`peer_attachment` binds one peer
:class:`~diffaccel.evaluation.variants.Variant` to one pipeline, to attach and detach many times.

* weight peers (``quanto``, ``torchao``) quantize a ``copy.deepcopy`` of the denoiser once, when
  built; attach swaps the copy in, detach swaps the original back;
* caching peers (``deepcache``, ``diffusers-cache``, ``cache-dit``, ``tomesd``) patch the live
  pipeline on attach with the peer's own API and undo it with the peer's own API on detach; whatever
  that leaves behind (attributes, forwards, classes, hooks on the pipeline, its class and its
  denoisers' modules) is then put back as it was, so the untouched pipeline is exactly untouched.

Building one checks the variant applies (the peer's package is installed, the denoiser kind fits,
the peer's own setup succeeds on this pipeline and patches or quantizes something) and raises
:class:`~diffaccel.evaluation.variants.VariantSpecError` naming the variant otherwise, before any
generation.

Example:
    >>> import torch
    >>> from diffaccel.testing import tiny_call_inputs, tiny_pipeline
    >>> from diffaccel.evaluation.variants import parse_variant
    >>> pipe = tiny_pipeline("flux")
    >>> def run():
    ...     return pipe("a red circle", num_inference_steps=2, output_type="np",
    ...                 generator=torch.Generator().manual_seed(0), **tiny_call_inputs("flux")).images
    >>> before = run()
    >>> fbc = peer_attachment(pipe, parse_variant("fbc=diffusers-cache:FirstBlockCache:threshold=0.5"))
    >>> fbc.attach(); _ = run(); fbc.detach()
    >>> bool((run() == before).all())
    True
    >>> fbc.describe()["settings"]["threshold"]
    0.5
    >>> peer_attachment(pipe, parse_variant("dc=deepcache:interval=3"))
    Traceback (most recent call last):
    ...
    diffaccel.evaluation.variants.VariantSpecError: variant 'dc' ('deepcache:interval=3'): deepcache needs a unet denoiser; ...
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import importlib
import importlib.metadata
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch

from .. import seams
from .variants import DIFFUSERS_CACHE_KINDS, PEER_PACKAGES, Variant, VariantSpecError, check_variant_applies

__all__ = ["PeerAttachment", "peer_attachment"]

#: The distribution (for its version and the pip line) of each peer.
PEER_DISTRIBUTIONS: dict[str, str] = {
    "deepcache": "DeepCache",
    "diffusers-cache": "diffusers",
    "cache-dit": "cache-dit",
    "tomesd": "tomesd",
    "quanto": "optimum-quanto",
    "torchao": "torchao",
}


def _error(variant: Variant, why: str) -> VariantSpecError:
    return VariantSpecError(f"variant {variant.name!r} ({variant.spec!r}): {why}")


def _import(variant: Variant, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        dist = PEER_DISTRIBUTIONS[variant.peer]
        raise _error(variant, f"{variant.peer} needs {dist} ({err}); pip install {dist}") from None


def _jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot hold (enums, dtypes, granularity objects) written as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _fields(config: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The public fields of a dataclass ``config``, JSON-ready."""
    return {
        f.name: _jsonable(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if not f.name.startswith("_") and f.name not in skip
    }


class _Snapshot:
    """The instance attributes, class and plain-dict contents (``_modules``, hook dicts) of some
    objects, and the attributes of some classes, to put back exactly after a peer's own undo."""

    def __init__(self, objects: Iterable[Any], classes: Iterable[type]) -> None:
        self._objects = [(obj, type(obj), dict(vars(obj)), self._dicts(obj)) for obj in objects]
        self._classes = [(cls, dict(vars(cls))) for cls in classes]

    @staticmethod
    def _dicts(obj: Any) -> dict[str, dict]:
        return {k: type(v)(v) for k, v in vars(obj).items() if type(v) in (dict, OrderedDict)}

    def restore(self) -> None:
        for cls, saved in self._classes:
            for key in [k for k in vars(cls) if k not in saved]:
                delattr(cls, key)
            for key, value in saved.items():
                if vars(cls).get(key, _Snapshot) is not value:
                    setattr(cls, key, value)
        for obj, cls, saved, dicts in self._objects:
            if type(obj) is not cls:
                obj.__class__ = cls
            state = vars(obj)
            for key in [k for k in state if k not in saved]:
                del state[key]
            state.update(saved)
            for key, contents in dicts.items():
                state[key].clear()
                state[key].update(contents)


class PeerAttachment:
    """One peer variant bound to one pipeline. Built once (the one-time work, e.g. a quantized deep
    copy of the denoiser, happens when it is built); then :meth:`attach` / :meth:`detach` any number
    of times, interleaved with other variants on the same pipeline. Build it with :func:`peer_attachment`.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> from diffaccel.evaluation.variants import parse_variant
        >>> pipe = tiny_pipeline("sd")
        >>> tome = peer_attachment(pipe, parse_variant("tome=tomesd:ratio=0.5"))
        >>> tome.attach(); type(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]).__name__
        'ToMeBlock'
        >>> tome.detach(); type(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]).__name__
        'BasicTransformerBlock'
    """

    def __init__(self, pipe: Any, variant: Variant, settings: dict[str, Any]) -> None:
        self.pipe = pipe
        self.variant = variant
        self.settings = settings
        self.attached = False

    def attach(self) -> None:
        """Make the pipeline run with the peer (no-op when attached)."""
        if not self.attached:
            self._attach()
            self.attached = True

    def detach(self) -> None:
        """Make the pipeline exactly untouched again: outputs bitwise equal to before (no-op when detached)."""
        if self.attached:
            self._detach()
            self.attached = False

    def describe(self) -> dict[str, Any]:
        """JSON-ready: the variant, the peer, its package and version, and the settings actually used
        (the peer's defaults filled in)."""
        dist = PEER_DISTRIBUTIONS[self.variant.peer]
        return {
            "variant": self.variant.name,
            "spec": self.variant.spec,
            "peer": self.variant.peer,
            "package": dist,
            "version": importlib.metadata.version(dist),
            "settings": self.settings,
        }

    def _attach(self) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        raise NotImplementedError


class _DenoiserSwap(PeerAttachment):
    """A weight peer: a quantized copy of the denoiser, swapped in on attach."""

    def __init__(self, pipe: Any, variant: Variant, settings: dict[str, Any], quantized: torch.nn.Module) -> None:
        super().__init__(pipe, variant, settings)
        self.name = seams.denoiser_name(pipe)
        self.original = getattr(pipe, self.name)
        self.quantized = quantized

    def _attach(self) -> None:
        setattr(self.pipe, self.name, self.quantized)

    def _detach(self) -> None:
        setattr(self.pipe, self.name, self.original)


class _Patch(PeerAttachment):
    """A caching peer: ``enable`` patches the live pipeline, ``disable`` is the peer's own undo; a
    snapshot taken before ``enable`` puts back whatever the undo leaves."""

    def __init__(
        self, pipe: Any, variant: Variant, settings: dict[str, Any],
        enable: Callable[[], Any], disable: Callable[[], Any], check: Callable[[], str | None],
    ) -> None:
        super().__init__(pipe, variant, settings)
        self._enable, self._disable = enable, disable
        self._snapshot: _Snapshot | None = None
        self._attach_checked(check)

    def _attach_checked(self, check: Callable[[], str | None]) -> None:
        """Attach once at build time: the peer's own setup must succeed and ``check()`` (run while
        attached) must return None, else the reason is raised as a :class:`VariantSpecError`."""
        try:
            self.attach()
            why = check()
        except Exception as err:  # any failure of the peer's own setup means it does not apply here
            why = f"{self.variant.peer} cannot be set up on {type(self.pipe).__name__}: {type(err).__name__}: {err}"
        finally:
            self.detach()
        if why is not None:
            raise _error(self.variant, why)

    def _attach(self) -> None:
        modules = [m for d in seams.denoisers(self.pipe).values() for m in d.modules()]
        self._snapshot = _Snapshot([self.pipe, *modules], type(self.pipe).__mro__[:-1])
        try:
            self._enable()
        except BaseException:
            self._snapshot.restore()
            raise

    def _detach(self) -> None:
        try:
            self._disable()
        finally:
            self._snapshot.restore()
            self._snapshot = None


def _quanto(pipe: Any, variant: Variant) -> PeerAttachment:
    """optimum-quanto ``quantize(weights=...)`` + ``freeze``: by default it quantizes the weights of
    every ``Linear`` and ``Conv2d`` (``LayerNorm`` only with quantized activations, not used here)."""
    quanto = _import(variant, "optimum.quanto")
    qtype = {"int8": quanto.qint8, "int4": quanto.qint4, "float8": quanto.qfloat8}[variant.peer_options["weights"]]
    model = copy.deepcopy(seams.denoiser(pipe))
    quanto.quantize(model, weights=qtype)
    quanto.freeze(model)
    done = [n for n, m in model.named_modules() if isinstance(m, quanto.QModuleMixin)]
    settings = {"weights": qtype.name, "activations": None, "modules": "Linear, Conv2d", "quantized": len(done)}
    return _DenoiserSwap(pipe, variant, settings, _checked(variant, model, done))


def _torchao_config(quantization: ModuleType, name: str) -> Any:
    configs = {
        "int8wo": quantization.Int8WeightOnlyConfig,
        "int8dq": quantization.Int8DynamicActivationInt8WeightConfig,
        "int4wo": quantization.Int4WeightOnlyConfig,
    }
    # set_inductor_config=False: torchao's default changes torch._inductor's global settings,
    # which would leak into the other variants of the same run.
    return configs[name](set_inductor_config=False)


def _torchao(pipe: Any, variant: Variant) -> PeerAttachment:
    """torchao ``quantize_(model, config)``: by default (its ``filter_fn``) it quantizes the weights
    of every ``Linear`` only; ``int8wo`` / ``int8dq`` / ``int4wo`` are its ``Int8WeightOnlyConfig`` /
    ``Int8DynamicActivationInt8WeightConfig`` / ``Int4WeightOnlyConfig``."""
    quantization = _import(variant, "torchao.quantization")
    config = _torchao_config(quantization, variant.peer_options["config"])
    model = copy.deepcopy(seams.denoiser(pipe))
    try:
        quantization.quantize_(model, config)
    except (ImportError, NotImplementedError, RuntimeError, ValueError, AssertionError) as err:
        raise _error(variant, f"torchao cannot quantize this denoiser with {type(config).__name__} "
                              f"here ({type(err).__name__}: {err})") from None
    plain = (torch.Tensor, torch.nn.Parameter)
    done = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and type(m.weight) not in plain]
    settings = {"config": type(config).__name__, **_fields(config), "modules": "Linear", "quantized": len(done)}
    return _DenoiserSwap(pipe, variant, settings, _checked(variant, model, done))


def _checked(variant: Variant, model: torch.nn.Module, quantized: list[str]) -> torch.nn.Module:
    """``model`` once one of its ``quantized`` Linear modules has run a forward on its device and dtype."""
    linears = [m for n, m in model.named_modules() if n in quantized and isinstance(m, torch.nn.Linear)]
    if not linears:
        raise _error(variant, f"{variant.peer} quantized no Linear module of this denoiser")
    probe = linears[0]
    reference = next(p for p in model.parameters() if p.is_floating_point())
    x = torch.randn(1, probe.in_features, device=reference.device, dtype=reference.dtype)
    try:
        with torch.no_grad():
            probe(x)
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as err:
        raise _error(variant, f"{variant.peer} quantized weights do not run on {reference.device} "
                              f"({type(err).__name__}: {err})") from None
    return model


def _deepcache(pipe: Any, variant: Variant) -> PeerAttachment:
    """``DeepCacheSDHelper``: wraps the UNet's and its blocks' ``forward``; every ``interval``-th step runs
    in full, the others reuse the cached features deeper than down block ``branch // 3``, layer ``branch % 3``."""
    deepcache = _import(variant, "DeepCache")
    unet = seams.denoiser(pipe)
    if unet.mid_block is None or variant.peer_options["branch"] // 3 >= len(unet.down_blocks):
        raise _error(variant, f"deepcache branch {variant.peer_options['branch']} needs a down block "
                              f"{variant.peer_options['branch'] // 3} and a mid block; this UNet has "
                              f"{len(unet.down_blocks)} down blocks")
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=variant.peer_options["interval"], cache_branch_id=variant.peer_options["branch"])
    settings = {"cache_interval": variant.peer_options["interval"], "cache_branch_id": variant.peer_options["branch"],
                **helper.params}
    return _Patch(pipe, variant, settings, helper.enable, helper.disable, lambda: None)


def _hook_count(models: Iterable[torch.nn.Module]) -> int:
    return sum(len(getattr(m, "_diffusers_hook", None).hooks) for d in models for m in d.modules()
               if getattr(m, "_diffusers_hook", None) is not None)


#: The diffusers hook function ``CacheMixin.enable_cache`` calls for each cache kind.
_DIFFUSERS_CACHE_APPLY = {
    "FirstBlockCache": "apply_first_block_cache",
    "TaylorSeer": "apply_taylorseer_cache",
    "MagCache": "apply_mag_cache",
    "FasterCache": "apply_faster_cache",
    "PyramidAttentionBroadcast": "apply_pyramid_attention_broadcast",
}


def _diffusers_cache(pipe: Any, variant: Variant) -> PeerAttachment:
    """diffusers' ``denoiser.enable_cache(<KIND>Config(...))`` / ``disable_cache()`` on every denoiser;
    FasterCache and PyramidAttentionBroadcast read the step from ``pipe.current_timestep``.

    A denoiser that is not a ``CacheMixin`` (SD3's and PixArt's transformers in diffusers 0.42, whose
    pipelines set no cache context either) gets the same hooks from the ``apply_*`` function
    ``enable_cache`` would call (removed by ``CacheMixin.disable_cache``), runs under one cache context (SD3 batches its CFG branches), and has the hooks' state
    reset at each call's first denoiser call (the scheduler's ``step_index`` still None), as a
    ``CacheMixin`` pipeline's ``maybe_free_model_hooks`` does after each call."""
    import diffusers.hooks
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context
    from diffusers.models.cache_utils import CacheMixin

    kind = variant.peer_options["kind"]
    options = {k: v for k, v in variant.peer_options.items() if k != "kind"}
    config_class = getattr(diffusers.hooks, DIFFUSERS_CACHE_KINDS[kind])
    if "current_timestep_callback" in {f.name for f in dataclasses.fields(config_class)}:
        if not hasattr(type(pipe), "current_timestep"):
            raise _error(variant, f"{kind} needs the pipeline's current_timestep; {type(pipe).__name__} has none")
        options["current_timestep_callback"] = lambda: pipe.current_timestep
    try:
        config = config_class(**options)
    except (TypeError, ValueError) as err:
        raise _error(variant, f"bad {config_class.__name__}: {err}") from None
    models = list(seams.denoisers(pipe).values())
    if kind in ("FirstBlockCache", "MagCache"):
        for model in models:
            tail = [blocks[-1] for blocks in seams.block_lists(model).values()]
            if any(getattr(block, "context_pre_only", False) for block in tail):
                raise _error(variant, f"{kind} cannot cache {type(pipe).__name__}: the last block of "
                                      f"{type(model).__name__} returns no encoder stream (context_pre_only), "
                                      "which diffusers' tail-block hook subtracts (TypeError at the first call)")
    before = _hook_count(models)
    handles: list[Any] = []

    def reset_at_first_step(model: torch.nn.Module, args: Any) -> None:
        if getattr(pipe.scheduler, "step_index", 0) is None:  # (a reset clears the context too)
            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
        _set_cache_context(model, CacheContext("cond"))

    apply = getattr(diffusers.hooks, _DIFFUSERS_CACHE_APPLY[kind])

    def enable() -> None:
        for model in models:
            if isinstance(model, CacheMixin):
                model.enable_cache(config)
                continue
            apply(model, config)
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
            model._cache_config = config  # what CacheMixin.disable_cache reads
            handles.append(model.register_forward_pre_hook(reset_at_first_step))

    def disable() -> None:
        for handle in handles:
            handle.remove()
        handles.clear()
        for model in models:
            if getattr(model, "_cache_config", None) is not None:
                if not isinstance(model, CacheMixin):
                    _set_cache_context(model, None)
                CacheMixin.disable_cache(model)

    def check() -> str | None:
        if _hook_count(models) == before:
            return f"{kind} found no block of {type(models[0]).__name__} to cache"
        return None

    settings = {"kind": kind, **_fields(config, skip=("current_timestep_callback",))}
    if not all(isinstance(model, CacheMixin) for model in models):
        settings["applied"] = f"{_DIFFUSERS_CACHE_APPLY[kind]} on a non-CacheMixin denoiser, one cache context, reset per call"
    return _Patch(pipe, variant, settings, enable, disable, check)


def _cache_dit(pipe: Any, variant: Variant) -> PeerAttachment:
    """``cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...))`` / ``cache_dit.disable_cache(pipe)``.
    cache-dit wraps the pipeline *class*'s ``__call__`` (every instance of it while attached) and
    the transformer's ``forward``; its undo leaves attributes behind, which detach puts back."""
    cache_dit = _import(variant, "cache_dit")
    if not cache_dit.BlockAdapterRegister.is_supported(pipe):
        raise _error(variant, f"cache-dit has no block adapter for {type(pipe).__name__}")
    config = cache_dit.DBCacheConfig(**variant.peer_options)
    transformer = seams.denoiser(pipe)
    blocks = sum(len(blocks) for blocks in seams.block_lists(transformer).values())
    if config.Fn_compute_blocks + config.Bn_compute_blocks > blocks:  # cache-dit asserts it mid-call otherwise
        raise _error(variant, f"Fn_compute_blocks={config.Fn_compute_blocks} + Bn_compute_blocks="
                              f"{config.Bn_compute_blocks} exceed the {blocks} transformer blocks of "
                              f"{type(transformer).__name__}: set them lower (e.g. cache-dit:Fn_compute_blocks=1,"
                              "Bn_compute_blocks=0)")

    def check() -> str | None:
        return None if getattr(transformer, "_is_cached", False) else "cache-dit did not cache the transformer"

    settings = _fields(config)
    return _Patch(pipe, variant, settings, lambda: cache_dit.enable_cache(pipe, cache_config=config),
                  lambda: cache_dit.disable_cache(pipe), check)


def _tomesd(pipe: Any, variant: Variant) -> PeerAttachment:
    """``tomesd.apply_patch(pipe, ratio=...)`` / ``remove_patch``: merges tokens in the UNet's
    ``BasicTransformerBlock`` s (their class becomes ``ToMeBlock``). ToMe's random merge pattern
    forks the global RNG on first use; here its generator is reseeded from the timestep before each
    UNet call, so a seeded pipeline call gives the same output whenever it runs."""
    tomesd = _import(variant, "tomesd")
    defaults = {k: p.default for k, p in inspect.signature(tomesd.apply_patch).parameters.items() if k != "model"}
    settings = {**defaults, **variant.peer_options, "generator": "reseeded from the timestep per UNet call"}
    unet = seams.denoiser(pipe)

    def reseed(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seed = int(torch.as_tensor(timestep).flatten()[0].item())
        module._tome_info["args"]["generator"] = torch.Generator(sample.device).manual_seed(seed)

    def enable() -> None:
        tomesd.apply_patch(pipe, **variant.peer_options)
        unet._tome_info["hooks"].append(unet.register_forward_pre_hook(reseed, with_kwargs=True))

    def check() -> str | None:
        if not any(type(m).__name__ == "ToMeBlock" for m in unet.modules()):
            return f"tomesd found no BasicTransformerBlock in {type(unet).__name__}"
        return None

    return _Patch(pipe, variant, settings, enable, lambda: tomesd.remove_patch(pipe), check)


_BUILDERS: dict[str, Callable[[Any, Variant], PeerAttachment]] = {
    "deepcache": _deepcache,
    "diffusers-cache": _diffusers_cache,
    "cache-dit": _cache_dit,
    "tomesd": _tomesd,
    "quanto": _quanto,
    "torchao": _torchao,
}


def peer_attachment(pipe: Any, variant: Variant) -> PeerAttachment:
    """Bind the peer ``variant`` to ``pipe``, doing its one-time work (quantizing a copy, checking the
    peer sets up on this pipeline). Raises :class:`VariantSpecError` naming the variant when the peer
    does not apply here or its package is missing (with the pip line); the pipeline is left untouched.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> from diffaccel.evaluation.variants import parse_variant
        >>> pipe = tiny_pipeline("sd")
        >>> q = peer_attachment(pipe, parse_variant("q8=quanto:int8"))
        >>> q.attach(); type(pipe.unet.conv_in).__name__
        'QConv2d'
        >>> q.detach(); type(pipe.unet.conv_in).__name__
        'Conv2d'
        >>> peer_attachment(pipe, parse_variant("cd=cache-dit"))
        Traceback (most recent call last):
        ...
        diffaccel.evaluation.variants.VariantSpecError: variant 'cd' ('cache-dit'): cache-dit needs a transformer denoiser; ...
    """
    if variant.peer not in _BUILDERS:
        raise _error(variant, "not a peer variant")
    check_variant_applies(variant, "unet" if seams.denoiser_name(pipe) == "unet" else "transformer")
    if variant.peer in PEER_PACKAGES:
        _import(variant, PEER_PACKAGES[variant.peer])
    return _BUILDERS[variant.peer](pipe, variant)
