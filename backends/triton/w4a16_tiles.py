"""Tile-level ``@triton.jit`` pieces the W4A16 kernels share (:mod:`qcompile.backends.triton.w4a16`
and the GEMV, dequant and swap modules): rounding to the activation dtype, the group scales,
decoding a weight tile from its packed codes, and the split-K arrival counts and sums.

They live apart from the kernels so that each module stays small; the kernels' modules import
them by name (a ``@triton.jit`` function calls what its own module's globals hold).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__: list[str] = []  # private helpers, imported by name


@triton.jit
def _rne_bf16(y):
    """fp32 rounded to the nearest bf16 (ties to even), as fp32: exact to cast to bf16."""
    b = y.to(tl.int32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
    return tl.where(y != y, y, b.to(tl.float32, bitcast=True))  # keep NaN a NaN


@triton.jit
def _round_to(y, KIND: tl.constexpr, EXACT: tl.constexpr):
    """fp32 ``y`` rounded to the dtype of KIND (0 fp32, 1 bf16, 2 fp16), kept in fp32."""
    if KIND == 1:
        if EXACT:
            y = _rne_bf16(y)
        else:
            y = y.to(tl.bfloat16).to(tl.float32)
    elif KIND == 2:
        y = y.to(tl.float16).to(tl.float32)  # RNE on GPU and in the interpreter
    return y


@triton.jit
def _mul_rn(a, b, EXACT: tl.constexpr):
    """``a * b`` rounded on its own: on the GPU a plain product followed by an add may compile
    to one FMA, so an fp32 result plus a residual would miss the unfused ops' bits."""
    if EXACT:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def _group_eff(scale_ptr, neg_ptr, zero_ptr, outer_ptr, s_off, n_off, mask,
               HAS_NEG: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_OUTER: tl.constexpr):
    """(eff, eff_neg, zero) at scale offsets ``s_off``; ``eff = scale * outer`` as in fp32 torch."""
    eff = tl.load(scale_ptr + s_off, mask=mask, other=0.0)
    eff_neg = eff
    if HAS_NEG:
        eff_neg = tl.load(neg_ptr + s_off, mask=mask, other=0.0)
    if HAS_OUTER:
        o = tl.load(outer_ptr + n_off, mask=mask, other=0.0)
        eff = eff * o
        eff_neg = eff_neg * o
    z = eff * 0.0
    if HAS_ZERO:
        z = tl.load(zero_ptr + s_off, mask=mask, other=0.0)
    return eff, eff_neg, z


@triton.jit
def _decode(codes, table_ptr, eff, eff_neg, z, valid, HAS_NEG: tl.constexpr):
    """fp32 weights of 4-bit ``codes``: table lookup, zero point, (AFPQ) sign-chosen scale."""
    t = tl.load(table_ptr + codes.to(tl.int32))  # 16-entry gather: any codebook works
    if HAS_NEG:
        w = (t - z) * tl.where(t < 0, eff_neg, eff)
    else:
        w = (t - z) * eff
    return tl.where(valid, w, 0.0)  # padding nibbles and K tail contribute nothing


@triton.jit
def _pick_rows(t, idx, NG: tl.constexpr, GATHER: tl.constexpr):
    """``t[idx[i, j], j]`` of a small ``[NG, BLOCK_N]`` tile: ``tl.gather``, or NG selects
    (Triton 3.6 fails to compile the GEMV's gather + reduction: TritonGPUOptimizeThreadLocality)."""
    if GATHER:
        out = tl.gather(t, idx, 0)
    else:
        rows = tl.arange(0, NG)[:, None]
        out = tl.zeros_like(idx).to(tl.float32)
        for j in tl.static_range(NG):
            out = tl.where(idx == j, tl.sum(tl.where(rows == j, t, 0.0), axis=0)[None, :], out)
    return out


@triton.jit
def _decode_at(codes, table_ptr, e, en, z, idx, valid, HAS_NEG: tl.constexpr,
               HAS_ZERO: tl.constexpr, NG: tl.constexpr, GATHER: tl.constexpr):
    """:func:`_decode` with group parameters picked from ``[NG, BLOCK_N]`` rows ``idx``."""
    e_k = _pick_rows(e, idx, NG, GATHER)
    en_k = e_k
    z_k = e_k * 0.0
    if HAS_NEG:
        en_k = _pick_rows(en, idx, NG, GATHER)
    if HAS_ZERO:
        z_k = _pick_rows(z, idx, NG, GATHER)
    return _decode(codes, table_ptr, e_k, en_k, z_k, valid, HAS_NEG)


@triton.jit
def _weight_tile(packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr, outer_ptr,
                 k0, offs_n, N, K, KB, G, outer_stride,
                 GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_OUTER: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr):
    """Decoded fp32 weights ``[BLOCK_K/2, BLOCK_N]`` of elements k0+2j (lo) and k0+2j+1 (hi)."""
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    k_lo = 2 * kb
    k_hi = k_lo + 1
    n_ok = offs_n < N
    b_mask = (kb < KB)[:, None] & n_ok[None, :]
    byte = tl.load(packed_ptr + offs_n.to(tl.int64)[None, :] * KB + kb[:, None],
                   mask=b_mask, other=0)
    lo_ok = (k_lo < K)[:, None] & n_ok[None, :]
    hi_ok = (k_hi < K)[:, None] & n_ok[None, :]
    o_off = offs_n * outer_stride
    if GROUP_SIZE % BLOCK_K == 0:
        # k0 is a multiple of BLOCK_K, so the whole tile lies in one group: one scale per row.
        s_off = offs_n * G + k0 // GROUP_SIZE
        e, en, z = _group_eff(scale_ptr, neg_ptr, zero_ptr, outer_ptr, s_off, o_off, n_ok,
                              HAS_NEG, HAS_ZERO, HAS_OUTER)
        e, en, z = e[None, :], en[None, :], z[None, :]
        w_lo = _decode(byte & 0xF, table_ptr, e, en, z, lo_ok, HAS_NEG)
        w_hi = _decode(byte >> 4, table_ptr, e, en, z, hi_ok, HAS_NEG)
    else:
        # Load the few groups the tile touches as a small [NG, BLOCK_N] tile and expand it in
        # registers: per-element scale loads would be pipelined into shared memory (hundreds
        # of KB on sm_90) for every group size that does not tile BLOCK_K.
        NG: tl.constexpr = triton.next_power_of_2((BLOCK_K - 1) // GROUP_SIZE + 2)
        g0 = k0 // GROUP_SIZE
        gid = g0 + tl.arange(0, NG)
        g_ok = (gid < G)[:, None] & n_ok[None, :]
        e, en, z = _group_eff(scale_ptr, neg_ptr, zero_ptr, outer_ptr,
                              offs_n[None, :] * G + gid[:, None], o_off[None, :], g_ok,
                              HAS_NEG, HAS_ZERO, HAS_OUTER)
        idx = tl.broadcast_to((k_lo // GROUP_SIZE - g0)[:, None], byte.shape)
        w_lo = _decode_at(byte & 0xF, table_ptr, e, en, z, idx, lo_ok, HAS_NEG, HAS_ZERO, NG,
                          GATHER)
        if GROUP_SIZE % 2 == 1:  # an odd group size can split a byte's two codes
            idx = tl.broadcast_to((k_hi // GROUP_SIZE - g0)[:, None], byte.shape)
        w_hi = _decode_at(byte >> 4, table_ptr, e, en, z, idx, hi_ok, HAS_NEG, HAS_ZERO, NG,
                          GATHER)
    return w_lo, w_hi


@triton.jit
def _last_arrival(count_ptr, tile, SPLIT: tl.constexpr):
    """Whether this program is the last of ``SPLIT`` to store its partial of column tile
    ``tile``. Every thread's partial is stored before the arrival (a barrier, then one
    thread's gpu-scope acq_rel atomic), so the last arrival sees all of them; it must then
    read them through L2 (:func:`_sum_splits`) and zero the count (:func:`_reset_count`)."""
    tl.debug_barrier()
    return tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1


@triton.jit
def _reset_count(count_ptr, tile):
    tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _sum_splits(part_ptr, offs, mask, stride, SPLIT: tl.constexpr):
    """``sum_s part[s * stride + offs]`` in split order (deterministic), read through L2:
    other programs wrote the partials."""
    tot = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT):
        tot += tl.load(part_ptr + s * stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return tot


@triton.jit
def _rows_epilogue(acc, bias_ptr, out_ptr, xs_ptr, offs_m, m_ok, offs_n, offs, out_mask, N,
                   HAS_BIAS: tl.constexpr, HAS_XS: tl.constexpr, OUT_KIND: tl.constexpr,
                   EXACT: tl.constexpr):
    """``out = round(acc * xs[row] + bias)`` (the order of ``_splitk_reduce_kernel``)."""
    if HAS_XS:
        acc = acc * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    acc = _round_to(acc, OUT_KIND, EXACT)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
