"""GPTQ (arXiv 2210.17323) for every weight format of :mod:`qcompile.formats`.

Given a weight ``W [N, K]`` and the Hessian ``H = 2/n * X^T X [K, K]`` of its input, GPTQ
quantizes one column at a time and spreads each column's rounding error over the columns not
yet quantized, using the inverse Hessian's Cholesky factor, so the layer output
``X W^T`` moves as little as possible. Columns go in blocks with lazy updates of the rest.

Scales are decided per group when GPTQ reaches the group (its first column in processing
order), from the group's current, error-updated values: the same rule RTN uses
(:func:`qcompile.formats.scales.compute_scales`), with the row scale of M2 and the tensor scale
of NVFP4 fixed up front from the whole weight. With ``act_order`` (columns by decreasing
Hessian diagonal) a group's columns are scattered over the processing order; its scales are
still fixed at its first column, so every group keeps one set of scales and the stored layout
is unchanged ("static groups"). Ragged rows (a group size that does not divide K) need nothing
special: group ``j`` is columns ``[j*g, min((j+1)*g, K))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.errors import WeightError
from qcompile.formats.quantize import QTensor, _clip_ratio, _fake_quantize_f32, _quantize_f32
from qcompile.formats.scales import GroupStats, Scales, compute_scales, group_stats
from qcompile.formats.spec import FormatSpec

__all__ = ["GPTQResult", "PreparedHessian", "gptq_quantize", "output_error", "prepare",
           "prepare_hessian"]


@dataclass
class GPTQResult:
    """Outcome of :func:`gptq_quantize`.

    Attributes:
        qtensor: The quantized weight (codes and scales, original column order).
        weight: Its dequantized value, fp32 ``[N, K]``.
        damp: The dampening actually added (relative to mean diag(H)); grows when the
            Cholesky factorization needs it.
    """

    qtensor: QTensor
    weight: torch.Tensor
    damp: float


def prepare_hessian(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

    Input channels that never saw a nonzero value (``H[j, j] == 0``) get a unit diagonal so
    they are quantized by rounding and take no error from others. When the factorization
    fails, the dampening is multiplied by 10 (up to 1.0).

    Returns:
        The factor and the dampening used.

    Raises:
        WeightError: The Hessian is not finite or cannot be factorized even at damp 1.0.
    """
    h = h.to(torch.float64).clone()
    if not torch.isfinite(h).all():
        raise WeightError("GPTQ Hessian holds NaN/inf (non-finite calibration activations)")
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    mean = float(diag.mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    d = damp
    while True:
        chol, info = torch.linalg.cholesky_ex(h + (d * mean) * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper.to(torch.float32), d
        if d >= 1.0:
            raise WeightError("GPTQ Hessian is not positive definite even with damp=1.0")
        d = min(d * 10.0 if d > 0 else 1e-4, 1.0)


@dataclass
class PreparedHessian:
    """A Hessian made ready for GPTQ, reusable by every linear that reads the same input.

    Attributes:
        perm: Column processing order (decreasing diagonal with act-order).
        invperm: Its inverse.
        hinv: Upper Cholesky factor of the damped inverse, in ``perm`` order.
        damp: The dampening used.
        diag_k: K.
    """

    perm: torch.Tensor
    invperm: torch.Tensor
    hinv: torch.Tensor
    damp: float
    diag_k: int


def prepare(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True
            ) -> PreparedHessian:
    """Order the columns and factorize the damped inverse Hessian (see
    :func:`prepare_hessian`)."""
    k = hessian.shape[0]
    h = hessian
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        h = h[perm][:, perm]
    else:
        perm = torch.arange(k, device=h.device)
    hinv, used = prepare_hessian(h, damp)
    return PreparedHessian(perm, torch.argsort(perm), hinv, used, k)


def _group_scales(spec: FormatSpec, cols: torch.Tensor, ratio, outer) -> Scales:
    """Scales of one group (``cols [N, c]``) by the format's rule, as ``[N, 1]`` tensors."""
    st = GroupStats(cols.amax(-1, keepdim=True).clamp(min=0),
                    (-cols.amin(-1, keepdim=True)).clamp(min=0))
    return compute_scales(spec, st, ratio, outer)


def _group_slice(sc: Scales, g: int) -> Scales:
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[..., g : g + 1]

    return Scales(sc.scale[..., g : g + 1], pick(sc.scale_neg), pick(sc.zero), sc.outer)


def _cat_scales(parts: list[Scales], outer: torch.Tensor | None) -> Scales:
    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat(ts, dim=-1)  # type: ignore[arg-type]

    return Scales(torch.cat([p.scale for p in parts], dim=-1), cat([p.scale_neg for p in parts]),
                  cat([p.zero for p in parts]), outer)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | PreparedHessian,
    spec: FormatSpec,
    *,
    block: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    clip: torch.Tensor | None = None,
    scales: Scales | None = None,
) -> GPTQResult:
    """Quantize ``w`` with GPTQ.

    Args:
        w: Weight ``[N, K]`` (any float dtype; computed in fp32).
        hessian: ``[K, K]`` input Hessian (``2/n X^T X``), or one already
            :func:`prepare`-d (then ``damp`` and ``act_order`` come from it).
        spec: Weight format; any granularity but ``token``.
        block: Columns per lazy-update block.
        damp: Dampening relative to the mean Hessian diagonal.
        act_order: Process columns by decreasing Hessian diagonal.
        clip: Optional per-group clip ratios ``[N, G]`` applied when a group's scales are
            decided (see :func:`qcompile.formats.clip.search_clip`).
        scales: Use these scales (``[N, G]`` tensors, e.g. refit ones from an earlier round)
            instead of deciding them as GPTQ goes; ``clip`` is then ignored.

    Returns:
        The :class:`GPTQResult`.

    Raises:
        WeightError: ``w`` or ``hessian`` is not finite, or shapes disagree.
    """
    hk = hessian.diag_k if isinstance(hessian, PreparedHessian) else hessian.shape
    if w.dim() != 2 or (hk != w.shape[1] if isinstance(hk, int)
                        else hk != (w.shape[1], w.shape[1])):
        raise WeightError(f"GPTQ needs W [N, K] and H [K, K], got {tuple(w.shape)} and K={hk}")
    if block < 1:
        raise WeightError(f"GPTQ block must be >= 1, got {block}")
    wf = w.detach().to(torch.float32).clone()
    if not torch.isfinite(wf).all():
        raise WeightError(f"weight holds {int((~torch.isfinite(wf)).sum())} NaN/inf values")
    n, k = wf.shape
    full = group_stats(wf, spec)
    ratio = _clip_ratio(spec, clip, full.hi.shape)
    whole = compute_scales(spec, full, ratio)  # fixes outer; is the answer for tensor/channel
    outer = whole.outer
    grouped = spec.granularity == "group"
    gsize = spec.group_size if grouped else k
    assert gsize is not None
    n_groups = -(-k // gsize) if grouped else 1

    ph = hessian if isinstance(hessian, PreparedHessian) else prepare(
        hessian.to(wf.device), damp, act_order)
    perm, invperm, hinv, used_damp = ph.perm, ph.invperm, ph.hinv, ph.damp
    wp = wf[:, perm]
    qp = torch.zeros_like(wp)
    group_of = (perm // gsize).tolist() if grouped else [0] * k
    decided: dict[int, Scales] = {}
    if scales is not None:
        whole, outer = scales, scales.outer
        for g in range(n_groups):
            decided[g] = _group_slice(scales, g) if grouped else scales
    if not grouped:
        decided[0] = whole

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        # The block is kept transposed ([columns, N]) so the per-column update of the rest
        # of the block is one contiguous rank-1 update.
        w1 = wp[:, i1:i2].t().contiguous()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if g not in decided:
                decided[g] = _decide_group(spec, g, gsize, k, invperm, wp, w1, err1, hinv,
                                           i1, i, ratio, outer)
            col = w1[i]
            q = _fake_quantize_f32(col[:, None], spec, decided[g], expand=False)[:, 0]
            qp[:, i1 + i] = q
            e = (col - q) / h1[i, i]
            w1[i:].addr_(h1[i, i:], e, alpha=-1.0)
            err1[i] = e
        wp[:, i2:] -= err1.t() @ hinv[i1:i2, i2:]

    qw = qp[:, invperm]
    scales = _cat_scales([decided[g] for g in range(n_groups)], outer) if grouped else whole
    codes = _quantize_f32(qw, spec, scales).to(torch.uint8)
    qt = QTensor(spec, codes, scales.scale, scales.scale_neg, scales.zero, scales.outer, k)
    return GPTQResult(qt, qw, used_damp)


def _decide_group(spec, g, gsize, k, invperm, wp, w1, err1, hinv, i1, i, ratio, outer) -> Scales:
    """Scales of group ``g`` from its columns' current values (pending updates applied)."""
    pos = invperm[g * gsize : min((g + 1) * gsize, k)]
    i2 = i1 + w1.shape[0]  # w1, err1: the current block, transposed [columns, N]
    cols = wp[:, pos].clone()
    inside = (pos >= i1) & (pos < i2)
    if bool(inside.any()):
        cols[:, inside] = w1[pos[inside] - i1].t()
    outside = ~inside
    if bool(outside.any()) and i > 0:
        # Columns past this block have not yet received this block's updates: apply them.
        cols[:, outside] -= err1[:i].t() @ hinv[i1 : i1 + i][:, pos[outside]]
    r = ratio
    if torch.is_tensor(r) and r.dim() and r.shape[-1] > 1:
        r = r[:, g : g + 1]
    return _group_scales(spec, cols, r, outer)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the layer's summed squared output error on the
    calibration inputs (up to the ``2/n`` in H)."""
    d = (w.float() - w_hat.float()).to(hessian.dtype)
    return float(((d @ hessian) * d).sum())
