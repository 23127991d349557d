# Sourced by the device-machine scripts (train/micro_video_gpu.sh, bench/gpu_session.sh): picks the
# Python ($PY: the repo's .venv for DEVICE=cpu checks here, python3 there) and installs the carried
# wheels in .whl/ (diffusers and what it needs: the machine's image has torch/transformers only),
# putting them and the repo on PYTHONPATH. Exits the calling script if the install fails.
PY=python3
if [ -x .venv/bin/python ] && [ "$DEVICE" = cpu ]; then PY=.venv/bin/python; fi
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  echo 'import sys; sys.modules["peft"] = None' > /tmp/site/sitecustomize.py  # the image's peft breaks diffusers' import
  export PYTHONPATH=/tmp/site:$PWD
fi
