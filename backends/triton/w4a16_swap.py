"""W4A16 tiled GEMM with the operands swapped: ``Y^T = W @ X^T``, the decoded weight tile as
the MMA's first operand.

The tiled GEMM (:func:`qcompile.backends.triton.w4a16._w4a16_gemm_kernel`) decodes each
4-bit weight tile in registers and multiplies it as the second operand, which sm_90's WGMMA
only reads from shared memory: every K step stores the decoded tile there and waits for it.
The first operand may come from registers, so here the decoded tile stays in registers and
the activations, loaded unchanged, take the pipelined shared-memory path (the same trick as
:mod:`qcompile.backends.triton.w4a8_swap`). For large M this is the candidate to replace
decode-then-cuBLAS in prefill, which pays for writing and reading back a bf16 copy of the
weight: measured at 0.80-0.82x bf16 on an H100 at M = 2048, where the copy alone needs more
bandwidth than HBM3 has for 0.9x.

bf16/fp16 activations only (fp32 stays on the tiled GEMM's tf32x3 path). Same arguments,
formats and numerics as the tiled GEMM: each weight is rounded to the activation dtype as
the reference rounds the dequantized weight, products summed in fp32.
``w4a16_linear(..., path="swap")`` runs it; no M picks it by default before it is timed on a
GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.backends.triton.jit import tile_coords
from qcompile.backends.triton.launch import launch as launch_kernel
from qcompile.backends.triton.runtime import cdiv, interpreting, next_pow2, plain_bench, tuning
from qcompile.backends.triton.w4a16 import _round_to, _weight_tile

__all__ = ["SWAP_CONFIGS", "w4a16_swap_launch"]


@triton.jit
def _w4a16_swap_kernel(x_ptr, packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr, outer_ptr,
                       bias_ptr, out_ptr, M, N, K, KB, G, outer_stride, M_BUCKET,
                       GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr, HAS_ZERO: tl.constexpr,
                       HAS_OUTER: tl.constexpr, HAS_BIAS: tl.constexpr, KIND: tl.constexpr,
                       EXACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr):
    """One program per ``[BLOCK_N, BLOCK_M]`` tile of ``Y^T``; ``M_BUCKET`` only keys the
    autotuner."""
    pid_n, pid_m = tile_coords(tl.program_id(0), N, M, BLOCK_N, BLOCK_M, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_lo, w_hi = _weight_tile(packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr,
                                  outer_ptr, k0, offs_n, N, K, KB, G, outer_stride,
                                  GROUP_SIZE, HAS_NEG, HAS_ZERO, HAS_OUTER, BLOCK_K, True)
        w = tl.interleave(tl.trans(w_lo), tl.trans(w_hi))  # [BLOCK_N, BLOCK_K], K order
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_row + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :],
                     other=0.0)
        if EXACT:
            # Interpreter: its 16-bit dot is wrong, so multiply the exactly rounded values in
            # fp32 (products of two 16-bit floats are exact in fp32).
            acc = tl.dot(_round_to(w, KIND, EXACT), tl.trans(xk.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(xk), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    acc = _round_to(acc, KIND, EXACT)
    tl.store(out_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[None, :] & (offs_n < N)[:, None])


def _cfg(bn: int, bm: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "GROUP_N": 8},
                         num_stages=stages, num_warps=warps)


#: Autotune candidates: 64 or 128 weight rows (one or two warp groups' WGMMA M), 16-256
#: activation rows (the WGMMA's N), K blocks of 64 (128-byte bf16 rows) or 128.
SWAP_CONFIGS = [
    _cfg(64, 32, 128, 4, 4), _cfg(128, 32, 64, 4, 8), _cfg(64, 64, 128, 4, 4),
    _cfg(128, 64, 64, 4, 8), _cfg(128, 128, 64, 3, 8), _cfg(64, 128, 64, 4, 4),
    _cfg(128, 256, 64, 3, 8), _cfg(64, 256, 64, 3, 4),
]


def _prune_by_m(configs: list[triton.Config], named_args: dict,
                **kwargs: object) -> list[triton.Config]:
    """Activation tiles no wider than the M bucket (and at least a quarter of it)."""
    bucket = named_args["M_BUCKET"]
    kept = [c for c in configs
            if max(min(bucket, 256) // 4, 16) <= c.kwargs["BLOCK_M"] <= max(bucket, 16)]
    return kept or configs


_swap_tuned = triton.autotune(SWAP_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                              prune_configs_by=tuning(_prune_by_m, _w4a16_swap_kernel),
                              do_bench=plain_bench)(
    _w4a16_swap_kernel)

# Under the interpreter: small tiles that still take several K steps and ragged edges.
_INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 64, "GROUP_N": 2}


def w4a16_swap_launch(args: tuple, out: torch.Tensor, m: int, n: int, k: int, kb: int, g: int,
                      o_stride: int, flags: dict) -> torch.Tensor:
    """Launch into ``out [M, N]`` with the tiled GEMM's prepared arguments (``args``: x,
    packed, table, scale, neg, zero, outer, bias tensors; ``flags``: its constexprs)."""
    m_bucket = min(next_pow2(m), 1 << 16)
    launch = (*args, out, m, n, k, kb, g, o_stride, m_bucket)

    def grid(meta: dict) -> tuple[int]:
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    if interpreting():
        _w4a16_swap_kernel[grid(_INTERPRET_CONFIG)](*launch, **flags, **_INTERPRET_CONFIG)
    else:
        launch_kernel(_swap_tuned, grid, *launch, **flags)
    return out
