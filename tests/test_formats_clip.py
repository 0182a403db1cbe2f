"""Clip-ratio search: per-group optimal, never worse than no clipping, better on real-ish weights."""

from __future__ import annotations

import math

import pytest
import torch

from qcompile.errors import FormatError
from qcompile.formats import DEFAULT_CLIP_GRID, fake_quantize, parse_format, search_clip


def weights_with_outliers(rows: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=gen) * 0.02
    mask = torch.rand(rows, k, generator=gen) < 0.005
    return torch.where(mask, w * 12, w)


def per_group_error(x: torch.Tensor, text: str, clip: torch.Tensor | None) -> torch.Tensor:
    """Squared error per group, summed with a plain loop over (possibly ragged) groups."""
    spec = parse_format(text)
    err = (fake_quantize(x, spec, clip) - x).square()
    if spec.granularity == "tensor":
        return err.sum().reshape(1, 1)
    g = spec.group_size or x.shape[-1]
    return torch.stack([err[:, i : i + g].sum(-1) for i in range(0, x.shape[-1], g)], -1)


FAMILIES = [
    "int4/g128",
    "int4/g128/asym",
    "int3/g64/asym",
    "fp4_e2m1/g128",
    "fp4_e2m1/g128/asym",
    "nf4/g64",
    "nf3/g64/asym",
    "fp4_e2m1/g128/po2",
    "fp4_e2m1/g128/m2",
    "mxfp4",
    "nvfp4",
    "int8/channel",
    "fp8_e4m3/tensor",
]


@pytest.mark.parametrize("text", FAMILIES)
def test_search_never_worse_per_group(text: str) -> None:
    x = weights_with_outliers(48, 576, seed=1)
    ratio = search_clip(x, parse_format(text))
    spec = parse_format(text)
    expected_shape = (1, 1) if spec.granularity == "tensor" else (48, spec.num_groups(576))
    assert ratio.shape == expected_shape and ratio.dtype == torch.float32
    assert set(ratio.unique().tolist()) <= {float(torch.tensor(c)) for c in DEFAULT_CLIP_GRID}
    searched = per_group_error(x, text, ratio)
    unclipped = per_group_error(x, text, None)
    assert (searched <= unclipped).all()
    # The chosen ratio is the grid's per-group minimum (outer scales ignore clipping).
    for c in (0.9, 0.75, 0.5):
        assert (searched <= per_group_error(x, text, torch.full_like(ratio, c))).all()


@pytest.mark.parametrize(
    "text",
    ["int4/g128", "int4/g128/asym", "fp4_e2m1/g128", "fp4_e2m1/g128/asym", "nf4/g64", "nvfp4"],
)
def test_search_strictly_better_in_aggregate(text: str) -> None:
    x = weights_with_outliers(128, 576, seed=2)
    ratio = search_clip(x, parse_format(text))
    assert (ratio < 1).any()
    assert per_group_error(x, text, ratio).sum() < 0.97 * per_group_error(x, text, None).sum()


def test_custom_grid_and_leading_dims() -> None:
    x = weights_with_outliers(6, 200, seed=3).reshape(2, 3, 200)
    ratio = search_clip(x, parse_format("int4/g64/asym"), grid=[0.95, 0.7])
    assert ratio.shape == (2, 3, 4)
    assert set(ratio.unique().tolist()) <= {
        1.0,
        float(torch.tensor(0.95)),
        float(torch.tensor(0.7)),
    }


def test_spec_clip_is_ignored_by_the_search() -> None:
    x = weights_with_outliers(16, 256, seed=4)
    a = search_clip(x, parse_format("int4/g128/asym"))
    b = search_clip(x, parse_format("int4/g128/asym/clip0.5"))
    assert torch.equal(a, b)


def test_default_grid() -> None:
    assert (
        DEFAULT_CLIP_GRID[0] == 1.0
        and DEFAULT_CLIP_GRID[-1] == 0.5
        and len(DEFAULT_CLIP_GRID) == 21
    )


@pytest.mark.parametrize("grid", [[], [0.0], [1.5], [math.nan], [0.9, -0.1]])
def test_bad_grid(grid: list[float]) -> None:
    with pytest.raises(FormatError):
        search_clip(torch.randn(2, 64), parse_format("int4/g32"), grid=grid)


def test_zero_tensor() -> None:
    ratio = search_clip(torch.zeros(3, 100), parse_format("fp4_e2m1/g32/asym"))
    assert torch.equal(ratio, torch.ones(3, 4))


def test_importance_weighted_search_minimizes_weighted_error():
    import torch

    from qcompile.formats import fake_quantize, parse_format, search_clip

    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 200, generator=g)
    w[:, ::37] *= 6  # a few large weights per row
    spec = parse_format("int4/g64/asym")
    imp = w.square()
    c_w = search_clip(w, spec, importance=imp)
    c_plain = search_clip(w, spec)

    def weighted(c):
        return ((fake_quantize(w, spec, clip=c) - w).square() * imp).sum()

    assert weighted(c_w) <= weighted(c_plain)
    assert weighted(c_w) <= weighted(torch.ones_like(c_w))
    # weighting by |w|^2 keeps more range than the plain-MSE optimum
    assert float(c_w.mean()) > float(c_plain.mean())
