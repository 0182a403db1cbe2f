"""Choosing between an op's whole implementations by timing them on the device, once per shape.

Above batch 16 the W4A16 and W4A8 linears have several complete paths that compute the same
products (up to fp32 summation order): a tiled GEMM that decodes the 4-bit weight in its main
loop, the same with the decoded weight as the tensor-core MMA's register operand ("swap"),
and decode-once-then-one-GEMM ("dequant"). Which is fastest depends on M, the weight's shape
and the GPU: on an H100 decode-then-cuBLAS ran the 2048-token prefill at 0.80-0.86x of bf16
because it writes and rereads a 16-bit copy of each weight, and at M = 256 the W4A8
shift-then-GEMM path ran at 0.27x of cuBLAS FP8 where the fused kernels avoid the copy. A
fixed M threshold guesses; :func:`pick` measures. Each autotuner still picks its own tiles:
this chooses among the tuned paths.

The first call of each key (the op, M rounded up to a power of two, the weight's shape and
format) runs every candidate once (its own autotuning and compiles), checks that each gives
the default path's result (:func:`agrees`: a path that breaks on some GPU is never chosen),
times each as CUDA-graph replays, and keeps the fastest for the rest of the process. Where
nothing can be timed - not CUDA, a CUDA graph being captured (Inductor's or a decode loop's;
the warm-up calls before a capture do the tuning), or :data:`ENABLED` off - the op's default
path runs and nothing is cached. A candidate that fails for a shape (a kernel out of
resources) is dropped from its key with a debug log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

__all__ = ["ENABLED", "MAX_M", "agrees", "can_time", "choice", "choices", "clear", "pick",
           "timings"]

#: Time the candidate paths (False: every op keeps its default, M-threshold path).
ENABLED = True
#: Largest M timed: above it every path is deep in the compute-bound regime, where decoding
#: the weight once is amortized best, and timing would hold several outputs of gigabytes.
MAX_M = 8192
_CHOICES: dict[tuple, str] = {}
_TIMINGS: dict[tuple, dict[str, float | str]] = {}


def clear() -> None:
    """Forget every choice (tests; benchmarks that compare paths)."""
    _CHOICES.clear()
    _TIMINGS.clear()


def timings() -> dict[tuple, dict[str, float | str]]:
    """What each timed key measured, ``{key: {path: microseconds, or why it was not timed}}``
    (reports: a path that lost is told apart from one that failed or disagreed)."""
    return {key: dict(t) for key, t in _TIMINGS.items()}


def choice(key: tuple) -> str | None:
    """The path kept for ``key``, or None if it has not been timed (a caller's fast path)."""
    return _CHOICES.get(key)


def choices() -> dict[tuple, str]:
    """The choices made so far, ``{key: path}`` (reports)."""
    return dict(_CHOICES)


def agrees(out: object, want: object, tol: float = 0.05) -> bool:
    """Whether a candidate path's result can be the default path's: same shape and dtype,
    finite where it is, and within ``tol`` of its largest magnitude everywhere. The paths
    differ only by fp32 summation order (and FP8 fast accumulation), far inside ``tol``; a
    path that breaks on some GPU or shape (garbage, NaNs) is kept from being chosen."""
    if not (isinstance(out, torch.Tensor) and isinstance(want, torch.Tensor)):
        return out is want
    if out.shape != want.shape or out.dtype != want.dtype:
        return False
    if not want.numel():
        return True
    o, w = out.float(), want.float()
    finite = torch.isfinite(w)
    if not bool(torch.equal(torch.isfinite(o), finite)):
        return False
    scale = float(w[finite].abs().max()) if bool(finite.any()) else 0.0
    return bool(((o - w).abs()[finite] <= tol * scale).all())


def _can_time(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def can_time(device: torch.device) -> bool:
    """Whether :func:`pick` would time candidates on ``device`` now (a caller compiles them
    ahead only then)."""
    return ENABLED and _can_time(device)


def _time_ms(fn: Callable[[], object], cold: bool = False) -> float:
    """Milliseconds per call, replayed in a CUDA graph (host launch costs left out, as in a
    compiled model's replay; eager timing where capture is refused). ``cold``: with L2
    flushed before each call, as a decode step reads its weights
    (:mod:`qcompile.backends.triton.cold_bench`)."""
    if cold:
        from qcompile.backends.triton.cold_bench import cold_graph_bench as bench
    else:
        from qcompile.backends.triton.runtime import graph_bench as bench
    t = bench(fn, None)
    return float(t[0] if isinstance(t, (list, tuple)) else t)


def pick(key: tuple, default: str, paths: tuple[str, ...], run: Callable[[str], object],
         device: torch.device, cold: bool = False) -> str:
    """The path to run for ``key``: the fastest of ``paths``, timed at the first call of the
    key, or ``default`` where timing is not possible (module docstring).

    Args:
        key: Hashable; calls that share it share the choice.
        default: The path when nothing can be timed, and when every candidate fails; the
            others must give its result (:func:`agrees`) to be timed. One of ``paths``.
        paths: The candidate paths' names.
        run: ``run(path)`` runs the op on this call's inputs by that path (called only while
            the key is tuned: a cached choice costs a dictionary lookup).
        device: Where the op runs.
        cold: Time each candidate on a cold L2 (weight-streaming calls such as batch-1
            GEMVs, whose weights a decode step reads from DRAM).

    Returns:
        One of ``paths``.
    """
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    if not ENABLED or len(paths) < 2 or not _can_time(device) or default not in paths:
        return default
    times: dict[str, float] = {}
    notes: dict[str, float | str] = {}
    want = None
    for name in (default, *(p for p in paths if p != default)):
        call = functools.partial(run, name)
        try:
            out = call()  # the path's own autotuning and compiles, outside the timing
            if name == default:
                want = out
            elif want is not None and not agrees(out, want):
                log.warning("qcompile path tuning %s: path %r disagrees with %r on this "
                            "shape; not used", key, name, default)
                notes[name] = f"disagrees with {default}"
                continue
            times[name] = _time_ms(call, cold)
            notes[name] = round(times[name] * 1e3, 2)
        except Exception as exc:  # a path that cannot run this shape is no candidate
            log.debug("path tuning %s: %s failed: %s", key, name, exc)
            notes[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
    best = min(times, key=times.__getitem__) if times else default
    _CHOICES[key] = best
    _TIMINGS[key] = notes
    log.info("qcompile path tuning %s: %s (%s)", key, best,
             ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in sorted(times.items())))
    return best
