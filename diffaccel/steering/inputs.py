"""Call arguments for a batch of particles: every per-prompt input repeated like the prompt.

Steering runs ``k`` particles per prompt as one batched pipeline call, each prompt repeated ``k``
times (``[a, a, b, b]``). Every other argument that holds one entry per prompt is repeated the same
way: the init image and mask of img2img / inpainting, control images, negative and secondary
prompts, prompt embeddings and latents. Without it diffusers tiles the inputs instead
(``[i1, i2, i1, i2]``: particles paired with the wrong image) and warns that this is deprecated,
or fails on the batch size. A single input (one image for every prompt) becomes one copy per
particle. IP-Adapter images are left as they are: their outer list holds one entry per adapter.

Example:
    >>> call = particle_kwargs({"image": ["i1", "i2"], "negative_prompt": "blurry"}, ["a", "a", "b", "b"], 2)
    >>> call["prompt"], call["image"], call["negative_prompt"]
    (['a', 'a', 'b', 'b'], ['i1', 'i1', 'i2', 'i2'], 'blurry')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .latents import call_parameters

#: Text arguments that may hold one string per prompt (a single string applies to every prompt).
TEXT_INPUTS = ("negative_prompt", "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")

#: Image arguments: one image for every prompt, or one per prompt (a list, or a 4-D batch).
IMAGE_INPUTS = ("image", "mask_image", "control_image", "masked_image_latents")

#: Arguments that start a call from an image (img2img, inpainting): such a call cannot be rolled out
#: or replayed from an intermediate or recorded state.
IMAGE_START_INPUTS = ("image", "strength", "denoising_start", "mask_image")

#: Batch-first tensors with one row per prompt.
TENSOR_INPUTS = (
    "latents",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_attention_mask",
)


def particle_kwargs(
    kwargs: Mapping[str, Any], particle_prompts: list[str], k: int, pipe: Any = None
) -> dict[str, Any]:
    """Call arguments for ``k`` particles per prompt (``particle_prompts``: each prompt repeated ``k``
    times, which every pipeline batches the same way; CogVideoX ignores ``num_videos_per_prompt``),
    with the per-prompt inputs repeated alike (see the module docs) and ``output_type="pt"``.

    With ``pipe`` given, a multi-ControlNet pipeline's control images (one entry per ControlNet)
    are repeated per ControlNet.

    Example:
        >>> import torch
        >>> particle_kwargs({"negative_prompt_embeds": torch.zeros(1, 3, 8)}, ["a"] * 4, 4)["negative_prompt_embeds"].shape
        torch.Size([4, 3, 8])
    """
    prompts = len(particle_prompts) // k
    call = dict(kwargs, prompt=particle_prompts, output_type="pt")
    per_control_net = _control_input(pipe)
    for name in TEXT_INPUTS:
        if isinstance(call.get(name), (list, tuple)) and len(call[name]) == prompts:
            call[name] = _repeat_items(call[name], k)
    for name in IMAGE_INPUTS:
        if call.get(name) is None:
            continue
        if name == per_control_net and isinstance(call[name], (list, tuple)):
            call[name] = [_repeat_image(image, prompts, k) for image in call[name]]
        else:
            call[name] = _repeat_image(call[name], prompts, k)
    for name in TENSOR_INPUTS:
        value = call.get(name)
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == prompts:
            call[name] = value.repeat_interleave(k, dim=0)
    return call


def _control_input(pipe: Any) -> str | None:
    """The argument holding a multi-ControlNet pipeline's per-ControlNet images, or ``None``."""
    if type(getattr(pipe, "controlnet", None)).__name__ != "MultiControlNetModel":
        return None
    return "control_image" if "control_image" in call_parameters(pipe) else "image"


def _repeat_items(items: Any, k: int) -> list[Any]:
    return [item for item in items for _ in range(k)]


def _repeat_image(image: Any, prompts: int, k: int) -> Any:
    """One image per particle: a per-prompt list or batch repeated ``k`` times per entry, a single
    image (or a batch of one) copied for every particle; anything else is left to the pipeline."""
    if isinstance(image, (list, tuple)):
        if len(image) == prompts:
            return _repeat_items(image, k)
        return list(image) * (prompts * k) if len(image) == 1 else image
    if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4:
        if image.shape[0] not in (1, prompts):
            return image
        repeats = k if image.shape[0] == prompts else prompts * k
        if isinstance(image, torch.Tensor):
            return image.repeat_interleave(repeats, dim=0)
        return np.repeat(image, repeats, axis=0)
    return [image] * (prompts * k)
