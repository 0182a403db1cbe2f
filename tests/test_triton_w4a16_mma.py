"""The tensor-core batch-1 FP4 GEMV (``w4a16_gemv_mma``): numerics against the reference and the
FMA kernel, the per-tile power of two that takes x to fp16, eligibility, split-K sums."""

from __future__ import annotations

import pytest
import torch
from test_triton_w4a16 import (
    CUDA,
    DEV,
    _inputs,
    _Spy,
    _spy_tuned,
    assert_matches_unrounded,
)

from qcompile.backends.triton import w4a16 as w4
from qcompile.backends.triton import w4a16_gemv as g1
from qcompile.backends.triton import w4a16_gemv_mma as mm

FORMATS = ["fp4_e2m1/g128/asym", "fp4_e2m1/g64", "fp4_e2m1/g64/m2", "fp4_e2m1/channel"]


def _fp4(fmt, n, k, dtype, bias=True, seed=0):
    x, w, b = _inputs(fmt, 1, n, k, dtype, bias=bias, seed=seed)
    w = (w[0], w4.element_table("fp4_e2m1", x.device), *w[2:])
    return x, w, b, g1._words(w[0], k)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", [1, 3])
def test_matches_the_reference(fmt, dtype, split):
    """Every FP4 scale kind, bf16 and fp16, a ragged last K tile (K = 1088; per channel
    1024), rows past a tile (N = 72), with a bias, unsplit and split."""
    k = 1024 if fmt.endswith("channel") else 1088
    x, w, b, words = _fp4(fmt, 72, k, dtype)
    assert mm.mma_eligible(x, w[6])
    out = mm.w4a16_gemv1_mma(x, words, w[2], w[3], w[5], w[6], b, split=split)
    assert out.dtype == dtype and out.shape == (1, 72)
    assert_matches_unrounded(out, w4.w4a16_linear_ref(x, *w, bias=b), x, w)


def test_activations_beyond_fp16_range():
    """bf16 activations up to 2^40 and down to 2^-60 in one row, and an all-zero K tile: the
    per-tile power of two keeps each tile's values exact in fp16 (the sums match the
    reference as closely as with ordinary activations)."""
    x, w, b, words = _fp4("fp4_e2m1/g128/asym", 72, 1024, torch.bfloat16, seed=1)
    gen = torch.Generator().manual_seed(2)
    mag = 2.0 ** torch.randint(-60, 41, (1, 1024), generator=gen).float()
    x = (x.float().cpu() * mag).to(torch.bfloat16).to(DEV)
    x[:, 256:384] = 0  # one tile of zeros (BLOCK_K <= 128)
    x[:, 0] = 2.0 ** 100  # far beyond fp16's 65504
    out = mm.w4a16_gemv1_mma(x, words, w[2], w[3], w[5], w[6], b)
    ref = w4.w4a16_linear_ref(x, *w, bias=b)
    assert torch.isfinite(out).all()
    assert_matches_unrounded(out, ref, x, w)


def test_w4a8_codes_match_the_fma_kernel():
    """W4A8 at batch 1: FP8 E4M3 codes, a scale for them, power-of-two group scales and a row
    scale, bf16 out: the same sums as the FMA kernel up to summation order."""
    x, w, b, words = _fp4("fp4_e2m1/g128", 96, 2048, torch.bfloat16)
    codes = (x.float() * 16).clamp(-448, 448).to(torch.float8_e4m3fn)
    xs = torch.tensor([1 / 16], device=DEV)
    pow2 = torch.exp2(torch.round(torch.log2(w[2])))
    outer = torch.rand(96, 1, generator=torch.Generator().manual_seed(3)).to(DEV) + 0.5
    got = mm.w4a16_gemv1_mma(codes, words, pow2, None, outer, 128, b, x_scale=xs,
                             out_dtype=torch.bfloat16)
    want = g1.w4a16_gemv1(codes, w[0], w[1], pow2, None, None, outer, 128, b, True,
                          x_scale=xs, out_dtype=torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7,
                               atol=want.float().abs().max().item() * 2**-9)


def test_eligibility():
    x, w, _, _ = _fp4("fp4_e2m1/g128", 16, 256, torch.bfloat16, bias=False)
    assert mm.mma_eligible(x, 128)
    assert not mm.mma_eligible(x.float(), 128)  # fp32 would round to fp16
    assert not mm.mma_eligible(torch.cat([x, x]), 128)  # two rows
    assert not mm.mma_eligible(x, 24)  # no tile's BLOCK_K divides 24
    if not CUDA:
        assert mm.mma_eligible(x, 96)  # the interpreter's BLOCK_K = 32 divides it
    assert not mm._mma_configs(96) or all(96 % c.kwargs["BLOCK_K"] == 0
                                          for c in mm._mma_configs(96))


@pytest.mark.parametrize("split", [2, 5])
def test_split_sums_in_place_or_by_the_reduce_kernel(monkeypatch, split):
    """Split-K partials summed by each column tile's last program (no second launch, counts
    left at zero) give the same bits as the reduce kernel."""
    from qcompile.backends.triton import runtime

    x, w, b, words = _fp4("fp4_e2m1/g128/asym", 200, 2048, torch.bfloat16)
    spy = _Spy(g1._splitk_reduce_kernel)  # the launch the GEMVs share
    monkeypatch.setattr(g1, "_splitk_reduce_kernel", spy)
    fused = mm.w4a16_gemv1_mma(x, words, w[2], w[3], w[5], w[6], b, split=split)
    assert spy.launches == 0
    monkeypatch.setattr(runtime, "FUSED_REDUCE", False)
    separate = mm.w4a16_gemv1_mma(x, words, w[2], w[3], w[5], w[6], b, split=split)
    assert spy.launches == 1
    assert torch.equal(fused, separate)


@pytest.mark.skipif(not CUDA, reason="needs CUDA: every tile on the GPU")
def test_every_tile_matches_the_reference():
    x, w, b, words = _fp4("fp4_e2m1/g128/asym", 200, 4096, torch.bfloat16)
    ref = w4.w4a16_linear_ref(x, *w, bias=b)
    for config in mm._mma_configs(128):
        for split in (1, 4):
            out = mm.w4a16_gemv1_mma(x, words, w[2], w[3], w[5], w[6], b, split=split,
                                     config=config)
            assert_matches_unrounded(out, ref, x, w)


def test_runtime_flag_routes_batch1_fp4_to_tensor_cores(monkeypatch):
    """With ``runtime.GEMV1_MMA`` on, ``w4a16_linear`` at one row sends FP4 words here (W4A16
    and W4A8's batch-1 path alike) and keeps what this kernel cannot take (fp32 activations,
    a table format) on the FMA kernels; off, nothing comes here."""
    from qcompile.backends.triton import runtime

    spy_mma = _spy_tuned(monkeypatch, mm, "_gemv1_fp4mma_kernel", "_tuned")
    spy_fma = _spy_tuned(monkeypatch, g1, "_gemv1_fp4w_kernel", "_tuned_fp4w")
    x, w, b, _ = _fp4("fp4_e2m1/g128/asym", 72, 1024, torch.bfloat16)
    ref = w4.w4a16_linear_ref(x, *w, bias=b)
    w4.w4a16_linear(x, *w, bias=b)
    assert (spy_mma.launches, spy_fma.launches) == (0, 1)
    monkeypatch.setattr(runtime, "GEMV1_MMA", True)
    out = w4.w4a16_linear(x, *w, bias=b)
    assert (spy_mma.launches, spy_fma.launches) == (1, 1)
    assert_matches_unrounded(out, ref, x, w)
    w4.w4a16_linear(x.float(), *w, bias=b.float())  # fp32: the FMA kernel
    assert (spy_mma.launches, spy_fma.launches) == (1, 2)
