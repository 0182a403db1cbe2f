"""quantize / dequantize behaviour: errors, zero groups, scale constraints, determinism."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import FormatError, WeightError
from qcompile.formats import (
    QTensor,
    decode,
    dequantize,
    fake_quantize,
    parse_format,
    quantize,
    search_clip,
)
from qcompile.formats.scales import group_reduce

FAMILIES = [
    "int4/g128",
    "int4/g128/asym",
    "int3/g128/asym",
    "int2/g64/asym",
    "int8/channel",
    "int8/token",
    "int4/g128/fp16",
    "fp4_e2m1/g128",
    "fp4_e2m1/g128/asym",
    "fp4_e2m1/g128/po2",
    "fp4_e2m1/g128/asym/po2",
    "fp4_e2m1/g128/m2",
    "fp4_e2m1/g128/asym/m2",
    "int4/g128/asym/m2",
    "fp8_e4m3/token",
    "fp8_e5m2/tensor",
    "fp6_e2m3/g32",
    "fp3_e2m0/g64",
    "fp3_e1m1/g64/asym",
    "nf4/g64",
    "nf4/g64/asym",
    "nf3/g64/asym",
    "mxfp4",
    "mxfp8_e4m3",
    "nvfp4",
]


def gauss(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fn", [quantize, fake_quantize, search_clip])
def test_non_finite_raises_weight_error(fn, bad: float) -> None:
    x = gauss((4, 576))
    x[2, 17] = bad
    with pytest.raises(WeightError, match="NaN" if math.isnan(bad) else "inf") as info:
        fn(x, parse_format("int4/g128/asym"))
    assert "(2, 17)" in str(info.value)


@pytest.mark.parametrize("fn", [quantize, fake_quantize, search_clip])
def test_huge_magnitudes_raise_weight_error(fn) -> None:
    x = gauss((2, 64))
    x[1, 3] = -3e38
    with pytest.raises(WeightError, match="magnitude"):
        fn(x, parse_format("fp4_e2m1/g32"))


@pytest.mark.parametrize("text", FAMILIES)
def test_zero_groups_and_zero_tensor(text: str) -> None:
    spec = parse_format(text)
    x = gauss((3, 576), 1)
    x[1] = 0.0  # a zero row
    x[2, 128:256] = 0.0  # a zero group
    x[0, 512:] = 0.0  # a zero ragged tail
    for t in (x, torch.zeros(2, 576)):
        q = quantize(t, spec)
        out = dequantize(q)
        assert torch.isfinite(out).all()
        for s in (q.scale, q.scale_neg, q.zero, q.outer):
            assert s is None or (torch.isfinite(s).all() and (s >= 0).all())
        assert (q.scale > 0).all()
        assert torch.equal(out[t == 0], torch.zeros_like(out[t == 0]))
    assert torch.equal(dequantize(quantize(torch.zeros(2, 576), spec)), torch.zeros(2, 576))


@pytest.mark.parametrize("text", FAMILIES)
def test_constant_and_one_sided_groups(text: str) -> None:
    spec = parse_format(text)
    x = torch.cat([torch.full((1, 576), 3.0), torch.full((1, 576), -0.25), gauss((1, 576)).abs()])
    out = fake_quantize(x, spec)
    assert torch.isfinite(out).all()
    if spec.kind != "int" or spec.asym or spec.granularity != "tensor":
        # Each row's extreme is representable up to the scale rounding and element grid.
        assert torch.allclose(out.abs().amax(-1), x.abs().amax(-1), rtol=0.35)


@pytest.mark.parametrize(
    "text", ["fp4_e2m1/g128/po2", "fp4_e2m1/g128/asym/po2", "nf4/g64/po2", "int4/g128/po2"]
)
def test_po2_scales_are_powers_of_two_and_nothing_clips(text: str) -> None:
    spec = parse_format(text)
    x = gauss((16, 576), 2) * torch.logspace(-3, 3, 16)[:, None]
    q = quantize(x, spec)
    for s in (q.scale, q.scale_neg):
        if s is not None:
            assert (torch.frexp(s)[0] == 0.5).all()
    amax = torch.stack(
        [x[:, i : i + spec.group_size].abs().amax(-1) for i in range(0, 576, spec.group_size)], -1
    )
    eff = q.scale if q.scale_neg is None else torch.maximum(q.scale, q.scale_neg)
    assert (amax / eff <= spec.element.max).all()
    # Minimal: half the scale would clip the group's extreme (where not one-sided).
    if q.scale_neg is None:
        assert (amax / (eff / 2) > spec.element.max).all()


@pytest.mark.parametrize("text", ["fp4_e2m1/g128/m2", "fp4_e2m1/g128/asym/m2", "fp6_e3m2/g32/m2"])
def test_m2_scales(text: str) -> None:
    spec = parse_format(text)
    x = gauss((8, 1000), 3) * torch.rand(8, 1000, generator=torch.Generator().manual_seed(4))
    q = quantize(x, spec)
    fmax = spec.element.max
    assert q.outer is not None and q.outer.shape == (8, 1)
    assert torch.equal(q.outer, (x.abs().amax(-1, keepdim=True) / fmax))
    for factor in (q.scale, q.scale_neg):
        if factor is not None:
            assert (torch.frexp(factor)[0] == 0.5).all() and (factor <= 1).all()
    eff = torch.maximum(q.scale, q.scale_neg) if spec.asym else q.scale
    g = spec.group_size
    amax = torch.stack([x[:, i : i + g].abs().amax(-1) for i in range(0, 1000, g)], -1)
    assert (amax / (eff * q.outer) <= fmax * (1 + 1e-6)).all()
    if spec.elem == "fp4_e2m1":
        # FP4 -> FP8 is an exponent shift: element x group factor is exact in fp8_e4m3.
        v = decode(q.codes, spec.elem)
        y = (
            torch.where(
                v < 0,
                v * q.scale_neg.repeat_interleave(g, -1)[:, :1000],
                v * q.scale.repeat_interleave(g, -1)[:, :1000],
            )
            if spec.asym
            else v * q.scale.repeat_interleave(g, -1)[:, :1000]
        )
        y = y.numpy()
        assert np.array_equal(y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), y)
        assert torch.equal(torch.from_numpy(y) * q.outer, dequantize(q))


@pytest.mark.parametrize(
    "text,dtype",
    [
        ("int4/g128/bf16", torch.bfloat16),
        ("fp4_e2m1/g64/asym/fp16", torch.float16),
        ("fp8_e4m3/token/bf16", torch.bfloat16),
    ],
)
def test_low_precision_scale_storage(text: str, dtype: torch.dtype) -> None:
    x = gauss((8, 576), 5) * 1e-3
    q = quantize(x, parse_format(text))
    for s in (q.scale, q.scale_neg):
        if s is not None:
            assert torch.equal(s.to(dtype).to(torch.float32), s)
    ref = quantize(x, parse_format(text.rsplit("/", 1)[0]))
    assert torch.allclose(q.scale, ref.scale, rtol=2**-7)


def test_fp16_scale_saturates_instead_of_overflowing() -> None:
    x = torch.full((1, 64), 1e9)
    out = fake_quantize(x, parse_format("int8/channel/fp16"))
    assert torch.isfinite(out).all()


def test_tensor_granularity_has_one_scale() -> None:
    x = gauss((4, 5, 576), 6)
    spec = parse_format("fp8_e5m2/tensor")
    q = quantize(x, spec)
    assert q.scale.shape == (1, 1, 1)
    s = x.abs().max() / 57344.0
    assert q.scale.item() == s.item()
    ref = np.clip((x / s).numpy(), -57344, 57344).astype(ml_dtypes.float8_e5m2).astype(np.float32)
    assert torch.equal(dequantize(q), torch.from_numpy(ref) * s)


def test_token_equals_channel_numerics() -> None:
    x = gauss((7, 300), 7)
    a = quantize(x, parse_format("fp8_e4m3/token"))
    b = quantize(x, parse_format("fp8_e4m3/channel"))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert a.scale.shape == (7, 1)


def test_int_code_conventions() -> None:
    sym = quantize(torch.tensor([[-7.0, 0.0, 3.0, 7.0]]), parse_format("int4/channel"))
    assert sym.zero is None and sym.scale.item() == 1.0
    assert sym.codes.tolist() == [[1, 8, 11, 15]]  # offset binary: q + 8
    asym = quantize(torch.tensor([[-8.0, 0.0, 4.0, 7.0]]), parse_format("int4/channel/asym"))
    assert asym.scale.item() == 1.0 and asym.zero.tolist() == [[8.0]]
    assert asym.codes.tolist() == [[0, 8, 12, 15]]  # unsigned level, value = code - zero
    positive = quantize(torch.tensor([[2.0, 4.0, 6.0]]), parse_format("int2/channel/asym"))
    assert positive.zero.item() == 0.0  # zero stays in range: min is taken as min(min, 0)
    assert dequantize(positive).tolist() == [[2.0, 4.0, 6.0]]


def test_afpq_uses_the_negative_scale_for_negative_codes() -> None:
    x = torch.tensor([[-0.5, -0.25, 0.0, 3.0, 6.0]])
    q = quantize(x, parse_format("fp4_e2m1/channel/asym"))
    assert q.scale.item() == 1.0 and q.scale_neg.item() == pytest.approx(0.5 / 6)
    assert torch.allclose(dequantize(q), x)


def test_leading_dims_and_dtypes() -> None:
    spec = parse_format("int4/g64/asym")
    x3 = gauss((2, 3, 100), 8)
    q = quantize(x3, spec)
    assert q.codes.shape == (2, 3, 100) and q.scale.shape == (2, 3, 2) and q.zero.shape == (2, 3, 2)
    flat = quantize(x3.reshape(6, 100), spec)
    assert torch.equal(q.codes.reshape(6, 100), flat.codes)
    one_d = quantize(x3[0, 0], spec)
    assert one_d.scale.shape == (2,) and torch.equal(one_d.codes, q.codes[0, 0])
    xb = x3.to(torch.bfloat16)
    out = fake_quantize(xb, spec)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize(quantize(xb, spec), torch.bfloat16))
    assert (
        torch.equal(q.dequantize(), dequantize(q)) and q.num_groups == 2 and q.shape == (2, 3, 100)
    )


def test_clip_tensor_overrides_spec_clip() -> None:
    x = gauss((4, 576), 9)
    spec = parse_format("int4/g128/asym")
    clipped = parse_format("int4/g128/asym/clip0.8")
    a = quantize(x, spec, clip=torch.full((4, 5), 0.8))
    b = quantize(x, clipped)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    c = quantize(x, clipped, clip=torch.ones(4, 5))
    assert torch.equal(c.scale, quantize(x, spec).scale)
    per_group = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6]).expand(4, 5)
    d = quantize(x, spec, clip=per_group)
    assert torch.equal(
        d.scale[:, 2], quantize(x[:, 256:384], spec, clip=torch.full((4, 1), 0.8)).scale[:, 0]
    )


@pytest.mark.parametrize(
    "clip", [torch.ones(4, 4), torch.ones(3, 5), torch.zeros(4, 5), torch.full((4, 5), 1.5)]
)
def test_bad_clip_tensor(clip: torch.Tensor) -> None:
    with pytest.raises(FormatError):
        quantize(gauss((4, 576)), parse_format("int4/g128"), clip=clip)


@pytest.mark.parametrize(
    "x",
    [torch.tensor(1.0), torch.zeros(4, 0), torch.tensor([1, 2, 3]), [1.0, 2.0]],
    ids=["0d", "empty", "int", "list"],
)
def test_bad_inputs(x) -> None:
    with pytest.raises(FormatError):
        quantize(x, parse_format("int8"))


def test_dequantize_rejects_bad_codes() -> None:
    q = quantize(gauss((2, 64)), parse_format("int4/g32"))
    bad = QTensor(q.spec, q.codes.to(torch.int32), q.scale, k=q.k)
    with pytest.raises(FormatError):
        dequantize(bad)
    with pytest.raises(FormatError, match="k=63"):
        QTensor(q.spec, q.codes, q.scale, k=63)
    assert QTensor(q.spec, q.codes, q.scale).k == 64


@pytest.mark.parametrize("text", FAMILIES)
def test_deterministic(text: str) -> None:
    spec = parse_format(text)
    x = gauss((8, 576), 10)
    a, b = quantize(x, spec), quantize(x.clone(), spec)
    for name in ("codes", "scale", "scale_neg", "zero", "outer"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None and tb is None) or torch.equal(ta, tb)


@pytest.mark.parametrize(
    "text", ["int4/g128/asym", "fp4_e2m1/g128/asym", "nf4/g64", "mxfp4", "nvfp4", "fp8_e4m3/token"]
)
def test_error_is_small_relative_to_signal(text: str) -> None:
    x = gauss((64, 576), 11)
    rel = ((fake_quantize(x, parse_format(text)) - x).square().mean() / x.square().mean()).item()
    assert rel < (0.002 if text.startswith("fp8") else 0.02)


_finite32 = st.floats(
    -(2.0**126), 2.0**126, exclude_min=True, exclude_max=True, width=32, allow_subnormal=True
)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.one_of(_finite32, st.floats(-(2.0**-100), 2.0**-100, width=32), st.just(0.0)),
        min_size=1,
        max_size=80,
    ),
    text=st.sampled_from(FAMILIES),
)
def test_fuzz_any_finite_input_round_trips(values: list[float], text: str) -> None:
    spec = parse_format(text)
    x = torch.tensor(values, dtype=torch.float32)
    q = quantize(x, spec)
    out = dequantize(q)
    assert torch.isfinite(out).all()
    assert torch.equal(out, fake_quantize(x, spec))
    assert int(q.codes.max()) < 2**spec.bits
    # Sign is never flipped.
    assert not ((out > 0) & (x < 0)).any() and not ((out < 0) & (x > 0)).any()


# --------------------------------------------------------------- mse block scales


@pytest.mark.parametrize("text", ["nvfp4", "mxfp4", "mxfp8_e4m3", "fp6_e2m3/g32/e4m3"])
def test_mse_block_scales_are_grid_neighbours_and_never_worse(text: str) -> None:
    """``/mse``: each group's scale is one of the two grid values around its exact scale (the
    rounded one among them), both representable, nothing on the grid between them, and no
    group's squared error exceeds the default's; over Gaussian rows the total drops."""
    from qcompile.formats.scales import block_scale_neighbours, compute_scales, group_stats

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(48, 200, generator=gen) * torch.rand(48, 1, generator=gen) * 4
    base, mse = parse_format(text), parse_format(text + "/mse")
    assert str(mse) == f"{base}/mse" and parse_format(str(mse)) == mse
    stats = group_stats(x, base)
    sc = compute_scales(base, stats, None)
    lo, hi = block_scale_neighbours(base, stats, None, sc.outer)
    exact = stats.amax / (base.element.max * (1.0 if sc.outer is None else sc.outer))
    assert bool((lo <= exact).all()) and bool((exact <= hi).all())
    assert bool(((sc.scale == lo) | (sc.scale == hi)).all())
    if base.scale == "e4m3":
        grid = torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        assert bool(torch.isin(lo, grid).all()) and bool(torch.isin(hi, grid).all())
        between = ((grid[None, :] > lo.reshape(-1, 1)) & (grid[None, :] < hi.reshape(-1, 1)))
        assert not bool(between.any())
    else:  # e8m0: powers of two, a factor of two apart (or equal)
        assert bool((torch.frexp(lo)[0] == 0.5).all()) and bool(((hi == lo) | (hi == 2 * lo)).all())
    q = quantize(x, mse)
    assert bool(((q.scale == lo) | (q.scale == hi)).all())
    assert torch.equal(dequantize(q), fake_quantize(x, mse))
    err = {s: group_reduce((fake_quantize(x, s) - x).square(), base, torch.sum) for s in (base, mse)}
    assert bool((err[mse] <= err[base]).all())
    assert err[mse].sum() < 0.95 * err[base].sum()


def test_mse_needs_block_scales() -> None:
    with pytest.raises(FormatError, match="mse .*e8m0 or e4m3"):
        parse_format("int4/g128/mse")
    with pytest.raises(FormatError, match="mse given twice"):
        parse_format("nvfp4/mse/mse")
    with pytest.raises(FormatError, match="mse given twice"):
        parse_format("nvfp4/mse/mse4")


def _ref_group_sq_err(v: np.ndarray, s: float, grid: np.ndarray) -> float:
    """Squared error of one group rounded to nearest on the signed element grid ``grid * s``
    (ties to the even code; an independent float64 reference)."""
    y = v / s
    d = np.abs(np.abs(y)[:, None] - grid[None, :])
    best = d.min(axis=1, keepdims=True)
    # Ties: the even magnitude code (the lower index of an equal pair is even in E2M1/E2M3).
    idx = np.argmax(d == best, axis=1)
    tie = (d == best).sum(axis=1) > 1
    idx = np.where(tie & (idx % 2 == 1), idx + 1, idx)
    return float(((np.sign(y) * grid[idx] * s - v) ** 2).sum())


@pytest.mark.parametrize("text,m", [("nvfp4", 4.0), ("nvfp4", 5.0), ("fp6_e2m3/g32/e4m3", 5.0),
                                     ("mxfp4", 4.0)])
def test_mse_second_target_picks_the_best_of_four_candidates(text: str, m: float) -> None:
    """``/mse<m>``: each group's scale is whichever of the grid neighbours of
    ``absmax / max`` and ``absmax / m`` gives the least squared error (checked group by group
    against a float64 brute-force rounding on ml_dtypes' grid), never worse than ``/mse``, and
    better on Gaussian rows with E4M3 scales; the text round-trips."""
    from qcompile.formats.scales import compute_scales, group_stats

    spec = parse_format(f"{text}/mse{m:g}")
    plain = parse_format(f"{text}/mse")
    assert spec.mse_max == m and str(spec) == f"{text}/mse{m:g}" and parse_format(str(spec)) == spec
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 96, generator=gen) * torch.rand(24, 1, generator=gen) * 3
    q = quantize(x, spec)
    assert torch.equal(dequantize(q), fake_quantize(x, spec))
    base = parse_format(text)
    sc = compute_scales(base, group_stats(x, base), None)
    outer = 1.0 if sc.outer is None else float(sc.outer.reshape(-1)[0])
    ml = {"fp4_e2m1": ml_dtypes.float4_e2m1fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn}[spec.elem]
    grid = np.unique(np.abs(np.array(
        [float(np.array(c, np.uint8).view(ml)) for c in range(1 << spec.bits)])))
    if spec.scale == "e4m3":
        sgrid = np.unique(np.abs(np.arange(1, 0x7F, dtype=np.uint8).view(
            ml_dtypes.float8_e4m3fn).astype(np.float64)))
    else:
        sgrid = 2.0 ** np.arange(-127, 128, dtype=np.float64)
    xs = x.double().numpy().reshape(24, -1, spec.group_size)
    chosen = q.scale.double().numpy().reshape(24, -1)
    worse_than_plain = 0
    plain_scale = quantize(x, plain).scale.double().numpy().reshape(24, -1)
    for r in range(24):
        for g in range(xs.shape[1]):
            v = xs[r, g]
            amax = np.abs(v).max()
            cands = []
            for top in (grid.max(), m):
                exact = amax / (top * outer)
                i = min(max(int(np.searchsorted(sgrid, exact)), 1), sgrid.size - 1)  # ends clamp
                cands += [sgrid[i] if sgrid[i] == exact else sgrid[i - 1], sgrid[i]]
            errs = [_ref_group_sq_err(v, c * outer, grid) for c in cands]
            got = _ref_group_sq_err(v, chosen[r, g] * outer, grid)
            assert chosen[r, g] in cands
            assert got <= min(errs) * (1 + 1e-9) + 1e-30
            worse_than_plain += got > _ref_group_sq_err(v, plain_scale[r, g] * outer, grid)
    assert worse_than_plain == 0
    err = {s: float(((fake_quantize(x, s) - x) ** 2).sum()) for s in (plain, spec)}
    # On the power-of-two grid the extra candidates rarely win (one at most is new).
    assert err[spec] < err[plain] if spec.scale == "e4m3" else err[spec] <= err[plain]


@pytest.mark.parametrize("text,match", [
    ("nvfp4/mse6", "0 < m < 6"), ("nvfp4/mse0", "0 < m < 6"), ("nvfp4/mse7.5", "0 < m < 6"),
    ("nvfp4/msex", "bad mse part"), ("int4/g128/mse4", "e8m0 or e4m3"),
])
def test_mse_second_target_bad_text(text: str, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        parse_format(text)
