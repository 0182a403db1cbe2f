"""Hadamard constructions, seeded orthogonal matrices, and the online ``qcompile::hadamard`` op."""

from __future__ import annotations

import math

import pytest
import torch

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.hadamard)
from qcompile.hadamard import (
    hadamard_base,
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform,
    has_hadamard,
    orthogonal_matrix,
    random_orthogonal,
)

# Sylvester, Paley I (q = 3 mod 4), Paley II (q = 1 mod 4), prime powers, and Kronecker.
SIZES = [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 44, 52, 60, 64, 72, 96, 100, 108, 160, 576, 640,
         960, 1536]
LARGE = [2560, 3072, 5120, 11008, 14336]
NO_HADAMARD = [3, 5, 6, 7, 9, 10, 14, 15, 90, 92, 172]  # odd, 2 mod 4, or missed by Paley


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("m", [12, 20, 28, 36, 44, 52, 60, 100, 108, 344])
def test_base_is_hadamard_in_integers(m):
    h = hadamard_base(m)
    assert h.dtype == torch.int64 and set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64))


@pytest.mark.parametrize("n", SIZES)
def test_dense_matrix_orthogonal_fp64(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, _eye(n), rtol=0, atol=1e-12)
    unnorm = hadamard_matrix(n, normalized=False)
    assert set(unnorm.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("n", LARGE)
def test_large_orders_factor_and_rows_orthonormal(n):
    pow2, m = hadamard_factors(n)
    assert pow2 * m == n and pow2 & (pow2 - 1) == 0 and m <= 344
    rows = hadamard_transform(_eye(n)[:48], n)  # first 48 rows of H / sqrt(n)
    torch.testing.assert_close(rows @ rows.T, _eye(48), rtol=0, atol=1e-12)


def test_factorization_prefers_smallest_base():
    assert hadamard_factors(576) == (16, 36)
    assert hadamard_factors(640) == (32, 20)
    assert hadamard_factors(960) == (16, 60)
    assert hadamard_factors(1536) == (128, 12)
    assert hadamard_factors(64) == (64, 1)
    assert hadamard_factors(11008) == (32, 344)  # Paley I over GF(7^3)


@pytest.mark.parametrize("n", NO_HADAMARD)
def test_missing_orders_fall_back_to_random_orthogonal(n):
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match=f"order {n}"):
        hadamard_matrix(n)
    rot = orthogonal_matrix(n, "randomized-hadamard", seed=3)
    assert rot.method == "random" and "fallback" in rot.description
    torch.testing.assert_close(rot.matrix @ rot.matrix.T, _eye(n), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["hadamard", "randomized-hadamard", "random"])
@pytest.mark.parametrize("n", [12, 64, 96, 576])
def test_orthogonal_matrix_kinds(kind, n):
    rot = orthogonal_matrix(n, kind, seed=7)
    assert rot.method == kind
    torch.testing.assert_close(rot.matrix @ rot.matrix.T, _eye(n), rtol=0, atol=1e-12)


def test_seeds_are_deterministic_and_matter():
    a = orthogonal_matrix(96, "randomized-hadamard", seed=1).matrix
    assert torch.equal(a, orthogonal_matrix(96, "randomized-hadamard", seed=1).matrix)
    assert not torch.equal(a, orthogonal_matrix(96, "randomized-hadamard", seed=2).matrix)
    assert torch.equal(random_orthogonal(10, 5), random_orthogonal(10, 5))
    assert not torch.equal(random_orthogonal(10, 5), random_orthogonal(10, 6))
    g = torch.get_rng_state()
    orthogonal_matrix(64, "random", seed=0)
    assert torch.equal(g, torch.get_rng_state())  # the global RNG is untouched


def test_bad_kind_and_order():
    with pytest.raises(ValueError, match="unknown rotation kind"):
        orthogonal_matrix(8, "qr")
    with pytest.raises(ValueError, match="positive"):
        orthogonal_matrix(0, "hadamard")


@pytest.mark.parametrize("size,blocks", [(16, 1), (12, 1), (24, 4), (160, 1), (576, 1),
                                          (64, 9), (1536, 1)])
def test_online_op_equals_dense_matmul_fp64(size, blocks):
    x = torch.randn(2, 3, size * blocks, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    out = torch.ops.qcompile.hadamard(x, size)
    ref = (x.view(2, 3, blocks, size) @ hadamard_matrix(size)).view_as(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # orthonormal and a no-op on the input tensor
    torch.testing.assert_close(out.norm(), x.norm(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_online_op_dtypes(dtype, tol):
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = torch.ops.qcompile.hadamard(x, 96)
    assert out.dtype == dtype
    ref = x.double() @ hadamard_matrix(96)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_online_op_rejects_bad_sizes():
    with pytest.raises(ValueError, match="does not divide"):
        hadamard_transform(torch.zeros(2, 20), 16)
    with pytest.raises(ValueError, match="no Hadamard transform of order 10"):
        hadamard_transform(torch.zeros(2, 20), 10)


def test_online_op_opcheck():
    x = torch.randn(2, 5, 4, 24, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(torch.ops.qcompile.hadamard.default, (x, 24))
    torch.library.opcheck(torch.ops.qcompile.hadamard.default, (torch.randn(3, 64), 16))
    heads_first = torch.randn(1, 5, 4, 16).transpose(1, 2)  # [b, h, s, d] as attention sees q
    torch.library.opcheck(torch.ops.qcompile.hadamard.default, (heads_first, 16))


class _Rotated(torch.nn.Module):
    def forward(self, x):
        return torch.ops.qcompile.hadamard(torch.relu(x), 48) * 2


def test_online_op_survives_export_and_compile():
    m = _Rotated()
    x = torch.randn(2, 7, 96)
    ref = m(x)
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(m, (x,), dynamic_shapes={"x": {1: seq}})
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.qcompile.hadamard.default in targets
    torch.testing.assert_close(ep.module()(x), ref, rtol=0, atol=0)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ref, rtol=0, atol=0)
    x2 = torch.randn(2, 11, 96)
    torch.testing.assert_close(ep.module()(x2), m(x2), rtol=0, atol=0)


def test_normalization_is_inverse_for_symmetric_sylvester():
    x = torch.randn(5, 64, dtype=torch.float64)
    twice = hadamard_transform(hadamard_transform(x, 64), 64)
    torch.testing.assert_close(twice, x, rtol=0, atol=1e-12)
    assert math.isclose(float(hadamard_matrix(64)[0, 0]), 1 / 8)
