"""Decode attention: one query row per head against a KV cache, each key/value head read once.

``decode_attention(q, k, v, mask, scale)`` computes ``scaled_dot_product_attention(q, K, V,
mask, scale)`` where ``K``/``V`` repeat each of ``k``/``v``'s heads for the ``G = Hq / Hkv``
query heads that share it (grouped-query attention, Hugging Face's ``repeat_kv``), for ``q``
of one row (a decode step). The graph it replaces materializes the repeated cache (two copy
kernels per layer and token, ``G`` times the cache's bytes) and builds an additive mask for
the attention kernel; here a program reads one kv head's keys and values once for its ``G``
query heads, and a boolean mask is read as it is (broadcast views included). Given the rotary
tables (``cos``/``sin``), the kernel also rotates the queries itself (Hugging Face's
``apply_rotary_pos_emb``), which the graph did in a kernel of its own.

Kernel. Grid ``(batch * Hkv, NSPLIT)``: program ``(p, s)`` takes the ``s``-th of ``NSPLIT``
runs of ``BLOCK_L``-position blocks of the cache (flash-decoding). Per block, one ``tl.dot``
gives the ``[G, BLOCK_L]`` scores (the ``G`` rows padded to at least 16), an online softmax
in base 2 keeps the running maximum and sum, and a second ``tl.dot`` adds ``p @ v``. A block
whose mask is false everywhere (a static cache's positions past the current one; ``-inf``
for an additive mask) loads no keys or values. ``AHEAD`` (:data:`CONFIGS`) issues the loads
ahead: the next block's mask while a block computes and a block's values with its keys (one
memory round trip per block instead of three in a row, which is most of a short cache's
time), and at level 2 the next block's keys and values too. Split runs store ``(max, sum,
acc)`` in fp32; the last program of a kv head to arrive (an arrival count,
:func:`qcompile.backends.triton.runtime.arrival_counts`) combines them in split order, in the
same launch, so the result does not depend on which arrives last.

Numerics. The products run on fp32 tiles: TF32 tensor-core products for bf16/fp16 caches,
whose values TF32 holds exactly (only ``p`` rounds, to TF32's 10 fraction bits, where flash
attention rounds it to the cache's dtype), three-pass TF32 (``tf32x3``) for fp32 caches; the
sums are fp32. A decode step's attention is bound by the cache reads, not by these products.
Rows with every position masked give zeros, as PyTorch's math attention does. The reference
is :func:`qcompile.backends.triton.ops.decode_attention_ref`, the composition the graph held
(``qcompile::decode_attention``'s CPU implementation).

Tuning. The autotuner times configs on a cold L2
(:func:`qcompile.backends.triton.cold_bench.cold_graph_bench`): in a decode step the other
layers' weights have evicted this layer's cache lines. The number of runs per kv head is
timed the same way at each shape's first call (:func:`_tuned_splits`): a short cache may be
faster in one run, with no combine.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qcompile.backends.triton import path_tuning, pdl
from qcompile.backends.triton.cold_bench import cold_graph_bench
from qcompile.backends.triton.decode_attention_inputs import (
    CACHE_DTYPES,
    MAX_GROUP,
    MAX_HEAD_DIM,
    MAX_HEAD_DIM_FP32,
    CacheWrite,
    broadcast_strides,
    kernel_fits,
)
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import (
    KernelInputError,
    arrival_counts,
    check_tensor,
    interpreting,
    sm_count,
    tuning,
)
from qcompile.backends.triton.w4a16 import _last_arrival, _reset_count

__all__ = ["CONFIGS", "MAX_GROUP", "MAX_HEAD_DIM", "MAX_HEAD_DIM_FP32", "MAX_SPLITS",
           "CacheWrite", "decode_attention", "kernel_fits", "run_checked"]

#: Runs per kv head: 8 kv heads x 32 fill an H100's 132 SMs about twice; the last arrival
#: reads every run's [G, DV] partial back through L2, a few runs per load.
MAX_SPLITS = 32
_LOG2E = 1.4426950408889634

#: Autotune configs (CUDA): cache positions per block, warps, and ``AHEAD``, how far ahead a
#: block's loads are issued. A block's loads sit under a data-dependent branch (masked-off
#: blocks load nothing), which Triton does not pipeline, and the score dot's barriers keep a
#: value load written after it behind the softmax, so with 0 a block takes three memory round
#: trips in a row (mask, keys, values; the offline sm_90 SASS shows them in that order). 1
#: loads the next block's mask while a block computes and a block's values with its keys: one
#: round trip per block. 2 also loads the next block's keys and values during this block's
#: products (masked off where that block is dead, so a static cache's unused positions are
#: still never read): the round trips overlap the work. Each level holds more tiles in
#: registers: in the offline sm_90 compile (tests/test_triton_compile_sm90.py) 1 spilled at
#: 128 positions and at 2 warps, so those configs use 0, and 2 is tried at 32 positions x 4
#: warps and 64 x 8 (the prune drops it where :func:`_tile_cost` says it would spill).
CONFIGS = [
    triton.Config({"BLOCK_L": bl, "AHEAD": ahead}, num_warps=w, num_stages=2)
    for bl, w, ahead in ((32, 2, 0), (32, 4, 1), (32, 4, 2), (64, 4, 1), (64, 8, 1),
                         (64, 8, 2), (128, 4, 0), (128, 8, 0))
]


def _tile_cost(config, block_g: int, block_d: int, fp32: bool) -> float:
    """Tile elements per thread: the key/value tile in a dot (fp32 caches: four times, for
    the split operands of their three-pass products), the tiles ``AHEAD`` holds as loaded
    (1: the value tile through the score dot; 2: also the next block's keys and values,
    counted twice), the query and accumulator tiles, and the score and probability tiles. In
    the offline sm_90 compile (tests/test_triton_compile_sm90.py, 2026-11-28) of every config
    for the Llama head dims (64, 128, 256; 1 to 64 query heads per kv head) every config
    that spilled cost 256 or more, and none below it spilled."""
    bl = config.kwargs["BLOCK_L"]
    tile = bl * block_d
    kv = tile * (4 if fp32 else 1) + tile * (0, 1, 4)[config.kwargs.get("AHEAD", 0)]
    return (kv + 2 * block_g * block_d + 2 * block_g * bl) / (32 * config.num_warps)


def _prune(configs, named_args, **kwargs):
    """Configs whose tiles fit in registers (:func:`_tile_cost`; the cheapest if none does),
    with blocks no longer than one split's share of the cache (rounded up to a power of two,
    at least 32): a longer block only loads positions past the end."""
    d = max(kwargs["BLOCK_DK"], kwargs["BLOCK_DV"])
    fp32 = kwargs["PREC"] == "tf32x3"
    cost = {id(c): _tile_cost(c, kwargs["BLOCK_G"], d, fp32) for c in configs}
    fit = [c for c in configs if cost[id(c)] < 256] or [min(configs, key=lambda c: cost[id(c)])]
    share = triton.next_power_of_2(max(1, -(-named_args["L"] // kwargs["NSPLIT"])))
    return [c for c in fit if c.kwargs["BLOCK_L"] <= max(32, share)] or fit[:1]


@triton.jit
def _rope(x, x2_ptrs, low, ok, cos_ptrs, sin_ptrs):
    """``x * cos + cat(-x2, x1) * sin`` in fp32: ``x2_ptrs`` point at each element's partner
    in the other half, ``low`` marks the first half (where the partner is negated)."""
    x2 = tl.load(x2_ptrs, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptrs, mask=ok, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptrs, mask=ok, other=0.0).to(tl.float32)
    return x.to(tl.float32) * c + tl.where(low, -x2, x2) * sn


@triton.jit
def _mask_block(m_base, offs_l, end, g_ok, sm_l, MASK: tl.constexpr):
    """The mask of positions ``offs_l`` (boolean as int32, additive as fp32), those at or past
    ``end`` masked off."""
    ok = g_ok[:, None] & (offs_l < end)[None, :]
    ptrs = m_base + offs_l[None, :] * sm_l
    if MASK == 1:
        mb = tl.load(ptrs, mask=ok, other=0).to(tl.int32)
    else:
        mb = tl.load(ptrs, mask=ok, other=float("-inf")).to(tl.float32)
    return mb


@triton.jit
def _live(mb, MASK: tl.constexpr):
    """Whether a block's mask ``mb`` lets any query head attend to any of its positions."""
    if MASK == 1:
        live = tl.max(tl.max(mb, 1), 0) > 0
    else:
        live = tl.max(tl.max(mb, 1), 0) > float("-inf")
    return live


@triton.jit
def _prefetch_block(k_base, v_base, L, DK, DV, sk_l, sk_d, sv_l, sv_d, BLOCK_L: tl.constexpr,
                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Ask L2 for the keys and values of positions ``0 .. BLOCK_L - 1``: every 16th element
    of each row (a 128-byte line holds 32 or more of a 2- or 4-byte dtype, so no line is
    missed)."""
    pos = tl.minimum(tl.arange(0, BLOCK_L), L - 1)[:, None]
    dk = tl.minimum(tl.arange(0, BLOCK_DK // 16) * 16, DK - 1)[None, :]
    dv = tl.minimum(tl.arange(0, BLOCK_DV // 16) * 16, DV - 1)[None, :]
    pdl.prefetch(k_base + pos * sk_l + dk * sk_d)
    pdl.prefetch(v_base + pos * sv_l + dv * sv_d)


@triton.jit
def _run_partials(ml_ptr, part_ptr, runs, offs_g, offs_dv, BLOCK_G: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """Split runs ``runs``' maxima ``[R, G]`` and partial sums ``[R, G, DV]`` (through L2:
    other programs stored them)."""
    m = tl.load(ml_ptr + (runs * 2 * BLOCK_G)[:, None] + offs_g[None, :], cache_modifier=".cg")
    a = tl.load(part_ptr + ((runs * BLOCK_G)[:, None, None] + offs_g[None, :, None]) * BLOCK_DV
                + offs_dv[None, None, :], cache_modifier=".cg")
    return m, a


@triton.jit
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, cos_ptr, sin_ptr, out_ptr, part_ptr, ml_ptr, count_ptr,
    L, HKV, G, DK, DV, qk_scale,
    sq_b, sq_h, sq_d,
    sk_b, sk_h, sk_l, sk_d,
    sv_b, sv_h, sv_l, sv_d,
    sm_b, sm_h, sm_l,
    sc_b, sc_h, sc_d, ss_b, ss_h, ss_d,
    idx_ptr, kn_ptr, vn_ptr, kcos_ptr, ksin_ptr,
    skn_b, skn_h, skn_d, svn_b, svn_h, svn_d, skc_b, skc_h, skc_d, sks_b, sks_h, sks_d,
    MASK: tl.constexpr,  # 0 none, 1 boolean (true attends), 2 additive
    ROPE: tl.constexpr,  # rotate the queries (cos/sin) first
    WRITE: tl.constexpr,  # write the new key/value row at idx into the cache first
    KROPE: tl.constexpr,  # rotate the new key (kcos/ksin) before writing it
    NSPLIT: tl.constexpr,
    PREC: tl.constexpr,  # "tf32" (exact for bf16/fp16 values) or "tf32x3" (fp32 caches)
    BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_L: tl.constexpr,
    AHEAD: tl.constexpr,  # 0, 1, 2: how far ahead a block's loads are issued (CONFIGS)
    PDL: tl.constexpr = False,  # a programmatic dependent launch (pdl)
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    if PDL:  # nothing a kernel writes is read before release()
        if sid == 0:  # the first block of the first run: live whenever a position is
            _prefetch_block(k_base, v_base, L, DK, DV, sk_l, sk_d, sv_l, sv_d, BLOCK_L,
                            BLOCK_DK, BLOCK_DV)
        pdl.release()
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    heads = hk * G + offs_g
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < DK
    dv_ok = offs_dv < DV
    q_rows = q_ptr + b * sq_b + heads[:, None] * sq_h
    q_ok = g_ok[:, None] & dk_ok[None, :]
    q = tl.load(q_rows + offs_dk[None, :] * sq_d, mask=q_ok, other=0.0)
    low = offs_dk < DK // 2  # rotary halves: each element's partner in the other half
    partner = tl.where(low, offs_dk + DK // 2, offs_dk - DK // 2)
    if ROPE:  # in fp32, rounded once to q's dtype (as Inductor's kernel for the graph did)
        q = _rope(q, q_rows + partner[None, :] * sq_d, low[None, :], q_ok,
                  cos_ptr + b * sc_b + heads[:, None] * sc_h + offs_dk[None, :] * sc_d,
                  sin_ptr + b * ss_b + heads[:, None] * ss_h + offs_dk[None, :] * ss_d,
                  ).to(q_ptr.dtype.element_ty)
    q = q.to(tl.float32)
    m_base = mask_ptr + b * sm_b + heads[:, None] * sm_h

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    per_split = tl.cdiv(tl.cdiv(L, BLOCK_L), NSPLIT) * BLOCK_L
    start = sid * per_split
    end = tl.minimum(start + per_split, L)
    if WRITE:  # this kv head's new row, as the cache holds it
        pos = tl.load(idx_ptr).to(tl.int32)
        kn_rows = kn_ptr + b * skn_b + hk * skn_h
        kn = tl.load(kn_rows + offs_dk * skn_d, mask=dk_ok, other=0.0)
        if KROPE:
            kn = _rope(kn, kn_rows + partner * skn_d, low, dk_ok,
                       kcos_ptr + b * skc_b + hk * skc_h + offs_dk * skc_d,
                       ksin_ptr + b * sks_b + hk * sks_h + offs_dk * sks_d)
        kn = kn.to(k_ptr.dtype.element_ty)
        vn = tl.load(vn_ptr + b * svn_b + hk * svn_h + offs_dv * svn_d, mask=dv_ok,
                     other=0.0).to(v_ptr.dtype.element_ty)
        # Only the run holding ``pos`` reads that row: it stores the row and uses it from
        # registers below, so no program reads a row another one writes.
        if (pos >= start) & (pos < end):
            tl.store(k_base + pos * sk_l + offs_dk * sk_d, kn, mask=dk_ok)
            tl.store(v_base + pos * sv_l + offs_dv * sv_d, vn, mask=dv_ok)
        kn = kn.to(tl.float32)
        vn = vn.to(tl.float32)
    # AHEAD (CONFIGS): 1, the next block's mask loads while this one computes, and each
    # block's values with its keys; 2, also the next block's keys and values (masked off,
    # no memory traffic, where that block is dead), in flight during this block's products.
    ar = tl.arange(0, BLOCK_L)
    kv_k = offs_dk[None, :] * sk_d
    kv_v = offs_dv[None, :] * sv_d
    if AHEAD >= 1 and MASK != 0:
        mb_next = _mask_block(m_base, start + ar, end, g_ok, sm_l, MASK)
    if AHEAD == 2:
        live_next = True
        if MASK != 0:
            live_next = _live(mb_next, MASK)
            mb_after = _mask_block(m_base, start + BLOCK_L + ar, end, g_ok, sm_l, MASK)
        lim = tl.where(live_next, end, start)  # a dead block: every position masked off
        ok = (start + ar < lim)[:, None]
        kt_next = tl.load(k_base + (start + ar)[:, None] * sk_l + kv_k,
                          mask=ok & dk_ok[None, :], other=0.0)
        vt_next = tl.load(v_base + (start + ar)[:, None] * sv_l + kv_v,
                          mask=ok & dv_ok[None, :], other=0.0)
    for l0 in range(start, end, BLOCK_L):
        offs_l = l0 + ar
        l_ok = offs_l < end
        live = True
        if MASK != 0:
            if AHEAD == 0:
                mb = _mask_block(m_base, offs_l, end, g_ok, sm_l, MASK)
            else:
                mb = mb_next
                if AHEAD == 1:
                    mb_next = _mask_block(m_base, offs_l + BLOCK_L, end, g_ok, sm_l, MASK)
                else:
                    mb_next = mb_after
                    mb_after = _mask_block(m_base, offs_l + 2 * BLOCK_L, end, g_ok, sm_l,
                                           MASK)
        if AHEAD == 2:
            live = live_next
            if MASK != 0:
                live_next = _live(mb_next, MASK)
            kt = kt_next
            vt = vt_next
            nxt = offs_l + BLOCK_L
            ok = (nxt < tl.where(live_next, end, l0))[:, None]
            kt_next = tl.load(k_base + nxt[:, None] * sk_l + kv_k, mask=ok & dk_ok[None, :],
                              other=0.0)
            vt_next = tl.load(v_base + nxt[:, None] * sv_l + kv_v, mask=ok & dv_ok[None, :],
                              other=0.0)
        elif MASK != 0:
            live = _live(mb, MASK)
        if live:
            v_ptrs = v_base + offs_l[:, None] * sv_l + kv_v
            v_ok = l_ok[:, None] & dv_ok[None, :]
            if AHEAD < 2:
                kt = tl.load(k_base + offs_l[:, None] * sk_l + kv_k,
                             mask=l_ok[:, None] & dk_ok[None, :], other=0.0)
            if AHEAD == 1:
                vt = tl.load(v_ptrs, mask=v_ok, other=0.0)
            kf = kt.to(tl.float32)
            if WRITE:
                kf = tl.where((offs_l == pos)[:, None], kn[None, :], kf)
            s = tl.dot(q, tl.trans(kf), input_precision=PREC)
            s = s * qk_scale
            if MASK == 1:
                s = tl.where(mb != 0, s, float("-inf"))
            elif MASK == 2:
                s = s + mb * 1.4426950408889634
            s = tl.where(l_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if AHEAD == 0:
                vt = tl.load(v_ptrs, mask=v_ok, other=0.0)
            vf = vt.to(tl.float32)
            if WRITE:
                vf = tl.where((offs_l == pos)[:, None], vn[None, :], vf)
            acc = acc * alpha[:, None] + tl.dot(p, vf, input_precision=PREC)
            m_i = m_new

    out_offs = (b * HKV * G + heads)[:, None] * DV + offs_dv[None, :]
    out_mask = g_ok[:, None] & dv_ok[None, :]
    if NSPLIT == 1:
        res = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(out_ptr + out_offs, res.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials: part[p, s, g, d] and ml[p, s, 0 | 1, g].
        slot = pid * NSPLIT + sid
        tl.store(part_ptr + (slot * BLOCK_G + offs_g)[:, None] * BLOCK_DV + offs_dv[None, :],
                 acc)
        tl.store(ml_ptr + slot * 2 * BLOCK_G + offs_g, m_i)
        tl.store(ml_ptr + slot * 2 * BLOCK_G + BLOCK_G + offs_g, l_i)
        if _last_arrival(count_ptr, pid, NSPLIT):
            # Every run's (max, sum) in one load, the partial sums a few runs per load: a
            # handful of L2 round trips, not three per run. The maxima and the sums load
            # together, and with small partials (HOIST) the first runs' partials too, before
            # the reductions whose barriers would hold back a load written after them: one
            # round trip for up to four runs. (Larger partials held through the reductions
            # spilled in the offline sm_90 compile at head dim 256.) A run with no live block
            # has max -inf (weight 0) and stored zeros, so it adds exact zeros. The sums go in
            # a fixed order: the same bits whichever program arrives last.
            first = pid * NSPLIT
            ml_rows = ((first + tl.arange(0, NSPLIT)) * 2 * BLOCK_G)[:, None] + offs_g[None, :]
            if BLOCK_G * BLOCK_DV <= 2048:  # runs per load: at most 64 partials per thread
                CHUNK: tl.constexpr = 4 if NSPLIT >= 4 else NSPLIT
                HOIST: tl.constexpr = CHUNK
            elif BLOCK_G * BLOCK_DV <= 4096:
                CHUNK: tl.constexpr = 2
                HOIST: tl.constexpr = 0
            else:
                CHUNK: tl.constexpr = 1
                HOIST: tl.constexpr = 0
            m_s = tl.load(ml_ptr + ml_rows, cache_modifier=".cg")
            l_s = tl.load(ml_ptr + ml_rows + BLOCK_G, cache_modifier=".cg")
            if HOIST:
                m_c, a_c = _run_partials(ml_ptr, part_ptr, first + tl.arange(0, CHUNK), offs_g,
                                         offs_dv, BLOCK_G, BLOCK_DV)
            m_all = tl.max(m_s, 0)
            m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
            den = tl.sum(l_s * tl.exp2(m_s - m_all[None, :]), 0)
            tot = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
            if HOIST:
                tot += tl.sum(a_c * tl.exp2(m_c - m_all[None, :])[:, :, None], 0)
            for c in range(HOIST, NSPLIT, CHUNK):
                m_c, a_c = _run_partials(ml_ptr, part_ptr, first + c + tl.arange(0, CHUNK),
                                         offs_g, offs_dv, BLOCK_G, BLOCK_DV)
                tot += tl.sum(a_c * tl.exp2(m_c - m_all[None, :])[:, :, None], 0)
            res = tl.where(den[:, None] > 0, tot / tl.where(den > 0, den, 1.0)[:, None], 0.0)
            tl.store(out_ptr + out_offs, res.to(out_ptr.dtype.element_ty), mask=out_mask)
            _reset_count(count_ptr, pid)


_decode_attn_tuned = triton.autotune(
    configs=CONFIGS,
    key=["HKV", "G", "DK", "DV", "MASK", "ROPE", "WRITE", "KROPE", "NSPLIT", "PREC"],
    prune_configs_by=tuning(_prune, _decode_attn_kernel), do_bench=cold_graph_bench,
)(_decode_attn_kernel)


# --- wrapper ---------------------------------------------------------------------------------

def _splits(programs: int, length: int, device: torch.device) -> int:
    """Runs of the cache per kv head: enough programs to fill the GPU twice over, no more runs
    than 64-position blocks, a power of two (each value is one compile), at most MAX_SPLITS."""
    if interpreting() or device.type != "cuda":
        return 2 if length > 32 else 1  # exercise the combine under the interpreter
    want = min(-(-2 * sm_count(device) // programs), -(-length // 64), MAX_SPLITS)
    return triton.next_power_of_2(max(1, want))


def _tuned_splits(q, k, v, mask, scale, cos, sin, write, default: int) -> int:
    """The run count for this call's shape: ``default`` (:func:`_splits`), one run (no
    combine: fewer round trips where the cache is short) or a quarter of ``default``, timed
    on a cold L2 at the shape's first call on a GPU (``path_tuning``; ``default`` where
    nothing can be timed). Rerunning a candidate rewrites the same cache row: no change.

    The key holds the cache length as its count of 64-position blocks rounded up to a power
    of two, the bucket within which :func:`_splits` gives one default: a dynamic cache grows
    by a position per decode step, and a key per length would time the candidates again at
    every step."""
    if default == 1:
        return 1
    blocks = triton.next_power_of_2(-(-k.shape[2] // 64))
    key = ("decode-attention", *q.shape, k.shape[1], blocks, v.shape[3], q.dtype,
           None if mask is None else mask.dtype, cos is not None, write is not None)
    hit = path_tuning.choice(key)
    if hit is not None:
        return int(hit)
    names = tuple(dict.fromkeys(str(s) for s in (default, 1, max(1, default // 4))))
    return int(path_tuning.pick(key, names[0], names, lambda p: run_checked(
        q, k, v, mask, scale, int(p), None, cos, sin, write), q.device, cold=True))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None, scale: float | None = None,
                     splits: int | None = None, block_l: int | None = None,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                     write: CacheWrite | None = None,
                     ahead: int | None = None) -> torch.Tensor:
    """Attention of one query row per head over a KV cache (module docstring).

    Args:
        q: ``[B, Hq, 1, DK]`` bf16/fp16/fp32, any strides.
        k: ``[B, Hkv, L, DK]``, ``Hq`` a multiple of ``Hkv``, any strides (the cache).
        v: ``[B, Hkv, L, DV]``.
        mask: None, boolean (true attends) or additive, broadcastable to ``[B, Hq, 1, L]``.
        scale: Score scale (default ``1 / sqrt(DK)``).
        splits: Runs of the cache per kv head (default: sized to the GPU, or one run or a
            quarter of that where it timed faster at the shape's first call); tests pin it.
        block_l: Cache positions per block (default: autotuned; 32 under the interpreter).
        cos, sin: Rotary tables broadcastable to ``q`` (both or neither): the queries are
            ``rope(q, cos, sin)`` (:func:`qcompile.backends.triton.ops.rope`), computed in
            fp32 and rounded to ``q``'s dtype in the kernel.
        write: A new key/value row to write into ``k``/``v`` first (:class:`CacheWrite`):
            the caches are updated in place and the attention sees the row. A position
            outside the cache writes nothing.
        ahead: With ``block_l`` (or under the interpreter): how far ahead the block loop
            issues its loads, 0, 1 or 2 (:data:`CONFIGS`; default 1 up to 64 positions per
            block, else 0); the same bits at every level. Tests pin it.

    Returns:
        ``[B, Hq, 1, DV]`` in ``q``'s dtype.

    Raises:
        KernelInputError: Inputs the kernel does not take (the message says which).
    """
    dev = q.device
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, CACHE_DTYPES, ndim=4, device=dev)
    if mask is not None:
        check_tensor(mask, "mask", (torch.bool, *CACHE_DTYPES), device=dev)
    if (cos is None) != (sin is None):
        raise KernelInputError("decode_attention: give both cos and sin or neither")
    tables = (("cos", cos), ("sin", sin))
    if write is not None:
        tables += (("index", write.index), ("k_new", write.k_new), ("v_new", write.v_new),
                   ("k_cos", write.k_cos), ("k_sin", write.k_sin))
    for name, t in tables:
        if t is not None:
            check_tensor(t, name, (*CACHE_DTYPES, torch.int64, torch.int32), device=dev)
    why = kernel_fits(q, k, v, mask, cos, sin, write)
    if why is not None:
        raise KernelInputError(f"decode_attention: {why}")
    return run_checked(q, k, v, mask, scale, splits, block_l, cos, sin, write, ahead)


def run_checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None, scale: float | None = None,
                splits: int | None = None, block_l: int | None = None,
                cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                write: CacheWrite | None = None, ahead: int | None = None) -> torch.Tensor:
    """:func:`decode_attention` for inputs :func:`kernel_fits` has passed, on one device
    (the ``qcompile::`` ops check once and come here)."""
    dev = q.device
    b, hq, _, dk = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    if scale is None:
        scale = 1.0 / math.sqrt(dk)
    out = torch.empty((b, hq, 1, dv), dtype=q.dtype, device=dev)
    if b == 0 or hq == 0:
        return out
    programs = b * hkv
    if splits is None and block_l is None:
        splits = _tuned_splits(q, k, v, mask, scale, cos, sin, write, _splits(programs, n, dev))
    nsplit = splits or _splits(programs, n, dev)
    if ahead not in (None, 0, 1, 2):
        raise KernelInputError(f"decode_attention: ahead must be 0, 1 or 2, got {ahead!r}")
    if nsplit < 1 or nsplit & (nsplit - 1) or nsplit > MAX_SPLITS:
        raise KernelInputError(f"decode_attention: splits must be a power of two <= "
                               f"{MAX_SPLITS}, got {nsplit}")
    counts = arrival_counts(dev, programs) if nsplit > 1 else None
    if counts is None:
        nsplit = 1  # no arrival counts (e.g. first call inside a CUDA-graph capture): one run
    block_g = max(16, triton.next_power_of_2(g))
    bdk, bdv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    if nsplit > 1:
        part = torch.empty((programs * nsplit * block_g * bdv,), dtype=torch.float32, device=dev)
        ml = torch.empty((programs * nsplit * 2 * block_g,), dtype=torch.float32, device=dev)
    else:
        part = ml = out
    kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    mptr, (ms_b, ms_h, ms_l) = broadcast_strides(mask, (b, hq, 1, n), q)
    cptr, cs = broadcast_strides(cos, (b, hq, 1, dk), q)
    sptr, ss = broadcast_strides(sin, (b, hq, 1, dk), q)
    # Without a write the kernel reads none of these: q stands in for their pointers.
    index, k_new, v_new, k_cos, k_sin = (
        (q, None, None, None, None) if write is None
        else (write.index, write.k_new, write.v_new, write.k_cos, write.k_sin))
    kv_new = (b, hkv, 1, dk)
    knptr, kns = broadcast_strides(k_new, kv_new, q)
    vnptr, vns = broadcast_strides(v_new, (b, hkv, 1, dv), q)
    kcptr, kcs = broadcast_strides(k_cos, kv_new, q)
    ksptr, kss = broadcast_strides(k_sin, kv_new, q)
    args = (q, k, v, mptr, cptr, sptr, out, part, ml, counts if counts is not None else out,
            n, hkv, g, dk, dv, float(scale) * _LOG2E,
            q.stride(0), q.stride(1), q.stride(3),
            *k.stride(), *(v.stride(i) for i in (0, 1, 2, 3)), ms_b, ms_h, ms_l, *cs, *ss,
            index, knptr, vnptr, kcptr, ksptr, *kns, *vns, *kcs, *kss)
    meta = dict(MASK=kind, ROPE=cos is not None, WRITE=write is not None,
                KROPE=k_cos is not None, NSPLIT=nsplit,
                PREC="tf32x3" if q.dtype == torch.float32 else "tf32",
                BLOCK_G=block_g, BLOCK_DK=bdk, BLOCK_DV=bdv)
    meta.update(pdl.launch_flags(dev, attention=True))
    grid = (programs, nsplit)
    if block_l is not None or interpreting():
        bl = block_l or 32
        launch(_decode_attn_kernel, grid, *args, **meta, BLOCK_L=bl,
               AHEAD=int(bl <= 64) if ahead is None else int(ahead), num_warps=4)
    else:
        launch(_decode_attn_tuned, grid, *args, **meta)
    return out
