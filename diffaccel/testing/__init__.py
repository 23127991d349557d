"""Tiny random-weight diffusers pipelines for tests and CPU benchmarks, built fully offline.

**Every model here has random weights: the pipelines draw noise.** They run the real diffusers
pipeline, model and scheduler code with real (offline) tokenizers, so they are the right tool to
test code that hooks into, patches, caches or compiles pipelines -- and the wrong one to judge
image quality. Nothing is downloaded from the Hugging Face hub.

Example::

    >>> import torch
    >>> from diffaccel.testing import PIPELINE_NAMES, tiny_call_inputs, tiny_pipeline
    >>> pipe = tiny_pipeline("sd", seed=0, scheduler="euler", prediction_type="v_prediction")
    >>> out = pipe("a red circle", num_inference_steps=2, output_type="np",
    ...            generator=torch.Generator().manual_seed(0), **tiny_call_inputs("sd"))
    >>> out.images.shape
    (1, 64, 64, 3)
    >>> video = tiny_pipeline("wan")("a red circle", num_inference_steps=2, output_type="np",
    ...                              **tiny_call_inputs("wan")).frames
    >>> video.shape    # (batch, frames, height, width, channels)
    (1, 9, 32, 32, 3)

Contents (one module per model family):

* :func:`tiny_pipeline` (``name`` in :data:`PIPELINE_NAMES`; the registry, :mod:`.pipelines`) and the
  per-pipeline builders: ``tiny_sd_pipeline``, ``tiny_sd_controlnet_pipeline``,
  ``tiny_sd_img2img_pipeline``, ``tiny_sd_inpaint_pipeline`` (:mod:`.sd`), ``tiny_sdxl_pipeline``
  (:mod:`.sdxl`), ``tiny_pixart_sigma_pipeline`` (:mod:`.pixart`), ``tiny_sd3_pipeline`` (:mod:`.sd3`),
  ``tiny_flux_pipeline`` (:mod:`.flux`), ``tiny_cogvideox_pipeline`` (:mod:`.cogvideox`),
  ``tiny_wan_pipeline`` (:mod:`.wan`), ``tiny_ltx_pipeline`` (:mod:`.ltx`).
* :data:`TINY_CALL_KWARGS` / :func:`tiny_call_inputs` (:mod:`.call_inputs`): fast call arguments (sizes,
  frame counts, text lengths, input images for img2img / inpaint / ControlNet).
* :func:`sd15_layout_pipeline` (:mod:`.sd15_layout`): SD 1.5's exact UNet layout at any width (full
  size for GPU benchmarks, narrow for CPU ones).
* :mod:`diffaccel.testing.components`: the tiny text encoders, VAEs, UNet config
  (:func:`tiny_unet_config`) and scheduler helpers.
* Offline tokenizers live in :mod:`diffaccel.tokenizers`.
"""

from .call_inputs import (
    IMAGE_CONDITIONED_NAMES,
    PIPELINE_NAMES,
    TINY_CALL_KWARGS,
    UNET_PIPELINE_NAMES,
    VIDEO_PIPELINE_NAMES,
    tiny_call_inputs,
)
from .cogvideox import tiny_cogvideox_pipeline
from .components import (
    SCHEDULER_NAMES,
    make_scheduler,
    seeded,
    tiny_clip_text_encoder,
    tiny_t5_encoder,
    tiny_unet_config,
    tiny_vae,
)
from .flux import tiny_flux_pipeline
from .ltx import tiny_ltx_pipeline
from .pipelines import tiny_pipeline
from .pixart import tiny_pixart_sigma_pipeline
from .sd import tiny_sd_controlnet_pipeline, tiny_sd_img2img_pipeline, tiny_sd_inpaint_pipeline, tiny_sd_pipeline
from .sd3 import tiny_sd3_pipeline
from .sd15_layout import SD15_DOWN_BLOCK_TYPES, SD15_UP_BLOCK_TYPES, sd15_layout_pipeline
from .sdxl import tiny_sdxl_pipeline
from .wan import tiny_wan_pipeline

__all__ = [
    "IMAGE_CONDITIONED_NAMES",
    "PIPELINE_NAMES",
    "SCHEDULER_NAMES",
    "SD15_DOWN_BLOCK_TYPES",
    "SD15_UP_BLOCK_TYPES",
    "TINY_CALL_KWARGS",
    "UNET_PIPELINE_NAMES",
    "VIDEO_PIPELINE_NAMES",
    "make_scheduler",
    "sd15_layout_pipeline",
    "seeded",
    "tiny_call_inputs",
    "tiny_clip_text_encoder",
    "tiny_cogvideox_pipeline",
    "tiny_flux_pipeline",
    "tiny_ltx_pipeline",
    "tiny_pipeline",
    "tiny_pixart_sigma_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_controlnet_pipeline",
    "tiny_sd_img2img_pipeline",
    "tiny_sd_inpaint_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_encoder",
    "tiny_unet_config",
    "tiny_vae",
    "tiny_wan_pipeline",
]
