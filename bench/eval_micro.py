"""Evaluate the micro models on held-out ShapeWorld prompts; writes bench/results/micro_models/eval_micro_<device>.json.

micro-SD: the verifier's accuracy (all criteria met), mean score and the share meeting each
criterion per prompt kind (held-out prompts, or ``--split train``), at 25-50 DDIM
steps, next to the same pipeline with a random-weight UNet (the floor); FID against real renders of
held-out scenes with micro-CLIP's image features (torchmetrics' pluggable feature extractor).
micro-CLIP: zero-shot caption retrieval and hard-negative accuracy on held-out images.
micro-video: on held-out motion prompts (9 frames, 64x64), the share of clips whose object has the
right color and shape (in most frames) and the share that move the right way, next to the same
pipeline with a random-weight transformer.
Every verifier score also comes as it was before the verifier had ``no_extra_objects``
(``*_without_no_extra_objects``), with the results only that criterion fails (``flipped``).

    python bench/eval_micro.py --steps 25 --prompts 64 --fid-images 256
    python bench/eval_micro.py --sd runs/micro-sd/export --skip-clip   # a checkpoint's export
    python bench/eval_micro.py --skip-clip --skip-video --kinds relation --split train --fid-images 0
    python bench/eval_micro.py --skip-clip --skip-sd --video runs/micro-video/export --video-prompts 64
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))
from benchkit import write_report  # noqa: E402


def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch: int) -> torch.Tensor:
    """Images (N, 3, 64, 64) in [0, 1]; chunk ``i`` is seeded with ``seed + i``."""
    out = []
    for i, start in enumerate(range(0, len(prompts), batch)):
        chunk = prompts[start:start + batch]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                      generator=torch.Generator().manual_seed(seed + i)).images
        out.append(images.float().cpu())
    return torch.cat(out)


def without_extras(results: list) -> dict:
    """What the verifier scored before it had ``no_extra_objects``, and the results that criterion
    fails although they meet every other one, each with the objects it found (for a clip: in its
    most crowded frame)."""
    older = [{k: ok for k, ok in r.criteria.items() if k != "no_extra_objects"} for r in results]
    flipped = [{"index": i, "prompt": r.prompt,
                "objects": [f"{d.color} {d.shape or 'blob'} {d.area:.3f}" for d in max(r.detections, key=len)]}
               for i, (r, old) in enumerate(zip(results, older)) if all(old.values()) and not r.passed]
    return {"accuracy_without_no_extra_objects": sum(all(c.values()) for c in older) / len(results),
            "mean_score_without_no_extra_objects": sum(sum(c.values()) / len(c) for c in older) / len(results),
            "flipped_by_no_extra_objects": len(flipped), "flipped": flipped}


def verifier_scores(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    from diffaccel.shapeworld import Verifier

    results = Verifier().verify(images, prompts)
    names = sorted({name for r in results for name in r.criteria})
    return {"accuracy": sum(r.passed for r in results) / len(results),
            "mean_score": sum(r.score for r in results) / len(results),
            "criteria": {name: sum(r.criteria.get(name, False) for r in results) / len(results) for name in names},
            **without_extras(results)}


def fid(real: torch.Tensor, fake: torch.Tensor, features: torch.nn.Module) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    device = next(features.parameters()).device
    metric = FrechetInceptionDistance(feature=features, normalize=True).to(device)
    metric.update(real.to(device), real=True)
    metric.update(fake.to(device), real=False)
    return float(metric.compute())


def evaluate_sd(args: argparse.Namespace, features: torch.nn.Module) -> dict:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffaccel.shapeworld import ShapeWorldImages, eval_prompts
    from diffaccel.testing.components import seeded

    pipe = StableDiffusionPipeline.from_pretrained(str(args.sd), torch_dtype=torch.float32,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    with seeded(args.seed, "random-unet"):
        random_unet = UNet2DConditionModel.from_config(pipe.unet.config).to(args.device)
    report: dict = {"model": str(args.sd), "steps": args.steps, "guidance_scale": args.guidance,
                    "prompts_per_kind": args.prompts, "split": args.split, "kinds": {}}
    for kind in args.kinds:
        prompts = eval_prompts(kind, args.prompts, seed=args.seed, split=args.split)
        start = time.perf_counter()
        trained = verifier_scores(generate(pipe, prompts, args.steps, args.guidance, args.seed, args.batch),
                                  prompts)
        seconds = time.perf_counter() - start
        unet, pipe.unet = pipe.unet, random_unet
        floor = verifier_scores(generate(pipe, prompts, args.steps, args.guidance, args.seed, args.batch),
                                prompts)
        pipe.unet = unet
        report["kinds"][kind] = {"trained": trained, "random_unet": floor, "seconds": round(seconds, 1)}
        print(f"{kind:9s} accuracy {trained['accuracy']:.3f} (random UNet {floor['accuracy']:.3f}), "
              f"mean score {trained['mean_score']:.3f} (random {floor['mean_score']:.3f})", flush=True)
    if args.fid_images:
        data = ShapeWorldImages("heldout", 64, length=args.fid_images, seed=args.seed + 1)
        items = [data[i] for i in range(args.fid_images)]
        real = (torch.stack([p for p, _ in items]) + 1) / 2
        fake = generate(pipe, [c for _, c in items], args.steps, args.guidance, args.seed, args.batch)
        report["fid_micro_clip"] = fid(real, fake, features)
        other = (torch.stack([ShapeWorldImages("heldout", 64, length=args.fid_images, seed=args.seed + 2)[i][0]
                              for i in range(args.fid_images)]) + 1) / 2
        report["fid_real_vs_real"] = fid(real, other, features)  # the floor: two sets of renders
        print(f"FID (micro-CLIP features, {args.fid_images} images): {report['fid_micro_clip']:.2f}; "
              f"real vs real {report['fid_real_vs_real']:.2f}", flush=True)
    return report


def generate_clips(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch: int
                   ) -> torch.Tensor:
    """Clips (N, 9, 3, 64, 64) in [0, 1]; chunk ``i`` is seeded with ``seed + i``."""
    out = []
    for i, start in enumerate(range(0, len(prompts), batch)):
        frames = pipe(prompts[start:start + batch], num_inference_steps=steps, guidance_scale=guidance,
                      height=64, width=64, num_frames=9, output_type="pt",
                      generator=torch.Generator().manual_seed(seed + i)).frames
        out.append(frames.float().cpu())
    return torch.cat(out)


def clip_scores(clips: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Verifier accuracies of single-object motion clips: color and shape, motion, all criteria."""
    from diffaccel.shapeworld import Verifier

    results = Verifier().verify_clips(clips, prompts)
    n = len(results)
    return {"color_shape": sum(r.criteria["object_0_color"] and r.criteria["object_0_shape"] for r in results) / n,
            "motion": sum(r.criteria["motion"] for r in results) / n,
            "accuracy": sum(r.passed for r in results) / n,
            "mean_score": sum(r.score for r in results) / n,
            **without_extras(results)}


def evaluate_video(args: argparse.Namespace) -> dict:
    from diffusers import WanPipeline, WanTransformer3DModel

    from diffaccel.shapeworld import eval_prompts
    from diffaccel.testing.components import seeded

    pipe = WanPipeline.from_pretrained(str(args.video), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    prompts = eval_prompts("motion", args.video_prompts, seed=args.seed, split="heldout")
    start = time.perf_counter()
    trained = clip_scores(generate_clips(pipe, prompts, args.steps, args.video_guidance, args.seed, args.batch),
                          prompts)
    seconds = time.perf_counter() - start
    with seeded(args.seed, "random-transformer"):
        pipe.transformer = WanTransformer3DModel.from_config(pipe.transformer.config).to(args.device)
    floor = clip_scores(generate_clips(pipe, prompts, args.steps, args.video_guidance, args.seed, args.batch),
                        prompts)
    print(f"micro-video: color+shape {trained['color_shape']:.3f} (random {floor['color_shape']:.3f}), "
          f"motion {trained['motion']:.3f} (random {floor['motion']:.3f}), all criteria "
          f"{trained['accuracy']:.3f} (random {floor['accuracy']:.3f})", flush=True)
    return {"model": str(args.video), "steps": args.steps, "guidance_scale": args.video_guidance,
            "prompts": args.video_prompts, "trained": trained, "random_transformer": floor,
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> dict:
    from diffaccel.micro_models import (
        MicroClipFeatures,
        load_micro_clip,
        micro_model_path,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd", type=pathlib.Path, default=None, help="micro-SD folder (default: bundled)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (25-50)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts per kind")
    parser.add_argument("--kinds", nargs="+", default=["single", "relation", "count"],
                        choices=["single", "relation", "count"])
    parser.add_argument("--split", default="heldout", choices=["heldout", "train"],
                        help="micro-SD prompt split (train: tells generalization failures from learning ones)")
    parser.add_argument("--fid-images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-clip", action="store_true")
    parser.add_argument("--skip-sd", action="store_true")
    parser.add_argument("--video", type=pathlib.Path, default=None,
                        help="micro-video folder (default: bundled, when present)")
    parser.add_argument("--video-prompts", type=int, default=64, help="held-out motion prompts")
    parser.add_argument("--video-guidance", type=float, default=5.0)
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be in [1, 1000], got {args.steps}")
    if args.prompts < 1:
        raise ValueError(f"--prompts must be >= 1, got {args.prompts}")
    if args.fid_images and args.fid_images < 2:
        raise ValueError(f"--fid-images must be 0 or >= 2, got {args.fid_images}")
    torch.set_num_threads(args.threads)
    clip, tokenizer = load_micro_clip(args.device)
    report: dict = {"command": " ".join(["python bench/eval_micro.py", *(sys.argv[1:] if argv is None else argv)]),
                    "device": args.device}
    if not args.skip_clip:
        import micro_clip

        report["micro_clip"] = micro_clip.evaluate(clip, tokenizer, n=256, batch=64)
        print("micro-CLIP:", json.dumps(report["micro_clip"]), flush=True)
    if not args.skip_sd:
        args.sd = args.sd or micro_model_path("micro-sd")
        report["micro_sd"] = evaluate_sd(args, MicroClipFeatures(clip))
    if not args.skip_video:
        try:
            args.video = args.video or micro_model_path("micro-video")
        except FileNotFoundError as missing:
            print(f"micro-video skipped: {missing}", flush=True)
        else:
            report["micro_video"] = evaluate_video(args)
    out = args.out or REPO / "bench" / "results" / "micro_models" / f"eval_micro_{args.device.split(':')[0]}.json"
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
