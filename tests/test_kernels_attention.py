"""Quantized attention: the Triton kernel against the reference and against fp32 SDPA.

On CPU the Triton kernels run through Triton's interpreter; with a GPU they also run compiled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffaccel.kernels import quantized_attention as qa
from diffaccel.kernels.quantized_attention import K_BLOCK, Q_BLOCK, quantized_sdpa

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
NAN_SCALES = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=NO_GPU)])
def device(request, monkeypatch):
    """CPU: Triton's interpreter (read at launch by diffaccel.kernels); CUDA: compiled kernels."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _qkv(b, h, sq, skv, d, dtype, device="cpu", seed=0, outliers=0.0, hk=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen)
    k = torch.randn(b, hk or h, skv, d, generator=gen)
    v = torch.randn(b, hk or h, skv, d, generator=gen)
    k = k + outliers * torch.randn(d, generator=gen)  # large per-channel offsets in K
    return (t.to(device, dtype) for t in (q, k, v))


def _cos(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _mre(a, b):
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean()).item()


def _exact(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)


@pytest.mark.parametrize(
    "shape,dtype,outliers",
    [
        ((1, 2, 100, 100, 64), torch.float16, 0.0),  # self-attention, tails in both blocks
        ((1, 2, 100, 100, 64), torch.float16, 10.0),  # keys with large outlier channels
        ((2, 1, 37, 150, 128), torch.bfloat16, 10.0),  # cross-attention, head dim 128
        ((1, 1, 140, 20, 40), torch.float16, 0.0),  # SD1.5's head dim 40, padded in the kernel
        ((1, 2, 12, 9, 8), torch.float32, 0.0),  # the tiny pipelines' head dims
        ((1, 1, 150, 30, 160), torch.float16, 0.0),  # head dim 160: 64-query programs
    ],
)
def test_kernel_matches_reference_and_fp32_attention(shape, dtype, outliers, device):
    q, k, v = _qkv(*shape, dtype, device, outliers=outliers)
    got = quantized_sdpa(q, k, v, impl="triton")
    ref = quantized_sdpa(q, k, v, impl="reference")
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=4e-3)  # online vs 2-pass
    exact = _exact(q, k, v)
    assert _cos(got, exact) >= 0.999 and _mre(got, exact) <= 0.02


def test_k_smoothing_is_what_keeps_outlier_keys_accurate():
    q, k, v = _qkv(1, 2, 128, 128, 64, torch.float32, outliers=30.0)
    exact = _exact(q, k, v)
    smoothed = quantized_sdpa(q, k, v)
    assert _mre(smoothed, exact) <= 0.02
    # The same quantization without subtracting K's mean loses the small channels to the outliers.
    qi8, q_scale = qa.quantize_blocks_reference(q, Q_BLOCK, None, 64**-0.5 * qa.LOG2E)
    ki8, k_scale = qa.quantize_blocks_reference(k, K_BLOCK)
    unsmoothed = qa.attention_reference(qi8, q_scale, ki8, k_scale, v, None, torch.float32)
    assert _mre(unsmoothed, exact) > 2 * _mre(smoothed, exact)


@NAN_SCALES
def test_block_quantization_kernel_matches_reference(device):
    x = torch.randn(2, 70, 3, 24, generator=torch.Generator().manual_seed(4)).transpose(1, 2)
    x[1, 2, 66, 5] = float("nan")
    x = x.to(device)  # (2, 3, 70, 24), strided
    mean = x.mean(dim=2, keepdim=True)
    for block, m, extra in ((K_BLOCK, mean, 1.0), (Q_BLOCK, None, 0.3)):
        q1, s1 = qa.quantize_blocks_triton(x, block, m, extra)
        q2, s2 = qa.quantize_blocks_reference(x, block, m, extra)
        assert torch.equal(q1, q2) and torch.allclose(s1, s2, rtol=1e-7, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_layouts_strides_gqa_and_scale(impl, device):
    q, k, v = _qkv(2, 4, 70, 50, 64, torch.float16, device, seed=1, hk=2)
    exact = _exact(q, k, v, enable_gqa=True, scale=0.2)
    nhd = quantized_sdpa(
        *(t.transpose(1, 2) for t in (q, k, v)),
        scale=0.2,
        enable_gqa=True,
        tensor_layout="NHD",
        impl=impl,
    )
    assert nhd.shape == (2, 70, 4, 64)
    assert _cos(nhd.transpose(1, 2), exact) >= 0.999 and _mre(nhd.transpose(1, 2), exact) <= 0.02
    strided_v = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    hnd = quantized_sdpa(q, k, strided_v, scale=0.2, enable_gqa=True, impl=impl)
    assert torch.allclose(hnd.float(), nhd.transpose(1, 2).float(), atol=1e-3)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_masks(impl, device):
    q, k, v = _qkv(2, 2, 30, 40, 16, torch.float16, device, seed=2)
    keep = torch.ones(2, 1, 1, 40, dtype=torch.bool, device=device)
    keep[0, ..., 25:] = False  # key padding of the first sample
    additive = torch.zeros(2, 1, 1, 40, device=device).masked_fill(~keep, float("-inf"))
    per_query = torch.randn(1, 2, 30, 40, generator=torch.Generator().manual_seed(3)).to(device)
    for mask in (keep, additive, per_query):
        got = quantized_sdpa(q, k, v, attn_mask=mask, impl=impl)
        exact = _exact(q, k, v, attn_mask=mask)
        assert _cos(got, exact) >= 0.999 and _mre(got, exact) <= 0.02


@NAN_SCALES
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_non_finite_input_spreads_as_documented(impl, device):
    q, k, v = _qkv(1, 2, 150, 40, 16, torch.float16, device, seed=5)
    q[0, 0, 3, 1] = float("nan")
    bad_rows = quantized_sdpa(q, k, v, impl=impl).isnan().any(-1).cpu()
    assert bad_rows[0, 0, :Q_BLOCK].all()  # the query's whole block
    assert not bad_rows[0, 0, Q_BLOCK:].any() and not bad_rows[0, 1].any()
    q, k, v = _qkv(1, 2, 20, 40, 16, torch.float16, device, seed=5)
    v[0, 1, 7, 0] = float("inf")
    k[0, 0, 3, 2] = float("nan")
    bad_rows = (~quantized_sdpa(q, k, v, impl=impl).isfinite()).any(-1).cpu()
    assert bad_rows[0, 0].all() and bad_rows[0, 1].all()  # every row of both heads


def test_bad_input_is_refused():
    q, k, v = _qkv(1, 2, 8, 8, 16, torch.float16)
    with pytest.raises(ValueError, match="tensor_layout"):
        quantized_sdpa(q, k, v, tensor_layout="BHSD")
    with pytest.raises(ValueError, match="is_causal"):
        quantized_sdpa(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        quantized_sdpa(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="share a dtype"):
        quantized_sdpa(q, k.float(), v)
    with pytest.raises(ValueError, match="4-D"):
        quantized_sdpa(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="incompatible shapes"):
        quantized_sdpa(q, k[..., :8], v)
    with pytest.raises(ValueError, match="enable_gqa"):
        quantized_sdpa(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="head dims"):
        quantized_sdpa(*(torch.zeros(1, 1, 4, 320, dtype=torch.float16),) * 3)
    with pytest.raises(ValueError, match="attn_mask"):
        quantized_sdpa(q, k, v, attn_mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="query must have dtype"):
        quantized_sdpa(q.int(), k, v)
