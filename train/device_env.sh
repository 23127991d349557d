# Sourced by the device-machine scripts (train/micro_video_gpu.sh, train/micro_sd_gpu.sh,
# bench/gpu_session.sh), from the repository root. Exits the calling script if a step fails.
# 1. $PY: kept when already set (e.g. PY=/tmp/venv/bin/python); else the repo's .venv for DEVICE=cpu
#    checks here and python3 there.
# 2. The carried wheels in $WHEELS (default .whl: diffusers and what it needs; the machine's image has
#    torch/transformers only) go to $SITE (default /tmp/site), put with the repo on PYTHONPATH.
# 3. This tree's diffaccel is installed editable, with no dependencies and nothing downloaded, unless
#    $PY already has it so: kernels/ and pipelines/ reach the diffaccel namespace only through an
#    installed package ([tool.setuptools.package-dir]), so a bare tree on PYTHONPATH cannot import them.
if [ -z "$PY" ]; then
  PY=python3
  if [ -x .venv/bin/python ] && [ "$DEVICE" = cpu ]; then PY=$PWD/.venv/bin/python; fi
fi
export PYTHONPATH=$PWD
WHEELS=${WHEELS:-.whl} SITE=${SITE:-/tmp/site}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
  echo 'import sys; sys.modules["peft"] = None' > "$SITE/sitecustomize.py"  # the image's peft breaks diffusers' import
  export PYTHONPATH=$SITE:$PWD
fi

diffaccel_installed_here() {  # whether $PY has diffaccel installed editable from this directory
  $PY - <<'EOF'
import importlib.metadata, json, pathlib, sys
urls = [json.loads(d.read_text("direct_url.json") or "{}") for d in importlib.metadata.distributions(name="diffaccel")]
here = pathlib.Path.cwd().as_uri()  # a source tree's diffaccel.egg-info has no direct_url.json: no install
sys.exit(not any(u.get("url") == here and u.get("dir_info", {}).get("editable") for u in urls))
EOF
}
if ! diffaccel_installed_here; then
  # offline where the build backend is already there (the GPU machine has setuptools and no network)
  DIFFACCEL_BUILD=()
  $PY -c "import setuptools" 2>/dev/null && DIFFACCEL_BUILD=(--no-index --no-build-isolation)
  echo "installing diffaccel from $PWD into $PY (editable, --no-deps${DIFFACCEL_BUILD[*]:+ ${DIFFACCEL_BUILD[*]}})"
  $PY -m pip install -q --no-deps "${DIFFACCEL_BUILD[@]}" -e . || { echo "could not install diffaccel into $PY" >&2; exit 1; }
  diffaccel_installed_here || { echo "diffaccel was installed but $PY does not see it as editable from $PWD" >&2; exit 1; }
fi
