"""What a pipeline is before it loads, and how to load one: a local folder, a hub id, a bundled micro
model or a built-in random one, by name.

:class:`ModelInfo` is read from a folder's JSON files (or from the loaded pipeline, for a hub id),
so sizes, steps and the kind of pipeline can be checked before any model work. Importing this module
imports neither torch nor diffusers; the loaders import them when called. A model that cannot be
described or loaded raises :class:`ModelLoadError` with a one-line message (nothing is printed).

Example:
    >>> info = describe_model(RANDOM_VIDEO_MODEL)
    >>> info.pipeline, info.video, info.size_multiple, info.frame_step
    ('WanPipeline', True, 16, 4)
    >>> describe_model("org/name") is None   # a hub id: known once loaded
    True
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import DiffaccelError

_HUB_ID = re.compile(r"\w[\w.-]{0,95}/\w[\w.-]{0,95}")
#: Size rules the pipelines' own input checks add (class-name prefix -> multiple), beyond VAE x patch.
_PIPELINE_MULTIPLES = (("StableDiffusion", 8), ("PixArt", 8), ("CogVideoX", 8), ("Wan", 16), ("LTX", 32))
_PIPELINE_TEMPORAL = (("LTX", 8),)
_VIDEO_PIPELINES = ("Wan", "CogVideoX", "LTX", "HunyuanVideo", "Mochi", "Allegro", "Latte", "SkyReels")


class ModelLoadError(DiffaccelError, ValueError):
    """A model name that is no folder, bundled model or hub id, or a model diffusers cannot load."""


@dataclass(frozen=True)
class ModelInfo:
    """What the pre-flight checks know of a pipeline (class names as diffusers spells them).

    Example:
        >>> info = ModelInfo("StableDiffusionPipeline", "DDIMScheduler", 1000, "unet", spatial_factor=4)
        >>> info.size_multiple, info.flow, info.video, info.frame_step
        (8, False, False, None)
    """

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
        """Read a diffusers pipeline folder's ``model_index.json`` and component configs; ``flag``
        names the setting in the error.

        Example:
            >>> from diffaccel.micro_models import micro_model_path
            >>> ModelInfo.from_folder(micro_model_path("micro-sd")).pipeline
            'StableDiffusionPipeline'
            >>> ModelInfo.from_folder("no/such/folder", flag="model")
            Traceback (most recent call last):
            ...
            diffaccel.loading.ModelLoadError: model no/such/folder is not a diffusers pipeline folder (no model_index.json)
        """
        index = _read_json(os.path.join(folder, "model_index.json"))
        if index is None:
            raise ModelLoadError(f"{flag} {folder} is not a diffusers pipeline folder (no model_index.json)")
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
        """Of a loaded diffusers pipeline (for a hub id, known only once loaded).

        Example:
            >>> from diffaccel.testing import tiny_pipeline
            >>> ModelInfo.from_pipeline(tiny_pipeline("sd", sample_size=32)) == RANDOM_MODEL_INFO
            True
        """
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


#: The bundled micro-SD (``assets/models/micro-sd``), trained on ShapeWorld scenes.
DEFAULT_MODEL = "micro-sd"
#: The bundled micro-DiT (``assets/models/micro-dit``), a flow-matching SD3 transformer.
MICRO_DIT = "micro-dit"
#: A tiny Stable Diffusion pipeline with RANDOM weights, built in code.
RANDOM_MODEL = "diffaccel/tiny-random-sd"
#: What is known of :data:`RANDOM_MODEL` (``tiny_pipeline("sd", sample_size=32)``) without building it.
RANDOM_MODEL_INFO = ModelInfo("StableDiffusionPipeline", "DDIMScheduler", 1000, "unet", spatial_factor=8)
#: The bundled micro text-to-video model (``assets/models/micro-video``).
MICRO_VIDEO = "micro-video"
#: A tiny Wan pipeline with RANDOM weights, built in code.
RANDOM_VIDEO_MODEL = "diffaccel/tiny-random-wan"
#: What is known of :data:`RANDOM_VIDEO_MODEL` (``tiny_pipeline("wan")``) without building it.
RANDOM_VIDEO_INFO = ModelInfo("WanPipeline", "FlowMatchEulerDiscreteScheduler", 1000, "transformer",
                              spatial_factor=8, patch=2, temporal_factor=4)
#: The built-in random models, by name, for :func:`describe_model`.
BUILTIN_INFO = {RANDOM_MODEL: RANDOM_MODEL_INFO, RANDOM_VIDEO_MODEL: RANDOM_VIDEO_INFO}


def describe_model(model: str, builtin: Mapping[str, ModelInfo] = BUILTIN_INFO, missing_hint: str = "",
                   flag: str = "--model") -> ModelInfo | None:
    """The :class:`ModelInfo` of ``model`` before loading it: a built-in model (of ``builtin``), a
    bundled micro model, a local folder; None for a hub id (``org/name``, known once loaded).
    Anything else raises :class:`ModelLoadError`, its message naming ``flag`` (a bundled model not
    exported yet: followed by ``missing_hint``).

    Example:
        >>> describe_model(DEFAULT_MODEL).size_multiple
        8
        >>> describe_model("org/name", {}) is None
        True
        >>> describe_model("./missing", {})
        Traceback (most recent call last):
        ...
        diffaccel.loading.ModelLoadError: --model ./missing: no such folder (nor a hub id like org/name)
    """
    from .micro_models import MICRO_MODELS, micro_model_path

    if model in builtin:
        return builtin[model]
    if model in MICRO_MODELS:  # the bundled one, as the loaders do
        try:
            return ModelInfo.from_folder(micro_model_path(model), flag)
        except FileNotFoundError as err:
            raise ModelLoadError(f"{flag} {model}: {err}{missing_hint}") from None
    if os.path.isdir(model):
        return ModelInfo.from_folder(model, flag)
    if _HUB_ID.fullmatch(model) and ".." not in model and not os.path.isdir(model.split("/")[0]):
        return None
    raise ModelLoadError(f"{flag} {model}: no such folder (nor a hub id like org/name)")


def resolve_device(name: str | None) -> str:
    """``name`` checked as a torch device (None: cuda if available, else cpu).

    Example:
        >>> resolve_device("cpu")
        'cpu'
        >>> resolve_device("nosuch")
        Traceback (most recent call last):
        ...
        diffaccel.loading.ModelLoadError: --device nosuch: Expected one of cpu, cuda, ... device string: nosuch
    """
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ModelLoadError(f"--device {name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: CUDA is not available here")
    return name


def from_pretrained(model: str, dtype: Any) -> Any:
    """``DiffusionPipeline.from_pretrained`` (safetensors only); diffusers' ``OSError`` (offline, no
    such repo, no safetensors) becomes a :class:`ModelLoadError` with its message on one line.

    Example:
        >>> import torch
        >>> from diffaccel.micro_models import micro_model_path
        >>> type(from_pretrained(str(micro_model_path("micro-sd")), torch.float32)).__name__
        'StableDiffusionPipeline'
    """
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, use_safetensors=True)
    except OSError as err:
        raise ModelLoadError(f"--model {model}: {' '.join(str(err).split())}") from err


def load_pipeline(model: str, device: str, dtype: Any) -> Any:
    """Load the image pipeline ``model`` (a local folder, a hub id, :data:`DEFAULT_MODEL`,
    :data:`MICRO_DIT` or :data:`RANDOM_MODEL`) on ``device`` in ``dtype``.

    Example:
        >>> import torch
        >>> type(load_pipeline(DEFAULT_MODEL, "cpu", torch.float32)).__name__
        'StableDiffusionPipeline'
    """
    import torch

    if model == DEFAULT_MODEL:
        from .micro_models import load_micro_sd

        return load_micro_sd(device, dtype)
    if model == MICRO_DIT:
        from .micro_models import load_micro_dit

        return load_micro_dit(device, dtype)
    if model == RANDOM_MODEL:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline("sd", sample_size=32).to(device)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    return from_pretrained(model, dtype).to(device)


def load_video_pipeline(model: str, device: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """The video pipeline ``model`` (a local folder, a hub id, :data:`MICRO_VIDEO` or
    :data:`RANDOM_VIDEO_MODEL`) and the call arguments it needs (sizes, text length).

    Example:
        >>> import torch
        >>> pipe, call = load_video_pipeline(RANDOM_VIDEO_MODEL, "cpu", torch.float32)
        >>> type(pipe).__name__, call["height"]
        ('WanPipeline', 32)
    """
    if model == RANDOM_VIDEO_MODEL:
        from .testing import tiny_call_inputs, tiny_pipeline

        call = {k: v for k, v in tiny_call_inputs("wan").items() if k != "num_frames"}
        return tiny_pipeline("wan").to(device, dtype), call
    if model == MICRO_VIDEO:
        from .micro_models import load_micro_video

        return load_micro_video(device, dtype), {"height": 64, "width": 64}
    return from_pretrained(model, dtype).to(device), {}


def load_any_pipeline(model: str, device: str, dtype: Any) -> tuple[Any, ModelInfo, dict[str, Any]]:
    """Load ``model``, an image or a video pipeline (a built-in, bundled or local one is known to be
    a video one before loading, a hub id once loaded): the pipeline, its :class:`ModelInfo` and the
    call arguments it needs (``{}`` for image pipelines).

    Example:
        >>> import torch
        >>> pipe, info, call = load_any_pipeline(RANDOM_VIDEO_MODEL, "cpu", torch.float32)
        >>> type(pipe).__name__, info.video, call["height"]
        ('WanPipeline', True, 32)
        >>> pipe, info, call = load_any_pipeline(RANDOM_MODEL, "cpu", torch.float32)
        >>> type(pipe).__name__, info.video, call
        ('StableDiffusionPipeline', False, {})
    """
    info = describe_model(model)
    if info is not None and info.video:
        pipe, call = load_video_pipeline(model, device, dtype)
        return pipe, info, call
    pipe = load_pipeline(model, device, dtype)
    return pipe, info or ModelInfo.from_pipeline(pipe), {}
