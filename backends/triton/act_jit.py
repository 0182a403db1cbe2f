"""``@triton.jit`` helpers of the per-token activation quantize kernels (:mod:`act_quant` and
:mod:`had_quant`): rounding onto the output dtype, Sylvester matrices built from bit parities,
and the element rounding of :func:`qcompile.formats.scales.compute_scales`."""

from __future__ import annotations

import triton
import triton.language as tl

from qcompile.backends.triton.jit import round_fp, round_fp4_e2m1, round_fp8_e4m3, round_int

__all__ = ["nonzero_or_one", "round_bf16", "round_elem", "round_to", "sylvester"]


@triton.jit
def round_bf16(y):
    """fp32 rounded to the nearest bf16 (ties to even), as fp32: the bf16 cast is then exact."""
    b = y.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def round_to(y, XDT: tl.constexpr):
    """fp32 rounded onto the output dtype's grid (0 fp32, 1 bf16, 2 fp16), as fp32."""
    if XDT == 1:
        y = round_bf16(y)
    elif XDT == 2:
        y = round_fp(y, 65504.0, -14, 10)
    return y


@triton.jit
def sylvester(P: tl.constexpr, R: tl.constexpr):
    """``[P, P]`` fp32 Sylvester H_R (entry ``(-1)^popcount(i & j)``), zero-padded past R."""
    i = tl.arange(0, P)[:, None]
    j = tl.arange(0, P)[None, :]
    t = i & j
    t = t ^ (t >> 4)  # fold the parity of 8 bits into bit 0
    t = t ^ (t >> 2)
    t = t ^ (t >> 1)
    h = 1.0 - 2.0 * (t & 1).to(tl.float32)
    return tl.where((i < R) & (j < R), h, 0.0)


@triton.jit
def round_elem(y, ELEM: tl.constexpr, LMAX: tl.constexpr):
    """Scaled value onto the element grid: 0 fp8_e4m3, 1 fp4_e2m1, 2 int (sym, [-L-1, L])."""
    if ELEM == 0:
        v = round_fp8_e4m3(y)
    elif ELEM == 1:
        v = round_fp4_e2m1(y)
    else:
        v = round_int(y, -LMAX - 1.0, LMAX)
    return v


@triton.jit
def nonzero_or_one(s):
    return tl.where(s > 0, s, 1.0)  # a zero scale is stored as 1 (compute_scales)
