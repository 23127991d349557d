"""Argument value types and pre-flight checks shared by the ``diffaccel`` commands.

Everything here runs before any model work and imports neither torch nor diffusers, so a bad input
is a one-line error within a second: the argparse value types raise ``argparse.ArgumentTypeError``
(a usage error), the checks raise ``SystemExit`` with a ``diffaccel: error:`` line (via :func:`fail`).
:class:`ModelInfo` is what the checks know of a pipeline, read from its folder's JSON files before
loading it (or from the loaded pipeline, for a hub id).

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
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

#: Default caps; ``--max-steps``, ``--max-size`` and ``--max-frames`` raise them.
MAX_STEPS, MAX_SIZE, MAX_FRAMES = 1000, 2048, 257

#: ``--reward`` forms; the default needs no weights (it parses ShapeWorld captions).
REWARD_HELP = (
    "shapeworld (default; ShapeWorld captions), shapeworld-layout (colors and positions only), "
    "clip:MODEL[:PRETRAINED] (open_clip), "
    "transformers-clip:FOLDER (a CLIPModel folder, or micro-clip: the bundled one), aesthetic:HEAD.safetensors"
)

_HUB_ID = re.compile(r"\w[\w.-]{0,95}/\w[\w.-]{0,95}")
#: Size rules the pipelines' own input checks add (class-name prefix -> multiple), beyond VAE x patch.
_PIPELINE_MULTIPLES = (("StableDiffusion", 8), ("PixArt", 8), ("CogVideoX", 8), ("Wan", 16), ("LTX", 32))
_PIPELINE_TEMPORAL = (("LTX", 8),)
_VIDEO_PIPELINES = ("Wan", "CogVideoX", "LTX", "HunyuanVideo", "Mochi", "Allegro", "Latte", "SkyReels")


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
    kind is known, and the folder or file it names exists.

    Example:
        >>> reward_spec("transformers-clip:micro-clip")
        'transformers-clip:micro-clip'
        >>> reward_spec("nosuch")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: unknown reward 'nosuch'; use shapeworld (default; ...
    """
    kind, _, rest = spec.partition(":")
    if kind in ("shapeworld", "shapeworld-layout") and not rest:
        return spec
    if kind == "clip" and rest.partition(":")[0]:
        pretrained = rest.partition(":")[2]
        if (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))) and not os.path.isfile(pretrained):
            raise argparse.ArgumentTypeError(f"no such weights file: {pretrained}")
        return spec
    if kind == "transformers-clip" and rest:
        from ..micro_models import resolve_folder

        try:
            folder = resolve_folder(rest)
        except FileNotFoundError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise argparse.ArgumentTypeError(f"not a transformers CLIPModel folder (no config.json): {rest}")
        return spec
    if kind == "aesthetic" and rest:
        if not os.path.isfile(rest):
            raise argparse.ArgumentTypeError(f"no such aesthetic head file: {rest}")
        return spec
    raise argparse.ArgumentTypeError(f"unknown reward {spec!r}; use {REWARD_HELP}")


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


@dataclass(frozen=True)
class ModelInfo:
    """What the pre-flight checks know of a pipeline (class names as diffusers spells them)."""

    pipeline: str
    scheduler: str
    num_train_timesteps: int | None = None
    denoiser: str | None = None  # "unet" or "transformer"
    spatial_factor: int | None = None  # how much the VAE downsamples
    patch: int = 1  # the transformer's spatial patch size
    temporal_factor: int | None = None  # how much a video VAE compresses time

    @property
    def flow(self) -> bool:
        """Whether the scheduler is flow matching (what RBF search needs)."""
        return self.scheduler.startswith("FlowMatch")

    @property
    def video(self) -> bool:
        """Whether the pipeline draws clips."""
        return self.pipeline.startswith(_VIDEO_PIPELINES) or "Video" in self.pipeline

    @property
    def size_multiple(self) -> int | None:
        """What height and width must be a multiple of (None: unknown)."""
        rule = next((m for prefix, m in _PIPELINE_MULTIPLES if self.pipeline.startswith(prefix)), 1)
        latent = self.spatial_factor * self.patch if self.spatial_factor else 1
        multiple = math.lcm(rule, latent)
        return multiple if multiple > 1 else None

    @property
    def frame_step(self) -> int | None:
        """Clips have ``frame_step * k + 1`` frames (None: unknown or not a video)."""
        rule = next((m for prefix, m in _PIPELINE_TEMPORAL if self.pipeline.startswith(prefix)), None)
        return self.temporal_factor or rule

    @classmethod
    def from_configs(cls, pipeline: str, configs: Mapping[str, Mapping[str, Any]]) -> ModelInfo:
        """From the component configs (``"scheduler"``, ``"vae"``, ``"unet"`` or ``"transformer"``),
        each a ``config.json`` dict with its ``_class_name``.

        Example:
            >>> ModelInfo.from_configs("WanPipeline", {"scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler"},
            ...     "vae": {"scale_factor_spatial": 4, "scale_factor_temporal": 2},
            ...     "transformer": {"patch_size": [1, 2, 2]}}).size_multiple
            16
        """
        scheduler, vae = configs.get("scheduler", {}), configs.get("vae", {})
        denoiser = next((name for name in ("unet", "transformer") if name in configs), None)
        patch = configs.get("transformer", {}).get("patch_size") or 1
        return cls(
            pipeline=pipeline,
            scheduler=str(scheduler.get("_class_name", "")),
            num_train_timesteps=scheduler.get("num_train_timesteps"),
            denoiser=denoiser,
            spatial_factor=_spatial_factor(vae),
            patch=2 if pipeline.startswith("Flux") else int(patch[-1] if isinstance(patch, (list, tuple)) else patch),
            temporal_factor=_first_int(vae, ("scale_factor_temporal", "temporal_compression_ratio")),
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, flag: str = "--model") -> ModelInfo:
        """Read a diffusers pipeline folder's ``model_index.json`` and component configs."""
        index = _read_json(os.path.join(folder, "model_index.json"))
        if index is None:
            fail(f"{flag} {folder} is not a diffusers pipeline folder (no model_index.json)")
        configs = {}
        for name in ("scheduler", "vae", "unet", "transformer"):
            entry = index.get(name)
            if not isinstance(entry, list) or entry[-1] is None:
                continue
            file = "scheduler_config.json" if name == "scheduler" else "config.json"
            configs[name] = {"_class_name": entry[-1], **(_read_json(os.path.join(folder, name, file)) or {})}
        return cls.from_configs(str(index.get("_class_name", "")), configs)

    @classmethod
    def from_pipeline(cls, pipe: Any) -> ModelInfo:
        """Of a loaded diffusers pipeline (for a hub id, known only once loaded)."""
        configs = {}
        for name in ("scheduler", "vae", "unet", "transformer"):
            component = getattr(pipe, name, None)
            if component is not None:
                configs[name] = {**dict(component.config), "_class_name": type(component).__name__}
        return cls.from_configs(type(pipe).__name__, configs)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _first_int(config: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    return next((int(config[key]) for key in keys if config.get(key)), None)


def _spatial_factor(vae: Mapping[str, Any]) -> int | None:
    factor = _first_int(vae, ("scale_factor_spatial", "spatial_compression_ratio"))
    if factor is None and vae.get("block_out_channels"):
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return factor


def describe_model(model: str, builtin: Mapping[str, ModelInfo], missing_hint: str = "") -> ModelInfo | None:
    """The :class:`ModelInfo` of ``--model`` before loading it: a built-in model, a bundled micro
    model, a local folder; None for a hub id (``org/name``, known once loaded). Anything else fails.

    Example:
        >>> describe_model("org/name", {}) is None
        True
        >>> describe_model("./missing", {})
        Traceback (most recent call last):
        ...
        SystemExit: diffaccel: error: --model ./missing: no such folder (nor a hub id like org/name)
    """
    from ..micro_models import MICRO_MODELS, micro_model_path

    if model in builtin:
        return builtin[model]
    if model in MICRO_MODELS:  # the bundled one, as the loaders do
        try:
            return ModelInfo.from_folder(micro_model_path(model))
        except FileNotFoundError as err:
            fail(f"--model {model}: {err}{missing_hint}")
    if os.path.isdir(model):
        return ModelInfo.from_folder(model)
    if _HUB_ID.fullmatch(model) and ".." not in model and not os.path.isdir(model.split("/")[0]):
        return None
    fail(f"--model {model}: no such folder (nor a hub id like org/name)")


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
