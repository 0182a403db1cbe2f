"""The test harness's fma for old Triton interpreters rounds once, like the GPU's."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from interpreter_compat import fma_rounded_once


def _round_fraction(v: Fraction, mbits: int, emin: int) -> float:
    """``v`` rounded to nearest-even on a binary grid of ``mbits`` fraction bits, subnormals
    below ``2^emin`` (no overflow in these tests)."""
    if v == 0:
        return 0.0
    sign = -1 if v < 0 else 1
    a = abs(v)
    e = max(math.floor(math.log2(a.numerator) - math.log2(a.denominator)), emin)
    while Fraction(2) ** e > a and e > emin:  # log2 of huge ints can be off by one
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    step = Fraction(2) ** (e - mbits)
    q, r = divmod(a, step)
    if r * 2 > step or (r * 2 == step and q % 2 == 1):
        q += 1
    return sign * float(q * step)


def _exact(x, y, z, mbits, emin):
    return np.array([_round_fraction(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)),
                                     mbits, emin) for a, b, c in zip(x, y, z, strict=True)])


def _near_ties(rng, n, dtype, mbits):
    """``x * y + z`` whose exact value lies within a few float64 ulps of a tie of ``dtype``:
    where a multiply rounded to float64 and an add rounded again go wrong."""
    x = rng.uniform(1, 2, n).astype(dtype)
    y = rng.uniform(1, 2, n).astype(dtype)
    p = x.astype(np.float64) * y.astype(np.float64)
    # z cancels p's top bits and leaves the tail just past a half step of the result.
    z = (-np.floor(p * 2.0**mbits) / 2.0**mbits).astype(dtype)
    return x, y, z


def test_fma_is_rounded_once_fp32():
    rng = np.random.default_rng(0)
    n = 4000
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    y = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    z = -(x.astype(np.float64) * y.astype(np.float64)).astype(np.float32)  # heavy cancellation
    z[::2] = (rng.standard_normal(n // 2) * 8).astype(np.float32)
    nx, ny, nz = _near_ties(rng, n, np.float32, 23)
    x, y, z = (np.concatenate(t) for t in ((x, nx), (y, ny), (z, nz)))
    got = fma_rounded_once(x, y, z)
    want = _exact(x, y, z, 23, -126)
    assert got.dtype == np.float32
    assert np.array_equal(got.astype(np.float64), want)
    # The product rounded before the add (the old interpreters' fma) misses some of them.
    assert not np.array_equal((x * y + z).astype(np.float64), want)


def test_fma_is_rounded_once_fp16_and_broadcasts():
    rng = np.random.default_rng(1)
    x = rng.uniform(-4, 4, 2000).astype(np.float16)
    y = np.float16(1.0009766)  # 1 + 2^-10
    z = rng.uniform(-4, 4, 2000).astype(np.float16)
    got = fma_rounded_once(x, np.full_like(x, y), z)
    assert got.dtype == np.float16
    want = _exact(x, np.full_like(x, y), z, 10, -14)
    assert np.array_equal(got.astype(np.float64), want)


def test_fma_keeps_specials():
    x = np.array([np.inf, np.nan, 1.0, 0.0, -0.0], np.float32)
    y = np.array([1.0, 1.0, np.inf, 5.0, 5.0], np.float32)
    z = np.array([1.0, 1.0, -np.inf, -0.0, -0.0], np.float32)
    got = fma_rounded_once(x, y, z)
    assert got[0] == np.inf and np.isnan(got[1]) and np.isnan(got[2])
    assert got[3] == 0 and not np.signbit(got[3]) and np.signbit(got[4])
