"""W4A8 fused kernel with the operands swapped: ``C^T = W8 @ A^T``, the decoded weight as the
MMA's first operand.

On sm_90 a WGMMA takes its first operand from registers or shared memory and its second only
from shared memory. The fused kernel (:func:`qcompile.backends.triton.w4a8._w4a8_kernel`)
decodes the FP4 weight tile in registers and passes it as the second operand, so each K step
stores the decoded tile to shared memory and waits for it before the MMA; on an H100 it ran
at 0.25-0.33x cuBLAS FP8 at M = 128-1024 (benchmarks/results/gpu_h100_2026-11-26b.md). Here
the decoded tile is the first operand and can stay in registers, while the activations, which
are loaded unchanged, take the pipelined shared-memory path. The swap also suits small M: the
activations' rows become the MMA's N dimension, which may be 16-256 wide, where the M
dimension of a WGMMA is at least 64 rows.

Same arguments and products as the fused kernel; the weight decode (``shift`` or ``mul``,
:data:`qcompile.backends.triton.w4a8.DECODES`; ``place`` rescales the accumulator per weight
column and is not offered here) comes from :func:`qcompile.backends.triton.w4a8.w8_tile`.
``w4a8_linear(..., path="swap")`` runs it; no M picks it by default before it is timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.backends.triton.fp8_gemm import m_bucket
from qcompile.backends.triton.jit import fp8_dot, tile_coords
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import cdiv, interpreting, plain_bench, tuning
from qcompile.backends.triton.w4a8 import tile_setup, w8_tile

__all__ = ["SWAP_CONFIGS", "w4a8_swap_launch"]


@triton.jit
def _w4a8_swap_kernel(a_ptr, w_ptr, c_ptr, as_ptr, rs_ptr, gexp_ptr, bias_ptr, M, N, K,
                      M_BUCKET, stride_am, stride_ak, stride_wn, stride_gn, stride_cm,
                      stride_cn, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      DECODE: tl.constexpr, PROMOTE: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr):
    """One program per ``[BLOCK_N, BLOCK_M]`` tile of ``C^T``; weight-row tiles are grouped
    (``GROUP_N``) so neighbouring programs share activation columns in L2."""
    pid_n, pid_m = tile_coords(tl.program_id(0), N, M, BLOCK_N, BLOCK_M, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm, rn, offs_k, offs_p, a_ptrs, w_ptrs, g_row, k_bytes, n_groups = tile_setup(
        a_ptr, w_ptr, gexp_ptr, M, N, K, offs_m, offs_n, stride_am, stride_ak, stride_wn,
        stride_gn, GROUP_SIZE, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        byte = tl.load(w_ptrs, mask=offs_p[None, :] < k_bytes - k0 // 2, other=0)
        w = w8_tile(byte, g_row, k0, n_groups, offs_k, GROUP_SIZE, DECODE, BLOCK_N, BLOCK_K)
        acc = fp8_dot(w, tl.trans(a), acc, PROMOTE)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K // 2
    # The reference's order: ((acc * a_scale) * row_scale) + bias.
    out = acc * tl.load(as_ptr + rm)[None, :]
    out = out * tl.load(rs_ptr + rn)[:, None]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn).to(tl.float32)[:, None]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[None, :] * stride_cm + offs_n[:, None] * stride_cn
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


def _cfg(bn: int, bm: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": 128, "GROUP_N": 8},
                         num_stages=stages, num_warps=warps)


#: Autotune candidates: 64 or 128 weight rows per program (one or two warp groups' WGMMA M),
#: 16-256 activation rows (the WGMMA's N), K blocks of 128. 64 x 256 on one warp group: at
#: M = 256 and N = 8192 it gives 128 programs, one per multiprocessor of an H100, where
#: 128 x 256 leaves half of them idle (the M = 256 gap of ``gpu_h100_2026-11-26b.md``; offline
#: sm_90: 248 registers, no spills, 100 KiB of shared memory).
SWAP_CONFIGS = [
    _cfg(64, 16, 5, 4), _cfg(64, 32, 5, 4), _cfg(128, 16, 4, 8), _cfg(128, 32, 4, 8),
    _cfg(64, 64, 4, 4), _cfg(128, 64, 4, 8), _cfg(64, 128, 4, 4), _cfg(128, 128, 3, 8),
    _cfg(64, 256, 3, 4), _cfg(128, 256, 3, 8),
]


def _prune_by_m(configs: list[triton.Config], named_args: dict,
                **kwargs: object) -> list[triton.Config]:
    """Activation tiles no wider than the M bucket (and at least a quarter of it)."""
    bucket = named_args["M_BUCKET"]
    kept = [c for c in configs
            if max(bucket // 4, 16) <= c.kwargs["BLOCK_M"] <= max(bucket, 16)]
    return kept or configs


_swap_tuned = triton.autotune(SWAP_CONFIGS,
                              key=["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_BIAS", "DECODE",
                                   "PROMOTE"],
                              prune_configs_by=tuning(_prune_by_m, _w4a8_swap_kernel),
                              do_bench=plain_bench)(
    _w4a8_swap_kernel)

# Under the interpreter: small tiles that still take several K steps and ragged edges.
_INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 64, "GROUP_N": 2}


def w4a8_swap_launch(a: torch.Tensor, a_scale: torch.Tensor, packed: torch.Tensor,
                     gexp: torch.Tensor, row_scale: torch.Tensor, group_size: int,
                     bias: torch.Tensor | None, c: torch.Tensor, decode: int,
                     promote: int) -> torch.Tensor:
    """Launch into ``c [M, N]`` for inputs ``w4a8_linear`` has checked (``decode``: an index
    into ``w4a8.DECODES``, 0 or 2; ``promote``: the kernels' ``PROMOTE``)."""
    m, k = a.shape
    n = packed.shape[0]
    args = (a, packed, c, a_scale, row_scale, gexp, c if bias is None else bias, m, n, k,
            m_bucket(m), a.stride(0), a.stride(1), packed.stride(0), gexp.stride(0),
            c.stride(0), c.stride(1))
    flags = {"GROUP_SIZE": group_size, "HAS_BIAS": bias is not None, "DECODE": decode,
             "PROMOTE": promote}

    def grid(meta: dict) -> tuple[int]:
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    if interpreting():
        _w4a8_swap_kernel[grid(_INTERPRET_CONFIG)](*args, **flags, **_INTERPRET_CONFIG)
    else:
        launch(_swap_tuned, grid, *args, **flags)
    return c
