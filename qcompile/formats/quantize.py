"""Quantize and dequantize tensors along their last dim.

Code meaning inside a :class:`QTensor` (one unpacked ``uint8`` code per element):

* INT sym: offset binary, ``value = (code - 2^(b-1)) * scale``.
* INT asym: the unsigned level, ``value = (code - zero) * scale``.
* FP / NF: the element code (:mod:`qcompile.formats.elements`), ``value = decode(code) * scale``;
  with AFPQ (asym) codes whose decoded value is negative use ``scale_neg`` instead.

``scale`` is per group ``[..., G]`` (``[1] * ndim`` for tensor granularity). The effective
scale of group j is ``scale[..., j] * outer`` where ``outer`` is set (m2 row scale ``[..., 1]``,
nvfp4 tensor scale ``[1] * ndim``); quantization divides by it and dequantization multiplies by
it, both in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qcompile.errors import FormatError, WeightError
from qcompile.formats.elements import _decode_f32, _encode_f32, _round_f32
from qcompile.formats.scales import (
    Scales,
    block_scale_neighbours,
    compute_scales,
    expand_groups,
    group_reduce,
    group_stats,
)
from qcompile.formats.spec import FormatSpec

__all__ = ["QTensor", "dequantize", "fake_quantize", "quantize"]

# Largest accepted |x|: keeps scale * level (and every scale rule's arithmetic) inside fp32.
_MAX_MAGNITUDE = 2.0**126


@dataclass(eq=False)
class QTensor:
    """A quantized tensor: unpacked codes plus the scales needed to decode them.

    Attributes:
        spec: The format.
        codes: ``uint8`` codes, one per element, shape ``[..., K]``.
        scale: fp32 per-group scale ``[..., G]`` (``[1] * ndim`` for tensor granularity):
            the positive-side scale for AFPQ, the power-of-two group factor for m2, the e4m3
            block scale value for nvfp4, the power of two for MX.
        scale_neg: AFPQ negative-side scale ``[..., G]``, else None.
        zero: INT asym zero point (integer-valued fp32) ``[..., G]``, else None.
        outer: fp32 scale multiplying every group scale: m2 row scale ``[..., 1]``, nvfp4
            tensor scale ``[1] * ndim``; else None.
        k: Row length (last-dim size); 0 means "take it from ``codes``".

    Raises:
        FormatError: ``k`` does not match the last dim of ``codes``.
    """

    spec: FormatSpec
    codes: torch.Tensor
    scale: torch.Tensor
    scale_neg: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    k: int = 0

    def __post_init__(self) -> None:
        last = self.codes.shape[-1] if self.codes.dim() else 0
        if self.k == 0:
            self.k = last
        elif self.k != last:
            raise FormatError(f"QTensor k={self.k} but codes have last dim {last}")

    @property
    def shape(self) -> torch.Size:
        """Shape of the original tensor."""
        return self.codes.shape

    @property
    def num_groups(self) -> int:
        """Scales per row."""
        return self.spec.num_groups(self.k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the decoded tensor; see :func:`dequantize`."""
        return dequantize(self, dtype)


def _as_f32(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise FormatError("quantize takes a floating-point tensor")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise FormatError(
            f"quantize needs a tensor with a non-empty last dim, got shape {tuple(x.shape)}"
        )
    xf = x.detach().to(torch.float32)
    amax = float(xf.abs().amax()) if xf.numel() else 0.0  # NaN-propagating
    if not math.isfinite(amax):
        bad = ~torch.isfinite(xf)
        n_nan = int(torch.isnan(xf).sum())
        n_inf = int(bad.sum()) - n_nan
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise WeightError(
            f"cannot quantize a tensor holding {n_nan} NaN and {n_inf} inf values "
            f"(first at index {first}, shape {tuple(x.shape)})"
        )
    if amax >= _MAX_MAGNITUDE:
        raise WeightError(
            f"cannot quantize values of magnitude {amax:.3g}: at or above 2^126 scaled values "
            "could overflow fp32 on dequantization"
        )
    return xf


def _clip_ratio(
    spec: FormatSpec, clip: torch.Tensor | None, stats_shape: torch.Size
) -> torch.Tensor | float | None:
    if clip is None:
        return None if spec.clip == 1.0 else spec.clip
    if not torch.is_tensor(clip):
        raise FormatError(f"clip must be a tensor of per-group ratios, got {type(clip).__name__}")
    ratio = clip.detach().to(torch.float32)
    try:
        ok = torch.broadcast_shapes(ratio.shape, stats_shape) == stats_shape
    except RuntimeError:
        ok = False
    if not ok:
        raise FormatError(
            f"clip shape {tuple(ratio.shape)} does not broadcast to the group shape {tuple(stats_shape)}"
        )
    if ratio.numel() and not bool(((ratio > 0) & (ratio <= 1)).all()):
        raise FormatError("clip ratios must lie in (0, 1]")
    return ratio


def _scales(xf: torch.Tensor, spec: FormatSpec, clip: torch.Tensor | None) -> Scales:
    """:func:`compute_scales` of ``xf``; with ``spec.mse`` each group's block scale is the
    grid neighbour of its exact scale (and, with ``spec.mse_max``, of the scale putting its
    absmax on ``mse_max``) with the smallest squared round-trip error."""
    st = group_stats(xf, spec)
    ratio = _clip_ratio(spec, clip, st.hi.shape)
    sc = compute_scales(spec, st, ratio)
    if not spec.mse:
        return sc
    # Candidates in a fixed order; a later one wins only when strictly better, so ties keep
    # the lower neighbour of the element-max scale.
    targets = (None,) if spec.mse_max is None else (None, spec.mse_max)
    best = best_err = None
    for target in targets:
        for s in block_scale_neighbours(spec, st, ratio, sc.outer, target):
            err = group_reduce(
                (_fake_quantize_f32(xf, spec, Scales(s, outer=sc.outer)) - xf).square(),
                spec, torch.sum)
            if best is None:
                best, best_err = s, err
            else:
                take = err < best_err
                best, best_err = torch.where(take, s, best), torch.where(take, err, best_err)
    return Scales(best, outer=sc.outer)


def _quantize_f32(xf: torch.Tensor, spec: FormatSpec, sc: Scales) -> torch.Tensor:
    """int64 codes of fp32 ``xf`` under scales ``sc``."""
    k = xf.shape[-1]
    eff, eff_neg = sc.effective()
    info = spec.element
    if info.kind == "int":
        q = torch.round(xf / expand_groups(eff, spec, k))
        if sc.zero is None:
            return q.clamp_(info.min, info.max).sub_(info.min).to(torch.int64)
        q = q.add_(expand_groups(sc.zero, spec, k)).clamp_(0, (1 << info.bits) - 1)
        return q.to(torch.int64)
    if eff_neg is None:
        return _encode_f32(xf / expand_groups(eff, spec, k), spec.elem)
    y = torch.where(xf < 0, xf / expand_groups(eff_neg, spec, k), xf / expand_groups(eff, spec, k))
    return _encode_f32(y, spec.elem)


def _fake_quantize_f32(xf: torch.Tensor, spec: FormatSpec, sc: Scales,
                       expand: bool = True) -> torch.Tensor:
    """fp32 round trip of ``xf`` under ``sc``, without materializing codes where avoidable.

    With ``expand=False`` the scales are used as given (already broadcastable to ``xf``).
    """
    k = xf.shape[-1]
    eff, eff_neg = sc.effective()
    info = spec.element

    def ex(t: torch.Tensor) -> torch.Tensor:
        return expand_groups(t, spec, k) if expand else t

    e = ex(eff)
    if info.kind == "int":
        q = torch.round(xf / e)
        if sc.zero is None:
            return q.clamp_(info.min, info.max).mul_(e)
        z = ex(sc.zero)
        return q.add_(z).clamp_(0, (1 << info.bits) - 1).sub_(z).mul_(e)
    if eff_neg is None:
        return _round_f32(xf / e, spec.elem).mul_(e)
    en = ex(eff_neg)
    v = _round_f32(torch.where(xf < 0, xf / en, xf / e), spec.elem)
    return torch.where(v < 0, v * en, v * e)


def quantize(x: torch.Tensor, spec: FormatSpec, clip: torch.Tensor | None = None) -> QTensor:
    """Quantize ``x`` along its last dim.

    Args:
        x: Floating-point tensor, any leading dims, last dim ``K >= 1``.
        spec: The format.
        clip: Optional per-group clip ratios in (0, 1], broadcastable to ``[..., G]``
            (``[1] * ndim`` for tensor granularity); overrides ``spec.clip``.

    Returns:
        The :class:`QTensor`.

    Raises:
        WeightError: ``x`` holds NaN or inf, or a magnitude of 2^126 or more.
        FormatError: ``x`` is not a floating tensor with a non-empty last dim, or ``clip``
            is malformed.
    """
    xf = _as_f32(x)
    sc = _scales(xf, spec, clip)
    codes = _quantize_f32(xf, spec, sc).to(torch.uint8)
    return QTensor(spec, codes, sc.scale, sc.scale_neg, sc.zero, sc.outer, xf.shape[-1])


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a :class:`QTensor`.

    Args:
        q: The quantized tensor.
        dtype: Output dtype (computed in fp32, cast at the end).

    Returns:
        Tensor of ``q.codes``'s shape.

    Raises:
        FormatError: ``q.codes`` is not ``uint8``.
    """
    if q.codes.dtype != torch.uint8:
        raise FormatError(f"QTensor codes must be uint8, got {q.codes.dtype}")
    spec, k = q.spec, q.k
    sc = Scales(q.scale, q.scale_neg, q.zero, q.outer)
    eff, eff_neg = sc.effective()
    e = expand_groups(eff, spec, k)
    info = spec.element
    if info.kind == "int":
        c = q.codes.to(torch.float32)
        v = c + info.min if q.zero is None else c - expand_groups(q.zero, spec, k)
        return (v * e).to(dtype)
    v = _decode_f32(q.codes, spec.elem)
    if eff_neg is None:
        return (v * e).to(dtype)
    return torch.where(v < 0, v * expand_groups(eff_neg, spec, k), v * e).to(dtype)


def fake_quantize(
    x: torch.Tensor, spec: FormatSpec, clip: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize, returning ``x``'s dtype: ``dequantize(quantize(x, spec, clip))``.

    Args:
        x: Floating-point tensor.
        spec: The format.
        clip: Optional per-group clip ratios (see :func:`quantize`).

    Raises:
        WeightError: ``x`` holds NaN or inf.
        FormatError: As :func:`quantize`.
    """
    xf = _as_f32(x)
    return _fake_quantize_f32(xf, spec, _scales(xf, spec, clip)).to(x.dtype)
