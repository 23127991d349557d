"""The ``diffaccel`` command line.

Example:
    $ diffaccel generate "a red circle to the left of a blue square" --steps 50 \\
        --encoder-reuse faster-diffusion --out image.png

``diffaccel generate-video`` does the same for text-to-video pipelines
(:mod:`diffaccel.video_cli`). Without ``--model`` it uses :data:`DEFAULT_MODEL`, the bundled micro-SD (trained on ShapeWorld,
offline, 64x64), and prints the ShapeWorld verifier's score when the prompt is a ShapeWorld caption.
``--model diffaccel/tiny-random-sd`` is a tiny random-weight pipeline built in code (it draws
noise: it shows the machinery, not a picture); ``--model org/name`` goes to the hub.

Every input is checked before the model loads (:mod:`diffaccel.cli_types`): a bad one is a
one-line error, an option that does nothing is a warning. Parsing the arguments imports neither
torch nor diffusers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .cli_types import (
    REWARD_HELP,
    ModelInfo,
    add_limit_arguments,
    check_cap,
    check_kind,
    check_output_path,
    check_size,
    check_steps,
    describe_model,
    fail,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_int,
    reward_spec,
    warn,
)

#: The bundled micro-SD (``assets/models/micro-sd``), trained on ShapeWorld scenes.
DEFAULT_MODEL = "micro-sd"
#: A tiny Stable Diffusion pipeline with RANDOM weights, built in code.
RANDOM_MODEL = "diffaccel/tiny-random-sd"
#: What the checks know of :data:`RANDOM_MODEL` (``tiny_pipeline("sd", sample_size=32)``) without building it.
RANDOM_MODEL_INFO = ModelInfo("StableDiffusionPipeline", "DDIMScheduler", 1000, "unet", spatial_factor=8)
_BUILTIN_MODELS = (DEFAULT_MODEL, RANDOM_MODEL)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: ``diffaccel.steering.SEARCH_METHODS`` (a test keeps them equal), here so parsing needs no torch.
SEARCH_METHODS = ("random", "zero-order", "paths", "rbf")
#: Search methods for flow-matching models only.
FLOW_SEARCH_METHODS = ("rbf",)
#: The steering options' defaults; they are None when not given, so an ignored one can be told.
STEERING_DEFAULTS = {"reward": "shapeworld", "potential": "max", "lmbda": 10.0, "resample_every": 5,
                     "resample_start": 0}
#: Options that only act with another one: option -> (the flags that enable it).
_NEEDS = {
    "reward": ("particles", "search"),
    "budget": ("search",),
    **dict.fromkeys(("potential", "lmbda", "resample_every", "resample_start", "ess_threshold"), ("particles",)),
    **dict.fromkeys(("parallel", "max_parallel_steps", "noise_injection"), ("encoder_reuse",)),
}


def _schedule(text: str) -> Any:
    from .features.key_steps import parse_schedule

    try:
        return parse_schedule(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffaccel`` command (building it imports no torch).

    Example:
        >>> build_parser().parse_args(["generate", "a red circle", "--out", "x.png"]).steps
        50
    """
    from .video_cli import add_parser as add_video_parser

    parser = argparse.ArgumentParser(prog="diffaccel", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_HUB_ID",
                     help=f"local folder, hub id (org/name), {DEFAULT_MODEL} (the default, bundled) or {RANDOM_MODEL}")
    gen.add_argument("--out", required=True, help="output image file (.png, .jpg, .webp)")
    gen.add_argument("--steps", type=positive_int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance-scale", type=float, default=None, help="default: 5 for micro-sd, else 7.5")
    gen.add_argument("--height", type=positive_int, default=None, help="a multiple of the model's size step (SD: 8)")
    gen.add_argument("--width", type=positive_int, default=None, help="a multiple of the model's size step (SD: 8)")
    add_limit_arguments(gen)
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
    add_steering_arguments(gen)
    add_video_parser(commands)
    return parser


def add_steering_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--particles``, ``--search`` and their options to ``parser``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_steering_arguments(parser)
        >>> parser.parse_args(["--particles", "4"]).particles
        4
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--particles", type=positive_int, default=None, metavar="K", help="FK steering with K particles")
    group.add_argument("--search", choices=SEARCH_METHODS, default=None,
                       help="noise search method (rbf: flow-matching models only, e.g. Flux, SD3, Wan, "
                            "and without --encoder-reuse/--quantize/--delta-cache)")
    parser.add_argument("--reward", type=reward_spec, default=None,
                        help=f"steering/search reward: {REWARD_HELP}")
    parser.add_argument("--budget", type=positive_int, default=None, metavar="NFE",
                        help="search budget (default: 4 x steps; paths: at least 2 x steps)")
    parser.add_argument("--potential", choices=("max", "difference", "sum", "immediate"), default=None,
                        help="FK potential (default: max)")
    parser.add_argument("--lmbda", type=float, default=None, help="FK potential inverse temperature (default: 10)")
    parser.add_argument("--resample-every", type=non_negative_int, default=None,
                        help="FK: steps between resamplings (default: 5; 0: off)")
    parser.add_argument("--resample-start", type=non_negative_int, default=None, metavar="STEP",
                        help="FK: first step (0-based) that may resample (default: 0); start where the reward of x0 "
                             "becomes predictive (bench/fk_predictiveness.py)")
    parser.add_argument("--ess-threshold", type=fraction, default=None, metavar="F",
                        help="FK: resample only when the effective sample size falls below F x K")


def warn_ignored_options(args: argparse.Namespace, needs: dict[str, tuple[str, ...]]) -> None:
    """Warn about each option given without any of the options that make it act (``needs``)."""
    for name, enablers in needs.items():
        if getattr(args, name, None) is not None and all(getattr(args, e, None) is None for e in enablers):
            flags = " or ".join("--" + e.replace("_", "-") for e in enablers)
            warn(f"--{name.replace('_', '-')} has no effect without {flags}; ignored")


def preflight(args: argparse.Namespace) -> ModelInfo | None:
    """Check every ``generate`` input before any model work; returns what is known of the model
    (None for a hub id: it is checked once loaded). Fills the steering defaults."""
    warn_ignored_options(args, _NEEDS)
    for name, value in STEERING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_cap("--steps", args.steps, "--max-steps", args.max_steps)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        check_cap(flag, value, "--max-size", args.max_size)
    if args.encoder_reuse is not None:
        try:
            args.encoder_reuse.key_steps(args.steps)
        except ValueError as err:
            fail(f"--encoder-reuse: {err}")
    check_search(args)
    from .video_cli import RANDOM_VIDEO_INFO, RANDOM_VIDEO_MODEL

    info = describe_model(args.model, {RANDOM_MODEL: RANDOM_MODEL_INFO, RANDOM_VIDEO_MODEL: RANDOM_VIDEO_INFO})
    if info is not None:
        check_model(info, args)
    check_output_path(args.out, "--out", _IMAGE_SUFFIXES)
    check_output_path(args.stats_json, "--stats-json")
    return info


def check_search(args: argparse.Namespace) -> None:
    """``--search``'s budget covers its samples; RBF runs on a plain pipeline. Sets the default budget."""
    if args.search is None:
        return
    args.budget = args.budget or 4 * args.steps
    samples = 2 if args.search == "paths" else 1
    if args.budget < samples * args.steps:
        fail(f"--budget {args.budget}: --search {args.search} needs at least {samples} x --steps = "
             f"{samples * args.steps} NFE")
    features = [flag for flag, value in (("--encoder-reuse", args.encoder_reuse), ("--quantize", args.quantize),
                                         ("--delta-cache", args.delta_cache)) if value is not None]
    if args.search in FLOW_SEARCH_METHODS and features:
        fail(f"--search {args.search} runs look-ahead denoiser calls that cannot go with {', '.join(features)}")


def check_model(info: ModelInfo, args: argparse.Namespace) -> None:
    """The ``generate`` inputs this model cannot honour."""
    check_kind(info, args.model, video=False)
    check_steps(info, args.model, args.steps)
    check_size(info, args.model, args.height, args.width)
    if args.encoder_reuse is not None and info.denoiser != "unet":
        fail(f"--encoder-reuse needs a UNet pipeline (Stable Diffusion, SDXL); {args.model} has a "
             f"{info.denoiser or 'different denoiser'}: try --delta-cache")
    if args.search in FLOW_SEARCH_METHODS and not info.flow:
        fail(f"--search {args.search} is for flow-matching models (Flux, SD3, LTX, Wan); "
             f"{args.model}'s scheduler is {info.scheduler}")


def resolve_device(name: str | None) -> str:
    """``--device``, checked (default: cuda if available, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        fail(f"--device {name}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available here")
    return name


def load_pipeline(model: str, device: str, dtype: Any) -> Any:
    """Load ``model`` (a local folder, a hub id, :data:`DEFAULT_MODEL` or :data:`RANDOM_MODEL`);
    diffusers' own loading errors (``OSError``: offline, no such repo, no safetensors) end the
    command with diffusers' message on one line.

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
    return from_pretrained(model, dtype).to(device)


def from_pretrained(model: str, dtype: Any) -> Any:
    """``DiffusionPipeline.from_pretrained`` (safetensors only); an ``OSError`` becomes a one-line error."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, use_safetensors=True)
    except OSError as err:
        fail(f"--model {model}: {' '.join(str(err).split())}")


def feature_configs(args: argparse.Namespace, *, builtin: bool) -> list[Any]:
    """The feature configs of ``--encoder-reuse`` (``generate`` only), ``--quantize`` and
    ``--delta-cache``; a value a config refuses is a one-line error."""
    import diffaccel

    configs: list[Any] = []
    try:
        if getattr(args, "encoder_reuse", None) is not None:
            configs.append(diffaccel.EncoderReuseConfig(
                schedule=args.encoder_reuse, parallel=args.parallel, max_parallel_steps=args.max_parallel_steps,
                noise_injection=args.noise_injection or 0.0,
            ))
        configs += weight_and_cache_configs(args, builtin=builtin)
    except ValueError as err:
        fail(str(err))
    return configs


def generate(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``diffaccel generate``; returns the statistics it prints."""
    info = preflight(args)
    import torch

    import diffaccel

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    configs = feature_configs(args, builtin=args.model in _BUILTIN_MODELS)
    steering = None
    if args.particles is not None or args.search is not None:
        from .steering.cli_options import make_steering

        steering = make_steering(args, device)
    pipe = load_pipeline(args.model, device, dtype)
    if info is None:
        check_model(ModelInfo.from_pipeline(pipe), args)
    pipe = diffaccel.accelerate(pipe, *configs)
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    guidance = args.guidance_scale if args.guidance_scale is not None else (5.0 if args.model == DEFAULT_MODEL else 7.5)
    call = dict(num_inference_steps=args.steps, guidance_scale=guidance, generator=generator, **size)
    steering_stats = None
    if steering is not None:
        from .steering.cli_options import run_steering

        image, steering_stats = run_steering(args, pipe, call, *steering)
    else:
        image = pipe(args.prompt, **call).images[0]
    warn_if_resized(args, image.width, image.height)
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
    if steering_stats is not None:
        stats["steering"] = steering_stats
    write_stats_json(args.stats_json, stats)
    return stats


def warn_if_resized(args: argparse.Namespace, width: int, height: int) -> None:
    """Say so when the pipeline drew another size than ``--width``/``--height`` asked for."""
    if (args.width or width, args.height or height) != (width, height):
        warn(f"the pipeline drew {width}x{height}, not the {args.width or width}x{args.height or height} asked for")


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
    """Entry point of the ``diffaccel`` console script; errors diffaccel raises on purpose end it
    with their one-line message."""
    args = build_parser().parse_args(argv)
    from .errors import DiffaccelError

    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "generate-video":
            from .video_cli import generate_video

            generate_video(args)
    except DiffaccelError as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
