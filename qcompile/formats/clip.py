"""Per-group clipping-ratio search (MSE-optimal range shrinking for RTN quantization)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qcompile.errors import FormatError
from qcompile.formats.quantize import _as_f32, _fake_quantize_f32
from qcompile.formats.scales import compute_scales, group_reduce, group_stats
from qcompile.formats.spec import FormatSpec

__all__ = ["DEFAULT_CLIP_GRID", "search_clip"]

#: 1.0 down to 0.5 in steps of 0.025 (21 ratios).
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))


def search_clip(
    x: torch.Tensor,
    spec: FormatSpec,
    grid: Sequence[float] | None = None,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Find, per group, the clip ratio minimizing the squared error of :func:`fake_quantize`.

    Ratio 1.0 is always tried first and ties keep the earlier ratio, so every group's error
    is never above its unclipped error. Each group's scale depends only on its own ratio
    (outer m2/nvfp4 scales use unclipped stats), so per-group choices are exact.
    ``spec.clip`` is ignored: the search replaces it.

    Args:
        x: Floating-point tensor (e.g. a weight ``[out, in]``); groups along the last dim.
        spec: The format.
        grid: Candidate ratios in (0, 1]; default :data:`DEFAULT_CLIP_GRID`.
        importance: Optional non-negative weights broadcastable to ``x`` (e.g. ``x**2``, or
            the mean squared input of each weight column from calibration); the search then
            minimizes the weighted squared error per group.

    Returns:
        fp32 ratios ``[..., G]`` (``[1] * ndim`` for tensor granularity), ready for the
        ``clip`` argument of :func:`~qcompile.formats.quantize.quantize`.

    Raises:
        WeightError: ``x`` holds NaN or inf.
        FormatError: A grid value is outside (0, 1] or the grid is empty.
    """
    candidates = list(DEFAULT_CLIP_GRID if grid is None else grid)
    if not candidates:
        raise FormatError("clip search grid is empty; give ratios in (0, 1]")
    for c in candidates:
        if (
            isinstance(c, bool)
            or not isinstance(c, (int, float))
            or not (math.isfinite(c) and 0 < c <= 1)
        ):
            raise FormatError(f"clip search grid value {c!r} outside (0, 1]")
    xf = _as_f32(x)
    imp = None if importance is None else torch.broadcast_to(importance.float(), xf.shape)
    st = group_stats(xf, spec)
    best_ratio = torch.ones_like(st.hi)
    best_err: torch.Tensor | None = None
    for c in [1.0, *(float(c) for c in candidates if c != 1.0)]:
        err = _group_error(xf, spec, st, c, imp)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, c), best_ratio)
    return best_ratio


def _group_error(
    xf: torch.Tensor, spec: FormatSpec, st, ratio: float, imp: torch.Tensor | None
) -> torch.Tensor:
    deq = _fake_quantize_f32(xf, spec, compute_scales(spec, st, None if ratio == 1.0 else ratio))
    err = (deq - xf).square_()
    if imp is not None:
        err = err.mul_(imp)
    return group_reduce(err, spec, torch.sum)
