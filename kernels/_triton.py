"""Shared plumbing of the Triton kernels: lazy JIT/interpreter choice and the dispatcher rule.

A kernel decorated with :func:`jit` decides at *launch* time whether it is compiled for the GPU
or run by Triton's interpreter, by reading ``triton.knobs.runtime.interpret`` (the
``TRITON_INTERPRET`` environment variable). ``triton.jit`` itself decides once, at import time,
so a test that sets the variable after something imported the kernels would still get compiled
kernels; the lazy choice makes CPU tests independent of import order. Device helpers that such
kernels call are decorated with :func:`device_function` (``triton.jit``).

Every op takes ``impl="auto" | "triton" | "reference"``: ``"auto"`` runs Triton for CUDA tensors
(or everywhere while the interpreter is on) and the plain-torch reference otherwise.

Triton is optional (it ships for Linux only): without it the package still imports, ``"auto"``
always picks the reference, and ``"triton"`` raises ``ImportError``. Kernel modules take ``triton``
and ``tl`` from here (``None`` then) and decorate device helpers with :func:`device_function`.

Example:
    >>> import torch
    >>> resolve_impl("auto", torch.zeros(2))   # a CPU tensor, interpreter off
    'reference'
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_MISSING = ""
except ImportError as error:  # macOS, Windows: the plain-torch references still work
    triton = tl = None
    _TRITON_MISSING = str(error)

IMPLS = ("auto", "triton", "reference")
#: Whether the ``triton`` package imports; without it every op runs its plain-torch reference.
TRITON_AVAILABLE = triton is not None


def require_triton() -> None:
    """Raise a one-line ``ImportError`` unless the ``triton`` package is importable.

    Example:
        >>> require_triton() if TRITON_AVAILABLE else None  # raises only where triton is missing
    """
    if not TRITON_AVAILABLE:
        raise ImportError(
            f"impl='triton' needs the triton package, which is not installed ({_TRITON_MISSING}); "
            "install it (Linux) or use impl='auto' / 'reference'"
        )


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``), read now, not at import."""
    return TRITON_AVAILABLE and bool(triton.knobs.runtime.interpret)


def device_function(fn: Callable[..., Any]) -> Any:
    """``triton.jit`` for helpers that kernels call; ``fn`` itself (never launched) without triton.

    Example:
        >>> from diffaccel.kernels.nvfp4 import e2m1_to_f32  # decorated with device_function
        >>> type(e2m1_to_f32).__name__ == ("JITFunction" if TRITON_AVAILABLE else "function")
        True
    """
    return triton.jit(fn) if TRITON_AVAILABLE else fn


class LazyKernel:
    """A Triton kernel compiled (or interpreted) on first launch; ``kernel[grid](*args)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: dict[bool, Any] = {}

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        require_triton()
        if not interpreting():
            if "jit" not in self._compiled:
                self._compiled["jit"] = triton.jit(self.fn)
            return self._compiled["jit"][grid]
        if "interpret" not in self._compiled:
            from triton.runtime.interpreter import InterpretedFunction

            self._compiled["interpret"] = InterpretedFunction(self.fn)
        launch = self._compiled["interpret"][grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            with _jit_helpers_interpreted():
                return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def _jit_helpers_interpreted() -> Iterator[None]:
    """Let interpreted kernels call ``triton.language`` helpers that were jitted at import.

    ``tl.max``, ``tl.sum`` and friends are ``@triton.jit`` functions; when the interpreter was
    off at import they are compiled-mode objects that refuse host calls. During an interpreted
    launch (CPU tests only) such calls run through the interpreter instead.
    """
    from triton.runtime.interpreter import _patch_lang
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def call(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
        # InterpretedFunction.__call__ would patch triton.language for the interpreter and never
        # undo it, breaking later compilation in this process: patch in a scope and restore.
        scope = _patch_lang(self.fn)
        try:
            return _interpreted(self.fn).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


@contextlib.contextmanager
def interpreted_e4m3_scales() -> Iterator[None]:
    """While interpreting, decode ``tl.dot_scaled``'s scales as E4M3 (NVFP4) instead of E8M0.

    Triton 3.8's interpreter reads every ``dot_scaled`` scale as E8M0 (MXFP), whatever the scale
    pointer's type; compiled kernels read ``float8e4nv`` scales as UE4M3. Kernels whose scales are
    all E4M3 launch inside this scope so that CPU runs compute what the GPU computes. A no-op
    when the interpreter is off.
    """
    if not interpreting():
        yield
        return
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._e8m0_to_f32

    def e4m3_to_f32(scale: np.ndarray) -> np.ndarray:
        bits = torch.from_numpy(np.ascontiguousarray(scale.astype(np.uint8)))
        return bits.view(torch.float8_e4m3fn).float().numpy()

    interpreter._e8m0_to_f32 = e4m3_to_f32
    try:
        yield
    finally:
        interpreter._e8m0_to_f32 = original


@functools.cache
def _interpreted(fn: Callable[..., Any]) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def jit(fn: Callable[..., Any]) -> LazyKernel:
    """Decorator: like ``triton.jit`` but choosing compiler or interpreter at launch."""
    return LazyKernel(fn)


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for ``impl`` and the tensors' device; errors are clear."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if TRITON_AVAILABLE and (on_cuda or interpreting()) else "reference"
    if impl == "triton":
        require_triton()
        if not (on_cuda or interpreting()):
            raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return impl


def check_float(name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``tensor`` is a tensor of one of ``dtypes``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"{name} must have dtype in ({allowed}), got {str(tensor.dtype).removeprefix('torch.')}"
        )
