"""The W4A8 prefill's per-weight host work, done once per weight.

On the H100 of 2026-11-27 the 4-layer, 2048-token W4A8 prefill ran 7.60 ms of kernels, less
than bf16's 8.62, yet took 11.14 ms: its GPU sat idle 3.54 ms, waiting for the host
(``benchmarks/results/gpu_h100_2026-11-27b.md``). From
:data:`~qcompile.backends.triton.w4a8_dequant.DEQUANT_MIN_M` rows a ``qcompile::w4a8_linear``
call shifts the FP4 weight to FP8 and runs the FP8 GEMM: two autotuned launches, after checks
of six tensors and a path choice. For the same weight tensors all of that gives the same
answers at every call, except what depends on the rows (their count and strides).

A plan per weight (keyed weakly on the ``packed`` tensor object, as
:mod:`~qcompile.backends.triton.w4a16_plan` does) keeps the checked weight tensors, the
shift's launch prepared by :func:`~qcompile.backends.triton.launch.prepare` (each call passes
the codes and its output) and, per row count and activation strides, the FP8 GEMM's prepared
launch (:class:`~qcompile.backends.triton.fp8_plan.GemmLaunches`: each call passes the
activations, their scales, the shifted weight and the output). A call
then checks its activations, looks its route up and launches.

A plan is used only while the call's other weight tensors are the very objects it was built
from, ``packed`` keeps its storage and shape, and the full path would shift then multiply:
above :data:`~qcompile.backends.triton.path_tuning.MAX_M` rows always; below it where
``path_tuning`` picked that route for the shape, or cannot time (its default from 256 rows).
Anything else (fewer rows, a residual to add, another device or dtype, a shape still to time,
a malformed input) returns None and the caller takes the full path, which raises the errors. Both paths launch the same
kernels with the same arguments, so they give the same bits.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.backends.triton import path_tuning
from qcompile.backends.triton import w4a8_dequant as dq8
from qcompile.backends.triton.fp8_plan import GemmLaunches
from qcompile.backends.triton.launch import Prepared, prepare_call
from qcompile.backends.triton.w4a8 import check_weights, path_key

__all__ = ["clear", "plans", "prefill"]

_FP8 = torch.float8_e4m3fn
#: ``packed`` -> its plan.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class _Plan:
    __slots__ = ("weights", "group_size", "k", "ptr", "shape", "stride", "device", "checked",
                 "shift", "gemms")

    def __init__(self, packed: torch.Tensor, weights: tuple, group_size: int, k: int) -> None:
        self.weights = weights  # (gexp, row_scale, bias), compared by identity
        self.group_size, self.k = group_size, k
        self.ptr, self.shape, self.device = packed.data_ptr(), packed.shape, packed.device
        self.stride = packed.stride()
        # out dtype -> the checked (gexp, row_scale, bias), None where the kernels would
        # take copies (a plan must see in-place updates of the weight: the kernels read it).
        # Never ``packed`` itself: a plan must not keep its key alive.
        self.checked: dict[torch.dtype, tuple | None] = {}
        self.shift: Prepared | None = None
        self.gemms = GemmLaunches()

    def matches(self, packed: torch.Tensor, weights: tuple, group_size: int, k: int) -> bool:
        if group_size != self.group_size or k != self.k or packed.data_ptr() != self.ptr \
                or packed.shape != self.shape or packed.stride() != self.stride:
            return False
        return all(a is b for a, b in zip(weights, self.weights, strict=True))

    def tensors(self, packed: torch.Tensor, dtype: torch.dtype) -> tuple | None:
        """``(gexp, row_scale, bias)`` as the kernels take them, checked with ``packed`` as
        the full path checks them, at the first call with this output dtype (raises what it
        raises); None where they (or ``packed``) would be copies or the weight is empty."""
        if dtype in self.checked:
            return self.checked[dtype]
        gexp, row_scale, bias = self.weights
        got = check_weights(packed, gexp, row_scale, bias, self.group_size, self.k,
                            self.device, dtype)
        same = all(t is None or t.data_ptr() == o.data_ptr()
                   for t, o in zip(got, (packed, gexp, row_scale, bias), strict=True))
        made = got[1:] if same and got[0].shape[0] else None
        self.checked[dtype] = made
        return made

    def shifted(self, packed: torch.Tensor, gexp: torch.Tensor) -> torch.Tensor:
        """The weight as FP8 E4M3 ``[N, K]``, by the shift's prepared launch once it has
        run."""
        n, k = packed.shape[0], self.k
        if self.shift is None:
            w8 = dq8.w4a8_dequant(packed, gexp, self.group_size, k)
            ready = prepare_call(dq8.shift_call(packed, gexp, w8.view(torch.uint8),
                                            self.group_size, k))
            if ready is not None:  # kept per weight: it must hold neither this call's
                # output nor its key, ``packed`` (the plan would keep its weight alive)
                self.shift = ready.vary("packed_ptr", "w_ptr")
            return w8
        w = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
        self.shift(packed_ptr=packed, w_ptr=w)
        return w.view(_FP8)


def clear() -> None:
    """Forget every plan (tests)."""
    _PLANS.clear()


def plans() -> int:
    """How many weights have a plan (tests, reports)."""
    return len(_PLANS)


def prefill(q: torch.Tensor, q_scale: torch.Tensor, packed: torch.Tensor, gexp: torch.Tensor,
            row_scale: torch.Tensor, bias: torch.Tensor | None, group_size: int, k: int,
            dtype: torch.dtype, fast_accum: bool) -> torch.Tensor | None:
    """``qcompile::w4a8_linear``'s result by shift-then-FP8-GEMM through the weight's plan, or
    None when the call needs the full path (module docstring).

    Arguments as the op takes them (without its residual), on a device the kernels run on.
    """
    if q.dtype is not _FP8 or q.dim() < 2 or q.device != packed.device or q.shape[-1] != k \
            or not k or type(group_size) is not int:
        return None
    m = q.numel() // k
    if m < dq8.DEQUANT_MIN_M or not isinstance(q_scale, torch.Tensor) \
            or q_scale.dtype is not torch.float32 or q_scale.device != q.device \
            or q_scale.numel() != m:
        return None
    weights = (gexp, row_scale, bias)
    plan = _PLANS.get(packed)
    if plan is None or not plan.matches(packed, weights, group_size, k):
        plan = _Plan(packed, weights, group_size, k)
        _PLANS[packed] = plan
    try:
        got = plan.tensors(packed, dtype)
    except Exception:  # a malformed weight: the full path raises the same error
        return None
    if got is None:
        return None
    gexp, row_scale, bias = got
    n = packed.shape[0]
    if m <= path_tuning.MAX_M:  # the full path's route: timed, or its default from 256 rows
        route = path_tuning.choice(path_key(m, n, k, group_size, bias is not None, dtype,
                                            fast_accum))
        if route is None and path_tuning.can_time(q.device):
            return None  # the full path times the routes at this call
        if route not in (None, "dequant"):
            return None
    a = q.reshape(m, k)
    a_scale = q_scale.reshape(m).contiguous()
    w8 = plan.shifted(packed, gexp)
    y = plan.gemms.run(a, a_scale, w8, row_scale, bias, dtype, fast_accum)
    return y.view(*q.shape[:-1], n)
