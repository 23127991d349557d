"""The tiny pipelines' names and fast call arguments, with deterministic input images.

:func:`tiny_call_inputs` gives the keyword arguments of a fast call of any tiny pipeline: sizes,
frame counts, text lengths and, for img2img / inpainting / ControlNet, seeded PIL input images.

Example::

    >>> from diffaccel.testing.call_inputs import TINY_CALL_KWARGS, tiny_call_inputs
    >>> TINY_CALL_KWARGS["wan"]["num_frames"]
    9
    >>> sorted(tiny_call_inputs("sd-inpaint"))
    ['height', 'image', 'mask_image', 'width']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._assembly import SD_IMAGE

__all__ = [
    "IMAGE_CONDITIONED_NAMES",
    "PIPELINE_NAMES",
    "TINY_CALL_KWARGS",
    "UNET_PIPELINE_NAMES",
    "VIDEO_PIPELINE_NAMES",
    "check_pipeline_name",
    "tiny_call_inputs",
]

#: Every name accepted by :func:`tiny_pipeline`.
PIPELINE_NAMES: tuple[str, ...] = (
    "sd",
    "sdxl",
    "sd-controlnet",
    "sd-img2img",
    "sd-inpaint",
    "pixart-sigma",
    "sd3",
    "flux",
    "cogvideox",
    "wan",
    "ltx",
)
#: Pipelines whose denoiser is a ``UNet2DConditionModel`` (``scheduler=`` / ``prediction_type=`` apply).
UNET_PIPELINE_NAMES: tuple[str, ...] = ("sd", "sdxl", "sd-controlnet", "sd-img2img", "sd-inpaint")
#: Pipelines that need an input image (see :func:`tiny_call_inputs`).
IMAGE_CONDITIONED_NAMES: tuple[str, ...] = ("sd-controlnet", "sd-img2img", "sd-inpaint")
#: Pipelines that return videos: ``output_type="np"`` gives ``frames`` of shape (B, F, H, W, 3).
VIDEO_PIPELINE_NAMES: tuple[str, ...] = ("cogvideox", "wan", "ltx")

#: Keyword arguments for a fast call of each tiny pipeline (sizes, frame counts, text lengths).
#: Use as ``pipe(prompt, num_inference_steps=2, **TINY_CALL_KWARGS[name])``; the image-conditioned
#: pipelines also need the inputs from :func:`tiny_call_inputs`. Frame-count rules: CogVideoX and
#: Wan need ``num_frames = 4k + 1``, LTX ``8k + 1`` is recommended (``4k + 1`` works).
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "sd": {"height": SD_IMAGE, "width": SD_IMAGE},
    "sdxl": {"height": SD_IMAGE, "width": SD_IMAGE},
    "sd-controlnet": {"height": SD_IMAGE, "width": SD_IMAGE},
    "sd-img2img": {},  # output size follows the input image (64x64 from tiny_call_inputs)
    "sd-inpaint": {"height": SD_IMAGE, "width": SD_IMAGE},
    "pixart-sigma": {
        "height": 64,
        "width": 64,
        "max_sequence_length": 16,
        "use_resolution_binning": False,  # aspect-ratio bins exist only for the real sample sizes
        "clean_caption": False,  # True needs beautifulsoup4 + ftfy and only warns without them
    },
    "sd3": {"height": 64, "width": 64, "max_sequence_length": 16},
    "flux": {"height": 64, "width": 64, "max_sequence_length": 16},
    "cogvideox": {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16},
    "wan": {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16},
    "ltx": {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16},
}


def check_pipeline_name(name: str) -> None:
    """Raise ``ValueError`` (listing :data:`PIPELINE_NAMES`) unless ``name`` is a tiny pipeline's name.

    Example::

        >>> check_pipeline_name("sd")
        >>> check_pipeline_name("sd2")
        Traceback (most recent call last):
        ...
        ValueError: unknown tiny pipeline 'sd2'; supported: sd, sdxl, ...
    """
    if name not in PIPELINE_NAMES:
        raise ValueError(f"unknown tiny pipeline {name!r}; supported: {', '.join(PIPELINE_NAMES)}")


def _test_image(rng: Any, height: int, width: int) -> Any:
    """A smooth random colour pattern (low-frequency sinusoids) plus a little noise, as PIL RGB."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fy, fx = rng.uniform(0.5, 3.0, size=2) * 2 * np.pi
        phase = rng.uniform(0, 2 * np.pi)
        channels.append(0.5 + 0.4 * np.sin(fy * yy / height + fx * xx / width + phase))
    img = np.stack(channels, axis=-1) * 255 + rng.normal(0.0, 8.0, size=(height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def _test_control_image(rng: Any, height: int, width: int) -> Any:
    """An edge-map-like control image: white rectangle outlines on black, as PIL RGB."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        draw.rectangle((x0, y0, x1 + 1, y1 + 1), outline=(255, 255, 255), width=max(1, width // 32))
    return img


def _test_mask(rng: Any, height: int, width: int) -> Any:
    """A white (repaint) rectangle of random size and position on a black mask, as PIL "L"."""
    import numpy as np
    from PIL import Image

    mask = np.zeros((height, width), dtype=np.uint8)
    h, w = int(rng.integers(height // 4, height // 2 + 1)), int(rng.integers(width // 4, width // 2 + 1))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    mask[top : top + h, left : left + w] = 255
    return Image.fromarray(mask, mode="L")


def tiny_call_inputs(name: str, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for a fast call of tiny pipeline ``name``: sizes plus any required images.

    Returns a fresh copy of :data:`TINY_CALL_KWARGS` ``[name]``, and for the image-conditioned
    pipelines adds deterministic (``seed``) PIL inputs at the pipeline's default size:
    ``"sd-img2img"``: ``image`` (a smooth random colour pattern); ``"sd-inpaint"``: ``image`` and
    ``mask_image`` (a random white rectangle = repaint); ``"sd-controlnet"``: ``image`` (the
    control image: white rectangle outlines on black, like an edge map). With ``batch_size > 1`` those are lists of
    ``batch_size`` different images (pass ``batch_size`` prompts too). The prompt, step count and
    ``generator`` are up to the caller.

    Example::

        >>> from diffaccel.testing import tiny_pipeline, tiny_call_inputs
        >>> pipe = tiny_pipeline("sd-inpaint")
        >>> inputs = tiny_call_inputs("sd-inpaint", batch_size=2)
        >>> pipe(["a red circle", "a blue square"], num_inference_steps=2, output_type="np",
        ...      **inputs).images.shape
        (2, 64, 64, 3)
    """
    import numpy as np

    check_pipeline_name(name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kwargs = dict(TINY_CALL_KWARGS[name])
    if name not in IMAGE_CONDITIONED_NAMES:
        return kwargs
    height = kwargs.get("height", SD_IMAGE)
    width = kwargs.get("width", SD_IMAGE)
    rng = np.random.default_rng(seed)

    def batch(make: Callable[[], Any]) -> Any:
        items = [make() for _ in range(batch_size)]
        return items[0] if batch_size == 1 else items

    if name == "sd-controlnet":
        kwargs["image"] = batch(lambda: _test_control_image(rng, height, width))
    else:
        kwargs["image"] = batch(lambda: _test_image(rng, height, width))
    if name == "sd-inpaint":
        kwargs["mask_image"] = batch(lambda: _test_mask(rng, height, width))
    return kwargs
