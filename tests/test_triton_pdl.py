"""Programmatic dependent launch of the batch-1 GEMVs (``backends/triton/pdl.py``): when the
GEMVs use it, and on a GPU that chained dependent GEMVs give the bits of ordinary launches.

The kernels' side (the L2 prefetch, then ``griddepcontrol.wait`` before any global load, then
``launch_dependents``) is checked in the sm_90 PTX by ``tests/test_triton_compile_sm90.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_w4a16_mma import _fp4  # noqa: E402

from qcompile.backends.triton import pdl, runtime  # noqa: E402
from qcompile.backends.triton import w4a16_gemv as g1  # noqa: E402
from qcompile.backends.triton.gemv_fusion import GemvFusion  # noqa: E402

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_on_by_default_and_never_off_cuda():
    """On by default (timed faster on an H200, with the same tokens), never off CUDA."""
    assert runtime.gemv_switches({}) == (False, True)
    assert runtime.gemv_switches({"QCOMPILE_GEMV_PDL": "0"}) == (False, False)
    assert pdl.launch_flags(torch.device("cpu")) == {"PDL": False}


def test_switches_from_the_environment():
    """``QCOMPILE_GEMV1`` and ``QCOMPILE_GEMV_PDL`` set the start values; anything else is
    refused with the variable and the value named."""
    assert runtime.gemv_switches({"QCOMPILE_GEMV1": "mma", "QCOMPILE_GEMV_PDL": "1"}) == (
        True, True)
    assert runtime.gemv_switches({"QCOMPILE_GEMV1": "auto", "QCOMPILE_GEMV_PDL": "0"}) == (
        "auto", False)
    assert runtime.gemv_switches({"QCOMPILE_GEMV1": "", "QCOMPILE_GEMV_PDL": ""}) == (
        False, True)
    assert runtime.gemv_switches({"QCOMPILE_GEMV1": "tma"}) == ("tma", True)
    with pytest.raises(ValueError, match="QCOMPILE_GEMV1 must be one of fma, mma, tma, auto, "
                                         "got 'tensor'"):
        runtime.gemv_switches({"QCOMPILE_GEMV1": "tensor"})
    with pytest.raises(ValueError, match="QCOMPILE_GEMV_PDL must be 0 or 1, got 'yes'"):
        runtime.gemv_switches({"QCOMPILE_GEMV_PDL": "yes"})


def test_flags_only_where_available(monkeypatch):
    """With the switch on, a launch gets the kernel flag and Triton's option together, and
    only where PDL is available."""
    monkeypatch.setattr(runtime, "GEMV_PDL", True)
    assert pdl.launch_flags(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(pdl, "available", lambda device: True)
    assert pdl.launch_flags(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(runtime, "GEMV_PDL", False)
    assert pdl.launch_flags(torch.device("cuda")) == {"PDL": False}


def test_available_needs_sm90_compiled_kernels_and_a_triton_with_it(monkeypatch):
    """CUDA, compute capability 9.0+, not the interpreter, Triton's ``launch_pdl``: all four."""
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(pdl, "_triton_supports", lambda: True)
    monkeypatch.setattr(pdl, "_capable", lambda index: index == 0)  # device 1: before sm_90
    assert pdl.available(cuda0)
    assert not pdl.available(cuda1)
    assert not pdl.available(torch.device("cpu"))
    monkeypatch.setattr(runtime, "interpreting", lambda: True)
    assert not pdl.available(cuda0)
    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(pdl, "_triton_supports", lambda: False)
    assert not pdl.available(cuda0)


def _chain(h, w, steps, kernel):
    """``steps`` batch-1 GEMVs, each reading the one before: RMSNorm in front, the residual
    behind (a decode step's pattern), so every launch depends on the previous one's output."""
    gamma = torch.linspace(0.5, 1.5, h.shape[-1], device=h.device, dtype=h.dtype)
    for _ in range(steps):
        fusion = GemvFusion(rms_weight=gamma, rms_eps=1e-5, residual=h)
        h = g1.w4a16_gemv1(h, w[0], w[1], w[2], w[3], w[4], w[5], w[6], None, True,
                           kernel=kernel, fusion=fusion)
    return h


@pytest.mark.skipif(not SM90, reason="needs an sm_90+ GPU")
@pytest.mark.parametrize("kernel", ["fma", "mma"])
def test_dependent_gemvs_give_the_bits_of_ordinary_launches(monkeypatch, kernel):
    """Eight chained GEMVs (and 64 in a CUDA graph, replayed) launched as programmatic
    dependents equal the ordinary launches bit for bit: a wait placed after a read of the
    previous output would show as a mismatch."""
    x, w, _, _ = _fp4("fp4_e2m1/g128/asym", 4096, 4096, torch.bfloat16)
    x = x / x.abs().amax()
    assert pdl.available(x.device)
    want = _chain(x, w, 8, kernel)  # also tunes each shape once, for both modes
    monkeypatch.setattr(runtime, "GEMV_PDL", True)
    assert torch.equal(_chain(x, w, 8, kernel), want)
    src = x.clone()
    want64 = _chain(src, w, 64, kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(src, w, 64, kernel)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want64)
