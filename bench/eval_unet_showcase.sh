#!/usr/bin/env bash
# Issue 19's figures: diffaccel's UNet presets and deep reuse against DeepCache (intervals 2 to 5) in the same
# `diffaccel eval` run on the bundled micro-SD (held-out ShapeWorld single-object and relation prompts, seeds 0
# to 3) at 25 and 50 DDIM steps and 20 DPM-Solver steps, the composition of "fast" with the delta cache,
# quantized weights and quantized attention, and the SD1.5-layout random-weight CPU speed table. Needs
# DeepCache: pip install -e ".[eval]". One torch thread, one run at a time (a shared CPU; about 35 minutes). Rerunning resumes; the run
# folders go to out/eval/, their summaries, reports and plots to bench/results/eval/unet-*/, and the paired
# differences against DeepCache interval 3 to paired.json beside them. Arguments pick steps by name (default: all,
# in this order): ddim-25 dpm-20 ddim-50 composition-25 sd15-speed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PROMPTS=${PROMPTS:-shapeworld:single+relation:heldout:16}
SEEDS=${SEEDS:-0,1,2,3}
OUT=${OUT:-out/eval}
run() {  # run NAME ARGS...: one eval run, then its figures copied to bench/results/eval/NAME
    local name=$1; shift
    python -m diffaccel eval --model micro-sd --seeds "$SEEDS" --batch-size 8 --threads 1 --out "$OUT/$name" "$@"
    mkdir -p "bench/results/eval/$name"
    cp "$OUT/$name"/{summary.json,report.md,run.json} "$OUT/$name"/*.png "bench/results/eval/$name/"
    python bench/eval_paired.py "$OUT/$name" --against deepcache-3 --out "bench/results/eval/$name/paired.json"
}
STEPS_TO_RUN=${*:-ddim-25 dpm-20 ddim-50 composition-25 sd15-speed}
for step in $STEPS_TO_RUN; do
    case $step in
        ddim-25) run unet-ddim-25 --prompts "$PROMPTS" --steps 25 --grid bench/grids/micro_sd_unet.json ;;
        dpm-20) run unet-dpm-20 --prompts "$PROMPTS" --steps 20 --scheduler DPMSolverMultistepScheduler \
                    --grid bench/grids/micro_sd_unet.json ;;
        # 50 steps: half the prompts (about the same CPU time)
        ddim-50) run unet-ddim-50 --prompts "${PROMPTS_50:-shapeworld:single+relation:heldout:8}" --steps 50 \
                     --grid bench/grids/micro_sd_unet.json ;;
        composition-25) run unet-composition-25 --prompts "$PROMPTS" --steps 25 \
                            --grid bench/grids/micro_sd_unet_composition.json ;;
        sd15-speed) (cd bench && python encoder_reuse.py --width 64 --sample-size 32 --steps 50 --seeds 0 --rounds 3) ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
