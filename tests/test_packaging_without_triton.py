"""diffaccel imports and runs its plain-torch kernels where triton is not installed (macOS, Windows).

pyproject installs triton on Linux only. The check runs in a subprocess whose ``import triton``
raises ``ImportError`` (``sys.modules["triton"] = None``), with ``TRITON_INTERPRET=1`` set so that
``impl="auto"`` must still choose the reference rather than an interpreter it does not have.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed
import torch
import diffaccel
from diffaccel.kernels import (
    int8_linear, int8_quantize_per_channel, int8_quantize_per_token, nvfp4_dequantize, nvfp4_quantize,
    nvfp4_linear, quantized_sdpa,
)
from diffaccel.kernels._triton import TRITON_AVAILABLE

g = torch.Generator().manual_seed(0)
w = torch.tensor([[0.0, 0.5, -1.0, 1.5, 2.0, -3.0, 4.0, 6.0] * 2])
q8, s8 = int8_quantize_per_token(torch.tensor([[1.0, 300.0]]), act_scale=0.5)
wl, x = torch.randn(32, 64, generator=g), torch.randn(4, 64, generator=g)
y8 = int8_linear(x, *int8_quantize_per_channel(wl))
y4 = nvfp4_linear(x, nvfp4_quantize(wl))
q, k, v = (torch.randn(1, 2, 100, 64, generator=g) for _ in range(3))
out = quantized_sdpa(q, k, v)
exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
errors = {}
for name, call in {
    "nvfp4_quantize": lambda: nvfp4_quantize(w, impl="triton"),
    "int8_linear": lambda: int8_linear(x, *int8_quantize_per_channel(wl), impl="triton"),
    "quantized_sdpa": lambda: quantized_sdpa(q, k, v, impl="triton"),
}.items():
    try:
        call()
        errors[name] = None
    except Exception as error:
        errors[name] = [type(error).__name__, str(error)]
print(json.dumps({
    "triton_available": TRITON_AVAILABLE,
    "triton_in_modules": sys.modules.get("triton") is not None,
    "nvfp4_roundtrip": torch.equal(nvfp4_dequantize(nvfp4_quantize(w)), w),
    "int8_per_token": [q8.tolist(), s8.tolist()],
    "int8_linear_rel_err": float((y8 - x @ wl.T).norm() / (x @ wl.T).norm()),
    "nvfp4_linear_rel_err": float((y4 - x @ wl.T).norm() / (x @ wl.T).norm()),
    "sdpa_cos": float(torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0)),
    "triton_errors": errors,
}))
"""


def _run_without_triton() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"diffaccel failed without triton:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reference_kernels_run_and_triton_impl_is_refused_without_triton():
    result = _run_without_triton()
    assert result["triton_available"] is False
    assert result["triton_in_modules"] is False
    assert result["nvfp4_roundtrip"] is True
    assert result["int8_per_token"] == [[[2, 127]], [0.5]]
    assert result["int8_linear_rel_err"] < 0.02
    assert result["nvfp4_linear_rel_err"] < 0.15
    assert result["sdpa_cos"] > 0.999
    for name, error in result["triton_errors"].items():
        assert error is not None, f"{name}(impl='triton') ran without triton"
        kind, message = error
        assert kind == "ImportError", (name, error)
        assert "triton package, which is not installed" in message, (name, message)
        assert "\n" not in message
