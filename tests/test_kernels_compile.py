"""The Triton kernels compile for Hopper (sm_90) without a GPU, onto INT8 / FP16 tensor cores.

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

from diffaccel.kernels import int8_gemm, nvfp4, nvfp4_gemm, quantized_attention

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(
    not os.path.exists(PTXAS), reason="Triton's NVIDIA backend (ptxas) is not installed"
)


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Compile into a fresh cache: no stale or concurrently written entries from other runs."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))


def _ptx(kernel, signature: dict[str, str], constants: dict, **options) -> str:
    source = ASTSource(
        triton.jit(kernel.fn), {**signature, **{k: "constexpr" for k in constants}}, constants
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


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
