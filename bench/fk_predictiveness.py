"""Does FK's intermediate reward predict the final one? The diagnostic behind FK against best-of-N.

FK steering resamples particles by a reward on their predicted x0 at intermediate steps. That can
only beat best-of-N (independent samples, the best one kept) if, among the particles of one prompt,
the ones that score higher mid-way are the ones that pass at the end. This script runs ``k``
particles per prompt with no resampling (so they are exactly best-of-k samples), scores the
predicted x0 at every ``--every``-th step with each of the ``--guides`` rewards (candidate
intermediate rewards: the ShapeWorld verifier, its layout-only check, micro-CLIP), and reports per
step and guide:

- ``auc``: over pairs of particles of the same prompt where one passes the verifier at the end and
  the other does not, the fraction in which the passing one scores higher at that step (ties count
  half; 0.5 = no information, 1 = perfect);
- ``top_pass``: how often the particle with the best intermediate score passes at the end, against
  ``pass_rate`` (a random particle) and ``best_of_k`` (any particle passes: the ceiling).

Usage:
    python bench/fk_predictiveness.py --image-model micro-sd --split train --prompts 48 --k 4
    python bench/fk_predictiveness.py --split heldout --prompts 64 --guides shapeworld,layout,clip
    python bench/fk_predictiveness.py --split train --prompts 32 --lookahead 0,1,3   # look-ahead guides
    python bench/fk_predictiveness.py --quick      # tiny random SD: smoke test, numbers meaningless

Writes ``bench/results/steering/fk_predictiveness_<tag>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import write_report  # noqa: E402
from diffaccel.rewards import CLIPScoreReward, Reward, ShapeWorldReward  # noqa: E402
from diffaccel.shapeworld import eval_prompts  # noqa: E402
from diffaccel.steering.fk import call_sizes, particle_kwargs  # noqa: E402
from diffaccel.steering.lookahead import LookaheadRollout  # noqa: E402
from diffaccel.steering.media import pipeline_media  # noqa: E402
from diffaccel.steering.session import ParticleSession  # noqa: E402
from steering import load, tiny_clip_folder  # noqa: E402

GUIDES = ("shapeworld", "layout", "clip")


class GuideScores(Reward):
    """Scores media with every reward of ``guides``, keeps each one's scores per call in ``history``
    and returns the first one's (the session needs one score per particle; there is no resampling)."""

    def __init__(self, guides: dict[str, Reward]) -> None:
        self.guides = guides
        self.name = next(iter(guides))
        self.worst = guides[self.name].worst
        self.history: dict[str, list[torch.Tensor]] = {name: [] for name in guides}

    def __call__(self, media: Any, prompts: Any) -> torch.Tensor:
        for name, reward in self.guides.items():
            self.history[name].append(reward(media, prompts))
        return self.history[self.name][-1]


def within_prompt_auc(scores: torch.Tensor, passed: torch.Tensor) -> tuple[float, int]:
    """AUC of ``scores`` (prompts, k) for ``passed`` (prompts, k), over same-prompt (pass, fail)
    pairs only; returns (auc, number of pairs), NaN without pairs."""
    wins, pairs = 0.0, 0
    for row, ok in zip(scores, passed):
        good, bad = row[ok], row[~ok]
        if len(good) and len(bad):
            diff = good[:, None] - bad[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.numel()
    return (wins / pairs if pairs else float("nan")), pairs


def trajectories(pipe: Any, call: dict[str, Any], prompts: list[str], k: int, steps: int, every: int,
                 guides: dict[str, Reward], verifier: ShapeWorldReward, seed: int, lookahead: int = 0
                 ) -> tuple[dict[str, dict[int, torch.Tensor]], torch.Tensor]:
    """Intermediate rewards ``{guide: {step: (prompts, k)}}`` and final verifier scores ``(prompts, k)``,
    with no resampling; with ``lookahead``, the guides score a deterministic rollout of that many
    steps from each state instead of its one-step x0 (the trajectories themselves are the same)."""
    intermediate: dict[str, dict[int, list[torch.Tensor]]] = {name: {} for name in guides}
    finals = []
    for prompt in tqdm(prompts, desc=f"k={k} trajectories"):
        particles = [prompt] * k
        scorer = GuideScores(guides)
        scored: list[int] = []
        kwargs = dict(call, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
        particle_call = particle_kwargs(kwargs, particles, k)
        session = ParticleSession(pipe, scorer, particles, lambda n: set(range(0, n - 1, every)),
                                  lambda step, is_last, rewards: scored.append(step), call_sizes(pipe, kwargs),
                                  lookahead=LookaheadRollout(pipe, pipe, lookahead, particle_call) if lookahead else None)
        output = session.run(pipe, particle_call)
        for name, history in scorer.history.items():
            for step, scores in zip(scored, history):
                intermediate[name].setdefault(step, []).append(scores)
        finals.append(verifier(pipeline_media(output), particles).float().cpu())
    stacked = {name: {s: torch.stack(v) for s, v in sorted(by_step.items())} for name, by_step in intermediate.items()}
    return stacked, torch.stack(finals)


def guide_rows(steps: dict[int, torch.Tensor], passed: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per step: the within-prompt AUC of one guide's scores, its pairs, mean score and top-particle pass rate."""
    rows = {}
    for step, scores in steps.items():
        auc, pairs = within_prompt_auc(scores, passed)
        top = scores.argmax(1, keepdim=True)  # first of the tied best, as resampling's arg-max would
        rows[str(step)] = {"auc": auc, "pairs": pairs, "mean_reward": float(scores.mean()),
                           "top_pass": float(passed.gather(1, top).float().mean())}
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-model", default="micro-sd", help="micro-sd or a pipeline folder")
    parser.add_argument("--quick", action="store_true", help="tiny random SD, 2 prompts: a smoke test")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--k", type=int, default=4, help="particles per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=2, help="score every n-th step")
    parser.add_argument("--split", default="train", choices=("train", "heldout"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM eta (default 1: the stochastic steps FK needs; lower keeps trajectories closer to the ODE)")
    parser.add_argument("--guides", default="shapeworld",
                        help=f"intermediate rewards scored on the predicted x0, comma-separated: {', '.join(GUIDES)}")
    parser.add_argument("--lookahead", default="0",
                        help="rollout lengths of the guides, comma-separated (0: the one-step x0; L: a deterministic "
                             "rollout of L denoiser evaluations from each state, guide named <guide>@L)")
    parser.add_argument("--clip", default=None, help="transformers CLIP folder of the clip guide (default: micro-CLIP)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    for name in ("prompts", "k", "steps", "every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    names = args.guides.split(",")
    if unknown := [g for g in names if g not in GUIDES] or len(set(names)) < len(names):
        parser.error(f"--guides must name distinct rewards among {GUIDES}, got {args.guides!r} ({unknown})")
    if args.quick:
        args.prompts, args.steps, args.k = 2, 4, 2
    try:
        pipe, call = load(None if args.quick else args.image_model, "sd", args.device, args.eta)
    except ValueError as error:
        parser.error(f"--eta: {error}")
    prompts = eval_prompts("relation", args.prompts, seed=args.seed, split=args.split)
    verifier = ShapeWorldReward()
    guides: dict[str, Reward] = {}
    for name in names:
        if name == "shapeworld":
            guides[name] = verifier
        elif name == "layout":
            guides[name] = ShapeWorldReward(shapes=False)
        else:
            if args.clip is None:
                from diffaccel.micro_models import micro_model_path

                args.clip = tiny_clip_folder() if args.quick else str(micro_model_path("micro-clip"))
            guides[name] = CLIPScoreReward.from_transformers(args.clip, device=args.device)
    try:
        lookaheads = [int(v) for v in args.lookahead.split(",")]
    except ValueError:
        parser.error(f"--lookahead must be comma-separated integers, got {args.lookahead!r}")
    if any(v < 0 for v in lookaheads):
        parser.error("--lookahead values must be >= 0")
    by_guide: dict[str, dict[int, torch.Tensor]] = {}
    finals = None
    for lookahead in lookaheads:
        scores, run_finals = trajectories(pipe, call, prompts, args.k, args.steps, args.every, guides, verifier,
                                          args.seed, lookahead)
        if finals is not None and not torch.equal(finals, run_finals):
            raise RuntimeError("the look-ahead rollouts changed the trajectories; they must be side trips")
        finals = run_finals
        by_guide.update({name if not lookahead else f"{name}@{lookahead}": steps for name, steps in scores.items()})
    passed = finals >= 1.0
    top_final = finals.argmax(1, keepdim=True)
    report = {
        "args": vars(args), "note": "quick: tiny RANDOM pipeline, numbers meaningless" if args.quick else "",
        "device": args.device, "prompts": prompts, "pass_rate": float(passed.float().mean()),
        "best_of_k": float(passed.gather(1, top_final).float().mean()),
        "guides": {name: guide_rows(steps, passed) for name, steps in by_guide.items()},
    }
    print(f"pass rate {report['pass_rate']:.3f}, best-of-{args.k} {report['best_of_k']:.3f}")
    for name, rows in report["guides"].items():
        print(f"guide {name}:")
        for step, row in rows.items():
            print(f"  step {int(step):3d}: auc {row['auc']:.3f} ({row['pairs']} pairs)  top particle passes "
                  f"{row['top_pass']:.3f}  mean x0 reward {row['mean_reward']:.3f}")
    model = os.path.basename(args.image_model).replace("-", "_")
    tag = args.tag or ("quick" if args.quick else f"{model}_{args.split}_{args.device.split(':')[0]}")
    write_report(report, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                                      "results", "steering", f"fk_predictiveness_{tag}.json"))
    return report


if __name__ == "__main__":
    main()
