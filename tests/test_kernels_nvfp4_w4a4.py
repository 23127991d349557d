"""The native NVFP4 GEMM (W4A4, ``tl.dot_scaled``): Triton against the plain-torch reference.

On CPU the kernel runs through Triton's interpreter (with E4M3 scale decoding, see
``diffaccel.kernels._triton.interpreted_e4m3_scales``); on a GPU with FP4 tensor cores it also
runs compiled. That it compiles onto the block-scaled FP4 MMA is checked in test_kernels_compile.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import diffaccel.kernels.nvfp4_w4a4_gemm as w4a4
from diffaccel.kernels.nvfp4 import nvfp4_dequantize, nvfp4_quantize
from diffaccel.kernels.nvfp4_w4a4_gemm import native_fp4_supported, nvfp4_w4a4_linear

NO_FP4_GPU = pytest.mark.skipif(not native_fp4_supported(), reason="no GPU with FP4 tensor cores")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=NO_FP4_GPU)])
def device(request, monkeypatch):
    """CPU: Triton's interpreter (read at launch by diffaccel.kernels); CUDA: compiled kernels."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "m,k,n,dtype",
    [(1, 64, 16, torch.float32), (19, 40, 48, torch.float32), (33, 160, 24, torch.bfloat16),
     (7, 96, 40, torch.float16)],
)
def test_w4a4_gemm_matches_reference(m, k, n, dtype, device):
    x = _gaussian(m, k, seed=1).to(device, dtype)
    w = nvfp4_quantize(_gaussian(n, k, seed=2).to(device))
    bias = _gaussian(n, seed=3).to(device, dtype)
    got = nvfp4_w4a4_linear(x, w, bias, impl="triton")
    want = nvfp4_w4a4_linear(x, w, bias, impl="reference")
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_w4a4_reference_is_the_product_of_both_quantized_operands():
    x, w = _gaussian(6, 48, seed=4), _gaussian(20, 48, seed=5)
    qw = nvfp4_quantize(w)
    want = nvfp4_dequantize(nvfp4_quantize(x)) @ nvfp4_dequantize(qw).T
    torch.testing.assert_close(nvfp4_w4a4_linear(x, qw, impl="reference"), want, rtol=1e-6, atol=1e-5)
    exact = x @ w.T
    error = (nvfp4_w4a4_linear(x, qw, impl="reference") - exact).norm() / exact.norm()
    assert 0.02 < error < 0.2  # both operands lose precision, more than W4A16's weight-only error


def test_w4a4_batched_non_contiguous_input(device):
    x = _gaussian(2, 48, 9, seed=6).transpose(1, 2).to(device)  # (2, 9, 48), strided
    w = nvfp4_quantize(_gaussian(32, 48, seed=7).to(device))
    got = nvfp4_w4a4_linear(x, w, impl="triton")
    assert got.shape == (2, 9, 32)
    torch.testing.assert_close(got, nvfp4_w4a4_linear(x.contiguous(), w, impl="reference"),
                               rtol=1e-5, atol=1e-5)


def test_w4a4_zero_input_gives_zeros_and_nan_input_gives_nan(device):
    w = nvfp4_quantize(_gaussian(16, 32, seed=8).to(device))
    zeros = nvfp4_w4a4_linear(torch.zeros(3, 32, device=device), w, impl="triton")
    assert torch.equal(zeros, torch.zeros_like(zeros))
    x = _gaussian(3, 32, seed=9).to(device)
    x[1, 5] = float("nan")  # the shared activation tensor scale becomes NaN: every output is NaN
    for impl in ("triton", "reference"):
        assert torch.isnan(nvfp4_w4a4_linear(x, w, impl=impl)).all()


def test_reference_on_cpu_tensors_never_reads_a_gpu_capability(monkeypatch):
    """On a CUDA machine, CPU tensors go to the reference without asking a CPU device for its
    compute capability (which torch refuses)."""
    def refuse(device=None):
        raise ValueError("Expected a cuda device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", refuse)
    x, w = _gaussian(2, 32, seed=13), nvfp4_quantize(_gaussian(16, 32, seed=14))
    for impl in ("auto", "reference"):
        assert nvfp4_w4a4_linear(x, w, impl=impl).shape == (2, 16)


def test_interpreter_needs_the_e4m3_scale_decoding(monkeypatch):
    """Without the scoped E4M3 decoding the interpreter reads the scales as E8M0: the test above
    would then fail, so it does test the kernel's scales."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(w4a4, "interpreted_e4m3_scales", contextlib.nullcontext)
    x, w = _gaussian(4, 64, seed=10), nvfp4_quantize(_gaussian(16, 64, seed=11))
    wrong = nvfp4_w4a4_linear(x, w, impl="triton")
    assert not torch.allclose(wrong, nvfp4_w4a4_linear(x, w, impl="reference"), rtol=1e-2, atol=1e-2)


def test_w4a4_bad_input_and_capability_are_clear():
    w = nvfp4_quantize(_gaussian(16, 32, seed=12))
    with pytest.raises(ValueError, match="in_features"):
        nvfp4_w4a4_linear(torch.zeros(2, 48), w)
    with pytest.raises(ValueError, match="bias"):
        nvfp4_w4a4_linear(torch.zeros(2, 32), w, torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        nvfp4_w4a4_linear(torch.zeros(2, 32, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="2-D NVFP4Tensor"):
        nvfp4_w4a4_linear(torch.zeros(2, 32), torch.zeros(16, 32))
    if not torch.cuda.is_available():
        assert not native_fp4_supported()
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            nvfp4_w4a4_linear(torch.zeros(2, 32), w, impl="triton")
    elif not native_fp4_supported():  # e.g. Hopper: no FP4 tensor cores, "auto" is the reference
        x, wc = torch.randn(2, 32, device="cuda"), nvfp4_quantize(_gaussian(16, 32, seed=12).cuda())
        with pytest.raises(ValueError, match="FP4 tensor cores"):
            nvfp4_w4a4_linear(x, wc, impl="triton")
        torch.testing.assert_close(nvfp4_w4a4_linear(x, wc), nvfp4_w4a4_linear(x, wc, impl="reference"))
    assert nvfp4_w4a4_linear(torch.zeros(0, 32), w).shape == (0, 16)
