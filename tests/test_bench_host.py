"""benchmarks/host_overhead.py's cProfile summary (timings are never asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"


def _inner(n: int) -> int:
    return sum(i * i for i in range(n))


def test_host_profile_names_the_functions_and_counts_calls_per_op_call(benchmark_module):
    mod = benchmark_module("host_overhead")

    def op():
        return _inner(200) + _inner(200) + _inner(3)

    rows = mod.host_profile(op, 50, 5)
    assert len(rows) == 5
    times = [r["us_per_call"] for r in rows]
    assert times == sorted(times, reverse=True)
    inner = [r for r in rows if r["function"].endswith("(_inner)")]
    assert inner and inner[0]["function"].startswith("test_bench_host.py:")
    assert inner[0]["calls_per_call"] == 3.0


@pytest.mark.parametrize("m", [256, 1])
def test_fake_cuda_rows_time_the_full_path_and_each_plan(tmp_path, m):
    """``--device fake-cuda`` at prefill size and at batch 1 (the GEMVs' ``gemv_plan``): a
    full-path row for every op and a planned row for each op with a plan (the row raises
    where its call made none)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    from test_triton_compile_sm90 import _require_toolchain

    _require_toolchain()
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(_PATH), "--device", "fake-cuda", "--calls", "3",
                           "--m", str(m), "--n", "256", "--k", "256", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = [r["op"] for r in json.loads(out.read_text())["rows"]]
    planned = {op.removesuffix(", planned") for op in ops if op.endswith(", planned")}
    attention = {op for op in ops if op.startswith("decode_attention")} - {
        op + ", planned" for op in planned}
    assert len(attention) == (m == 1), ops  # a decode step's attention, at batch 1
    head = {"w8a16_linear int8/channel"} if m == 1 else set()  # a batch-1 GEMV plan only
    assert planned == {"w4a16_linear fp4_e2m1/g128", "w4a8_linear g128", "fp8_linear",
                       "quantize_rows fp8_e4m3/token",
                       "quantize_rows fp8_e4m3/token + hadamard 256"} | attention | head, ops
    assert planned < set(ops)
