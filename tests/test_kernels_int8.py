"""INT8 per-token quantization and the W8A8 GEMM: Triton against the plain-torch reference.

On CPU the Triton kernels run through Triton's interpreter; with a GPU they also run compiled.
"""

from __future__ import annotations

import pytest
import torch

from diffaccel.kernels.int8_gemm import int8_linear
from diffaccel.kernels.int8_quant import int8_quantize_per_channel, int8_quantize_per_token

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
NAN_SCALES = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=NO_GPU)])
def device(request, monkeypatch):
    """CPU: Triton's interpreter (read at launch by diffaccel.kernels); CUDA: compiled kernels."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "m,k,dtype", [(1, 64, torch.float16), (9, 200, torch.bfloat16), (33, 48, torch.float32)]
)
def test_per_token_kernel_matches_reference_bit_for_bit(m, k, dtype, device):
    x = torch.randn(m, k, generator=_gen(m)) * torch.rand(m, 1, generator=_gen(k)) * 10
    x[0, :] = 0  # an all-zero token
    if m > 1:
        x[1, 5] = float("nan")
    x = x.to(device, dtype)
    qa, sa = int8_quantize_per_token(x, impl="triton")
    qb, sb = int8_quantize_per_token(x, impl="reference")
    assert torch.equal(qa, qb) and torch.allclose(sa, sb, rtol=0, atol=0, equal_nan=True)
    qa, sa = qa.cpu(), sa.cpu()
    assert torch.equal(qa[0], torch.zeros(k, dtype=torch.int8)) and sa[0] == 1.0
    if m > 1:  # a non-finite token: zero codes and a NaN scale, its neighbours untouched
        assert torch.equal(qa[1], torch.zeros(k, dtype=torch.int8)) and sa[1].isnan()
        assert sa[2:].isfinite().all() and qa.abs().max() == 127


def test_per_token_static_scale_saturates_and_strided_input(device):
    x = torch.randn(40, 12, generator=_gen(0)).t()  # (12, 40), non-contiguous
    x[3, 0] = 1e3
    want = torch.round(torch.clamp(x / 0.05, -127, 127)).to(torch.int8)
    for impl in ("triton", "reference"):
        q, s = int8_quantize_per_token(x.to(device), act_scale=0.05, impl=impl)
        assert torch.equal(s.cpu(), torch.full((12,), 0.05)) and torch.equal(q.cpu(), want)
        assert q[3, 0] == 127


def test_round_half_to_even(device):
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5]], device=device)
    for impl in ("triton", "reference"):
        q, s = int8_quantize_per_token(x, impl=impl)
        assert s.item() == 1.0 and q.tolist() == [[127, 0, 2, 2, 0, -2, 4]]


def test_per_channel_weights():
    w = torch.randn(24, 64, generator=_gen(1))
    w[5] = 0
    q, s = int8_quantize_per_channel(w)
    row_max = q.abs().amax(1)[torch.arange(24) != 5]
    assert torch.equal(row_max, torch.full((23,), 127, dtype=torch.int8))
    assert s[5] == 1.0 and torch.equal(q[5], torch.zeros(64, dtype=torch.int8))
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize(
    "m,k,n,dtype",
    [
        (1, 64, 48, torch.float16),
        (37, 80, 40, torch.bfloat16),
        (50, 128, 96, torch.float32),
        (17, 30, 20, torch.float16),
    ],
)
def test_w8a8_gemm_matches_reference_and_fp32(m, k, n, dtype, device):
    gen = _gen(m + k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen).to(device, dtype)
    qw, w_scale = int8_quantize_per_channel(w.to(device))
    got = int8_linear(x, qw, w_scale, bias, impl="triton")
    ref = int8_linear(x, qw, w_scale, bias, impl="reference")
    assert got.dtype == dtype and got.shape == (m, n)
    if device == "cpu" and dtype != torch.bfloat16:  # exact int32 products, same fp32 epilogue
        assert torch.equal(got, ref)
    else:  # the interpreter truncates to bfloat16; the GPU may fuse the epilogue's mul-add
        assert torch.allclose(got.float(), ref.float(), rtol=2**-7, atol=1e-6)
    exact = x.float() @ w.to(device).T
    rel = ((ref.float() - bias.float() - exact).norm() / exact.norm()).item()
    assert rel <= 1.5e-2  # one token is a noisy sample; the aggregate bound is tested below


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_w8a8_relative_error_on_gaussian_data(impl, device):
    gen = _gen(11)
    x, w = torch.randn(64, 128, generator=gen).to(device), torch.randn(48, 128, generator=gen)
    qw, w_scale = int8_quantize_per_channel(w.to(device))
    exact = x @ w.to(device).T
    rel = ((int8_linear(x, qw, w_scale, impl=impl) - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel <= 1e-2  # 8-bit noise on both operands, not the fp32 product itself


@NAN_SCALES
def test_w8a8_gemm_static_scale_batched_strided_and_nan_token(device):
    gen = _gen(7)
    qw, w_scale = int8_quantize_per_channel(torch.randn(32, 64, generator=gen).to(device))
    x = torch.randn(2, 64, 5, generator=gen).to(device, torch.float16).transpose(1, 2)  # strided
    x[0, 2, 9] = float("inf")
    for act_scale in (None, 0.03):
        got = int8_linear(x, qw, w_scale, act_scale=act_scale, impl="triton")
        ref = int8_linear(x.contiguous(), qw, w_scale, act_scale=act_scale, impl="reference")
        assert got.shape == (2, 5, 32) and torch.equal(got.isnan(), ref.isnan())
        assert got[0, 2].isnan().all() and got.isnan().any(-1).sum() == 1
        assert torch.allclose(got.nan_to_num(), ref.nan_to_num(), rtol=2**-10, atol=1e-6)


def test_no_tokens_gives_an_empty_output(device):
    qw, w_scale = int8_quantize_per_channel(torch.randn(8, 16, device=device))
    for impl in ("triton", "reference"):
        out = int8_linear(torch.randn(2, 0, 16, device=device), qw, w_scale, impl=impl)
        assert out.shape == (2, 0, 8)


def test_bad_input_is_refused():
    qw, w_scale = int8_quantize_per_channel(torch.randn(8, 16))
    with pytest.raises(ValueError, match="in_features"):
        int8_linear(torch.randn(2, 12), qw, w_scale)
    with pytest.raises(ValueError, match="w_scale"):
        int8_linear(torch.randn(2, 16), qw, w_scale[:4])
    with pytest.raises(ValueError, match="qw"):
        int8_linear(torch.randn(2, 16), qw.float(), w_scale)
    with pytest.raises(ValueError, match="x must have dtype"):
        int8_linear(torch.ones(2, 16, dtype=torch.int64), qw, w_scale)
    with pytest.raises(ValueError, match="act_scale"):
        int8_quantize_per_token(torch.randn(2, 16), act_scale=-1.0)
    with pytest.raises(ValueError, match="finite"):
        int8_quantize_per_channel(torch.tensor([[float("inf"), 1.0]]))
