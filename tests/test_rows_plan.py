"""``rows_plan``: ``qcompile::quantize_rows`` relaunches its prepared kernel with the full
path's arguments, for each fused variant, and never a stale launch.

A prepared launch needs real ``JITFunction`` kernels, so the checks run in a subprocess (this
file as a script) with the stand-in CUDA driver of ``tests/fake_cuda.py``: the kernels compile
for sm_90 and the launcher records its arguments. Each case compares the planned call's launch
with the full path's (plans off) on the same rows: the same compiled kernel, grid and scalars,
the same input memory, and the outputs it returns. The kernels' numerics are checked by
``tests/test_triton_act_quant.py``; a relaunch passes them the same arguments. Under the
interpreter no launch is prepared (interpreted kernels are no ``JITFunction``), which
:func:`test_interpreter_keeps_the_full_path` checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import rows_plan  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = ["plain", "int8-rms", "rms-no-weight", "silu", "strided-silu", "hadamard",
         "general-had", "kron", "new-weight", "evict", "hooks"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check (CPU)")
def test_interpreter_keeps_the_full_path():
    """Interpreted kernels cannot be prepared: no plan, and the result is the full path's."""
    from qcompile.backends.triton.ops import kernels_on_cpu

    x = torch.randn(1, 20, 64).bfloat16()
    rows_plan.clear()
    try:
        with kernels_on_cpu():
            a = torch.ops.qcompile.quantize_rows(x, "fp8_e4m3/token", 0)
            b = torch.ops.qcompile.quantize_rows(x, "fp8_e4m3/token", 0)
        assert rows_plan.plans() == 0
    finally:
        rows_plan.clear()
    ref = torch.ops.qcompile.quantize_rows(x, "fp8_e4m3/token", 0)  # the CPU reference ops
    for got in (a, b):
        assert torch.equal(got[1], ref[1])
        assert torch.equal(got[0].view(torch.uint8), ref[0].view(torch.uint8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check (CPU)")
@pytest.mark.parametrize("variant", ["silu", "rms", "plain"])
def test_strided_rows_are_read_in_place(monkeypatch, variant):
    """The gate and up halves of a fused projection's output (rows at a stride, each row
    contiguous) reach the kernel as they are, not copied, with the contiguous rows' bits."""
    from qcompile.backends.triton import act_quant
    from qcompile.backends.triton.ops import kernels_on_cpu

    fused = torch.randn(2, 9, 2 * 48, generator=torch.Generator().manual_seed(0)).bfloat16()
    gate, up = fused[..., :48], fused[..., 48:]
    seen: list[int] = []
    for name in ("silu_quant", "rmsnorm_quant", "act_quant"):
        real = getattr(act_quant, name)
        monkeypatch.setattr(act_quant, name, lambda x, *a, _f=real, **k: (
            seen.append(x.data_ptr()), _f(x, *a, **k))[1])
    weight = torch.rand(48, generator=torch.Generator().manual_seed(1)).bfloat16()
    args = {"silu": (0, None, -1.0, up), "rms": (0, weight, 1e-5), "plain": (0,)}[variant]
    contiguous = {"silu": (0, None, -1.0, up.contiguous()), "rms": args, "plain": args}[variant]
    with kernels_on_cpu():
        q, s = torch.ops.qcompile.quantize_rows(gate, "fp8_e4m3/token", *args)
        q_ref, s_ref = torch.ops.qcompile.quantize_rows(gate.contiguous(), "fp8_e4m3/token",
                                                        *contiguous)
    assert seen[0] == gate.data_ptr(), "the strided rows were copied"
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.fixture(scope="module")
def report() -> dict:
    import fake_cuda

    return fake_cuda.run_worker(__file__, "rows plan")


@pytest.mark.parametrize("case", CASES)
def test_planned_launch_is_the_full_paths(report, case):
    """The planned call launches what the full path launches for the same rows (module
    docstring); a new norm weight object, a profiler's launch hooks at the first call, more
    row shapes than ``MAX_PLANS`` and the release of the rows and the weight are handled."""
    assert report[case]["ok"], report[case].get("error")


# --- the fake-CUDA worker (run as a script) ------------------------------------------------

def _worker(out: str) -> None:
    """Run the cases; write ``{case: {"ok", "error"}}`` to ``out``."""
    import functools
    import gc
    import weakref

    sys.path.insert(0, str(HERE))
    import fake_cuda
    from triton import knobs

    fake_cuda.wrappers_as_on_gpu()
    op = torch.ops.qcompile.quantize_rows
    gen = torch.Generator().manual_seed(0)
    real = (rows_plan.quantize, rows_plan.build)

    launched = fake_cuda.one_launch

    def full(args: tuple) -> tuple:
        rows_plan.quantize, rows_plan.build = (lambda *a: None), (lambda *a: a[-1]())
        try:
            return launched(lambda: op(*args))
        finally:
            rows_plan.quantize, rows_plan.build = real

    def compare(args: tuple, ref: tuple, got: tuple) -> None:
        """``got``'s launch is ``ref``'s with the outputs moved to what ``got`` returned."""
        (ref_out, ref_launch), (out, launch) = ref, got
        for r, o in zip(ref_out, out, strict=True):
            assert o.shape == r.shape and o.dtype == r.dtype and o.is_contiguous()
        moved = {ref_out[0].data_ptr(): out[0].data_ptr(),
                 ref_out[1].data_ptr(): out[1].data_ptr()}

        def tensor(i, f, p):
            want = moved.get(f.data_ptr(), f.data_ptr())
            assert p.data_ptr() == want, f"argument {i}: another tensor"

        fake_cuda.same_launch(ref_launch, launch, tensor)
        del args

    def planned(args: tuple, calls: int = 2) -> tuple:
        """The full path's launch, then the call after ``calls`` plan-building calls."""
        ref = full(args)
        for _ in range(calls):
            op(*args)
        got = launched(lambda: op(*args))
        compare(args, ref, got)
        return got

    def rows(shape, dtype=torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def plain() -> None:
        planned((rows((1, 300, 256)), "fp8_e4m3/token", 0))
        assert rows_plan.plans() == 1

    def int8_rms() -> None:
        w = rows((256,))
        planned((rows((2, 40, 256)), "int8/token", 0, w, 1e-5))

    def rms_no_weight() -> None:
        planned((rows((1, 33, 256), torch.float16), "fp8_e4m3/token", 0, None, 1e-6))

    def silu() -> None:
        x = rows((1, 64, 512), torch.float16)
        planned((x, "fp8_e4m3/token", 0, None, -1.0, rows((1, 64, 512), torch.float16)))

    def strided_silu() -> None:  # the halves of a fused gate/up output, read in place
        fused = rows((1, 64, 1024))
        planned((fused[..., :512], "fp8_e4m3/token", 0, None, -1.0, fused[..., 512:]))
        plain = rows((1, 64, 1024))
        planned((plain[..., 256:768], "int8/token", 0))

    def hadamard() -> None:
        planned((rows((1, 100, 512)), "fp8_e4m3/token", 256))

    def general_had() -> None:
        planned((rows((1, 17, 96)), "int8/token", 12))

    def kron() -> None:
        planned((rows((1, 3, 12288)), "fp8_e4m3/token", 12288))

    def new_weight() -> None:
        x = rows((1, 50, 256))
        w = rows((256,))
        planned((x, "fp8_e4m3/token", 0, w, 1e-5))
        w2 = w.clone()  # another object: the plan passes each call's own weight
        again = functools.partial(op, x, "fp8_e4m3/token", 0, w2, 1e-5)
        ref = full(again.args)
        compare(None, ref, launched(again))
        w3 = rows((256,), torch.float32)  # another dtype: another key, its own plan
        other = functools.partial(op, x, "fp8_e4m3/token", 0, w3, 1e-5)
        ref3 = full(other.args)
        op(*other.args)
        compare(None, ref3, launched(other))
        assert rows_plan.plans() == 2
        w4 = rows((512,))[::2]  # a strided weight: the full path refuses it, the plan too
        try:
            op(x, "fp8_e4m3/token", 0, w4, 1e-5)
            raise AssertionError("a strided norm weight was taken")
        except Exception as exc:
            assert "contiguous" in str(exc), exc
        del w3, w4, other, ref3
        # The plan holds neither the rows nor the weight.
        refs = [weakref.ref(t) for t in (x, w, w2)]
        del x, w, w2, ref, again
        fake_cuda.LAUNCHES.clear()  # the recorded launches hold their arguments
        gc.collect()
        assert all(r() is None for r in refs), "a plan keeps a call's tensors alive"

    def evict() -> None:
        rows_plan.MAX_PLANS = 4
        try:
            for m in range(1, 7):
                planned((rows((1, m, 128)), "fp8_e4m3/token", 0), calls=1)
            assert rows_plan.plans() == 4
            assert sorted(key[2][1] for key in rows_plan._PLANS) == [3, 4, 5, 6]
        finally:
            rows_plan.MAX_PLANS = 64

    def hooks() -> None:
        args = (rows((1, 20, 256)), "fp8_e4m3/token", 0)
        ref = full(args)
        knobs.runtime.launch_enter_hook = lambda metadata: None  # a profiler's hook
        try:
            op(*args)
        finally:
            knobs.runtime.launch_enter_hook = None
        assert rows_plan.plans() == 0 and len(rows_plan._FAILED) == 1
        got = launched(lambda: op(*args))  # the full path, without trying again
        compare(args, ref, got)
        assert rows_plan.plans() == 0

    fake_cuda.run_cases(dict(zip(CASES, (plain, int8_rms, rms_no_weight, silu, strided_silu,
                                         hadamard, general_had, kron, new_weight, evict,
                                         hooks), strict=True)), out, rows_plan.clear)

if __name__ == "__main__":
    _worker(sys.argv[1])
