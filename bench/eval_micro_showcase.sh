#!/usr/bin/env bash
# The README's evaluation figures: `diffaccel eval` on the bundled micro-SD (held-out ShapeWorld single-object and relation
# prompts, 25 and 50 DDIM steps) and micro-video (held-out motion prompts, 20 steps), every variant and peer
# of bench/grids/ side by side. Needs the peers: pip install -e ".[eval]". One torch thread (a shared CPU).
# Rerunning resumes; the run folders go to out/eval/, the summaries and reports are copied to bench/results/eval/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PROMPTS=${PROMPTS:-shapeworld:single+relation:heldout:16}
VIDEO_PROMPTS=${VIDEO_PROMPTS:-shapeworld:motion:heldout:8}
SEEDS=${SEEDS:-0,1}
OUT=${OUT:-out/eval}
python -m diffaccel eval --model micro-sd --prompts "$PROMPTS" --seeds "$SEEDS" --steps 25 \
    --grid bench/grids/micro_sd.json --batch-size 8 --threads 1 --out "$OUT/micro-sd-25"
# 50 steps: half the prompts (the same CPU time)
python -m diffaccel eval --model micro-sd --prompts "${PROMPTS_50:-shapeworld:single+relation:heldout:8}" --seeds "$SEEDS" \
    --steps 50 --grid bench/grids/micro_sd.json --batch-size 8 --threads 1 --out "$OUT/micro-sd-50"
python -m diffaccel eval --model micro-video --prompts "$VIDEO_PROMPTS" --seeds "$SEEDS" --steps 20 \
    --grid bench/grids/micro_video.json --batch-size 4 --threads 1 --out "$OUT/micro-video-20"
for run in micro-sd-25 micro-sd-50 micro-video-20; do
    mkdir -p "bench/results/eval/$run"
    cp "$OUT/$run"/{summary.json,report.md,run.json} "$OUT/$run"/*.png "bench/results/eval/$run/"
done
