"""The tile plumbing the GEMM kernels share: grouped program order, the output epilogue, the grid.

A GEMM kernel launches one program per ``BLOCK_M x BLOCK_N`` output tile on a 1-D grid
(:func:`gemm_grid`). :func:`grouped_tile` maps the program id to its tile in *grouped* order:
``GROUP_M`` tile rows are walked column by column, so that programs running at the same time
share the rows of A and the columns of B they read, and the L2 cache serves them (Triton's
matmul tutorial). :func:`store_tile` is the common epilogue: add the bias, cast to the output
dtype, store with the edge masks. Both are device helpers (:func:`~diffaccel.kernels._triton.device_function`).

Example:
    >>> gemm_grid(100, 64, {"BLOCK_M": 16, "BLOCK_N": 32})   # 7 tile rows x 2 tile columns
    (14,)
"""

from __future__ import annotations

from ._triton import device_function, interpreting, tl

#: Tile rows walked together by :func:`grouped_tile` (the kernels' ``GROUP_M``).
GROUP_M = 8


def tile_config(
    m: int, interpreted: dict[str, int], by_rows: tuple[tuple[int | None, dict[str, int]], ...]
) -> dict[str, int]:
    """A GEMM's launch config for ``m`` rows (a new dict): ``interpreted`` under the interpreter, else
    the first ``(max_m, config)`` of ``by_rows`` with ``m <= max_m``; ``max_m=None`` takes any ``m``.

    Example:
        >>> table = ((16, {"BLOCK_M": 16}), (64, {"BLOCK_M": 64}), (None, {"BLOCK_M": 128}))
        >>> [tile_config(m, {"BLOCK_M": 8}, table)["BLOCK_M"] for m in (1, 40, 4096)]
        [16, 64, 128]
    """
    if interpreting():
        return dict(interpreted)
    for max_m, config in by_rows:
        if max_m is None or m <= max_m:
            return dict(config)
    raise ValueError(f"no tile config for {m} rows: end by_rows with a (None, config) entry")


def gemm_grid(m: int, n: int, config: dict[str, int]) -> tuple[int]:
    """The 1-D launch grid of a GEMM with ``config``'s ``BLOCK_M`` x ``BLOCK_N`` output tiles."""
    return (-(-m // config["BLOCK_M"]) * -(-n // config["BLOCK_N"]),)


@device_function
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile in grouped order: its row offsets ``rm`` and column offsets ``rn``."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn


@device_function
def store_tile(c_ptr, y, bias_ptr, rm, rn, M, N, stride_cm, stride_cn, HAS_BIAS: tl.constexpr):
    """Add the bias (``HAS_BIAS``) to the fp32 tile ``y`` and store it in ``c``'s dtype, masked at the edges."""
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))
