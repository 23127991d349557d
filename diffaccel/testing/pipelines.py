"""The registry of tiny random-weight diffusers pipelines: :func:`tiny_pipeline` ``(name)``.

**All weights are random.** The pipelines run the real diffusers code (real pipeline classes, real
model classes, real schedulers and tokenizers), but the images and videos they produce are noise.
They exist to test and time code that wraps pipelines -- hooks, caches, patches, compilation --
not to judge output quality.

Nothing is downloaded: tokenizers come from :mod:`diffaccel.tokenizers`, models are built from
configs. A 2-step call with :data:`~diffaccel.testing.call_inputs.TINY_CALL_KWARGS` takes well
under a second on a CPU. Each family's builders live in their own module (``sd``, ``sdxl``,
``pixart``, ``sd3``, ``flux``, ``cogvideox``, ``wan``, ``ltx``); the names and call arguments in
:mod:`~diffaccel.testing.call_inputs`.

Example::

    >>> import torch
    >>> from diffaccel.testing import tiny_pipeline, tiny_call_inputs
    >>> pipe = tiny_pipeline("sd", seed=0, scheduler="euler")
    >>> out = pipe("a red circle", num_inference_steps=2, output_type="np",
    ...            generator=torch.Generator().manual_seed(0), **tiny_call_inputs("sd"))
    >>> out.images.shape
    (1, 64, 64, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .call_inputs import UNET_PIPELINE_NAMES, check_pipeline_name
from .cogvideox import tiny_cogvideox_pipeline
from .flux import tiny_flux_pipeline
from .ltx import tiny_ltx_pipeline
from .pixart import tiny_pixart_sigma_pipeline
from .sd import tiny_sd_controlnet_pipeline, tiny_sd_img2img_pipeline, tiny_sd_inpaint_pipeline, tiny_sd_pipeline
from .sd3 import tiny_sd3_pipeline
from .sdxl import tiny_sdxl_pipeline
from .wan import tiny_wan_pipeline

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import DiffusionPipeline

__all__ = ["tiny_pipeline"]

_BUILDERS: dict[str, Callable[..., DiffusionPipeline]] = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd-controlnet": tiny_sd_controlnet_pipeline,
    "sd-img2img": tiny_sd_img2img_pipeline,
    "sd-inpaint": tiny_sd_inpaint_pipeline,
    "pixart-sigma": tiny_pixart_sigma_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "cogvideox": tiny_cogvideox_pipeline,
    "wan": tiny_wan_pipeline,
    "ltx": tiny_ltx_pipeline,
}
_SCHEDULABLE = (*UNET_PIPELINE_NAMES, "pixart-sigma")


def _reject_scheduler_args(name: str, scheduler: str | None, prediction_type: str | None) -> None:
    if scheduler is not None or prediction_type is not None:
        raise ValueError(
            f"scheduler= and prediction_type= are only supported for the UNet pipelines "
            f"({', '.join(UNET_PIPELINE_NAMES)}) and 'pixart-sigma', not {name!r}"
        )


def tiny_pipeline(
    name: str,
    *,
    seed: int = 0,
    scheduler: str | None = None,
    prediction_type: str | None = None,
    **unet_overrides: Any,
) -> DiffusionPipeline:
    """Build the tiny **random-weight** pipeline ``name`` (one of :data:`PIPELINE_NAMES`) offline.

    Dispatches to ``tiny_<name>_pipeline`` (``-`` becomes ``_``). Outputs are noise; the point is
    to exercise real pipeline code quickly. Progress bars are disabled.

    Args:
        name: ``"sd"``, ``"sdxl"``, ``"sd-controlnet"``, ``"sd-img2img"``, ``"sd-inpaint"``,
            ``"pixart-sigma"``, ``"sd3"``, ``"flux"``, ``"cogvideox"``, ``"wan"`` or ``"ltx"``.
        seed: Seeds weight initialisation; the same seed gives identical weights. Global RNG state
            is untouched.
        scheduler: UNet pipelines (and PixArt-Sigma) only: one of :data:`SCHEDULER_NAMES`, built with
            ``<SchedulerClass>.from_config`` from the pipeline's noise-schedule config.
        prediction_type: UNet pipelines (and PixArt-Sigma) only: ``"epsilon"`` or ``"v_prediction"``.
        **unet_overrides: Config overrides for the denoiser (``UNet2DConditionModel`` for the UNet
            pipelines, the transformer for the others).

    Raises:
        ValueError: Unknown ``name`` (the message lists the supported ones), or ``scheduler`` /
            ``prediction_type`` given for a flow-matching or CogVideoX pipeline.

    Example::

        >>> from diffaccel.testing import tiny_pipeline, TINY_CALL_KWARGS
        >>> pipe = tiny_pipeline("wan", seed=1)
        >>> pipe("a red circle", num_inference_steps=2, output_type="np",
        ...      **TINY_CALL_KWARGS["wan"]).frames.shape
        (1, 9, 32, 32, 3)
    """
    check_pipeline_name(name)
    kwargs: dict[str, Any] = dict(unet_overrides)
    if name in _SCHEDULABLE:
        kwargs.update(scheduler=scheduler, prediction_type=prediction_type)
    else:
        _reject_scheduler_args(name, scheduler, prediction_type)
    return _BUILDERS[name](seed=seed, **kwargs)
