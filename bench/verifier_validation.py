"""Validate the ShapeWorld verifier: accuracy on ground-truth renders, on corrupted renders
(Gaussian blur, additive Gaussian noise, JPEG, downsample-upsample) and on negative controls
(random images, a random-weight generator's samples, other scenes' captions), plus its throughput.

"Accuracy" is the fraction of (image, own caption) pairs that pass every criterion; for the
negative controls it is the fraction that (wrongly) pass. ``*_without_no_extra_objects`` is the
same ignoring that criterion (what the verifier measured before it had one). The renders with an
extra object (``stills_extra_object``, ``clips_extra_object``: each scene plus one object of any
color and shape that its caption does not name, placed clear of its objects) must all fail.
Writes ``bench/results/verifier/verifier_validation.json``.

    python bench/verifier_validation.py --n 400 --clips 100
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm import tqdm

from diffaccel.shapeworld import (
    ShapeWorldClips,
    Verifier,
    render,
    sample_extra,
    sample_scene,
)

STILL_KINDS = ("single", "count", "relation")
CORRUPTIONS = {
    "clean": None,
    "blur_sigma_0.75": ("blur", 0.75),
    "blur_sigma_1.5": ("blur", 1.5),
    "blur_sigma_2.5": ("blur", 2.5),
    "noise_std_0.05": ("noise", 0.05),
    "noise_std_0.1": ("noise", 0.1),
    "noise_std_0.2": ("noise", 0.2),
    "jpeg_q30": ("jpeg", 30),
    "jpeg_q10": ("jpeg", 10),
    "resample_x2": ("resample", 2),
    "resample_x4": ("resample", 4),
    "blur_1.0+noise_0.1": ("blur+noise", (1.0, 0.1)),
}


def corrupt(image: Image.Image, how, rng: np.random.Generator) -> Image.Image:
    """Degrade a render the way a small generator's samples are degraded."""
    if how is None:
        return image
    kind, strength = how
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(strength))
    if kind == "noise":
        pixels = np.asarray(image, np.float32) / 255 + rng.normal(
            0, strength, (*image.size[::-1], 3)
        )
        return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=strength)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "resample":
        small = image.resize((image.width // strength,) * 2, Image.Resampling.BILINEAR)
        return small.resize(image.size, Image.Resampling.BILINEAR)
    if kind == "blur+noise":
        return corrupt(corrupt(image, ("blur", strength[0]), rng), ("noise", strength[1]), rng)
    raise ValueError(kind)


def still_set(n: int, size: int, seed: int):
    """n scenes per still kind, half train and half held-out."""
    rng = np.random.default_rng(seed)
    scenes = [
        sample_scene(rng, ("train", "heldout")[i % 2], kind)
        for kind in STILL_KINDS
        for i in range(n)
    ]
    return scenes, [render(s, size) for s in scenes]


def with_extra_objects(scenes, size: int, seed: int, frames: int = 1) -> list:
    """Each scene rendered with one extra object beside its own (every frame, for ``frames`` > 1)."""
    rng = np.random.default_rng(seed)
    extras = [(sample_extra(rng, scene),) for scene in scenes]
    if frames == 1:
        return [render(scene, size, extra=extra) for scene, extra in zip(scenes, extras)]
    return [
        [render(scene, size, t, frames, extra) for t in range(frames)]
        for scene, extra in zip(scenes, extras)
    ]


def random_weight_images(prompts: list[str]) -> torch.Tensor:
    """What a random-weight generator draws: the tiny offline SD pipeline, 2 steps, 64x64."""
    from diffaccel.testing import tiny_call_inputs, tiny_pipeline

    pipe = tiny_pipeline("sd", seed=0)
    generator = torch.Generator().manual_seed(0)
    return torch.cat(
        [
            pipe(
                prompts[i : i + 16],
                num_inference_steps=2,
                output_type="pt",
                generator=generator,
                **tiny_call_inputs("sd"),
            ).images
            for i in range(0, len(prompts), 16)
        ]
    )


def _passed_without_extras(result) -> bool:
    return all(ok for name, ok in result.criteria.items() if name != "no_extra_objects")


def summarize(results, kinds, name: str = "accuracy") -> dict:
    """``name`` (the fraction passing), per kind, without ``no_extra_objects``, and per criterion."""
    out = {name: float(np.mean([r.passed for r in results]))}
    for kind in sorted(set(kinds)):
        out[f"{name}_{kind}"] = float(
            np.mean([r.passed for r, k in zip(results, kinds) if k == kind])
        )
    out[f"{name}_without_no_extra_objects"] = float(np.mean([_passed_without_extras(r) for r in results]))
    criteria = {}
    for r in results:
        for name, ok in r.criteria.items():
            criteria.setdefault(name, []).append(ok)
    out["criteria"] = {name: float(np.mean(v)) for name, v in sorted(criteria.items())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="scenes per still kind")
    parser.add_argument("--clips", type=int, default=100, help="moving clips")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/verifier/verifier_validation.json")
    args = parser.parse_args()
    verifier = Verifier()
    rng = np.random.default_rng(args.seed + 1)
    extra_rng = np.random.default_rng(args.seed + 4)  # corrupts the extra-object renders
    scenes, images = still_set(args.n, args.size, args.seed)
    prompts, kinds = [s.caption for s in scenes], [s.kind for s in scenes]
    report: dict = {
        "args": vars(args),
        "verifier": vars(verifier),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "stills": {},
    }

    extra_images = with_extra_objects(scenes, args.size, args.seed + 2)
    report["stills_extra_object"] = {}
    for name, how in tqdm(CORRUPTIONS.items(), desc="corruptions"):
        corrupted = [corrupt(im, how, rng) for im in images]
        report["stills"][name] = summarize(verifier.verify(corrupted, prompts), kinds)
        corrupted = [corrupt(im, how, extra_rng) for im in extra_images]
        report["stills_extra_object"][name] = summarize(
            verifier.verify(corrupted, prompts), kinds, "pass_rate"
        )

    clips = ShapeWorldClips("heldout", args.size, args.frames, args.clips, seed=args.seed)
    clip_data = [clips[i] for i in range(len(clips))]
    clip_prompts = [c for _, c in clip_data]
    clip_frames = [
        [
            Image.fromarray(((f.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
            for f in clip
        ]
        for clip, _ in clip_data
    ]
    extra_clips = with_extra_objects(
        [clips.scene(i) for i in range(len(clips))], args.size, args.seed + 3, args.frames
    )
    report["clips"], report["clips_extra_object"] = {}, {}
    motion = ["motion"] * len(clip_frames)
    for name in ("clean", "blur_sigma_1.5", "noise_std_0.1", "blur_1.0+noise_0.1"):
        how = CORRUPTIONS[name]
        frames = [[corrupt(f, how, rng) for f in clip] for clip in clip_frames]
        report["clips"][name] = summarize(verifier.verify_clips(frames, clip_prompts), motion)
        frames = [[corrupt(f, how, extra_rng) for f in clip] for clip in extra_clips]
        report["clips_extra_object"][name] = summarize(
            verifier.verify_clips(frames, clip_prompts), motion, "pass_rate"
        )

    # negative controls: what must fail
    noise = rng.integers(0, 256, (len(images), args.size, args.size, 3), dtype=np.uint8)
    every = prompts[:: max(1, len(prompts) // 48)]  # ~48 prompts of every kind
    negatives = {
        "uniform_noise": (noise, prompts),
        "smoothed_noise": (
            [Image.fromarray(x).filter(ImageFilter.GaussianBlur(3)) for x in noise],
            prompts,
        ),
        "blank": ([Image.new("RGB", (args.size,) * 2, (240, 240, 240))] * len(prompts), prompts),
        "random_weight_sd": (random_weight_images(every), every),
    }
    report["negatives"] = {}
    for name, (batch, batch_prompts) in negatives.items():
        results = verifier.verify(batch, batch_prompts)
        report["negatives"][name] = {
            "pass_rate": float(np.mean([r.passed for r in results])),
            "mean_score": float(np.mean([r.score for r in results])),
        }
    # another scene's caption: passes only where that caption happens to fit this image too
    shuffled = [prompts[(i + len(prompts) // 3 + 1) % len(prompts)] for i in range(len(prompts))]
    results = verifier.verify(images, shuffled)
    report["negatives"]["other_scene_caption"] = {
        "pass_rate": float(np.mean([r.passed for r in results])),
        "mean_score": float(np.mean([r.score for r in results])),
    }

    # throughput: images per second of verify() at batch 1, 8 and 64 (medians of 5 rounds)
    batch_images = np.stack([np.asarray(im) for im in images[:64]])
    report["images_per_second"] = {}
    for batch in (1, 8, 64):
        rates = []
        for _ in range(5):
            start = time.perf_counter()
            verifier.verify(batch_images[:batch], prompts[:batch])
            rates.append(batch / (time.perf_counter() - start))
        report["images_per_second"][f"batch_{batch}"] = statistics.median(rates)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'corruption':<22} {'all':>6} " + " ".join(f"{k:>9}" for k in STILL_KINDS))
    for name, s in report["stills"].items():
        print(
            f"{name:<22} {s['accuracy']:6.3f} "
            + " ".join(f"{s['accuracy_' + k]:9.3f}" for k in STILL_KINDS)
        )
    print("with an extra object (must fail): pass rate, without no_extra_objects")
    for name, s in report["stills_extra_object"].items():
        print(f"{name:<22} {s['pass_rate']:6.3f} {s['pass_rate_without_no_extra_objects']:6.3f}")
    for name, s in report["clips"].items():
        print(f"clips {name:<16} {s['accuracy']:6.3f}  motion {s['criteria']['motion']:.3f}")
    for name, s in report["clips_extra_object"].items():
        print(
            f"clips + extra {name:<16} pass rate {s['pass_rate']:6.3f} "
            f"(without no_extra_objects {s['pass_rate_without_no_extra_objects']:.3f})"
        )
    for name, r in report["negatives"].items():
        print(
            f"negative {name:<20} pass rate {r['pass_rate']:.3f}  mean score {r['mean_score']:.3f}"
        )
    for name, rate in report["images_per_second"].items():
        print(f"images/s {name:<10} {rate:8.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
