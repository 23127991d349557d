"""The ``diffaccel`` command line.

Example:
    $ diffaccel generate "a red circle to the left of a blue square" --steps 50 \\
        --encoder-reuse faster-diffusion --out image.png

``diffaccel generate-video`` does the same for text-to-video pipelines
(:mod:`diffaccel.video_cli`). Without ``--model`` it uses :data:`DEFAULT_MODEL`, the bundled micro-SD (trained on ShapeWorld,
offline, 64x64), and prints the ShapeWorld verifier's score when the prompt is a ShapeWorld caption.
``--model diffaccel/tiny-random-sd`` is a tiny random-weight pipeline built in code (it draws
noise: it shows the machinery, not a picture).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from .cli_types import non_negative_float, positive_int

#: The bundled micro-SD (``assets/models/micro-sd``), trained on ShapeWorld scenes.
DEFAULT_MODEL = "micro-sd"
#: A tiny Stable Diffusion pipeline with RANDOM weights, built in code.
RANDOM_MODEL = "diffaccel/tiny-random-sd"
_BUILTIN_MODELS = (DEFAULT_MODEL, RANDOM_MODEL)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _schedule(text: str) -> Any:
    from .features.key_steps import parse_schedule

    try:
        return parse_schedule(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffaccel`` command."""
    parser = argparse.ArgumentParser(prog="diffaccel", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"local folder, hub id, {DEFAULT_MODEL} (the default, bundled) or {RANDOM_MODEL}")
    gen.add_argument("--out", required=True, help="output image file (.png, .jpg, .webp)")
    gen.add_argument("--steps", type=positive_int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance-scale", type=float, default=None, help="default: 5 for micro-sd, else 7.5")
    gen.add_argument("--height", type=positive_int, default=None)
    gen.add_argument("--width", type=positive_int, default=None)
    gen.add_argument(
        "--encoder-reuse",
        type=_schedule,
        default=None,
        metavar="SCHEDULE",
        help="key-step schedule: faster-diffusion, uniform:N, all, or a list like 0,1,5,10 (default: off)",
    )
    gen.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                     help="batched decoding (default: on CUDA)")
    gen.add_argument("--max-parallel-steps", type=positive_int, default=None, help="cap on steps per batched decoder call")
    gen.add_argument("--noise-injection", type=float, default=0.0, help="prior noise injection coefficient (paper: 0.003)")
    gen.add_argument(
        "--quantize",
        choices=("nvfp4", "int8"),
        default=None,
        help="quantize the denoiser's Linear layers: NVFP4 weights (W4A16) or INT8 (W8A8) (default: off)",
    )
    gen.add_argument(
        "--delta-cache",
        type=non_negative_float,
        default=None,
        metavar="THRESHOLD",
        help="temporal delta cache: skip transformer blocks whose input changed less than this (e.g. 0.05)",
    )
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    gen.add_argument("--stats-json", default=None, help="also write the call's statistics to this JSON file")
    from .steering.cli_options import add_steering_arguments
    from .video_cli import add_parser as add_video_parser

    add_steering_arguments(gen)
    add_video_parser(commands)
    return parser


def load_pipeline(model: str, device: str, dtype: Any) -> Any:
    """Load ``model`` (a local folder, a hub id, :data:`DEFAULT_MODEL` or :data:`RANDOM_MODEL`).

    Example:
        >>> import torch
        >>> type(load_pipeline(DEFAULT_MODEL, "cpu", torch.float32)).__name__
        'StableDiffusionPipeline'
    """
    import torch

    if model == DEFAULT_MODEL:
        from .micro_models import load_micro_sd

        print(f"model: {DEFAULT_MODEL} (bundled, trained on ShapeWorld, 64x64)", file=sys.stderr)
        return load_micro_sd(device, dtype)
    if model == RANDOM_MODEL:
        from .testing import tiny_pipeline

        print(f"model: {RANDOM_MODEL} (tiny, RANDOM weights: the image is noise)", file=sys.stderr)
        pipe = tiny_pipeline("sd", sample_size=32).to(device)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, use_safetensors=True).to(device)


def generate(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``diffaccel generate``; returns the statistics it prints."""
    import torch

    import diffaccel

    if not args.out.lower().endswith(_IMAGE_SUFFIXES):
        raise SystemExit(f"--out must end with one of {', '.join(_IMAGE_SUFFIXES)}: {args.out}")
    if args.model not in _BUILTIN_MODELS and not os.path.isdir(args.model) and os.path.sep in args.model:
        raise SystemExit(f"--model: no such folder: {args.model}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    configs = []
    if args.encoder_reuse is not None:
        configs.append(
            diffaccel.EncoderReuseConfig(
                schedule=args.encoder_reuse,
                parallel=args.parallel,
                max_parallel_steps=args.max_parallel_steps,
                noise_injection=args.noise_injection,
            )
        )
        configs[0].schedule.key_steps(args.steps)  # out-of-range explicit steps fail before loading
    configs += weight_and_cache_configs(args, builtin=args.model in _BUILTIN_MODELS)
    pipe = load_pipeline(args.model, device, dtype)
    pipe = diffaccel.accelerate(pipe, *configs)
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    guidance = args.guidance_scale if args.guidance_scale is not None else (5.0 if args.model == DEFAULT_MODEL else 7.5)
    call = dict(num_inference_steps=args.steps, guidance_scale=guidance, generator=generator, **size)
    steering = None
    if args.particles is not None or args.search is not None:
        from .steering.cli_options import run_steering

        image, steering = run_steering(args, pipe, call)
    else:
        image = pipe(args.prompt, **call).images[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    image.save(args.out)
    stats = pipe.acceleration_stats.to_dict()
    reuse = stats["features"].get("encoder_reuse")
    print(f"saved {args.out} ({image.width}x{image.height})")
    print(f"seconds: {stats['seconds']:.3f}")
    if reuse is None:
        print(f"UNet evaluations: {args.steps} full (encoder reuse off)")
    else:
        print(f"key steps: {list(reuse['key_steps'])}")
        print(
            f"UNet encoder evaluations: {reuse['encoder_evaluations']}/{reuse['num_steps']}, "
            f"decoder evaluations: {reuse['decoder_evaluations']} in {reuse['batched_decoder_calls']} calls"
            f"{' (parallel)' if reuse['parallel'] else ''}"
        )
    print_feature_stats(stats["features"])
    verification = print_verdict(image, args.prompt)
    if verification is not None:
        stats["verifier"] = verification
    if steering is not None:
        stats["steering"] = steering
    write_stats_json(args.stats_json, stats)
    return stats


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


def write_stats_json(path: str | None, stats: dict[str, Any]) -> None:
    """Write ``stats`` as indented JSON to ``path`` (``--stats-json``); nothing when ``path`` is None."""
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(stats, handle, indent=2)


def print_feature_stats(features: dict[str, Any]) -> None:
    """One line each for the quantization and delta-cache statistics of the call."""
    quantization = features.get("quantization")
    if quantization is not None:
        layers = ", ".join(f"{count} {precision}" for precision, count in sorted(quantization["layers"].items()))
        print(f"quantized weights: {quantization['nbytes'] / 1e6:.2f} MB vs {quantization['bf16_nbytes'] / 1e6:.2f} MB "
              f"in bf16 ({quantization['bits_per_weight']:.2f} bits per weight; Linear layers: {layers})")
    cache = features.get("delta_cache")
    if cache is not None:
        total = cache["blocks_computed"] + cache["blocks_skipped"]
        print(f"delta cache: {cache['blocks_skipped']}/{total} block evaluations skipped")


def print_verdict(media: Any, prompt: str, *, clip: bool = False) -> dict[str, Any] | None:
    """Print and return the ShapeWorld verifier's result on an image (or a clip, ``clip=True``:
    frames ``(T, H, W, 3)``), or None when ``prompt`` is not a caption."""
    from .shapeworld import Verifier, parse_prompt

    try:
        parse_prompt(prompt)
    except ValueError:
        print("verifier: skipped (not a ShapeWorld caption)")
        return None
    verifier = Verifier()
    result = (verifier.verify_clips(media[None], [prompt]) if clip else verifier.verify([media], [prompt]))[0]
    failed = [name for name, ok in result.criteria.items() if not ok]
    print(f"verifier: score {result.score:.2f}" + (f" (failed: {', '.join(failed)})" if failed else " (all criteria met)"))
    return {"score": result.score, "passed": result.passed, "criteria": dict(result.criteria)}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffaccel`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        generate(args)
    elif args.command == "generate-video":
        from .video_cli import generate_video

        generate_video(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
