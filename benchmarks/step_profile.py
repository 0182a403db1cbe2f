"""Where a decode step's time goes: the kernels (CUDA) or ops (CPU) of one token, from
``torch.profiler``.

``profile_tokens(generate, n, device)`` profiles ``generate(n)`` and ``generate(1)`` (the
prompt's forward and the first token) and takes the second's per-name times from the first's,
which leaves the ``n - 1`` decode steps; each name's time and count are then given per token.
On CUDA the names are kernels (Inductor's, ours, cuBLAS's) and the times are device times, also
inside CUDA-graph replays (CUPTI traces a replayed graph's kernels); elsewhere they are the CPU
ops' self times. ``busy_us_per_token`` (the sum) next to the measured time per token says how
much of a step is launch gaps rather than kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def _times(fn: Callable[[], object], cuda: bool
           ) -> tuple[dict[str, tuple[float, int]], dict[str, tuple[float, int]]]:
    """Self time (us) and call count of every kernel (CUDA; empty elsewhere) and of every CPU
    op that ``fn`` runs: ``(kernels, cpu_ops)``."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    kernels: dict[str, tuple[float, int]] = {}
    ops: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if cuda and e.self_device_time_total > 0:
                kernels[e.key] = (float(e.self_device_time_total), int(e.count))
        elif e.self_cpu_time_total > 0:
            ops[e.key] = (float(e.self_cpu_time_total), int(e.count))
    return kernels, ops


def _what(cuda: bool) -> str:
    return "cuda kernels, device time" if cuda else "cpu ops, self time"


def _ranked(rows: list[dict[str, Any]], key: str) -> tuple[list[dict[str, Any]], float]:
    """``rows`` longest first by ``key``, each with its ``share`` of the total; the total."""
    busy = sum(r[key] for r in rows)
    rows = sorted(rows, key=lambda r: -r[key])
    for r in rows:
        r["share"] = round(r[key] / busy, 4) if busy else 0.0
    return rows, round(busy, 2)


def profile_call(fn: Callable[[], object], device: str, top: int = 40) -> dict[str, Any]:
    """Time and calls of each kernel (CUDA) or op (CPU) in one warm call of ``fn`` (a prefill
    forward, say), longest first: ``{"what", "busy_us", "names", "rows": [{"name", "us",
    "calls", "share"}]}``. On CUDA also ``"host"``: the CPU ops' self times the same way (the
    profiler inflates them; their ranking says where a call that leaves the GPU idle spends
    its host time)."""
    cuda = device.startswith("cuda")
    kernels, ops = _times(fn, cuda)

    def table(times: dict[str, tuple[float, int]]) -> dict[str, Any]:
        rows, busy = _ranked([{"name": name[:160], "us": round(us, 2), "calls": calls}
                              for name, (us, calls) in times.items()], "us")
        return {"busy_us": busy, "names": len(rows), "rows": rows[:top]}

    out = {"what": _what(cuda), **table(kernels if cuda else ops)}
    if cuda:
        out["host"] = {"what": _what(False), **table(ops)}
    return out


def profile_tokens(generate: Callable[[int], object], n: int, device: str,
                   top: int = 40) -> dict[str, Any]:
    """Per-token time and calls of each kernel/op over the decode steps of ``generate(n)``.

    Args:
        generate: Runs a greedy decode of its argument's new tokens (warm: compiled, captured).
        n: New tokens of the long run (>= 2); ``n - 1`` decode steps are profiled.
        device: ``"cuda..."`` for kernel device times, anything else for CPU op times.
        top: How many names to list, longest first (the totals cover all of them).

    Returns:
        ``{"what", "steps", "busy_us_per_token", "names", "rows": [{"name", "us_per_token",
        "calls_per_token", "share"}]}``.
    """
    if n < 2:
        raise ValueError(f"profile_tokens needs n >= 2 new tokens, got {n}")
    cuda = device.startswith("cuda")
    long = _times(lambda: generate(n), cuda)[0 if cuda else 1]
    short = _times(lambda: generate(1), cuda)[0 if cuda else 1]
    steps = n - 1
    rows = []
    for name, (us, calls) in long.items():
        us0, calls0 = short.get(name, (0.0, 0))
        per = (us - us0) / steps
        if per <= 0:
            continue
        rows.append({"name": name[:160], "us_per_token": round(per, 2),
                     "calls_per_token": round((calls - calls0) / steps, 2)})
    rows, busy = _ranked(rows, "us_per_token")
    return {"what": _what(cuda), "steps": steps, "busy_us_per_token": busy, "names": len(rows),
            "rows": rows[:top]}
