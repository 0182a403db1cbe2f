"""``qcompile::quantize_rows``'s host work, done once per row shape.

A W4A8 or FP8 prefill quantizes each linear's input rows before the GEMM: one fused kernel
(the RMSNorm, SiLU-gate or Hadamard prologue with the per-token quantize), one launch. Without
CUDA graphs the op's Python runs before that launch at every call: the format and the fused
variant's checks, the kernel's layout plan, the autotuner's key, Triton's binder, the grid.
On a 2-core CPU with a stand-in driver this was 38-42 us per call
(``benchmarks/host_overhead.py --device fake-cuda --m 2048``), a third of a W4A8 linear's host
time once its weight has a plan (:mod:`~qcompile.backends.triton.w4a8_plan`).

For the same format, Hadamard size, prologue, row shape, dtype and device, every call makes the
same launch but for its tensors. So the first such call runs the full path with
:func:`~qcompile.backends.triton.launch.recording` on, and its launch is prepared
(:func:`~qcompile.backends.triton.launch.prepare`) with the per-call tensors (the rows, the
gate's ``up``, the RMSNorm weight, the codes and scales written) told apart by their memory;
later calls allocate the outputs and relaunch. A prepared launch holds none of those tensors
(a plan must not keep a model's norm weight alive): each call passes its own, and a norm
weight or gate of another shape, dtype or layout is another key.

The key holds the rows' (and ``up``'s) shape and strides: rows read in place at a stride
(the gate and up halves of a fused projection) take a plan, and rows the full path copies
first do not (the launch reads the copy). Any key not seen before takes the full path, which
raises the errors. A key whose launch cannot be prepared (interpreted kernels, a profiler's
launch hooks at its first call, a launch from another thread inside the recording) stays on
the full path without trying again. At most :data:`MAX_PLANS` row shapes are kept (the oldest
go first): a prefill of a new length builds its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from qcompile.backends.triton.launch import Prepared, prepare_call, recording

__all__ = ["MAX_PLANS", "build", "clear", "plans", "quantize"]

#: Row shapes (with their format, prologue, dtype and device) whose launch is kept.
MAX_PLANS = 64
_PLANS: OrderedDict[tuple, _Rows] = OrderedDict()
# Keys whose launch could not be prepared (the oldest forgotten past MAX_PLANS).
_FAILED: OrderedDict[tuple, None] = OrderedDict()


class _Rows:
    __slots__ = ("ready", "roles", "codes")

    def __init__(self, ready: Prepared, roles: tuple, codes: torch.dtype) -> None:
        self.ready, self.roles, self.codes = ready, roles, codes


def _key(x: torch.Tensor, fmt: str, had_size: int, rms_weight: torch.Tensor | None,
         rms_eps: float, up: torch.Tensor | None) -> tuple:
    """What the launch depends on besides the tensors' memory: a norm weight or ``up`` of
    another shape, dtype or layout is another key (the full path checks it)."""
    return (fmt, had_size, x.shape, x.stride(), x.dtype, x.device, rms_eps,
            rms_weight is None or (rms_weight.shape, rms_weight.dtype, rms_weight.stride(),
                                   rms_weight.device),
            up is None or (up.shape, up.stride(), up.dtype, up.device))


def clear() -> None:
    """Forget every plan (tests)."""
    _PLANS.clear()
    _FAILED.clear()


def plans() -> int:
    """How many row shapes have a plan (tests, reports)."""
    return len(_PLANS)


def quantize(x: torch.Tensor, fmt: str, had_size: int, rms_weight: torch.Tensor | None,
             rms_eps: float, up: torch.Tensor | None) -> tuple | None:
    """``qcompile::quantize_rows``'s ``(codes, scales)`` by the prepared launch of these rows,
    or None where the call needs the full path (module docstring). Arguments as the op
    takes them, on a device the kernels run on."""
    plan = _PLANS.get(_key(x, fmt, had_size, rms_weight, rms_eps, up))
    if plan is None:
        return None
    # The same shapes and strides as the prepared call's: its row strides and sizes hold
    # (the kernel reads nothing else of the tensors' shapes).
    shape = x.shape
    y = torch.empty(shape, dtype=plan.codes, device=x.device)
    scale = torch.empty((*shape[:-1], 1), dtype=torch.float32, device=x.device)
    have = {"x": x, "y": y, "scale": scale, "up": up, "w": rms_weight}
    plan.ready(**{name: have[role] for name, role in plan.roles})
    return y, scale


def build(x: torch.Tensor, fmt: str, had_size: int, rms_weight: torch.Tensor | None,
          rms_eps: float, up: torch.Tensor | None, run: Callable[[], tuple]) -> tuple:
    """``run()`` (the full path's fused kernel call for these arguments), with its launch
    kept for :func:`quantize` where it made exactly one that can be prepared."""
    if not x.numel():
        return run()
    key = _key(x, fmt, had_size, rms_weight, rms_eps, up)
    if key in _FAILED:
        return run()
    with recording() as calls:
        out = run()
    ready = prepare_call(calls[0]) if len(calls) == 1 else None
    if ready is None:
        # Interpreted kernels or launch hooks: such keys stay on the full path without
        # trying again at every call.
        _FAILED[key] = None
        while len(_FAILED) > MAX_PLANS:
            _FAILED.popitem(last=False)
        return out
    # Each per-call tensor, known by its memory: the rows, up, the weight and the outputs.
    by_ptr = {x.data_ptr(): "x", out[0].data_ptr(): "y", out[1].data_ptr(): "scale"}
    if up is not None:
        by_ptr[up.data_ptr()] = "up"
    if rms_weight is not None:
        by_ptr[rms_weight.data_ptr()] = "w"
    roles = tuple((name, by_ptr[ready.values[pos].data_ptr()])
                  for name, (pos, _, _) in ready.slots.items()
                  if ready.values[pos].data_ptr() in by_ptr)
    if {role for _, role in roles} != {"x", "y", "scale"} | (set() if up is None else {"up"}) \
            | (set() if rms_weight is None else {"w"}):
        _FAILED[key] = None  # a tensor the launch does not take as itself (a copy)
        return out
    _PLANS[key] = _Rows(ready.vary(*(name for name, _ in roles)), roles, out[0].dtype)
    _PLANS.move_to_end(key)
    while len(_PLANS) > MAX_PLANS:
        _PLANS.popitem(last=False)
    return out
