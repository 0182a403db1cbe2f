"""benchmarks/host_overhead.py's cProfile summary (timings are never asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"


def _inner(n: int) -> int:
    return sum(i * i for i in range(n))


def test_host_profile_names_the_functions_and_counts_calls_per_op_call():
    spec = importlib.util.spec_from_file_location("bench_host", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def op():
        return _inner(200) + _inner(200) + _inner(3)

    rows = mod.host_profile(op, 50, 5)
    assert len(rows) == 5
    times = [r["us_per_call"] for r in rows]
    assert times == sorted(times, reverse=True)
    inner = [r for r in rows if r["function"].endswith("(_inner)")]
    assert inner and inner[0]["function"].startswith("test_bench_host.py:")
    assert inner[0]["calls_per_call"] == 3.0
