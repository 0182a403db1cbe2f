"""Cold-L2 timing (``qcompile.backends.triton.cold_bench``) and the W4A16 benchmark's CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qcompile.backends.triton import cold_bench

CUDA = torch.cuda.is_available()


def test_falls_back_to_hot_timing_where_capture_fails(monkeypatch, caplog):
    """A capture refused (the caller itself being captured) times hot instead of failing the
    autotuning; the fallback gets the same quantiles."""
    from qcompile.backends.triton import runtime

    def refuse(kernel_call):
        raise RuntimeError("operation not permitted when stream is capturing")

    seen = []
    monkeypatch.setattr(cold_bench, "cold_times", refuse)
    monkeypatch.setattr(runtime, "graph_bench", lambda fn, q: seen.append(q) or [1.0, 0.5])
    with caplog.at_level("WARNING"):
        assert cold_bench.cold_graph_bench(lambda: None, (0.5, 0.2)) == [1.0, 0.5]
    assert seen == [(0.5, 0.2)] and "timing hot" in caplog.text


def test_quantiles_of_the_samples(monkeypatch):
    """The median without quantiles; the given quantiles in order otherwise; negative
    samples (noise on a call shorter than the flush's jitter) count as zero."""
    monkeypatch.setattr(cold_bench, "cold_times", lambda fn: [0.004, 0.001, 0.003, 0.002,
                                                              -0.001])
    assert cold_bench.cold_graph_bench(lambda: None, None) == pytest.approx(0.002)
    got = cold_bench.cold_graph_bench(lambda: None, (0.5, 0.0, 1.0))
    assert got == pytest.approx([0.002, 0.0, 0.004])


def test_w4a16_benchmark_needs_cuda(capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import kernels_w4a16

    if CUDA:
        pytest.skip("checks the refusal without CUDA")
    for flags in ([], ["--prefill"], ["--sweep"]):
        assert kernels_w4a16.main(["--device", "cpu", *flags]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernels_w4a16.main(["--prefill", "--sweep"])  # one mode at a time


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cold_reads_are_slower_than_hot_ones():
    """A 16 MB read fits the L2 of the GPUs this targets: replayed back to back it comes from
    L2, after the flush from DRAM, which must show as a clearly longer time."""
    from triton.testing import do_bench_cudagraph

    buf = torch.ones(4 << 20, device="cuda")
    out = torch.empty((), device="cuda")
    fn = lambda: torch.sum(buf, dim=0, out=out)  # noqa: E731
    cold = sorted(cold_bench.cold_times(fn))
    hot = do_bench_cudagraph(fn)
    assert cold[len(cold) // 2] > 1.2 * hot
    assert out.item() == buf.numel()
    assert len(cold_bench.cold_graph_bench(fn, (0.5, 0.2, 0.8))) == 3
