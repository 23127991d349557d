"""Calibrated *static* skip schedules on micro-DiT: the negative result behind docs/delta-cache.md.

MagCache-style: on training prompts, record each transformer block's residual ``r_b(s)`` at every step
of the untouched run; the cost of reusing the residual of step ``i`` at step ``s`` is
``||r_b(s) - r_b(i)||^2 / ||h_b(s)||^2`` (``h_b`` the block's output), averaged over prompts. A dynamic
program then picks, per block, the steps to compute that minimise the summed cost for a given number
of computed steps, and a second one spreads a total budget over the blocks (``--mode block``); with
``--mode span`` block 0 always runs and blocks 1.. are computed or skipped as one span (DBCache's F1B0
split, decided once per model instead of per sample). The schedule is then applied to held-out prompts
and PSNR measured against the untouched images. No timing: the cost is the fraction of block
evaluations computed (speedup on micro-DiT's CPU profile is about ``1 / (0.06 + 0.94 f)``).

    python bench/static_skip_schedule.py --mode block --fractions 0.3 0.4 0.5
    python bench/static_skip_schedule.py --mode span --fractions 0.35 0.41 0.48

Writes ``bench/results/delta_cache/static_schedule_<mode>_micro_dit_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


def segment_costs(cost: np.ndarray) -> np.ndarray:
    """``seg[i, j]``: computed at step ``i``, its residual reused at steps ``i+1 .. j-1``."""
    n = cost.shape[0]
    seg = np.zeros((n, n + 1))
    for i in range(n):
        total = 0.0
        for j in range(i + 1, n + 1):
            seg[i, j] = total
            if j < n:
                total += cost[i, j]
    return seg


def best_steps(cost: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """For k = 0..n computed steps (step 0 always), the least summed cost and its steps."""
    n = cost.shape[0]
    seg = segment_costs(cost)
    best = np.full((n + 1, n + 1), np.inf)
    back = np.zeros((n + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, n + 1):
        for j in range(1, n + 1):
            candidates = best[k - 1, :j] + seg[:j, j]
            back[k, j] = int(np.argmin(candidates))
            best[k, j] = candidates[back[k, j]]
    schedules = []
    for k in range(n + 1):
        steps, j = [], n
        for kk in range(k, 0, -1):
            j = back[kk, j]
            steps.append(j)
        schedules.append(sorted(steps))
    return best[:, n], schedules


def spread(costs: list[np.ndarray], total: int) -> list[int]:
    """Computed steps per block summing to ``total`` with the least summed cost (each block >= 1)."""
    blocks, n = len(costs), len(costs[0]) - 1
    best = np.full((blocks + 1, total + 1), np.inf)
    pick = np.zeros((blocks + 1, total + 1), dtype=int)
    best[0, 0] = 0.0
    for b in range(blocks):
        for t in range(total + 1):
            for k in range(1, min(n, t) + 1):
                value = best[b, t - k] + costs[b][k]
                if value < best[b + 1, t]:
                    best[b + 1, t], pick[b + 1, t] = value, k
    counts, t = [], total
    for b in range(blocks, 0, -1):
        counts.append(int(pick[b, t]))
        t -= counts[-1]
    return counts[::-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("block", "span"), default="block")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffaccel.evaluation.prompts import load_prompts
    from diffaccel.micro_models import load_micro_dit

    pipe = load_micro_dit()
    pipe.set_progress_bar_config(disable=True)
    blocks = list(pipe.transformer.transformer_blocks)
    steps = 28
    units = len(blocks) if args.mode == "block" else 1  # what a schedule decides for
    span = range(1, len(blocks)) if args.mode == "span" else None
    state: dict = {"step": -1, "record": None, "schedule": None, "cache": {}, "computed": 0, "skipped": 0}

    original_forward = pipe.transformer.forward

    def counting_forward(*a, **k):
        state["step"] += 1
        return original_forward(*a, **k)

    pipe.transformer.forward = counting_forward

    def wrap(block: torch.nn.Module, index: int) -> None:
        forward = block.forward
        unit = index if span is None else 0
        first = span is None or index == span.start
        last = span is None or index == span.stop - 1
        decided = span is None or index in span

        def hooked(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
            step, schedule = state["step"], state["schedule"]
            if schedule is not None and decided and step not in schedule[unit]:
                state["skipped"] += 1
                if not first:
                    return encoder_hidden_states, hidden_states
                residual, encoder_residual = state["cache"][unit]
                encoder = encoder_hidden_states if encoder_residual is None else encoder_hidden_states + encoder_residual
                return encoder, hidden_states + residual
            if first:
                state["entry"] = (hidden_states, encoder_hidden_states)
            encoder, hidden = forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
            state["computed"] += 1
            if decided and last:
                entry_hidden, entry_encoder = state["entry"]
                residual = hidden - entry_hidden
                encoder_residual = None if encoder is None or span is not None else encoder - entry_encoder
                state["cache"][unit] = (residual, encoder_residual)
                if state["record"] is not None:
                    terms = [(residual, hidden)] + ([(encoder_residual, encoder)] if encoder_residual is not None else [])
                    state["record"][unit].append([(r.flatten().double(), h.double().pow(2).sum()) for r, h in terms])
            return encoder, hidden

        block.forward = hooked

    for index, block in enumerate(blocks):
        wrap(block, index)

    def run(prompt: str) -> np.ndarray:
        state["step"], state["cache"] = -1, {}
        with torch.no_grad():
            return pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    train = [r.prompt for r in load_prompts("shapeworld:single+relation:train:8")]
    heldout = [r.prompt for r in load_prompts("shapeworld:single+relation:heldout:8")]
    cost = np.zeros((units, steps, steps))
    for prompt in train:
        state["record"] = [[] for _ in range(units)]
        run(prompt)
        for unit, record in enumerate(state["record"]):
            for term in range(len(record[0])):
                residuals = torch.stack([r[term][0] for r in record])
                norms = torch.stack([r[term][1] for r in record])
                cost[unit] += (torch.cdist(residuals, residuals).pow(2) / norms[None, :]).numpy() / len(train)
    state["record"] = None
    per_unit = [best_steps(cost[u]) for u in range(units)]
    references = [run(p) for p in heldout]
    results = []
    decided_blocks = len(blocks) if span is None else len(span)
    for fraction in args.fractions:
        if span is None:
            counts = spread([c for c, _ in per_unit], int(round(fraction * units * steps)))
        else:  # fraction of all block evaluations: block 0 always runs
            counts = [max(1, int(round((fraction * len(blocks) - 1) / decided_blocks * steps)))]
        state["schedule"] = [set(per_unit[u][1][k]) for u, k in enumerate(counts)]
        state["computed"] = state["skipped"] = 0
        psnrs = []
        for prompt, reference in zip(heldout, references):
            mse = float(((run(prompt) - reference) ** 2).mean())
            psnrs.append(10 * math.log10(1 / mse) if mse > 0 else math.inf)
        state["schedule"] = None
        computed = state["computed"] / (state["computed"] + state["skipped"])
        row = {"fraction_asked": fraction, "computed_fraction": computed, "psnr": float(np.mean(psnrs)),
               "steps_per_unit": counts}
        results.append(row)
        print(f"{args.mode}: {computed:.3f} of block evaluations computed, PSNR {row['psnr']:.2f} dB")
    out = args.out or REPO / "bench" / "results" / "delta_cache" / f"static_schedule_{args.mode}_micro_dit_cpu.json"
    out.write_text(json.dumps({"mode": args.mode, "model": "micro-dit", "steps": steps, "calibration": train,
                               "evaluated": heldout, "threads": args.threads, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
