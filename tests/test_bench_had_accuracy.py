"""benchmarks/had_accuracy.py: every left-product variant measured, on a small shape."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")



def test_had_accuracy_rows_per_variant_and_dtype(benchmark_module):
    mod = benchmark_module("had_accuracy")
    from qcompile.backends.triton import had_quant

    default = had_quant.DEFAULT_PARTS
    rows = mod.run(rows=3, size=1024)
    assert had_quant.DEFAULT_PARTS == default  # restored
    assert [(r["dtype"], r["parts"]) for r in rows] == [
        (d, p) for d in ("bfloat16", "float16") for p in (0, 1, 2, 3)]
    for r in rows:
        # fp32-accurate rotations: within the output's own rounding of the exact one.
        eps = 2.0**-8 if r["dtype"] == "bfloat16" else 2.0**-11
        assert 0.0 <= r["max_error_over_row_max"] <= eps + (2.0**-10 if r["parts"] == 1 else 0)
        if r["parts"] != 1:  # the one-part speed variant rounds 11 bits into the left product
            assert r["outputs_off_reference_pct"] <= 0.5
    off = {(r["dtype"], r["parts"]): r["outputs_off_reference_pct"] for r in rows}
    for d in ("bfloat16", "float16"):  # each variant ran: the one-part one is the coarsest
        assert off[(d, 1)] > 5 * max(off[(d, 0)], off[(d, 2)], off[(d, 3)], 0.01)
