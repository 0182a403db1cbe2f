"""Programmatic dependent launch (PDL) of the batch-1 GEMVs: the next GEMV's weights start
streaming while the kernel before it finishes.

With the decode fusions a decode step runs a layer's GEMVs back to back: ``o_proj`` (with
the residual add) -> ``gate_up`` (with the RMSNorm) -> ``down`` (with the SiLU gate and the
residual) -> the next layer's ``qkv`` (with its RMSNorm). A GEMV's weights do not depend on
the kernel before it; only its input row does. The small projections are latency-bound on an
H100 (``o_proj`` read 8.4 MB in 10.7 us, 0.8 TB/s, ``benchmarks/results/gpu_h100_2026-11-27b.md``),
so the start of each GEMV, the first round trip to DRAM, and the previous kernel's tail,
where its last programs leave most multiprocessors idle, are a visible part of its time.

Launched as a programmatic dependent (sm_90 and later, Triton's ``launch_pdl``), a GEMV's
programs may start once every program of the kernel before it has started (or, for a kernel
that does not signal, finished). Each program then:

1. asks L2 for the first weight lines of its rows (``prefetch.global.L2``; weights are
   never written during inference, so reading them early is safe);
2. waits until the previous grid has completed and its writes are visible
   (``griddepcontrol.wait``), before it reads anything a kernel writes: ``x``, the gate's
   ``up``, the residual, the split-K counts and partials;
3. lets the kernel after it launch early in turn (``griddepcontrol.launch_dependents``).

Everything the GEMV writes comes after its wait, so no earlier kernel can still be reading
what it overwrites, and a later kernel that is not a dependent launch (Inductor's, cuBLAS's)
waits for the GEMV to complete as usual. A wait also covers every kernel before: the
previous grid completed only after its own wait returned.

On by default (:data:`qcompile.backends.triton.runtime.GEMV_PDL`, ``QCOMPILE_GEMV_PDL``;
timed faster on an H200, ``benchmarks/decode.py``'s ``-pdl`` variants); where PDL is not
available (before sm_90, a Triton without ``launch_pdl``, the interpreter) the kernels run as
before.

The decode attention kernel between ``qkv`` and ``o_proj`` can launch the same way
(:data:`~qcompile.backends.triton.runtime.ATTN_PDL`, off until timed): its first run
prefetches the first block of keys and values (never a dead block: that run starts at
position 0), waits, and lets ``o_proj`` launch, whose weight prefetch then overlaps the
attention instead of waiting for its end.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qcompile.backends.triton import runtime

__all__ = ["available", "enter", "launch_flags", "prefetch", "release"]


@functools.cache
def _triton_supports() -> bool:
    """Whether this Triton has the launch option and the grid-dependency instructions."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(cuda, "gdc_wait")


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def available(device: torch.device) -> bool:
    """Whether kernels on ``device`` can launch as programmatic dependents: a CUDA device of
    compute capability 9.0 or later, compiled kernels (not the interpreter), and a Triton with
    ``launch_pdl``."""
    if device.type != "cuda" or runtime.interpreting() or not _triton_supports():
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_flags(device: torch.device, attention: bool = False) -> dict:
    """A launch's PDL arguments: the kernel's ``PDL`` constexpr, and Triton's ``launch_pdl``
    option with it when the switch is on (:data:`runtime.GEMV_PDL`; ``attention``: the decode
    attention's, :data:`runtime.ATTN_PDL`) and PDL is :func:`available`."""
    if (runtime.ATTN_PDL if attention else runtime.GEMV_PDL) and available(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def _prefetch_l2(ptrs):
    # A hint with no result; the output register only satisfies inline_asm_elementwise.
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                     [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch(ptrs):
    """Ask L2 for the lines of ``ptrs`` (a hint: L2 is where the GPU's memory is coherent,
    so a line fetched early is never stale there; nothing is loaded into registers)."""
    _prefetch_l2(ptrs)


@triton.jit
def release():
    """Wait for the previous grid (its writes visible), then let the next one launch: after
    the prefetches, before the first global load of a dependent launch."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def enter(base, offs_n, N, row_len, first, STEP: tl.constexpr, LINES: tl.constexpr,
          PDL: tl.constexpr):
    """A dependent launch's start (module docstring): prefetch ``LINES`` 128-byte lines of
    weight rows ``offs_n`` (clamped to the ``N`` rows that exist; ``row_len`` elements each
    from ``base``, ``STEP`` elements per line) from element ``first`` on, wait for the
    previous grid, then let the next one launch. Nothing without ``PDL``."""
    if PDL:
        rows = base + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * row_len
        col = tl.minimum(first + STEP * tl.arange(0, LINES), row_len - 1)
        _prefetch_l2(rows + col[None, :])
        release()
