"""Refit quantization scales to the calibration data with the codes held fixed.

After GPTQ has chosen every code, the layer's output error on the calibration inputs,
``tr((W - W_hat) H (W - W_hat)^T)``, is a quadratic function of the free scales (per row: the
group scales, or both AFPQ scales of each group, or the M2 row scale). Its minimum is one small
linear solve per row, ``(C^T H C) s = C^T H w`` where column ``u`` of ``C`` holds the decoded
codes that scale ``u`` multiplies. The old scales are a feasible point, so the error cannot
grow; a row whose solve is ill-posed or gives a non-positive scale keeps its old scales.

Scales the format constrains (power-of-two M1 group scales, M2 group factors, MX/NVFP4 block
scales, bf16/fp16 storage) are left alone except the M2 row scale (fp32, free).
"""

from __future__ import annotations

import torch

from qcompile.formats.elements import _decode_f32
from qcompile.formats.quantize import QTensor, dequantize
from qcompile.formats.scales import expand_groups

__all__ = ["refine_scales"]


def _unit_values(q: QTensor) -> torch.Tensor:
    """Decoded codes before any scale: INT ``code - zero`` / ``code + min``, FP the element."""
    info = q.spec.element
    if info.kind == "int":
        c = q.codes.to(torch.float32)
        return c + info.min if q.zero is None else c - expand_groups(q.zero, q.spec, q.k)
    return _decode_f32(q.codes, q.spec.elem)


def _solve(a: torch.Tensor, r: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Batched ``a s = r`` in fp64; rows that fail or go non-positive keep ``old``."""
    a = a.double()
    unused = torch.diagonal(a, dim1=-2, dim2=-1) <= 0
    eye = torch.diag_embed(unused.double())
    sol, info = torch.linalg.solve_ex(a + eye, r.double().unsqueeze(-1))
    sol = sol.squeeze(-1)
    sol = torch.where(unused, old.double(), sol)
    ok = (info == 0) & (sol > 0).all(-1) & torch.isfinite(sol).all(-1)
    return torch.where(ok[:, None], sol, old.double()).to(old.dtype)


def refine_scales(w: torch.Tensor, hessian: torch.Tensor, q: QTensor) -> QTensor:
    """Return ``q`` with free scales refit to minimize the H-weighted error (codes fixed).

    Args:
        w: The original weight ``[N, K]``.
        hessian: ``[K, K]`` input Hessian.
        q: Its quantization (any format; see the module docstring for what is refit).

    Returns:
        A new :class:`QTensor` (or ``q`` itself when nothing is free), whose error
        ``tr((W - W_hat) H (W - W_hat)^T)`` is no larger than ``q``'s.
    """
    spec = q.spec
    if q.codes.dim() != 2:
        return q
    h = hessian.to(torch.float32)
    wf = w.detach().to(torch.float32)
    if spec.scale == "m2":
        return _refine_outer(wf, h, q)
    if spec.scale != "fp32" or spec.granularity == "tensor":
        return q
    v = _unit_values(q)
    n, k = v.shape
    g = spec.group_size if spec.granularity == "group" else k
    assert g is not None
    bounds = [(s, min(s + g, k)) for s in range(0, k, g)]
    sides = [v.clamp(min=0), v.clamp(max=0)] if q.scale_neg is not None else [v]
    cols = [(side, lo, hi) for side in sides for lo, hi in bounds]  # one per free scale
    # T[:, :, u] = C_u @ H restricted to its columns: one [N, g] x [g, K] matmul per scale.
    t = torch.stack([side[:, lo:hi] @ h[lo:hi] for side, lo, hi in cols], dim=-1)  # [N, K, U]
    a = torch.stack([(side[:, lo:hi, None] * t[:, lo:hi]).sum(1) for side, lo, hi in cols], 1)
    wh = wf @ h
    r = torch.stack([(side[:, lo:hi] * wh[:, lo:hi]).sum(-1) for side, lo, hi in cols], -1)
    old = q.scale if q.scale_neg is None else torch.cat([q.scale, q.scale_neg], -1)
    new = _solve(a, r, old)
    groups = len(bounds)
    scale, scale_neg = new[:, :groups], (new[:, groups:] if q.scale_neg is not None else None)
    return QTensor(spec, q.codes, scale.contiguous(), None if scale_neg is None else
                   scale_neg.contiguous(), q.zero, q.outer, q.k)


def _refine_outer(wf: torch.Tensor, h: torch.Tensor, q: QTensor) -> QTensor:
    """M2: refit the fp32 row scale (one unknown per row)."""
    unit = dequantize(QTensor(q.spec, q.codes, q.scale, q.scale_neg, q.zero, None, q.k))
    a = ((unit @ h) * unit).sum(-1, keepdim=True)[:, :, None]
    r = ((wf @ h) * unit).sum(-1, keepdim=True)
    assert q.outer is not None
    new = _solve(a, r, q.outer)
    return QTensor(q.spec, q.codes, q.scale, q.scale_neg, q.zero, new, q.k)
