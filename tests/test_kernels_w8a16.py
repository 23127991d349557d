"""INT8 per-group weight quantization and the W8A16 GEMM: Triton against the plain-torch reference.

On CPU the Triton kernels run through Triton's interpreter; with a GPU they also run compiled.
"""

from __future__ import annotations

import pytest
import torch

from diffaccel.kernels import int8_dequantize_per_group, int8_quantize_per_group, w8a16_linear
from diffaccel.kernels.int8_quant import int8_quantize_per_channel

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
# Same products in fp32, summed in another order; the interpreter truncates to bfloat16.
ULP = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=NO_GPU)])
def device(request, monkeypatch):
    """CPU: Triton's interpreter (read at launch by diffaccel.kernels); CUDA: compiled kernels."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_group_size_none_is_per_channel_bit_for_bit():
    w = torch.randn(24, 70, generator=_gen(0)) * 3
    w[4] = 0
    for dtype in (torch.float32, torch.bfloat16):
        got, want = int8_quantize_per_group(w.to(dtype)), int8_quantize_per_channel(w.to(dtype))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[1].shape == (24,) and got[1].dtype == torch.float32
    # one group covering the whole row: the same codes and scales, scale shape (N, 1)
    q, s = int8_quantize_per_group(w, group_size=70)
    assert torch.equal(q, int8_quantize_per_channel(w)[0]) and torch.equal(s[:, 0], int8_quantize_per_channel(w)[1])


@pytest.mark.parametrize(
    "k,group_size,size",
    [
        (64, 32, 32),
        (70, 32, 32),  # powers of two are kept for any K: 32 + 32 + 6
        (40, 16, 16),
        (36, 32, 32),
        (37, 8, 8),
        (60, 20, 20),  # divides K, no power of two makes 3 groups
        (10, 3, 3),
        (60, 30, 32),  # the shapes can't encode 30 + 30 (32 also makes 2 groups): 32 + 28
        (60, 27, 20),  # 3 groups: 20 + 20 + 20
    ],
)
def test_per_group_scales_codes_and_error_bound(k, group_size, size):
    w = torch.randn(12, k, generator=_gen(k)) * torch.rand(12, 1, generator=_gen(1)) * 5
    w[3, :size] = 0  # an all-zero group
    q, s = int8_quantize_per_group(w, group_size)
    groups = -(-k // group_size)
    assert q.dtype == torch.int8 and q.shape == (12, k) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (12, groups)
    bounds = [(g * size, min((g + 1) * size, k)) for g in range(groups)]
    assert bounds[-1][1] == k and all(lo < hi for lo, hi in bounds)  # the groups tile the row
    for g, (lo, hi) in enumerate(bounds):
        amax = w[:, lo:hi].abs().amax(1)
        assert torch.equal(s[:, g], torch.where(amax > 0, amax / 127, torch.ones_like(amax)))
        assert (q[amax > 0, lo:hi].abs().amax(1) == 127).all()  # each group's amax maps to 127
    assert s[3, 0] == 1.0 and torch.equal(q[3, :size], torch.zeros(size, dtype=torch.int8))
    deq = int8_dequantize_per_group(q, s)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    scale = s.repeat_interleave(size, 1)[:, :k]
    assert ((deq - w).abs() <= scale / 2 + 1e-6 * w.abs()).all()
    q1, s1 = int8_quantize_per_group(w)
    assert torch.equal(int8_dequantize_per_group(q1, s1), q1.float() * s1[:, None])


def test_rounding_is_half_to_even_and_clamped():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5, -127.0]])
    q, s = int8_quantize_per_group(w, group_size=4)
    assert s.tolist() == [[1.0, 1.0]] and q.tolist() == [[127, 0, 2, 2, 0, -2, 4, -127]]


def test_outlier_degrades_only_its_own_group():
    w = torch.randn(8, 128, generator=_gen(5))
    w[2, 70] = 1e4
    q, s = int8_quantize_per_group(w, group_size=32)
    err = (int8_dequantize_per_group(q, s) - w).abs()
    assert s[2, 2] == pytest.approx(1e4 / 127)
    assert err[2, 64:96].max() > 1  # the outlier's group loses its small values
    others = torch.ones_like(err, dtype=torch.bool)
    others[2, 64:96] = False
    assert err[others].max() < 0.03  # every other group keeps ~8-bit precision
    qc, sc = int8_quantize_per_group(w)  # per channel: the outlier's whole row is wiped out
    assert (int8_dequantize_per_group(qc, sc) - w)[2].abs().max() > 1


@pytest.mark.parametrize(
    "m,k,n,dtype,group_size",
    [
        (1, 64, 48, torch.float16, None),
        (1, 64, 48, torch.bfloat16, 32),
        (37, 80, 40, torch.bfloat16, None),
        (37, 80, 40, torch.float16, 32),  # K not a multiple of the group: 32 + 32 + 16
        (20, 128, 24, torch.float32, 64),  # groups a multiple of the K tile
        (5, 30, 16, torch.float32, None),
        (9, 70, 33, torch.float16, 16),  # 4 x 16 + 6, groups smaller than the K tile
        (3, 125, 20, torch.bfloat16, 32),  # 3 x 32 + 29
        (7, 60, 24, torch.bfloat16, 20),  # 3 x 20: K tiles straddle groups
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a16_gemm_matches_reference(m, k, n, dtype, group_size, with_bias, device):
    gen = _gen(m + k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    q, s = int8_quantize_per_group(w.to(device), group_size)
    got = w8a16_linear(x, q, s, bias, impl="triton")
    ref = w8a16_linear(x, q, s, bias, impl="reference")
    assert got.dtype == dtype and got.shape == (m, n) and ref.shape == (m, n)
    assert torch.allclose(got.float(), ref.float(), rtol=ULP[dtype], atol=ULP[dtype])
    exact = x.float() @ w.to(device).T + (bias.float() if with_bias else 0)
    assert ((ref.float() - exact).norm() / exact.norm()).item() < 1.5e-2


def test_w8a16_batched_non_contiguous_input_and_nan_rows(device):
    gen = _gen(3)
    for group_size in (None, 16):
        q, s = int8_quantize_per_group(torch.randn(32, 48, generator=gen).to(device), group_size)
        x = torch.randn(2, 48, 9, generator=gen).to(device, torch.float16).transpose(1, 2)  # strided
        x[1, 4, 7] = float("nan")
        got = w8a16_linear(x, q, s, impl="triton")
        ref = w8a16_linear(x.contiguous(), q, s, impl="reference")
        assert got.shape == (2, 9, 32)
        nan_rows = got.isnan().any(-1)
        assert nan_rows[1, 4] and nan_rows.sum() == 1 and got[1, 4].isnan().all()
        assert torch.allclose(got[~nan_rows].float(), ref[~nan_rows].float(), rtol=2e-3, atol=2e-3)


def test_w8a16_non_contiguous_weight(device):
    gen = _gen(4)
    q, s = int8_quantize_per_group(torch.randn(24, 40, generator=gen).to(device), 8)
    qt = q.t().contiguous().t()  # same values, column-major
    x = torch.randn(6, 40, generator=gen).to(device)
    got = w8a16_linear(x, qt, s, impl="triton")
    assert torch.allclose(got, w8a16_linear(x, q, s, impl="reference"), rtol=1e-5, atol=1e-5)


def test_w8a16_relative_error_on_gaussian_data(device):
    gen = _gen(11)
    x, w = torch.randn(16, 128, generator=gen).to(device), torch.randn(48, 128, generator=gen)
    exact = x @ w.to(device).T
    rel = {}
    for group_size in (None, 32):
        q, s = int8_quantize_per_group(w.to(device), group_size)
        rel[group_size] = ((w8a16_linear(x, q, s, impl="triton") - exact).norm() / exact.norm()).item()
    # 8-bit noise on the weight only (not the fp32 product itself); smaller groups, smaller noise
    assert 1e-3 < rel[32] < rel[None] < 1e-2


def test_no_tokens_gives_an_empty_output(device):
    q, s = int8_quantize_per_group(torch.randn(8, 16, device=device), 8)
    for impl in ("triton", "reference"):
        out = w8a16_linear(torch.randn(2, 0, 16, device=device), q, s, impl=impl)
        assert out.shape == (2, 0, 8)


def test_bad_input_is_refused():
    w = torch.randn(8, 16)
    for bad in (0, -4, 2.0, True, "32"):
        with pytest.raises(ValueError, match="group_size"):
            int8_quantize_per_group(w, bad)
    with pytest.raises(ValueError, match="finite"):
        int8_quantize_per_group(torch.tensor([[float("nan"), 1.0]]), 1)
    with pytest.raises(ValueError, match="finite"):
        int8_quantize_per_group(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        int8_quantize_per_group(torch.randn(2, 3, 4), 2)
    with pytest.raises(ValueError, match="dtype"):
        int8_quantize_per_group(torch.ones(2, 4, dtype=torch.int32), 2)
    q, s = int8_quantize_per_group(w, 4)  # 4 groups
    with pytest.raises(ValueError, match="groups"):
        int8_dequantize_per_group(q, torch.ones(8, 7))  # groups of ceil(16 / 7) = 3 make 6, not 7
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        int8_dequantize_per_group(q, torch.ones(8, 17))  # more groups than columns
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        int8_dequantize_per_group(q, s[:4])
    with pytest.raises(ValueError, match="float32"):
        w8a16_linear(torch.randn(2, 16), q, s.half())
    with pytest.raises(ValueError, match="in_features"):
        w8a16_linear(torch.randn(2, 12), q, s)
    with pytest.raises(ValueError, match="weight_int8"):
        w8a16_linear(torch.randn(2, 16), q.float(), s)
    with pytest.raises(TypeError, match="weight_scale"):
        w8a16_linear(torch.randn(2, 16), q, 0.1)
    with pytest.raises(ValueError, match="x must have dtype"):
        w8a16_linear(torch.ones(2, 16, dtype=torch.int64), q, s)
    with pytest.raises(ValueError, match="bias"):
        w8a16_linear(torch.randn(2, 16), q, s, bias=torch.ones(9))
    with pytest.raises(ValueError, match="impl"):
        w8a16_linear(torch.randn(2, 16), q, s, impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        w8a16_linear(torch.randn(0, 16), q, s, impl="cuda")  # checked before the empty shortcut
