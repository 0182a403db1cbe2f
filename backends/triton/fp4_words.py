"""FP4 E2M1 codes read as int32 words (8 codes a word): the ``@triton.jit`` pieces that decode
them in registers and multiply them, shared by the batch-1 GEMVs (the FMA word kernel of
:mod:`qcompile.backends.triton.w4a16_gemv`, the tensor-core and TMA kernels) and the prefill
decode.

A code's value is built as an fp16 bit pattern in units of 2^-14 (exact, subnormals included):
its three magnitude bits under the exponent's low end, its sign on bit 15, two codes per
32-bit word at once (:func:`_fp16_pair`). The group scales then multiply raw code sums
(:func:`_scaled_sums`), once per row and group.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__: list[str] = []  # private helpers, imported by name

# 0x8E008E00 as an int32 (Triton would widen the unsigned literal to int64): an fp16 pair's
# sign bits and the three bits under its exponent's low end (_fp16_pair).
_PAIR_BITS = tl.constexpr(-1912566272)
_PAIR_MAGS = tl.constexpr(0x0E000E00)
_SIGNS = tl.constexpr(-2147450880)  # 0x80008000
# Bits 1-3 of each byte: where _fp16_pair's staging words hold code magnitudes.
_STAGE_MAGS = tl.constexpr(0x0E0E0E0E)



@triton.jit
def _fp4_units(c):
    """FP4 E2M1 value of 4-bit ``c`` in units of 2^-14: the code's bits placed in an fp16."""
    h = ((c & 8) << 12) | ((c & 7) << 9)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp16_pair(w, NIB: tl.constexpr, MAG_ONLY: tl.constexpr, RESTAGE: tl.constexpr = True):
    """FP4 E2M1 nibbles ``NIB`` and ``NIB + 4`` of each int32 word as fp16 in units of 2^-14
    (exact, subnormals included); ``MAG_ONLY`` drops the signs (|value|).

    Both land in one 32-bit word as two fp16 bit patterns at once: the code's magnitude bits
    (bits 0-2 of the nibble) on fp16 bits 9-11, under the exponent's low end, and its sign
    (bit 3) on bit 15. A code's sign sits one bit above its magnitude where fp16 wants it four
    bits above. Two ways to get there, the same bits:

    * ``RESTAGE``: each word is first restaged into two words in which every code's sign is
      six bits above its magnitude's lowest bit (magnitudes in bits 1-3 of a byte, signs in
      bit 7), with one select each: ``u`` holds nibbles 2 and 6 in place and 0 and 4 one byte
      lower (from ``w << 1`` and ``w << 4``), ``v`` nibbles 3 and 7 in place and 1 and 5 one
      byte lower (from ``w >> 3`` and ``w``). A pair is then a mask, or a byte shift and a
      mask: 11 integer operations per word for its 8 codes (called for the four ``NIB`` of
      the same words in one block, the compiler computes ``u`` and ``v`` once). By the
      offline SASS census it saves 3-6 % of the FMA kernel's loop instructions and 6-9 % of
      the tensor-core kernel's.
    * otherwise each pair shifts and masks its magnitudes and, apart, its signs (16 operations
      per word), where the magnitude-only pair is a free step on the way to the signed one:
      the tensor-core AFPQ tile, which needs both, costs 3-7 % less this way.
    """
    if RESTAGE:
        if NIB % 2 == 0:
            z = ((w << 1) & _STAGE_MAGS) | ((w << 4) & ~_STAGE_MAGS)
        else:
            z = ((w >> 3) & _STAGE_MAGS) | (w & ~_STAGE_MAGS)
        if NIB < 2:
            z = z << 8
        t = z & (_PAIR_MAGS if MAG_ONLY else _PAIR_BITS)
    elif NIB < 3:
        t = (w << (9 - 4 * NIB)) & _PAIR_MAGS
        if not MAG_ONLY:
            t = t | ((w << (12 - 4 * NIB)) & _SIGNS)
    else:
        t = (w >> 3) & _PAIR_MAGS
        if not MAG_ONLY:
            t = t | (w & _SIGNS)
    lo = t.to(tl.int16).to(tl.float16, bitcast=True)
    hi = (t >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _fp4_pair(w, NIB: tl.constexpr):
    """:func:`_fp16_pair` (signed) as fp32: two fp16 -> fp32 conversions more."""
    lo, hi = _fp16_pair(w, NIB, False)
    return lo.to(tl.float32), hi.to(tl.float32)


@triton.jit
def _pair_products(s_acc, a_acc, w, NIB: tl.constexpr, x_lo, x_hi, HAS_NEG: tl.constexpr):
    """Nibbles ``NIB`` and ``NIB + 4`` of words ``w`` times their x: one fma per code into the
    signed sums (AFPQ: and into the magnitude sums)."""
    lo, hi = _fp4_pair(w, NIB)
    s_acc += lo * x_lo[None, :]
    s_acc += hi * x_hi[None, :]
    if HAS_NEG:
        a_acc += tl.abs(lo) * x_lo[None, :]
        a_acc += tl.abs(hi) * x_hi[None, :]
    return s_acc, a_acc


@triton.jit
def _staged_products(s_acc, a_acc, w, xv, HAS_NEG: tl.constexpr, WK: tl.constexpr):
    """:func:`_pair_products` of words ``w [BLOCK_N, WK]`` with the tile's x ``xv [8 WK]``,
    loaded once per element (prologue included) and split by nibble position; Triton moves
    the pieces to the tile's column layout (through shared memory)."""
    lo_b, hi_b = tl.split(tl.permute(tl.reshape(xv, [WK, 2, 2, 2]), (0, 2, 3, 1)))
    lo_0, lo_1 = tl.split(tl.permute(lo_b, (0, 2, 1)))
    hi_0, hi_1 = tl.split(tl.permute(hi_b, (0, 2, 1)))
    x0, x1 = tl.split(lo_0)
    x2, x3 = tl.split(lo_1)
    x4, x5 = tl.split(hi_0)
    x6, x7 = tl.split(hi_1)
    s_acc, a_acc = _pair_products(s_acc, a_acc, w, 0, x0, x4, HAS_NEG)
    s_acc, a_acc = _pair_products(s_acc, a_acc, w, 1, x1, x5, HAS_NEG)
    s_acc, a_acc = _pair_products(s_acc, a_acc, w, 2, x2, x6, HAS_NEG)
    s_acc, a_acc = _pair_products(s_acc, a_acc, w, 3, x3, x7, HAS_NEG)
    return s_acc, a_acc


@triton.jit
def _scaled_sums(s_acc, a_acc, scale_ptr, neg_ptr, offs_n, n_ok, k0, G,
                 GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """A K tile's contribution to the rows' sums (in 2^-14 units): each group's raw code sums
    (AFPQ: the signed sums S and magnitude sums A, positive part (S + A) / 2, negative
    (S - A) / 2) times the group's scales."""
    WK: tl.constexpr = BLOCK_K // 8
    GT: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    if GT > 1:
        g_idx = k0 // GROUP_SIZE + tl.arange(0, GT)
        g_off = offs_n[:, None] * G + g_idx[None, :]
        g_ok = n_ok[:, None] & (g_idx < G)[None, :]
        sg = tl.sum(tl.reshape(s_acc, [BLOCK_N, GT, WK // GT]), axis=2)
        eff = tl.load(scale_ptr + g_off, mask=g_ok, other=0.0)
        if HAS_NEG:
            ag = tl.sum(tl.reshape(a_acc, [BLOCK_N, GT, WK // GT]), axis=2)
            effn = tl.load(neg_ptr + g_off, mask=g_ok, other=0.0)
            out = 0.5 * tl.sum((sg + ag) * eff + (sg - ag) * effn, axis=1)
        else:
            out = tl.sum(sg * eff, axis=1)
    else:
        s_off = offs_n * G + k0 // GROUP_SIZE  # the tile lies in one group
        sg = tl.sum(s_acc, axis=1)
        eff = tl.load(scale_ptr + s_off, mask=n_ok, other=0.0)
        if HAS_NEG:
            ag = tl.sum(a_acc, axis=1)
            effn = tl.load(neg_ptr + s_off, mask=n_ok, other=0.0)
            out = 0.5 * ((sg + ag) * eff + (sg - ag) * effn)
        else:
            out = sg * eff
    return out
