#!/bin/bash
# Every GPU check of the kernels and DiT features in one call of a lent GPU machine (the project's
# device tool): the kernel tests compiled on the GPU (against their plain-torch references), then
# bench/kernel_speed.py (the full shape list), bench/dit_gpu.py (a short Wan 1.3B-shaped run: the delta cache,
# the DiT presets and diffusers' FirstBlockCache side by side, the quantized formats) and
# bench/encoder_reuse.py (SD1.5's full UNet, fp16, 512x512, random weights: deep reuse and the
# presets against DeepCache 2-5, then the presets inside the UNet compiled in place with torch.compile;
# unmeasured until a GPU is lent).
# Each step has a time limit, so the call fits a 15-minute device budget; JSON results and logs
# land in $OUT (commit kernels.json under bench/results/kernels/, dit.json under bench/results/dit_gpu/ and
# unet.json and unet_compiled.json under bench/results/encoder_reuse/ afterwards).
# Prepare here (the machine has torch/triton/transformers, not diffusers): `echo /.whl/ >> .git/info/exclude`,
# then download diffusers==0.42.1, importlib_metadata and DeepCache==0.1.1 into .whl/ as the device README
# shows. Carry: .whl.
# Usage there: bash bench/gpu_session.sh      (about 9 minutes with the defaults; the step limits sum to 800 s;
#   the compiled step is last: it compiles a graph per region between the features' decisions, and a time-out
#   there loses only its own JSON)
# Check it here on CPU in a minute: DEVICE=cpu OUT=/tmp/gpu-session bash bench/gpu_session.sh
#   (PY=/path/to/venv/bin/python picks another Python; train/device_env.sh installs diffaccel into it)
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=${DEVICE:-cuda} OUT=${OUT:-out/gpu-session}
TESTS_S=${TESTS_S:-120} KERNELS_S=${KERNELS_S:-170} DIT_S=${DIT_S:-240} UNET_S=${UNET_S:-150} UNET_COMPILE_S=${UNET_COMPILE_S:-120}
DIT_FRAMES=${DIT_FRAMES:-17} DIT_STEPS=${DIT_STEPS:-10}
mkdir -p "$OUT"
source train/device_env.sh  # $PY, the carried wheels, PYTHONPATH, diffaccel installed from this tree
$PY -c "import diffusers, torch, triton, diffaccel.kernels; print('diffusers', diffusers.__version__, 'torch', torch.__version__,
'triton', triton.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
'diffaccel.kernels', diffaccel.kernels.__file__)" | tee "$OUT/versions.txt" || exit 1
QUICK=""
[ "$DEVICE" = cpu ] && QUICK=--quick

echo "== kernel tests (compiled on the GPU; CPU: interpreter) ==" | tee "$OUT/tests.log"
timeout -s TERM "$TESTS_S" $PY -m pytest -q -p no:cacheprovider tests/test_kernels_int8.py \
  tests/test_kernels_nvfp4.py tests/test_kernels_nvfp4_w4a4.py tests/test_kernels_w8a16.py \
  tests/test_kernels_attention.py 2>&1 \
  | tail -25 | tee -a "$OUT/tests.log"

echo "== bench/kernel_speed.py ==" | tee "$OUT/kernels.log"
timeout -s TERM "$KERNELS_S" $PY bench/kernel_speed.py $QUICK --out "$OUT/kernels.json" 2>&1 | tee -a "$OUT/kernels.log"

echo "== bench/dit_gpu.py ==" | tee "$OUT/dit.log"
DIT_ARGS=(--frames "$DIT_FRAMES" --steps "$DIT_STEPS")
[ "$DEVICE" = cpu ] && DIT_ARGS=(--quick)
timeout -s TERM "$DIT_S" $PY bench/dit_gpu.py "${DIT_ARGS[@]}" --out "$OUT/dit.json" 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\|s/it" | tee -a "$OUT/dit.log"
echo "== bench/encoder_reuse.py (SD1.5 UNet vs DeepCache) ==" | tee "$OUT/unet.log"
UNET_ARGS=(--device cuda --steps 50 --seeds 0 --rounds 3)
[ "$DEVICE" = cpu ] && UNET_ARGS=(--quick)
timeout -s TERM "$UNET_S" $PY bench/encoder_reuse.py "${UNET_ARGS[@]}" --out "$OUT/unet.json" 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\|s/it" | tee -a "$OUT/unet.log"
echo "== bench/encoder_reuse.py --compile (the presets inside a torch.compile'd SD1.5 UNet) ==" | tee "$OUT/unet_compiled.log"
COMPILE_ARGS=(--device cuda --steps 25 --seeds 0 --rounds 2)
[ "$DEVICE" = cpu ] && COMPILE_ARGS=(--quick)
timeout -s TERM "$UNET_COMPILE_S" $PY bench/encoder_reuse.py "${COMPILE_ARGS[@]}" --compile \
  --out "$OUT/unet_compiled.json" 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it" | tee -a "$OUT/unet_compiled.log"
ls -la "$OUT"
