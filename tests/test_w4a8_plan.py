"""``w4a8_plan``: the W4A8 prefill's per-weight host work done once, and never a stale plan.

Under the Triton interpreter, through the ``qcompile::w4a8_linear`` op as a compiled model
calls it: each check counts the calls that took the full path (``w4a8.w4a8_linear``) and
compares the results' bits with the full path's. The plan's prepared launches need real
``JITFunction`` kernels: :func:`test_prepared_launches_match_the_full_path` runs this file as
a script with the stand-in CUDA driver of ``tests/fake_cuda.py`` (kernels compile for sm_90,
the launcher records its arguments) and compares every launch with the full path's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import (
    fp8_plan,  # noqa: E402
    w4a8_plan,  # noqa: E402
)
from qcompile.backends.triton import w4a8 as w8  # noqa: E402
from qcompile.backends.triton.ops import kernels_on_cpu  # noqa: E402
from qcompile.backends.triton.runtime import KernelInputError  # noqa: E402

HERE = Path(__file__).resolve().parent
N, K = 48, 160  # K: three groups of 64, the last one ragged (32)
GROUP = 64


def _weight(seed: int = 0, group: int = GROUP):
    """``(packed, gexp, row_scale)`` of an M2-scaled FP4 weight, as ``lower-triton`` leaves
    it."""
    from test_triton_w4a8 import fp4_weight

    _, _, packed, gexp, row_scale = fp4_weight(N, K, group, "m2",
                                               torch.Generator().manual_seed(seed))
    return packed, gexp, row_scale


def _act(m: int, seed: int = 1):
    """FP8 per-token codes ``[1, m, K]`` and their scales ``[1, m, 1]``."""
    from qcompile.testing import fp8_rows

    q, s = fp8_rows(torch.randn(m, K, generator=torch.Generator().manual_seed(seed)) * 2)
    return q.view(1, m, K), s.view(1, m, 1)


op = torch.ops.qcompile.w4a8_linear
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(),
                                      reason="interpreter checks (CPU)")

@pytest.fixture
def full_calls(monkeypatch):
    """Count of op calls that took the full path (not path timing's calls within one)."""
    from test_w4a16_plan import count_outer_calls

    count = count_outer_calls(monkeypatch, w8, "w4a8_linear")
    w4a8_plan.clear()
    yield count
    w4a8_plan.clear()


def _forced(q, s, packed, gexp, row_scale, bias, dtype, group=GROUP):
    """The full path's shift-then-GEMM route, forced, on 2-D rows."""
    return w8.w4a8_linear(q.reshape(-1, K), s.reshape(-1, 1), packed, gexp, row_scale,
                          group, bias, out_dtype=dtype, path="dequant").view(
                              *q.shape[:-1], N)

@interpreter_only
@pytest.mark.parametrize(("group", "bias", "dtype"), [
    (GROUP, True, torch.bfloat16), (32, False, torch.float32), (50, True, torch.float16),
    (256, False, torch.bfloat16)])
def test_prefill_runs_through_the_plan(full_calls, group, bias, dtype):
    """Where nothing can be timed (the shift-then-GEMM route is the default from 256 rows)
    every call, the first included, skips the full path, with its bits: the shifted weight
    and the FP8 GEMM of the forced route, within the reference's bound."""
    from test_triton_w4a8 import check

    packed, gexp, row_scale = _weight(group=group)
    b = torch.randn(N, generator=torch.Generator().manual_seed(5)).to(dtype) \
        if bias else None
    q, s = _act(260)
    with kernels_on_cpu():
        first = op(q, s, packed, gexp, row_scale, b, group, K, dtype)
        assert w4a8_plan.plans() == 1
        again = op(q, s, packed, gexp, row_scale, b, group, K, dtype)
        assert full_calls[0] == 0, "a planned call took the full path"
        forced = _forced(q, s, packed, gexp, row_scale, b, dtype, group)
    assert again.dtype == dtype and again.shape == (1, 260, N)
    assert torch.equal(again, first) and torch.equal(first, forced)
    check(again.view(260, N), q.view(260, K), s.view(260, 1), packed, gexp, row_scale,
          group, b)

@interpreter_only
def test_plan_follows_the_timed_route(full_calls, tuner):
    """Where ``path_tuning`` times the routes, the plan waits for the choice and follows
    it: a shape whose fastest route is the fused kernel keeps the full path."""
    times, timed = tuner
    packed, gexp, row_scale = _weight()
    q, s = _act(260)
    times.update(fused=1.0, swap=2.0, dequant=3.0)
    with kernels_on_cpu():
        fused = op(q, s, packed, gexp, row_scale, None, GROUP, K, torch.bfloat16)
        assert timed == ["dequant", "fused", "swap"]  # the first call timed the routes
        op(q, s, packed, gexp, row_scale, None, GROUP, K, torch.bfloat16)
        assert full_calls[0] == 2, "a plan ran a route the timing did not pick"
        times.update(fused=3.0, dequant=1.0)  # another shape's timing picks the shift
        q2, s2 = _act(600)
        op(q2, s2, packed, gexp, row_scale, None, GROUP, K, torch.bfloat16)
        assert full_calls[0] == 3
        shifted = op(q2, s2, packed, gexp, row_scale, None, GROUP, K, torch.bfloat16)
        assert full_calls[0] == 3, "the timed shift-then-GEMM route took the full path"
        want = _forced(q2, s2, packed, gexp, row_scale, None, torch.bfloat16)
        fused_forced = w8.w4a8_linear(q.view(260, K), s.view(260, 1), packed, gexp,
                                      row_scale, GROUP, None, path="fused")
    assert torch.equal(shifted, want)
    assert torch.equal(fused.view(260, N), fused_forced)

@interpreter_only
def test_plan_follows_the_weights(full_calls):
    """Fewer rows or a residual take the full path; another scale tensor gets its own
    plan; new storage behind the codes builds a new one; an in-place update is seen."""
    packed, gexp, row_scale = _weight()
    q, s = _act(300)
    bf = torch.bfloat16

    def planned_and_right(*weights, rows=(q, s)) -> torch.Tensor:
        calls = full_calls[0]
        y = op(*rows, *weights, None, GROUP, K, bf)
        assert full_calls[0] == calls, "full path"
        assert torch.equal(y, _forced(*rows, *weights, None, bf))
        return y

    with kernels_on_cpu():
        op(q, s, packed, gexp, row_scale, None, GROUP, K, bf)
        base = planned_and_right(packed, gexp, row_scale)
        # Twice the row scales, another tensor: its own plan, and exactly twice the
        # result (a power of two in the epilogue).
        assert torch.equal(planned_and_right(packed, gexp, row_scale * 2), 2 * base)
        calls = full_calls[0]
        q40, s40 = _act(40)
        op(q40, s40, packed, gexp, row_scale, None, GROUP, K, bf)  # below 256 rows
        res = torch.randn(1, 300, N).to(bf)
        with_res = op(q, s, packed, gexp, row_scale, None, GROUP, K, bf, True, res)
        assert full_calls[0] == calls + 2
        assert torch.equal(with_res, res + base)
        planned_and_right(packed, gexp, row_scale, rows=_act(700, seed=2))  # another M
        old = planned_and_right(packed, gexp, row_scale)
        gen = torch.Generator().manual_seed(3)
        packed.data = packed.clone()[torch.randperm(N, generator=gen)]
        moved = planned_and_right(packed, gexp, row_scale)
        assert not torch.equal(moved, old)
        packed.copy_(packed.flip(0))
        assert not torch.equal(planned_and_right(packed, gexp, row_scale), moved)
        assert w4a8_plan.plans() == 1  # one weight: its plans replaced each other

@interpreter_only
def test_plan_keeps_the_full_paths_errors(full_calls):
    """A malformed call still gets the full path's error after a plan exists."""
    packed, gexp, row_scale = _weight()
    q, s = _act(300)
    bf = torch.bfloat16
    with kernels_on_cpu():
        op(q, s, packed, gexp, row_scale, None, GROUP, K, bf)
        op(q, s, packed, gexp, row_scale, None, GROUP, K, bf)
        with pytest.raises(KernelInputError, match="bias has shape"):
            op(q, s, packed, gexp, row_scale, torch.zeros(N + 1).to(bf), GROUP, K, bf)
        with pytest.raises(KernelInputError, match="bias has dtype int32"):
            op(q, s, packed, gexp, row_scale, torch.zeros(N, dtype=torch.int32), GROUP, K, bf)
        with pytest.raises(KernelInputError, match="gexp has shape"):
            op(q, s, packed, gexp[:, :1], row_scale, None, GROUP, K, bf)
        with pytest.raises(KernelInputError, match="a_scale has shape"):
            op(q, s[:, :10], packed, gexp, row_scale, None, GROUP, K, bf)
        with pytest.raises(KernelInputError, match="a_scale has dtype float64"):
            op(q, s.double(), packed, gexp, row_scale, None, GROUP, K, bf)
        with pytest.raises(KernelInputError, match="row_scale has shape"):
            op(q, s, packed, gexp, row_scale[:5], None, GROUP, K, bf)

@interpreter_only
def test_plan_goes_with_its_weight(full_calls):
    """A plan holds nothing that keeps its weight's ``packed`` tensor alive."""
    import gc
    import weakref

    weight = list(_weight())
    q, s = _act(260)
    with kernels_on_cpu():
        op(q, s, *weight, None, GROUP, K, torch.bfloat16)
        op(q, s, *weight, None, GROUP, K, torch.bfloat16)
    assert full_calls[0] == 0 and w4a8_plan.plans() == 1
    alive = weakref.ref(weight[0])
    del weight
    gc.collect()
    assert alive() is None and w4a8_plan.plans() == 0


@interpreter_only
def test_compiled_model_runs_its_linears_through_plans(monkeypatch):
    """``torch.compile(backend="qcompile")`` with the ``w4a8-m2`` recipe (Inductor) passes
    the same weight tensors at every call: every prefill linear runs through its plan, with
    the logits of the full path."""
    from test_w4a16_plan import compiled_prefills

    got = compiled_prefills(w4a8_plan, "w4a8-m2", monkeypatch, packed_at=2)
    first, seen = got["seen_first"], got["seen"]
    weights = {p for p, _ in first}
    assert first and all(used for _, used in first + seen), first + seen
    assert {p for p, _ in seen} == weights and len(seen) == len(weights) == got["plans"]
    assert torch.equal(got["planned"], got["full"]) and torch.equal(got["first"], got["full"])


@pytest.fixture(scope="module")
def report() -> dict:
    import fake_cuda

    return fake_cuda.run_worker(__file__, "w4a8 plan")

@pytest.mark.parametrize("case", ["bias", "no-bias", "strided", "rows", "evict"])
def test_prepared_launches_match_the_full_path(report, case):
    """With real kernels: from the third call (the second builds the prepared launches)
    the planned call launches what the full path launches (kernel, grid, every scalar,
    the same input tensors; the shifted weight it writes is the GEMM's), and the plan
    keeps at most ``GEMMS_PER_PLAN`` GEMM launches (one per row count and strides) and no
    call's tensors."""
    assert report[case]["ok"], report[case].get("error")


# --- the fake-CUDA worker (run as a script) ------------------------------------------------

def _worker(out: str) -> None:
    """Each case: the full path's launches, then the planned call's; write ``{case: {"ok",
    "error"}}`` to ``out``."""
    import gc
    import weakref

    sys.path.insert(0, str(HERE))
    import fake_cuda

    fake_cuda.wrappers_as_on_gpu()
    op = torch.ops.qcompile.w4a8_linear
    real_prefill = w4a8_plan.prefill

    def launches(fn) -> tuple[object, list]:
        before = len(fake_cuda.LAUNCHES)
        y = fn()
        return y, fake_cuda.LAUNCHES[before:]

    def compare(full: list, planned: list, y) -> None:
        """Same kernels, grids and scalars; inputs the same tensors' memory; the planned
        GEMM reads the weight its shift wrote and writes the returned result."""
        assert [n for n, _ in planned] == [n for n, _ in full], (planned, full)
        (_, shift_f), (_, gemm_f) = full
        (_, shift_p), (_, gemm_p) = planned
        assert shift_p[9 + 2] is not None and gemm_p[9 + 1].data_ptr() == \
            shift_p[9 + 2].data_ptr(), "the GEMM does not read the shifted weight"
        assert gemm_p[9 + 2].data_ptr() == y.data_ptr(), "the result is not the GEMM's"
        outputs = {(0, 2), (1, 1), (1, 2)}  # the shift's w, the GEMM's b and c
        for j, (f, p) in enumerate(((shift_f, shift_p), (gemm_f, gemm_p))):
            assert len(f) == len(p)
            for i, (x, z) in enumerate(zip(f, p, strict=True)):
                if i in (6, 7, 8):
                    continue  # launch metadata and hooks (see test_triton_launch._same)
                if isinstance(x, torch.Tensor):
                    assert isinstance(z, torch.Tensor) and z.dtype == x.dtype
                    if (j, i - 9) in outputs:
                        continue
                    if j == 1 and i - 9 == 5 and gemm_f[9 + 5] is gemm_f[9 + 2]:
                        assert z.data_ptr() == gemm_p[9 + 2].data_ptr()  # bias_ptr is c
                        continue
                    assert z.data_ptr() == x.data_ptr(), f"launch {j} argument {i}"
                elif i == 4:
                    assert z is x, f"launch {j}: another compiled kernel"
                else:
                    assert z == x, f"launch {j} argument {i}: {x!r} != {z!r}"

    def check(q, s, packed, gexp, row_scale, bias, rounds: int = 1) -> None:
        w4a8_plan.prefill = lambda *a, **k: None
        try:
            _, full = launches(lambda: op(q, s, packed, gexp, row_scale, bias, 128, 256,
                                          torch.bfloat16))
        finally:
            w4a8_plan.prefill = real_prefill
        assert len(full) == 2, full
        for _ in range(2):  # builds the plan, then prepares what its first call launched
            op(q, s, packed, gexp, row_scale, bias, 128, 256, torch.bfloat16)
        for _ in range(rounds):
            y, planned = launches(lambda: op(q, s, packed, gexp, row_scale, bias, 128, 256,
                                             torch.bfloat16))
            compare(full, planned, y)

    gen = torch.Generator().manual_seed(0)
    n, k = 64, 256

    def weight():
        from qcompile.backends.triton.w4a8 import w4a8_split_scales
        from qcompile.formats import pack_codes, parse_format, quantize

        qw = quantize(torch.randn(n, k, generator=gen) * 0.05, parse_format("fp4_e2m1/g128/m2"))
        return (pack_codes(qw.codes, 4), *w4a8_split_scales(qw.scale, qw.outer))

    def rows(m: int):
        from qcompile.testing import fp8_rows

        q, s = fp8_rows(torch.randn(m, k, generator=gen))
        return q.view(1, m, k), s.view(1, m, 1)

    def case_bias() -> None:
        check(*rows(300), *weight(), torch.randn(n, generator=gen).bfloat16(), rounds=2)
        plan = next(iter(w4a8_plan._PLANS.values()))
        assert plan.shift is not None and len(plan.gemms) == 1

    def case_no_bias() -> None:
        check(*rows(272), *weight(), None, rounds=2)

    def case_strided() -> None:
        q, s = rows(300)
        wide = torch.zeros(1, 300, 2 * k, dtype=q.dtype)
        wide[..., :k] = q
        check(wide[..., :k], s, *weight(), None)

    def case_rows() -> None:
        packed, gexp, row_scale = weight()
        for m in (256, 300, 256):
            check(*rows(m), packed, gexp, row_scale, None)
        q, s = rows(300)
        wide = torch.zeros(1, 300, 2 * k, dtype=q.dtype)
        wide[..., :k] = q
        check(wide[..., :k], s, packed, gexp, row_scale, None)  # 300 rows again, strided
        plan = w4a8_plan._PLANS[packed]
        assert sorted(key[0] for key in plan.gemms.keys()) == [256, 300, 300]

    def case_evict() -> None:
        packed, gexp, row_scale = weight()
        held = []
        for i in range(fp8_plan.GEMMS_PER_PLAN + 2):
            q, s = rows(256 + 16 * i)
            for _ in range(2):
                y = op(q, s, packed, gexp, row_scale, None, 128, k, torch.bfloat16)
                held += [weakref.ref(t) for t in (q, s, y)]
        plan = w4a8_plan._PLANS[packed]
        assert len(plan.gemms) == fp8_plan.GEMMS_PER_PLAN
        assert min(key[0] for key in plan.gemms.keys()) == 256 + 16 * 2, "not the oldest gone"
        del q, s, y
        gc.collect()
        assert all(ref() is None for ref in held), "a plan holds a call's rows"
        # What the prepared launches still hold: the weight's scales only (the results are
        # views: their weak references say nothing about the memory behind them).
        weights = {t.data_ptr() for t in (gexp, row_scale)}
        for ready in (plan.shift, *plan.gemms.ready.values()):
            kept = [v for v in (*ready.values, *ready.args, *ready.kwargs.values())
                    if isinstance(v, torch.Tensor)]
            assert {t.data_ptr() for t in kept} <= weights, "a prepared launch holds a call's"
        alive = weakref.ref(packed)
        del packed, plan, ready, kept
        fake_cuda.LAUNCHES.clear()  # the recorded launches hold their arguments
        gc.collect()
        assert alive() is None and not w4a8_plan.plans(), "the plan keeps its weight alive"

    fake_cuda.run_cases({"bias": case_bias, "no-bias": case_no_bias, "strided": case_strided,
                         "rows": case_rows, "evict": case_evict}, out, w4a8_plan.clear)

if __name__ == "__main__":
    _worker(sys.argv[1])
