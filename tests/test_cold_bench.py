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


@pytest.mark.skipif(CUDA, reason="checks the chain's calls in the interpreter (CPU)")
def test_layer_chain_runs_the_fused_layer_in_each_launch_mode(monkeypatch):
    """The W4A16 benchmark's ``layer-chain`` rows: per format, kernel and launch mode, one
    decoder layer's four fused GEMVs (small shapes here, in the interpreter; the timing
    replaced by a call that records the step's result), and the runtime switches restored.
    The down projection's result must be what the composed ops give."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import kernels_w4a16 as kb

    from qcompile.backends.triton import runtime
    from qcompile.backends.triton.runtime import element_table
    from qcompile.backends.triton.w4a16 import w4a16_linear_ref
    from qcompile.formats import pack_codes, parse_format, quantize

    shapes = {"qkv": (48, 256), "o": (256, 256), "gate_up": (96, 256), "down": (256, 128)}
    monkeypatch.setattr(kb, "LAYER_SHAPES", shapes)
    results = []
    monkeypatch.setattr(cold_bench, "cold_times",
                        lambda fn: results.append(fn()) or [1e-3, 2e-3, 3e-3])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "cpu")
    gen = torch.Generator().manual_seed(0)
    layer_args, dense = {}, {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=gen) * 0.05
        dense[name] = w.to(torch.bfloat16)
        for fmt in kb.FORMATS:
            spec = parse_format(fmt)
            q = quantize(w, spec)
            layer_args[fmt, name] = (pack_codes(q.codes, 4), element_table(spec.elem, "cpu"),
                                     q.scale, q.scale_neg, q.zero, q.outer, spec.group_size)
    switches = (runtime.GEMV_PDL, runtime.GEMV1_MMA)
    rows = kb.layer_chain(layer_args, dense, torch.device("cpu"))
    assert [(r["format"], r["kernel"], r["pdl"]) for r in rows] == [
        (f, k, False) for f in kb.FORMATS for k in ("gemv1", "gemv1-mma", "gemv1-tma")
        for _ in (0, 1)]
    assert all(r["w4a16_us"] == pytest.approx(2.0) and r["shape"] == "layer-chain"
               for r in rows)
    assert (runtime.GEMV_PDL, runtime.GEMV1_MMA) == switches  # restored
    # results[0]: bf16's chain; then one per row. Rebuild the last down projection's inputs.
    gen = torch.Generator().manual_seed(1)
    h, attn, gate, up = (torch.randn(1, d, generator=gen, dtype=torch.bfloat16)
                         for d in (256, 256, 128, 128))
    for fmt, got in zip([r["format"] for r in rows], results[1:], strict=True):
        a = {name: layer_args[fmt, name] for name in shapes}
        h2 = h + w4a16_linear_ref(attn, *a["o"])
        want = h2 + w4a16_linear_ref(torch.nn.functional.silu(gate) * up, *a["down"])
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2**-4)


@pytest.mark.parametrize("bench", ["plain_bench", "graph_bench", "cold_graph_bench"])
def test_a_single_pruned_config_is_not_timed(monkeypatch, bench):
    """An autotuning whose pruning kept one config (Triton 3.6 times it anyway; 3.9 does
    not) gets stand-in times from every qcompile do_bench without a call; the mark is used
    up, so the next timing, after a pruning that kept two, runs for real."""
    import triton.testing

    from qcompile.backends.triton import runtime

    fn = getattr(cold_bench if bench == "cold_graph_bench" else runtime, bench)
    timed = []
    fake = lambda call, quantiles=None, **kw: (timed.append(call), call(), [2.0, 1.0, 3.0])[2]  # noqa: E731
    monkeypatch.setattr(triton.testing, "do_bench", fake)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake)
    monkeypatch.setattr(cold_bench, "cold_times", lambda call: (timed.append(call), [2.0])[1])
    monkeypatch.setattr(runtime, "_times_one_config", lambda: True)  # as Triton 3.6
    prune = runtime.tuning()["early_config_prune"]
    calls = []
    kernel_call = lambda: calls.append(1)  # noqa: E731
    monkeypatch.setenv("QCOMPILE_TRITON_TUNE", "first")
    assert prune(["a", "b"], {}) == ["a"]
    assert fn(kernel_call, (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert timed == [] and calls == []
    monkeypatch.delenv("QCOMPILE_TRITON_TUNE")
    assert prune(["a", "b"], {}) == ["a", "b"]
    assert fn(kernel_call, (0.5, 0.2, 0.8)) != [0.0, 0.0, 0.0]
    assert len(timed) == 1


def test_no_mark_is_left_where_triton_skips_a_single_config(monkeypatch):
    """Where the autotuner does not time a single config (Triton 3.9), a pruning that kept one
    leaves no mark: a later timing outside that autotuning still times."""
    import triton.testing

    from qcompile.backends.triton import runtime

    monkeypatch.setattr(runtime, "_times_one_config", lambda: False)
    monkeypatch.setenv("QCOMPILE_TRITON_TUNE", "first")
    assert runtime.tuning()["early_config_prune"](["a", "b"], {}) == ["a"]
    monkeypatch.setattr(triton.testing, "do_bench", lambda call, quantiles=None: [2.0])
    assert runtime.plain_bench(lambda: None, (0.5,)) == [2.0]


def test_which_tritons_time_a_single_config():
    """The check reads the installed autotuner: 3.9 skips the timing of one config."""
    import triton

    from qcompile.backends.triton import runtime

    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    if (major, minor) >= (3, 9):
        assert runtime._times_one_config() is False
