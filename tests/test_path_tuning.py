"""``path_tuning.pick``: the fastest whole path of an op per shape, and the W4A16 / W4A8 linears
choosing through it.

Timing needs a GPU; here the timer is replaced by one that reports set times per path, so what
is checked is the choice, its caching, the fallbacks, and that the linears run (and give the
bits of) the path it picks, under the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch

from qcompile.backends.triton import path_tuning


def test_pick_takes_the_fastest_once(tuner):
    times, timed = tuner
    calls = []
    times.update(a=3.0, b=1.0, c=2.0)
    dev = torch.device("cpu")
    assert path_tuning.pick(("k", 1), "a", ("a", "b", "c"), calls.append, dev) == "b"
    assert sorted(timed) == ["a", "b", "c"] and sorted(calls) == ["a", "a", "b", "b", "c", "c"]
    times.update(b=9.0)  # a later timing would pick "c": the key is not timed again
    assert path_tuning.pick(("k", 1), "a", ("a", "b", "c"), calls.append, dev) == "b"
    assert len(timed) == 3 and len(calls) == 6
    assert path_tuning.choices() == {("k", 1): "b"}
    assert path_tuning.timings() == {("k", 1): {"a": 3000.0, "b": 1000.0, "c": 2000.0}}


def _runner(behaviour: dict):
    return lambda path: behaviour[path]()


def test_pick_drops_failing_paths_and_falls_back(tuner, monkeypatch):
    times, _ = tuner

    def boom():
        raise RuntimeError("out of resources")

    run = _runner({"x": boom, "x2": boom, "y": lambda: None})
    times.update(x=0.1, x2=0.1, y=5.0)
    dev = torch.device("cpu")
    assert path_tuning.pick(("f", 1), "x", ("x", "y"), run, dev) == "y"
    assert path_tuning.pick(("f", 2), "x", ("x", "x2"), run, dev) == "x"
    # The report tells a failed path from a slow one.
    assert path_tuning.timings()[("f", 1)] == {
        "x": "failed: RuntimeError: out of resources", "y": 5000.0}
    # Nothing timed: no CUDA (or a capture), disabled, or a single candidate.
    monkeypatch.setattr(path_tuning, "_can_time", lambda device: False)
    assert path_tuning.pick(("g", 1), "y", ("x", "y"), run, dev) == "y"
    monkeypatch.setattr(path_tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(path_tuning, "ENABLED", False)
    assert path_tuning.pick(("g", 1), "x", ("x", "y"), run, dev) == "x"
    assert ("g", 1) not in path_tuning.choices()


def test_pick_never_takes_a_path_that_disagrees(tuner):
    """A faster path whose result is not the default's (a kernel broken on some GPU) is not
    timed, let alone chosen; one that differs by summation-order noise is."""
    times, timed = tuner
    ref = torch.linspace(-3, 5, 64)
    run = _runner({"base": ref.clone, "bad": lambda: ref * 1.5, "good": lambda: ref + 1e-3,
                   "nan": lambda: torch.where(ref > 4, float("nan"), ref)})
    times.update(base=3.0, bad=0.5, nan=0.1, good=1.0)
    paths = ("base", "bad", "nan", "good")
    assert path_tuning.pick(("d", 1), "base", paths, run, torch.device("cpu")) == "good"
    assert sorted(timed) == ["base", "good"]
    assert path_tuning.timings()[("d", 1)] == {"base": 3000.0, "bad": "disagrees with base",
                                                "nan": "disagrees with base", "good": 1000.0}
    assert path_tuning.agrees(ref.bfloat16(), ref.bfloat16())
    assert not path_tuning.agrees(ref, ref.bfloat16())  # dtype
    assert not path_tuning.agrees(ref[:8], ref)  # shape
    inf = ref.clone()
    inf[3] = float("inf")
    assert path_tuning.agrees(inf, inf) and not path_tuning.agrees(ref, inf)


def test_w4a16_linear_runs_the_path_picked(tuner, monkeypatch):
    """Above the GEMVs the W4A16 linear asks for the fastest of gemm / dequant / swap; with
    swap reported fastest it runs swap: the same bits as forcing it, the reference's values."""
    pytest.importorskip("triton")
    from test_triton_w4a16 import _inputs, assert_matches

    from qcompile.backends.triton import w4a16 as w4

    times, timed = tuner
    times.update(gemm=2.0, dequant=3.0, swap=1.0)
    x, w, b = _inputs("fp4_e2m1/g128/asym", 40, 96, 256, torch.bfloat16, bias=True)
    got = w4.w4a16_linear(x, *w, bias=b)
    assert sorted(timed) == ["dequant", "gemm", "swap"]
    assert list(path_tuning.choices().values()) == ["swap"]
    assert torch.equal(got, w4.w4a16_linear(x, *w, bias=b, path="swap"))
    assert_matches(got, w4.w4a16_linear_ref(x, *w, bias=b))
    # Above MAX_M rows nothing is timed: the default path runs.
    path_tuning.clear()
    timed.clear()
    monkeypatch.setattr(path_tuning, "MAX_M", 32)
    assert torch.equal(w4.w4a16_linear(x, *w, bias=b),
                       w4.w4a16_linear(x, *w, bias=b, path="gemm"))
    assert timed == [] and path_tuning.choices() == {}


def test_w4a8_linear_runs_the_path_picked(tuner):
    pytest.importorskip("triton")
    from test_triton_w4a8 import make_inputs

    from qcompile.backends.triton import w4a8

    times, timed = tuner
    times.update(fused=2.0, swap=3.0, dequant=1.0)
    a, a_scale, packed, gexp, row_scale, bias = make_inputs(40, 256, 96, 64, bias=True)
    got = w4a8.w4a8_linear(a, a_scale, packed, gexp, row_scale, 64, bias)
    assert sorted(timed) == ["dequant", "fused", "swap"]
    assert list(path_tuning.choices().values()) == ["dequant"]
    assert torch.equal(got, w4a8.w4a8_linear(a, a_scale, packed, gexp, row_scale, 64, bias,
                                             path="dequant"))


def test_batch1_fp4_gemv_auto_takes_the_faster_kernel(tuner, monkeypatch):
    """``runtime.GEMV1_MMA = "auto"``: the batch-1 FP4 GEMV times the FMA, tensor-core and
    TMA kernels on a cold L2 at the shape's first call, then runs the fastest (counted
    launches), with the reference's values."""
    pytest.importorskip("triton")
    from test_triton_w4a16 import _spy_tuned, assert_matches_unrounded
    from test_triton_w4a16_mma import _fp4

    from qcompile.backends.triton import runtime
    from qcompile.backends.triton import w4a16 as w4
    from qcompile.backends.triton import w4a16_gemv as g1
    from qcompile.backends.triton import w4a16_gemv_mma as mm

    times, timed = tuner
    monkeypatch.setattr(runtime, "GEMV1_MMA", "auto")
    spy_mma = _spy_tuned(monkeypatch, mm, "_gemv1_fp4mma_kernel", "_tuned")
    spy_fma = _spy_tuned(monkeypatch, g1, "_gemv1_fp4w_kernel", "_tuned_fp4w")
    x, w, b, _ = _fp4("fp4_e2m1/g128/asym", 72, 1024, torch.bfloat16)
    ref = w4.w4a16_linear_ref(x, *w, bias=b)
    for faster, other in (("mma", "fma"), ("fma", "mma")):
        path_tuning.clear()
        times.update({faster: 1.0, other: 2.0, "tma": 3.0})
        w4.w4a16_linear(x, *w, bias=b)  # times all three (each run twice: warm-up, timing)
        # (The TMA kernel also times its own configs, under their names, the first time.)
        outer = [t for t in timed if t.split()[0] in ("fma", "mma", "tma")]
        assert sorted(outer[-3:]) == ["fma (cold)", "mma (cold)", "tma (cold)"]
        assert [v for k, v in path_tuning.choices().items() if k[0] == "w4a16-gemv1"] == [
            faster]
        before = (spy_mma.launches, spy_fma.launches)
        out = w4.w4a16_linear(x, *w, bias=b)
        after = (spy_mma.launches - before[0], spy_fma.launches - before[1])
        assert after == ((1, 0) if faster == "mma" else (0, 1))
        assert_matches_unrounded(out, ref, x, w)


@pytest.mark.parametrize("m, paths, fastest", [
    (5, ("gemv", "gemm", "dequant"), "gemm"),  # the GEMV's rows: three routes, cold L2
    (40, ("gemm", "dequant"), "dequant"),
])
def test_w8a16_linear_runs_the_path_picked(tuner, monkeypatch, m, paths, fastest):
    """From two rows the W8A16 linear asks for the fastest route its grouping takes (the
    GEMV only up to ``GEMV_MAX_M`` rows, timed on a cold L2 there) and runs it: the bits of
    forcing it. One row, groups the tiles cannot take, and more than ``MAX_M`` rows run the
    default route, untimed."""
    pytest.importorskip("triton")
    from test_triton_w8a16 import _inputs

    from qcompile.backends.triton import w8a16 as w8

    times, timed = tuner
    times.update(gemv=3.0, gemm=2.0, dequant=2.5)
    times[fastest] = 1.0
    x, w, b = _inputs("int8/g64/asym", m, 40, 128, torch.float32)
    got = w8.w8a16_linear(x, *w[:5], w[5], b)
    suffix = " (cold)" if m <= w8.GEMV_MAX_M else ""
    assert sorted(timed) == sorted(p + suffix for p in paths)
    assert path_tuning.choices() == {
        w8.route_key(m, 40, 128, 64, torch.float32, "int8", True, False, True): fastest}
    assert torch.equal(got, w8.w8a16_linear(x, *w[:5], w[5], b, path=fastest))
    ref = w8.w8a16_linear_ref(x, *w[:5], w[5], b)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    path_tuning.clear()
    timed.clear()
    w8.w8a16_linear(x[:1], *w[:5], w[5], b)  # one row: the GEMV and its fusions
    xo, wo, bo = _inputs("int8/g24/asym", m, 40, 120, torch.float32)  # no K tile: dequant
    w8.w8a16_linear(xo, *wo[:5], wo[5], bo)
    monkeypatch.setattr(path_tuning, "MAX_M", m - 1)
    w8.w8a16_linear(x, *w[:5], w[5], b)
    assert timed == [] and path_tuning.choices() == {}
