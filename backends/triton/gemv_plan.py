"""The batch-1 GEMVs' host work, done once per weight and call shape.

``generate()`` with a dynamic KV cache decodes without CUDA graphs: every op's Python runs
before its kernels can start, so a decode step of a small batch is bound by its host. A
``qcompile::w4a16_linear`` or ``qcompile::w4a8_linear`` call on one row checks six weight
tensors, parses the format, builds the decode fusion's arguments, looks up the GEMV kernel
(a timed choice), allocates its partial sums and goes through Triton's launch path. With a
stand-in driver on a 2-core CPU that was 54-72 us per call, against about 16 us for a
prepared launch (``benchmarks/host_overhead.py --device fake-cuda --m 1``).

For a weight and a call shape (the row's dtype, the fused prologue and residual, the result's
dtype) every call makes the same launch but for its tensors. So, as
:mod:`~qcompile.backends.triton.rows_plan` does for the per-token quantize, the full path's
launch is recorded (:func:`~qcompile.backends.triton.launch.recording`) and prepared
(:func:`~qcompile.backends.triton.launch.prepare`), and later calls relaunch it with their
own tensors. The per-call tensors are known by their memory: the row, the gate's ``up``,
the residual, the RMSNorm weight, the activation scale, the weight's codes and the result.
The split-K partial sums are the one buffer the full path allocates and does not return;
the GEMV kernels all call it ``part_ptr``, and each call allocates its own. The arrival
counts the kernels sum the partials with are one buffer per device
(:func:`~qcompile.backends.triton.runtime.arrival_counts`): a plan keeps them.

A key's launch is recorded at its second call, not its first: the first tunes (the tiles,
and the kernel among FMA, tensor-core and TMA, timed on the GPU) and would record the timed
candidates' launches too. Nothing is recorded while a CUDA graph is being captured, where
nothing can be timed and the full path runs its defaults. A key whose launch cannot be
prepared after :data:`TRIES` recordings (interpreted kernels, two launches where a split's
partials need the reduce kernel, a profiler's launch hooks) stays on the full path.

A plan is used only while the call's other weight tensors are the very objects it was built
from and ``packed`` keeps its storage, shape and strides (an in-place update of the values is seen:
the kernels read the tensors). A call of another shape, dtype, device or layout is another
key, which the full path answers first and which raises the errors. A prepared launch holds
no per-call tensor and neither ``packed`` nor a view of it, so a plan goes with its weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.backends.triton import runtime
from qcompile.backends.triton.launch import Prepared, prepare_call, record_second_call

__all__ = ["MAX_KEYS", "TRIES", "clear", "plans", "run"]

#: Recordings of a key's launch before it stays on the full path.
TRIES = 3
#: Call shapes kept per weight (the oldest go first).
MAX_KEYS = 8
#: ``packed`` -> its plan.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class _Launch:
    """One call shape's prepared launch: which kernel argument takes which call tensor."""

    __slots__ = ("ready", "roles", "part", "codes")

    def __init__(self, ready: Prepared, roles: tuple, part: tuple | None,
                 codes: torch.dtype) -> None:
        self.ready = ready
        self.roles = roles  # ((argument name, role), ...)
        self.part = part  # (shape, dtype) of the partial sums, None: written into out
        self.codes = codes  # the dtype the kernel reads ``packed`` as (a view of it)


class _Plan:
    __slots__ = ("weights", "ptr", "shape", "stride", "keys")

    def __init__(self, packed: torch.Tensor, weights: tuple) -> None:
        self.weights = weights  # compared by identity
        self.ptr, self.shape, self.stride = packed.data_ptr(), packed.shape, packed.stride()
        # call shape -> its launch, or how often its launch was recorded in vain so far
        self.keys: dict[tuple, _Launch | int] = {}

    def matches(self, packed: torch.Tensor, weights: tuple) -> bool:
        if packed.data_ptr() != self.ptr or packed.shape != self.shape \
                or packed.stride() != self.stride:
            return False
        for a, b in zip(weights, self.weights, strict=True):
            if a is not b:
                return False
        return True


def clear() -> None:
    """Forget every plan (tests)."""
    _PLANS.clear()


def plans() -> int:
    """How many call shapes, over all weights, have a prepared launch (tests, reports)."""
    return sum(isinstance(v, _Launch) for p in list(_PLANS.values()) for v in p.keys.values())


def _sig(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.dtype, t.device, t.is_contiguous())


def run(packed: torch.Tensor, weights: tuple, tag: tuple, n: int, x: torch.Tensor,
        full: Callable[[], torch.Tensor], *, up: torch.Tensor | None = None,
        res: torch.Tensor | None = None, g: torch.Tensor | None = None,
        xs: torch.Tensor | None = None) -> torch.Tensor:
    """One batch-1 GEMV call through its prepared launch, or ``full()`` (the op's full path)
    where there is none yet (module docstring).

    Args:
        packed: The weight's codes (the plan's key).
        weights: The op's other weight tensors (or None), compared by identity.
        tag: The op's constant arguments (name, format, K, output dtype, ...): another tag
            is another call shape.
        n: The weight's rows (the result's last dim).
        x: The one input row ``[..., K]`` (the result has its leading dims).
        full: The op's full path for this call, returning ``[..., N]``.
        up, res, g, xs: The call's gate input, residual, RMSNorm weight and activation scale,
            where given.

    Returns:
        ``[*x.shape[:-1], N]``: what ``full()`` returns, by the same launch.
    """
    plan = _PLANS.get(packed)
    if plan is None or not plan.matches(packed, weights):
        plan = _PLANS[packed] = _Plan(packed, weights)
    key = (tag, _sig(x), _sig(up), _sig(res), _sig(g), _sig(xs), runtime.GEMV_PDL,
           runtime.GEMV1_MMA, runtime.FUSED_REDUCE)
    hit = plan.keys.get(key)
    if isinstance(hit, _Launch):
        return _relaunch(hit, packed, n, x, up, res, g, xs)
    given = {"x": x, "up": up, "res": res, "g": g, "xs": xs}
    return record_second_call(plan.keys, key, MAX_KEYS, TRIES, full,
                              lambda calls, y: _build(calls, packed, y, given),
                              x.is_cuda and torch.cuda.is_current_stream_capturing())


def _relaunch(hit: _Launch, packed: torch.Tensor, n: int, x: torch.Tensor,
              up: torch.Tensor | None, res: torch.Tensor | None, g: torch.Tensor | None,
              xs: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty((1, n), dtype=hit.ready.slots["out_ptr"][1], device=x.device)
    have = {"x": x, "up": up, "res": res, "g": g, "xs": xs, "out": out}
    if hit.part is not None:
        have["part"] = torch.empty(hit.part[0], dtype=hit.part[1], device=x.device)
    have["w"] = packed if hit.codes is torch.uint8 else packed.view(hit.codes)
    hit.ready(**{name: have[role] for name, role in hit.roles})
    return out.view(*x.shape[:-1], n)


def _build(calls: list[tuple], packed: torch.Tensor, y: torch.Tensor,
           given: dict[str, torch.Tensor | None]) -> _Launch | None:
    """The recorded call's launch, prepared with every per-call tensor let go, or None where
    the call made another number of launches, a launch that cannot be prepared, or took a
    copy of a call tensor (its role is then not found)."""
    if len(calls) != 1:
        return None
    ready = prepare_call(calls[0])
    if ready is None or "out_ptr" not in ready.slots or "part_ptr" not in ready.slots:
        return None
    if any(not isinstance(v, torch.Tensor) and hasattr(v, "base") for v in ready.values):
        return None  # a tensor descriptor (the TMA kernel) would hold the weight's codes
    by_ptr: dict[int, str] = {}
    for role, t in (*given.items(), ("out", y)):
        if t is None:
            continue
        if t.data_ptr() in by_ptr:
            return None  # two of the call's tensors share memory: their roles are ambiguous
        by_ptr[t.data_ptr()] = role
    storage = packed.untyped_storage().data_ptr()
    roles, found, part, codes = [], set(), None, None
    for name, (pos, dtype, _) in ready.slots.items():
        v = ready.values[pos]
        if name == "part_ptr" and v.data_ptr() != y.data_ptr():
            roles.append((name, "part"))
            part = (v.shape, v.dtype)
            continue
        if v.untyped_storage().data_ptr() == storage:
            if v.data_ptr() != packed.data_ptr() or v.shape[0] != packed.shape[0]:
                return None  # part of the codes: not one of the views a call can make
            roles.append((name, "w"))
            codes = dtype
            continue
        role = by_ptr.get(v.data_ptr())
        if role is not None:
            roles.append((name, role))
            found.add(role)
    if found != {r for r, t in (*given.items(), ("out", y)) if t is not None} or codes is None:
        return None  # a call tensor or the codes taken as a copy (the plan would keep it)
    return _Launch(ready.vary(*(name for name, _ in roles)), tuple(roles), part, codes)
