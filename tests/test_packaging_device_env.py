"""The device-machine scripts install diffaccel from the tree they run in before importing it.

``kernels/`` and ``pipelines/`` reach the ``diffaccel`` namespace only through an installed package
(``[tool.setuptools.package-dir]``), so a bare tree on ``PYTHONPATH`` cannot import
``diffaccel.kernels``. train/device_env.sh, which every such script sources, must install the
tree (editable, no dependencies, nothing downloaded) after the carried wheels. These tests source
it in a temporary tree with a stand-in ``$PY`` that records its calls and emulates pip (offline,
in a second); the real install was checked end to end on a fresh venv (see the script's header).
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("bench/gpu_session.sh", "train/micro_video_gpu.sh", "train/micro_sd_gpu.sh")

# A stand-in for $PY: logs each call; `-m pip` is emulated (an editable install writes the
# dist-info pip would, into $FAKE_SITE); anything else runs on the real Python with $FAKE_SITE on
# its path. FAKE_NO_SETUPTOOLS hides setuptools, FAKE_PIP_FAIL makes the editable install fail.
FAKE_PY = """#!/bin/bash
printf '%s\\n' "$*" >> "$CALLS"
if [ "$1" = -c ] && [ "$2" = "import setuptools" ] && [ -n "$FAKE_NO_SETUPTOOLS" ]; then exit 1; fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
  case " $* " in
    *" -e . "*)
      [ -n "$FAKE_PIP_FAIL" ] && exit 1
      info="$FAKE_SITE/diffaccel-0.1.0.dist-info"; mkdir -p "$info"
      printf 'Metadata-Version: 2.1\\nName: diffaccel\\nVersion: 0.1.0\\n' > "$info/METADATA"
      uri=$("$REAL_PY" -c "import pathlib; print(pathlib.Path.cwd().as_uri())")
      printf '{"url": "%s", "dir_info": {"editable": true}}' "$uri" > "$info/direct_url.json" ;;
    *" --target "*) mkdir -p "$SITE" ;;
  esac
  exit 0
fi
PYTHONPATH="$FAKE_SITE${PYTHONPATH:+:$PYTHONPATH}" exec "$REAL_PY" "$@"
"""


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "train").mkdir(parents=True)
    shutil.copy(REPO / "train" / "device_env.sh", root / "train" / "device_env.sh")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    (tmp_path / "fake-site").mkdir()
    return root


def _source(root: pathlib.Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    tmp = root.parent
    calls = tmp / "calls.log"
    calls.unlink(missing_ok=True)
    full_env = {
        **os.environ, "PY": str(tmp / "python"), "REAL_PY": sys.executable, "CALLS": str(calls),
        "FAKE_SITE": str(tmp / "fake-site"), "SITE": str(tmp / "site"), **env,
    }
    script = 'source train/device_env.sh && echo "PY=$PY" && echo "PYTHONPATH=$PYTHONPATH"'
    proc = subprocess.run(["bash", "-c", script], cwd=root, env=full_env, capture_output=True, text=True, timeout=60)
    return proc, calls.read_text().splitlines() if calls.exists() else []


def _pip_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip install")]


def test_installs_the_tree_editable_offline_and_honours_py(tree):
    proc, calls = _source(tree)
    assert proc.returncode == 0, proc.stderr
    assert f"PY={tree.parent / 'python'}" in proc.stdout
    (install,) = _pip_installs(calls)
    args = install.split()
    assert args[-2:] == ["-e", "."]
    for flag in ("--no-deps", "--no-index", "--no-build-isolation"):
        assert flag in args, install


def test_installs_after_the_carried_wheels_and_keeps_them_on_the_path(tree):
    (tree / ".whl").mkdir()
    (tree / ".whl" / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    proc, calls = _source(tree)
    assert proc.returncode == 0, proc.stderr
    wheels, editable = _pip_installs(calls)
    assert "--target" in wheels.split() and ".whl/diffusers-0.42.1-py3-none-any.whl" in wheels
    assert editable.split()[-2:] == ["-e", "."]
    site = tree.parent / "site"
    assert f"PYTHONPATH={site}:{tree}" in proc.stdout
    assert 'sys.modules["peft"] = None' in (site / "sitecustomize.py").read_text()


def test_skips_the_install_when_already_installed_from_this_tree(tree):
    assert _source(tree)[0].returncode == 0
    proc, calls = _source(tree)
    assert proc.returncode == 0, proc.stderr
    assert _pip_installs(calls) == []


def test_builds_with_isolation_where_setuptools_is_missing(tree):
    proc, calls = _source(tree, FAKE_NO_SETUPTOOLS="1")
    assert proc.returncode == 0, proc.stderr
    (install,) = _pip_installs(calls)
    assert "--no-build-isolation" not in install.split() and "--no-deps" in install.split()


def test_a_failed_install_stops_the_calling_script(tree):
    proc, _ = _source(tree, FAKE_PIP_FAIL="1")
    assert proc.returncode == 1
    assert "could not install diffaccel" in proc.stderr
    assert "PY=" not in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_source_device_env_before_running_python(script):
    lines = (REPO / script).read_text().splitlines()
    code = [(i, line) for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    sourced = [i for i, line in code if re.search(r"\bsource train/device_env\.sh\b", line)]
    runs_python = [i for i, line in code if i not in sourced and re.search(r"\$PY\b|\bpython3?\b", line)]
    assert sourced, f"{script} does not source train/device_env.sh"
    assert runs_python and sourced[0] < runs_python[0], f"{script} runs Python before sourcing train/device_env.sh"
