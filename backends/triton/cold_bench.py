"""Timing a weight-streaming kernel as a decode step runs it: with its weight not in L2.

In a decode step each layer's weights are read once per token, long after the last read of the
same bytes, so a batch-1 GEMV reads them from DRAM. Timing it by replaying the same call (as
``triton.testing.do_bench_cudagraph`` does) keeps a weight of up to the L2's size (50 MB on an
H100: every Llama-3-8B projection but the MLP's up/gate) in L2 after the first replay, which
flatters small shapes and can rank autotune configs by how they read L2 rather than DRAM.

:func:`cold_graph_bench` replays, in one CUDA graph, a read of a buffer twice the L2's size
before each call, and subtracts the time of the reads alone (replayed the same way, in turns
with the first graph): what is left is the call's time on a cold L2. The buffer is only read,
so the call does not also pay for writing back the flush's dirty lines. It is allocated for
each timing (128 MiB on an H100) and goes back to PyTorch's caching allocator after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

__all__ = ["cold_graph_bench", "cold_us", "l2_flush", "replay_ms"]

#: Calls per graph replay, and replays per timing (each gives one sample).
REPEAT = 24
RETRIES = 12
_MIN_FLUSH_BYTES = 128 << 20


def l2_flush(device: torch.device | int | None = None) -> Callable[[], None]:
    """A function that reads ``max(2 x L2, 128 MiB)`` bytes on ``device`` (one reduction
    launch into a preallocated scalar), evicting what an earlier call left in L2."""
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None \
        else torch.device(device)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    l2 = torch.cuda.get_device_properties(index).L2_cache_size
    n = max(2 * l2, _MIN_FLUSH_BYTES) // 4
    buf = torch.zeros(n, dtype=torch.float32, device=f"cuda:{index}")
    out = torch.empty((), dtype=torch.float32, device=f"cuda:{index}")
    return lambda: torch.sum(buf, dim=0, out=out)


def replay_ms(fn: Callable[[], object], repeat: int = REPEAT) -> Callable[[], float]:
    """Capture ``repeat`` calls of ``fn`` in one CUDA graph (after one eager call); the result
    replays it once and returns milliseconds per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles / autotunes outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()

    def replay() -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeat

    return replay


def cold_times(kernel_call: Callable[[], object], flush: Callable[[], object] | None = None,
               retries: int = RETRIES) -> list[float]:
    """``retries`` samples (ms) of ``kernel_call`` on a cold L2: each is one replay of
    [flush, call] x REPEAT less the next replay of [flush] x REPEAT."""
    flush = flush or l2_flush()

    def both() -> None:
        flush()
        kernel_call()

    with_call, alone = replay_ms(both), replay_ms(flush)
    with_call(), alone()  # first replays upload the graphs
    return [with_call() - alone() for _ in range(retries)]


def cold_graph_bench(kernel_call: Callable[[], object],
                     quantiles: list[float] | tuple[float, ...] | None) -> float | list[float]:
    """``do_bench`` for ``triton.autotune`` that times a call on a cold L2 (module docstring):
    the median, or the ``quantiles`` of the samples. Where a CUDA graph cannot be captured
    (the caller is itself being captured) it falls back to ``graph_bench``."""
    from qcompile.backends.triton.runtime import graph_bench, untimed

    if (skip := untimed(quantiles)) is not None:
        return skip
    try:
        samples = torch.tensor(cold_times(kernel_call))
    except RuntimeError as exc:
        log.warning("qcompile autotuning: cold-L2 timing failed (%s); timing hot",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return graph_bench(kernel_call, quantiles)
    samples = samples.clamp_min(0.0)
    if quantiles:
        return [float(torch.quantile(samples, q)) for q in quantiles]
    return float(samples.median())


def cold_us(fn: Callable[[], object]) -> tuple[float, bool]:
    """``(µs, cold)``: the median of :func:`cold_times` of ``fn`` (after one call outside the
    timing: compile, autotune), or Triton's hot ``do_bench`` median where a call cannot be
    captured in a CUDA graph (``cold`` False). For benchmarks."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    try:
        return float(torch.tensor(cold_times(fn)).median()) * 1e3, True
    except RuntimeError:
        torch.cuda.synchronize()
        return do_bench(fn, return_mode="median") * 1e3, False
