"""The W4A16 prefill's per-weight host work, done once per weight.

Without CUDA graphs (a prefill, whose length varies) the host runs each op's Python before
its kernels can start, and a prefill that is bound by its host leaves the GPU idle. On the
H200 of 2026-11-27 the 4-layer, 2048-token W4A16 prefill took 12.2 ms where its kernels took
9.2 and bf16's whole call 9.3 (``benchmarks/results/gpu_h200_2026-11-27.md``, run 2), and
``qcompile::w4a16_linear`` was the largest host cost in its profile.

Most of a call's host work gives the same answer for a weight at every call: checking the
weight tensors, parsing the format, finding the code table, viewing the codes as words,
building the decode kernel's arguments and flags. A compiled model passes the same weight
tensors to every call, so :func:`prefill` keeps those answers in a plan per weight (keyed on
the ``packed`` tensor object, weakly: a plan goes with its weight) and, for a call the full
path would send to decode-then-cuBLAS, runs just the two launches.

A plan is used only while the call's other weight tensors are the very objects it was built
from, ``packed`` still has its storage and shape (an in-place update of the values is seen,
since the kernels read the tensors themselves), and every choice the full path would make has
been made: the route (:func:`~qcompile.backends.triton.w4a16.route_key`) and the decode
kernel, both timed choices of :mod:`~qcompile.backends.triton.path_tuning`. Anything else -
another device or dtype, fewer rows, an untimed shape, a malformed input - returns None and
the caller takes the full path, which gives the same bits (the same kernels and GEMM) and
raises the errors. ``benchmarks/host_overhead.py`` measures both paths.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.backends.triton import path_tuning
from qcompile.backends.triton import w4a16_dequant as dq
from qcompile.backends.triton.runtime import check_tensor, element_table
from qcompile.backends.triton.w4a16 import _validate, route_key
from qcompile.ops import spec_of

__all__ = ["clear", "plans", "prefill"]

#: ``packed`` -> its plan.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class _Entry:
    """A plan's part for one activation dtype: the decode launch and the route key's parts."""

    __slots__ = ("decode", "route")

    def __init__(self, decode: dq.Fp4Decode, route: tuple) -> None:
        self.decode = decode
        self.route = route  # route_key's arguments after m


class _Plan:
    __slots__ = ("weights", "fmt", "k", "ptr", "shape", "device", "entries", "table",
                 "group_size")

    def __init__(self, packed, weights: tuple, fmt: str, k: int) -> None:
        self.weights = weights  # (scale, scale_neg, zero, outer, bias), compared by identity
        self.fmt, self.k = fmt, k
        self.ptr, self.shape, self.device = packed.data_ptr(), packed.shape, packed.device
        spec = spec_of(fmt)
        self.group_size = spec.group_size if spec.granularity == "group" else k
        # Only FP4 E2M1 has the word kernels; other formats keep the full path.
        self.table = element_table("fp4_e2m1", packed.device) if spec.elem == "fp4_e2m1" \
            else None
        self.entries: dict[torch.dtype, _Entry | None] = {}

    def matches(self, packed, weights: tuple, fmt: str, k: int) -> bool:
        if fmt != self.fmt or k != self.k or packed.data_ptr() != self.ptr \
                or packed.shape != self.shape:
            return False
        for a, b in zip(weights, self.weights, strict=True):
            if a is not b:
                return False
        return True

    def entry(self, x: torch.Tensor, packed: torch.Tensor) -> _Entry | None:
        """This dtype's part, built (and the inputs checked as the full path checks them) at
        its first call; None where the FP4 word kernels do not decode the weight."""
        if x.dtype in self.entries:
            return self.entries[x.dtype]
        scale, neg, zero, outer, bias = self.weights
        made = None
        if self.table is not None:
            n, k, _ = _validate(x, packed, self.table, scale, neg, zero, outer,
                                self.group_size, bias, check_tensor)
            contiguous = all(t is None or t.is_contiguous() for t in self.weights)
            dec = dq.fp4_decode(packed, self.table, scale, neg, zero, outer, self.group_size, k,
                             x.dtype) if contiguous and packed.is_contiguous() else None
            if dec is not None:
                made = _Entry(dec, (n, k, self.group_size, x.dtype, neg is not None,
                                    zero is not None, outer is not None, bias is not None,
                                    True))
        self.entries[x.dtype] = made
        return made


def clear() -> None:
    """Forget every plan (tests)."""
    _PLANS.clear()


def plans() -> int:
    """How many weights have a plan (tests, reports)."""
    return len(_PLANS)


def prefill(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
            scale_neg: torch.Tensor | None, zero: torch.Tensor | None,
            outer: torch.Tensor | None, bias: torch.Tensor | None, fmt: str,
            k: int) -> torch.Tensor | None:
    """``qcompile::w4a16_linear``'s result by decode-then-cuBLAS through the weight's plan, or
    None when the call needs the full path (module docstring).

    Arguments as the op takes them (without its decode fusions), on a device the kernels run
    on.
    """
    if x.dim() < 2 or x.device != packed.device or x.shape[-1] != k or not k:
        return None
    m = x.numel() // k
    if m < dq.DEQUANT_MIN_M:
        return None
    weights = (scale, scale_neg, zero, outer, bias)
    plan = _PLANS.get(packed)
    if plan is None or not plan.matches(packed, weights, fmt, k):
        try:
            plan = _Plan(packed, weights, fmt, k)
        except Exception:  # a malformed format or input: the full path names it
            return None
        _PLANS[packed] = plan
    try:
        entry = plan.entry(x, packed)
    except Exception:  # a malformed input: the full path raises the same error
        return None
    if entry is None:
        return None
    if m <= path_tuning.MAX_M and path_tuning.choice(route_key(m, *entry.route)) != "dequant":
        return None
    dec = entry.decode
    kernel = path_tuning.choice(dec.key)
    if kernel is None:
        return None
    x2 = x.contiguous().view(m, k)
    y = dq.gemm(x2, dec.run(kernel), bias)  # looked up here: benchmarks stand in for it
    return y.view(*x.shape[:-1], dec.n)
