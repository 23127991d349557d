"""The options the ``diffaccel`` commands share, declared once, and the feature configs they make.

``generate`` and ``generate-video`` both take the prompt, ``--model``, ``--out``, ``--steps``,
``--seed``, the size, the caps, ``--quantize``, ``--delta-cache``, ``--device`` and
``--stats-json`` (:func:`add_common_arguments`); each command adds its own. Declaring them imports
no torch.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_common_arguments(parser, model="micro-sd", model_help="micro-sd", out_help="image", steps=50,
    ...                      size_step="SD: 8")
    >>> args = parser.parse_args(["a red circle", "--out", "x.png", "--delta-cache", "0.05"])
    >>> args.steps, args.max_steps, [type(c).__name__ for c in weight_and_cache_configs(args, builtin=True)]
    (50, 1000, ['DeltaCacheConfig'])
"""

from __future__ import annotations

import argparse
from typing import Any

from .checks import MAX_FRAMES, MAX_SIZE, MAX_STEPS, fail, non_negative_float, positive_int, warn


def add_common_arguments(parser: argparse.ArgumentParser, *, model: str, model_help: str, out_help: str, steps: int,
                         size_step: str, frames: bool = False) -> None:
    """Add the prompt and the options every command takes; ``frames`` adds ``--frames``'s cap."""
    parser.add_argument("prompt")
    parser.add_argument("--model", default=model, metavar="PATH_OR_HUB_ID",
                        help=f"local folder, hub id (org/name), {model_help}")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--steps", type=positive_int, default=steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=positive_int, default=None, help=f"a multiple of the model's size step ({size_step})")
    parser.add_argument("--width", type=positive_int, default=None, help=f"a multiple of the model's size step ({size_step})")
    add_limit_arguments(parser, frames=frames)
    parser.add_argument("--quantize", choices=("nvfp4", "int8"), default=None,
                        help="quantize the denoiser's Linear layers: NVFP4 weights (W4A16) or INT8 (W8A8) (default: off)")
    parser.add_argument("--delta-cache", type=non_negative_float, default=None, metavar="THRESHOLD",
                        help="temporal delta cache: skip transformer blocks whose input changed less than this (e.g. 0.05)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--stats-json", default=None, help="also write the call's statistics to this JSON file")


def add_limit_arguments(parser: argparse.ArgumentParser, *, frames: bool = False) -> None:
    """Add ``--max-steps``, ``--max-size`` (and ``--max-frames``): the caps a user raises on purpose."""
    parser.add_argument("--max-steps", type=positive_int, default=MAX_STEPS, metavar="N",
                        help=f"refuse --steps above N (default {MAX_STEPS})")
    parser.add_argument("--max-size", type=positive_int, default=MAX_SIZE, metavar="PIXELS",
                        help=f"refuse --height/--width above PIXELS (default {MAX_SIZE})")
    if frames:
        parser.add_argument("--max-frames", type=positive_int, default=MAX_FRAMES, metavar="N",
                            help=f"refuse --frames above N (default {MAX_FRAMES})")


def warn_ignored_options(args: argparse.Namespace, needs: dict[str, tuple[str, ...]]) -> None:
    """Warn about each option given without any of the options that make it act (``needs``)."""
    for name, enablers in needs.items():
        if getattr(args, name, None) is not None and all(getattr(args, e, None) is None for e in enablers):
            flags = " or ".join("--" + e.replace("_", "-") for e in enablers)
            warn(f"--{name.replace('_', '-')} has no effect without {flags}; ignored")


def feature_configs(args: argparse.Namespace, *, builtin: bool) -> list[Any]:
    """The feature configs of ``--preset`` or ``--encoder-reuse`` (``generate`` only), ``--quantize`` and
    ``--delta-cache``; a value a config refuses is a one-line error."""
    import diffaccel

    configs: list[Any] = []
    try:
        if getattr(args, "preset", None) is not None:
            configs.append(args.preset)  # diffaccel.accelerate expands it for the pipeline's family
        if getattr(args, "encoder_reuse", None) is not None:
            configs.append(diffaccel.EncoderReuseConfig(
                schedule=args.encoder_reuse, parallel=args.parallel, max_parallel_steps=args.max_parallel_steps,
                noise_injection=args.noise_injection or 0.0,
            ))
        configs += weight_and_cache_configs(args, builtin=builtin)
    except ValueError as err:
        fail(str(err))
    return configs


def weight_and_cache_configs(args: argparse.Namespace, *, builtin: bool) -> list[Any]:
    """The feature configs of ``--quantize`` and ``--delta-cache`` (the bundled models' layers are
    all small, so ``builtin`` ones are quantized whole: ``min_weight_numel=0``)."""
    import diffaccel

    configs: list[Any] = []
    if args.quantize is not None:
        small = {"min_weight_numel": 0} if builtin else {}
        configs.append(diffaccel.QuantizationConfig(precision=args.quantize, **small))
    if args.delta_cache is not None:
        configs.append(diffaccel.DeltaCacheConfig(threshold=args.delta_cache))
    return configs
