"""Where a decode step's time goes: the kernels (CUDA) or ops (CPU) of one token, from
``torch.profiler``.

``profile_tokens(generate, n, device)`` profiles ``generate(n)`` and ``generate(1)`` (the
prompt's forward and the first token) and takes the second's per-name times from the first's,
which leaves the ``n - 1`` decode steps; each name's time and count are then given per token.
On CUDA the names are kernels (Inductor's, ours, cuBLAS's) and the times are device times, also
inside CUDA-graph replays (CUPTI traces a replayed graph's kernels); elsewhere they are the CPU
ops' self times. ``busy_us_per_token`` (the sum) next to the measured time per token says how
much of a step is launch gaps rather than kernels.

``profile_call`` on CUDA also gives the call's device timeline (:func:`device_timeline`): how
long the GPU sat idle between the call's first and last kernel, its longest idle gaps with the
kernels on either side, and which host ops were running while it was idle. A call whose wall
time exceeds its kernel time (the W4A16 prefill on the H200: 12.2 ms against 9.2 ms of
kernels) shows there where the device waited for the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

Span = tuple[str, float, float]  # (name, start us, end us) on the profiler's clock

#: Host events that are the wait itself or the profiler's own work, not a cause of idle time.
_NOT_CAUSES = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "Activity Buffer Request")


def _union(spans: list[Span]) -> list[tuple[float, float]]:
    """The merged busy intervals of ``spans``, in time order."""
    out: list[list[float]] = []
    for _, start, end in sorted(spans, key=lambda s: s[1]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def device_timeline(kernels: list[Span], host: list[Span], top: int = 8) -> dict[str, Any]:
    """Where the device sat idle during one call, from the profiler's event times.

    Args:
        kernels: The device's activities (kernels, copies, memsets).
        host: The host's ops (every nesting level).
        top: How many gaps and host ops to list.

    Returns:
        ``{"lead_us"`` (from the first host op's start to the first kernel's), ``"span_us"``
        (first kernel start to last kernel end), ``"busy_us"`` (their union), ``"idle_us"``
        (span minus busy), ``"gaps"``: the longest idle intervals ``[{"us", "at_us"`` (from
        the first kernel's start), ``"after", "before"`` (the kernels either side)``}]``,
        ``"host_during_idle"``: per host op name, the idle time (the lead included) its calls
        overlapped ``[{"name", "us"}]``, longest first (nested ops all count: the outermost
        holds everything, the innermost named one is the cause)``}``. Empty spans give zeros.
    """
    if not kernels:
        return {"lead_us": 0.0, "span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": [],
                "host_during_idle": []}
    busy = _union(kernels)
    first, last = busy[0][0], busy[-1][1]
    idle = [(a[1], b[0]) for a, b in zip(busy, busy[1:], strict=False)]
    causes = [s for s in host if s[0] not in _NOT_CAUSES]
    lead = max(0.0, first - min((s[1] for s in causes), default=first))

    def name_at(edge: float, i: int) -> str:  # the kernel ending (1: starting) at ``edge``
        return min(kernels, key=lambda s: abs(s[2 - i] - edge))[0][:120]

    per_op: dict[str, float] = {}
    waits = ([(first - lead, first)] if lead else []) + idle  # the lead counts as idle
    for name, start, end in causes:
        lap = sum(max(0.0, min(end, b) - max(start, a)) for a, b in waits)
        if lap > 0:
            per_op[name] = per_op.get(name, 0.0) + lap
    gaps = sorted(idle, key=lambda g: g[0] - g[1])[:top]
    return {
        "lead_us": round(lead, 2),
        "span_us": round(last - first, 2),
        "busy_us": round(sum(b - a for a, b in busy), 2),
        "idle_us": round(sum(b - a for a, b in idle), 2),
        "gaps": [{"us": round(b - a, 2), "at_us": round(a - first, 2),
                  "after": name_at(a, 0), "before": name_at(b, 1)}
                 for a, b in gaps],
        "host_during_idle": [{"name": n[:160], "us": round(us, 2)} for n, us in
                             sorted(per_op.items(), key=lambda kv: -kv[1])[:top]],
    }


def _record(fn: Callable[[], object], cuda: bool):
    """Profile one ``fn()`` (to the device's end on CUDA); the profiler."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return prof


def _spans(prof) -> tuple[list[Span], list[Span]]:
    """``(device spans, host spans)`` of a profile's events."""
    dev: list[Span] = []
    host: list[Span] = []
    for e in prof.events():
        span = (e.name, float(e.time_range.start), float(e.time_range.end))
        (dev if e.device_type == torch.autograd.DeviceType.CUDA else host).append(span)
    return dev, host


def _times(prof, cuda: bool
           ) -> tuple[dict[str, tuple[float, int]], dict[str, tuple[float, int]]]:
    """Self time (us) and call count of every kernel (CUDA; empty elsewhere) and of every CPU
    op that profile ``prof`` recorded: ``(kernels, cpu_ops)``."""
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
    its host time), and ``"timeline"``: :func:`device_timeline` of the call."""
    cuda = device.startswith("cuda")
    prof = _record(fn, cuda)
    kernels, ops = _times(prof, cuda)

    def table(times: dict[str, tuple[float, int]]) -> dict[str, Any]:
        rows, busy = _ranked([{"name": name[:160], "us": round(us, 2), "calls": calls}
                              for name, (us, calls) in times.items()], "us")
        return {"busy_us": busy, "names": len(rows), "rows": rows[:top]}

    out = {"what": _what(cuda), **table(kernels if cuda else ops)}
    if cuda:
        out["host"] = {"what": _what(False), **table(ops)}
        out["timeline"] = device_timeline(*_spans(prof))
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
    long = _times(_record(lambda: generate(n), cuda), cuda)[0 if cuda else 1]
    short = _times(_record(lambda: generate(1), cuda), cuda)[0 if cuda else 1]
    steps = n - 1
    rows = []
    for name, (us, calls) in long.items():
        us0, calls0 = short.get(name, (0.0, 0))
        per = (us - us0) / steps
        if calls <= calls0 and per <= 0:
            continue
        # An op the decode steps call whose times drowned in noise (the short run's longer
        # on a loaded host) still counts its calls, at no time.
        rows.append({"name": name[:160], "us_per_token": round(max(per, 0.0), 2),
                     "calls_per_token": round((calls - calls0) / steps, 2)})
    rows, busy = _ranked(rows, "us_per_token")
    return {"what": _what(cuda), "steps": steps, "busy_us_per_token": busy, "names": len(rows),
            "rows": rows[:top]}
