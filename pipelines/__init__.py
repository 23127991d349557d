"""Drop-in accelerated pipeline classes, imported as ``diffaccel.pipelines``.

Example:
    >>> from diffaccel.pipelines import AcceleratedStableDiffusionPipeline
    >>> from diffusers import StableDiffusionPipeline
    >>> issubclass(AcceleratedStableDiffusionPipeline, StableDiffusionPipeline)
    True
"""

from .stable_diffusion import AcceleratedStableDiffusionPipeline, AcceleratedStableDiffusionXLPipeline

__all__ = ["AcceleratedStableDiffusionPipeline", "AcceleratedStableDiffusionXLPipeline"]
