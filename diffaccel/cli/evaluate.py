"""``diffaccel eval``: evaluate variants of a pipeline side by side into a resumable run folder.

Example:
    $ diffaccel eval --model micro-sd --prompts shapeworld:relation:heldout:16 --seeds 0,1 --steps 25 \\
        --variant reuse=encoder-reuse:uniform:2 --variant dc3=deepcache:interval=3 --out runs/eval-sd

Everything :func:`diffaccel.evaluate` checks (prompts, variant specs, metric names, the output
folder, the model and the call settings) is checked before any model work; a bad input is a
one-line error. Rerunning the same command resumes the run; under ``torchrun`` it is sharded.
"""

from __future__ import annotations

import argparse
from typing import Any

from .checks import non_negative_float, positive_int


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas (e.g. 0,1,2), got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0 separated by commas, got {text!r}")
    return seeds


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected metric names separated by commas")
    return names


def add_parser(commands: Any) -> None:
    """Add the ``eval`` subcommand to the ``diffaccel`` parser's subparsers."""
    parser = commands.add_parser("eval", help="evaluate variants side by side (speed, fidelity, FID, CLIP, rewards)",
                                 description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="micro-sd",
                        help="a diffusers folder or hub id, micro-sd (default), micro-dit, micro-video, diffaccel/tiny-random-sd")
    parser.add_argument("--prompts", required=True,
                        help="a .txt/.jsonl/.csv/.tsv prompt file or shapeworld:KIND[:SPLIT][:N] "
                             "(KIND single, count, relation, motion, relation-motion; SPLIT train or heldout)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                        help="a variant (repeatable): none, diffaccel parts joined by + (encoder-reuse:uniform:2, "
                             "delta-cache:0.1, int8, nvfp4, quantized-attention) or a peer (deepcache:interval=3, "
                             "diffusers-cache:FirstBlockCache:threshold=0.1, cache-dit, tomesd:ratio=0.5, "
                             "quanto:int8, torchao:int8wo) or steering (best-of:4, fk:particles=4, "
                             "search:random,budget_nfe=200, joinable with diffaccel parts); the untouched pipeline "
                             "is always evaluated")
    parser.add_argument("--grid", default=None, help="a JSON or YAML file mapping variant names to specs")
    parser.add_argument("--metrics", type=_names, default=None,
                        help="comma-separated: psnr, ssim, verifier, verifier_score, clip_score, fid, reward:SPEC "
                             "(default: every one that applies)")
    parser.add_argument("--out", required=True, help="the run folder (rerun the same command to resume)")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default 0)")
    parser.add_argument("--steps", type=positive_int, default=None, help="inference steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=non_negative_float, default=None,
                        help="guidance scale (default: 5 for micro-sd, else the pipeline's)")
    parser.add_argument("--scheduler", default=None, help="a diffusers scheduler class, e.g. DPMSolverMultistepScheduler")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="prompts per pipeline call (default 4)")
    parser.add_argument("--height", type=positive_int, default=None)
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--frames", type=positive_int, default=None, help="clip length (video models; default 9 for "
                                                                          "the bundled and tiny ones)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--clip-model", default=None,
                        help="clip_score's CLIP model as a reward spec (default transformers-clip:micro-clip; "
                             "clip:MODEL:PRETRAINED for open_clip)")
    parser.add_argument("--steering-reward", default=None,
                        help="the reward steering variants (fk:, best-of:, search:) steer by, as a --reward spec "
                             "(default: shapeworld for ShapeWorld prompts, else the CLIP model)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's; on a shared machine 1 keeps timings steady)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up call of each variant")
    parser.add_argument("--timing-rounds", type=positive_int, default=3,
                        help="rank 0's timing rounds in a multi-process run (default 3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_eval(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run ``diffaccel eval`` with parsed ``args``; returns the summary (None on ranks other than 0)."""
    import torch

    from ..evaluation.driver import DEFAULT_CLIP_MODEL, evaluate

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    call: dict[str, Any] = {}
    for key, value in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance),
                       ("height", args.height), ("width", args.width), ("num_frames", args.frames)):
        if value is not None:
            call[key] = value
    summary = evaluate(
        args.model, args.prompts, args.variant, out_dir=args.out, seeds=args.seeds, metrics=args.metrics,
        grid=args.grid, batch_size=args.batch_size, device=args.device, dtype=getattr(torch, args.dtype),
        scheduler=args.scheduler, warmup=not args.no_warmup, timing_rounds=args.timing_rounds,
        clip_model=args.clip_model or DEFAULT_CLIP_MODEL, steering_reward=args.steering_reward,
        progress=not args.quiet, **call)
    if summary is not None:
        print(f"wrote {args.out}/summary.json and {args.out}/report.md")
    return summary
