"""Accelerated drop-ins for diffusers' Stable Diffusion pipelines.

Swapping the class name is the whole migration: these are subclasses of the diffusers classes,
so ``isinstance``, ``from_pretrained``, ``from_pipe`` and ``save_pretrained`` work as before,
with an extra ``acceleration=`` argument, and ``__call__`` has the diffusers class's signature. A
pipeline with no acceleration gives bit-identical output to the diffusers class. Pipelines made
with ``from_pipe`` share their components and each keeps its own features (see
:mod:`diffaccel.acceleration`).

Example:
    >>> from diffaccel import EncoderReuseConfig
    >>> from diffaccel.pipelines import AcceleratedStableDiffusionPipeline
    >>> from diffaccel.testing import tiny_pipeline
    >>> pipe = AcceleratedStableDiffusionPipeline.from_pipe(
    ...     tiny_pipeline("sd"), acceleration=EncoderReuseConfig("faster-diffusion"))
    >>> image = pipe("a green triangle", num_inference_steps=10, output_type="np").images[0]
    >>> pipe.acceleration_stats.features["encoder_reuse"].encoder_evaluations < 10
    True
"""

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffaccel.acceleration import AcceleratedPipelineMixin, register_accelerated_class


@register_accelerated_class
class AcceleratedStableDiffusionPipeline(AcceleratedPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with diffaccel features; ``from_pretrained(path, acceleration=...)``."""


@register_accelerated_class
class AcceleratedStableDiffusionXLPipeline(AcceleratedPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with diffaccel features; ``from_pretrained(path, acceleration=...)``."""
