"""W4A8 prefill: shift the FP4 weight to FP8 once, then the FP8 GEMM.

The fused kernel of :mod:`qcompile.backends.triton.w4a8` rebuilds every FP8 weight tile once per
M tile inside the main loop, and on an H100/H200 that decode starved the FP8 tensor cores: 0.15
to 0.19x cuBLAS FP8 from M = 256 to 8192 (``benchmarks/results/gpu_h200_2026-11-26.md``). From
:data:`DEQUANT_MIN_M` rows, :func:`~qcompile.backends.triton.w4a8.w4a8_linear` instead writes
the weight as FP8 E4M3 ``[N, K]`` with :func:`w4a8_dequant` - one streaming pass, half a byte
read and one written per weight - and multiplies with
:func:`~qcompile.backends.triton.fp8_gemm.fp8_scaled_mm`, the FP8 GEMM that runs at cuBLAS
speed. ``W8 = fp4 * 2^gexp`` is exact in E4M3 (:func:`~qcompile.backends.triton.w4a8.
w4a8_weight_fp8`), and the GEMM applies ``a_scale`` and ``row_scale`` in its epilogue like the
fused kernel, so both paths compute the same products and differ by fp32 summation order only.
The extra memory is one FP8 weight at a time (the caching allocator reuses it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import cdiv, graph_bench, interpreting, tuning
from qcompile.backends.triton.w4a8 import fp4_times_2g

__all__ = ["DEQUANT_MIN_M", "shift_call", "w4a8_dequant"]

#: Smallest M that takes the shift-then-GEMM path. The decode pass costs about a copy of the
#: FP8 weight (N*K bytes written, N*K/2 read), which at M = 256 is about as long as the GEMM
#: itself, and the fused kernel measured 0.15x there; the crossover below 256 is not measured.
DEQUANT_MIN_M = 256

_BLOCK_N = 32
_BLOCK_K = 256


def _fits(group_size: int, block_k: int) -> bool:
    """Whether a ``block_k`` tile takes one exponent per row or whole groups (no gather)."""
    return group_size % block_k == 0 or block_k % group_size == 0


def _blocks(group_size: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) under the interpreter: 32 x 256 where the exponents come one per row
    or per group; a quarter of that for per-element exponents."""
    return (_BLOCK_N, _BLOCK_K) if _fits(group_size, _BLOCK_K) else (16, 128)


def _cfg(block_n: int, block_k: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps)


#: Autotune configs of the shift where the exponents come one per row or per group. The first
#: is the tile the H100 run timed (44.8 us at 8192 x 8192: 2.1 TB/s moved, where a copy moves
#: 2.5); the others are wider tiles (more bytes in flight per program), not yet timed.
SHIFT_CONFIGS = [_cfg(32, 256, 4), _cfg(64, 256, 4), _cfg(32, 512, 4), _cfg(64, 512, 8),
                 _cfg(128, 256, 8), _cfg(16, 1024, 4)]
#: Per-element exponents (group sizes that tile no BLOCK_K): gathered pointers, small tiles
#: (32 x 256 spilled on sm_90).
GATHER_CONFIGS = [_cfg(16, 128, 4), _cfg(32, 128, 4), _cfg(16, 64, 4)]


def _prune(configs, named_args, **kwargs):
    """The tile configs that fit the group size, else the gather configs."""
    gs = kwargs["GROUP_SIZE"]
    fitting = [c for c in configs if c in SHIFT_CONFIGS and _fits(gs, c.kwargs["BLOCK_K"])]
    return fitting or [c for c in configs if c in GATHER_CONFIGS]


@triton.jit
def _shift_kernel(packed_ptr, gexp_ptr, w_ptr, N, K, KB, G, stride_gn,
                  GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """E4M3 bytes of ``W8[n, k]`` for one ``[BLOCK_N, BLOCK_K]`` tile, stored K-contiguous."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    rn = offs_n.to(tl.int64)
    offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(packed_ptr + rn[:, None] * KB + offs_p[None, :],
                   mask=n_ok[:, None] & (offs_p < KB)[None, :], other=0)
    # Element 2i is the low nibble of byte i: interleaving restores K order.
    placed = tl.interleave(((byte & 8) << 4) | ((byte & 7) << 2),
                           (byte & 0x80) | ((byte & 0x70) >> 2))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    g_row = gexp_ptr + rn * stride_gn
    if GROUP_SIZE % BLOCK_K == 0:
        g = tl.load(g_row + k0 // GROUP_SIZE, mask=n_ok, other=0).to(tl.int32)
        bits = fp4_times_2g(placed, g[:, None])
    elif BLOCK_K % GROUP_SIZE == 0:
        # Whole groups per tile: a [BLOCK_N, groups] exponent tile broadcast over each group.
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE
        gi = k0 // GROUP_SIZE + tl.arange(0, NG)
        g = tl.load(g_row[:, None] + gi[None, :], mask=n_ok[:, None] & (gi < G)[None, :],
                    other=0).to(tl.int32)
        placed3 = tl.reshape(placed, (BLOCK_N, NG, GROUP_SIZE))
        bits = tl.reshape(fp4_times_2g(placed3, g[:, :, None]), (BLOCK_N, BLOCK_K))
    else:
        # Any other group size: each element's exponent, gathered from the row (cached).
        gi = tl.minimum(offs_k // GROUP_SIZE, G - 1)
        g = tl.load(g_row[:, None] + gi[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
        bits = fp4_times_2g(placed, g)
    tl.store(w_ptr + rn[:, None] * K + offs_k[None, :], bits,
             mask=n_ok[:, None] & (offs_k < K)[None, :])


_shift_tuned = triton.autotune(
    SHIFT_CONFIGS + GATHER_CONFIGS, key=["N", "K", "GROUP_SIZE"],
    prune_configs_by=tuning(_prune, _shift_kernel), do_bench=graph_bench)(_shift_kernel)


def w4a8_dequant(packed: torch.Tensor, gexp: torch.Tensor, group_size: int,
                 k: int) -> torch.Tensor:
    """``decode(codes) * 2^gexp`` as float8_e4m3fn ``[N, K]`` (bit-equal to
    :func:`~qcompile.backends.triton.w4a8.w4a8_weight_fp8`).

    Inputs as validated by :func:`~qcompile.backends.triton.w4a8.w4a8_linear`: ``packed``
    uint8 ``[N, ceil(K/2)]`` and ``gexp`` int8 ``[N, ceil(K/group_size)]``, both unit-stride
    along K, in :data:`~qcompile.backends.triton.scales.GEXP_RANGE` (not re-checked).
    """
    n = packed.shape[0]
    w = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    if n and k:
        if interpreting():  # one tile config: autotuning is meaningless here
            block_n, block_k = _blocks(group_size)
            _shift_kernel[(cdiv(n, block_n), cdiv(k, block_k))](
                *_shift_args(packed, gexp, w, k), GROUP_SIZE=group_size, BLOCK_N=block_n,
                BLOCK_K=block_k)
        else:
            fn, grid, args, kwargs = shift_call(packed, gexp, w, group_size, k)
            launch(fn, grid, *args, **kwargs)
    return w.view(torch.float8_e4m3fn)


def _shift_args(packed, gexp, w, k) -> tuple:
    return (packed, gexp, w, packed.shape[0], k, packed.shape[1], gexp.shape[1], gexp.stride(0))


def shift_call(packed: torch.Tensor, gexp: torch.Tensor, w: torch.Tensor, group_size: int,
               k: int) -> tuple:
    """``(kernel, grid, args, kwargs)``: the autotuned launch :func:`w4a8_dequant` makes on a
    GPU to write the E4M3 bytes into ``w`` (uint8 ``[N, K]``, N and K not 0), for callers
    that prepare it (:func:`~qcompile.backends.triton.launch.prepare`: the W4A8 prefill's
    plans)."""
    n = packed.shape[0]
    return (_shift_tuned, lambda meta: (cdiv(n, meta["BLOCK_N"]), cdiv(k, meta["BLOCK_K"])),
            _shift_args(packed, gexp, w, k), {"GROUP_SIZE": group_size})
