"""What one timed pipeline call costs: wall seconds, denoiser evaluations (NFE) and peak memory.

:func:`measured_call` runs a call with a forward pre-hook on the denoiser that counts the rows
(latents) of every evaluation, so the NFE of a sample is the same however the pipeline batches:
classifier-free guidance counts two per step whether it is batched (SD) or two calls (Wan), FK's
particles count one each, and a cached or skipped step still counts, as the caches' papers count
it. On the CPU a thread samples the process's resident memory (CUDA: ``max_memory_allocated``).

Example:
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd")
    >>> call = lambda: pipe(["a red circle", "a blue square"], num_inference_steps=3, output_type="latent")
    >>> out, cost = measured_call(pipe, call, samples=2)
    >>> cost.nfe, cost.seconds > 0   # 3 steps x 2 (guidance) per sample
    (6.0, True)
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..seams import denoiser

__all__ = ["CallCost", "measured_call", "resident_memory_mb"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class CallCost:
    """Wall seconds, denoiser evaluations per sample and peak memory (MB; None where unmeasurable) of one call."""

    seconds: float
    nfe: float
    peak_memory_mb: float | None


def resident_memory_mb() -> float | None:
    """This process's resident memory in MB (Linux ``/proc/self/statm``; None elsewhere).

    Example:
        >>> resident_memory_mb() > 0
        True
    """
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


class _PeakSampler(threading.Thread):
    """Samples :func:`resident_memory_mb` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak = interval, resident_memory_mb()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            value = resident_memory_mb()
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value

    def stop(self) -> float | None:
        self._stop_event.set()
        self.join()
        return self.peak


def _rows(args: tuple, kwargs: dict) -> int:
    """The batch size of a denoiser call: its first tensor argument's first dimension."""
    first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def measured_call(pipe: Any, call: Callable[[], Any], samples: int = 1) -> tuple[Any, CallCost]:
    """Run ``call()`` (a call of ``pipe`` making ``samples`` samples) and return its output and :class:`CallCost`.

    The denoiser is looked up when the call starts, so a variant that swapped it in is counted.
    """
    module = denoiser(pipe)
    rows = [0]

    def count(_: Any, args: tuple, kwargs: dict) -> None:
        rows[0] += _rows(args, kwargs)

    handle = module.register_forward_pre_hook(count, with_kwargs=True)
    cuda = next(module.parameters()).device.type == "cuda"
    sampler = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        sampler = _PeakSampler()
        sampler.start()
    try:
        start = time.perf_counter()
        out = call()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
        peak = sampler.stop() if sampler is not None else None
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    return out, CallCost(seconds, rows[0] / samples, peak)
