"""The bundled micro models: small models trained on ShapeWorld, shipped in ``assets/models/``.

* ``micro-clip`` -- a tiny ``transformers.CLIPModel`` (64x64 images, CLIP's tokenizer); its text
  tower is micro-SD's text encoder, and the whole model is an offline CLIP-score reward and the
  feature extractor of FID (:class:`MicroClipFeatures`).
* ``micro-sd`` -- a ``StableDiffusionPipeline`` (SD1.5's UNet block layout at small width, a 4x
  ``AutoencoderKL``, micro-CLIP's text tower) drawing 64x64 ShapeWorld scenes.
* ``micro-dit`` -- a ``StableDiffusion3Pipeline`` (a 12-block ``SD3Transformer2DModel`` trained with
  flow matching, micro-SD's VAE, micro-CLIP's text tower in both CLIP slots, a small trained T5)
  drawing the same 64x64 scenes: the image DiT that DiT caches and flow-model steering are measured on.
* ``micro-video`` -- a ``WanPipeline`` (``WanTransformer3DModel``, a 4x ``AutoencoderKLWan``, a small
  UMT5 text encoder) drawing 9-frame 64x64 clips of a ShapeWorld object in motion.

The folders are produced by the training scripts under ``train/`` (see their ``--export``); a
model that has not been exported yet raises :class:`FileNotFoundError` saying how to make it.
``DIFFACCEL_MODELS`` overrides the folder that holds them. Importing this module (and resolving a
name with :func:`micro_model_path`) does not import torch; the loaders do.

Example::

    >>> from diffaccel.micro_models import MICRO_MODELS, micro_model_path
    >>> MICRO_MODELS
    ('micro-clip', 'micro-sd', 'micro-dit', 'micro-video')
    >>> pipe = load_micro_sd()                    # doctest: +SKIP
    >>> pipe("a red circle above a blue square", num_inference_steps=25).images[0]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, WanPipeline
    from transformers import CLIPModel, CLIPTokenizer

__all__ = [
    "MICRO_MODELS",
    "MicroClipFeatures",  # noqa: F822 (defined on first use, by __getattr__)
    "load_micro_clip",
    "load_micro_dit",
    "load_micro_sd",
    "load_micro_video",
    "micro_model_path",
    "models_dir",
    "resolve_folder",
]

MICRO_MODELS: tuple[str, ...] = ("micro-clip", "micro-sd", "micro-dit", "micro-video")
_SCRIPTS = {"micro-clip": "micro_clip.py", "micro-sd": "micro_sd.py", "micro-dit": "micro_dit.py",
            "micro-video": "micro_video.py"}


def models_dir() -> pathlib.Path:
    """The folder holding the bundled models: ``$DIFFACCEL_MODELS`` or the repository's
    ``assets/models``."""
    override = os.environ.get("DIFFACCEL_MODELS")
    if override:
        return pathlib.Path(override)
    return pathlib.Path(__file__).resolve().parents[1] / "assets" / "models"


def micro_model_path(name: str) -> pathlib.Path:
    """The exported folder of micro model ``name``; raises if it is not there.

    Raises:
        ValueError: ``name`` is not one of :data:`MICRO_MODELS`.
        FileNotFoundError: the model has not been trained and exported yet.

    Example::

        >>> micro_model_path("micro-gan")
        Traceback (most recent call last):
        ...
        ValueError: name must be one of ('micro-clip', 'micro-sd', 'micro-dit', 'micro-video'), got 'micro-gan'
    """
    if name not in MICRO_MODELS:
        raise ValueError(f"name must be one of {MICRO_MODELS}, got {name!r}")
    path = models_dir() / name
    marker = "config.json" if name == "micro-clip" else "model_index.json"
    if not (path / marker).is_file():
        raise FileNotFoundError(
            f"{name} is not at {path} (no {marker}): its weights have not been exported yet. Train and "
            f"export it with `python train/{_SCRIPTS[name]} --resume --export {path}` from the repository.")
    return path


def resolve_folder(path: str | os.PathLike) -> str:
    """``path`` itself, or the bundled model's folder when ``path`` is one of :data:`MICRO_MODELS`
    and no such local folder exists: the bundled names work from any working directory.

    Example::

        >>> resolve_folder("micro-clip") == str(micro_model_path("micro-clip"))
        True
        >>> resolve_folder("path/to/clip")
        'path/to/clip'
    """
    path = os.fspath(path)
    if path in MICRO_MODELS and not os.path.isdir(path):
        return str(micro_model_path(path))
    return path


def load_micro_sd(device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                  ) -> StableDiffusionPipeline:
    """micro-SD as a stock ``StableDiffusionPipeline`` (64x64 images), offline; ``dtype`` None: float32."""
    from diffusers import StableDiffusionPipeline

    path = micro_model_path("micro-sd")
    pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=_dtype(dtype), local_files_only=True)
    pipe.set_progress_bar_config(disable=None)
    return pipe.to(device)


def load_micro_dit(device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                   ) -> StableDiffusion3Pipeline:
    """micro-DiT as a stock ``StableDiffusion3Pipeline`` (64x64 images), offline; ``dtype`` None: float32.

    Its defaults (28 flow-matching Euler steps, guidance 7, T5 read at 256 tokens) work as is; it
    was also trained at ``max_sequence_length=16``, which reads 16 T5 tokens instead of 256.

    Example::

        >>> pipe = load_micro_dit()                   # doctest: +SKIP
        >>> pipe("a red circle above a blue square").images[0]  # doctest: +SKIP
    """
    from diffusers import StableDiffusion3Pipeline

    path = micro_model_path("micro-dit")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), torch_dtype=_dtype(dtype), local_files_only=True)
    pipe.set_progress_bar_config(disable=None)
    return pipe.to(device)


def load_micro_video(device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                     ) -> WanPipeline:
    """micro-video as a stock ``WanPipeline``, offline; ``dtype`` None: float32."""
    from diffusers import WanPipeline

    path = micro_model_path("micro-video")
    return WanPipeline.from_pretrained(str(path), torch_dtype=_dtype(dtype), local_files_only=True).to(device)


def load_micro_clip(device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                    ) -> tuple[CLIPModel, CLIPTokenizer]:
    """micro-CLIP (``CLIPModel``, eval mode; ``dtype`` None: float32) and its tokenizer (CLIP's, built offline).

    Its images are 64x64 RGB scaled to [-1, 1] (``pixels * 2 - 1`` for images in [0, 1]).
    """
    from transformers import CLIPModel

    from .tokenizers import clip_tokenizer

    path = micro_model_path("micro-clip")
    model = CLIPModel.from_pretrained(str(path), dtype=_dtype(dtype), local_files_only=True)
    return model.to(device).eval(), clip_tokenizer()


def _dtype(dtype: torch.dtype | None) -> torch.dtype:
    import torch

    return torch.float32 if dtype is None else dtype


def __getattr__(name: str) -> Any:
    if name == "MicroClipFeatures":  # defined on first use: it subclasses torch.nn.Module
        return _define_micro_clip_features()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_micro_clip_features() -> type:
    import torch

    class MicroClipFeatures(torch.nn.Module):
        """micro-CLIP's image embeddings as a feature extractor for torchmetrics' FID.

        Takes ``(N, 3, H, W)`` images, uint8 in [0, 255] or float in [0, 1], resizes them to the
        model's input size and returns the projected image embeddings ``(N, projection_dim)``.

        Example::

            >>> from torchmetrics.image.fid import FrechetInceptionDistance   # doctest: +SKIP
            >>> fid = FrechetInceptionDistance(feature=MicroClipFeatures(), normalize=True)  # doctest: +SKIP
        """

        def __init__(self, model: CLIPModel | None = None) -> None:
            super().__init__()
            self.model = model if model is not None else load_micro_clip()[0]
            self.model.requires_grad_(False).eval()
            self.size = self.model.config.vision_config.image_size
            self.num_features = self.model.config.projection_dim

        @torch.no_grad()
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            if images.dtype == torch.uint8:
                images = images.float() / 255.0
            param = next(self.model.parameters())
            images = images.to(param.device, torch.float32)
            if images.shape[-2:] != (self.size, self.size):
                images = torch.nn.functional.interpolate(images, size=(self.size, self.size),
                                                         mode="bilinear", antialias=True, align_corners=False)
            out = self.model.get_image_features(pixel_values=(images * 2 - 1).to(param.dtype))
            if not isinstance(out, torch.Tensor):  # transformers 5 may return a model output
                out = out.pooler_output
            return out.float()

    MicroClipFeatures.__module__, MicroClipFeatures.__qualname__ = __name__, "MicroClipFeatures"
    globals()["MicroClipFeatures"] = MicroClipFeatures
    return MicroClipFeatures
