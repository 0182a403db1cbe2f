"""``fp8_plan``: ``qcompile::fp8_linear``'s per-weight host work done once, never stale.

Under the Triton interpreter, through the op: each check counts the calls that took the full
path (``fp8_gemm.fp8_scaled_mm``) and compares the bits with it. The prepared launches need
real ``JITFunction`` kernels: :func:`test_prepared_launch_is_the_full_paths` runs this file as
a script with the stand-in CUDA driver of ``tests/fake_cuda.py`` and compares each planned
launch with the full path's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import fp8_gemm, fp8_plan  # noqa: E402
from qcompile.backends.triton.ops import kernels_on_cpu  # noqa: E402
from qcompile.backends.triton.runtime import KernelInputError  # noqa: E402

HERE = Path(__file__).resolve().parent
N, K = 40, 72
op = torch.ops.qcompile.fp8_linear
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(),
                                      reason="interpreter checks (CPU)")


def _weight(seed: int = 0, n: int = N, k: int = K):
    """FP8 per-channel ``(wq [N, K], w_scale [N, 1])``, as ``lower-triton`` leaves them."""
    from qcompile.testing import fp8_rows

    return fp8_rows(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))


def _act(m: int, seed: int = 1, k: int = K):
    from qcompile.testing import fp8_rows

    q, s = fp8_rows(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3)
    return q.view(1, m, k), s.view(1, m, 1)


@pytest.fixture
def full_calls(monkeypatch):
    count = [0]
    full = fp8_gemm.fp8_scaled_mm

    def counted(*args, **kwargs):
        count[0] += 1
        return full(*args, **kwargs)

    monkeypatch.setattr(fp8_gemm, "fp8_scaled_mm", counted)
    fp8_plan.clear()
    yield count
    fp8_plan.clear()


def _full(q, s, wq, w_scale, bias, dtype):
    return fp8_gemm.fp8_scaled_mm(q.reshape(-1, K), s.reshape(-1, 1), wq, w_scale.reshape(-1),
                                  bias, out_dtype=dtype).view(*q.shape[:-1], wq.shape[0])


@interpreter_only
@pytest.mark.parametrize(("m", "bias", "dtype"), [
    (1, True, torch.bfloat16), (7, False, torch.float32), (300, True, torch.float16)])
def test_linear_runs_through_the_plan(full_calls, m, bias, dtype):
    """Every call runs through the weight's plan, with the full path's bits."""
    wq, w_scale = _weight()
    b = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(dtype) if bias else None
    q, s = _act(m)
    with kernels_on_cpu():
        first = op(q, s, wq, w_scale, b, dtype)
        again = op(q, s, wq, w_scale, b, dtype)
        assert full_calls[0] == 0 and fp8_plan.plans() == 1
        want = _full(q, s, wq, w_scale, b, dtype)
    assert first.shape == (1, m, N) and first.dtype == dtype
    assert torch.equal(first, want) and torch.equal(again, want)


@interpreter_only
def test_plan_follows_the_weight(full_calls):
    """Another scale tensor gets its own plan; new storage, shape or strides behind ``wq``
    builds a new one; an in-place update is seen; a non-FP8 input keeps the full path."""
    wq, w_scale = _weight()
    q, s = _act(20)
    bf = torch.bfloat16

    def planned(wq, w_scale) -> torch.Tensor:
        before = full_calls[0]
        y = op(q, s, wq, w_scale, None, bf)
        assert full_calls[0] == before, "full path"
        assert torch.equal(y, _full(q, s, wq, w_scale, None, bf))
        return y

    with kernels_on_cpu():
        base = planned(wq, w_scale)
        assert torch.equal(planned(wq, w_scale * 2), 2 * base)
        wq.data = wq.clone().flip(0)
        moved = planned(wq, w_scale)
        assert not torch.equal(moved, base)
        wq.copy_(wq.flip(0))  # in place: back to the first values
        assert torch.equal(planned(wq, w_scale), base)
        wide = torch.zeros(N, 2 * K, dtype=wq.dtype)
        wide[:, :K] = wq
        wq.data = wide[:, :K]  # strided rows: the same values
        assert torch.equal(planned(wq, w_scale), base)
        assert fp8_plan.plans() == 1


@interpreter_only
def test_plan_keeps_the_full_paths_errors(full_calls):
    wq, w_scale = _weight()
    q, s = _act(20)
    bf = torch.bfloat16
    with kernels_on_cpu():
        op(q, s, wq, w_scale, None, bf)
        with pytest.raises(KernelInputError, match="bias has shape"):
            op(q, s, wq, w_scale, torch.zeros(N + 1).to(bf), bf)
        with pytest.raises(KernelInputError, match="b_scale has shape"):
            op(q, s, wq, w_scale[:4], None, bf)
        with pytest.raises(KernelInputError, match="a_scale has shape"):
            op(q, s[:, :3], wq, w_scale, None, bf)
        with pytest.raises(KernelInputError, match="out_dtype"):
            op(q, s, wq, w_scale, None, torch.int32)


@interpreter_only
def test_plan_goes_with_its_weight(full_calls):
    import gc
    import weakref

    weight = list(_weight())
    q, s = _act(5)
    with kernels_on_cpu():
        op(q, s, *weight, None, torch.bfloat16)
    assert fp8_plan.plans() == 1
    alive = weakref.ref(weight[0])
    del weight
    gc.collect()
    assert alive() is None and fp8_plan.plans() == 0


@pytest.fixture(scope="module")
def report() -> dict:
    import fake_cuda

    return fake_cuda.run_worker(__file__, "fp8 plan")


@pytest.mark.parametrize("case", ["bias", "no-bias", "decode", "strided", "restrided", "held"])
def test_prepared_launch_is_the_full_paths(report, case):
    """With real kernels: from the second call the planned launch is the full path's (kernel,
    grid, scalars, the same input tensors, the weight itself, the output it returns), and a
    plan holds only the weight's scales and bias, not ``wq``."""
    assert report[case]["ok"], report[case].get("error")


# --- the fake-CUDA worker (run as a script) ------------------------------------------------

def _worker(out: str) -> None:
    import gc
    import weakref

    sys.path.insert(0, str(HERE))
    import fake_cuda

    fake_cuda.wrappers_as_on_gpu()
    real = fp8_plan.linear
    n, k = 64, 256

    def launched(fn):
        before = len(fake_cuda.LAUNCHES)
        y = fn()
        new = fake_cuda.LAUNCHES[before:]
        assert len(new) == 1, f"{len(new)} launches"
        return y, new[0]

    def check(q, s, wq, w_scale, bias) -> None:
        call = lambda: op(q, s, wq, w_scale, bias, torch.bfloat16)  # noqa: E731
        fp8_plan.linear = lambda *a: None
        try:
            ref_y, (ref_name, ref) = launched(call)
        finally:
            fp8_plan.linear = real
        call()  # builds the plan and its launch
        y, (name, got) = launched(call)
        assert name == ref_name and len(got) == len(ref)
        assert y.shape == ref_y.shape and y.dtype == ref_y.dtype
        moved = {ref_y.data_ptr(): y.data_ptr()}
        for i, (f, p) in enumerate(zip(ref, got, strict=True)):
            if i in (6, 7, 8):
                continue
            if isinstance(f, torch.Tensor):
                assert p.dtype == f.dtype and p.data_ptr() == moved.get(
                    f.data_ptr(), f.data_ptr()), f"argument {i}"
            elif i == 4:
                assert p is f, "another compiled kernel"
            else:
                assert p == f, f"argument {i}: {f!r} != {p!r}"

    gen = torch.Generator().manual_seed(0)

    def rows(m, width=k):
        from qcompile.testing import fp8_rows

        q, s = fp8_rows(torch.randn(m, width, generator=gen))
        return q.view(1, m, width), s.view(1, m, 1)

    def weight():
        from qcompile.testing import fp8_rows

        return fp8_rows(torch.randn(n, k, generator=gen))

    def case_bias():
        check(*rows(300), *weight(), torch.randn(n, generator=gen).bfloat16())

    def case_no_bias():
        check(*rows(128), *weight(), None)

    def case_decode():
        check(*rows(1), *weight(), None)

    def case_strided():
        q, s = rows(40, 2 * k)
        check(q[..., :k], s, *weight(), None)

    def case_restrided():
        """The same storage, pointer and shape behind ``wq`` at other strides (its ``.data``
        swapped): the plan must not launch with the old strides."""
        w8, w_scale = weight()
        wide = torch.zeros(n, 2 * k).to(torch.float8_e4m3fn)
        wide[:, :k] = w8
        wq = wide[:, :k]
        q, s = rows(32)
        check(q, s, wq, w_scale, None)
        wq.data = wide.view(-1)[: n * k].view(n, k)  # rows k apart instead of 2k
        assert wq.data_ptr() == wide.data_ptr() and wq.stride() == (k, 1)
        check(q, s, wq, w_scale, None)

    def case_held():
        wq, w_scale = weight()
        q, s = rows(64)
        y = op(q, s, wq, w_scale, None, torch.bfloat16)
        y = op(q, s, wq, w_scale, None, torch.bfloat16)
        plan = fp8_plan._PLANS[wq]
        (ready,) = plan.gemms.ready.values()
        kept = [v for v in (*ready.values, *ready.args, *ready.kwargs.values())
                if isinstance(v, torch.Tensor)]
        assert {t.data_ptr() for t in kept} <= {w_scale.data_ptr()}, "holds a call's tensor"
        refs = [weakref.ref(t) for t in (wq, q, s)]
        del wq, w_scale, q, s, y, plan, ready, kept
        fake_cuda.LAUNCHES.clear()  # the recorded launches hold their arguments
        gc.collect()
        assert all(r() is None for r in refs) and not fp8_plan.plans()

    fake_cuda.run_cases({"bias": case_bias, "no-bias": case_no_bias, "decode": case_decode,
                         "strided": case_strided, "restrided": case_restrided,
                         "held": case_held}, out, fp8_plan.clear)

if __name__ == "__main__":
    _worker(sys.argv[1])
