"""benchmarks/kernels_act.py's Kronecker rows: which kernel each row runs (on the CPU, with the
Triton interpreter and a stand-in timer; timings are never asserted)."""

from __future__ import annotations

import pytest


def test_kronecker_rows_run_the_kernel_they_name(benchmark_module, monkeypatch):
    pytest.importorskip("triton")
    bench_act = benchmark_module("kernels_act")
    from qcompile.backends.triton import act_quant as aq

    products = []
    launch_kron = aq.launch_kron
    monkeypatch.setattr(aq, "launch_kron",
                        lambda x2, *a, **k: (products.append(x2.shape), launch_kron(x2, *a, **k)))
    calls = []

    def bench(fn):
        calls.append(fn)
        fn()
        return 0.5 * len(calls)

    rows = bench_act.run_kronecker(shapes=((3, 1536), (2, 14336)), device="cpu", bench=bench)
    got = [(r["op"], r.get("kernel"), r["shape"][1]) for r in rows]
    # 14336's general tile (16384 padded elements) does not fit a GPU block: no general row.
    assert got == [("copy", None, 1536), ("act_quant", "kron_quant", 1536),
                   ("act_quant", "general", 1536), ("copy", None, 14336),
                   ("act_quant", "kron_quant", 14336)]
    assert products == [(3, 1536), (2, 14336)]  # the general row launched no kron_quant
    assert [r["ratio_to_copy"] for r in rows] == [1.0, 2.0, 3.0, 1.0, 5.0 / 4.0]
