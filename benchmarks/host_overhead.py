"""Host time per call of the fused ``qcompile::`` ops at batch 1.

Without CUDA graphs, batch-1 decoding is host-bound. Each linear is one op call, and the kernel
behind it runs for a few microseconds. So the Python work per call (dispatcher, input checks,
kernel choice, allocations, launches) sets the token rate. This benchmark measures that work.

``--device cuda``: each op at M = 1 (``--m`` rows: 2048 times a prefill's calls, where the
W4A8 path decodes the weight and launches the FP8 GEMM) is called ``--calls`` times back to
back, with one sync at the end. That gives the eager time per call, which is the host time whenever it exceeds the
kernel's. Next to it are the same call's CUDA-graph replay time (the GPU time), its eager
time with every launch through ``kernel[grid](...)`` instead of
:func:`qcompile.backends.triton.launch.launch` (``us_per_call_triton_launch``), and bf16
``F.linear`` on the same shape, all from the same run. (``benchmarks/launch_overhead.py``
times the two launch paths alone on any machine.)

``--device cpu`` (needs triton; sets ``TRITON_INTERPRET=1``): the same calls on CPU tensors,
with the Triton launch replaced by a no-op. What remains is our wrappers' and the dispatcher's
time, without Triton's own launch cost. The dispatch rows compare a do-nothing op defined with
:func:`qcompile.oplib.define_op` against the same op from ``torch.library.custom_op``. From
256 rows W4A16 decodes its weight and calls ``F.linear``, which is no Triton launch: on the CPU
its ``--m 2048`` row is mostly that matmul. ``--device fake-cuda`` runs the wrappers' CUDA
branches with Triton's real launch path up to a no-op driver (``tests/fake_cuda.py``), and for
that row returns an empty result in place of cuBLAS: the prefill call's host work alone.

``--pstats N`` adds to each op's row the N functions with the most own time over its calls
(cProfile; microseconds per op call, profiler overhead included), to show which part of the
host path (ours, the dispatcher's, Triton's launch) costs what.

Usage::

    python benchmarks/host_overhead.py [--device cpu|cuda] [--pstats 12] [--out host.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _per_call_us(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    for _ in range(min(calls, 50)):
        fn()
    sync()
    best = float("inf")
    for _ in range(3):  # best of three: the least disturbed run
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def host_profile(fn: Callable[[], object], calls: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` functions by own time over ``calls`` calls of ``fn`` (cProfile), as
    ``{"function": "file:line(name)", "us_per_call", "calls_per_call"}``."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    rows = [{"function": f"{os.path.basename(f)}:{line}({name})",
             "us_per_call": round(tt / calls * 1e6, 2), "calls_per_call": round(nc / calls, 2)}
            for (f, line, name), (_, nc, tt, _, _) in stats.items()]
    rows.sort(key=lambda r: -r["us_per_call"])
    return rows[:top]


def _op_calls(dev: torch.device, n: int, k: int,
              m: int = 1) -> dict[str, Callable[[], object]]:
    """One call of each fused op on ``m`` rows (1: decode), on weights quantized as
    ``lower-triton`` leaves them."""
    from qcompile.backends.triton import ops  # noqa: F401  (defines torch.ops.qcompile.*)
    from qcompile.backends.triton.w4a8 import w4a8_split_scales
    from qcompile.formats import pack_codes, parse_format, quantize

    qc = torch.ops.qcompile
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(1, m, k, generator=g).to(dev, torch.bfloat16)
    q4 = quantize(w, parse_format("fp4_e2m1/g128"))
    packed4 = pack_codes(q4.codes, 4).to(dev)
    scale4 = q4.scale.to(dev)
    qm2 = quantize(w, parse_format("fp4_e2m1/g128/m2"))
    gexp, row_scale = (t.to(dev) for t in w4a8_split_scales(qm2.scale, qm2.outer))
    packed_m2 = pack_codes(qm2.codes, 4).to(dev)
    w_scale = (w.abs().amax(1, keepdim=True) / 448.0).to(dev)
    wq = (w.to(dev) / w_scale).to(torch.float8_e4m3fn)
    a, a_scale = qc.quantize_rows(x, "fp8_e4m3/token", 0)
    q8 = quantize(w, parse_format("int8/channel"))
    codes8, scale8 = q8.codes.to(dev), q8.scale.to(dev)
    bf = torch.bfloat16
    calls = {
        "w4a16_linear fp4_e2m1/g128": lambda: qc.w4a16_linear(
            x, packed4, scale4, None, None, None, None, "fp4_e2m1/g128", k),
        "w8a16_linear int8/channel": lambda: qc.w8a16_linear(
            x, codes8, scale8, None, None, None, "int8/channel", k),
        "quantize_rows fp8_e4m3/token": lambda: qc.quantize_rows(x, "fp8_e4m3/token", 0),
        f"quantize_rows fp8_e4m3/token + hadamard {k}": lambda: qc.quantize_rows(
            x, "fp8_e4m3/token", k),
        "fp8_linear": lambda: qc.fp8_linear(a, a_scale, wq, w_scale, None, bf),
        "w4a8_linear g128": lambda: qc.w4a8_linear(a, a_scale, packed_m2, gexp, row_scale,
                                                   None, 128, k, bf),
    }
    if m == 1:  # a decode step's attention (Llama-3-8B heads, 1024-position static cache)
        qkv = torch.randn(1, 1, 48 * 128, generator=g).to(dev, bf)
        heads = qkv.view(1, 1, 48, 128).transpose(1, 2)  # views of the fused projection
        q, k_new, v_new = heads[:, :32], heads[:, 32:40], heads[:, 40:]
        kc, vc = (torch.zeros(1, 8, 1024, 128, dtype=bf, device=dev) for _ in range(2))
        mask = (torch.arange(1024, device=dev) <= 300).view(1, 1, 1, 1024)
        ang = torch.arange(128, device=dev).view(1, 1, 1, 128) * 0.01
        cos, sin = ang.cos().to(bf), ang.sin().to(bf)
        index = torch.tensor([300], device=dev)
        calls["decode_attention_write 32/8 heads, 1024 positions"] = (
            lambda: qc.decode_attention_write(q, kc, vc, index, k_new, v_new, mask, None, False,
                                              cos, sin, cos, sin))
    return calls


def _dispatch_rows(calls: int) -> list[dict[str, Any]]:
    """A do-nothing op (returns its input) defined both ways: the dispatch path alone."""
    from qcompile import oplib

    x = torch.zeros(4)
    # Both return a clone (custom_op forbids returning an input), timed less a clone's time.
    # The first goes through define_op itself: a throwaway op in the qcompile namespace.
    noop = oplib.define_op("bench_dispatch_noop(Tensor x, str fmt, SymInt k) -> Tensor",
                           lambda x, fmt, k: torch.empty_like(x))(
        lambda x, fmt, k: x.clone())

    @torch.library.custom_op("qcompile_bench::noop_custom_op", mutates_args=())
    def noop_custom(x: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
        return x.clone()

    clone = _per_call_us(lambda: x.clone(), calls, lambda: None)
    rows = [
        {"op": "dispatch: qcompile.oplib.define_op (clone, minus a clone's time)",
         "us_per_call": _per_call_us(lambda: noop(x, "f", 4), calls, lambda: None) - clone},
        {"op": "dispatch: torch.library.custom_op (clone, minus a clone's time)",
         "us_per_call": _per_call_us(lambda: noop_custom(x, "f", 4), calls, lambda: None)
         - clone},
    ]
    return rows


def _fake_cuda_rows(calls: int, n: int, k: int, m: int, pstats_top: int) -> list[dict]:
    """The ops' whole host path as on a GPU, on a machine without one: the wrappers take their
    CUDA branches (kernel choice, autotuned launches) on CPU tensors, the kernels compile for
    sm_90, and Triton's launch path runs up to the launcher, which the stand-in driver of
    ``tests/fake_cuda.py`` replaces by a no-op (no ``cuLaunchKernel``, no output). Each op is
    timed with :func:`~qcompile.backends.triton.launch.launch` and with
    ``kernel[grid](...)``. Autotuners keep their first config (``QCOMPILE_TRITON_TUNE=first``:
    nothing is timed on a device)."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import fake_cuda

    from qcompile.backends.triton import launch

    fake_cuda.wrappers_as_on_gpu()  # the CUDA branches, on CPU tensors
    fake_cuda.RECORD = False
    from qcompile.backends.triton.w4a16_dequant import DEQUANT_MIN_M

    def no_gemm(x, w, bias=None):  # cuBLAS's result, without a CPU matmul
        return torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype)

    from qcompile.backends.triton import w4a16_dequant

    rows = []
    real_gemm = w4a16_dequant.gemm
    for name, fn in _op_calls(torch.device("cpu"), n, k, m).items():
        how = "fake CUDA driver (no-op launcher)"
        if name.startswith(("w4a16", "w8a16")) and m >= DEQUANT_MIN_M:
            # Its GEMM is cuBLAS, here an empty result. The decoded weight is still a CPU
            # allocation (a GPU's caching allocator hands out a cached block).
            w4a16_dequant.gemm = no_gemm
            how += "; the cuBLAS GEMM replaced by an empty result"
        try:
            with _plans_off():  # the full path; the plans get their own row
                rows.append({"op": name, "us_per_call": _per_call_us(fn, calls, lambda: None),
                             "launch": how})
                launch.FAST = False
                try:
                    rows[-1]["us_per_call_triton_launch"] = _per_call_us(fn, calls,
                                                                         lambda: None)
                finally:
                    launch.FAST = True
                if pstats_top:
                    rows[-1]["host_profile"] = host_profile(fn, min(calls, 500), pstats_top)
            if name.startswith(("quantize_rows", "fp8_linear", "decode_attention")) or (
                    name.startswith(("w4a16", "w4a8")) and (m >= DEQUANT_MIN_M or m == 1)) or (
                    name.startswith("w8a16") and m == 1):
                rows.append(_planned_row(name, fn, calls, how, pstats_top, m))
        finally:
            w4a16_dequant.gemm = real_gemm
    return rows


@contextmanager
def _plans_off() -> Iterator[None]:
    """Every call by the op's full path: no per-weight plans (``w4a16_plan``, ``w4a8_plan``,
    ``fp8_plan``), no prepared row launches (``rows_plan``), no prepared batch-1 GEMVs
    (``gemv_plan``) or decode attention (``attention_plan``)."""
    from qcompile.backends.triton import (
        attention_plan,
        fp8_plan,
        gemv_plan,
        rows_plan,
        w4a8_plan,
        w4a16_plan,
    )

    saved = (w4a16_plan.prefill, w4a8_plan.prefill, rows_plan.quantize, rows_plan.build,
             fp8_plan.linear, gemv_plan.run, attention_plan.run)
    w4a16_plan.prefill = w4a8_plan.prefill = rows_plan.quantize = lambda *a: None
    fp8_plan.linear = lambda *a: None
    rows_plan.build = lambda *a: a[-1]()  # run(): the full path's call
    gemv_plan.run = lambda *a, **k: a[5]()  # full(): the full path's call
    attention_plan.run = lambda *a: a[-1]()
    try:
        yield
    finally:
        (w4a16_plan.prefill, w4a8_plan.prefill, rows_plan.quantize, rows_plan.build,
         fp8_plan.linear, gemv_plan.run, attention_plan.run) = saved


def _planned_row(name: str, fn: Callable[[], object], calls: int, how: str,
                 pstats_top: int, m: int) -> dict[str, Any]:
    """A call through its plan: a linear's per-weight plan (``w4a16_plan``, ``w4a8_plan``
    from 256 rows, ``fp8_plan``), a batch-1 GEMV's prepared launch (``gemv_plan``), the
    decode attention's (``attention_plan``), or the per-token quantize's prepared launch
    (``rows_plan``). A weight's
    plan follows path choices that a GPU times at the first call; nothing is timed here, so
    the choices are set to what the H200 timed for every Llama-3-8B shape: decode-then-cuBLAS
    and the flat decode kernel for W4A16 (``benchmarks/results/gpu_h200_2026-11-27.md``, run
    2), shift-then-FP8-GEMM for W4A8 (the default from 256 rows)."""
    from qcompile.backends.triton import (
        attention_plan,
        fp8_plan,
        gemv_plan,
        path_tuning,
        rows_plan,
        w4a8_plan,
        w4a16_plan,
    )

    settled = {"w4a16": "dequant", "w4a16-dequant-fp4": "flat", "w4a8": "dequant"}
    module = {"w4a16": w4a16_plan, "w4a8": w4a8_plan, "fp8": fp8_plan}.get(
        name.split("_")[0], rows_plan)
    if m == 1 and (module in (w4a16_plan, w4a8_plan) or name.startswith("w8a16")):
        module = gemv_plan
    if name.startswith("decode_attention"):
        module = attention_plan
    real = path_tuning.choice
    path_tuning.choice = lambda key: settled.get(key[0]) or real(key)
    module.clear()
    try:
        fn()  # builds the plan (and prepares its launches; gemv_plan: tunes)
        fn()  # prepares what the first call launched (gemv_plan: records its launch)
        if not module.plans():
            raise RuntimeError("the planned call made no plan")
        row = {"op": f"{name}, planned", "us_per_call": _per_call_us(fn, calls, lambda: None),
               "launch": how + f"; path choices set as a GPU timed them ({module.__name__})"}
        if pstats_top:
            row["host_profile"] = host_profile(fn, min(calls, 500), pstats_top)
        return row
    finally:
        path_tuning.choice = real
        module.clear()


def run(device: str, calls: int, n: int, k: int, pstats_top: int = 0,
        m: int = 1) -> dict[str, Any]:
    """Measure; returns the JSON document (see the module docstring)."""
    if device == "fake-cuda":
        return {"device": device, "host": platform.machine(), "torch": torch.__version__,
                "n": n, "k": k, "m": m, "calls": calls,
                "rows": _fake_cuda_rows(calls, n, k, m, pstats_top) + _dispatch_rows(calls)}
    dev = torch.device(device)
    rows: list[dict[str, Any]] = []
    if dev.type == "cuda":
        from triton.testing import do_bench_cudagraph

        sync = torch.cuda.synchronize
        x = torch.randn(1, m, k, device=dev, dtype=torch.bfloat16)
        dense = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        base = _per_call_us(lambda: torch.nn.functional.linear(x, dense), calls, sync)
        rows.append({"op": "bf16 F.linear", "us_per_call": base,
                     "graph_us": 1e3 * do_bench_cudagraph(
                         lambda: torch.nn.functional.linear(x, dense))})
        from qcompile.backends.triton import launch

        for name, fn in _op_calls(dev, n, k, m).items():
            rows.append({"op": name, "us_per_call": _per_call_us(fn, calls, sync),
                         "graph_us": 1e3 * do_bench_cudagraph(fn)})
            with _plans_off():  # what the plans (w4a16_plan, w4a8_plan, rows_plan) save
                rows[-1]["us_per_call_without_plans"] = _per_call_us(fn, calls, sync)
            launch.FAST = False  # the same calls through kernel[grid](...)
            try:
                rows[-1]["us_per_call_triton_launch"] = _per_call_us(fn, calls, sync)
            finally:
                launch.FAST = True
            if pstats_top:
                rows[-1]["host_profile"] = host_profile(fn, min(calls, 500), pstats_top)
                sync()
    else:
        import triton.runtime.interpreter as interp

        from qcompile.backends.triton.ops import kernels_on_cpu

        launch = interp.InterpretedFunction.run
        interp.InterpretedFunction.run = lambda self, *a, **kw: None  # no kernel: host work only
        try:
            with kernels_on_cpu():
                for name, fn in _op_calls(dev, n, k, m).items():
                    rows.append({"op": name, "us_per_call": _per_call_us(fn, calls,
                                                                         lambda: None),
                                 "launch": "mocked (no-op)"})
                    if pstats_top:
                        rows[-1]["host_profile"] = host_profile(fn, min(calls, 500),
                                                                pstats_top)
        finally:
            interp.InterpretedFunction.run = launch
    rows += _dispatch_rows(calls)
    return {"device": str(dev), "host": platform.processor() or platform.machine(),
            "torch": torch.__version__, "m": m, "n": n, "k": k, "calls": calls, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the JSON (and write it with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cuda", "cpu", "fake-cuda"])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--m", type=int, default=1, help="activation rows (1: decode; 2048: a "
                    "prefill, whose W4A8 path decodes the weight and calls the FP8 GEMM)")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--pstats", type=int, default=0, metavar="N",
                    help="add each op's N costliest host functions (cProfile)")
    ap.add_argument("--out", help="write the JSON here as well")
    args = ap.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if (args.device == "cpu") != interpret:
        # The interpreter is decided at import: re-run this script with it switched on (cpu)
        # or off (fake-cuda: real JIT kernels).
        if args.device == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            os.environ.pop("TRITON_INTERPRET")
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                  *(sys.argv[1:] if argv is None else argv)])
    doc = run(args.device, args.calls, args.n, args.k, args.pstats, args.m)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
