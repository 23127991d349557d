"""The Triton kernels compile without a GPU: for Hopper (sm_90) onto INT8 / FP16 tensor cores, the
native NVFP4 GEMM for Blackwell (sm_100, sm_120) onto the block-scaled FP4 MMA.

CPU tests run the kernels through Triton's interpreter, which does not see GPU-only compile
errors (e.g. Python lists inside a kernel) or which instructions a dot becomes; compiling
ahead of time with the ``ptxas`` shipped in the Triton wheel does.
"""

from __future__ import annotations

import os
import re

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from diffaccel.kernels import int8_gemm, nvfp4, nvfp4_gemm, nvfp4_w4a4_gemm, quantized_attention

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(
    not os.path.exists(PTXAS), reason="Triton's NVIDIA backend (ptxas) is not installed"
)


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Compile into a fresh cache: no stale or concurrently written entries from other runs."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))


def _ptx(kernel, signature: dict[str, str], constants: dict, capability: int = 90, **options) -> str:
    source = ASTSource(
        triton.jit(kernel.fn), {**signature, **{k: "constexpr" for k in constants}}, constants
    )
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options=options).asm["ptx"]


def _ints(names: str) -> dict[str, str]:
    return {name: "i32" for name in names.split()}


def test_w8a8_gemm_uses_int8_tensor_cores():
    sig = {
        "a_ptr": "*i8",
        "b_ptr": "*i8",
        "sa_ptr": "*fp32",
        "sb_ptr": "*fp32",
        "bias_ptr": "*bf16",
        "c_ptr": "*bf16",
        **_ints("M N K stride_am stride_ak stride_bn stride_bk stride_cm stride_cn"),
    }
    cfg = int8_gemm._gemm_config(4096)
    ptx = _ptx(
        int8_gemm._int8_gemm_kernel,
        sig,
        {
            "HAS_BIAS": True,
            "GROUP_M": 8,
            "EVEN_K": True,
            **{k: v for k, v in cfg.items() if k.startswith("BLOCK")},
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    assert re.search(r"wgmma\.mma_async\S*\.s32\.s8\.s8", ptx)


def test_quantized_attention_uses_int8_and_fp16_tensor_cores():
    sig = {
        "q_ptr": "*i8",
        "qs_ptr": "*fp32",
        "k_ptr": "*i8",
        "ks_ptr": "*fp32",
        "v_ptr": "*bf16",
        "bias_ptr": "*fp32",
        "o_ptr": "*bf16",
        **_ints("H HK SQ SKV D DV NQB NKB svb svh svs svd sbb sbh sbq sbk sob soh sos sod"),
    }
    ptx = _ptx(
        quantized_attention._attention_kernel,
        sig,
        {
            "HAS_BIAS": True,
            "QB": 128,
            "BLOCK_M": 128,
            "BLOCK_N": 64,
            "BLOCK_D": 128,
            "BLOCK_DV": 128,
            "DOT_F32": False,
        },
        num_warps=8,
        num_stages=3,
    )
    assert re.search(r"wgmma\.mma_async\S*\.s32\.s8\.s8", ptx)  # Q.K^T
    assert re.search(r"wgmma\.mma_async\S*\.f32\.f16\.f16", ptx)  # P.V


def test_nvfp4_kernels_compile():
    _ptx(
        nvfp4._quantize_kernel,
        {
            "x_ptr": "*bf16",
            "packed_ptr": "*u8",
            "scale_ptr": "*u8",
            "tensor_scale_ptr": "*fp32",
            "n_groups": "i32",
        },
        {"BLOCK_G": 64},
        num_warps=4,
    )
    sig = {
        "x_ptr": "*bf16",
        "p_ptr": "*u8",
        "s_ptr": "*u8",
        "ts_ptr": "*fp32",
        "bias_ptr": "*bf16",
        "c_ptr": "*bf16",
        **_ints("M N K stride_xm stride_xk stride_pn stride_sn stride_cm stride_cn"),
    }
    cfg = nvfp4_gemm._config(16)
    ptx = _ptx(
        nvfp4_gemm._w4a16_kernel,
        sig,
        {
            "HAS_BIAS": True,
            "GROUP_M": 8,
            "DOT_F32": False,
            **{k: v for k, v in cfg.items() if k.startswith("BLOCK")},
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    assert re.search(r"mma\S*\.bf16\.bf16", ptx)


@pytest.mark.parametrize(
    "capability,mma",
    [
        (100, r"tcgen05\.mma\S*\.kind::mxf4nvf4\.block_scale\.block16"),
        (120, r"mma\.sync\S*\.kind::mxf4nvf4\.block_scale\.scale_vec::4X\.f32\.e2m1\.e2m1\.f32\.ue4m3"),
    ],
)
def test_native_nvfp4_gemm_uses_block_scaled_fp4_tensor_cores(capability, mma):
    """E2M1 operands with an E4M3 scale per 16 elements: NVFP4 itself, not MXFP4 (E8M0 per 32)."""
    sig = {
        "a_ptr": "*u8",
        "sa_ptr": "*fp8e4nv",
        "b_ptr": "*u8",
        "sb_ptr": "*fp8e4nv",
        "tsa_ptr": "*fp32",
        "tsb_ptr": "*fp32",
        "bias_ptr": "*bf16",
        "c_ptr": "*bf16",
        **_ints("M N KP stride_am stride_sam stride_bn stride_sbn stride_cm stride_cn"),
    }
    cfg = nvfp4_w4a4_gemm._config(4096)
    ptx = _ptx(
        nvfp4_w4a4_gemm._w4a4_kernel,
        sig,
        {"HAS_BIAS": True, "GROUP_M": 8, **{k: v for k, v in cfg.items() if k.startswith("BLOCK")}},
        capability=capability,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    assert re.search(mma, ptx)
