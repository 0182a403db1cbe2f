"""Group statistics and scale computation for every scale type.

Groups run along the last dim: ``g<N>`` rows split into ``k // N`` full groups plus one shorter
last group when ``N`` does not divide ``k``; every statistic of that last group is taken over
only the elements it has. ``channel``/``token`` use the whole row, ``tensor`` the whole tensor
(its scale has shape ``[1] * ndim``).

Scale rules (``a`` = a group's range after clipping by the ratio ``c``, ``L`` = the element's
largest magnitude: ``2^(b-1)-1`` for INT sym, ``fmax`` for FP, 1 for NF):

* required scale ``r``: sym ``c*absmax / L``; INT asym ``(c*max' - c*min') / (2^b - 1)`` with
  ``max' = max(max, 0)``, ``min' = min(min, 0)`` (zero always in range, so the zero point is an
  in-range integer); AFPQ asym: ``c*max' / fmax`` (positive side) and ``c*|min'| / fmax``.
* ``fp32``: ``r``. ``bf16``/``fp16``: ``r`` rounded to that dtype (saturating at its max).
* ``po2`` (M1): ``2^ceil(log2 r)``, i.e. the smallest power of two with ``a / scale <= L``
  as computed in fp32, so nothing clips (INT asym: ``2^ceil(log2 r)``; its zero point rounds
  anyway).
* ``m2`` (M2): row scale ``s_r = max over the row of the unclipped r`` (fp32, stored as
  ``outer``), group factor ``2^ceil(log2(r / s_r))`` capped at 1, again the smallest power
  of two with ``a / (s_r * factor) <= L`` in fp32. For FP elements narrower than 8 bits with at
  most 3 mantissa bits (fp4, fp6, fp3) the factor is also floored at ``2^-9 / g_min``
  (``g_min``: the element's smallest positive value, 2^-8 for fp4_e2m1), so every
  ``element * factor`` is exact in FP8 E4M3: FP4 -> FP8 is a pure exponent shift
  (ZeroQuant-FP M2). Groups that small next to their row keep a slightly coarser grid.
* ``e8m0`` (MX): ``2^(floor(log2 a) - emax)``, exponent clamped to [-127, 127].
* ``e4m3`` (NVFP4): tensor scale ``absmax_tensor / (fmax * 448)`` (``outer``, unclipped),
  block scale = e4m3 rounding of ``a / (fmax * tensor_scale)``.

Outer scales come from unclipped statistics, so each group's clip ratio affects only its own
scale (that keeps per-group clip search exact). A scale that would be zero (all-zero group, or
a rounding underflow) is stored as 1: the group then quantizes to exact zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompile.errors import FormatError
from qcompile.formats.elements import _round_f32
from qcompile.formats.spec import FormatSpec

__all__ = ["GroupStats", "Scales", "block_scale_neighbours", "compute_scales", "expand_groups",
           "group_reduce", "group_stats"]

_Reduce = Callable[..., torch.Tensor]
# Exponent range of po2 / m2 scales: normal fp32 powers of two, storable as int8.
_PO2_MIN_EXP, _PO2_MAX_EXP = -126, 127


def group_reduce(t: torch.Tensor, spec: FormatSpec, op: _Reduce) -> torch.Tensor:
    """Reduce ``t`` per group with ``op`` (``torch.amax``, ``torch.amin``, ``torch.sum``).

    Returns:
        ``[..., G]`` for channel/token/group, ``[1] * ndim`` for tensor.
    """
    if spec.granularity == "tensor":
        if t.numel() == 0:
            return t.new_zeros([1] * t.dim())
        return op(t.reshape(-1), dim=0).reshape([1] * t.dim())
    if spec.granularity != "group":
        return op(t, dim=-1, keepdim=True)
    assert spec.group_size is not None
    g, k = spec.group_size, t.shape[-1]
    full = k // g
    pieces = []
    if full:
        pieces.append(op(t[..., : full * g].reshape(*t.shape[:-1], full, g), dim=-1))
    if k % g:
        pieces.append(op(t[..., full * g :], dim=-1, keepdim=True))
    return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]


def expand_groups(s: torch.Tensor, spec: FormatSpec, k: int) -> torch.Tensor:
    """Broadcast per-group values ``[..., G]`` to per-element ``[..., k]`` (other kinds as-is)."""
    if spec.granularity != "group":
        return s
    assert spec.group_size is not None
    idx = torch.arange(k, device=s.device) // spec.group_size
    return s.index_select(-1, idx)


@dataclass(frozen=True)
class GroupStats:
    """Per-group range: ``hi = max(max(x), 0)``, ``lo = max(-min(x), 0)``."""

    hi: torch.Tensor
    lo: torch.Tensor

    @property
    def amax(self) -> torch.Tensor:
        """Per-group absolute maximum."""
        return torch.maximum(self.hi, self.lo)


def group_stats(x: torch.Tensor, spec: FormatSpec) -> GroupStats:
    """Compute per-group ranges of fp32 ``x``."""
    hi = group_reduce(x, spec, torch.amax).clamp(min=0)
    lo = (-group_reduce(x, spec, torch.amin)).clamp(min=0)
    return GroupStats(hi, lo)


@dataclass(frozen=True)
class Scales:
    """Quantization parameters; see :class:`~qcompile.formats.quantize.QTensor`."""

    scale: torch.Tensor
    scale_neg: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-group effective scales ``scale * outer`` (positive side, negative side)."""
        if self.outer is None:
            return self.scale, self.scale_neg
        neg = None if self.scale_neg is None else self.scale_neg * self.outer
        return self.scale * self.outer, neg


def _ones_where_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def _pow2(e: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e)


def _ceil_pow2_exp(
    r: torch.Tensor, a: torch.Tensor | None, limit: float, base: torch.Tensor | float, hi_exp: int,
    lo_exp: int = _PO2_MIN_EXP,
) -> torch.Tensor:
    """Exponent e of a power-of-two scale, clamped to [lo_exp, hi_exp].

    Without ``a``: ``ceil(log2 r)``. With ``a``: the smallest e with
    ``a / (base * 2^e) <= limit`` as the quantizer computes it in fp32 (``r = a / limit`` was
    rounded, so its ceil-log2 can be one off at a power-of-two boundary).
    """
    m, e = torch.frexp(r)
    e = e - (m == 0.5).to(e.dtype)  # exact powers of two: log2 r is e-1 exactly
    if a is not None:
        fits_lower = a / (base * _pow2(e - 1)) <= limit
        over = a / (base * _pow2(e)) > limit
        e = e - fits_lower.to(e.dtype) + over.to(e.dtype)
    return e.clamp(lo_exp, hi_exp)


def _m2_min_exp(spec: FormatSpec) -> int:
    """Lowest m2 group-factor exponent: keeps FP4/FP6/FP3 x factor exact in FP8 E4M3."""
    info = spec.element
    if info.kind != "fp" or info.bits >= 8 or info.mbits > 3:
        return _PO2_MIN_EXP
    g_min = min(v for v in info.values if v > 0)
    return -9 - math.floor(math.log2(g_min))


def _constrain(
    spec: FormatSpec,
    r: torch.Tensor,
    a: torch.Tensor | None,
    limit: float,
    row_r: torch.Tensor | None,
) -> torch.Tensor:
    """Apply the fp32/bf16/fp16/po2/m2 scale rule to required scales ``r``."""
    if spec.scale == "fp32":
        s = r
    elif spec.scale in ("bf16", "fp16"):
        dtype = torch.bfloat16 if spec.scale == "bf16" else torch.float16
        s = r.clamp(max=torch.finfo(dtype).max).to(dtype).to(torch.float32)
    elif spec.scale == "po2":
        s = _pow2(_ceil_pow2_exp(r, a, limit, 1.0, _PO2_MAX_EXP))
    elif spec.scale == "m2":
        assert row_r is not None
        s = _pow2(_ceil_pow2_exp(r / row_r, a, limit, row_r, 0, _m2_min_exp(spec)))
    else:
        raise FormatError(f"scale type {spec.scale!r} is not a per-group constraint")
    return _ones_where_zero(torch.where(r > 0, s, torch.zeros_like(s)))


def _row_max(t: torch.Tensor) -> torch.Tensor:
    return t.amax(dim=-1, keepdim=True) if t.shape[-1] else t.new_zeros(*t.shape[:-1], 1)


def compute_scales(spec: FormatSpec, st: GroupStats, ratio: torch.Tensor | float | None,
                   outer: torch.Tensor | None = None) -> Scales:
    """Compute scales (and zero point / outer scale) from group stats and clip ratios.

    Args:
        spec: The format.
        st: Unclipped per-group stats.
        ratio: Per-group clip ratios (broadcastable to the stats), a float, or None for 1.
        outer: A fixed outer scale (m2 row scale, nvfp4 tensor scale) to use instead of
            deriving it from ``st``: lets GPTQ compute one group's scales at a time while the
            row/tensor scale stays that of the whole weight. Ignored by other scale types.

    Returns:
        The :class:`Scales` for ``spec``.
    """
    info = spec.element

    def clipped(t: torch.Tensor) -> torch.Tensor:
        return t if ratio is None else t * ratio

    if spec.scale == "e8m0":
        a = clipped(st.amax)
        _, e = torch.frexp(a)
        e = (e - 1 - info.emax).clamp(-127, 127)  # frexp's e-1 is floor(log2 a) for a > 0
        return Scales(_ones_where_zero(torch.where(a > 0, _pow2(e), torch.zeros_like(a))))
    if spec.scale == "e4m3":
        if outer is None:
            tensor_amax = st.amax.amax() if st.amax.numel() else st.amax.new_zeros(())
            outer = _ones_where_zero(
                _fdiv(tensor_amax.reshape([1] * st.amax.dim()), info.max * 448.0))
        block = _round_f32(clipped(st.amax) / (info.max * outer), "fp8_e4m3")
        return Scales(_ones_where_zero(block), outer=outer)

    if info.kind == "int" and spec.asym:
        levels = float((1 << info.bits) - 1)
        hi, lo = clipped(st.hi), clipped(st.lo)
        outer = _m2_row_scale(spec, [_fdiv(st.hi + st.lo, levels)], outer)
        s = _constrain(spec, _fdiv(hi + lo, levels), None, levels, outer)
        zero = torch.round(lo / (s if outer is None else s * outer)).clamp(0, levels)
        return Scales(s, zero=zero, outer=outer)

    limit = info.max
    if not spec.asym:
        a = clipped(st.amax)
        outer = _m2_row_scale(spec, [_fdiv(st.amax, limit)], outer)
        return Scales(_constrain(spec, _fdiv(a, limit), a, limit, outer), outer=outer)
    limit_neg = -info.min  # NF codebooks are not symmetric in count, but span [-1, 1]
    hi, lo = clipped(st.hi), clipped(st.lo)
    outer = _m2_row_scale(spec, [_fdiv(st.hi, limit), _fdiv(st.lo, limit_neg)], outer)
    pos = _constrain(spec, _fdiv(hi, limit), hi, limit, outer)
    neg = _constrain(spec, _fdiv(lo, limit_neg), lo, limit_neg, outer)
    return Scales(pos, scale_neg=neg, outer=outer)


def _fdiv(t: torch.Tensor, c: float) -> torch.Tensor:
    """``t / c`` correctly rounded on every device. PyTorch's CUDA kernel multiplies by the
    reciprocal when the divisor is a Python number, which is an ulp off ``t / c`` for some
    values (so scales, and the codes they give, would differ between CPU and GPU and from
    the kernels' IEEE division); a 0-dim tensor on ``t``'s device takes the true division."""
    return t / torch.tensor(c, dtype=t.dtype, device=t.device)


def block_scale_neighbours(spec: FormatSpec, st: GroupStats, ratio: torch.Tensor | float | None,
                           outer: torch.Tensor | None, target: float | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two block scales on the e8m0/e4m3 grid around each group's exact scale
    ``amax / (target * outer)`` (below-or-equal, above-or-equal; the grid's ends clamp), for
    the ``mse`` choice; ``target`` defaults to the element's max. Groups that are all zero
    get 1 like :func:`compute_scales`."""
    top = spec.element.max if target is None else target
    amax = st.amax if ratio is None else st.amax * ratio
    exact = _fdiv(amax, top) if outer is None else amax / (top * outer)
    if spec.scale == "e8m0":
        _, e = torch.frexp(exact)
        lo = _pow2((e - 1).clamp(-127, 126))
        hi = torch.where(lo == exact, lo, lo * 2.0)
    elif spec.scale == "e4m3":
        grid = _e4m3_grid(exact.device)
        idx = torch.searchsorted(grid, exact.contiguous()).clamp(1, grid.numel() - 1)
        hi, lo = grid[idx], grid[idx - 1]
        lo = torch.where(hi == exact, hi, lo)
    else:
        raise FormatError(f"{spec} has no block-scale grid (mse needs e8m0 or e4m3 scales)")
    zero = exact <= 0
    return (torch.where(zero, torch.ones_like(lo), lo),
            torch.where(zero, torch.ones_like(hi), hi))


def _e4m3_grid(device: torch.device) -> torch.Tensor:
    """Every positive finite FP8 E4M3 value, ascending, fp32."""
    codes = torch.arange(1, 0x7F, dtype=torch.uint8)  # 0x7F is NaN
    return codes.view(torch.float8_e4m3fn).to(torch.float32).to(device)


def _m2_row_scale(spec: FormatSpec, unclipped: list[torch.Tensor],
                  fixed: torch.Tensor | None = None) -> torch.Tensor | None:
    """m2 row scale ``[..., 1]``: the row's largest unclipped required scale (both sides),
    or ``fixed`` when given."""
    if spec.scale != "m2":
        return None
    if fixed is not None:
        return fixed
    row = _row_max(unclipped[0])
    for t in unclipped[1:]:
        row = torch.maximum(row, _row_max(t))
    return _ones_where_zero(row)
