"""Argument value types and pre-flight checks shared by the ``diffaccel`` commands.

Everything here runs before any model work and imports neither torch nor diffusers, so a bad input
is a one-line error within a second: the argparse value types raise ``argparse.ArgumentTypeError``
(a usage error), the checks raise ``SystemExit`` with a ``diffaccel: error:`` line (via :func:`fail`).
:class:`~diffaccel.loading.ModelInfo` is what the checks know of a pipeline, read from its folder's
JSON files before loading it (or from the loaded pipeline, for a hub id); the library's errors
(:mod:`diffaccel.loading`, :mod:`diffaccel.rewards.spec`) become the commands' one-line errors here.

Example:
    >>> positive_int("3"), non_negative_int("0"), non_negative_float("0.5"), fraction("1")
    (3, 0, 0.5, 1.0)
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be >= 1, got 0
    >>> info = ModelInfo("StableDiffusionPipeline", "DDIMScheduler", 1000, "unet", spatial_factor=4)
    >>> info.size_multiple, info.flow, info.video
    (8, False, False)
    >>> check_size(info, "micro-sd", 65, None)
    Traceback (most recent call last):
    ...
    SystemExit: diffaccel: error: --height 65: micro-sd needs a multiple of 8 (e.g. 64 or 72)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from typing import NoReturn

from .. import loading
from ..loading import ModelInfo
from ..rewards.spec import REWARD_HELP, RewardSpecError, check_reward_spec  # noqa: F401  (REWARD_HELP: the help text)

#: Default caps; ``--max-steps``, ``--max-size`` and ``--max-frames`` raise them.
MAX_STEPS, MAX_SIZE, MAX_FRAMES = 1000, 2048, 257


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A float >= 0 (NaN is refused)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A float in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def reward_spec(spec: str) -> str:
    """A ``--reward`` string (see :data:`REWARD_HELP`), checked without loading anything: the
    kind is known, and the folder or file it names exists (:func:`~diffaccel.rewards.check_reward_spec`).

    Example:
        >>> reward_spec("transformers-clip:micro-clip")
        'transformers-clip:micro-clip'
        >>> reward_spec("nosuch")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: unknown reward 'nosuch'; use shapeworld (default; ...
    """
    try:
        return check_reward_spec(spec)
    except RewardSpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def fail(message: str) -> NoReturn:
    """Stop the command with a one-line error (exit status 1)."""
    raise SystemExit(f"diffaccel: error: {message}")


def warn(message: str) -> None:
    """Tell the user, on stderr, that a setting does nothing (or was changed)."""
    print(f"diffaccel: warning: {message}", file=sys.stderr)


def check_cap(flag: str, value: int | None, cap_flag: str, cap: int) -> None:
    """Refuse ``value`` above ``cap`` (raised by ``cap_flag``)."""
    if value is not None and value > cap:
        fail(f"{flag} {value} is above {cap_flag} {cap}; pass {cap_flag} {value} to allow it")


def check_output_path(path: str | None, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """Make sure ``path`` can be written after the run: the suffix, the folder (created now), a test
    write in it. Nothing is checked when ``path`` is None.

    Example:
        >>> check_output_path("image.txt", "--out", (".png",))
        Traceback (most recent call last):
        ...
        SystemExit: diffaccel: error: --out must end with .png: image.txt
    """
    if path is None:
        return
    if suffixes and not path.lower().endswith(suffixes):
        fail(f"{flag} must end with {' or '.join(suffixes)}: {path}")
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        fail(f"{flag} {path}: cannot write there ({err.strerror or err})")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        fail(f"{flag} {path}: the file is not writable")


def describe_model(model: str, builtin: Mapping[str, ModelInfo], missing_hint: str = "") -> ModelInfo | None:
    """The :class:`ModelInfo` of ``--model`` before loading it: a built-in model, a bundled micro
    model, a local folder; None for a hub id (``org/name``, known once loaded). Anything else fails
    (:func:`diffaccel.loading.describe_model`'s error as a one-line error).

    Example:
        >>> describe_model("org/name", {}) is None
        True
        >>> describe_model("./missing", {})
        Traceback (most recent call last):
        ...
        SystemExit: diffaccel: error: --model ./missing: no such folder (nor a hub id like org/name)
    """
    try:
        return loading.describe_model(model, builtin, missing_hint)
    except loading.ModelLoadError as err:
        fail(str(err))


def check_steps(info: ModelInfo, model: str, steps: int) -> None:
    """A diffusion (not flow-matching) scheduler has at most its training timesteps as steps."""
    limit = info.num_train_timesteps
    if not info.flow and limit and steps > limit:
        fail(f"--steps {steps}: {model}'s {info.scheduler} has {limit} training timesteps, so at most {limit} steps")


def check_size(info: ModelInfo, model: str, height: int | None, width: int | None) -> None:
    """Height and width must be multiples of what the VAE, the patching and the pipeline need."""
    multiple = info.size_multiple
    for flag, value in (("--height", height), ("--width", width)):
        if multiple and value is not None and value % multiple:
            lower = max(multiple, value // multiple * multiple)
            fail(f"{flag} {value}: {model} needs a multiple of {multiple} (e.g. {lower} or {lower + multiple})")


def check_frames(info: ModelInfo, model: str, frames: int) -> None:
    """A video VAE that compresses time by t takes ``t * k + 1`` frames."""
    step = info.frame_step
    if step and (frames - 1) % step:
        lower = (frames - 1) // step * step + 1
        fail(f"--frames {frames}: {model} needs {step}k + 1 frames (e.g. {lower} or {lower + step})")


def check_kind(info: ModelInfo, model: str, *, video: bool) -> None:
    """``generate`` takes image pipelines, ``generate-video`` video ones."""
    if info.video and not video:
        fail(f"--model {model} is a text-to-video pipeline ({info.pipeline}): use `diffaccel generate-video`")
    if video and not info.video:
        fail(f"--model {model} is not a text-to-video pipeline ({info.pipeline}): use `diffaccel generate`")


def check_preset_alone(args: argparse.Namespace, info: ModelInfo) -> None:
    """``--preset`` on a DiT is the delta cache: refuse ``--delta-cache`` beside it."""
    if getattr(args, "preset", None) is not None and info.denoiser == "transformer" and args.delta_cache is not None:
        fail(f"--preset {args.preset} and --delta-cache both configure {args.model}'s delta cache: give one")
