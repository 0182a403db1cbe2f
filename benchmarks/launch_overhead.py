"""Host time of one Triton launch: ``kernel[grid](...)`` against ``launch.launch``.

Runs anywhere Triton is installed, GPU or not: the kernels compile for sm_90 and every step of
Triton's Python launch path runs, with the stand-in driver of ``tests/fake_cuda.py`` in place
of the CUDA driver (its launcher does nothing). What is timed is therefore the Python work of
a launch on this host, without the C launcher and ``cuLaunchKernel`` (the same for both
paths), for qcompile's kernels with their real argument lists, directly and through an
autotuner (two configs, one kept by pruning, so nothing is timed on a device).

Usage::

    python benchmarks/launch_overhead.py [--calls 2000] [--out launch.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parents[1] / "tests"
CASES = ("w4a16-gemv1w-bf16-g128-afpq", "w4a16-gemv1mma-bf16-g128-afpq",
         "w4a16-dequant-fp4w-bf16-g128-afpq", "w4a8-shift-g128", "fp8-persistent-bm128-bias",
         "fp8-tiled-bm16-decode")
def _per_call_us(fn, calls: int) -> float:
    from host_overhead import _per_call_us as per_call

    return per_call(fn, calls, lambda: None)


def _timings(fast, fn, tuned, pos: list, kw: dict, consts: dict, calls: int) -> dict:
    grid = (3, 2)
    return {"triton_jit_us": _per_call_us(lambda: fn[grid](*pos, **kw), calls),
            "fast_jit_us": _per_call_us(lambda: fast.launch(fn, grid, *pos, **kw), calls),
            "triton_autotuner_us": _per_call_us(
                lambda: tuned[lambda meta: grid](*pos, **consts), calls),
            "fast_autotuner_us": _per_call_us(
                lambda: fast.launch(tuned, lambda meta: grid, *pos, **consts), calls)}


def run(calls: int) -> dict[str, Any]:
    """One row per case: microseconds per launch on each path."""
    sys.path.insert(0, str(_TESTS))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fake_cuda
    import test_triton_compile_sm90 as c90
    import torch
    import triton

    from qcompile.backends.triton import launch as fast

    fake_cuda.install()
    fake_cuda.RECORD = False
    cases = {c[0]: c for c in c90.CASES}
    rows = []
    for case_id in CASES:
        _, family, params = cases[case_id]
        mod = importlib.import_module(f"qcompile.backends.triton.{c90._MODULES[family]}")
        fn, args, consts, configs = c90._BUILDERS[family](mod, params, False)
        cfg = configs[0]
        named = fake_cuda.placeholders(args)
        pos = [named[n] for n in fn.arg_names if n in named]
        kw = dict(consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        tuned = triton.autotune(
            [cfg, triton.Config(cfg.kwargs, num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages + 1)],
            key=[k for k in ("N", "K") if k in named],
            prune_configs_by={"early_config_prune": lambda cs, nargs, **k: cs[:1]})(fn)
        row = {"case": case_id, "kernel": fn.__name__, "arguments": len(fn.arg_names),
               **_timings(fast, fn, tuned, pos, kw, consts, calls)}
        row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        rows.append(row)
        print(f"{case_id:36s} args {row['arguments']:2d}  jit {row['triton_jit_us']:6.1f} -> "
              f"{row['fast_jit_us']:5.1f} us   autotuner {row['triton_autotuner_us']:6.1f} -> "
              f"{row['fast_autotuner_us']:5.1f} us", flush=True)
    return {"host": platform.processor() or platform.machine(), "python": sys.version.split()[0],
            "torch": torch.__version__, "triton": triton.__version__, "calls": calls,
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.environ.pop("TRITON_INTERPRET")  # decided at import: the real JIT is needed
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                  *(sys.argv[1:] if argv is None else argv)])
    result = run(args.calls)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
