"""Which modules of a UNet a non-key step replays, at a given depth of reuse.

A UNet's skips pair its encoder layers with its decoder layers: ``conv_in``'s output feeds the
decoder's last layer, the first encoder layer's output the decoder's second-to-last, and so on.
*Encoder reuse* (Faster Diffusion) replays ``conv_in``, every down block and the mid block and runs
the whole decoder. *Deep reuse* (the structure DeepCache uses) keeps only the outermost path: with
``shallow_layers = k`` a non-key step runs ``conv_in``, the first ``k - 1`` encoder layers and the
last ``k`` decoder layers, and replays everything deeper, decoder included. A *layer* is one
resnet with its attention (if the block has attentions), or a down block's downsampler.

:func:`reuse_plan` lists the modules to hook, coarsest first (a block that is deep as a whole is
hooked as one module), and marks the *boundary* modules: those whose replayed output a computed
module reads, the only ones worth forecasting.

Example:
    >>> from diffaccel.testing import tiny_pipeline
    >>> unet = tiny_pipeline("sd").unet
    >>> [(r.key, r.boundary) for r in reuse_plan(unet, None)][:2]
    [('conv_in', True), ('down_blocks.0', True)]
    >>> [(r.key, r.boundary) for r in reuse_plan(unet, 1) if r.boundary]
    [('up_blocks.2.attentions.0', True)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReplayedModule:
    """One module a non-key step replays: its dotted ``key`` in the UNet, the module, and whether
    a computed module reads its output (``boundary``)."""

    key: str
    module: torch.nn.Module
    boundary: bool


def _layers(blocks: torch.nn.ModuleList, prefix: str, samplers: str | None = None
            ) -> list[tuple[int, list[tuple[str, torch.nn.Module]]]]:
    """The layers of ``blocks`` in forward order: (block index, [(key, module), ...]); a layer is a
    resnet with its attention, and each of a block's ``samplers`` (if named) is a layer of its own."""
    layers = []
    for b, block in enumerate(blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            modules = [(f"{prefix}.{b}.resnets.{j}", resnet)]
            if attentions is not None and j < len(attentions):
                modules.append((f"{prefix}.{b}.attentions.{j}", attentions[j]))
            layers.append((b, modules))
        for j, sampler in enumerate((getattr(block, samplers, None) if samplers else None) or []):
            layers.append((b, [(f"{prefix}.{b}.{samplers}.{j}", sampler)]))
    return layers


def _down_layers(unet: torch.nn.Module) -> list[tuple[int, list[tuple[str, torch.nn.Module]]]]:
    """The encoder's layers in forward order (downsamplers are layers of their own)."""
    return _layers(unet.down_blocks, "down_blocks", "downsamplers")


def _up_layers(unet: torch.nn.Module) -> list[tuple[int, list[tuple[str, torch.nn.Module]]]]:
    """The decoder's layers in forward order (upsamplers belong to their block, not to a layer)."""
    return _layers(unet.up_blocks, "up_blocks")


def max_shallow_layers(unet: torch.nn.Module) -> int:
    """The largest ``shallow_layers`` that still replays something (the decoder's layer count).

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> max_shallow_layers(tiny_pipeline("sd").unet)
        6
    """
    return len(_up_layers(unet))


def reuse_plan(unet: torch.nn.Module, shallow_layers: int | None) -> list[ReplayedModule]:
    """The modules a non-key step replays: encoder reuse (``shallow_layers=None``) or deep reuse
    keeping the outermost ``shallow_layers`` decoder layers (see the module docs).

    Raises ``ValueError`` when ``shallow_layers`` is not below the decoder's layer count
    (:func:`max_shallow_layers`): nothing would be replayed.
    """
    if shallow_layers is None:
        plan = [ReplayedModule("conv_in", unet.conv_in, True)]
        plan += [ReplayedModule(f"down_blocks.{b}", block, True) for b, block in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            plan.append(ReplayedModule("mid_block", unet.mid_block, True))
        return plan
    up_layers = _up_layers(unet)
    if not 1 <= shallow_layers < len(up_layers):
        raise ValueError(
            f"shallow_layers must be between 1 and {len(up_layers) - 1} for this UNet ({len(up_layers)} decoder "
            f"layers), got {shallow_layers}"
        )
    plan: list[ReplayedModule] = []
    # Encoder: the first shallow_layers - 1 layers run; every deeper layer (or whole block) replays.
    down_layers = _down_layers(unet)
    deep_down = down_layers[shallow_layers - 1 :]
    for b, block in enumerate(unet.down_blocks):
        in_block = [modules for block_index, modules in down_layers if block_index == b]
        deep = [modules for block_index, modules in deep_down if block_index == b]
        if len(deep) == len(in_block):
            plan.append(ReplayedModule(f"down_blocks.{b}", block, False))
        else:
            plan += [ReplayedModule(key, module, False) for modules in deep for key, module in modules]
    if unet.mid_block is not None:
        plan.append(ReplayedModule("mid_block", unet.mid_block, False))
    # Decoder: the last shallow_layers layers run; the layer (or block) just before them is the boundary.
    first_computed = len(up_layers) - shallow_layers
    computed_blocks = {b for b, _ in up_layers[first_computed:]}
    for b, block in enumerate(unet.up_blocks):
        layers = [(index, modules) for index, (block_index, modules) in enumerate(up_layers) if block_index == b]
        if b not in computed_blocks:
            feeds_computed = bool(layers) and layers[-1][0] == first_computed - 1
            plan.append(ReplayedModule(f"up_blocks.{b}", block, feeds_computed))
            continue
        for index, modules in layers:
            if index >= first_computed:
                break
            for position, (key, module) in enumerate(modules):
                last_of_layer = position == len(modules) - 1
                plan.append(ReplayedModule(key, module, last_of_layer and index == first_computed - 1))
    return plan
