"""``@triton.jit`` helpers shared by the kernels (importing this module imports triton).

They round in fp32 with integer bit tricks and an fp32 add, never through a narrowing cast, so
a kernel gives the same bits on a GPU and under the interpreter (which truncates casts); the
rounded fp32 values are exact in the target type, so the final cast is exact everywhere.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rint(y):
    """Round fp32 to the nearest integer, ties to even, for |y| < 2^22."""
    big = 12582912.0  # 1.5 * 2^23: the fp32 add rounds the fraction away (RNE)
    return (y + big) - big


@triton.jit
def exp2i(e):
    """2^e as fp32 for int32 e in [-126, 127] (exact, from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def floor_log2(a):
    """floor(log2 a) for fp32 a >= 0 (0 and subnormals give <= -127)."""
    return (a.to(tl.int32, bitcast=True) >> 23) - 127


@triton.jit
def round_fp(y, FMAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr):
    """fp32 ``y`` rounded (RNE, saturating at +-FMAX) onto an ExMy grid, as fp32.

    EMIN is the smallest normal exponent (subnormal spacing 2^(EMIN - MBITS)).
    """
    a = tl.minimum(tl.abs(y), FMAX)
    e = tl.maximum(floor_log2(a), EMIN) - MBITS
    v = rint(a * exp2i(-e)) * exp2i(e)
    return tl.where(y < 0, -v, v)


@triton.jit
def round_fp8_e4m3(y):
    """fp32 onto the FP8 E4M3 grid (RNE, saturating at 448), as fp32: exact to cast."""
    return round_fp(y, 448.0, -6, 3)


@triton.jit
def round_fp4_e2m1(y):
    """fp32 onto the FP4 E2M1 grid (RNE, saturating at 6), as fp32. The grid's spacing is 0.5
    below 2, 1 below 4 and 2 up to 6; adding 1.5 * 2^23 times the spacing puts the sum where
    fp32's ulp is that spacing, so the add rounds (RNE) and the subtract is exact: about half
    of :func:`round_fp`'s instructions (no exponent extraction)."""
    a = tl.minimum(tl.abs(y), 6.0)
    big = tl.where(a < 2.0, 6291456.0, tl.where(a < 4.0, 12582912.0, 25165824.0))
    v = (a + big) - big
    return tl.where(y < 0, -v, v)


@triton.jit
def round_int(y, LO: tl.constexpr, HI: tl.constexpr):
    """fp32 rounded to an integer (RNE) and clamped to [LO, HI], as fp32."""
    return tl.minimum(tl.maximum(rint(y), LO), HI)


@triton.jit
def tile_coords(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of ``tile_id`` in grouped order: GROUP_M row blocks share a column sweep,
    so the weight tiles they read are still in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (tile_id // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % width) % size_m
    pid_n = (tile_id % width) // size_m
    return pid_m, pid_n


@triton.jit
def fp8_dot(a, b, acc, PROMOTE: tl.constexpr):
    """``acc + a @ b`` for FP8 tiles; PROMOTE > 0 adds the products into the fp32 ``acc`` every
    PROMOTE elements of K (sm_90's WGMMA accumulator keeps about 14 bits), 0 keeps them in the
    tensor core's accumulator (fast accumulation)."""
    if PROMOTE == 0:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE)
