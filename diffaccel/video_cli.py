"""``diffaccel generate-video``: text-to-video with the DiT features, written as a GIF.

Example:
    $ diffaccel generate-video "a red circle moving to the left" --model path/to/wan \\
        --delta-cache 0.05 --quantize nvfp4 --out clip.gif

``--model`` takes a diffusers text-to-video folder or hub id (Wan, CogVideoX, LTX), ``micro-video``
(the bundled micro model, once it is trained and exported: until then it says so) or
:data:`RANDOM_VIDEO_MODEL`, a tiny random-weight Wan built in code (it draws noise: it shows the
machinery, not a clip). It prints the seconds, what the features did and, when the prompt is a
ShapeWorld caption, the verifier's verdict on the clip (motion included).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .cli_types import non_negative_float, positive_int

#: The bundled micro text-to-video model (``assets/models/micro-video``).
MICRO_VIDEO = "micro-video"
#: A tiny Wan pipeline with RANDOM weights, built in code.
RANDOM_VIDEO_MODEL = "diffaccel/tiny-random-wan"


def add_parser(commands: Any) -> None:
    """Add the ``generate-video`` subcommand to the ``diffaccel`` parser's subparsers."""
    video = commands.add_parser("generate-video", help="generate a clip from a prompt (GIF)")
    video.add_argument("prompt")
    video.add_argument("--model", default=MICRO_VIDEO,
                       help=f"local folder, hub id, {MICRO_VIDEO} (the default, bundled) or {RANDOM_VIDEO_MODEL}")
    video.add_argument("--out", required=True, help="output file (.gif)")
    video.add_argument("--steps", type=positive_int, default=30)
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--frames", type=positive_int, default=9, help="number of frames (Wan: 4k + 1)")
    video.add_argument("--height", type=positive_int, default=None)
    video.add_argument("--width", type=positive_int, default=None)
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

        try:
            pipe = load_micro_video(device, dtype)
        except FileNotFoundError as err:
            raise SystemExit(f"{err}\nPass --model PATH (a Wan, CogVideoX or LTX folder) or {RANDOM_VIDEO_MODEL}.") from None
        print(f"model: {MICRO_VIDEO} (bundled, trained on moving ShapeWorld, 64x64)", file=sys.stderr)
        return pipe, {"height": 64, "width": 64}
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, use_safetensors=True).to(device), {}


def generate_video(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``diffaccel generate-video``; returns the statistics it prints."""
    import numpy as np
    import torch
    from PIL import Image

    import diffaccel

    from .cli import (
        print_feature_stats,
        print_verdict,
        weight_and_cache_configs,
        write_stats_json,
    )

    if not args.out.lower().endswith(".gif"):
        raise SystemExit(f"--out must end with .gif: {args.out}")
    builtin = args.model in (MICRO_VIDEO, RANDOM_VIDEO_MODEL)
    if not builtin and not os.path.isdir(args.model) and os.path.sep in args.model:
        raise SystemExit(f"--model: no such folder: {args.model}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    configs = weight_and_cache_configs(args, builtin=builtin)
    pipe, call = load_video_pipeline(args.model, device, dtype)
    pipe = diffaccel.accelerate(pipe, *configs)
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    call.update({k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None})
    frames = pipe(args.prompt, num_inference_steps=args.steps, num_frames=args.frames, guidance_scale=args.guidance_scale,
                  generator=torch.Generator().manual_seed(args.seed), output_type="np", **call).frames[0]
    clip = (np.clip(np.asarray(frames, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    images = [Image.fromarray(frame) for frame in clip]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
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
