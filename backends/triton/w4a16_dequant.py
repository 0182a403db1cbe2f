"""W4A16 prefill: decode the packed weight once into ``x``'s dtype, then one cuBLAS GEMM.

At large M the tiled W4A16 GEMM of :mod:`qcompile.backends.triton.w4a16` decodes every weight
tile once per M tile with a table gather per element; on an H100 it ran the 2048-token prefill
of a Llama-3-8B-shaped model at about a tenth of cuBLAS bf16 (``benchmarks/results/
gpu_h100_2026-11-26.md``). Above :data:`DEQUANT_MIN_M` rows, :func:`w4a16_linear` instead
writes ``W`` (``[N, K]`` in ``x``'s dtype) with :func:`w4a16_dequant` - one streaming pass:
read 4 bits, write 16 per weight - and multiplies with ``torch.nn.functional.linear``. The
decode is the GEMM's own (:func:`~qcompile.backends.triton.w4a16._weight_tile`), rounded to
``x``'s dtype exactly as the reference rounds ``W``, so the product differs from
:func:`~qcompile.backends.triton.w4a16.w4a16_linear_ref` by fp32 summation order only.
The extra memory is one decoded weight at a time (the caching allocator reuses it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.backends.triton.runtime import interpreting
from qcompile.backends.triton.w4a16 import _DTYPE_KIND, _round_to, _weight_tile

__all__ = ["DEQUANT_MIN_M", "w4a16_dequant"]

#: Smallest M (flattened rows of ``x``) that decodes the weight and calls cuBLAS. Below it the
#: tiled GEMM, whose cost per row is lower when M is small; the crossover is not measured yet
#: (the H100 run measured M = 2048 only), so this is the prefill side of it.
DEQUANT_MIN_M = 256

_BLOCK_N = 64


def _block_k(group_size: int) -> int:
    """K tile: 128 when it lies inside one group; 32 otherwise, which keeps the few groups a
    tile touches (picked per element with selects) within the registers (an offline sm_90
    compile of 128 with group 33 spilled under Triton 3.6)."""
    return 128 if group_size % 128 == 0 else 32


@triton.jit
def _dequant_kernel(packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr, outer_ptr, w_ptr,
                    N, K, KB, G, outer_stride,
                    GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr, HAS_ZERO: tl.constexpr,
                    HAS_OUTER: tl.constexpr, KIND: tl.constexpr, EXACT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``W[n, k]`` for one ``[BLOCK_N, BLOCK_K]`` tile: codes k0+2j (low nibble) and k0+2j+1."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w_lo, w_hi = _weight_tile(packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr, outer_ptr,
                              k0, offs_n, N, K, KB, G, outer_stride, GROUP_SIZE, HAS_NEG,
                              HAS_ZERO, HAS_OUTER, BLOCK_K, False)
    # Back to [BLOCK_N, BLOCK_K] in K order (element 2j is the low nibble), so each row's
    # run of BLOCK_K outputs is one contiguous, vectorized store (the [BLOCK_K/2, BLOCK_N]
    # tiles stored directly compiled to 2-byte stores on sm_90).
    ty = w_ptr.dtype.element_ty
    w = tl.interleave(tl.trans(_round_to(w_lo, KIND, EXACT).to(ty)),
                      tl.trans(_round_to(w_hi, KIND, EXACT).to(ty)))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = (offs_n < N)[:, None]
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w,
             mask=n_ok & (offs_k < K)[None, :])


def w4a16_dequant(packed: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                  scale_neg: torch.Tensor | None, zero: torch.Tensor | None,
                  outer: torch.Tensor | None, group_size: int, k: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype`` (``dequantize`` in fp32, then rounded to ``dtype``).

    Inputs as validated by :func:`~qcompile.backends.triton.w4a16.w4a16_linear` (contiguous,
    on one Triton device).
    """
    n, g = packed.shape[0], scale.shape[1]
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return w
    o_stride = 0 if outer is None or outer.shape[0] == 1 else 1
    block_k = _block_k(group_size)
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        packed, table, scale, scale if scale_neg is None else scale_neg,
        scale if zero is None else zero, scale if outer is None else outer, w,
        n, k, packed.shape[1], g, o_stride, GROUP_SIZE=group_size,
        HAS_NEG=scale_neg is not None, HAS_ZERO=zero is not None, HAS_OUTER=outer is not None,
        KIND=_DTYPE_KIND[dtype], EXACT=interpreting(), BLOCK_N=_BLOCK_N, BLOCK_K=block_k,
        num_warps=4)
    return w
