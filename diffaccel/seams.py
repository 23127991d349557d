"""The plumbing every feature shares: finding a pipeline's denoiser and its transformer blocks,
the length of the denoising loop, diffusers ``ModelHook`` s by name, wrapping ``scheduler.step``,
and mapping over nested tensors. Features and steering use these instead of their own copies.

Example:
    >>> from diffaccel.testing import tiny_pipeline
    >>> denoiser_name(tiny_pipeline("sd"))
    'unet'
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from .errors import UnsupportedPipelineError

#: Pipeline attributes that may hold the denoiser, in the order they win: a pipeline with both a
#: ``transformer`` and a ``unet`` (none in diffusers today) is treated as a transformer pipeline.
DENOISER_ATTRIBUTES = ("transformer", "unet")

#: Name of the hook steering puts on the denoiser to run it on chunks of particles.
CHUNK_HOOK = "diffaccel.steering.chunk"

# The modules a denoising loop may call first (a ControlNet runs before its UNet).
_LOOP_MODULES = ("controlnet", "unet", "transformer", "transformer_2")

_STEP_WRAPPERS = "_diffaccel_step_wrappers"
_MISSING = object()


def denoiser_name(pipe: Any) -> str:
    """The attribute of ``pipe`` that holds its denoiser: the first of :data:`DENOISER_ATTRIBUTES`
    that is a ``torch.nn.Module``.

    Raises :class:`~diffaccel.errors.UnsupportedPipelineError` when there is none.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> denoiser_name(tiny_pipeline("flux"))
        'transformer'
        >>> denoiser_name(object())
        Traceback (most recent call last):
        ...
        diffaccel.errors.UnsupportedPipelineError: object has no denoiser (no `transformer` or `unet` module)
    """
    for name in DENOISER_ATTRIBUTES:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise UnsupportedPipelineError(f"{type(pipe).__name__} has no denoiser (no `transformer` or `unet` module)")


def denoiser(pipe: Any) -> torch.nn.Module:
    """The denoiser of ``pipe`` (``getattr(pipe, denoiser_name(pipe))``).

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> type(denoiser(tiny_pipeline("sd"))).__name__
        'UNet2DConditionModel'
    """
    return getattr(pipe, denoiser_name(pipe))


def denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """Every denoiser of ``pipe`` by attribute name: :func:`denoiser` first, then a second-stage
    ``transformer_2`` (Wan 2.2's low-noise expert) when the pipeline has one.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> list(denoisers(tiny_pipeline("wan")))
        ['transformer']
    """
    found = {denoiser_name(pipe): denoiser(pipe)}
    second = getattr(pipe, "transformer_2", None)
    if isinstance(second, torch.nn.Module):
        found["transformer_2"] = second
    return found


def transformer_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks of a denoiser, as ``(qualified name, module)`` in forward order.

    A block is a module whose class diffusers registers in its ``TransformerBlockRegistry``
    (the registry its own caches use); blocks nested inside other blocks are not listed twice.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> [name for name, _ in transformer_blocks(tiny_pipeline("flux").transformer)]
        ['transformer_blocks.0', 'single_transformer_blocks.0']
    """
    registered = tuple(block_registry()._registry)
    blocks: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, registered) and not any(name.startswith(b + ".") for b, _ in blocks):
            blocks.append((name, module))
    return blocks


def block_registry() -> Any:
    """diffusers' ``TransformerBlockRegistry`` (which outputs of a block class are which), filled.

    Example:
        >>> from diffusers.models.attention import BasicTransformerBlock
        >>> block_registry().get(BasicTransformerBlock).return_hidden_states_index
        0
    """
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()
    return TransformerBlockRegistry


#: Names of the ``ModuleList`` attributes that hold a denoiser's transformer blocks.
BLOCK_LIST_NAMES = (
    "transformer_blocks",
    "single_transformer_blocks",
    "blocks",
    "layers",
    "temporal_transformer_blocks",
)


def block_metadata(block: torch.nn.Module) -> Any:
    """diffusers' description of a transformer block's class (which outputs are which), or None.

    Example:
        >>> block_metadata(torch.nn.Linear(2, 2)) is None
        True
    """
    from diffusers.utils.torch_utils import unwrap_module

    try:
        return block_registry().get(type(unwrap_module(block)))
    except ValueError:
        return None


def block_lists(model: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """A denoiser's block lists whose every block diffusers' registry describes, by qualified name.

    A transformer's lists are its own attributes (:data:`BLOCK_LIST_NAMES`); a UNet's are the
    ``transformer_blocks`` of the ``Transformer2DModel`` in each cross-attention block.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> sorted(block_lists(tiny_pipeline("flux").transformer))
        ['single_transformer_blocks', 'transformer_blocks']
    """
    lists = {name: getattr(model, name) for name in BLOCK_LIST_NAMES if _described(getattr(model, name, None))}
    if not lists:
        lists = {name: module for name, module in model.named_modules()
                 if name.endswith(".transformer_blocks") and _described(module)}
    return lists


def _described(blocks: Any) -> bool:
    return isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0 and all(block_metadata(b) for b in blocks)


def loop_length(pipe: Any) -> int:
    """The number of iterations of the denoising loop of ``pipe``'s running (or last) call.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> pipe = tiny_pipeline("sd")
        >>> pipe.scheduler.set_timesteps(7)
        >>> loop_length(pipe)
        7
    """
    return int(getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps))


class _LoopReached(Exception):
    """Stops a probing call at its first denoiser call."""


def count_loop_steps(pipe: Any, call_kwargs: dict[str, Any]) -> int:
    """How many steps the loop of ``pipe(**call_kwargs)`` runs: the call runs up to its first denoiser
    call (prompt encoding and image preparation, no denoising) and is stopped there. This counts what
    the pipeline executes, e.g. ``int(strength * num_inference_steps)`` for img2img; 0 if the call
    never reaches a denoiser.

    Example:
        >>> from diffaccel.testing import tiny_call_inputs, tiny_pipeline
        >>> pipe = tiny_pipeline("sd-img2img")
        >>> count_loop_steps(pipe, dict(prompt="a red circle", num_inference_steps=10, strength=0.5,
        ...                             **tiny_call_inputs("sd-img2img")))
        5
    """
    reached = []

    def stop(module: torch.nn.Module, args: Any) -> None:
        reached.append(loop_length(pipe))
        raise _LoopReached

    modules = [getattr(pipe, name, None) for name in _LOOP_MODULES]
    handles = [module.register_forward_pre_hook(stop) for module in modules if isinstance(module, torch.nn.Module)]
    try:
        pipe(**call_kwargs)
    except _LoopReached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return reached[0] if reached else 0


def add_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register the diffusers ``hook`` on ``module`` under ``name`` (creating its registry).

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> add_hook(layer, ModelHook(), "example")
        >>> list(layer._diffusers_hook.hooks)
        ['example']
        >>> remove_hook(layer, "example")
    """
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def has_hook(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module`` carries a diffusers hook called ``name``.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> has_hook(layer, "example")
        False
    """
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and name in registry.hooks


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Remove the diffusers hook ``name`` from ``module`` (nothing if absent); when it was the last
    one, the module is left as it was: no empty ``HookRegistry`` and no instance-level ``forward``
    (unless someone else, e.g. accelerate's offload hooks, had put one there).

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> add_hook(layer, ModelHook(), "example")
        >>> remove_hook(layer, "example")
        >>> hasattr(layer, "_diffusers_hook"), "forward" in layer.__dict__
        (False, False)
    """
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    if name in registry.hooks:
        registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        del module._diffusers_hook
        forward = module.__dict__.get("forward")
        if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
            del module.forward


StepWrapper = Callable[..., Any]


@contextlib.contextmanager
def wrapped_scheduler_step(scheduler: Any, wrapper: StepWrapper) -> Iterator[None]:
    """Within the block, ``scheduler.step(*args, **kwargs)`` runs ``wrapper(step, *args, **kwargs)``,
    ``step`` being the step it wraps.

    Wrappers compose: each new one wraps the ones already installed (the first entered is the
    innermost, next to the scheduler's own ``step``). They may exit in any order: on exit the
    remaining wrappers are recomposed in their entry order, and when the last one exits
    ``scheduler.step`` is exactly what it was before the first (the class method, or an instance
    attribute someone set). Replacing ``scheduler.step`` by hand while a wrapper is installed is
    not supported (it is overwritten at the next exit).

    Example:
        >>> from diffusers import DDIMScheduler
        >>> scheduler = DDIMScheduler()
        >>> calls = []
        >>> def note(label):
        ...     return lambda step, *args, **kwargs: calls.append(label) or step(*args, **kwargs)
        >>> outer = wrapped_scheduler_step(scheduler, note("outer"))
        >>> with wrapped_scheduler_step(scheduler, note("inner")):
        ...     outer.__enter__()
        ...     scheduler.set_timesteps(2)
        ...     _ = scheduler.step(torch.zeros(1), scheduler.timesteps[0], torch.zeros(1))
        >>> calls
        ['outer', 'inner']
        >>> _ = outer.__exit__(None, None, None)  # exits after the inner one
        >>> "step" in scheduler.__dict__
        False
    """
    state = scheduler.__dict__.get(_STEP_WRAPPERS)
    if state is None:
        state = {"base": scheduler.__dict__.get("step", _MISSING), "wrappers": []}
        scheduler.__dict__[_STEP_WRAPPERS] = state
    entry = [wrapper]  # a fresh object per entry, so the same wrapper may be entered twice
    state["wrappers"].append(entry)
    _compose_steps(scheduler, state)
    try:
        yield
    finally:
        state["wrappers"].remove(entry)
        _compose_steps(scheduler, state)


def _compose_steps(scheduler: Any, state: dict[str, Any]) -> None:
    if not state["wrappers"]:
        del scheduler.__dict__[_STEP_WRAPPERS]
        if state["base"] is _MISSING:
            scheduler.__dict__.pop("step", None)
        else:
            scheduler.step = state["base"]
        return
    step = type(scheduler).step.__get__(scheduler) if state["base"] is _MISSING else state["base"]
    for (wrapper,) in state["wrappers"]:
        step = _wrap_step(step, wrapper)
    scheduler.step = step


def _wrap_step(inner: Callable[..., Any], wrapper: StepWrapper) -> Callable[..., Any]:
    @functools.wraps(inner)
    def step(*args: Any, **kwargs: Any) -> Any:
        return wrapper(inner, *args, **kwargs)

    return step


def tree_map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested structure of dicts, lists, tuples and diffusers
    outputs (``torch.utils._pytree``); other leaves are kept.

    Example:
        >>> tree_map_tensors(lambda t: t * 2, {"a": [torch.tensor(1), "text"], "b": (torch.tensor(2),)})
        {'a': [tensor(2), 'text'], 'b': (tensor(4),)}
    """
    return pytree.tree_map_only(torch.Tensor, fn, tree)


def tree_map_tensor_pairs(fn: Callable[[torch.Tensor, torch.Tensor], Any], tree: Any, other: Any) -> Any:
    """Apply ``fn`` to the matching tensors of two nested structures of the same shape (``tree``'s
    other leaves are kept).

    Example:
        >>> tree_map_tensor_pairs(lambda a, b: a - b, (torch.tensor(3), "x"), (torch.tensor(1), "x"))
        (tensor(2), 'x')
    """
    return pytree.tree_map(lambda a, b: fn(a, b) if isinstance(a, torch.Tensor) else a, tree, other)



def same_tree(a: Any, b: Any) -> bool:
    """Whether two nested structures have the same shape and equal leaves (tensors by shape, dtype
    and values; other leaves by ``==``); identical objects are equal without a look inside.

    Example:
        >>> same_tree({"x": [torch.ones(2)], "n": 1}, {"x": [torch.ones(2)], "n": 1})
        True
        >>> same_tree({"x": [torch.ones(2)]}, {"x": [torch.zeros(2)]})
        False
    """
    if a is b:
        return True
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    return spec_a == spec_b and all(_same_leaf(x, y) for x, y in zip(leaves_a, leaves_b))


def _same_leaf(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return bool(a == b)
