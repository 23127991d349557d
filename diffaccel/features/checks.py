"""Validation helpers for config ``__post_init__`` methods: each raises a ``ValueError`` that names
the config and the field (``"DeltaCacheConfig.first_steps must be an int >= 0, got -1"``).

Example:
    >>> check_int("DeltaCacheConfig", "first_steps", 0, minimum=0)
    >>> check_int("DeltaCacheConfig", "first_steps", -1, minimum=0)
    Traceback (most recent call last):
    ...
    ValueError: DeltaCacheConfig.first_steps must be an int >= 0, got -1
"""

from __future__ import annotations

from typing import Any, Sequence


def check_int(owner: str, name: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    """``value`` is an int (not a bool) ``>= minimum``, or ``None`` when ``optional``.

    Example:
        >>> check_int("FKSteeringConfig", "max_batch", None, optional=True)
        >>> check_int("FKSteeringConfig", "max_batch", True, optional=True)
        Traceback (most recent call last):
        ...
        ValueError: FKSteeringConfig.max_batch must be an int >= 1 or None, got True
    """
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_fraction(owner: str, name: str, value: Any, include_zero: bool = True) -> None:
    """``value`` is a number (not a bool) in ``[0, 1]``, or in ``(0, 1]`` without ``include_zero``.

    Example:
        >>> check_fraction("EncoderReuseConfig", "noise_injection_below", 0.0, include_zero=False)
        Traceback (most recent call last):
        ...
        ValueError: EncoderReuseConfig.noise_injection_below must be in (0, 1], got 0.0
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0.0 <= value <= 1.0 if include_zero else 0.0 < value <= 1.0):
        raise ValueError(f"{owner}.{name} must be in {'[' if include_zero else '('}0, 1], got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` is one of ``choices``.

    Example:
        >>> check_choice("QuantizedAttentionConfig", "impl", "cuda", ("auto", "triton", "reference"))
        Traceback (most recent call last):
        ...
        ValueError: QuantizedAttentionConfig.impl must be one of ('auto', 'triton', 'reference'), got 'cuda'
    """
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(owner: str, name: str, value: Any, optional: bool = False) -> None:
    """``value`` is ``True`` or ``False``, or ``None`` when ``optional``.

    Example:
        >>> check_bool("EncoderReuseConfig", "parallel", 1, optional=True)
        Traceback (most recent call last):
        ...
        ValueError: EncoderReuseConfig.parallel must be True, False or None, got 1
    """
    if optional and value is None:
        return
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be {'True, False or None' if optional else 'True or False'}, got {value!r}")
