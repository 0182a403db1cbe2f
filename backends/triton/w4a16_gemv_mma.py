"""Batch-1 FP4 GEMV whose products run on tensor cores (an alternative to the FMA kernel).

Measured on an H100 (``benchmarks/results/gpu_h100_2026-11-27b.md``), the FMA kernel of
:mod:`qcompile.backends.triton.w4a16_gemv` spends about 5 SASS instructions per FP4 code (6
for AFPQ, whose second sum doubles the multiplies). At that rate an H100 issues codes no faster
than its DRAM delivers them, and small projections run at a third of the memory rate. Here
only the decode stays on the ALUs: each pair of codes becomes two fp16 bit patterns with a few
integer ops (value * 2^-14, exact, subnormals included), and the products go to MMAs:

    S[n, :] = W16[n, tile] @ X[tile, :16]      (AFPQ also A = |W16| @ X)

``X`` holds the tile of ``x`` in each of its 16 columns (an MMA needs 16; the copies cost
tensor-core time, which a GEMV has to spare, and spare a select per tile); column 0 of the
sums is taken once at the end. ``x`` goes to fp16 through a
power of two per K tile: the tile's largest magnitude is mapped into [2^14, 2^15), so bf16, fp16
and FP8 E4M3 activations convert exactly (a value below 2^-28 of the tile's largest loses
bits; its share of the sum is below 2^-28). The power is divided out of the group scales.
Products are exact and sums fp32 (the order differs from the FMA kernel: tensor cores add in
their own order), so results match the reference as the FMA kernel's do. fp32 activations
would round to fp16 and are not taken.

Status: numerics checked in the interpreter, every tile compiled for sm_90 (warpgroup MMAs
with the decoded tile in registers, no spills), not yet timed on a GPU, so ``w4a16_linear``
routes to it only with ``runtime.GEMV1_MMA`` set; ``benchmarks/kernels_w4a16.py`` times it
next to the FMA kernel. The
SASS census (``benchmarks/sass_census.py``, ``results/sass_census_sm90_2026-11-27d.json``)
counts 2.9-3.3 instructions per code for symmetric FP4 and 3.8-4.1 for AFPQ at 128 x 128,
where the FMA kernel needs 4.2 and 5.6 at best: 6.5 and 8.5 us of issue for 8192^2, under the
read's 10 us, where the FMA kernel's 9.6 and 12.7 are about at it or over it. What is left is
mostly the decode (about 1.4 per code with the restaged pair decode of
``fp4_words._fp16_pair``; AFPQ keeps the unrestaged one, where its magnitude tile is free)
and moving each tile into the MMA's operand layout through shared memory.

K order: within each word, the tile holds nibble ``a + 2 b + 4 h`` at position ``4 a + 2 b +
h``, so that each decoded fp16 pair (nibbles i and i + 4) stays one register and joining the
pairs needs no byte shuffles; ``x`` is loaded in the same order (a dot product does not care
which order its terms come in).

A K tile lies inside one scale group (BLOCK_K divides the group size), so a tile's sums are
scaled once per row: ``acc[n, :] += S * eff[n]`` (AFPQ: ``((S + A) * eff + (S - A) * eff_neg)
/ 2``). Split-K partials are summed in each column tile's last program as in the FMA kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qcompile.backends.triton import pdl
from qcompile.backends.triton.cold_bench import cold_graph_bench
from qcompile.backends.triton.fp4_words import _fp16_pair
from qcompile.backends.triton.gemv_fusion import GemvFusion, fusion_args, load_x, row_rstd
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import cdiv, interpreting, tuning
from qcompile.backends.triton.w4a16 import _DTYPE_KIND
from qcompile.backends.triton.w4a16_gemv import (
    _finish,
    _pinned,
    _plan_split,
    _prune_splits,
    _split_buffers,
    _sum_leftover_splits,
    _with_splits,
)

__all__ = ["MMA_CONFIGS", "mma_eligible", "w4a16_gemv1_mma"]

#: Autotune tiles; a tile is used when its BLOCK_K divides the group size (so groups of 64
#: and up; smaller groups stay on the FMA kernel, which spans them in one tile). Kept by the
#: SASS census: 128 x 128 costs 3.1-4.1 instructions per code, 256 x 128 on 8 warps 3.5-4.1,
#: 64 x 128 4.1-4.6, 128 x 64 4.6-5.6; 16 and 32 rows (mma.sync) cost 7.6-18.5 and 128 x 32
#: 8.3-10.8, 128 x 128 on 8 warps 4.6-5.3: the per-tile work (x's power of two and fp16 tile,
#: the scales) is shared by fewer codes.
MMA_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PIPE": pipe}, num_warps=w, num_stages=3)
    for bn, bk, w, pipe in ((128, 128, 4, 3), (128, 128, 4, 1), (64, 128, 4, 1),
                            (256, 128, 8, 3), (128, 64, 4, 3))
]
_INTERP_MMA = {"BLOCK_N": 16, "BLOCK_K": 32, "PIPE": 1}
#: Activation dtypes that convert to fp16 exactly (after the per-tile power of two).
X_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)


@triton.jit
def _fp16_tile(w, MAG_ONLY: tl.constexpr, RESTAGE: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` fp16 codes (``fp4_words._fp16_pair``, decoded the ``RESTAGE``
    way or not) of words ``w [BLOCK_N, BLOCK_K / 8]`` in the tile's K order: position
    ``4 a + 2 b + h`` of a word holds nibble ``a + 2 b + 4 h`` (each pair stays one register;
    module docstring)."""
    lo0, hi0 = _fp16_pair(w, 0, MAG_ONLY, RESTAGE)
    lo1, hi1 = _fp16_pair(w, 1, MAG_ONLY, RESTAGE)
    lo2, hi2 = _fp16_pair(w, 2, MAG_ONLY, RESTAGE)
    lo3, hi3 = _fp16_pair(w, 3, MAG_ONLY, RESTAGE)
    lo = tl.join(tl.join(lo0, lo1), tl.join(lo2, lo3))
    hi = tl.join(tl.join(hi0, hi1), tl.join(hi2, hi3))
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))


@triton.jit
def tile_k_order(BLOCK_K: tl.constexpr):
    """The K offset of each position of a tile (:func:`_fp16_tile`'s order: position
    ``8 j + 4 a + 2 b + h`` holds nibble ``a + 2 b + 4 h`` of word ``j``), to load x in."""
    kk = tl.arange(0, BLOCK_K)
    return (kk // 8) * 8 + (kk // 4) % 2 + ((kk // 2) % 2) * 2 + (kk % 2) * 4


@triton.jit
def tile_sums(w, xt, scale_ptr, neg_ptr, offs_n, n_ok, k0, G, GROUP_SIZE: tl.constexpr,
              HAS_NEG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K tile's scaled sums ``[BLOCK_N, 16]`` (16 equal columns, in 2^-14 units) of words
    ``w [BLOCK_N, BLOCK_K / 8]`` and x ``xt [BLOCK_K]`` in :func:`tile_k_order`: x to fp16
    through the tile's power of two, the products on tensor cores, the group's scales (the
    tile lies in one group) divided by the power."""
    # 2^(14 - floor(log2 max|x|)) from the exponent bits; clamped for an all-zero tile.
    top = (tl.max(tl.abs(xt), axis=0).to(tl.int32, bitcast=True) >> 23) & 0xFF
    pw_exp = tl.minimum(tl.maximum(268 - top, 1), 253)
    pw = (pw_exp << 23).to(tl.float32, bitcast=True)
    inv = ((254 - pw_exp) << 23).to(tl.float32, bitcast=True)  # exactly 1 / pw
    xs = (xt * pw).to(tl.float16)
    xm = tl.broadcast_to(xs[:, None], [BLOCK_K, 16])  # 16 equal columns: no select
    # AFPQ needs the magnitudes too: a free step of the unrestaged decode (_fp16_pair).
    s = tl.dot(_fp16_tile(w, False, not HAS_NEG, BLOCK_N, BLOCK_K), xm)
    g_off = offs_n * G + k0 // GROUP_SIZE
    eff = tl.load(scale_ptr + g_off, mask=n_ok, other=0.0) * inv
    if HAS_NEG:
        a = tl.dot(_fp16_tile(w, True, False, BLOCK_N, BLOCK_K), xm)
        effn = tl.load(neg_ptr + g_off, mask=n_ok, other=0.0) * inv
        out = 0.5 * ((s + a) * eff[:, None] + (s - a) * effn[:, None])
    else:
        out = s * eff[:, None]
    return out


@triton.jit
def column_sums(acc):
    """The rows' sums from :func:`tile_sums`' accumulated ``[BLOCK_N, 16]``: column 0 (the
    others are equal copies) times 2^14, the fp16 placement's unit."""
    col0 = (tl.arange(0, 16) == 0)[None, :]
    return tl.sum(tl.where(col0, acc, 0.0), axis=1) * 16384.0


@triton.jit
def _gemv1_fp4mma_kernel(x_ptr, words_ptr, scale_ptr, neg_ptr, outer_ptr, bias_ptr, part_ptr,
                         out_ptr, count_ptr, xs_ptr, g_ptr, up_ptr, res_ptr, N, K, KW, G,
                         outer_stride, eps, GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr,
                         HAS_OUTER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_XS: tl.constexpr,
                         SPLIT: tl.constexpr, REDUCE: tl.constexpr, KIND: tl.constexpr,
                         EXACT: tl.constexpr, PRO: tl.constexpr, HAS_G: tl.constexpr,
                         HAS_RES: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PIPE: tl.constexpr):
    """Partial sums of the K tiles of split ``pid_s`` (module docstring; ``PRO``, ``HAS_G``,
    ``HAS_RES``: the fused prologue and residual of ``gemv_fusion``; ``PDL``: a programmatic
    dependent launch, ``pdl``)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    WK: tl.constexpr = BLOCK_K // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(tiles, SPLIT)
    # Two 128-byte lines per row: the first 4 K tiles at BLOCK_K 128.
    pdl.enter(words_ptr, offs_n, N, KW, pid_s * per * WK, 32, 2, PDL)
    r = row_rstd(x_ptr, K, eps, PRO)
    kw = tl.arange(0, WK)
    xperm = tile_k_order(BLOCK_K)
    rows = words_ptr + offs_n.to(tl.int64)[:, None] * KW
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    for t in tl.range(pid_s * per, tl.minimum(pid_s * per + per, tiles), num_stages=PIPE):
        k0 = t * BLOCK_K
        wcol = k0 // 8 + kw
        w = tl.load(rows + wcol[None, :], mask=n_ok[:, None] & (wcol < KW)[None, :], other=0)
        xk = k0 + xperm
        xt = load_x(x_ptr, up_ptr, g_ptr, xk, xk < K, r, PRO, HAS_G, KIND, EXACT)
        acc += tile_sums(w, xt, scale_ptr, neg_ptr, offs_n, n_ok, k0, G, GROUP_SIZE, HAS_NEG,
                         BLOCK_N, BLOCK_K)
    _finish(column_sums(acc), outer_ptr, bias_ptr, part_ptr, out_ptr, count_ptr, xs_ptr,
            res_ptr, offs_n, n_ok, pid_n, pid_s, N, outer_stride, HAS_OUTER, HAS_BIAS, HAS_XS,
            HAS_RES, SPLIT, REDUCE, KIND, EXACT)


@functools.cache
def _mma_configs(group_size: int) -> tuple[triton.Config, ...]:
    return tuple(c for c in MMA_CONFIGS if group_size % c.kwargs["BLOCK_K"] == 0)


def mma_eligible(x: torch.Tensor, group_size: int) -> bool:
    """Whether :func:`w4a16_gemv1_mma` takes this call: one row whose dtype converts to fp16
    exactly, and a group size some tile's BLOCK_K divides (under the interpreter: its one
    tile's)."""
    if x.dtype not in X_DTYPES or x.shape[0] != 1:
        return False
    if interpreting():
        return group_size % _INTERP_MMA["BLOCK_K"] == 0
    return bool(_mma_configs(group_size))


@functools.cache
def _tuned(group_size: int, split: int | None) -> triton.runtime.Autotuner:
    """The kernel autotuned over tiles and K splits (or at a fixed ``split``) on a cold L2."""
    return triton.autotune(_with_splits(_mma_configs(group_size), split),
                           key=["N", "K", "GROUP_SIZE", "PRO"],
                           prune_configs_by=tuning(_prune_splits, _gemv1_fp4mma_kernel),
                           do_bench=cold_graph_bench)(_gemv1_fp4mma_kernel)


def w4a16_gemv1_mma(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor,
                    scale_neg: torch.Tensor | None, outer: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None, split: int | None = None,
                    config: triton.Config | None = None, x_scale: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None,
                    fusion: GemvFusion | None = None) -> torch.Tensor:
    """``y[1, N]`` for a contiguous ``x[1, K]`` and FP4 E2M1 weights as int32 words
    ``[N, K / 8]`` (see ``w4a16_gemv.w4a16_gemv1``; the caller checks :func:`mma_eligible`).

    On CUDA the autotuner picks the tile and the K split (cold L2); ``split`` fixes the split,
    ``config`` the tile. ``x_scale``, ``out_dtype`` and ``fusion`` as in ``w4a16_gemv1``.
    """
    k = x.shape[-1]
    n, g = words.shape[0], scale.shape[1]
    exact = interpreting()
    split, rows = _plan_split(split, config, n, k, x.device)
    out, part, counts = _split_buffers(x, n, out_dtype or x.dtype, rows)
    cfg = dict(_INTERP_MMA, SPLIT=split) if exact else _pinned(config, split)
    kern = _gemv1_fp4mma_kernel if cfg else _tuned(group_size, split)
    xs = scale if x_scale is None else x_scale
    bias_t = scale if bias is None else bias
    fused = fusion_args(fusion, 1, scale)
    launch(
        kern, lambda meta: (cdiv(n, meta["BLOCK_N"]), meta["SPLIT"]), x, words, scale,
        scale if scale_neg is None else scale_neg,
        scale if outer is None else outer, bias_t, part, out,
        scale if counts is None else counts, xs, *fused[0][:3], n, k, words.shape[1], g,
        0 if outer is None or outer.shape[0] == 1 else 1, fused[0][3], GROUP_SIZE=group_size,
        HAS_NEG=scale_neg is not None, HAS_OUTER=outer is not None, HAS_BIAS=bias is not None,
        HAS_XS=x_scale is not None, REDUCE=counts is not None, KIND=_DTYPE_KIND[out.dtype],
        EXACT=exact, **fused[1], **pdl.launch_flags(x.device), **cfg)
    _sum_leftover_splits(kern, cfg, counts, part, bias_t, bias is not None, out, xs,
                         x_scale is not None, exact, fused)
    return out
