"""Caches of device tensors are built outside CUDA-graph memory pools."""

from __future__ import annotations

import threading

import pytest
import torch

from qcompile.device_cache import outside_graph_pools


def test_cpu_runs_here():
    here = threading.get_ident()
    seen = []
    out = outside_graph_pools(lambda: seen.append(threading.get_ident()) or torch.ones(3), "cpu")
    assert seen == [here] and torch.equal(out, torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_on_another_thread_and_outside_a_graph_pool():
    here = threading.get_ident()
    seen = []

    def make():
        seen.append(threading.get_ident())
        return torch.arange(4, device="cuda", dtype=torch.float32)

    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch._C._cuda_beginAllocateCurrentThreadToPool(0, pool)
        try:
            inside = torch.empty(1 << 20, device="cuda")  # this thread: the pool
            kept = outside_graph_pools(make, "cuda")
        finally:
            torch._C._cuda_endAllocateToPool(0, pool)
            torch._C._cuda_releasePool(0, pool)
    assert seen and seen[0] != here
    assert torch.equal(kept.cpu(), torch.arange(4.0))

    def pool_of(t):
        ptr = t.untyped_storage().data_ptr()
        for seg in torch.cuda.memory_snapshot():
            if seg["address"] <= ptr < seg["address"] + seg["total_size"]:
                return tuple(seg["segment_pool_id"])
        return None

    assert pool_of(inside) == tuple(pool)
    assert pool_of(kept) != tuple(pool)


def test_cached_tables_use_it(monkeypatch):
    """The element tables, INT code values, Hadamard bases and W4A8 power-of-two scales that
    kernels keep are built through it."""
    pytest.importorskip("triton")
    from qcompile import hadamard
    from qcompile.backends.triton import kron_quant, ops, runtime, w4a8

    calls = []

    def spy(make, device):
        calls.append(str(device))
        return make()

    for mod in (runtime, ops, kron_quant, hadamard, w4a8):
        monkeypatch.setattr(mod, "outside_graph_pools", spy)
    runtime._table.cache_clear()
    ops._int_codes.cache_clear()
    kron_quant.base_matrix.cache_clear()
    hadamard._normalized_base.cache_clear()
    runtime.element_table("fp4_e2m1", "cpu")
    ops._int_codes(4, 0, "cpu")
    kron_quant.base_matrix(2, 12, 32, "cpu")
    hadamard._normalized_base(12, torch.float32, torch.device("cpu"))
    w4a8._pow2_scales(torch.zeros(2, 3, dtype=torch.int8))
    assert len(calls) == 5
