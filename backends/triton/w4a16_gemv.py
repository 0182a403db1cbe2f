"""Batch-1 W4A16 GEMV with the group scales hoisted out of the inner product.

For one activation row ``x`` and a weight tile that lies inside one scale group, the kernel sums
the raw code values times ``x`` and multiplies the group's scale once per row:
``y[n] += eff[n, g] * sum_k v[n, k] * x[k]`` (AFPQ: positive and negative values summed apart,
each with its own scale; INT asym: ``- zero * sum_k x[k]``). That leaves a table lookup (or, for
FP4 E2M1, a few integer ops that build the value as an fp16) and a fused multiply-add per weight
element: the kernel streams the packed codes at close to the memory rate instead of paying a
scale load, a select and a rounding per element like the general GEMV in
:mod:`qcompile.backends.triton.w4a16`.

Numerics: the weight is not rounded to ``x``'s dtype before the multiply (the reference
rounds ``W`` to bf16/fp16 first), so 16-bit results can differ from
:func:`~qcompile.backends.triton.w4a16.w4a16_linear_ref` by the weight's rounding (an ulp of the
output); fp32 results differ by summation order only. Split-K partial sums are reduced in a
fixed order (same inputs, same bits).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qcompile.backends.triton import path_tuning, pdl, runtime
from qcompile.backends.triton.cold_bench import cold_graph_bench
from qcompile.backends.triton.fp4_words import (
    _fp4_units,
    _pair_products,
    _scaled_sums,
    _staged_products,
)
from qcompile.backends.triton.gemv_fusion import (
    GemvFusion,
    add_residual,
    fusion_args,
    load_x,
    row_rstd,
)
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import (
    arrival_counts,
    cdiv,
    interpreting,
    sm_count,
    tuning,
)
from qcompile.backends.triton.w4a16 import (
    _DTYPE_KIND,
    _last_arrival,
    _mul_rn,
    _reset_count,
    _round_to,
    _splitk_reduce_kernel,
    _sum_splits,
)

__all__ = ["FP4W_CONFIGS", "GEMV1_CONFIGS", "gemv1_eligible", "w4a16_gemv1"]

#: Autotune configs; a config is used only when its BLOCK_K divides the group size.
GEMV1_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in ((32, 256, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3),
                         (16, 512, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3))
]

_INTERP = {"BLOCK_N": 32, "BLOCK_K": 64}  # one config under the interpreter (group size % 64)

#: Autotune configs of the FP4 word kernel. BLOCK_K may span several groups (a power-of-two
#: group size dividing it) or lie inside one group (dividing the group size). Tiles that give
#: a thread several rows of the same words share its loads of x across those rows. Kept from
#: the H100 sweeps (``benchmarks/kernels_w4a16.py --sweep``, FP4 g128, 2026-11-27): 16 x 1024,
#: 32 x 1024 and 16 x 2048 ran 8192^2 in 18-21 us and 28672 x 8192 in 57-61 us; 64 x 512 is
#: next (20-33 / 62-68 us). Dropped as slower on both shapes: 8 warps on 32 x 1024 (40-46 /
#: 132-149 us) or 128 x 256 (23-60 / 70-82 us), 64 x 128 and 64 x 256 (24-88 / 67-116 us), 4
#: stages (no change), and loading the next tile's words by hand before multiplying the
#: current one's (no faster: Triton then kept both tiles in registers). ``PIPE``: stages of
#: Triton's software pipeline over the K tiles (``tl.range(num_stages=PIPE)``); at 3 the next
#: tiles' words and x are copied into shared memory (``cp.async``) while this one is
#: multiplied, which Triton does not do by itself for loads that feed no dot; 1 loads, then
#: computes. Every tile runs both ways; the K split is tuned with them (:data:`SPLITS`).
#: ``STAGE``: the tile's x is loaded (and put through a fused prologue) once per element as one
#: vector, then split by nibble position, instead of each thread loading the x of its own
#: columns per nibble; by the offline SASS census (``benchmarks/sass_census.py``, sm_90,
#: 2026-11-27c) it saves 1.5-11 % of the loop's instructions without a prologue, and a fused
#: RMSNorm then adds 1.5-6 % (a SiLU gate 4-15 %) where unstaged tiles add 5-17 % (9-35 %).
#: Not yet timed on a GPU, so it is a third way to run each tile (with PIPE 1), and the only
#: one kept for a prologue.
FP4W_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PIPE": pipe, "STAGE": stage}, num_warps=4,
                  num_stages=3)
    for bn, bk in ((16, 1024), (32, 1024), (16, 2048), (64, 512))
    for pipe, stage in ((1, False), (3, False), (1, True))
]
#: K splits the autotuner tries with each tile (those with at least one K tile per split): at
#: batch 1 a small weight needs splits to fill the GPU, a large one runs fastest unsplit.
SPLITS = (1, 2, 4, 8)
_INTERP_FP4W = {"BLOCK_N": 16, "BLOCK_K": 256, "PIPE": 3, "STAGE": False}
@triton.jit
def _epilogue(acc, bias_ptr, out_ptr, xs_ptr, res_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr,
              HAS_XS: tl.constexpr, HAS_RES: tl.constexpr, KIND: tl.constexpr,
              EXACT: tl.constexpr):
    """``y = round(acc * xs + bias)`` (then ``+ residual``, rounded again) into ``out`` (the
    order of ``_splitk_reduce_kernel``)."""
    if HAS_XS:
        acc = _mul_rn(acc, tl.load(xs_ptr), EXACT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = add_residual(_round_to(acc, KIND, EXACT), res_ptr, offs_n, n_ok, HAS_RES, KIND, EXACT)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _finish(acc, outer_ptr, bias_ptr, part_ptr, out_ptr, count_ptr, xs_ptr, res_ptr, offs_n,
            n_ok, pid_n, pid_s, N, outer_stride, HAS_OUTER: tl.constexpr,
            HAS_BIAS: tl.constexpr, HAS_XS: tl.constexpr, HAS_RES: tl.constexpr,
            SPLIT: tl.constexpr, REDUCE: tl.constexpr, KIND: tl.constexpr,
            EXACT: tl.constexpr, ROW_COUNTS: tl.constexpr = False):
    """Outer scale, then ``y`` (one split) or this split's fp32 partial. With ``REDUCE`` the
    program that stores its column tile's last partial (an arrival count per tile) also sums
    the tile's partials in split order and writes ``y``: no second launch, the same bits as
    the reduce kernel. It then zeroes the count for the next call.

    ``ROW_COUNTS``: the same with an arrival count per row instead of per column tile: the
    thread that stores a row's partial also counts it (its acq_rel atomic orders its own
    store), so no barrier of the whole program is needed (a barrier inside a loop stops
    Triton from pipelining the loop's loads; ``w4a16_gemv_tma`` finishes units in its loop)."""
    if HAS_OUTER:
        acc = _mul_rn(acc, tl.load(outer_ptr + offs_n * outer_stride, mask=n_ok, other=0.0),
                      EXACT)
    if SPLIT == 1:
        _epilogue(acc, bias_ptr, out_ptr, xs_ptr, res_ptr, offs_n, n_ok, HAS_BIAS, HAS_XS,
                  HAS_RES, KIND, EXACT)
    else:
        tl.store(part_ptr + pid_s.to(tl.int64) * N + offs_n, acc, mask=n_ok)
        if ROW_COUNTS:
            arrived = tl.atomic_add(count_ptr + offs_n, 1, mask=n_ok, sem="acq_rel",
                                    scope="gpu")
            last = n_ok & (arrived == SPLIT - 1)
            tot = _sum_splits(part_ptr, offs_n, last, N, SPLIT)
            _epilogue(tot, bias_ptr, out_ptr, xs_ptr, res_ptr, offs_n, last, HAS_BIAS, HAS_XS,
                      HAS_RES, KIND, EXACT)
            tl.atomic_xchg(count_ptr + offs_n, 0, mask=last, sem="relaxed", scope="gpu")
        elif REDUCE:
            if _last_arrival(count_ptr, pid_n, SPLIT):
                tot = _sum_splits(part_ptr, offs_n, n_ok, N, SPLIT)
                _epilogue(tot, bias_ptr, out_ptr, xs_ptr, res_ptr, offs_n, n_ok, HAS_BIAS,
                          HAS_XS, HAS_RES, KIND, EXACT)
                _reset_count(count_ptr, pid_n)


@triton.jit
def _gemv1_kernel(x_ptr, packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr, outer_ptr,
                  bias_ptr, part_ptr, out_ptr, count_ptr, xs_ptr, g_ptr, up_ptr, res_ptr, N, K,
                  KB, G, outer_stride, eps, GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr,
                  HAS_ZERO: tl.constexpr, HAS_OUTER: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_XS: tl.constexpr, SPLIT: tl.constexpr, REDUCE: tl.constexpr,
                  FP4: tl.constexpr, KIND: tl.constexpr, EXACT: tl.constexpr,
                  PRO: tl.constexpr, HAS_G: tl.constexpr, HAS_RES: tl.constexpr,
                  PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial sums of K tiles [pid_s*per, (pid_s+1)*per) into ``part[pid_s]`` (or ``y``);
    ``PRO``/``HAS_G``/``HAS_RES``: the fused prologue and residual (``gemv_fusion``);
    ``PDL``: a programmatic dependent launch (``pdl``)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    kb = tl.arange(0, BLOCK_K // 2)
    rows = packed_ptr + offs_n.to(tl.int64)[:, None] * KB
    tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(tiles, SPLIT)
    PF: tl.constexpr = BLOCK_K // 256 if BLOCK_K >= 256 else 1  # 128-byte lines per tile
    pdl.enter(packed_ptr, offs_n, N, KB, pid_s * per * (BLOCK_K // 2), 128, PF, PDL)
    r = row_rstd(x_ptr, K, eps, PRO)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(pid_s * per, tl.minimum(pid_s * per + per, tiles)):
        k0 = t * BLOCK_K
        kbt = k0 // 2 + kb
        byte = tl.load(rows + kbt[None, :], mask=n_ok[:, None] & (kbt < KB)[None, :],
                       other=0).to(tl.int32)
        # x beyond K is 0, so padding nibbles and rows past N add nothing.
        x_lo = load_x(x_ptr, up_ptr, g_ptr, 2 * kbt, 2 * kbt < K, r, PRO, HAS_G, KIND, EXACT)
        x_hi = load_x(x_ptr, up_ptr, g_ptr, 2 * kbt + 1, 2 * kbt + 1 < K, r, PRO, HAS_G, KIND,
                      EXACT)
        if FP4:
            v_lo = _fp4_units(byte & 0xF)
            v_hi = _fp4_units(byte >> 4)
        else:
            v_lo = tl.load(table_ptr + (byte & 0xF))
            v_hi = tl.load(table_ptr + (byte >> 4))
        s_off = offs_n * G + k0 // GROUP_SIZE  # the tile lies in one group
        eff = tl.load(scale_ptr + s_off, mask=n_ok, other=0.0)
        if HAS_NEG:
            pos = tl.sum(tl.maximum(v_lo, 0.0) * x_lo[None, :]
                         + tl.maximum(v_hi, 0.0) * x_hi[None, :], axis=1)
            neg = tl.sum(tl.minimum(v_lo, 0.0) * x_lo[None, :]
                         + tl.minimum(v_hi, 0.0) * x_hi[None, :], axis=1)
            acc += pos * eff + neg * tl.load(neg_ptr + s_off, mask=n_ok, other=0.0)
        else:
            dot = tl.sum(v_lo * x_lo[None, :] + v_hi * x_hi[None, :], axis=1)
            if HAS_ZERO:
                dot -= tl.load(zero_ptr + s_off, mask=n_ok, other=0.0) * tl.sum(x_lo + x_hi)
            acc += dot * eff
    if FP4:
        acc = acc * 16384.0  # 2^14: the fp16 placement's unit
    _finish(acc, outer_ptr, bias_ptr, part_ptr, out_ptr, count_ptr, xs_ptr, res_ptr, offs_n,
            n_ok, pid_n, pid_s, N, outer_stride, HAS_OUTER, HAS_BIAS, HAS_XS, HAS_RES, SPLIT,
            REDUCE, KIND, EXACT)


@triton.jit
def _gemv1_fp4w_kernel(x_ptr, words_ptr, scale_ptr, neg_ptr, outer_ptr, bias_ptr, part_ptr,
                       out_ptr, count_ptr, xs_ptr, g_ptr, up_ptr, res_ptr, N, K, KW, G,
                       outer_stride, eps, GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr,
                       HAS_OUTER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_XS: tl.constexpr,
                       SPLIT: tl.constexpr, REDUCE: tl.constexpr, KIND: tl.constexpr,
                       EXACT: tl.constexpr, PRO: tl.constexpr, HAS_G: tl.constexpr,
                       HAS_RES: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PIPE: tl.constexpr, STAGE: tl.constexpr):
    """FP4 weights read as int32 words (8 codes, k = 8 * word + nibble): per tile, the raw
    code sums of each group (AFPQ: the signed sum S and the magnitude sum A, so the positive
    part is (S + A) / 2 and the negative (S - A) / 2) times the group scales. ``PRO``,
    ``HAS_G``, ``HAS_RES``: the fused prologue and residual (``gemv_fusion``); ``PDL``: a
    programmatic dependent launch (``pdl``)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    WK: tl.constexpr = BLOCK_K // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    kw = tl.arange(0, WK)
    rows = words_ptr + offs_n.to(tl.int64)[:, None] * KW
    tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(tiles, SPLIT)
    PF: tl.constexpr = WK // 32 if WK >= 32 else 1  # the first tile's 128-byte lines
    pdl.enter(words_ptr, offs_n, N, KW, pid_s * per * WK, 32, PF, PDL)
    r = row_rstd(x_ptr, K, eps, PRO)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_end = tl.minimum(pid_s * per + per, tiles)
    for t in tl.range(pid_s * per, t_end, num_stages=PIPE):
        k0 = t * BLOCK_K
        wcol = k0 // 8 + kw
        w = tl.load(rows + wcol[None, :], mask=n_ok[:, None] & (wcol < KW)[None, :], other=0)
        s_acc = tl.zeros([BLOCK_N, WK], dtype=tl.float32)
        a_acc = tl.zeros([BLOCK_N, WK], dtype=tl.float32)
        if STAGE:
            kk = k0 + tl.arange(0, BLOCK_K)
            xv = load_x(x_ptr, up_ptr, g_ptr, kk, kk < K, r, PRO, HAS_G, KIND, EXACT)
            s_acc, a_acc = _staged_products(s_acc, a_acc, w, xv, HAS_NEG, WK)
        else:
            for i in tl.static_range(4):
                # x beyond K is 0, so padding codes and rows past N add nothing.
                x_lo = load_x(x_ptr, up_ptr, g_ptr, 8 * wcol + i, 8 * wcol + i < K, r, PRO,
                              HAS_G, KIND, EXACT)
                x_hi = load_x(x_ptr, up_ptr, g_ptr, 8 * wcol + i + 4, 8 * wcol + i + 4 < K, r,
                              PRO, HAS_G, KIND, EXACT)
                s_acc, a_acc = _pair_products(s_acc, a_acc, w, i, x_lo, x_hi, HAS_NEG)
        acc += _scaled_sums(s_acc, a_acc, scale_ptr, neg_ptr, offs_n, n_ok, k0, G,
                            GROUP_SIZE, HAS_NEG, BLOCK_N, BLOCK_K)
    acc = acc * 16384.0  # 2^14: the fp16 placement's unit
    _finish(acc, outer_ptr, bias_ptr, part_ptr, out_ptr, count_ptr, xs_ptr, res_ptr, offs_n,
            n_ok, pid_n, pid_s, N, outer_stride, HAS_OUTER, HAS_BIAS, HAS_XS, HAS_RES, SPLIT,
            REDUCE, KIND, EXACT)


@functools.cache
def _fp4w_configs(group_size: int) -> tuple[triton.Config, ...]:
    return tuple(c for c in FP4W_CONFIGS if tile_fits(c.kwargs["BLOCK_K"], group_size))


def tile_fits(block_k: int, group_size: int) -> bool:
    """Whether a K tile of the FP4 word kernels lies inside one scale group or spans whole
    power-of-two groups (what their group-scale step, ``_scaled_sums``, handles)."""
    pow2 = group_size >= 8 and group_size & (group_size - 1) == 0
    return group_size % block_k == 0 or (pow2 and block_k % group_size == 0)


def _words(packed: torch.Tensor, k: int) -> torch.Tensor | None:
    """``packed`` ``[N, K/2]`` uint8 viewed as int32 words ``[N, K/8]``, or None when K is not a
    multiple of 8 or the storage is not 4-byte aligned."""
    if k % 8 or packed.stride(-1) != 1 or packed.stride(0) % 4 or packed.data_ptr() % 4:
        return None
    return packed.view(torch.int32)


@functools.cache
def _eligible_configs(group_size: int) -> tuple[triton.Config, ...]:
    return tuple(c for c in GEMV1_CONFIGS if group_size % c.kwargs["BLOCK_K"] == 0)


def gemv1_eligible(m: int, group_size: int) -> bool:
    """Whether :func:`w4a16_gemv1` runs this call: one row and a group size that some
    config's BLOCK_K divides (every group of 64, 128, ... and per-channel K of such)."""
    if interpreting():
        return m == 1 and group_size % _INTERP["BLOCK_K"] == 0
    return m == 1 and bool(_eligible_configs(group_size))


def _with_splits(configs: tuple[triton.Config, ...],
                 split: int | None) -> list[triton.Config]:
    """Each tile with each of :data:`SPLITS` (or with ``split`` only), tile-major: the first
    candidate, all that ``QCOMPILE_TRITON_TUNE=first`` keeps, is the first tile unsplit."""
    return [triton.Config({**c.kwargs, "SPLIT": s}, num_warps=c.num_warps,
                          num_stages=c.num_stages)
            for c in configs for s in ((split,) if split else SPLITS)]


def _prune_splits(configs: list[triton.Config], named_args: dict,
                  **kwargs) -> list[triton.Config]:
    """Candidates with at least one K tile per split (a fixed split is always kept); with a
    fused prologue (``PRO``), only those that stage x (where the kernel has ``STAGE``)."""
    k = named_args["K"]
    kept = [c for c in configs if c.kwargs["SPLIT"] <= cdiv(k, c.kwargs["BLOCK_K"])]
    if kwargs.get("PRO"):
        kept = [c for c in kept if c.kwargs.get("STAGE", True)]
    return kept or list(configs)


@functools.cache
def _tuned(group_size: int, split: int | None = None) -> triton.runtime.Autotuner:
    """The byte kernel autotuned over tiles and K splits (or tiles at a fixed ``split``), each
    timed on a cold L2 as in a decode step (:mod:`qcompile.backends.triton.cold_bench`)."""
    return triton.autotune(_with_splits(_eligible_configs(group_size), split),
                           key=["N", "K", "GROUP_SIZE", "PRO"],
                           prune_configs_by=tuning(_prune_splits, _gemv1_kernel),
                           do_bench=cold_graph_bench)(_gemv1_kernel)


@functools.cache
def _tuned_fp4w(group_size: int, split: int | None = None) -> triton.runtime.Autotuner:
    """The FP4 word kernel, autotuned as :func:`_tuned`."""
    return triton.autotune(_with_splits(_fp4w_configs(group_size), split),
                           key=["N", "K", "GROUP_SIZE", "PRO"],
                           prune_configs_by=tuning(_prune_splits, _gemv1_fp4w_kernel),
                           do_bench=cold_graph_bench)(_gemv1_fp4w_kernel)


_MIN_BLOCK_N = min([c.kwargs["BLOCK_N"] for c in GEMV1_CONFIGS + FP4W_CONFIGS]
                   + [_INTERP["BLOCK_N"], _INTERP_FP4W["BLOCK_N"]])


def _split(n: int, k: int, device: torch.device) -> int:
    """K splits where the autotuner does not pick them (the interpreter; a pinned config):
    about four programs per multiprocessor at BLOCK_N = 64, >= 512 K each."""
    cap = max(1, min(16, k // 512))
    if device.type != "cuda":
        return min(2, cap)  # interpreter: exercise the split path
    sms = sm_count(device)
    return max(1, min(cap, -(-4 * sms // -(-n // 64))))


def _plan_split(split: int | None, config: triton.Config | None, n: int, k: int,
                device: torch.device) -> tuple[int | None, int]:
    """``(split, rows)`` of a batch-1 launch: the K split (None where the autotuner picks it
    with the tile: CUDA, nothing pinned) and the partial-sum rows to allocate (enough for any
    split it may pick)."""
    if split is None and config is None and not interpreting():
        return None, max(SPLITS)
    split = split or _split(n, k, device)
    return split, split


def _pinned(config: triton.Config | None, split: int | None) -> dict:
    """Launch options of a pinned ``config`` at ``split`` ({} for none)."""
    if config is None:
        return {}
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
                SPLIT=split)


def _split_buffers(x: torch.Tensor, n: int, out_dtype: torch.dtype,
                   rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(out, part, counts)``: the result ``[1, N]``, the fp32 partials (``out`` itself when
    unsplit) and the arrival counts for summing them in place (None: the reduce kernel)."""
    out = torch.empty(1, n, dtype=out_dtype, device=x.device)
    part = out if rows == 1 else torch.empty(rows, n, dtype=torch.float32, device=x.device)
    counts = arrival_counts(x.device, cdiv(n, _MIN_BLOCK_N)) if rows > 1 else None
    return out, part, counts


def _sum_leftover_splits(kern, cfg: dict, counts: torch.Tensor | None, part: torch.Tensor,
                         bias_t: torch.Tensor, has_bias: bool, out: torch.Tensor,
                         xs: torch.Tensor, has_xs: bool, exact: bool, fused: tuple) -> None:
    """After a launch: the split it ran with (``cfg``'s, or the autotuner's pick) and, where
    its partials could not be summed in place, the reduce kernel over them (with the fused
    residual of ``fused``, :func:`gemv_fusion.fusion_args`' pair)."""
    used = cfg["SPLIT"] if cfg else kern.best_config.kwargs["SPLIT"]
    if used > 1 and counts is None:
        n = out.shape[1]
        launch(
            _splitk_reduce_kernel, (cdiv(n, 1024),), part, bias_t, out, xs, fused[0][2], 1, n,
            SPLIT=used, HAS_BIAS=has_bias, HAS_XS=has_xs, KIND=_DTYPE_KIND[out.dtype],
            EXACT=exact, BLOCK=1024, HAS_RES=fused[1]["HAS_RES"])


def _other_kernel(x, words, packed, table, scale, scale_neg, outer, group_size, bias, x_scale,
                  out_dtype, kernel, fusion) -> str:
    """Which kernel runs FP4 words: ``kernel`` (``"mma"``, ``"tma"``) or the one
    ``runtime.GEMV1_MMA`` names (True: the tensor-core kernel, ``"tma"``: the TMA kernel,
    ``"auto"``: the fastest of those eligible, timed with the FMA kernel on a cold L2 at the
    shape's first call); ``"fma"`` where the one asked for does not take the call."""
    from qcompile.backends.triton import w4a16_gemv_mma as mma
    from qcompile.backends.triton import w4a16_gemv_tma as tma

    paths = ("fma",) + (("mma",) if mma.mma_eligible(x, group_size) else ()) + (
        ("tma",) if tma.tma_eligible(x, words, group_size) else ())
    want = kernel or {True: "mma", "tma": "tma"}.get(runtime.GEMV1_MMA)
    if want is not None:
        return want if want in paths else "fma"
    key = ("w4a16-gemv1", packed.shape[0], x.shape[-1], group_size, x.dtype, out_dtype,
           scale_neg is not None, outer is not None, bias is not None, x_scale is not None,
           None if fusion is None else fusion.prologue)
    return path_tuning.pick(key, "fma", paths, lambda p: w4a16_gemv1(
        x, packed, table, scale, scale_neg, None, outer, group_size, bias, True,
        x_scale=x_scale, out_dtype=out_dtype, kernel=p, fusion=fusion), x.device, cold=True)


def w4a16_gemv1(x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor,
                scale: torch.Tensor, scale_neg: torch.Tensor | None, zero: torch.Tensor | None,
                outer: torch.Tensor | None, group_size: int, bias: torch.Tensor | None,
                fp4: bool, split: int | None = None,
                config: triton.Config | None = None, x_scale: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, kernel: str | None = None,
                fusion: GemvFusion | None = None) -> torch.Tensor:
    """``y[1, N]`` for a validated, contiguous ``x[1, K]`` (see ``w4a16.w4a16_linear``).

    ``fp4``: ``table`` is the FP4 E2M1 table in code order, decoded with integer ops. On
    CUDA the autotuner picks the tile and the K split together, timing each on a cold L2 as a
    decode step reads weights; ``split`` fixes the split and ``config`` the tile (tuning
    sweeps, ``benchmarks/kernels_w4a16.py --sweep``). ``x_scale`` (one fp32 element) multiplies the
    sums after ``outer`` and before ``bias``; with it ``x`` may hold FP8 E4M3 codes (W4A8
    decoding: the codes are the activations up to that scale). ``out_dtype`` (default
    ``x``'s) is the result's dtype. The caller checks :func:`gemv1_eligible` and the inputs.
    FP4 words that the tensor-core kernel takes (``w4a16_gemv_mma``; not with a pinned split
    or config) go there with ``runtime.GEMV1_MMA`` True, those the TMA kernel takes
    (``w4a16_gemv_tma``) with ``"tma"``, and with ``"auto"`` to whichever of the three timed
    fastest on a cold L2 at the shape's first call
    (:mod:`qcompile.backends.triton.path_tuning`). ``kernel`` (``"fma"``, ``"mma"`` or
    ``"tma"``) forces one where it takes the call. ``fusion``: an RMSNorm or SiLU gate on ``x`` and a residual add on ``y`` done in the
    kernel (:mod:`qcompile.backends.triton.gemv_fusion`; checked by the caller, ``x`` and
    ``y`` in one dtype, no ``x_scale``).
    """
    words = _words(packed, x.shape[-1]) if fp4 and zero is None and _fp4w_configs(group_size) \
        else None
    if words is not None and split is None and config is None and kernel != "fma" and (
            kernel is not None or runtime.GEMV1_MMA is not False):
        use = _other_kernel(x, words, packed, table, scale, scale_neg, outer, group_size, bias,
                            x_scale, out_dtype, kernel, fusion)
        if use == "mma":
            from qcompile.backends.triton import w4a16_gemv_mma as mma

            return mma.w4a16_gemv1_mma(x, words, scale, scale_neg, outer, group_size, bias,
                                       x_scale=x_scale, out_dtype=out_dtype, fusion=fusion)
        if use == "tma":
            from qcompile.backends.triton import w4a16_gemv_tma as tma

            return tma.w4a16_gemv1_tma(x, words, scale, scale_neg, outer, group_size, bias,
                                       x_scale=x_scale, out_dtype=out_dtype, fusion=fusion)
    k = x.shape[-1]
    n, g = packed.shape[0], scale.shape[1]
    exact = interpreting()
    split, rows = _plan_split(split, config, n, k, x.device)
    out, part, counts = _split_buffers(x, n, out_dtype or x.dtype, rows)
    reduce = counts is not None
    neg = scale if scale_neg is None else scale_neg
    zer = scale if zero is None else zero
    out_t = scale if outer is None else outer
    bias_t = scale if bias is None else bias
    o_stride = 0 if outer is None or outer.shape[0] == 1 else 1
    grid = lambda meta: (cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    cfg = {} if exact else _pinned(config, split)
    xs = scale if x_scale is None else x_scale
    flags = dict(GROUP_SIZE=group_size, HAS_NEG=scale_neg is not None,
                 HAS_OUTER=outer is not None, HAS_BIAS=bias is not None,
                 HAS_XS=x_scale is not None, REDUCE=reduce, KIND=_DTYPE_KIND[out.dtype],
                 EXACT=exact)
    cnt = scale if counts is None else counts
    fused = fusion_args(fusion, 1, scale)
    flags.update(fused[1], **pdl.launch_flags(x.device))
    if words is not None:
        if exact:
            kern, cfg = _gemv1_fp4w_kernel, dict(_INTERP_FP4W, SPLIT=split)
            if fused[1]["PRO"]:  # as the autotuner's pruning keeps only staged tiles
                cfg["STAGE"] = True
            if not (group_size % cfg["BLOCK_K"] == 0 or cfg["BLOCK_K"] % group_size == 0):
                cfg["BLOCK_K"] = 64  # the interpreter's one config must fit the group too
        else:
            kern = _gemv1_fp4w_kernel if cfg else _tuned_fp4w(group_size, split)
        launch(kern, grid, x, words, scale, neg, out_t, bias_t, part, out, cnt, xs,
               *fused[0][:3], n, k, words.shape[1], g, o_stride, fused[0][3], **flags, **cfg)
    else:
        if exact:
            kern, cfg = _gemv1_kernel, dict(_INTERP, SPLIT=split)
        else:
            kern = _gemv1_kernel if cfg else _tuned(group_size, split)
        launch(kern, grid, x, packed, table, scale, neg, zer, out_t, bias_t, part, out, cnt, xs,
               *fused[0][:3], n, k, packed.shape[1], g, o_stride, fused[0][3],
               HAS_ZERO=zero is not None, FP4=fp4, **flags, **cfg)
    _sum_leftover_splits(kern, cfg, counts, part, bias_t, bias is not None, out, xs,
                         x_scale is not None, exact, fused)
    return out
