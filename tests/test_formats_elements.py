"""Element types: bit-exact against ml_dtypes, fp3 and NF against brute-force references."""

from __future__ import annotations

import math
import statistics

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import FormatError, WeightError
from qcompile.formats import decode, element_info, encode, round_to_format

ML_TYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def ml_codes(x: np.ndarray, elem: str) -> np.ndarray:
    """Reference codes: saturate, then let ml_dtypes round (RNE) and give the bits."""
    info = element_info(elem)
    clipped = np.clip(x.astype(np.float32), -info.max, info.max)
    return clipped.astype(ML_TYPES[elem]).view(np.uint8) & ((1 << info.bits) - 1)


def bits_of(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("elem", sorted(ML_TYPES))
def test_decode_all_codes_matches_ml_dtypes(elem: str) -> None:
    info = element_info(elem)
    codes = np.arange(1 << info.bits, dtype=np.uint8)
    ref = codes.view(ML_TYPES[elem]).astype(np.float32)
    got = decode(torch.from_numpy(codes), elem).numpy()
    nan = np.isnan(ref)
    assert np.array_equal(nan, np.isnan(got))
    assert np.array_equal(bits_of(ref[~nan]), bits_of(got[~nan]))  # -0.0 and inf included
    assert info.max == float(ml_dtypes.finfo(ML_TYPES[elem]).max)


@pytest.mark.parametrize("elem", sorted(ML_TYPES))
def test_encode_every_finite_value_gives_its_code(elem: str) -> None:
    info = element_info(elem)
    codes = np.arange(1 << info.bits, dtype=np.uint8)
    vals = codes.view(ML_TYPES[elem]).astype(np.float32)
    finite = np.isfinite(vals)
    got = encode(torch.from_numpy(vals[finite]), elem).numpy()
    assert np.array_equal(got, codes[finite])
    assert np.array_equal(ml_codes(vals[finite], elem), codes[finite])


def test_e8m0_decode_matches_ml_dtypes() -> None:
    codes = np.arange(256, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    got = decode(torch.from_numpy(codes), "fp8_e8m0").numpy()
    assert np.array_equal(np.isnan(ref), np.isnan(got))
    assert np.array_equal(bits_of(ref[:255]), bits_of(got[:255]))


def _tie_points(elem: str) -> np.ndarray:
    """Exact midpoints between neighbouring grid values, and one ulp either side."""
    grid = element_info(elem).grid().numpy()
    mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
    near = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    return np.concatenate([near, -near]).astype(np.float32)


def _interesting(elem: str) -> st.SearchStrategy[float]:
    info = element_info(elem)
    fmax = info.max
    ties = _tie_points(elem).tolist()
    return st.one_of(
        st.floats(width=32, allow_nan=False, allow_infinity=True, allow_subnormal=True),
        st.floats(-2 * fmax, 2 * fmax, width=32, allow_subnormal=True),
        st.floats(-4 * 2.0**-info.bias, 4 * 2.0**-info.bias, width=32),  # subnormal range
        st.sampled_from(ties),
        st.sampled_from(
            [fmax, -fmax, np.nextafter(np.float32(fmax), np.float32(np.inf)).item(), 0.0, -0.0]
        ),
    )


@pytest.mark.parametrize("elem", sorted(ML_TYPES))
def test_all_ties_match_ml_dtypes(elem: str) -> None:
    x = _tie_points(elem)
    got = encode(torch.from_numpy(x), elem).numpy()
    assert np.array_equal(got, ml_codes(x, elem))


@pytest.mark.parametrize("elem", sorted(ML_TYPES))
def test_fuzz_bit_exact_vs_ml_dtypes(elem: str) -> None:
    @settings(max_examples=150, deadline=None)
    @given(st.lists(_interesting(elem), min_size=1, max_size=64))
    def check(values: list[float]) -> None:
        x = np.asarray(values, dtype=np.float32)
        t = torch.from_numpy(x)
        rounded = round_to_format(t, elem)
        ref = ml_codes(x, elem)
        assert np.array_equal(encode(rounded, elem).numpy(), ref)
        assert np.array_equal(encode(t, elem).numpy(), ref)
        # The rounded values are the ml_dtypes values, sign of zero included.
        info = element_info(elem)
        ref_vals = np.clip(x, -info.max, info.max).astype(ML_TYPES[elem]).astype(np.float32)
        assert np.array_equal(bits_of(rounded.numpy()), bits_of(ref_vals))

    check()


def test_random_bulk_bit_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    for elem in ML_TYPES:
        fmax = element_info(elem).max
        for spread in (1e-4, 0.1, 1.0, 3.0):
            x = (torch.randn(20000, generator=gen) * fmax * spread).numpy()
            assert np.array_equal(encode(torch.from_numpy(x), elem).numpy(), ml_codes(x, elem))


def test_e8m0_round_matches_ml_dtypes() -> None:
    # ml_dtypes rounds e8m0 ties (1.5 * 2^e) up; checked on the fp32 normal range, where
    # ml_dtypes is exact (it mis-rounds fp32 subnormal inputs, which scales never are).
    gen = torch.Generator().manual_seed(1)
    e = torch.randint(-126, 127, (5000,), generator=gen).to(torch.float32)
    frac = torch.rand(5000, generator=gen) + 1.0
    x = torch.cat(
        [torch.ldexp(frac, e), torch.ldexp(torch.full((253,), 1.5), torch.arange(-126, 127.0))]
    )
    x = x.clamp(2.0**-126, 2.0**127)
    ref = x.numpy().astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    assert np.array_equal(encode(x, "fp8_e8m0").numpy(), ref)
    assert torch.equal(
        round_to_format(torch.tensor([0.0, 1e-45, 3e38]), "fp8_e8m0"),
        torch.tensor([2.0**-127, 2.0**-127, 2.0**127]),
    )


FP3_GRIDS = {"fp3_e2m0": [0.0, 1.0, 2.0, 4.0], "fp3_e1m1": [0.0, 0.5, 1.0, 1.5]}


def fp3_reference(x: np.ndarray, elem: str) -> np.ndarray:
    """Brute force: nearest magnitude, ties to the even code, sign bit from x, saturating."""
    grid = FP3_GRIDS[elem]
    out = []
    for v in x.tolist():
        a = min(abs(v), grid[-1])
        dist = [abs(a - g) for g in grid]
        best = min(dist)
        mag = min(
            i for i, d in enumerate(dist) if d == best and (i % 2 == 0 or dist.count(best) == 1)
        )
        out.append(mag | (4 if math.copysign(1.0, v) < 0 else 0))
    return np.asarray(out, dtype=np.uint8)


@pytest.mark.parametrize("elem", sorted(FP3_GRIDS))
def test_fp3_definition(elem: str) -> None:
    info = element_info(elem)
    assert info.bits == 3 and info.ml_dtype is None
    pos = FP3_GRIDS[elem]
    assert list(info.values) == pos + [-v for v in pos]
    assert info.max == pos[-1]
    assert all(math.isfinite(v) for v in info.values)


@pytest.mark.parametrize("elem", sorted(FP3_GRIDS))
def test_fp3_ties_and_saturation(elem: str) -> None:
    x = np.concatenate(
        [_tie_points(elem), np.float32([0.0, -0.0, 100.0, -100.0, np.inf, -np.inf, 1e-30])]
    )
    got = encode(torch.from_numpy(x), elem).numpy()
    assert np.array_equal(got, fp3_reference(x, elem))
    if elem == "fp3_e2m0":
        # Ties between 2 and 4 go to 2 (even exponent field), between 1 and 2 to 2.
        assert round_to_format(torch.tensor([3.0, 1.5, 0.5]), elem).tolist() == [2.0, 2.0, 0.0]


@pytest.mark.parametrize("elem", sorted(FP3_GRIDS))
@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-8, 8, width=32), min_size=1, max_size=64))
def test_fp3_fuzz_vs_brute_force(elem: str, values: list[float]) -> None:
    x = np.asarray(values, dtype=np.float32)
    got = encode(torch.from_numpy(x), elem).numpy()
    assert np.array_equal(got, fp3_reference(x, elem))
    vals = np.asarray(element_info(elem).values, dtype=np.float32)
    assert np.array_equal(round_to_format(torch.from_numpy(x), elem).numpy(), vals[got])


def normal_float_reference(bits: int) -> list[float]:
    """QLoRA normal-float construction with the stdlib normal quantile function."""
    inv = statistics.NormalDist().inv_cdf
    half = 2 ** (bits - 1)
    delta = 0.5 * ((1 - 1 / (2 * (2**bits - 1))) + (1 - 1 / (2 * 2**bits)))
    top = inv(delta)

    def spaced(n: int) -> list[float]:
        return [delta + (0.5 - delta) * i / (n - 1) for i in range(n)][:-1]

    pos = [inv(p) / top for p in spaced(half + 1)]
    neg = [-inv(p) / top for p in spaced(half)]
    return sorted([*pos, 0.0, *neg])


@pytest.mark.parametrize("elem,bits", [("nf4", 4), ("nf3", 3)])
def test_normal_float_codebook(elem: str, bits: int) -> None:
    vals = element_info(elem).values
    assert len(vals) == 2**bits
    assert list(vals) == sorted(vals)
    assert vals[0] == -1.0 and vals[-1] == 1.0 and 0.0 in vals
    assert vals.index(0.0) == 2 ** (bits - 1) - 1  # one more positive level than negative
    assert np.allclose(vals, normal_float_reference(bits), rtol=0, atol=1e-6)


def test_nf4_matches_published_values() -> None:
    published = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]  # fmt: skip
    assert np.allclose(element_info("nf4").values, published, atol=1e-4)


@pytest.mark.parametrize("elem", ["nf4", "nf3"])
def test_normal_float_nearest(elem: str) -> None:
    book = torch.tensor(element_info(elem).values)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 0.6
    codes = encode(x, elem)
    ref = (x[:, None] - book[None, :]).abs().argmin(dim=1)
    assert torch.equal(codes.long(), ref)
    assert torch.equal(round_to_format(x, elem), book[ref])
    assert torch.equal(decode(torch.arange(len(book)), elem), book)
    assert round_to_format(torch.tensor([5.0, -5.0]), elem).tolist() == [1.0, -1.0]


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_elements(bits: int) -> None:
    elem = f"int{bits}"
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0, 0.49, -0.51])
    expect = torch.tensor([0.0, 2.0, 2.0, 0.0, -2.0, hi, lo, 0.0, -1.0]).clamp(lo, hi)
    assert torch.equal(round_to_format(x, elem), expect)
    assert torch.equal(encode(x, elem).long(), (expect - lo).long())
    codes = torch.arange(2**bits)
    assert torch.equal(decode(codes, elem), (codes + lo).float())
    info = element_info(elem)
    assert (info.min, info.max, info.kind) == (lo, hi, "int")


def test_negative_zero_keeps_sign_bit() -> None:
    x = torch.tensor([-0.0, -1e-30, 0.0])
    assert encode(x, "fp4_e2m1").tolist() == [8, 8, 0]
    assert encode(x, "fp8_e4m3").tolist() == [0x80, 0x80, 0]
    assert torch.signbit(round_to_format(x, "fp4_e2m1")).tolist() == [True, True, False]


def test_infinities_saturate() -> None:
    x = torch.tensor([math.inf, -math.inf])
    assert round_to_format(x, "fp4_e2m1").tolist() == [6.0, -6.0]
    assert round_to_format(x, "fp8_e4m3").tolist() == [448.0, -448.0]
    assert round_to_format(x, "int4").tolist() == [7.0, -8.0]


@pytest.mark.parametrize("fn", [round_to_format, encode])
def test_nan_raises_weight_error(fn) -> None:
    with pytest.raises(WeightError, match="NaN"):
        fn(torch.tensor([1.0, math.nan]), "fp4_e2m1")


def test_element_helper_errors() -> None:
    with pytest.raises(FormatError, match="int9"):
        element_info("int9")
    with pytest.raises(FormatError):
        element_info(["fp4_e2m1"])  # type: ignore[arg-type]
    with pytest.raises(FormatError):
        round_to_format(torch.tensor([1.0]), "fp5")
    with pytest.raises(FormatError):
        decode(torch.tensor([16]), "fp4_e2m1")
    with pytest.raises(FormatError):
        decode(torch.tensor([-1]), "fp4_e2m1")
    with pytest.raises(FormatError):
        decode(torch.tensor([1.0]), "fp4_e2m1")
    with pytest.raises(FormatError):
        encode(torch.tensor([1, 2]), "fp4_e2m1")


def test_bf16_and_fp16_inputs_are_exact() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 100
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        ref = ml_codes(xd.float().numpy(), "fp8_e4m3")
        assert np.array_equal(encode(xd, "fp8_e4m3").numpy(), ref)
