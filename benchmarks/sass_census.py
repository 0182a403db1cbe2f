"""Static cost of the batch-1 GEMV kernels on an H100, without a GPU: SASS instructions per
weight code in each config's main loop.

At batch 1 the FP4 GEMVs decode and multiply every code once, so their time is bounded both
by the weight read and by instruction issue: an H100 issues about 30 T thread-instructions/s
(132 SMs x 4 schedulers x 32 lanes x 1.75 GHz), and the weight read streams 6.7 G codes/ms at
3.35 TB/s. At N SASS instructions per code the issue bound is ``N * codes / 30e12`` s, which
for 8192^2 and N = 4.7 is 10.6 us (the read bound: about 10 us). This script compiles each
config for sm_90 with Triton's own ``ptxas`` (as ``tests/test_triton_compile_sm90.py`` does, whose
builders it reuses), disassembles the cubin with ``cuobjdump -sass``, takes the longest loop
(the K-tile loop) and counts its instructions per code a thread handles per iteration, with
the opcode mix, the barriers and the registers. ``hot_path_per_code`` counts only the
instructions of an iteration that takes no rare branch (the shortest way through the loop);
the issue bound uses it. The two differ where a kernel keeps a rare case's code in its
loop. A change to the decode can so be judged here before device time is spent on it; the
times themselves come from ``kernels_w4a16.py``.

The power-of-two Hadamard + quantize kernel (``had2`` cases, ``had_quant``) is counted the
same way: its loop is the row loop, and the unit is a row element (``instructions_per_code``
is then per element; its issue bound is for 8192 x 8192 elements, the ``kernels_act.py``
shape, whose copy takes about 93 us on an H100).

Usage::

    python benchmarks/sass_census.py [--cases w4a16-gemv1w-bf16-g128-afpq,...] [--out F.json]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ISSUE_PER_S = 132 * 4 * 32 * 1.75e9  # H100 SXM: thread-instructions issued per second
_TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_triton_compile_sm90.py"
DEFAULT_CASES = ("w4a16-gemv1w-bf16-g128-fp4", "w4a16-gemv1w-bf16-g128-afpq",
                 "w4a16-gemv1w-fp8-g128-w4a8", "w4a16-gemv1mma-bf16-g128-fp4",
                 "w4a16-gemv1mma-bf16-g128-afpq", "w4a16-gemv1mma-fp8-g128-w4a8",
                 "w4a16-gemv1tma-bf16-g128-fp4", "w4a16-gemv1tma-bf16-g128-afpq",
                 "w4a16-gemv1tma-mma-bf16-g128-fp4", "w4a16-gemv1tma-mma-bf16-g128-afpq")
_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"BRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")  # an instruction's guard, ``@P0 `` or ``@!UP1 ``


def _shortest_path(body: list[tuple[int, str]]) -> int:
    """Instructions on the shortest way through a loop body (its first instruction to its
    closing backward branch): the iteration that takes no rare branch (a tiny row's rescale,
    an IEEE division's slow path behind a ``CALL``). Forward branches are edges; backward
    ones inside the body (inner loops) count once, as if not taken."""
    index = {a: i for i, (a, _) in enumerate(body)}
    far = len(body) + 1
    dist = [far] * len(body)
    dist[0] = 1
    for i, (addr, op) in enumerate(body[:-1]):
        if dist[i] == far:
            continue
        bare = _PREDICATE.sub("", op)
        m = _BRANCH.search(op)
        target = int(m.group(1), 16) if m and m.group(1) else None
        if target is not None and target > addr and target in index:
            j = index[target]
            dist[j] = min(dist[j], dist[i] + 1)
        unconditional = bare == op and (bare.startswith("EXIT")
                                        or (bare.startswith("BRA") and target is not None
                                            and target > addr))
        if not unconditional:
            dist[i + 1] = min(dist[i + 1], dist[i] + 1)
    return dist[-1] if dist[-1] < far else len(body)


def main_loop(sass: str) -> dict[str, Any]:
    """The longest backward-branch loop of a kernel's SASS: its instruction count, the count
    on its shortest path (``hot_path``, :func:`_shortest_path`) and opcode counts (predicates
    stripped)."""
    rows = [(int(m.group(1), 16), m.group(2).strip()) for m in map(_LINE.match,
                                                                    sass.splitlines()) if m]
    best: list[tuple[int, str]] = []
    for addr, op in rows:
        m = _BRANCH.search(op)
        if m and m.group(1) and int(m.group(1), 16) < addr:
            body = [(a, o) for a, o in rows if int(m.group(1), 16) <= a <= addr]
            if len(body) > len(best):
                best = body
    ops = collections.Counter(_PREDICATE.sub("", o).split()[0] for _, o in best)
    return {"instructions": len(best), "hot_path": _shortest_path(best) if best else 0,
            "opcodes": dict(ops.most_common())}


def _compile_module():
    spec = importlib.util.spec_from_file_location("compile_sm90", _TESTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def census(case_names: list[str]) -> list[dict[str, Any]]:
    """One row per (case, config) of the cases named: the batch-1 FP4 GEMVs (the FMA word
    kernel ``w4a16_gemv1w``, the tensor-core one ``w4a16_gemv1mma``, the TMA-fed one
    ``w4a16_gemv1tma``) and the 8-bit split-K GEMV (``w8a16_gemv``) per weight code, the
    Hadamard + quantize rows (``had2``) per element."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qcompile.backends.triton import (
        had_quant,
        w4a16_gemv,
        w4a16_gemv_mma,
        w4a16_gemv_tma,
        w8a16,
    )

    t = _compile_module()
    builders = {"w4a16_gemv1w": (t._build_w4a16_gemv1w, w4a16_gemv),
                "w4a16_gemv1mma": (t._build_w4a16_gemv1mma, w4a16_gemv_mma),
                "w4a16_gemv1tma": (t._build_w4a16_gemv1tma, w4a16_gemv_tma),
                "w8a16_gemv": (t._build_w8a16_gemv, w8a16),
                "had2": (t._build_had2, had_quant)}
    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    cases = {c[0]: c for c in t.CASES}
    rows = []
    for name in case_names:
        if name not in cases or cases[name][1] not in builders:
            raise SystemExit(f"sass_census: {name!r} is not a {' or '.join(builders)} case of "
                             f"{_TESTS.name}")
        params = dict(cases[name][2], split=max(2, cases[name][2].get("split", 1)),
                      every=True)
        build, module = builders[cases[name][1]]
        fn, args, consts, configs = build(module, params, True)
        for cfg in configs:
            sig, ce, attrs = t._specialize(fn, args, dict(consts, **cfg.kwargs))
            kernel = triton.compile(ASTSource(fn, sig, ce, attrs),
                                    target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": cfg.num_warps,
                                             "num_stages": cfg.num_stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                sass = subprocess.run([cuobjdump, "-sass", f.name], check=True,
                                      capture_output=True, text=True).stdout
            regs, stack = t._resources(kernel.asm["cubin"], cuobjdump, kernel.metadata.name)
            loop = main_loop(sass)
            # What a thread handles per loop iteration: codes of a weight tile, or elements
            # of a row (the padded row tile of a had2 program).
            tile = (consts["RP"] * consts["C"] if cases[name][1] == "had2"
                    else cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"])
            codes = tile / (cfg.num_warps * 32)
            per_code = loop["instructions"] / codes
            rows.append({
                "case": name, "config": dict(cfg.kwargs, num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
                "loop_instructions": loop["instructions"], "codes_per_thread_per_iter": codes,
                "instructions_per_code": round(per_code, 3),
                "hot_path_per_code": round(loop["hot_path"] / codes, 3),
                "issue_bound_us_8192x8192": round(
                    loop["hot_path"] / codes * 8192 * 8192 / ISSUE_PER_S * 1e6, 2),
                "barriers_per_iter": loop["opcodes"].get("BAR.SYNC.DEFER_BLOCKING", 0),
                "registers": regs, "spill_words": stack // 4,
                "opcodes": dict(list(loop["opcodes"].items())[:12]),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI: print a table (and write the JSON with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.environ.pop("TRITON_INTERPRET")  # decided at import: compile needs the real JIT
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                  *(sys.argv[1:] if argv is None else argv)])
    rows = census([c.strip() for c in args.cases.split(",") if c.strip()])
    for r in rows:
        print(f"{r['case']:32s} {json.dumps(r['config']):60s} {r['instructions_per_code']:5.2f} "
              f"instr/code (hot path {r['hot_path_per_code']:5.2f})  "
              f"{r['issue_bound_us_8192x8192']:5.1f} us  bar {r['barriers_per_iter']:2d}"
              f"  regs {r['registers']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
