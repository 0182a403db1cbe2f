"""``gemv_plan``: a batch-1 ``qcompile::w4a16_linear``, ``w4a8_linear`` or ``w8a16_linear`` call
relaunches its prepared GEMV with the full path's arguments, and never a stale launch.

A prepared launch needs real ``JITFunction`` kernels, so the checks run in a subprocess (this
file as a script) with the stand-in CUDA driver of ``tests/fake_cuda.py``: the kernels compile
for sm_90 and the launcher records its arguments. Each case compares the planned call's launch
with the full path's (plans off) on the same tensors: the same compiled kernel, grid and
scalars, the same input memory, a fresh partial-sum buffer of the same shape, and the result
it returns written by the kernel. The GEMVs' numerics are checked by
``tests/test_triton_w4a16.py`` and ``tests/test_triton_gemv_fusion.py``; a relaunch passes the
kernels the same arguments. Under the interpreter no launch is prepared, which
:func:`test_interpreter_keeps_the_full_path` checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import gemv_plan  # noqa: E402

HERE = Path(__file__).resolve().parent
N, K = 96, 256
CASES = ["fp4", "afpq-bias-fp16", "int4-bytes", "rms", "rms-no-weight", "silu-residual",
         "w4a8", "w4a8-residual", "strided-row", "strided-codes", "new-weights", "evict", "hooks",
         "release", "compiled-decode", "w8a16"]


def _weight(fmt: str, seed: int = 0, n: int = N, k: int = K) -> tuple:
    """``(packed, scale, scale_neg, zero, outer)`` as ``lower-triton`` leaves them."""
    from qcompile.formats import pack_codes, parse_format, quantize

    gen = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(n, k, generator=gen) * 0.05, parse_format(fmt))
    return pack_codes(q.codes, 4), q.scale, q.scale_neg, q.zero, q.outer


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check (CPU)")
def test_interpreter_keeps_the_full_path():
    """Interpreted kernels cannot be prepared: no plan after more than ``TRIES`` recordings,
    and every call's result is the first's."""
    from qcompile.backends.triton.ops import kernels_on_cpu

    weight = _weight("fp4_e2m1/g128")
    x = torch.randn(1, 1, K).bfloat16()
    res = torch.randn(1, 1, N).bfloat16()
    gemv_plan.clear()
    try:
        with kernels_on_cpu():
            got = [torch.ops.qcompile.w4a16_linear(x, *weight, None, "fp4_e2m1/g128", K,
                                                   residual=res)
                   for _ in range(gemv_plan.TRIES + 3)]
        assert gemv_plan.plans() == 0
        (keys,) = [p.keys for p in gemv_plan._PLANS.values()]
        assert list(keys.values()) == [gemv_plan.TRIES + 1], "not given up after TRIES"
    finally:
        gemv_plan.clear()
    assert all(torch.equal(g, got[0]) for g in got)


@pytest.fixture(scope="module")
def report() -> dict:
    import fake_cuda

    return fake_cuda.run_worker(__file__, "gemv plan")


@pytest.mark.parametrize("case", CASES)
def test_planned_launch_is_the_full_paths(report, case):
    """The planned call launches what the full path launches (module docstring), for each
    format, fusion and op; new weight objects, a profiler's hooks, more call shapes than
    ``MAX_KEYS``, the release of the weight and of each call's tensors, and a compiled
    model's decode steps are handled."""
    assert report[case]["ok"], report[case].get("error")


# --- the fake-CUDA worker (run as a script) ------------------------------------------------

def _worker(out: str) -> None:  # noqa: C901 - one closure per case
    """Run the cases; write ``{case: {"ok", "error"}}`` to ``out``."""
    import gc
    import weakref
    from unittest.mock import patch

    sys.path.insert(0, str(HERE))
    import fake_cuda
    from triton import knobs

    from qcompile.backends.triton.runtime import arrival_counts

    fake_cuda.wrappers_as_on_gpu()
    w4a16 = torch.ops.qcompile.w4a16_linear
    w4a8 = torch.ops.qcompile.w4a8_linear
    gen = torch.Generator().manual_seed(0)

    launched = fake_cuda.one_launch

    def full(fn) -> tuple:
        with patch.object(gemv_plan, "run", lambda *a, **k: a[5]()):  # the op's full path
            return launched(fn)

    def compare(ref: tuple, got: tuple) -> None:
        """``got``'s launch is ``ref``'s with its result and partial sums moved."""
        (ref_y, ref_launch), (y, launch) = ref, got
        assert y.shape == ref_y.shape and y.dtype == ref_y.dtype and y.is_contiguous()
        moved = []

        def tensor(i, f, p):
            if f.data_ptr() == ref_y.data_ptr():
                assert p.data_ptr() == y.data_ptr(), f"argument {i}: not the result"
            elif f.dtype == torch.float32 and f.dim() == 2 and f.shape[1] == y.shape[-1] \
                    and f.shape[0] > 1:  # the partial sums: a fresh buffer per call
                assert p.shape == f.shape and p.data_ptr() != f.data_ptr(), i
                moved.append(i)
            else:
                assert p.data_ptr() == f.data_ptr(), f"argument {i}: another tensor"

        fake_cuda.same_launch(ref_launch, launch, tensor)
        assert len(moved) <= 1

    def planned(fn, tries: int = 2) -> tuple:
        """The full path's launch, then the call after ``tries`` plan-building calls."""
        ref = full(fn)
        for _ in range(tries):
            fn()
        got = launched(fn)
        compare(ref, got)
        return got

    def row(n: int = K, dtype=torch.bfloat16) -> torch.Tensor:
        return torch.randn(1, 1, n, generator=gen).to(dtype)

    def fp4() -> None:
        weight = _weight("fp4_e2m1/g128")
        x = row()
        planned(lambda: w4a16(x, *weight, None, "fp4_e2m1/g128", K))
        assert gemv_plan.plans() == 1
        x2 = row()  # another row: passed as the call's own
        planned(lambda: w4a16(x2, *weight, None, "fp4_e2m1/g128", K), tries=0)

    def afpq_bias_fp16() -> None:
        weight = _weight("fp4_e2m1/g64/asym", 1)
        assert weight[2] is not None  # the negative side's scales
        x, bias = row(dtype=torch.float16), torch.randn(N, generator=gen).half()
        planned(lambda: w4a16(x, *weight, bias, "fp4_e2m1/g64/asym", K))

    def int4_bytes() -> None:  # the byte kernel reads the codes as uint8
        weight = _weight("int4/g128/asym", 2)
        x = row()
        _, (name, _) = planned(lambda: w4a16(x, *weight, None, "int4/g128/asym", K))
        assert "fp4w" not in name, name

    def rms() -> None:
        weight, g = _weight("fp4_e2m1/g128", 3), torch.rand(K, generator=gen).bfloat16()
        x = row()
        planned(lambda: w4a16(x, *weight, None, "fp4_e2m1/g128", K, g, 1e-5))
        g2 = g.clone()  # another norm weight object: passed as the call's own
        planned(lambda: w4a16(x, *weight, None, "fp4_e2m1/g128", K, g2, 1e-5), tries=0)

    def rms_no_weight() -> None:
        weight = _weight("fp4_e2m1/g128", 4)
        x = row()
        planned(lambda: w4a16(x, *weight, None, "fp4_e2m1/g128", K, None, 1e-6))

    def silu_residual() -> None:  # down_proj: the gate and up halves, plus the residual
        weight = _weight("fp4_e2m1/g128", 5)
        gate_up = torch.randn(1, 1, 2 * K, generator=gen).bfloat16()
        res = row(N)
        planned(lambda: w4a16(gate_up[..., :K], *weight, None, "fp4_e2m1/g128", K,
                              up=gate_up[..., K:], residual=res))
        res2, gate_up2 = row(N), torch.randn(1, 1, 2 * K, generator=gen).bfloat16()
        planned(lambda: w4a16(gate_up2[..., :K], *weight, None, "fp4_e2m1/g128", K,
                              up=gate_up2[..., K:], residual=res2), tries=0)

    def w4a8_weight(seed: int) -> tuple:
        from qcompile.backends.triton.w4a8 import w4a8_split_scales

        packed, scale, _, _, outer = _weight("fp4_e2m1/g128/m2", seed)
        return (packed, *w4a8_split_scales(scale, outer))

    def fp8_row() -> tuple:
        from qcompile.testing import fp8_rows

        q, s = fp8_rows(torch.randn(1, K, generator=gen))
        return q.view(1, 1, K), s.view(1, 1, 1)

    def w4a8_plain() -> None:
        q, s = fp8_row()
        weight = w4a8_weight(6)
        planned(lambda: w4a8(q, s, *weight, None, 128, K, torch.bfloat16))

    def w4a8_residual() -> None:
        q, s = fp8_row()
        weight, res = w4a8_weight(7), row(N)
        bias = torch.randn(N, generator=gen).bfloat16()
        planned(lambda: w4a8(q, s, *weight, bias, 128, K, torch.bfloat16, True, res))
        (q2, s2), res2 = fp8_row(), row(N)  # the next step's row, scale and residual
        planned(lambda: w4a8(q2, s2, *weight, bias, 128, K, torch.bfloat16, True, res2),
                tries=0)

    def strided_row() -> None:
        """A row read at a stride is copied by the full path: no plan, the full path's
        launch at every call."""
        weight = _weight("fp4_e2m1/g128", 8)
        wide = torch.randn(1, 1, 2 * K, generator=gen).bfloat16()
        x = wide[..., ::2]
        call = lambda: w4a16(x, *weight, None, "fp4_e2m1/g128", K)  # noqa: E731
        ref = full(call)
        for _ in range(gemv_plan.TRIES + 2):
            y, (name, args) = launched(call)
            assert name == ref[1][0] and y.shape == ref[0].shape
        assert gemv_plan.plans() == 0

    def strided_codes() -> None:
        """Codes the full path copies (rows at a stride) take no plan, which would keep the
        copy; codes re-strided over the same memory are another plan's."""
        packed, scale, neg, zero, outer = _weight("fp4_e2m1/g128", 13)
        wide = torch.zeros(N, 2 * packed.shape[1], dtype=torch.uint8)
        wide[:, :packed.shape[1]] = packed
        codes = wide[:, :packed.shape[1]]
        x = row()
        call = lambda: w4a16(x, codes, scale, neg, zero, outer, None,  # noqa: E731
                             "fp4_e2m1/g128", K)
        ref = full(call)
        for _ in range(gemv_plan.TRIES + 2):
            y, (name, _) = launched(call)
            assert name == ref[1][0] and y.shape == ref[0].shape
        assert gemv_plan.plans() == 0, "a plan over copied codes"
        codes.data = wide.view(-1)[: packed.numel()].view(packed.shape)  # same pointer
        codes.copy_(packed)
        planned(call)
        assert gemv_plan.plans() == 1

    def new_weights() -> None:
        """A new scale object or new storage for the codes: a new plan; an in-place update
        of the codes: the same launch reads it."""
        packed, scale, neg, zero, outer = _weight("fp4_e2m1/g128", 9)
        x = row()
        planned(lambda: w4a16(x, packed, scale, neg, zero, outer, None, "fp4_e2m1/g128", K))
        scale2 = scale.clone()
        got = planned(lambda: w4a16(x, packed, scale2, neg, zero, outer, None,
                                    "fp4_e2m1/g128", K))
        assert any(isinstance(a, torch.Tensor) and a.data_ptr() == scale2.data_ptr()
                   for a in got[1][1]), "the old scales were read"
        packed.copy_(torch.flip(packed, [0]))  # in place: the plan stays
        launched(lambda: w4a16(x, packed, scale2, neg, zero, outer, None, "fp4_e2m1/g128", K))
        assert gemv_plan.plans() == 1
        packed2 = packed.clone()  # new storage: the codes' pointer moves
        got = planned(lambda: w4a16(x, packed2, scale2, neg, zero, outer, None,
                                    "fp4_e2m1/g128", K))
        assert any(isinstance(a, torch.Tensor) and a.data_ptr() == packed2.data_ptr()
                   for a in got[1][1]), "the old codes were read"

    def evict() -> None:
        gemv_plan.MAX_KEYS = 3
        try:
            weight = _weight("fp4_e2m1/g128", 10)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                x = row(dtype=dtype)
                planned(lambda x=x: w4a16(x, *weight, None, "fp4_e2m1/g128", K))
            x = row()
            planned(lambda: w4a16(x, *weight, None, "fp4_e2m1/g128", K, None, 1e-5))
            (plan,) = gemv_plan._PLANS.values()
            assert len(plan.keys) == 3 and gemv_plan.plans() == 3
            assert [key[1][1] for key in plan.keys] == [torch.float16, torch.float32,
                                                        torch.bfloat16], "not the oldest gone"
        finally:
            gemv_plan.MAX_KEYS = 8

    def hooks() -> None:
        """Launch hooks at every recording: the full path, given up after ``TRIES``."""
        weight = _weight("fp4_e2m1/g128", 11)
        x = row()
        call = lambda: w4a16(x, *weight, None, "fp4_e2m1/g128", K)  # noqa: E731
        ref = full(call)
        knobs.runtime.launch_enter_hook = lambda metadata: None  # a profiler's hook
        try:
            for _ in range(gemv_plan.TRIES + 1):
                call()
        finally:
            knobs.runtime.launch_enter_hook = None
        assert gemv_plan.plans() == 0
        got = launched(call)
        compare(ref, got)
        assert gemv_plan.plans() == 0, "tried again after giving up"

    def release() -> None:
        """A plan holds neither a call's tensors nor the weight's codes."""
        packed, scale, neg, zero, outer = _weight("fp4_e2m1/g128", 12)
        x, res, g = row(), row(N), torch.rand(K, generator=gen).bfloat16()
        for _ in range(3):
            y = w4a16(x, packed, scale, neg, zero, outer, None, "fp4_e2m1/g128", K, g, 1e-5,
                      residual=res)
        assert gemv_plan.plans() == 1
        (plan,) = gemv_plan._PLANS.values()
        (launch,) = plan.keys.values()
        kept = [v for v in (*launch.ready.values, *launch.ready.args,
                            *launch.ready.kwargs.values()) if isinstance(v, torch.Tensor)]
        # The weight's scales and the device's arrival counts only: no call's tensor, no
        # partial sums, not the codes.
        counts = arrival_counts(x.device, 1)
        allowed = {t.untyped_storage().data_ptr() for t in (scale, counts)}
        assert {t.untyped_storage().data_ptr() for t in kept} <= allowed, \
            "a prepared launch holds a call's tensor, its partial sums or the codes"
        refs = [weakref.ref(t) for t in (x, res, g, y, packed)]
        del x, res, g, y, packed, plan, launch, kept, counts
        fake_cuda.LAUNCHES.clear()  # the recorded launches hold their arguments
        gc.collect()
        assert all(r() is None for r in refs), "a plan keeps a tensor alive"
        assert not gemv_plan._PLANS, "the plan outlived its weight"

    def compiled_decode() -> None:
        """A compiled tiny Llama decoding with a dynamic cache: every GEMV is answered by its
        plan once its call shape has been seen twice. The first decode step runs the graph
        compiled for its static shapes, the later ones the dynamic recompile, whose fused
        q/k/v and gate/up weights are other tensor objects (over the same memory): their
        plans start at the second step."""
        from transformers import DynamicCache

        import qcompile
        from qcompile.testing import tiny_model

        torch.manual_seed(0)
        model = tiny_model("llama")
        qcompile.compile(model, recipe="w4-fp4", lower="always")
        fake_cuda.RECORD = False
        answered = [0, 0]

        def relaunch(*args, _real=gemv_plan._relaunch):
            answered[0] += 1
            return _real(*args)

        gemv_plan._relaunch = relaunch
        try:
            ids = torch.randint(3, 256, (1, 9))
            cache = DynamicCache()
            with torch.no_grad():
                model(ids, past_key_values=cache, use_cache=True)
                counts = []
                for _ in range(5):
                    answered[0] = 0
                    model(ids[:, -1:], past_key_values=cache, use_cache=True)
                    counts.append(answered[0])
        finally:
            gemv_plan._relaunch = real_relaunch
            fake_cuda.RECORD = True
        layers = model.config.num_hidden_layers
        assert counts == [0, 0, 2 * layers, 4 * layers, 4 * layers], counts

    def w8a16() -> None:  # an 8-bit head: its one-launch GEMV gets a plan too
        from qcompile.formats import parse_format, quantize

        q = quantize(torch.randn(N, K, generator=gen) * 0.05, parse_format("int8/g128/asym"))
        x, bias = row(), torch.randn(N, generator=gen).bfloat16()
        op = torch.ops.qcompile.w8a16_linear
        planned(lambda: op(x, q.codes, q.scale, q.zero, q.outer, bias, "int8/g128/asym", K))
        assert gemv_plan.plans() == 1
        g, res = torch.rand(K, generator=gen).bfloat16(), torch.randn(1, 1, N, generator=gen)
        res = res.bfloat16()  # a decode layer's: RMSNorm in front, residual behind
        planned(lambda: op(x, q.codes, q.scale, q.zero, q.outer, bias, "int8/g128/asym", K, g,
                           1e-5, None, res))
        assert gemv_plan.plans() == 2

    real_relaunch = gemv_plan._relaunch
    fake_cuda.run_cases(dict(zip(CASES, (fp4, afpq_bias_fp16, int4_bytes, rms, rms_no_weight,
                                         silu_residual, w4a8_plain, w4a8_residual, strided_row,
                                         strided_codes, new_weights, evict, hooks, release, compiled_decode,
                                         w8a16),
                                 strict=True)), out, gemv_plan.clear)


if __name__ == "__main__":
    _worker(sys.argv[1])
