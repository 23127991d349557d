"""NVFP4 quantize/dequantize and the W4A16 GEMM: Triton against the plain-torch reference.

On CPU the Triton kernels run through Triton's interpreter; with a GPU they also run compiled.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffaccel.kernels.nvfp4 import E2M1_VALUES, NVFP4Tensor, nvfp4_dequantize, nvfp4_quantize
from diffaccel.kernels.nvfp4_gemm import nvfp4_linear

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=NO_GPU)])
def device(request, monkeypatch):
    """CPU: Triton's interpreter (read at launch by diffaccel.kernels); CUDA: compiled kernels."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _same_bits(a: NVFP4Tensor, b: NVFP4Tensor) -> bool:
    return (
        torch.equal(a.packed, b.packed)
        and torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
        and torch.equal(a.tensor_scale, b.tensor_scale)
        and a.shape == b.shape
    )


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_every_code_round_trips_exactly(impl, device):
    codes = torch.arange(16)
    values = torch.tensor(E2M1_VALUES * 2) * torch.where(codes >= 8, -1.0, 1.0)
    q = nvfp4_quantize(values.reshape(1, 16).to(device), impl=impl)
    # amax 6: tensor scale 6 / (6 * 448) and block scale 448 multiply to 1, so codes are exact
    assert q.block_scale.float().item() == 448.0
    assert q.tensor_scale.item() == pytest.approx(1 / 448, rel=1e-7)
    packed = q.packed[0].cpu()
    stored = torch.stack((packed & 0xF, packed >> 4), -1).flatten().long()
    assert torch.equal(stored, torch.where(values == 0, 0, codes))  # -0 is stored as +0
    assert torch.equal(nvfp4_dequantize(q, impl=impl).cpu(), values.reshape(1, 16))


@pytest.mark.parametrize(
    "shape,dtype",
    [((8, 64), torch.float32), ((5, 40), torch.bfloat16), ((3, 2, 48), torch.float16)],
)
def test_triton_quantize_matches_reference_bit_for_bit(shape, dtype, device):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    x.view(-1)[::7] *= 100  # spread the block amaxes over a wide range
    x = x.to(device, dtype)
    a, b = nvfp4_quantize(x, impl="triton"), nvfp4_quantize(x, impl="reference")
    assert _same_bits(a, b)
    assert torch.equal(nvfp4_dequantize(a, impl="triton"), nvfp4_dequantize(a, impl="reference"))
    assert nvfp4_dequantize(a, dtype).shape == x.shape


def test_block_scales_round_like_torch_across_the_e4m3_range(device):
    gen = torch.Generator().manual_seed(2)
    spread = 10 ** torch.empty(256, 1).uniform_(-6, 0, generator=gen)
    blocks = (torch.randn(256, 16, generator=gen) * spread).reshape(4, -1).to(device)
    a, b = nvfp4_quantize(blocks, impl="triton"), nvfp4_quantize(blocks, impl="reference")
    assert _same_bits(a, b)
    scales = a.block_scale.float()
    assert (scales < 2**-6).any() and (scales > 100).any()  # E4M3 subnormals and normals


def test_rounding_is_nearest_even_within_a_block(device):
    # block amax 6: block x tensor scale is exactly 1; ties 0.25, 0.75, ..., 5 go to even codes
    row = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 0.74, 2.6, 4.9, -5.0, -0.25, 0.875, 0]
    want = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 0.5, 3.0, 4.0, -4.0, 0.0, 1.0, 0.0]
    x = torch.tensor([row], device=device)
    for impl in ("triton", "reference"):
        got = nvfp4_dequantize(nvfp4_quantize(x, impl=impl), impl=impl)
        assert got[0].cpu().tolist() == want


def test_zero_blocks_and_tensors_give_zeros_not_nan(device):
    zeros = torch.zeros(4, 32, device=device)
    mixed = torch.cat([torch.zeros(2, 16), torch.randn(2, 16)], dim=1).to(device)
    for impl in ("triton", "reference"):
        assert torch.equal(nvfp4_dequantize(nvfp4_quantize(zeros, impl=impl), impl=impl), zeros)
        out = nvfp4_dequantize(nvfp4_quantize(mixed, impl=impl), impl=impl).cpu()
        assert torch.equal(out[:, :16], torch.zeros(2, 16)) and torch.isfinite(out).all()


def test_outlier_takes_its_block_scale_other_blocks_keep_precision(device):
    x = torch.ones(1, 48)
    x[0, 3] = 1e4
    x[0, 32:] = 0.1
    for impl in ("triton", "reference"):
        out = nvfp4_dequantize(nvfp4_quantize(x.to(device), impl=impl), impl=impl)[0].cpu()
        assert out[3].item() == pytest.approx(1e4, rel=1e-6)  # the amax: code 6 x scale 448
        assert torch.equal(out[:16][torch.arange(16) != 3], torch.zeros(15))  # 1 / (1e4/6) -> 0
        assert torch.allclose(out[16:32], torch.ones(16), rtol=0.07)  # own scale, 3 mantissa bits
        # 1e5 times below the tensor's amax, the block scale is an E4M3 subnormal (2 x 2**-9):
        # the format then saturates the codes at 6 x 2**-8 x tensor scale = 0.0872.
        assert torch.allclose(out[32:], torch.full((16,), 6 * 2**-8 * 1e4 / 2688))


def test_error_bound_and_size_on_gaussian_weights():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    q = nvfp4_quantize(w)
    rel = ((nvfp4_dequantize(q) - w).norm() / w.norm()).item()
    assert 0.05 < rel < 0.15  # 4-bit: visibly lossy, but bounded
    assert w.numel() * 2 / q.nbytes > 3.5  # vs bf16


def test_safetensors_round_trip(tmp_path):
    q = nvfp4_quantize(torch.randn(24, 40))
    save_file(q.to_dict("layer."), tmp_path / "w.safetensors")
    back = NVFP4Tensor.from_dict(load_file(tmp_path / "w.safetensors"), "layer.")
    assert _same_bits(q, back) and back.shape == (24, 40)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="finite"):
        nvfp4_quantize(torch.tensor([[1.0, float("nan")] * 8]))
    with pytest.raises(ValueError, match="dtype"):
        nvfp4_quantize(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="impl"):
        nvfp4_quantize(torch.ones(2, 16), impl="cuda")
    with pytest.raises(TypeError, match="NVFP4Tensor"):
        nvfp4_dequantize(torch.ones(2, 16))
    q = nvfp4_quantize(torch.ones(8, 32))
    with pytest.raises(ValueError, match="in_features"):
        nvfp4_linear(torch.ones(2, 16), q)
    with pytest.raises(ValueError, match="bias"):
        nvfp4_linear(torch.ones(2, 32), q, bias=torch.ones(9))


@pytest.mark.parametrize(
    "m,k,n,dtype",
    [
        (1, 64, 48, torch.float16),
        (37, 72, 40, torch.bfloat16),
        (20, 128, 24, torch.float32),
        (5, 30, 16, torch.float16),
    ],
)
def test_w4a16_gemm_matches_reference(m, k, n, dtype, device):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen).to(device, dtype)
    q = nvfp4_quantize(w.to(device))
    got = nvfp4_linear(x, q, bias, impl="triton").float()
    ref = nvfp4_linear(x, q, bias, impl="reference").float()
    # Same products in fp32, summed in another order; the interpreter truncates to bfloat16.
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]
    assert torch.allclose(got, ref, rtol=ulp, atol=ulp)
    exact = x.float() @ nvfp4_dequantize(q).T + bias.float()
    assert ((ref - exact).norm() / exact.norm()).item() < 5e-3


def test_w4a16_gemm_batched_non_contiguous_input_and_nan_rows(device):
    gen = torch.Generator().manual_seed(3)
    q = nvfp4_quantize(torch.randn(32, 48, generator=gen).to(device))
    x = torch.randn(2, 48, 9, generator=gen).to(device, torch.float16).transpose(1, 2)  # strided
    x[1, 4, 7] = float("nan")
    got = nvfp4_linear(x, q, impl="triton")
    ref = nvfp4_linear(x.contiguous(), q, impl="reference")
    assert got.shape == (2, 9, 32)
    nan_rows = got.isnan().any(-1)
    assert nan_rows[1, 4] and nan_rows.sum() == 1 and got[1, 4].isnan().all()
    assert torch.allclose(got[~nan_rows].float(), ref[~nan_rows].float(), rtol=2e-3, atol=2e-3)
