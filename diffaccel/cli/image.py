"""``diffaccel generate``: text-to-image with the features, steering and search, checked before the
model loads.

Example:
    $ diffaccel generate "a red circle to the left of a blue square" --steps 25 --preset fast --out image.png
    $ diffaccel generate "a red circle to the left of a blue square" --steps 50 \\
        --encoder-reuse faster-diffusion --out image.png

Without ``--model`` it uses :data:`~diffaccel.cli.models.DEFAULT_MODEL`, the bundled micro-SD
(trained on ShapeWorld, offline, 64x64), and prints the ShapeWorld verifier's score when the prompt
is a ShapeWorld caption.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import models
from .checks import (
    ModelInfo,
    check_cap,
    check_kind,
    check_output_path,
    check_preset_alone,
    check_size,
    check_steps,
    describe_model,
    fail,
    non_negative_float,
    positive_int,
)
from ..presets import PRESETS
from .options import add_common_arguments, feature_configs, warn_ignored_options
from .report import print_verdict, warn_if_resized, write_stats_json
from .steering import (
    FLOW_SEARCH_METHODS,
    STEERING_NEEDS,
    add_steering_arguments,
    check_search,
    fill_steering_defaults,
)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_BUILTIN_MODELS = (models.DEFAULT_MODEL, models.RANDOM_MODEL)
#: Options that only act with another one: option -> (the flags that enable it).
_NEEDS = {
    **STEERING_NEEDS,
    **dict.fromkeys(("parallel", "max_parallel_steps", "noise_injection"), ("encoder_reuse",)),
}


def _schedule(text: str) -> Any:
    from ..features.key_steps import parse_schedule

    try:
        return parse_schedule(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(commands: Any) -> None:
    """Add the ``generate`` subcommand to the ``diffaccel`` parser's subparsers."""
    gen = commands.add_parser("generate", help="generate an image from a prompt")
    add_common_arguments(gen, model=models.DEFAULT_MODEL,
                         model_help=f"{models.DEFAULT_MODEL} (the default, bundled) or {models.RANDOM_MODEL}",
                         out_help="output image file (.png, .jpg, .webp)", steps=50, size_step="SD: 8")
    gen.add_argument("--guidance-scale", type=float, default=None, help="default: 5 for micro-sd, else 7.5")
    gen.add_argument("--preset", choices=PRESETS, default=None,
                     help="one knob: on UNet models deep reuse, adaptive key steps and guidance reuse "
                          "(docs/encoder-reuse.md; not with --encoder-reuse), on DiTs the delta cache "
                          "(docs/delta-cache.md; not with --delta-cache)")
    gen.add_argument(
        "--encoder-reuse",
        type=_schedule,
        default=None,
        metavar="SCHEDULE",
        help="key-step schedule: faster-diffusion, uniform:N, all, or a list like 0,1,5,10 (default: off; UNet models)",
    )
    gen.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                     help="encoder reuse: batched decoding (default: on CUDA)")
    gen.add_argument("--max-parallel-steps", type=positive_int, default=None,
                     help="encoder reuse: cap on steps per batched decoder call")
    gen.add_argument("--noise-injection", type=non_negative_float, default=None,
                     help="encoder reuse: prior noise injection coefficient (default 0; paper: 0.003)")
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    add_steering_arguments(gen)


def preflight(args: argparse.Namespace) -> ModelInfo | None:
    """Check every ``generate`` input before any model work; returns what is known of the model
    (None for a hub id: it is checked once loaded). Fills the steering defaults."""
    warn_ignored_options(args, _NEEDS)
    fill_steering_defaults(args)
    check_cap("--steps", args.steps, "--max-steps", args.max_steps)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        check_cap(flag, value, "--max-size", args.max_size)
    if args.preset is not None and args.encoder_reuse is not None:
        fail(f"--preset {args.preset} and --encoder-reuse both configure the UNet's reuse: give one")
    if args.encoder_reuse is not None:
        try:
            args.encoder_reuse.key_steps(args.steps)
        except ValueError as err:
            fail(f"--encoder-reuse: {err}")
    check_search(args)
    info = describe_model(args.model, models.BUILTIN_INFO)
    if info is not None:
        check_model(info, args)
    check_output_path(args.out, "--out", _IMAGE_SUFFIXES)
    check_output_path(args.stats_json, "--stats-json")
    return info


def check_model(info: ModelInfo, args: argparse.Namespace) -> None:
    """The ``generate`` inputs this model cannot honour."""
    check_kind(info, args.model, video=False)
    check_steps(info, args.model, args.steps)
    check_size(info, args.model, args.height, args.width)
    if args.encoder_reuse is not None and info.denoiser != "unet":
        fail(f"--encoder-reuse needs a UNet pipeline (Stable Diffusion, SDXL); {args.model} has a "
             f"{info.denoiser or 'different denoiser'}: try --delta-cache")
    if args.preset is not None and info.denoiser not in ("unet", "transformer"):
        fail(f"--preset: presets exist for UNet and transformer (DiT) pipelines; {args.model} has a "
             f"{info.denoiser or 'different denoiser'}")
    check_preset_alone(args, info)
    if args.search in FLOW_SEARCH_METHODS and not info.flow:
        fail(f"--search {args.search} is for flow-matching models (Flux, SD3, LTX, Wan); "
             f"{args.model}'s scheduler is {info.scheduler}")


def generate(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``diffaccel generate``; returns the statistics it prints."""
    info = preflight(args)
    import torch

    import diffaccel

    device = models.resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    configs = feature_configs(args, builtin=args.model in _BUILTIN_MODELS)
    steering = None
    if args.particles is not None or args.search is not None:
        from .steering import make_steering

        steering = make_steering(args, device)
    pipe = models.load_pipeline(args.model, device, dtype)
    if info is None:
        check_model(ModelInfo.from_pipeline(pipe), args)
    pipe = diffaccel.accelerate(pipe, *configs)
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    guidance = args.guidance_scale if args.guidance_scale is not None else (
        5.0 if args.model == models.DEFAULT_MODEL else 7.5)
    call = dict(num_inference_steps=args.steps, guidance_scale=guidance, generator=generator, **size)
    steering_stats = None
    if steering is not None:
        from .steering import run_steering

        image, steering_stats = run_steering(args, pipe, call, *steering)
    else:
        image = pipe(args.prompt, **call).images[0]
    warn_if_resized(args, image.width, image.height)
    image.save(args.out)
    print(f"saved {args.out} ({image.width}x{image.height})")
    lines = pipe.acceleration_stats.summary().split("\n")
    if args.preset is not None:
        lines.insert(1, f"preset: {args.preset}")
    elif "encoder_reuse" not in pipe.acceleration_stats.features:
        lines.insert(1, f"UNet evaluations: {args.steps} full (encoder reuse off)")
    print("\n".join(lines))
    stats = pipe.acceleration_stats.to_dict()
    verification = print_verdict(image, args.prompt)
    if verification is not None:
        stats["verifier"] = verification
    if steering_stats is not None:
        stats["steering"] = steering_stats
    write_stats_json(args.stats_json, stats)
    return stats
