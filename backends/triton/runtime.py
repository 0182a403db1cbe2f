"""Shared kernel runtime: availability, input checks and small ``@triton.jit`` helpers.

Importing this module does not import triton; the ``@triton.jit`` helpers live in
:mod:`qcompile.backends.triton.jit`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence

import torch

from qcompile.device_cache import outside_graph_pools
from qcompile.errors import FormatError
from qcompile.formats.elements import element_info

log = logging.getLogger(__name__)

__all__ = [
    "FUSED_REDUCE",
    "GEMV1_MMA",
    "GEMV_PDL",
    "KernelInputError",
    "arrival_counts",
    "cdiv",
    "check_tensor",
    "compile_ahead",
    "compile_threads",
    "element_table",
    "gemv_switches",
    "graph_bench",
    "plain_bench",
    "untimed",
    "interpreting",
    "kernel_device",
    "next_pow2",
    "sm_count",
    "triton_available",
    "tuning",
]


class KernelInputError(ValueError):
    """A kernel wrapper was given a tensor of the wrong dtype, shape, device or layout."""


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not a hard dependency; looked
    up once: kernel wrappers ask on every call)."""
    return importlib.util.find_spec("triton") is not None


# os.environ's raw bytes mapping on POSIX (kept in step by os.environ's setters, so
# monkeypatched variables are seen): a lookup there skips the str encode/decode of
# os.environ.get, a fifth of a microsecond that wrappers paid several times per launch.
_RAW_ENV = getattr(os.environ, "_data", None) if os.name == "posix" else None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if _RAW_ENV is not None:
        return _RAW_ENV.get(b"TRITON_INTERPRET", b"0") not in (b"", b"0")
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuning(prune=None, kernel=None) -> dict:
    """``prune_configs_by`` for ``triton.autotune``: ``prune`` (or keep all), and with
    ``QCOMPILE_TRITON_TUNE=first`` in the environment only the first config that survives it.
    With the autotuned ``kernel`` given, the configs kept are compiled on a thread pool
    (:func:`compile_ahead`) before the autotuner times them one after another.

    The variable is for test runs on a GPU: the numerics grid then compiles one config per
    kernel and shape instead of every candidate (each config's numerics are checked once
    elsewhere); it is read at each autotuning, so it never changes a normal run.
    """

    def early_config_prune(configs, named_args, **kwargs):
        kept = list(prune(configs, named_args, **kwargs)) if prune is not None else list(configs)
        kept = kept[:1] if os.environ.get("QCOMPILE_TRITON_TUNE") == "first" else kept
        if kernel is not None and len(kept) > 1:
            compile_ahead(kernel, kept, named_args, kwargs)
        # Read by this autotuning's do_bench (untimed), where Triton times one config at all.
        _PRUNED.single = len(kept) == 1 and _times_one_config()
        return kept

    return {"early_config_prune": early_config_prune}


#: Per thread: whether the autotuning in progress kept a single config (:func:`tuning`).
_PRUNED = threading.local()


@functools.cache
def _times_one_config() -> bool:
    """Whether this Triton's autotuner times the configs of a key whose pruning left one
    (3.6 does; 3.9 checks ``len(pruned_configs) == 1`` and skips the timing). Only then is a
    single-config pruning marked, so the mark is always used by the timing right after it
    and none is left for a later call."""
    import inspect

    from triton.runtime.autotuner import Autotuner

    try:
        return "len(pruned_configs) == 1" not in inspect.getsource(Autotuner.run)
    except (OSError, TypeError):  # no source: assume it times, as 3.6 does
        return True


def untimed(quantiles) -> float | list[float] | None:
    """Stand-in times when the autotuning in progress on this thread kept one config, else
    None; the mark is used up. Triton 3.6 (the GPU image's) times a key's configs even when
    pruning leaves one, where 3.9 skips that: an eager ``do_bench`` of 125 ms or a cold-L2
    timing per kernel and shape, spent on no choice. Every qcompile autotuner's ``do_bench``
    (:func:`graph_bench`, :func:`plain_bench`, ``cold_bench.cold_graph_bench``) asks first."""
    if not getattr(_PRUNED, "single", False):
        return None
    _PRUNED.single = False
    return [0.0] * len(quantiles) if quantiles else 0.0


def plain_bench(kernel_call, quantiles):
    """``do_bench`` for ``triton.autotune``: Triton's own (eager timing), without the timing of
    a single config (:func:`untimed`)."""
    if (skip := untimed(quantiles)) is not None:
        return skip
    from triton.testing import do_bench

    return do_bench(kernel_call, quantiles=quantiles)


def compile_threads() -> int:
    """Threads for :func:`compile_ahead`: ``QCOMPILE_COMPILE_THREADS``, else the CPUs (at most
    16); 1 turns it off."""
    env = os.environ.get("QCOMPILE_COMPILE_THREADS", "")
    if env.strip():
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"QCOMPILE_COMPILE_THREADS must be a positive integer, got "
                             f"{env!r}") from None
    return min(16, os.cpu_count() or 1)


def compile_ahead(kernel, configs, named_args: dict, kwargs: dict) -> int:
    """Compile ``kernel`` for each of an autotuner's ``configs`` at once, on a thread pool.

    An autotuner compiles each candidate when it first times it, one after another: the
    batch-1 GEMVs have up to 32 candidates per shape, and a Llama-3-8B-shaped model's first
    decode step spent about 40 s compiling them on an H100 host. Triton's asynchronous
    compile mode runs the compiles (their ``ptxas`` runs, their C++ passes) in parallel and
    leaves the kernels in the JIT cache, where the timing then finds them. A config that fails
    to compile here is skipped: the autotuner compiles it again and handles the error as
    usual. Nothing happens under the interpreter, with one thread, or on a Triton without
    the asynchronous mode.

    Returns:
        How many compiles were submitted.
    """
    # The autotuner hands its pruning the launch's own grid and warmup flag: not the kernel's.
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    return warm_all(kernel, [((1,), (), {**named_args, **kwargs, **cfg.all_kwargs()})
                             for cfg in configs])


def warm_all(kernel, calls: list[tuple[tuple, tuple, dict]]) -> int:
    """Compile ``kernel`` for each ``(grid, args, kwargs)`` of ``calls`` (a launch's
    arguments, constexprs and options) at once on a thread pool, as :func:`compile_ahead`
    does for an autotuner's configs; for candidates whose arguments differ per config (a
    TMA descriptor's block shape). Compile errors are left for the launch to meet; nothing
    happens under the interpreter, with one thread, or without Triton's asynchronous mode.

    Returns:
        How many compiles were submitted.
    """
    threads = compile_threads()
    if threads < 2 or interpreting() or len(calls) < 2:
        return 0
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return 0
    submitted = 0
    try:
        with ThreadPoolExecutor(min(threads, len(calls))) as pool, \
                AsyncCompileMode(pool, ignore_errors=True):
            for grid, args, kwargs in calls:
                try:
                    kernel.warmup(*args, grid=grid, **kwargs)
                    submitted += 1
                except Exception as exc:  # the launch meets it again and reports it
                    log.debug("warm_all: %s %s: %s", getattr(kernel, "__name__", kernel),
                              kwargs, exc)
    except RuntimeError as exc:  # another asynchronous compile mode is active
        log.debug("warm_all skipped: %s", exc)
    return submitted


def graph_bench(kernel_call, quantiles):
    """``do_bench`` for ``triton.autotune`` that times CUDA-graph replays. For kernels of a few
    microseconds (batch-1 GEMVs, per-token quantize) eager timing measures the host's launch
    path, the same for every config, and the autotuner then picks at random: measured on an
    H100, the tuned batch-1 GEMV ran 61 us where its best config runs 29 us."""
    if (skip := untimed(quantiles)) is not None:
        return skip
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)
    except RuntimeError as exc:
        # A graph capture can be refused where the caller is itself being run under CUDA
        # graphs (e.g. an Inductor cudagraph-tree warm-up): eager timing still picks a config
        # that works, where failing would abort the compiled model's first call.
        log.warning("qcompile autotuning: CUDA-graph timing failed (%s); timing eagerly",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return do_bench(kernel_call, quantiles=quantiles)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code. ``triton.cdiv`` is a constexpr function in recent Triton
    releases, and each call costs about a microsecond of wrapping in every launch's grid."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): ``triton.next_power_of_2``
    without its per-call constexpr wrapping."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_GEMV1_KERNELS = {"fma": False, "mma": True, "tma": "tma", "auto": "auto"}


def gemv_switches(env: dict[str, str]) -> tuple[bool | str, bool]:
    """``(GEMV1_MMA, GEMV_PDL)`` from ``QCOMPILE_GEMV1`` (``fma``, ``mma``, ``tma`` or ``auto``;
    default ``fma``) and ``QCOMPILE_GEMV_PDL`` (``0`` or ``1``; default ``1``) in ``env``.

    Raises:
        ValueError: A value other than those, naming the variable and the value.
    """
    kernel = env.get("QCOMPILE_GEMV1", "fma") or "fma"
    if kernel not in _GEMV1_KERNELS:
        raise ValueError(f"QCOMPILE_GEMV1 must be one of {', '.join(_GEMV1_KERNELS)}, got "
                         f"{kernel!r}")
    return _GEMV1_KERNELS[kernel], _switch(env, "QCOMPILE_GEMV_PDL", "1")


def _switch(env: dict[str, str], name: str, default: str) -> bool:
    """The ``0``/``1`` variable ``name`` of ``env`` (``default`` when unset or empty).

    Raises:
        ValueError: Another value, naming the variable and the value.
    """
    value = env.get(name, default) or default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


#: Batch-1 FP4 GEMVs on tensor cores (``w4a16_gemv_mma``) where eligible: True always,
#: ``"tma"``: the persistent TMA kernel (``w4a16_gemv_tma``) instead, ``"auto"``: whichever
#: of the three times fastest at the shape's first call (``path_tuning``, cold L2), False:
#: the FMA kernel. False by default: in the H200 decode run with ``auto``
#: (``benchmarks/results/gpu_h200_2026-11-27.md``) the FMA kernel won all four Llama-3-8B
#: shapes over the tensor-core one; the TMA kernel is not yet timed
#: (``benchmarks/kernels_w4a16.py`` times all three; ``benchmarks/decode.py --gemv1``).
#: Its start value comes from ``QCOMPILE_GEMV1`` (:func:`gemv_switches`).
GEMV1_MMA: bool | str
#: Batch-1 GEMVs launch as programmatic dependents where the GPU and Triton allow it (sm_90+,
#: ``launch_pdl``): each prefetches its first weight lines and waits for the previous kernel
#: inside the kernel (:mod:`qcompile.backends.triton.pdl`). On by default: in two H200 decode
#: runs (``benchmarks/results/gpu_h200_2026-11-27.md``) it gained 2.3 % and 9.0 % tokens/s
#: at 4 layers, with the same 64 greedy tokens as without it and no GPU test failing. Its
#: start value comes from ``QCOMPILE_GEMV_PDL`` (``0`` turns it off).
GEMV_PDL: bool
GEMV1_MMA, GEMV_PDL = gemv_switches(os.environ)


def attention_pdl_switch(env: dict[str, str]) -> bool:
    """``ATTN_PDL`` from ``QCOMPILE_ATTN_PDL`` (``0`` or ``1``; default ``0``) in ``env``.

    Raises:
        ValueError: Another value, naming the variable and the value.
    """
    return _switch(env, "QCOMPILE_ATTN_PDL", "0")


#: The decode attention kernel launches as a programmatic dependent too (sm_90+), so the
#: ``o_proj`` GEMV after it can launch early and prefetch its weights while it runs, and its
#: own programs start during the kernel before it (:mod:`qcompile.backends.triton.pdl`).
#: Off by default until a GPU has timed it (``benchmarks/decode.py``'s ``-apdl`` variants);
#: its start value comes from ``QCOMPILE_ATTN_PDL`` (:func:`attention_pdl_switch`).
ATTN_PDL: bool = attention_pdl_switch(os.environ)

#: Split-K GEMVs sum their partials in the last program of each column tile (arrival counts,
#: :func:`arrival_counts`): one launch per call instead of two, the same bits. False: a
#: separate reduce kernel (benchmarks compare the two).
FUSED_REDUCE = True
_COUNT_SLOTS = 1 << 16  # column tiles: N up to a million at BLOCK_N = 16
_COUNTS: dict[tuple[str, int], torch.Tensor] = {}


def arrival_counts(device: torch.device, tiles: int) -> torch.Tensor | None:
    """Zeroed int32 arrival counts for a split-K kernel of ``tiles`` column tiles that sums
    its partials in place, or None where it should launch its reduce kernel instead
    (:data:`FUSED_REDUCE` off, more tiles than slots, or a CUDA graph being captured before
    the counts exist). Made once per device outside CUDA-graph pools; every kernel leaves its
    counts at zero.

    One set per device, shared by every call: split-K launches that run at the same time on
    two streams of one device are not supported (as with any one-workspace split-K GEMM).
    """
    if not FUSED_REDUCE or tiles > _COUNT_SLOTS:
        return None
    index = ((device.index if device.index is not None else torch.cuda.current_device())
             if device.type == "cuda" else 0)
    counts = _COUNTS.get((device.type, index))
    if counts is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counts = outside_graph_pools(
            lambda: torch.zeros(_COUNT_SLOTS, dtype=torch.int32, device=device), device)
        _COUNTS[(device.type, index)] = counts
    return counts


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device, looked up once (grids are sized on every call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def kernel_device(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on ``t``: CUDA, or CPU under the interpreter."""
    if not triton_available():
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def check_tensor(
    t: object,
    name: str,
    dtypes: Sequence[torch.dtype],
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check one kernel input; raise :class:`KernelInputError` naming what is wrong.

    Args:
        t: The input.
        name: Its name in the kernel's signature (used in messages).
        dtypes: Accepted dtypes.
        ndim: Required number of dims, if any.
        shape: Required sizes (None entries are free); implies ``ndim``.
        device: Required device (the first tensor's), if any.

    Returns:
        ``t``, unchanged.
    """
    if (isinstance(t, torch.Tensor) and t.dtype in dtypes
            and (device is None or t.device == device) and kernel_device(t)
            and (_shape_ok(t.shape, shape) if shape is not None
                 else ndim is None or t.dim() == ndim)):
        return t  # the common case in few reads: wrappers check every input on every call
    if not torch.is_tensor(t):
        raise KernelInputError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise KernelInputError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; "
                               f"expected {want}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise KernelInputError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (have, want) in enumerate(zip(t.shape, shape, strict=True)):
            if want is not None and have != want:
                raise KernelInputError(
                    f"{name} has shape {tuple(t.shape)}; dim {i} must be {want}"
                )
    if device is not None and t.device != device:
        raise KernelInputError(f"{name} is on {t.device}, the other inputs on {device}")
    if not kernel_device(t):
        where = "CUDA" if triton_available() else "CUDA with triton installed"
        raise KernelInputError(
            f"{name} is on {t.device}: Triton kernels need {where} "
            "(or TRITON_INTERPRET=1 for CPU tensors)"
        )
    return t


def _shape_ok(have: torch.Size, want: Sequence[int | None]) -> bool:
    if len(have) != len(want):
        return False
    for h, w in zip(have, want, strict=True):
        if w is not None and h != w:
            return False
    return True


@functools.cache
def _table(elem: str, device: str) -> torch.Tensor:
    info = element_info(elem)
    if info.bits > 8:
        raise FormatError(f"element {elem!r} has no code table")
    return outside_graph_pools(lambda: info.table().to(device), device)


def element_table(elem: str, device: torch.device | str) -> torch.Tensor:
    """fp32 value of every code of ``elem`` (``2**bits`` entries), cached per device.

    ``"cuda"`` and ``"cuda:<current>"`` name one device and get the same tensor: the W4A16
    dispatch recognises the FP4 table by identity (no device sync), and a benchmark that
    built it with ``"cuda"`` measured the table-lookup kernel instead of the FP4 one.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _table(elem, str(dev))
