"""Key-step schedules: at which denoising steps the full UNet (encoder included) runs.

Step indices count the iterations of the pipeline's denoising loop, starting at 0. Step 0 is
always a key step: the first step has no cached encoder features to reuse.

Example:
    >>> UniformSchedule(3).key_steps(10)
    (0, 3, 6, 9)
    >>> FasterDiffusionSchedule().key_steps(50)
    (0, 1, 2, 3, 5, 10, 15, 25, 35)
    >>> parse_schedule("0,1,4").key_steps(8)
    (0, 1, 4)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence, Union

# Key steps of the non-uniform 50-step schedule of Faster Diffusion (Li et al., 2023):
# dense at the start, where encoder features still change quickly.
FASTER_DIFFUSION_KEY_STEPS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)


class KeyStepSchedule:
    """Base class: maps a number of denoising steps to the sorted tuple of key steps.

    A schedule with ``adaptive = True`` decides online instead (:class:`AdaptiveSchedule`)."""

    adaptive = False

    def key_steps(self, num_steps: int) -> tuple[int, ...]:
        """Return the sorted key steps for a loop of ``num_steps`` iterations."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short string that :func:`parse_schedule` turns back into this schedule."""
        raise NotImplementedError


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


@dataclass(frozen=True)
class UniformSchedule(KeyStepSchedule):
    """A key step every ``interval`` steps: 0, interval, 2*interval, ...

    Example:
        >>> UniformSchedule(2).key_steps(5)
        (0, 2, 4)
    """

    interval: int

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise ValueError(f"UniformSchedule.interval must be an int >= 1, got {self.interval!r}")

    def key_steps(self, num_steps: int) -> tuple[int, ...]:
        _check_num_steps(num_steps)
        return tuple(range(0, num_steps, self.interval))

    def describe(self) -> str:
        return f"uniform:{self.interval}"


@dataclass(frozen=True)
class FasterDiffusionSchedule(KeyStepSchedule):
    """The paper's non-uniform schedule: key steps 0,1,2,3,5,10,15,25,35 of 50.

    For another number of steps the 50-step key steps are scaled proportionally and rounded
    (duplicates dropped), so the schedule keeps its shape: dense early, sparse late. Below 11 steps
    that would make most steps key steps (5 of 6), so the scaled schedule is thinned evenly over its
    key steps to half the steps, rounded up: 4-10 step samplers reuse the encoder at about half
    their steps. A 1-step loop has nothing to reuse; it warns.

    Example:
        >>> FasterDiffusionSchedule().key_steps(25)
        (0, 1, 2, 5, 8, 12, 18)
        >>> FasterDiffusionSchedule().key_steps(6), FasterDiffusionSchedule().key_steps(4)
        ((0, 1, 3), (0, 2))
    """

    def key_steps(self, num_steps: int) -> tuple[int, ...]:
        _check_num_steps(num_steps)
        if num_steps == 1:
            warnings.warn(
                "the faster-diffusion schedule of a 1-step loop is its key step 0 alone: encoder reuse saves nothing",
                UserWarning,
                stacklevel=2,
            )
        if num_steps == 50:
            return FASTER_DIFFUSION_KEY_STEPS_50
        scaled = sorted({min(num_steps - 1, round(k * num_steps / 50)) for k in FASTER_DIFFUSION_KEY_STEPS_50})
        keep = (num_steps + 1) // 2  # at most half the steps (rounded up) are key steps
        if len(scaled) > keep:
            scaled = [scaled[j * len(scaled) // keep] for j in range(keep)]
        return tuple(scaled)

    def describe(self) -> str:
        return "faster-diffusion"


@dataclass(frozen=True)
class ExplicitSchedule(KeyStepSchedule):
    """An explicit list of key steps; must contain 0, be non-negative and free of duplicates.

    Steps beyond the loop's length raise ``ValueError`` when the schedule is applied.

    Example:
        >>> ExplicitSchedule((0, 4, 2)).key_steps(6)
        (0, 2, 4)
    """

    steps: tuple[int, ...]

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        if not steps:
            raise ValueError("ExplicitSchedule.steps must not be empty")
        if any(not isinstance(s, int) or isinstance(s, bool) for s in steps):
            raise ValueError(f"ExplicitSchedule.steps must be ints, got {steps!r}")
        if min(steps) < 0:
            raise ValueError(f"ExplicitSchedule.steps must be >= 0, got {steps!r}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"ExplicitSchedule.steps has duplicates: {steps!r}")
        if 0 not in steps:
            raise ValueError(f"ExplicitSchedule.steps must contain step 0 (the first step is always a key step), got {steps!r}")
        object.__setattr__(self, "steps", tuple(sorted(steps)))

    def key_steps(self, num_steps: int) -> tuple[int, ...]:
        _check_num_steps(num_steps)
        if self.steps[-1] >= num_steps:
            raise ValueError(
                f"key step {self.steps[-1]} is out of range for a denoising loop of {num_steps} steps "
                f"(valid: 0..{num_steps - 1})"
            )
        return self.steps

    def describe(self) -> str:
        return ",".join(str(s) for s in self.steps)


@dataclass(frozen=True)
class AdaptiveSchedule(KeyStepSchedule):
    """Key steps decided online from how fast the cached features are changing.

    The first ``min_key_steps`` steps (at least 2) are key steps. At every later key step the
    relative L1 change of the deepest cached feature (the UNet's mid-block output), between this key
    step and the previous one, divided by the steps between them, gives the current *rate* of change; the
    next key step comes after ``threshold / rate`` steps (rounded down, at least 1, at most
    ``max_interval``), so that the features drift by about ``threshold`` between key steps. The
    change costs nothing to measure (both key steps' features are cached), nothing is calibrated per
    prompt, and the decisions depend only on the latents, so they are deterministic for a seed.
    Features change fastest early in sampling: the key steps come dense there and sparse later.

    Example:
        >>> schedule = parse_schedule("adaptive:0.3:6")
        >>> schedule.threshold, schedule.max_interval, schedule.adaptive
        (0.3, 6, True)
        >>> schedule.interval(0.2), schedule.interval(0.05), schedule.interval(0.01)
        (1, 6, 6)
    """

    threshold: float
    max_interval: int | None = None
    min_key_steps: int = 2

    adaptive = True

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold > 0:
            raise ValueError(f"AdaptiveSchedule.threshold must be a number > 0, got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.max_interval is not None and (
            not isinstance(self.max_interval, int) or isinstance(self.max_interval, bool) or self.max_interval < 1
        ):
            raise ValueError(f"AdaptiveSchedule.max_interval must be an int >= 1 or None, got {self.max_interval!r}")
        if not isinstance(self.min_key_steps, int) or isinstance(self.min_key_steps, bool) or self.min_key_steps < 2:
            raise ValueError(
                f"AdaptiveSchedule.min_key_steps must be an int >= 2 (two key steps give the first rate of change), "
                f"got {self.min_key_steps!r}"
            )

    def key_steps(self, num_steps: int) -> tuple[int, ...]:
        raise TypeError("an adaptive schedule has no fixed key steps: they are decided during the call")

    def interval(self, rate: float) -> int:
        """Steps until the next key step when the features change by ``rate`` (relative) per step."""
        steps = int(self.threshold / rate + 1e-9) if rate > 0 else self.max_interval or 1 << 30
        return max(1, min(steps, self.max_interval or steps))

    def describe(self) -> str:
        text = f"adaptive:{self.threshold:g}"
        if self.max_interval is not None or self.min_key_steps != 2:
            text += f":{self.max_interval or 0}"
        if self.min_key_steps != 2:
            text += f":{self.min_key_steps}"
        return text


def _parse_adaptive(spec: str, arg: str) -> AdaptiveSchedule:
    parts = arg.split(":")
    try:
        threshold = float(parts[0])
        rest = [int(part) for part in parts[1:]]
        if rest and rest[0] == 0:  # "adaptive:T:0:M": no interval cap
            rest[0] = None
    except ValueError:
        raise ValueError(
            f"bad adaptive schedule {spec!r}: expected 'adaptive:THRESHOLD[:MAX_INTERVAL[:MIN_KEY_STEPS]]', "
            "e.g. 'adaptive:0.3' or 'adaptive:0.3:4'"
        ) from None
    if len(rest) > 2:
        raise ValueError(f"bad adaptive schedule {spec!r}: at most THRESHOLD:MAX_INTERVAL:MIN_KEY_STEPS")
    return AdaptiveSchedule(threshold, *rest)


ScheduleLike = Union[KeyStepSchedule, str, Sequence[int]]


def parse_schedule(spec: ScheduleLike) -> KeyStepSchedule:
    """Turn a schedule, a string or a list of steps into a :class:`KeyStepSchedule`.

    Strings: ``"faster-diffusion"`` (alias ``"paper"``), ``"uniform:N"`` (alias ``"every:N"``),
    ``"all"`` (every step a key step, i.e. no reuse), ``"adaptive:T[:MAX_INTERVAL[:MIN_KEY_STEPS]]"``
    (:class:`AdaptiveSchedule`), or a comma-separated list ``"0,1,5,10"``.

    Example:
        >>> parse_schedule("uniform:3")
        UniformSchedule(interval=3)
    """
    if isinstance(spec, KeyStepSchedule):
        return spec
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("faster-diffusion", "paper"):
            return FasterDiffusionSchedule()
        if text == "all":
            return UniformSchedule(1)
        kind, sep, arg = text.partition(":")
        if sep and kind == "adaptive":
            return _parse_adaptive(spec, arg)
        if sep and kind in ("uniform", "every"):
            try:
                return UniformSchedule(int(arg))
            except ValueError:
                raise ValueError(f"bad uniform schedule {spec!r}: expected 'uniform:N' with an int N >= 1") from None
        try:
            return ExplicitSchedule(tuple(int(part) for part in text.split(",") if part.strip()))
        except ValueError as err:
            if "invalid literal" in str(err):
                raise ValueError(
                    f"unknown key-step schedule {spec!r}: use 'faster-diffusion', 'uniform:N', 'adaptive:T', "
                    "'all' or a comma-separated list of steps such as '0,1,5,10'"
                ) from None
            raise
    if isinstance(spec, (list, tuple, range)):
        return ExplicitSchedule(tuple(spec))
    raise ValueError(f"schedule must be a KeyStepSchedule, a string or a list of ints, got {type(spec).__name__}")
