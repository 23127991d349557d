"""Inference-time scaling benchmark: FK steering and noise search against best-of-1 and best-of-N.

For an image and a video pipeline, on held-out ShapeWorld prompts (two-object relations for
images, motions for clips), it measures with the steering reward and an independent check reward
(the ShapeWorld verifier and micro-CLIP, in both roles, to expose reward hacking):

1. FK steering with k = 4 and 8 against k = 1 (the untouched pipeline) and against best-of-N
   (random search) at equal NFE;
2. reward against NFE for random search, zero-order search, search over paths, Rollover Budget
   Forcing (flow pipelines) and FK (JSON, and a PNG plot);
3. accelerated FK (encoder reuse, UNet pipelines) against plain FK at equal wall time.

Usage:
    python bench/steering.py --image-model micro-sd --video-model micro-video   # micro models, micro-CLIP check
    python bench/steering.py --quick    # tiny random pipelines: smoke test only, numbers meaningless

Writes ``bench/results/steering/steering_<tag>.json`` and ``steering_<tag>_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import diffaccel
from diffaccel.rewards import CLIPScoreReward, Reward, ShapeWorldReward
from diffaccel.shapeworld import eval_prompts
from diffaccel.steering import FKSteeringConfig, NoiseSearchConfig, search, steer
from diffaccel.steering.stochastic import stochastic_call

METHODS = ("random", "zero-order", "paths", "rbf", "fk")


def tiny_clip_folder() -> str:
    """A random-weight transformers CLIP saved to a temporary folder (stands in for micro-CLIP in --quick)."""
    from transformers import CLIPConfig, CLIPModel

    from diffaccel.tokenizers import clip_tokenizer

    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="diffaccel-tiny-clip-")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def load(path: str | None, tiny: str, device: str, eta: float | None = None) -> tuple[Any, dict[str, Any]]:
    """A pipeline (a local folder, or the tiny random one) made stochastic; returns it and call kwargs.
    ``eta`` replaces the DDIM eta of 1 that makes DDIM pipelines stochastic (ValueError on other schedulers)."""
    if path is None:
        from diffaccel.testing import TINY_CALL_KWARGS, tiny_pipeline

        pipe = tiny_pipeline(tiny)
        call = dict(TINY_CALL_KWARGS[tiny])
        if tiny == "sd":
            call.update(height=32, width=32)
    elif path in ("micro-sd", "micro-video"):
        from diffaccel import micro_models

        pipe = micro_models.load_micro_sd() if path == "micro-sd" else micro_models.load_micro_video()
        call = {} if path == "micro-sd" else {"height": 64, "width": 64, "num_frames": 9}
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
        call = {}
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    call.update(stochastic_call(pipe))
    if eta is not None:
        if "eta" not in call:
            raise ValueError(f"eta is a DDIM setting; this pipeline samples with {type(pipe.scheduler).__name__}")
        call["eta"] = eta
    return pipe, call


def evaluate(media: Any, prompts: list[str], rewards: dict[str, Reward]) -> dict[str, float]:
    """Mean of each reward over the samples, and the verifier's pass rate (all criteria met)."""
    result = {}
    for name, reward in rewards.items():
        scores = reward(media, prompts)
        result[name] = float(scores.mean())
        if isinstance(reward, ShapeWorldReward):
            result["pass_rate"] = float((scores >= 1.0).float().mean())
    return result


def mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.fmean(row[key] for row in rows) for key in rows[0]}


class Bench:
    def __init__(self, pipe: Any, call: dict[str, Any], prompts: list[str], seeds: list[int], steps: int,
                 rewards: dict[str, Reward], fk: dict[str, Any] | None = None) -> None:
        self.pipe, self.call, self.prompts, self.seeds, self.steps, self.rewards = pipe, call, prompts, seeds, steps, rewards
        self.fk = {"potential": "max", "lmbda": 10.0, "start": 0.6, "final_correction": False, "ess": 0.5, **(fk or {})}

    def _kwargs(self, seed: int) -> dict[str, Any]:
        return dict(self.call, num_inference_steps=self.steps, generator=torch.Generator().manual_seed(seed), output_type="pt")

    def run(self, method: str, nfe: int, steer_name: str, pipe: Any = None) -> dict[str, float]:
        """Best sample per (prompt, seed) for ``method`` at ``nfe``; rewards averaged, plus seconds."""
        pipe = pipe or self.pipe
        reward = self.rewards[steer_name]
        rows, seconds = [], []
        for seed in self.seeds:
            for prompt in tqdm(self.prompts, desc=f"{method} nfe={nfe} steer={steer_name} seed={seed}", leave=False):
                begin = time.perf_counter()
                if method == "fk":
                    k = nfe // self.steps
                    config = FKSteeringConfig(num_particles=k, potential=self.fk["potential"], lmbda=self.fk["lmbda"],
                                              resample_every=max(1, self.steps // 5),
                                              resample_start=int(self.fk["start"] * self.steps),
                                              resample_end=self.steps - 2, seed=seed, ess_threshold=self.fk["ess"],
                                              final_correction=self.fk["final_correction"] and k > 1)
                    out = steer(pipe, config, reward)(prompt, **self._kwargs(seed))
                    best = out.images[out.best_indices[0]]
                else:
                    config = NoiseSearchConfig(method, budget_nfe=nfe, batch_size=4, num_paths=2,
                                               branch_every=max(1, self.steps // 5), seed=seed)
                    best = search(pipe, prompt, config, reward, **self._kwargs(seed)).sample
                seconds.append(time.perf_counter() - begin)
                rows.append(evaluate(best.unsqueeze(0), [prompt], self.rewards))
        result = {**mean_dicts(rows), "seconds": statistics.median(seconds), "nfe": nfe}
        if "pass_rate" in rows[0]:  # which (seed, prompt) pairs pass: tells systematic failures apart
            result["passed"] = [int(row["pass_rate"]) for row in rows]
        return result


def scaling(bench: Bench, steer_name: str, ks: list[int]) -> dict[str, Any]:
    """FK at k against k = 1 and best-of-N at equal NFE."""
    steps = bench.steps
    table: dict[str, Any] = {"k=1": bench.run("fk", steps, steer_name)}
    for k in ks:
        table[f"fk k={k}"] = bench.run("fk", k * steps, steer_name)
        table[f"best-of-{k}"] = bench.run("random", k * steps, steer_name)
    return table


def curves(bench: Bench, steer_name: str, multiples: list[int], methods: tuple[str, ...] = METHODS
           ) -> dict[str, list[dict[str, float]]]:
    """Reward against NFE for each of ``methods``."""
    result: dict[str, list[dict[str, float]]] = {}
    for method in methods:
        if method == "rbf" and type(bench.pipe.scheduler).__name__ != "FlowMatchSDEScheduler":
            continue  # Rollover Budget Forcing is for flow models
        points = []
        for m in multiples:
            if method == "paths" and m < 2:
                continue
            points.append(bench.run(method, m * bench.steps, steer_name))
        result[method] = points
    return result


def accelerated_vs_plain(bench: Bench, steer_name: str, k: int) -> dict[str, Any]:
    """Plain FK with k particles against accelerated FK given the same wall time (more particles):
    encoder reuse on UNet pipelines, the delta cache on transformer (DiT) pipelines."""
    plain = bench.run("fk", k * bench.steps, steer_name)
    feature = (diffaccel.EncoderReuseConfig("uniform:2") if getattr(bench.pipe, "unet", None) is not None
               else diffaccel.DeltaCacheConfig())
    pipe = diffaccel.accelerate(bench.pipe, feature)
    try:
        fast = bench.run("fk", k * bench.steps, steer_name, pipe)
        afford = max(k, int(k * plain["seconds"] / max(fast["seconds"], 1e-9)))
        equal_time = bench.run("fk", afford * bench.steps, steer_name, pipe) if afford > k else fast
    finally:
        diffaccel.restore(pipe)
    return {"feature": type(feature).__name__, "plain": plain, "accelerated_same_k": fast,
            "accelerated_equal_time": {**equal_time, "k": afford},
            "speedup_same_k": plain["seconds"] / max(fast["seconds"], 1e-9)}


def plot(curve_sets: dict[str, dict[str, list[dict[str, float]]]], path: str) -> None:
    """Reward-vs-NFE line charts (one panel per setup and steering reward), drawn with PIL."""
    from PIL import Image, ImageDraw

    colors = {"random": (31, 119, 180), "zero-order": (255, 127, 14), "paths": (44, 160, 44), "rbf": (148, 103, 189),
              "fk": (214, 39, 40)}
    panels = list(curve_sets.items())
    width, height, pad = 360, 260, 40
    image = Image.new("RGB", (width * max(1, len(panels)), height), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, curve) in enumerate(panels):
        left = p * width
        metric = title.split(" / ")[-1]
        points = [(pt["nfe"], pt[metric]) for pts in curve.values() for pt in pts]
        if not points:
            continue
        x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
        y0, y1 = min(y for _, y in points), max(y for _, y in points)
        y1 = y1 if y1 > y0 else y0 + 1e-6
        x1 = x1 if x1 > x0 else x0 + 1

        def at(x: float, y: float, left=left, x0=x0, x1=x1, y0=y0, y1=y1) -> tuple[float, float]:
            return (left + pad + (x - x0) / (x1 - x0) * (width - 2 * pad),
                    height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad))

        draw.rectangle([left + pad, pad, left + width - pad, height - pad], outline=(0, 0, 0))
        draw.text((left + pad, 8), title, fill=(0, 0, 0))
        draw.text((left + pad, height - pad + 4), f"NFE {x0:g}..{x1:g}", fill=(0, 0, 0))
        draw.text((left + 2, pad), f"{y1:.3g}", fill=(0, 0, 0))
        draw.text((left + 2, height - pad - 10), f"{y0:.3g}", fill=(0, 0, 0))
        for i, (method, pts) in enumerate(curve.items()):
            xy = [at(pt["nfe"], pt[metric]) for pt in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colors[method], width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colors[method])
            draw.text((left + width - pad - 70, pad + 4 + 12 * i), method, fill=colors[method])
    image.save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-model", default=None, help="micro-sd, or a pipeline folder (--quick: tiny random SD)")
    parser.add_argument("--video-model", default=None, help="micro-video, or a pipeline folder (--quick: tiny random LTX)")
    parser.add_argument("--clip", default=None, help="transformers CLIP folder (default: the bundled micro-CLIP)")
    parser.add_argument("--quick", action="store_true", help="tiny random pipelines, few prompts: a smoke test")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ks", default="4,8", help="FK particle counts compared with k = 1 and best-of-N")
    parser.add_argument("--multiples", default="1,2,4,8,16", help="NFE budgets of the curves, in multiples of --steps")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="methods of the reward-vs-NFE curves ('': no curves, only the k tables)")
    parser.add_argument("--steer", default="shapeworld,clip",
                        help="steering rewards (each run is checked with the other reward)")
    parser.add_argument("--fk-potential", default="max", help="FK potential: max, difference, sum, immediate")
    parser.add_argument("--fk-lambda", type=float, default=10.0, help="FK lambda (potential temperature)")
    parser.add_argument("--fk-start", type=float, default=0.6,
                        help="fraction of the steps before FK's first resampling: early x0 predictions barely "
                             "predict the final reward (bench/fk_predictiveness.py)")
    parser.add_argument("--fk-final-correction", action="store_true",
                        help="FK's final resampling toward p(x0) exp(lambda r): samples the tilted target, but can drop "
                             "the best particle before it is picked, so it is off for best-sample comparisons")
    parser.add_argument("--fk-ess", type=float, default=0.5,
                        help="FK adaptive resampling: resample only when the ESS falls below this fraction of k "
                             "(0: at every scheduled step)")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM eta of the image pipeline (default 1); lower eta makes x0 predictions predictive "
                             "earlier (bench/fk_predictiveness.py --eta), at less diversity after resampling")
    parser.add_argument("--skip-accelerated", action="store_true", help="leave out accelerated-vs-plain FK (sweeps)")
    parser.add_argument("--split", default="heldout", choices=("heldout", "train"),
                        help="prompt split (tune FK settings on train, report on heldout)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tag", default=None, help="results file tag (default: quick, or the device)")
    args = parser.parse_args(argv)
    if not args.quick and args.image_model is None and args.video_model is None:
        parser.error("--image-model or --video-model is required without --quick")
    if args.quick:
        args.prompts, args.seeds, args.steps = 1, 1, 4
    ks, multiples = ([int(v) for v in text.split(",")] for text in (args.ks, args.multiples))
    methods, steer_names = tuple(m for m in args.methods.split(",") if m), args.steer.split(",")
    if unknown := [m for m in methods if m not in METHODS] + [r for r in steer_names if r not in ("shapeworld", "clip")]:
        parser.error(f"unknown --methods / --steer values {unknown}: methods are {METHODS}, rewards shapeworld, clip")
    if args.quick:
        ks, multiples = [2, 4], [1, 2, 4]
    if args.clip is None and not args.quick:
        from diffaccel.micro_models import micro_model_path

        args.clip = str(micro_model_path("micro-clip"))
    clip = CLIPScoreReward.from_transformers(args.clip or tiny_clip_folder(), device=args.device)
    rewards = {"shapeworld": ShapeWorldReward(), "clip": clip}
    setups = [("image", args.image_model, "sd", "relation")] if args.image_model is not None or args.quick else []
    if args.video_model is not None or args.quick:
        setups.append(("video", args.video_model, "ltx", "motion"))
    note = "quick: tiny RANDOM pipelines, numbers meaningless" if args.quick else ""
    results: dict[str, Any] = {"args": vars(args), "note": note}
    curve_sets: dict[str, Any] = {}
    for label, path, tiny, kind in setups:
        try:
            pipe, call = load(path, tiny, args.device, args.eta if label == "image" else None)
        except ValueError as error:
            parser.error(f"--eta: {error}")
        prompts = eval_prompts(kind, args.prompts, seed=0, split=args.split)
        fk = {"potential": args.fk_potential, "lmbda": args.fk_lambda, "start": args.fk_start,
              "final_correction": args.fk_final_correction, "ess": args.fk_ess or None}
        bench = Bench(pipe, call, prompts, list(range(args.first_seed, args.first_seed + args.seeds)), args.steps,
                      rewards, fk)
        entry: dict[str, Any] = {"prompts": prompts}
        for steer_name in steer_names:
            check = "clip" if steer_name == "shapeworld" else "shapeworld"
            print(f"[{label}] steering on {steer_name}, checking with {check}", flush=True)
            entry[f"steer={steer_name}"] = {"scaling": scaling(bench, steer_name, ks),
                                            "curves": curves(bench, steer_name, multiples, methods)}
            curve_sets[f"{label} / {steer_name}"] = entry[f"steer={steer_name}"]["curves"]
        if not args.skip_accelerated:
            entry["accelerated_vs_plain"] = accelerated_vs_plain(bench, "shapeworld", ks[-1])
        results[label] = entry
    tag = args.tag or ("quick" if args.quick else args.device.split(":")[0])
    out_dir = os.path.join(ROOT, "bench", "results", "steering")
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"steering_{tag}.json")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    plot(curve_sets, os.path.join(out_dir, f"steering_{tag}_curves.png"))
    for label, _, _, _ in setups:
        for steer_name in steer_names:
            print(f"\n[{label}] steered on {steer_name} (means over prompts x seeds)")
            for name, row in results[label][f"steer={steer_name}"]["scaling"].items():
                values = "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("nfe", "passed"))
                print(f"  {name:12s} nfe {row['nfe']:4d}  " + values)
        if "accelerated_vs_plain" in results[label]:
            acc = results[label]["accelerated_vs_plain"]
            print(f"  accelerated FK ({acc['feature']}): {acc['speedup_same_k']:.2f}x per call; equal wall time affords "
                  f"k={acc['accelerated_equal_time']['k']}: shapeworld {acc['accelerated_equal_time']['shapeworld']:.3f} "
                  f"vs plain {acc['plain']['shapeworld']:.3f}")
    print(f"\nwrote {json_path}")
    return results


if __name__ == "__main__":
    main()
