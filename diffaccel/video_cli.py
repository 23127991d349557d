"""``diffaccel generate-video``: text-to-video with the DiT features, written as a GIF.

Example:
    $ diffaccel generate-video "a red circle moving to the left" --model path/to/wan \\
        --delta-cache 0.05 --quantize nvfp4 --out clip.gif

``--model`` takes a diffusers text-to-video folder or hub id (Wan, CogVideoX, LTX), ``micro-video``
(the bundled micro model, once it is trained and exported: until then it says so) or
:data:`RANDOM_VIDEO_MODEL`, a tiny random-weight Wan built in code (it draws noise: it shows the
machinery, not a clip). It prints the seconds, what the features did and, when the prompt is a
ShapeWorld caption, the verifier's verdict on the clip (motion included). As for ``generate``, every
input (frames, size, steps, the output path, the model) is checked before the model loads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli_types import (
    ModelInfo,
    add_limit_arguments,
    check_cap,
    check_frames,
    check_kind,
    check_output_path,
    check_size,
    check_steps,
    describe_model,
    non_negative_float,
    positive_int,
    warn,
)

#: The bundled micro text-to-video model (``assets/models/micro-video``).
MICRO_VIDEO = "micro-video"
#: A tiny Wan pipeline with RANDOM weights, built in code.
RANDOM_VIDEO_MODEL = "diffaccel/tiny-random-wan"
#: What the checks know of :data:`RANDOM_VIDEO_MODEL` (``tiny_pipeline("wan")``) without building it.
RANDOM_VIDEO_INFO = ModelInfo("WanPipeline", "FlowMatchEulerDiscreteScheduler", 1000, "transformer",
                              spatial_factor=8, patch=2, temporal_factor=4)
_MISSING_HINT = f"\nPass --model PATH (a Wan, CogVideoX or LTX folder) or {RANDOM_VIDEO_MODEL}."


def add_parser(commands: Any) -> None:
    """Add the ``generate-video`` subcommand to the ``diffaccel`` parser's subparsers."""
    video = commands.add_parser("generate-video", help="generate a clip from a prompt (GIF)")
    video.add_argument("prompt")
    video.add_argument("--model", default=MICRO_VIDEO, metavar="PATH_OR_HUB_ID",
                       help=f"local folder, hub id (org/name), {MICRO_VIDEO} (the default, bundled) or {RANDOM_VIDEO_MODEL}")
    video.add_argument("--out", required=True, help="output file (.gif)")
    video.add_argument("--steps", type=positive_int, default=30)
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--frames", type=positive_int, default=9,
                       help="number of frames: k x t + 1 when the VAE compresses time t-fold (Wan: 4k + 1)")
    video.add_argument("--height", type=positive_int, default=None, help="a multiple of the model's size step (Wan: 16)")
    video.add_argument("--width", type=positive_int, default=None, help="a multiple of the model's size step (Wan: 16)")
    add_limit_arguments(video, frames=True)
    video.add_argument("--guidance-scale", type=float, default=5.0)
    video.add_argument("--fps", type=positive_int, default=8)
    video.add_argument("--quantize", choices=("nvfp4", "int8"), default=None,
                       help="quantize the transformer's Linear layers: NVFP4 (W4A16) or INT8 (W8A8)")
    video.add_argument("--delta-cache", type=non_negative_float, default=None, metavar="THRESHOLD",
                       help="temporal delta cache: skip blocks whose input changed less than this (e.g. 0.05)")
    video.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    video.add_argument("--stats-json", default=None, help="also write the call's statistics to this JSON file")


def load_video_pipeline(model: str, device: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """The pipeline for ``model`` and the call arguments it needs (sizes, text length).

    Example:
        >>> import torch
        >>> pipe, call = load_video_pipeline(RANDOM_VIDEO_MODEL, "cpu", torch.float32)
        >>> type(pipe).__name__, call["height"]
        ('WanPipeline', 32)
    """
    if model == RANDOM_VIDEO_MODEL:
        from .testing import tiny_call_inputs, tiny_pipeline

        print(f"model: {RANDOM_VIDEO_MODEL} (tiny, RANDOM weights: the clip is noise)", file=sys.stderr)
        call = {k: v for k, v in tiny_call_inputs("wan").items() if k != "num_frames"}
        return tiny_pipeline("wan").to(device, dtype), call
    if model == MICRO_VIDEO:
        from .micro_models import load_micro_video

        pipe = load_micro_video(device, dtype)
        print(f"model: {MICRO_VIDEO} (bundled, trained on moving ShapeWorld, 64x64)", file=sys.stderr)
        return pipe, {"height": 64, "width": 64}
    from .cli import from_pretrained

    return from_pretrained(model, dtype).to(device), {}


def preflight_video(args: argparse.Namespace) -> ModelInfo | None:
    """Check every ``generate-video`` input before any model work; returns what is known of the
    model (None for a hub id: it is checked once loaded)."""
    check_cap("--steps", args.steps, "--max-steps", args.max_steps)
    check_cap("--frames", args.frames, "--max-frames", args.max_frames)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        check_cap(flag, value, "--max-size", args.max_size)
    from .cli import RANDOM_MODEL, RANDOM_MODEL_INFO

    info = describe_model(args.model, {RANDOM_VIDEO_MODEL: RANDOM_VIDEO_INFO, RANDOM_MODEL: RANDOM_MODEL_INFO},
                          _MISSING_HINT)
    if info is not None:
        check_video_model(info, args)
    check_output_path(args.out, "--out", (".gif",))
    check_output_path(args.stats_json, "--stats-json")
    return info


def check_video_model(info: ModelInfo, args: argparse.Namespace) -> None:
    """The ``generate-video`` inputs this model cannot honour."""
    check_kind(info, args.model, video=True)
    check_steps(info, args.model, args.steps)
    check_size(info, args.model, args.height, args.width)
    check_frames(info, args.model, args.frames)


def generate_video(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``diffaccel generate-video``; returns the statistics it prints."""
    info = preflight_video(args)
    import numpy as np
    import torch
    from PIL import Image

    import diffaccel

    from .cli import (
        feature_configs,
        print_feature_stats,
        print_verdict,
        resolve_device,
        warn_if_resized,
        write_stats_json,
    )

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    configs = feature_configs(args, builtin=args.model in (MICRO_VIDEO, RANDOM_VIDEO_MODEL))
    pipe, call = load_video_pipeline(args.model, device, dtype)
    if info is None:
        check_video_model(ModelInfo.from_pipeline(pipe), args)
    pipe = diffaccel.accelerate(pipe, *configs)
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    call.update({k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None})
    frames = pipe(args.prompt, num_inference_steps=args.steps, num_frames=args.frames, guidance_scale=args.guidance_scale,
                  generator=torch.Generator().manual_seed(args.seed), output_type="np", **call).frames[0]
    clip = (np.clip(np.asarray(frames, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    images = [Image.fromarray(frame) for frame in clip]
    warn_if_resized(args, images[0].width, images[0].height)
    if len(images) != args.frames:
        warn(f"the pipeline drew {len(images)} frames, not the {args.frames} asked for")
    images[0].save(args.out, save_all=True, append_images=images[1:], duration=round(1000 / args.fps), loop=0)
    stats = pipe.acceleration_stats.to_dict()
    print(f"saved {args.out} ({len(images)} frames, {images[0].width}x{images[0].height})")
    print(f"seconds: {stats['seconds']:.3f}")
    print_feature_stats(stats["features"])
    verdict = print_verdict(clip, args.prompt, clip=True)
    if verdict is not None:
        stats["verifier"] = verdict
    write_stats_json(args.stats_json, stats)
    return stats
