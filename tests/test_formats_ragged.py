"""Quantize/dequantize against a plain per-group loop, on rows groups do not divide.

The reference below slices each group of each row, computes its scale(s) from the formulas
in the design (in fp32, like the implementation), rounds elements with ml_dtypes (FP),
numpy round-half-even (INT) or a brute-force nearest search (NF), and dequantizes.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from qcompile.formats import (
    FormatSpec,
    dequantize,
    element_info,
    fake_quantize,
    parse_format,
    quantize,
)

F = np.float32
ML = {"fp4_e2m1": ml_dtypes.float4_e2m1fn, "fp8_e4m3": ml_dtypes.float8_e4m3fn}


def round_elem(y: np.ndarray, elem: str) -> np.ndarray:
    info = element_info(elem)
    if info.kind == "int":
        return np.clip(np.round(y), info.min, info.max).astype(F)
    if info.kind == "nf":
        book = np.asarray(info.values, dtype=F)
        return book[np.abs(y[:, None] - book[None, :]).argmin(axis=1)]
    return np.clip(y, -info.max, info.max).astype(ML[elem]).astype(F)


def nz(s: np.float32) -> np.float32:
    return s if s > 0 else F(1.0)


def smallest_pow2(a: np.float32, limit: float, base: float = 1.0, cap: int = 127) -> np.float32:
    """Smallest 2^e (e <= cap) with a / (base * 2^e) <= limit in fp32."""
    if a == 0:
        return F(1.0)
    e = math.ceil(math.log2(float(a) / (float(base) * limit)))
    while F(a) / F(base * F(2.0**e)) > limit:
        e += 1
    while F(a) / F(base * F(2.0 ** (e - 1))) <= limit:
        e -= 1
    return F(2.0 ** min(e, cap))


def ref_group(
    xg: np.ndarray, spec: FormatSpec, c: np.float32, row_s: np.float32, tensor_s: np.float32
) -> np.ndarray:
    """Dequantized values of one group (``row_s``: m2 row scale; ``tensor_s``: nvfp4)."""
    info = spec.element
    hi, lo = F(max(xg.max(), 0)), F(max(-xg.min(), 0))
    amax = max(hi, lo)
    if info.kind == "int" and spec.asym:
        levels = F(2**spec.bits - 1)
        s = nz((hi * c + lo * c) / levels)  # (max - min) / (2^b - 1), zero kept in range
        zero = np.clip(np.round(lo * c / s), 0, levels)
        q = np.clip(np.round(xg / s) + zero, 0, levels)
        return (q - zero) * s
    if spec.scale == "e8m0":
        a = amax * c
        s = F(2.0 ** (math.frexp(float(a))[1] - 1 - 2)) if a > 0 else F(1.0)  # floor(log2 a) - emax
        assert F(s).astype(ml_dtypes.float8_e8m0fnu).astype(F) == s
        return round_elem(xg / s, spec.elem) * s
    if spec.scale == "e4m3":
        block = nz(
            F(np.clip(amax * c / (F(6.0) * tensor_s), -448, 448))
            .astype(ml_dtypes.float8_e4m3fn)
            .astype(F)
        )
        eff = block * tensor_s
        return round_elem(xg / eff, spec.elem) * eff
    limit = F(info.max)
    if not spec.asym:
        a = amax * c
        if spec.scale == "po2":
            s = smallest_pow2(a, limit)
        elif spec.scale == "m2":
            s = smallest_pow2(a, limit, row_s, cap=0) * row_s
        elif spec.scale == "bf16":
            s = nz(F(torch.tensor(a / limit).to(torch.bfloat16).float().item()))
        else:
            s = nz(a / limit)
        return round_elem(xg / s, spec.elem) * s
    # AFPQ: separate scales for the positive and negative side (NF's negative end is -1).
    limit_neg = F(-info.min)
    a_pos, a_neg = hi * c, lo * c
    if spec.scale == "po2":
        sp, sn = smallest_pow2(a_pos, limit), smallest_pow2(a_neg, limit_neg)
    elif spec.scale == "m2":
        sp = smallest_pow2(a_pos, limit, row_s, cap=0) * row_s
        sn = smallest_pow2(a_neg, limit_neg, row_s, cap=0) * row_s
    else:
        sp, sn = nz(a_pos / limit), nz(a_neg / limit_neg)
    v = round_elem(np.where(xg < 0, xg / sn, xg / sp).astype(F), spec.elem)
    return np.where(v < 0, v * sn, v * sp).astype(F)


def reference(x: np.ndarray, spec: FormatSpec, clip: float = 1.0) -> np.ndarray:
    rows = x.reshape(-1, x.shape[-1])
    k = rows.shape[1]
    g = spec.group_size or k
    info = spec.element
    tensor_s = nz(F(np.abs(x).max()) / F(info.max * 448.0))
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        if spec.asym:
            row_s = nz(
                max(F(max(row.max(), 0)) / F(info.max), F(max(-row.min(), 0)) / F(-info.min))
            )
        else:
            row_s = nz(F(np.abs(row).max()) / F(info.max))
        for start in range(0, k, g):  # the last group is shorter when g does not divide k
            out[r, start : start + g] = ref_group(
                row[start : start + g], spec, F(clip), row_s, tensor_s
            )
    return out.reshape(x.shape)


def make_x(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen).add(0.05)
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 200),), generator=gen)
    flat[idx] *= 8.0  # outliers
    x[..., -5:] = 0.0  # the ragged tail group is partly/all zero
    x[0, ..., :40] = x[0, ..., :40].abs()  # an all-positive stretch (one-sided AFPQ groups)
    return x


GROUP_FAMILIES = [
    "int4/g{g}",
    "int4/g{g}/asym",
    "int3/g{g}/asym",
    "int4/g{g}/asym/clip0.9",
    "int4/g{g}/bf16",
    "fp4_e2m1/g{g}",
    "fp4_e2m1/g{g}/asym",
    "nf4/g{g}",
    "nf4/g{g}/asym",
    "nf3/g{g}",
    "nf3/g{g}/asym",
    "fp4_e2m1/g{g}/po2",
    "fp4_e2m1/g{g}/asym/po2",
    "fp4_e2m1/g{g}/m2",
    "fp4_e2m1/g{g}/asym/m2",
    "fp4_e2m1/g{g}/clip0.8",
]
FIXED_FAMILIES = [
    "fp8_e4m3/channel",
    "fp8_e4m3/token",
    "int8/channel",
    "fp4_e2m1/channel/asym",
    "mxfp4",
    "nvfp4",
]
KS = (576, 960, 1000)


def check_against_reference(text: str, k: int, seed: int) -> None:
    spec = parse_format(text)
    x = make_x((2, 3, k), seed)
    q = quantize(x, spec)
    got = dequantize(q)
    ref = torch.from_numpy(reference(x.numpy(), spec, spec.clip))
    assert torch.equal(got, ref), f"{text} K={k}: max diff {(got - ref).abs().max().item()}"
    groups = spec.num_groups(k)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape
    assert q.scale.shape == (2, 3, groups) and q.k == k
    assert int(q.codes.max()) < 2**spec.bits


@pytest.mark.parametrize("g", (32, 64, 128))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("family", GROUP_FAMILIES)
def test_group_families_match_loop_reference(family: str, k: int, g: int) -> None:
    check_against_reference(family.format(g=g), k, seed=k + g)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("text", FIXED_FAMILIES)
def test_fixed_families_match_loop_reference(text: str, k: int) -> None:
    check_against_reference(text, k, seed=k)


def test_last_group_stats_ignore_missing_elements() -> None:
    # 576 = 4 * 128 + 64: the last group's scale comes from its 64 elements only.
    x = torch.zeros(1, 576)
    x[0, :512] = 10.0
    x[0, 512:] = torch.linspace(-0.5, 1.0, 64)
    q = quantize(x, parse_format("int4/g128/asym"))
    assert q.scale.shape == (1, 5)
    assert q.scale[0, 4].item() == pytest.approx(1.5 / 15)
    assert q.zero[0, 4].item() == round(0.5 / (1.5 / 15))
    sym = quantize(x, parse_format("fp4_e2m1/g128"))
    assert sym.scale[0, 4].item() == pytest.approx(1.0 / 6)


def test_ragged_mxfp4_scales_representable_in_e8m0() -> None:
    q = quantize(make_x((4, 1000), 5), parse_format("mxfp4"))
    s = q.scale.numpy()
    assert q.scale.shape == (4, 32)
    assert np.array_equal(s.astype(ml_dtypes.float8_e8m0fnu).astype(F), s)
    assert np.all(np.frexp(s)[0] == 0.5)


def test_ragged_nvfp4_block_scales_representable_in_e4m3() -> None:
    x = make_x((4, 1000), 6)
    q = quantize(x, parse_format("nvfp4"))
    s = q.scale.numpy()
    assert q.scale.shape == (4, 63)
    assert np.array_equal(s.astype(ml_dtypes.float8_e4m3fn).astype(F), s)
    assert q.outer is not None and q.outer.shape == (1, 1)
    assert q.outer.item() == pytest.approx(x.abs().max().item() / (6 * 448))


def test_fake_quantize_matches_round_trip_everywhere() -> None:
    x = make_x((3, 1000), 7)
    for family in [
        *(f.format(g=64) for f in GROUP_FAMILIES),
        *FIXED_FAMILIES,
        "fp8_e5m2/tensor",
        "fp3_e2m0/g32",
    ]:
        spec = parse_format(family)
        assert torch.equal(fake_quantize(x, spec), dequantize(quantize(x, spec))), family
