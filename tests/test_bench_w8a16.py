"""benchmarks/kernels_w8a16.py on the CPU (Triton interpreter, a stand-in timer): the routes
its rows name are the ones the op takes, and its ratios come from the timings it was given
(timings are never asserted)."""

from __future__ import annotations

import pytest


def test_rows_name_their_route_and_ratio(benchmark_module):
    pytest.importorskip("triton")
    bench = benchmark_module("kernels_w8a16")
    times = iter([40.0, 10.0, 20.0, 8.0, 16.0, 4.0, 10.0, 5.0])

    def timer(fn):
        fn()
        return next(times), True

    rows = bench.run(shapes=((1, 48, 256), (20, 48, 256)),
                     formats=("int8/channel", "fp8_e4m3/channel"), device="cpu", bench=timer)
    got = [(r["format"], r["M"], r["route"], r["bf16_us"], r["w8a16_us"]) for r in rows]
    # bf16 is timed once per shape: the second format reuses it.
    assert got == [("int8/channel", 1, "gemv", 40.0, 10.0), ("int8/channel", 20, "gemm", 20.0, 8.0),
                   ("fp8_e4m3/channel", 1, "gemv", 40.0, 16.0),
                   ("fp8_e4m3/channel", 20, "gemm", 20.0, 4.0)]
    assert [r["speedup_vs_bf16"] for r in rows] == [4.0, 2.5, 2.5, 5.0]
    assert all(r["max_rel_err"] < 1e-5 for r in rows)  # fp32 activations on the interpreter
    # 48 x 256 codes + 48 fp32 scales over the time
    assert rows[0]["weight_gbps"] == pytest.approx((48 * 256 + 48 * 4) / 10.0 / 1e3)


def test_it_needs_cuda_without_a_timer(benchmark_module):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        benchmark_module("kernels_w8a16").run()


def test_rows_name_the_route_the_first_call_timed(benchmark_module, tuner):
    """From two rows a row names the route the op's first call picked, with each route's
    time at that call; one row keeps the GEMV, untimed."""
    pytest.importorskip("triton")
    bench = benchmark_module("kernels_w8a16")
    times, _ = tuner
    times.update(gemv=3.0, gemm=2.0, dequant=1.0)

    def timer(fn):
        fn()
        return 5.0, True

    rows = bench.run(shapes=((1, 48, 256), (20, 48, 256)), formats=("int8/channel",),
                     device="cpu", bench=timer)
    assert [(r["M"], r["route"], r["route_us"]) for r in rows] == [
        (1, "gemv", None), (20, "dequant", {"gemm": 2000.0, "dequant": 1000.0})]
    assert [r["config"] for r in rows] == [None, None]  # the interpreter's one fixed tile
