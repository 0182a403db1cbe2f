"""FP4 -> FP8 scale split for W4A8 (ZeroQuant-FP), without importing triton.

The ``lower-triton`` pass uses it to decide whether a weight can take the W4A8 kernel; the
kernel module and the fused op's reference use the same numbers.
"""

from __future__ import annotations

import torch

from qcompile.errors import FormatError
from qcompile.formats.elements import element_info

__all__ = ["GEXP_RANGE", "W4A8ScaleError", "check_gexp_range", "w4a8_split_scales"]

_FP8 = torch.float8_e4m3fn


class W4A8ScaleError(FormatError):
    """Scales that do not allow an exact FP4 -> FP8 exponent shift (the lowering then keeps
    the weight on another path)."""


def _derive_gexp_range() -> tuple[int, int]:
    """The exponents g with every fp4_e2m1 value x 2^g exact in FP8 E4M3.

    Analytically: the largest, 6 * 2^g, must not pass E4M3's 448 (g <= 6), and the smallest,
    0.5 * 2^g, must lie on the subnormal grid 2^-9 * Z (g >= -8); 1.5 * 2^g then lies on it too.
    Computed here by round trips through torch's float8_e4m3fn so the constant is checked.
    """
    vals = torch.tensor([v for v in element_info("fp4_e2m1").values if v > 0])
    good = []
    for g in range(-24, 25):
        w = torch.ldexp(vals, torch.tensor(float(g)))
        if torch.equal(w.to(_FP8).float(), w):
            good.append(g)
    assert good == list(range(good[0], good[-1] + 1)), good
    return good[0], good[-1]


#: Inclusive range of ``gexp`` where FP4 -> FP8 is exact: (-8, 6).
GEXP_RANGE = _derive_gexp_range()


def check_gexp_range(gexp: torch.Tensor) -> None:
    lo, hi = GEXP_RANGE
    if not gexp.numel():
        return
    bad = (gexp < lo) | (gexp > hi)
    if bool(bad.any()):
        row, grp = (int(i) for i in bad.nonzero()[0])
        raise W4A8ScaleError(
            f"{int(bad.sum())} group exponents lie outside [{lo}, {hi}] (range "
            f"{int(gexp.min())}..{int(gexp.max())}, first gexp[{row}, {grp}] = "
            f"{int(gexp[row, grp])}): fp4 values x 2^gexp would not all be exact in FP8 E4M3 "
            f"(6 * 2^gexp must stay <= 448 and 0.5 * 2^gexp >= 2^-9)")


def w4a8_split_scales(
    scale: torch.Tensor, outer: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """qcompile's ``m2`` / ``po2`` FP4 scales as ``row_scale * 2^gexp``.

    Args:
        scale: fp32 ``[N, G]``: the ``m2`` power-of-two group factors (with ``outer``) or the
            ``po2`` (M1) power-of-two group scales (``outer`` None).
        outer: ``m2`` fp32 row scales ``[N, 1]`` (or ``[N]``), or None for ``po2``, whose row
            scale becomes the row's largest group scale (so ``gexp <= 0``).

    Returns:
        ``(gexp, row_scale)``: int8 ``[N, G]`` and fp32 ``[N]``, on ``scale``'s device.

    Raises:
        W4A8ScaleError: ``scale`` is not a finite fp32 ``[N, G]`` tensor of powers of two,
            ``outer`` is malformed, or some ``gexp`` lies outside :data:`GEXP_RANGE`.
    """
    if not torch.is_tensor(scale) or scale.dtype != torch.float32 or scale.dim() != 2:
        desc = (f"{scale.dtype} tensor of shape {tuple(scale.shape)}" if torch.is_tensor(scale)
                else type(scale).__name__)
        raise W4A8ScaleError(f"W4A8 scale must be an fp32 [N, G] tensor, got a {desc}")
    n = scale.shape[0]
    mant, exp = torch.frexp(scale)
    not_po2 = ~torch.isfinite(scale) | (mant != 0.5)
    if bool(not_po2.any()):
        row, grp = (int(i) for i in not_po2.nonzero()[0])
        raise W4A8ScaleError(
            f"{int(not_po2.sum())} group scales are not powers of two (first scale[{row}, {grp}]"
            f" = {float(scale[row, grp])!r}): W4A8's FP4 -> FP8 exponent shift needs po2 (M1) or"
            f" m2 (M2) scales")
    exp = exp.to(torch.int32) - 1  # frexp mantissa 0.5 -> scale = 2^(exp - 1)
    if outer is None:
        top = exp.amax(dim=1, keepdim=True) if exp.shape[1] else exp.new_zeros(n, 1)
        row_scale = torch.ldexp(torch.ones(n, device=scale.device), top.reshape(n).float())
        gexp = exp - top
    else:
        ok_shape = torch.is_tensor(outer) and tuple(outer.shape) in ((n,), (n, 1))
        if not ok_shape or outer.dtype != torch.float32:
            raise W4A8ScaleError(f"W4A8 outer (m2 row scale) must be fp32 [{n}, 1] or [{n}]")
        row_scale = outer.reshape(n)
        if not bool((torch.isfinite(row_scale) & (row_scale > 0)).all()):
            raise W4A8ScaleError("W4A8 outer (m2 row scale) must be finite and positive")
        gexp = exp
    check_gexp_range(gexp)
    return gexp.to(torch.int8).contiguous(), row_scale.float().contiguous()
