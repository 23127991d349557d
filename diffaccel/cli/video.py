"""``diffaccel generate-video``: text-to-video with the DiT features, written as a GIF.

Example:
    $ diffaccel generate-video "a red circle moving to the left" --model path/to/wan \\
        --delta-cache 0.05 --quantize nvfp4 --out clip.gif

``--model`` takes a diffusers text-to-video folder or hub id (Wan, CogVideoX, LTX), ``micro-video``
(the bundled micro model, once it is trained and exported: until then it says so) or
:data:`~diffaccel.cli.models.RANDOM_VIDEO_MODEL`, a tiny random-weight Wan built in code (it draws
noise: it shows the machinery, not a clip). It prints the seconds, what the features did and, when
the prompt is a ShapeWorld caption, the verifier's verdict on the clip (motion included). As for
``generate``, every input (frames, size, steps, the output path, the model) is checked before the
model loads.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import models
from .checks import (
    ModelInfo,
    check_cap,
    check_frames,
    check_kind,
    check_output_path,
    check_preset_alone,
    check_size,
    check_steps,
    describe_model,
    positive_int,
    warn,
)
from ..presets import PRESETS
from .options import add_common_arguments, feature_configs
from .report import print_verdict, warn_if_resized, write_stats_json

_MISSING_HINT = f"\nPass --model PATH (a Wan, CogVideoX or LTX folder) or {models.RANDOM_VIDEO_MODEL}."


def add_parser(commands: Any) -> None:
    """Add the ``generate-video`` subcommand to the ``diffaccel`` parser's subparsers."""
    video = commands.add_parser("generate-video", help="generate a clip from a prompt (GIF)")
    add_common_arguments(video, model=models.MICRO_VIDEO,
                         model_help=f"{models.MICRO_VIDEO} (the default, bundled) or {models.RANDOM_VIDEO_MODEL}",
                         out_help="output file (.gif)", steps=30, size_step="Wan: 16", frames=True)
    video.add_argument("--frames", type=positive_int, default=9,
                       help="number of frames: k x t + 1 when the VAE compresses time t-fold (Wan: 4k + 1)")
    video.add_argument("--guidance-scale", type=float, default=5.0)
    video.add_argument("--fps", type=positive_int, default=8)
    video.add_argument("--preset", choices=PRESETS, default=None,
                       help="one knob for the delta cache (docs/delta-cache.md); not with --delta-cache")


def preflight_video(args: argparse.Namespace) -> ModelInfo | None:
    """Check every ``generate-video`` input before any model work; returns what is known of the
    model (None for a hub id: it is checked once loaded)."""
    check_cap("--steps", args.steps, "--max-steps", args.max_steps)
    check_cap("--frames", args.frames, "--max-frames", args.max_frames)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        check_cap(flag, value, "--max-size", args.max_size)
    info = describe_model(args.model, models.BUILTIN_INFO, _MISSING_HINT)
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
    check_preset_alone(args, info)


def generate_video(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``diffaccel generate-video``; returns the statistics it prints."""
    info = preflight_video(args)
    import numpy as np
    import torch
    from PIL import Image

    import diffaccel

    device = models.resolve_device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    configs = feature_configs(args, builtin=args.model in (models.MICRO_VIDEO, models.RANDOM_VIDEO_MODEL))
    pipe, call = models.load_video_pipeline(args.model, device, dtype)
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
    print(f"saved {args.out} ({len(images)} frames, {images[0].width}x{images[0].height})")
    print(pipe.acceleration_stats.summary())
    stats = pipe.acceleration_stats.to_dict()
    verdict = print_verdict(clip, args.prompt, clip=True)
    if verdict is not None:
        stats["verifier"] = verdict
    write_stats_json(args.stats_json, stats)
    return stats
