"""The FP8 GEMM's host work, done once per weight: ``qcompile::fp8_linear`` and the W4A8 plans.

``qcompile::fp8_linear`` (W8A8 FP8: the ``fp8-dynamic`` and ``w8a8-fp8`` recipes) calls
:func:`~qcompile.backends.triton.fp8_gemm.fp8_scaled_mm` on every linear's rows: checks of five
tensors, then the autotuned launch (the autotuner's key, Triton's binder, the grid). For the
same weight tensors and the same rows' count and strides, all of that gives the same answers at
every call. A plan per weight (keyed weakly on the ``wq`` tensor object, as the W4A16 and W4A8
plans are) keeps the checked weight tensors and, per row count and strides,
:class:`GemmLaunches`: the GEMM's launch prepared by
:func:`~qcompile.backends.triton.launch.prepare`, to which each call passes the activations,
their scales, the weight and the output. The W4A8 prefill's plans
(:mod:`~qcompile.backends.triton.w4a8_plan`) keep theirs the same way.

A plan is used while the call's other weight tensors are the very objects it was built from
and ``wq`` keeps its storage, shape and strides; anything else (another device, dtype or
format of the activations, a malformed input) returns None and the caller takes the full path,
which raises the errors. Both launch the same kernel with the same arguments, so they give the
same bits.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.backends.triton import fp8_gemm
from qcompile.backends.triton.launch import Prepared, prepare_call
from qcompile.backends.triton.runtime import check_tensor

__all__ = ["GEMMS_PER_PLAN", "GemmLaunches", "clear", "linear", "plans"]

_FP8 = torch.float8_e4m3fn
#: Row counts (with activation strides, output dtype, accumulation) whose GEMM launch a weight
#: keeps; a prefill of a new length past this many replaces the oldest.
GEMMS_PER_PLAN = 8
#: ``wq`` -> its plan.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class GemmLaunches:
    """One weight's FP8 GEMM launches, prepared per row count, activation strides, output
    dtype and accumulation; each holds none of a call's tensors, nor the weight."""

    __slots__ = ("ready",)

    def __init__(self) -> None:
        self.ready: dict[tuple, Prepared] = {}

    def __len__(self) -> int:
        return len(self.ready)

    def keys(self) -> list[tuple]:
        """``(rows, row stride, element stride, out dtype, fast_accum)`` of each launch."""
        return list(self.ready)

    def run(self, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
            b_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
            fast_accum: bool) -> torch.Tensor:
        """:func:`~qcompile.backends.triton.fp8_gemm.scaled_mm_checked` (inputs as it takes
        them; ``b`` and the scales the same tensors at every call), by the prepared launch of
        these rows once it has run."""
        m = a.shape[0]
        key = (m, a.stride(0), a.stride(1), dtype, fast_accum)
        ready = self.ready.get(key)
        if ready is None:
            c = fp8_gemm.scaled_mm_checked(a, a_scale, b, b_scale, bias, dtype, None,
                                           fast_accum)
            if m and b.shape[0]:
                ready = prepare_call(fp8_gemm.mm_call(a, a_scale, b, b_scale, bias, c, None,
                                                      fast_accum))
            if ready is not None:
                if len(self.ready) >= GEMMS_PER_PLAN:
                    del self.ready[next(iter(self.ready))]
                names = ("a_ptr", "b_ptr", "c_ptr", "as_ptr")
                self.ready[key] = ready.vary(*names, *(() if bias is not None
                                                       else ("bias_ptr",)))
            return c
        c = torch.empty(m, b.shape[0], dtype=dtype, device=a.device)
        if bias is None:  # the kernel takes the output as its (unread) bias pointer
            ready(a_ptr=a, b_ptr=b, c_ptr=c, as_ptr=a_scale, bias_ptr=c)
        else:
            ready(a_ptr=a, b_ptr=b, c_ptr=c, as_ptr=a_scale)
        return c


class _Plan:
    __slots__ = ("weights", "ptr", "shape", "stride", "device", "checked", "gemms")

    def __init__(self, wq: torch.Tensor, weights: tuple) -> None:
        self.weights = weights  # (w_scale, bias), compared by identity
        self.ptr, self.shape, self.stride = wq.data_ptr(), wq.shape, wq.stride()
        self.device = wq.device
        self.checked: dict[torch.dtype, tuple | None] = {}  # out dtype -> (w_scale, bias)
        self.gemms = GemmLaunches()

    def matches(self, wq: torch.Tensor, weights: tuple) -> bool:
        return wq.data_ptr() == self.ptr and wq.shape == self.shape \
            and wq.stride() == self.stride \
            and all(a is b for a, b in zip(weights, self.weights, strict=True))

    def tensors(self, wq: torch.Tensor, dtype: torch.dtype) -> tuple | None:
        """``(w_scale, bias)`` as the kernel takes them, checked as ``fp8_scaled_mm`` checks
        them (raises what it raises); None where they would be copies."""
        if dtype in self.checked:
            return self.checked[dtype]
        w_scale, bias = self.weights
        dev = self.device
        fp8_gemm.check_fp8_device(dev)
        check_tensor(wq, "b", (_FP8,), ndim=2, device=dev)
        n = wq.shape[0]
        scale = fp8_gemm.check_scale_vector(w_scale.reshape(-1), "b_scale", n, dev)
        checked_bias = fp8_gemm.check_bias_and_dtype(bias, n, dev, dtype)
        same = scale.data_ptr() == w_scale.data_ptr() and (
            bias is None or checked_bias.data_ptr() == bias.data_ptr())
        made = (scale, checked_bias) if same else None
        self.checked[dtype] = made
        return made


def clear() -> None:
    """Forget every plan (tests)."""
    _PLANS.clear()


def plans() -> int:
    """How many weights have a plan (tests, reports)."""
    return len(_PLANS)


def linear(q: torch.Tensor, q_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, dtype: torch.dtype,
           fast_accum: bool) -> torch.Tensor | None:
    """``qcompile::fp8_linear``'s result through the weight's plan, or None when the call
    needs the full path (module docstring). Arguments as the op takes them, on a device the
    kernels run on."""
    if q.dtype is not _FP8 or q.dim() < 1 or q.device != wq.device or wq.dim() != 2 \
            or q.shape[-1] != wq.shape[1] or not isinstance(q_scale, torch.Tensor) \
            or q_scale.dtype is not torch.float32 or q_scale.device != q.device:
        return None
    k = q.shape[-1]
    m = q.numel() // k if k else 0
    if not k or q_scale.numel() != m:
        return None
    weights = (w_scale, bias)
    plan = _PLANS.get(wq)
    if plan is None or not plan.matches(wq, weights):
        plan = _Plan(wq, weights)
        _PLANS[wq] = plan
    try:
        got = plan.tensors(wq, dtype)
    except Exception:  # a malformed weight: the full path raises the same error
        return None
    if got is None:
        return None
    y = plan.gemms.run(q.reshape(m, k), q_scale.reshape(m).contiguous(), wq, *got, dtype,
                       fast_accum)
    return y.view(*q.shape[:-1], wq.shape[0])
