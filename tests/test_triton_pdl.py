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


def test_attention_switch_off_by_default_and_from_the_environment(monkeypatch):
    """The decode attention's own switch: off unless ``QCOMPILE_ATTN_PDL=1``, anything but 0
    or 1 refused by name; its launches follow it, not the GEMVs' switch."""
    assert runtime.attention_pdl_switch({}) is False
    assert runtime.attention_pdl_switch({"QCOMPILE_ATTN_PDL": ""}) is False
    assert runtime.attention_pdl_switch({"QCOMPILE_ATTN_PDL": "1"}) is True
    with pytest.raises(ValueError, match="QCOMPILE_ATTN_PDL must be 0 or 1, got 'on'"):
        runtime.attention_pdl_switch({"QCOMPILE_ATTN_PDL": "on"})
    monkeypatch.setattr(pdl, "available", lambda device: True)
    monkeypatch.setattr(runtime, "GEMV_PDL", True)
    monkeypatch.setattr(runtime, "ATTN_PDL", False)
    assert pdl.launch_flags(torch.device("cuda"), attention=True) == {"PDL": False}
    monkeypatch.setattr(runtime, "GEMV_PDL", False)
    monkeypatch.setattr(runtime, "ATTN_PDL", True)
    assert pdl.launch_flags(torch.device("cuda"), attention=True) == {"PDL": True,
                                                                       "launch_pdl": True}
    assert pdl.launch_flags(torch.device("cuda")) == {"PDL": False}


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
    monkeypatch.setattr(runtime, "GEMV_PDL", False)  # ordinary launches (PDL is the default)
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


def _layer_chain(x, qkv, o, caches, mask, steps: int):
    """``steps`` decode steps of one attention block: the ``qkv`` GEMV (RMSNorm in front),
    the decode attention writing the step's key/value rows into ``caches`` at positions 40,
    41, ..., the ``o`` GEMV with the residual: each launch reads the one before's output."""
    from qcompile.backends.triton.decode_attention import CacheWrite, decode_attention

    k_cache, v_cache = caches
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    hq = x.shape[-1] // d
    gamma = torch.linspace(0.5, 1.5, x.shape[-1], device=x.device, dtype=x.dtype)
    for i in range(steps):
        y = g1.w4a16_gemv1(x, *qkv[:8], True, fusion=GemvFusion(rms_weight=gamma,
                                                                rms_eps=1e-5))
        q = y[:, :hq * d].view(1, hq, 1, d)
        kn = y[:, hq * d:(hq + hkv) * d].view(1, hkv, 1, d)
        vn = y[:, (hq + hkv) * d:].view(1, hkv, 1, d)
        idx = torch.full((1,), 40 + i, dtype=torch.long, device=x.device)
        a = decode_attention(q, k_cache, v_cache, mask, write=CacheWrite(idx, kn, vn))
        x = g1.w4a16_gemv1(a.reshape(1, hq * d), *o[:8], True,
                           fusion=GemvFusion(residual=x))
    return x


@pytest.mark.skipif(not SM90, reason="needs an sm_90+ GPU")
def test_dependent_decode_attention_gives_the_bits_of_ordinary_launches(monkeypatch):
    """Four decode steps of GEMV -> decode attention (with its cache write) -> GEMV, with the
    attention launched as a programmatic dependent between dependent GEMVs, give the
    outputs and caches of ordinary launches bit for bit."""
    hq, hkv, d, length = 32, 8, 128, 256
    h = hq * d
    x, qkv, _, _ = _fp4("fp4_e2m1/g128", (hq + 2 * hkv) * d, h, torch.bfloat16)
    _, o, _, _ = _fp4("fp4_e2m1/g128", h, h, torch.bfloat16, seed=1)
    x = x / x.abs().amax()
    qkv = (qkv[0], qkv[1], qkv[2], qkv[3], qkv[4], qkv[5], qkv[6], None)
    o = (o[0], o[1], o[2], o[3], o[4], o[5], o[6], None)
    gen = torch.Generator().manual_seed(3)
    caches = [(torch.randn(1, hkv, length, d, generator=gen) * 0.5).to(torch.bfloat16).cuda()
              for _ in range(2)]
    mask = torch.zeros(1, 1, 1, length, dtype=torch.bool, device="cuda")
    mask[..., :44] = True  # positions written so far and the four new ones
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(runtime, "GEMV_PDL", on)
        monkeypatch.setattr(runtime, "ATTN_PDL", on)
        assert pdl.launch_flags(x.device, attention=True)["PDL"] == on
        kv = [c.clone() for c in caches]
        runs[on] = (_layer_chain(x, qkv, o, kv, mask, 4), kv)
    assert torch.equal(runs[True][0], runs[False][0])
    for got, want in zip(runs[True][1], runs[False][1], strict=True):
        assert torch.equal(got, want)
