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

from qcompile.backends.triton import path_tuning
from qcompile.backends.triton.cold_bench import cold_graph_bench
from qcompile.backends.triton.fp4_words import _fp4_pair
from qcompile.backends.triton.launch import launch, prepare
from qcompile.backends.triton.runtime import cdiv, element_table, interpreting, tuning
from qcompile.backends.triton.w4a16 import _DTYPE_KIND, _group_eff, _round_to, _weight_tile
from qcompile.backends.triton.w4a16_gemv import _words

__all__ = ["DEQUANT_MIN_M", "Fp4Decode", "fp4_decode", "gemm", "w4a16_dequant"]

#: Smallest M (flattened rows of ``x``) that decodes the weight and calls cuBLAS. Below it the
#: tiled GEMM, whose cost per row is lower when M is small; the crossover is not measured yet
#: (the H100 run measured M = 2048 only), so this is the prefill side of it.
DEQUANT_MIN_M = 256

_BLOCK_N = 64
#: The pair kernel's one tile (:func:`_dequant_fp4p_kernel`), 32 rows x 256 codes.
_FP4P_BLOCK_N, _FP4P_BLOCK_K = 32, 256
#: The FP4 kernels of :func:`w4a16_dequant`. The flat kernel is the default where nothing can
#: be timed: it won every shape the H200 timed (run 2 of ``gpu_h200_2026-11-27``); the pair
#: kernel is the default where the flat one cannot index the weight.
FP4_KERNELS = ("pairs", "words", "flat")
#: Words per program of the flat kernel (:func:`_dequant_fp4f_kernel`), autotuned on a cold L2.
FP4F_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w)
                for b, w in ((512, 4), (1024, 4), (1024, 8), (2048, 8))]
#: The flat kernel's config where it runs untimed (the first call inside a CUDA-graph
#: capture, where the autotuner cannot time; path timing off): 16 KiB of codes per program.
FP4F_UNTIMED = FP4F_CONFIGS[1]


def _fp4w_cfg(block_n: int, block_k: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps)


#: Tiles of the FP4 word kernel, autotuned on a cold L2 (a prefill reads each weight once):
#: 32 rows x 256 codes and tiles that give a program more or fewer bytes and warps. In the
#: offline sm_90 compile the 64 codes a thread owns in the 4-warp tiles of 8192 codes move
#: through shared memory as words only (3 barriers); the larger tiles take 7-11.
FP4W_CONFIGS = [_fp4w_cfg(32, 256, 4), _fp4w_cfg(16, 512, 4), _fp4w_cfg(64, 256, 4),
                _fp4w_cfg(32, 512, 4), _fp4w_cfg(64, 512, 8), _fp4w_cfg(128, 256, 8)]


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


@triton.jit
def _fp4_code(w, j):
    """Code ``j`` (nibble j: k = 8 * word + j) of int32 words ``w`` as fp32 in units of 2^-14
    (exact, subnormals included): the E2M1 magnitude bits placed under the fp16 exponent's low
    bits and the sign on the sign bit, read as fp16."""
    c = w >> (4 * j)
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant_fp4w_kernel(words_ptr, scale_ptr, neg_ptr, outer_ptr, w_ptr, N, K, KW, G,
                         outer_stride, GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr,
                         HAS_OUTER: tl.constexpr, KIND: tl.constexpr, EXACT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """FP4 E2M1 ``W[n, k]`` from int32 words (8 codes, k = 8 * word + nibble; a word lies in
    one group) for one ``[BLOCK_N, BLOCK_K]`` tile, as ``[BLOCK_N, NG, WPG, 8]``: NG scale
    groups of WPG words, each word's 8 codes in one thread's registers in K order, so the
    tile is stored as it is computed (16-byte stores) and only the words, a quarter of the
    output's bytes, change layout on the way in. One scale load per (row, group) in the
    tile. Each code is ``value * 2^-14`` (:func:`_fp4_code`) times ``scale * 2^14``: the same
    fp32 product as ``code * scale``, rounded to W's dtype."""
    WK: tl.constexpr = BLOCK_K // 8
    if BLOCK_K % GROUP_SIZE == 0:
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE
    elif GROUP_SIZE % BLOCK_K == 0:
        NG: tl.constexpr = 1
    else:
        NG: tl.constexpr = WK  # groups that do not tile BLOCK_K: a scale per word
    WPG: tl.constexpr = WK // NG
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rn = offs_n.to(tl.int64)
    w0 = tl.program_id(1) * WK + tl.arange(0, NG) * WPG  # each group's first word
    wcol = w0[:, None] + tl.arange(0, WPG)[None, :]  # [NG, WPG]
    w = tl.load(words_ptr + rn[:, None, None] * KW + wcol[None, :, :],
                mask=n_ok[:, None, None] & (wcol < KW)[None, :, :], other=0)
    gi = 8 * w0 // GROUP_SIZE  # a word lies in one group
    g_ok = n_ok[:, None] & (gi < G)[None, :]
    eff, effn, _ = _group_eff(scale_ptr, neg_ptr, scale_ptr, outer_ptr,
                              offs_n[:, None] * G + gi[None, :],
                              offs_n[:, None] * outer_stride + 0 * gi[None, :], g_ok, HAS_NEG,
                              False, HAS_OUTER)
    eff = (eff * 16384.0)[:, :, None, None]  # 2^14: the fp16 placement's unit
    effn = (effn * 16384.0)[:, :, None, None]
    j = tl.arange(0, 8)[None, None, None, :]
    v = _fp4_code(w[:, :, :, None], j)
    if HAS_NEG:
        y = v * tl.where(v < 0, effn, eff)
    else:
        y = v * eff
    y = _round_to(y, KIND, EXACT).to(w_ptr.dtype.element_ty)
    offs_k = 8 * wcol[None, :, :, None] + j
    tl.store(w_ptr + rn[:, None, None, None] * K + offs_k, y,
             mask=n_ok[:, None, None, None] & (offs_k < K))


@triton.jit
def _dequant_fp4p_kernel(words_ptr, scale_ptr, neg_ptr, outer_ptr, w_ptr, N, K, KW, G,
                         outer_stride, GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr,
                         HAS_OUTER: tl.constexpr, KIND: tl.constexpr, EXACT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_dequant_fp4w_kernel`'s output by pairs: codes j and j + 4 of each word decoded
    together as fp16 bit patterns (:func:`_fp4_pair`, value * 2^-14) times the word's scale *
    2^14, the 8 values joined in K order for one contiguous store per row. A scale load per
    word. This is the kernel the H100 prefill timed at 1.21 ms for the 16 weights of a
    4-layer Llama-3-8B (1.8 TB/s); the word kernel, fewer shared-memory barriers but more
    instructions per code offline, took 2.27 ms on an H200 (``benchmarks/results/
    gpu_h200_2026-11-27.md``). :func:`w4a16_dequant` times the FP4 kernels per shape."""
    WK: tl.constexpr = BLOCK_K // 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    wcol = tl.program_id(1) * WK + tl.arange(0, WK)
    w_ok = n_ok[:, None] & (wcol < KW)[None, :]
    w = tl.load(words_ptr + offs_n.to(tl.int64)[:, None] * KW + wcol[None, :], mask=w_ok,
                other=0)
    eff, effn, _ = _group_eff(scale_ptr, neg_ptr, scale_ptr, outer_ptr,
                              offs_n[:, None] * G + (8 * wcol // GROUP_SIZE)[None, :],
                              offs_n[:, None] * outer_stride + 0 * wcol[None, :], w_ok, HAS_NEG,
                              False, HAS_OUTER)
    eff = eff * 16384.0  # 2^14: the fp16 placement's unit
    effn = effn * 16384.0
    ty = w_ptr.dtype.element_ty
    lo0, hi0 = _fp4_pair(w, 0)
    lo1, hi1 = _fp4_pair(w, 1)
    lo2, hi2 = _fp4_pair(w, 2)
    lo3, hi3 = _fp4_pair(w, 3)
    # Element j of a word: j < 4 is pair j's low code, j >= 4 pair j - 4's high code. The
    # joins build axes (d0, d1, d2) with j = 4 d0 + 2 d1 + d2.
    p0 = _scaled(lo0, eff, effn, HAS_NEG, KIND, EXACT, ty)
    p1 = _scaled(lo1, eff, effn, HAS_NEG, KIND, EXACT, ty)
    p2 = _scaled(lo2, eff, effn, HAS_NEG, KIND, EXACT, ty)
    p3 = _scaled(lo3, eff, effn, HAS_NEG, KIND, EXACT, ty)
    p4 = _scaled(hi0, eff, effn, HAS_NEG, KIND, EXACT, ty)
    p5 = _scaled(hi1, eff, effn, HAS_NEG, KIND, EXACT, ty)
    p6 = _scaled(hi2, eff, effn, HAS_NEG, KIND, EXACT, ty)
    p7 = _scaled(hi3, eff, effn, HAS_NEG, KIND, EXACT, ty)
    even = tl.join(tl.join(p0, p4), tl.join(p2, p6))
    odd = tl.join(tl.join(p1, p5), tl.join(p3, p7))
    vals = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], vals,
             mask=n_ok[:, None] & (offs_k < K)[None, :])


@triton.jit
def _scaled(v, eff, effn, HAS_NEG: tl.constexpr, KIND: tl.constexpr, EXACT: tl.constexpr,
            ty: tl.constexpr):
    """``v * eff`` (AFPQ: ``effn`` for negative ``v``), rounded to W's dtype."""
    if HAS_NEG:
        y = v * tl.where(v < 0, effn, eff)
    else:
        y = v * eff
    return _round_to(y, KIND, EXACT).to(ty)


_dequant_fp4w_tuned = triton.autotune(
    FP4W_CONFIGS, key=["N", "K", "GROUP_SIZE"],
    prune_configs_by=tuning(None, _dequant_fp4w_kernel), do_bench=cold_graph_bench)(
    _dequant_fp4w_kernel)


@triton.jit
def _dequant_fp4f_kernel(words_ptr, scale_ptr, neg_ptr, outer_ptr, w_ptr, N, K, KW, G,
                         outer_stride, GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr,
                         HAS_OUTER: tl.constexpr, KIND: tl.constexpr, EXACT: tl.constexpr,
                         BLOCK: tl.constexpr):
    """:func:`_dequant_fp4w_kernel`'s output with the weight taken as one flat run of words
    (K = 8 KW, so word ``i``'s codes are ``W``'s elements 8i..8i+7): ``BLOCK`` consecutive
    words per program, each word's 8 codes decoded in one lane and stored as 16 contiguous
    bytes, with no tile (only the vector-loaded words pass through shared memory). Its row and
    group come from the word's index (int32: the wrapper keeps ``N * KW`` below 2^31). On an
    H200 it decoded at 2.9-3.9 TB/s where the pair kernel reached 1.7-1.8 and the word kernel
    0.9 (``benchmarks/results/gpu_h200_2026-11-27.md``, run 2)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N * KW
    w = tl.load(words_ptr + offs, mask=ok, other=0)
    row = offs // KW
    eff, effn, _ = _group_eff(scale_ptr, neg_ptr, scale_ptr, outer_ptr,
                              row * G + 8 * (offs - row * KW) // GROUP_SIZE,
                              row * outer_stride, ok, HAS_NEG, False, HAS_OUTER)
    eff = (eff * 16384.0)[:, None]  # 2^14: the fp16 placement's unit
    effn = (effn * 16384.0)[:, None]
    j = tl.arange(0, 8)[None, :]
    v = _fp4_code(w[:, None], j)
    if HAS_NEG:
        y = v * tl.where(v < 0, effn, eff)
    else:
        y = v * eff
    y = _round_to(y, KIND, EXACT).to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + 8 * offs.to(tl.int64)[:, None] + j, y, mask=ok[:, None])


_dequant_fp4f_tuned = triton.autotune(
    FP4F_CONFIGS, key=["N", "K", "GROUP_SIZE"],
    prune_configs_by=tuning(None, _dequant_fp4f_kernel), do_bench=cold_graph_bench)(
    _dequant_fp4f_kernel)


def _fp4_words(packed: torch.Tensor, table: torch.Tensor, zero: torch.Tensor | None,
               group_size: int, k: int) -> torch.Tensor | None:
    """``packed`` as int32 words when the FP4 word kernel can decode it: the cached FP4 table
    (recognized by identity, no device sync), no zero point, and groups of whole words."""
    if zero is not None or group_size % 8 or table is not element_table("fp4_e2m1",
                                                                        table.device):
        return None
    return _words(packed, k)


def _fp4_call(kernel: str, flags: dict, n: int, k: int, kw: int,
              tuned: bool = True) -> tuple:
    """``(kernel function, grid, keyword arguments)`` of the FP4 ``kernel`` (``"pairs"``,
    ``"words"`` or ``"flat"``) for an ``n x k`` weight of ``kw`` words per row.
    ``tuned=False``: the flat kernel with :data:`FP4F_UNTIMED` instead of its autotuner
    (which would time its configs)."""
    exact = interpreting()
    if kernel == "flat":
        if exact:
            return _dequant_fp4f_kernel, (cdiv(n * kw, 512),), dict(
                flags, EXACT=True, BLOCK=512, num_warps=4)
        if not tuned:
            block = FP4F_UNTIMED.kwargs["BLOCK"]
            return _dequant_fp4f_kernel, (cdiv(n * kw, block),), dict(
                flags, EXACT=False, BLOCK=block, num_warps=FP4F_UNTIMED.num_warps)
        return _dequant_fp4f_tuned, lambda meta: (cdiv(n * kw, meta["BLOCK"]),), dict(
            flags, EXACT=False)
    if kernel == "pairs":
        return _dequant_fp4p_kernel, (cdiv(n, _FP4P_BLOCK_N), cdiv(k, _FP4P_BLOCK_K)), dict(
            flags, EXACT=exact, BLOCK_N=_FP4P_BLOCK_N, BLOCK_K=_FP4P_BLOCK_K, num_warps=4)
    if exact:  # one tile: autotuning is meaningless under the interpreter
        meta = FP4W_CONFIGS[0].kwargs
        return _dequant_fp4w_kernel, (cdiv(n, meta["BLOCK_N"]), cdiv(k, meta["BLOCK_K"])), \
            dict(flags, EXACT=True, **meta, num_warps=4)
    return _dequant_fp4w_tuned, lambda meta: (cdiv(n, meta["BLOCK_N"]),
                                              cdiv(k, meta["BLOCK_K"])), dict(flags,
                                                                              EXACT=False)


def gemm(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2 @ w.T (+ bias)``: the product ``torch.nn.functional.linear`` runs for 2-D
    inputs (the same cuBLAS call), with two fewer dispatches."""
    if bias is None:
        return torch.mm(x2, w.t())
    return torch.addmm(bias, x2, w.t())


class Fp4Decode:
    """One weight's FP4 word-kernel launch in one dtype: everything but the output, built once
    (:func:`fp4_decode`). A compiled model decodes the same weight at every prefill, so the
    per-weight plans of :mod:`qcompile.backends.triton.w4a16_plan` keep one."""

    __slots__ = ("args", "tail", "flags", "paths", "key", "n", "k", "dtype", "device", "ready")

    def __init__(self, words, scale, neg, outer, n, k, g, group_size, dtype) -> None:
        o_stride = 0 if outer is None or outer.shape[0] == 1 else 1
        self.args = (words, scale, scale if neg is None else neg,
                     scale if outer is None else outer)
        self.tail = (n, k, words.shape[1], g, o_stride)
        self.flags = dict(GROUP_SIZE=group_size, HAS_NEG=neg is not None,
                          HAS_OUTER=outer is not None, KIND=_DTYPE_KIND[dtype])
        # The flat kernel indexes words with int32s (a block's worth of headroom).
        self.paths = FP4_KERNELS if n * words.shape[1] < 2**31 - 2**16 else FP4_KERNELS[:2]
        self.key = ("w4a16-dequant-fp4", n, k, group_size, dtype, neg is not None,
                    outer is not None)
        self.n, self.k, self.dtype, self.device = n, k, dtype, words.device
        self.ready: dict = {}  # kernel -> its prepared launch

    def into(self, w: torch.Tensor, kernel: str, tuned: bool = True,
             keep: bool = False) -> torch.Tensor:
        """Decode into ``w`` (``[N, K]`` in the dtype) with ``kernel``; returns ``w``.
        ``keep``: prepare the launch for :meth:`run` (after it, when it can be fixed)."""
        fn, grid, kwargs = _fp4_call(kernel, self.flags, self.n, self.k, self.tail[2], tuned)
        args = (*self.args, w, *self.tail)
        launch(fn, grid, *args, **kwargs)
        if keep:
            ready = prepare(fn, grid, *args, **kwargs)
            if ready is not None:  # kept per weight: it must not keep this call's output
                self.ready[kernel] = ready.vary("w_ptr")
        return w

    def run(self, kernel: str) -> torch.Tensor:
        """The decoded weight, by ``kernel`` (one of :attr:`paths`, a timed choice): its
        launch prepared (:func:`~qcompile.backends.triton.launch.prepare`) once it has run."""
        w = torch.empty(self.n, self.k, dtype=self.dtype, device=self.device)
        ready = self.ready.get(kernel)
        if ready is None:
            return self.into(w, kernel, keep=True)
        ready(w_ptr=w)
        return w


def fp4_decode(packed: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
               scale_neg: torch.Tensor | None, zero: torch.Tensor | None,
               outer: torch.Tensor | None, group_size: int, k: int,
               dtype: torch.dtype) -> Fp4Decode | None:
    """The FP4 word kernels' launch for this weight (inputs as :func:`w4a16_dequant` takes
    them), or None when they cannot decode it (:func:`_fp4_words`) or it is empty."""
    n = packed.shape[0]
    words = _fp4_words(packed, table, zero, group_size, k) if n and k else None
    if words is None:
        return None
    return Fp4Decode(words, scale, scale_neg, outer, n, k, scale.shape[1], group_size, dtype)


def w4a16_dequant(packed: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                  scale_neg: torch.Tensor | None, zero: torch.Tensor | None,
                  outer: torch.Tensor | None, group_size: int, k: int,
                  dtype: torch.dtype, kernel: str | None = None) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype`` (``dequantize`` in fp32, then rounded to ``dtype``).

    Inputs as validated by :func:`~qcompile.backends.triton.w4a16.w4a16_linear` (contiguous,
    on one Triton device). FP4 weights in whole words have three kernels, ``"pairs"``
    (:func:`_dequant_fp4p_kernel`), ``"words"`` (:func:`_dequant_fp4w_kernel`) and ``"flat"``
    (:func:`_dequant_fp4f_kernel`, the default where nothing can be timed, with a fixed
    config): ``kernel`` forces one; None times them on a cold L2 at the first call of each
    shape on a GPU and keeps the fastest
    (:func:`~qcompile.backends.triton.path_tuning.pick`).
    """
    n, g = packed.shape[0], scale.shape[1]
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return w
    dec = fp4_decode(packed, table, scale, scale_neg, zero, outer, group_size, k, dtype)
    if dec is not None:
        paths = dec.paths
        if kernel is not None and kernel not in paths:
            raise ValueError(f"w4a16_dequant: kernel must be one of {paths} for a {n} x {k} "
                             f"weight, got {kernel!r}")
        tuned = True
        if kernel is None:
            kernel = path_tuning.choice(dec.key)
            if kernel is None:
                default = "flat" if "flat" in paths else "pairs"
                kernel = path_tuning.pick(dec.key, default, paths, lambda p: dec.into(w, p),
                                          packed.device, cold=True)
                # Nothing was timed (a capture, timing off): no autotuning either.
                tuned = path_tuning.choice(dec.key) is not None
        return dec.into(w, kernel, tuned)
    o_stride = 0 if outer is None or outer.shape[0] == 1 else 1
    block_k = _block_k(group_size)
    grid = (cdiv(n, _BLOCK_N), cdiv(k, block_k))
    launch(
        _dequant_kernel, grid, packed, table, scale, scale if scale_neg is None else scale_neg,
        scale if zero is None else zero, scale if outer is None else outer, w,
        n, k, packed.shape[1], g, o_stride, GROUP_SIZE=group_size,
        HAS_NEG=scale_neg is not None, HAS_ZERO=zero is not None, HAS_OUTER=outer is not None,
        KIND=_DTYPE_KIND[dtype], EXACT=interpreting(), BLOCK_N=_BLOCK_N, BLOCK_K=block_k,
        num_warps=4)
    return w
