#!/bin/bash
# One session of micro-SD training on a lent GPU machine (the project's device tool), as used for
# the bundled micro-SD: install the carried wheels and diffaccel (train/device_env.sh), train for TRAIN_S seconds from the rendered
# cache, and hand the checkpoint back in 15 MB parts ($OUT/ckpt.part-*; `cat` them into
# runs/micro-sd/last.safetensors here, then `python train/micro_sd.py --steps STEP --resume
# --export DIR` exports it on any machine).
# Carry: runs/whl (diffusers 0.42.1, importlib_metadata, open_clip_torch wheels: the machine has
# torch/transformers but not these), runs/micro-vae/vae, this script, and optionally
# runs/sd-compact/last.safetensors (weights + EMA of an earlier run, optimizer tensors dropped,
# to fit the 64 MiB transfer) to continue from.
# Usage there: TRAIN_S=430 bash train/micro_sd_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TRAIN_S=${TRAIN_S:-400}
WHEELS=runs/whl source train/device_env.sh  # $PY, the carried wheels, PYTHONPATH, diffaccel installed from this tree
nvidia-smi -L
$PY -c "import diffusers, transformers, torch, diffaccel.kernels; from diffusers import UNet2DConditionModel, StableDiffusionPipeline; print(diffusers.__version__, transformers.__version__, torch.__version__, diffaccel.kernels.__file__)" || exit 1
RESUME=""
if [ -f runs/sd-compact/last.safetensors ]; then  # weights + EMA of an earlier run (no optimizer state)
  mkdir -p runs/micro-sd && cp runs/sd-compact/last.safetensors runs/micro-sd/ && RESUME=--resume
fi
timeout -s TERM $TRAIN_S $PY train/micro_sd.py --device cuda --steps 100000 --batch-size 256 --lr 4e-4 \
  --cache 200000 --threads 8 --save-every 100 $RESUME 2>&1 | tr '\r' '\n' | awk '!/it\/s|s\/it/ || NR % 40 == 1' | tee $OUT/train.log
S=$($PY -c "import sys; sys.path.insert(0, 'train'); import trainkit; print(trainkit.Checkpoint('runs/micro-sd').info()['step'])")
echo "checkpoint step $S"
(cd runs/micro-sd && split -b 15M last.safetensors $OUT/ckpt.part-)
ls -la $OUT
