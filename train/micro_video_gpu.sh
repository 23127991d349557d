#!/bin/bash
# micro-video on a lent GPU machine (the project's device tool) in one call: VAE on stills, VAE on
# clips, DiT, export, held-out evaluation; the exported WanPipeline folder (a few MB) and the logs
# come back under $OUT/micro-video. Each stage has a step target and a time limit; a stage that
# hits its limit stops with a checkpoint (SIGTERM) and is exported from there.
# Prepare here (the machine has torch/transformers, not diffusers): `echo /.whl/ >> .git/info/exclude`,
# then download diffusers==0.42.1, importlib_metadata and open_clip_torch (the held-out evaluation's CLIP
# tokenizer reads its BPE file) into .whl/ as the device README shows. train/device_env.sh installs them
# and this tree's diffaccel.
# Carry: .whl. Usage there: bash train/micro_video_gpu.sh   (about 9 minutes with the defaults)
# VAE_FROM=assets/models/micro-video/vae (the bundled model's VAE) skips both VAE stages and trains the DiT on that VAE.
# Check it here on CPU in a minute: DEVICE=cpu CONFIG=tiny STILL_STEPS=2 CLIP_STEPS=4 DIT_STEPS=2 \
#   CACHE=8 EVAL_PROMPTS=2 OUT=/tmp/mv bash train/micro_video_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=${DEVICE:-cuda} CONFIG=${CONFIG:-micro} OUT=${OUT:-runs/micro-video-gpu}
STILL_STEPS=${STILL_STEPS:-3000} CLIP_STEPS=${CLIP_STEPS:-3600} DIT_STEPS=${DIT_STEPS:-6000}
STILL_S=${STILL_S:-120} CLIP_S=${CLIP_S:-90} DIT_S=${DIT_S:-240}
CACHE=${CACHE:-20000} EVAL_PROMPTS=${EVAL_PROMPTS:-64}
mkdir -p "$OUT"
source train/device_env.sh  # $PY, the carried wheels, PYTHONPATH, diffaccel installed from this tree
$PY -c "import diffusers, torch, diffaccel.pipelines; print('diffusers', diffusers.__version__, 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), 'diffaccel.pipelines', diffaccel.pipelines.__file__)" || exit 1

checkpoint_step() {  # the step of the checkpoint in run dir $1
  $PY -c "import sys; sys.path.insert(0, 'train'); import trainkit; print(trainkit.Checkpoint('$1').info()['step'])"
}
stage() {  # stage LIMIT_S RUN_DIR TARGET_STEPS EXPORT_DIR ARGS...: train under a time limit, export what it reached
  local limit=$1 run_dir=$2 target=$3 export_dir=$4; shift 4
  local common=(--config "$CONFIG" --device "$DEVICE" --threads 8 --save-every 1000 --run-dir "$run_dir" --resume)
  timeout -s TERM "$limit" $PY train/micro_video.py "$@" "${common[@]}" --steps "$target" 2>&1 \
    | tr '\r' '\n' | awk '!/it\/s|s\/it/ || NR % 50 == 1' | tee -a "$OUT/train.log"
  local reached; reached=$(checkpoint_step "$run_dir") || return 1
  echo "$run_dir: step $reached of $target" | tee -a "$OUT/train.log"
  if [ -n "$export_dir" ]; then
    $PY train/micro_video.py "$@" "${common[@]}" --steps "$reached" --export "$export_dir" 2>&1 | tail -3 | tee -a "$OUT/train.log"
  fi
}
VAE_RUN=runs/micro-video-vae DIT_RUN=runs/micro-video
if [ -n "$VAE_FROM" ]; then
  mkdir -p $VAE_RUN && cp -r "$VAE_FROM" $VAE_RUN/vae
else  # the decoder draws only after ~1-2k still steps (CPU, batch 8: 19 dB at 400, 31 dB at 2200)
  stage "$STILL_S" $VAE_RUN "$STILL_STEPS" "" --stage vae --vae-frames 1 --batch-size 16 --lr 1e-3 --cache "$CACHE" || exit 1
  stage "$CLIP_S" $VAE_RUN "$CLIP_STEPS" $VAE_RUN/vae --stage vae --batch-size 16 --lr 1e-3 --cache "$CACHE" || exit 1
fi
stage "$DIT_S" $DIT_RUN "$DIT_STEPS" "$OUT/micro-video" --stage dit --vae $VAE_RUN/vae --batch-size 128 --lr 6e-4 \
  --cache "$CACHE" || exit 1
cp $VAE_RUN/vae/scores.json "$OUT/vae_scores.json" 2>/dev/null
$PY bench/eval_micro.py --skip-clip --skip-sd --video "$OUT/micro-video" --video-prompts "$EVAL_PROMPTS" --steps 25 \
  --device "$DEVICE" --out "$OUT/eval_micro_video.json" 2>&1 | tail -3 | tee -a "$OUT/train.log"
ls -la "$OUT" "$OUT/micro-video"
