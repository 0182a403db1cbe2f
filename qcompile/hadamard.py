"""Hadamard matrices of many orders, their fast transform, and seeded orthogonal matrices.

Constructions (every one is checked to satisfy ``H @ H.T == n * I`` in integers):

* Sylvester: ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]`` for powers of two.
* Paley I: for a prime power ``q = 3 (mod 4)``, order ``q + 1`` (12, 20, 24, 28, 44, 48, 60, ...).
* Paley II: for a prime power ``q = 1 (mod 4)``, order ``2 (q + 1)`` (12, 20, 28, 36, 52, 60, ...).
* Kronecker: ``H_n = H_{2^k} (x) H_m`` for ``n = 2^k * m`` with ``m`` a Paley (or trivial) base
  order, so 576 = 16 * 36, 640 = 32 * 20, 960 = 16 * 60, 1536 = 128 * 12, 5120 = 256 * 20 and
  11008 = 32 * 344 (Paley I over GF(7^3)) all have one. :func:`hadamard_factors` picks the
  smallest base (the fast transform spends ``m`` multiply-adds per element on it).

The Jacobsthal matrices behind Paley's constructions use the quadratic character of the finite
field GF(q); prime powers are handled with polynomial arithmetic modulo an irreducible
polynomial found by search. Orders with no construction here (odd orders, 2 mod 4, and the
few multiples of 4 Paley misses, e.g. 92 and 172) have :func:`orthogonal_matrix` fall back
to a seeded random orthogonal matrix and say so.

The transform convention used everywhere in qcompile: a Hadamard rotation maps a row vector
``x`` to ``x @ H / sqrt(n)`` (see :func:`hadamard_transform`, the reference of the online
``qcompile::hadamard`` op).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from qcompile.device_cache import outside_graph_pools

__all__ = [
    "Rotation",
    "hadamard_base",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_transform",
    "has_hadamard",
    "orthogonal_matrix",
    "random_orthogonal",
    "random_signs",
]

# Largest Paley base order searched (bases this big cost m^2 to store and m per element).
MAX_BASE = 1024


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k`` and p prime, else None."""
    if q < 2:
        return None
    p = next(d for d in itertools.count(2) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p); coefficient lists, lowest degree first, ``f`` monic."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        lead = a[-1]
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree ``k`` over GF(p) (lowest degree first)."""
    for tail in itertools.product(range(p), repeat=k):
        f = [*tail, 1]
        if f[0] == 0:
            continue  # divisible by x
        if not any(
            not any(_polymod(f, [*g, 1], p))
            for d in range(1, k // 2 + 1)
            for g in itertools.product(range(p), repeat=d)
        ):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix ``J[i, j] = chi(a_i - a_j)`` of GF(q) (elements in base-p digit order)."""
    p, k = _prime_power(q)  # type: ignore[misc]
    # element i <-> digits[i]: coefficient of x^j in column j, i = sum_j digits[i, j] p^j
    digits = np.array(list(itertools.product(range(p), repeat=k)))[:, ::-1]
    weights = p ** np.arange(k)
    if k == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        f = _irreducible(p, k)
        squares = set()
        for row in digits[1:]:
            a = [int(c) for c in row]
            prod = [0] * (2 * k - 1)
            for i, ai in enumerate(a):
                for j, aj in enumerate(a):
                    prod[i + j] += ai * aj
            r = _polymod(prod, f, p) + [0] * k
            squares.add(int(sum(c * w for c, w in zip(r[:k], weights, strict=True))))
    chi = np.full(q, -1, dtype=np.int64)
    chi[0] = 0
    chi[sorted(squares)] = 1
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ weights]


def _paley1(q: int) -> np.ndarray:
    """Paley I Hadamard matrix of order ``q + 1`` (``q = 3 mod 4``)."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Paley II Hadamard matrix of order ``2 (q + 1)`` (``q = 1 mod 4``)."""
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, -1], [-1, -1]])) + np.kron(
        np.eye(n, dtype=np.int64), np.array([[1, 1], [1, -1]])
    )


def _base_builder(m: int):
    """How to build a base of order ``m``: a zero-argument function, or None."""
    if m == 1:
        return lambda: np.ones((1, 1), dtype=np.int64)
    if m == 2:
        return lambda: np.array([[1, 1], [1, -1]], dtype=np.int64)
    if m % 4 or m > MAX_BASE:
        return None
    pp = _prime_power(m - 1)
    if pp is not None and (m - 1) % 4 == 3:
        return lambda: _paley1(m - 1)
    pp = _prime_power(m // 2 - 1)
    if pp is not None and (m // 2 - 1) % 4 == 1:
        return lambda: _paley2(m // 2 - 1)
    return None


@functools.lru_cache(maxsize=64)
def hadamard_base(m: int) -> torch.Tensor:
    """The ``m x m`` base Hadamard matrix (int64 entries +-1), checked exactly.

    Raises:
        ValueError: No Sylvester/Paley construction of order ``m``.
    """
    builder = _base_builder(m)
    if builder is None:
        raise ValueError(f"no Hadamard base construction of order {m}")
    h = builder()
    if not np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64)):
        raise AssertionError(f"Hadamard base of order {m} failed H H^T = {m} I")
    return torch.from_numpy(h)


@functools.lru_cache(maxsize=1024)
def hadamard_factors(n: int) -> tuple[int, int] | None:
    """Factor ``n = 2^k * m`` with ``m`` a base order (smallest such ``m``), or None."""
    if n < 1:
        return None
    pow2 = n & -n
    while pow2 >= 1:
        m = n // pow2
        if _base_builder(m) is not None:
            return pow2, m
        pow2 //= 2
    return None


def has_hadamard(n: int) -> bool:
    """Whether a Hadamard matrix of order ``n`` can be built here."""
    return hadamard_factors(n) is not None


def hadamard_matrix(
    n: int, *, normalized: bool = True, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Dense Hadamard matrix ``H_{2^k} (x) H_m`` of order ``n``, divided by ``sqrt(n)`` if asked.

    Raises:
        ValueError: ``n`` has no construction here (see :func:`has_hadamard`).
    """
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} can be built (n = 2^k * m, m base)")
    pow2, m = factors
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < pow2:
        h = torch.kron(h2, h)
    h = torch.kron(h, hadamard_base(m).double())
    if normalized:
        h = h / math.sqrt(n)
    return h.to(dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` random +-1 values (float64) drawn from ``seed`` (global RNG untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Seeded random orthogonal ``n x n`` (float64): QR of a Gaussian, signs fixed by R's diag."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


@dataclass(frozen=True)
class Rotation:
    """An orthogonal matrix and how it was made; rotations map row vectors ``x -> x @ matrix``.

    Attributes:
        n: Order.
        method: ``"hadamard"``, ``"randomized-hadamard"`` or ``"random"``.
        description: Human-readable construction, e.g. ``"16 x 36 (Sylvester x Paley) *
            diag(signs, seed=0)"`` or ``"random orthogonal (fallback: no Hadamard of order 90)"``.
        signs: The +-1 diagonal of a randomized Hadamard (``H diag(signs) / sqrt(n)``), else None.
        dense: The matrix of the ``"random"`` method (Hadamard kinds build theirs on demand).
    """

    n: int
    method: str
    description: str
    signs: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def matrix(self) -> torch.Tensor:
        """The ``[n, n]`` float64 matrix."""
        if self.dense is not None:
            return self.dense
        h = hadamard_matrix(self.n)
        return h * self.signs if self.signs is not None else h

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ matrix`` over the last dim, in float64 (Kronecker factors for Hadamard kinds).

        Meant for folding into weights: each Kronecker factor (at most 128 wide, or the
        Paley base) is one batched matmul, which BLAS runs faster than a butterfly on CPU.
        """
        x = x.double().contiguous()
        if self.dense is not None:
            return x @ self.dense.to(x.device)
        pow2, m = hadamard_factors(self.n)
        sizes = []
        while pow2 > 1:
            sizes.append(min(pow2, 128))
            pow2 //= sizes[-1]
        sizes.append(m)
        y = x.reshape(-1, *sizes)
        for axis, size in enumerate(sizes, start=1):
            if size > 1:
                h = hadamard_matrix(size).to(x.device)
                y = torch.movedim(torch.movedim(y, axis, -1) @ h, -1, axis)
        y = y.reshape(x.shape).contiguous()
        return y * self.signs.to(x.device) if self.signs is not None else y


def orthogonal_matrix(n: int, kind: str, seed: int = 0) -> Rotation:
    """A seeded orthogonal matrix of order ``n``.

    Args:
        n: Order.
        kind: ``"hadamard"`` (``H / sqrt(n)``), ``"randomized-hadamard"``
            (``H diag(s) / sqrt(n)``, ``s`` random +-1 from ``seed``) or ``"random"``
            (:func:`random_orthogonal`). Hadamard kinds fall back to ``"random"`` when ``n``
            has no construction; the returned ``method`` and ``description`` say so.
        seed: Seed of the signs / Gaussian.

    Raises:
        ValueError: Unknown ``kind`` or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"order must be positive, got {n}")
    if kind not in ("hadamard", "randomized-hadamard", "random"):
        raise ValueError(f"unknown rotation kind {kind!r}; use hadamard, randomized-hadamard, random")
    factors = hadamard_factors(n)
    if kind == "random" or factors is None:
        why = "" if kind == "random" else f" (fallback: no Hadamard of order {n})"
        return Rotation(n, "random", f"random orthogonal{why}", dense=random_orthogonal(n, seed))
    pow2, m = factors
    desc = f"{pow2} x {m} (Sylvester x Paley)" if m > 2 else f"{n} (Sylvester)"
    if kind == "randomized-hadamard":
        return Rotation(n, kind, f"{desc} * diag(signs, seed={seed})", random_signs(n, seed))
    return Rotation(n, kind, desc)


@functools.lru_cache(maxsize=64)
def _normalized_base(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    base = hadamard_base(m).double() / math.sqrt(m)
    return outside_graph_pools(lambda: base.to(dtype=dtype, device=device), device)


def hadamard_transform(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x @ H_size / sqrt(size)`` over each trailing block of ``size`` of the last dim.

    The last dim (length ``D``, a multiple of ``size``) is viewed as ``[D / size, 2^k, m]``
    for ``size = 2^k * m``: the ``m x m`` base is applied with a small matmul, the ``2^k``
    factor with a fast Walsh-Hadamard butterfly (``k`` in-place stages), so no dense
    ``size x size`` matrix is formed. Half-precision inputs are transformed in float32 and
    rounded back; float32/float64 stay in their dtype.

    Raises:
        ValueError: ``size`` has no Hadamard construction or does not divide the last dim.
    """
    factors = hadamard_factors(size)
    if factors is None:
        raise ValueError(f"no Hadamard transform of order {size}")
    d = x.shape[-1]
    if d % size:
        raise ValueError(f"Hadamard size {size} does not divide the last dim {d}")
    pow2, m = factors
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = x.to(work).reshape(-1, pow2, m)
    if m > 1:
        y = y @ _normalized_base(m, work, x.device)
    else:
        y = y.clone()
    h = 1
    while h < pow2:
        v = y.view(y.shape[0], pow2 // (2 * h), 2, h, m)
        a, b = v[:, :, 0], v[:, :, 1]
        t = a.clone()
        a.add_(b)
        b.neg_().add_(t)
        h *= 2
    if pow2 > 1:
        y = y * (1.0 / math.sqrt(pow2))
    return y.reshape(x.shape).to(x.dtype)
