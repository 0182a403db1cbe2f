"""``w4a16_plan``: the W4A16 prefill's per-weight host work done once, and never a stale plan.

Under the Triton interpreter, through the ``qcompile::w4a16_linear`` op as a compiled model
calls it. Path choices are made by ``path_tuning`` with the ``tuner`` fixture's stand-in timer
(decode-then-cuBLAS and the flat decode kernel reported fastest), so the plan has settled
choices to follow. Each check counts the calls that took the full path
(``w4a16.w4a16_linear``) and compares the results' bits with the full path's.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_w4a16 import assert_matches  # noqa: E402

from qcompile.backends.triton import w4a16 as w4  # noqa: E402
from qcompile.backends.triton import w4a16_plan  # noqa: E402
from qcompile.backends.triton.ops import kernels_on_cpu  # noqa: E402
from qcompile.backends.triton.runtime import KernelInputError, element_table  # noqa: E402
from qcompile.formats import pack_codes, parse_format, quantize  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter checks (CPU)")

N, K = 48, 128
op = torch.ops.qcompile.w4a16_linear
#: The stand-in timer's times: decode-then-cuBLAS and the flat decode kernel fastest.
TIMES = dict(gemm=3.0, dequant=1.0, swap=2.0, pairs=2.0, words=3.0, flat=1.0)
FP4 = element_table("fp4_e2m1", "cpu")  # the table the op passes the kernels


def _weight(fmt: str, seed: int = 0):
    """``(packed, scale, scale_neg, zero, outer)`` as ``lower-triton`` leaves them."""
    gen = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(N, K, generator=gen) * 0.05, parse_format(fmt))
    return pack_codes(q.codes, 4), q.scale, q.scale_neg, q.zero, q.outer


def count_outer_calls(monkeypatch, module, name: str) -> list[int]:
    """Patch ``module.name`` to count its calls, not those it makes of itself (a path
    timing's calls within one op call); returns the one-element count."""
    count = [0]
    depth = [0]
    full = getattr(module, name)

    def counted(*args, **kwargs):
        count[0] += depth[0] == 0
        depth[0] += 1
        try:
            return full(*args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(module, name, counted)
    return count


@pytest.fixture
def full_calls(tuner, monkeypatch):
    """Count of calls that took the full path; the stand-in timer prefers decode-then-cuBLAS
    and the flat kernel."""
    times, _ = tuner
    times.update(TIMES)
    count = count_outer_calls(monkeypatch, w4, "w4a16_linear")
    w4a16_plan.clear()
    yield count
    w4a16_plan.clear()


def _x(m: int, dtype=torch.bfloat16, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, m, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("fmt", ["fp4_e2m1/g64", "fp4_e2m1/g32/asym", "fp4_e2m1/g64/m2"])
def test_prefill_runs_through_the_plan(full_calls, fmt):
    """From the second call of a settled shape the op skips the full path, with its bits."""
    packed, scale, neg, zero, outer = weight = _weight(fmt)
    bias = torch.randn(N).bfloat16()
    x = _x(260)
    with kernels_on_cpu():
        first = op(x, *weight, bias, fmt, K)  # full path: times the routes and decode kernels
        assert full_calls[0] == 1 and w4a16_plan.plans() == 1
        again = op(x, *weight, bias, fmt, K)
        assert full_calls[0] == 1, "the planned call took the full path"
        assert torch.equal(again, first)
        forced = w4.w4a16_linear(x, packed, FP4, scale, neg,
                                 zero, outer, parse_format(fmt).group_size, bias,
                                 path="dequant")
    assert torch.equal(first, forced)
    ref = w4.w4a16_linear_ref(x, packed, FP4, scale, neg, zero,
                              outer, parse_format(fmt).group_size, bias)
    assert_matches(first, ref)


def test_plan_follows_the_weights(full_calls):
    """Fewer rows, another dtype, an untimed shape or new storage for the codes take the full
    path; another scale tensor gets its own plan; an in-place update of the codes is seen."""
    fmt = "fp4_e2m1/g64"
    packed, scale, neg, zero, outer = _weight(fmt)
    x = _x(300)
    with kernels_on_cpu():
        op(x, packed, scale, neg, zero, outer, None, fmt, K)
        base = op(x, packed, scale, neg, zero, outer, None, fmt, K)
        assert full_calls[0] == 1
        calls = full_calls[0]

        def full_path_taken(*args) -> torch.Tensor:
            nonlocal calls
            y = op(*args)
            assert full_calls[0] == calls + 1, f"planned call: x {tuple(args[0].shape)}"
            calls = full_calls[0]
            return y

        # Another scale object, twice the plan's: a plan built for it (the choices are the
        # shape's), and its result, exactly (a power of two).
        assert torch.equal(op(x, packed, scale * 2, neg, zero, outer, None, fmt, K), 2 * base)
        assert full_calls[0] == calls
        full_path_taken(_x(40), packed, scale, neg, zero, outer, None, fmt, K)  # below 256 rows
        full_path_taken(_x(300, torch.float32), packed, scale, neg, zero, outer, None, fmt, K)
        full_path_taken(_x(600), packed, scale, neg, zero, outer, None, fmt, K)  # untimed M
        table = FP4  # what the op passes the kernels

        def planned_and_right() -> torch.Tensor:
            nonlocal calls
            calls = full_calls[0]
            y = op(x, packed, scale, neg, zero, outer, None, fmt, K)
            assert full_calls[0] == calls, "full path"
            assert torch.equal(y, w4.w4a16_linear(x, packed, table, scale, neg, zero, outer,
                                                  64, None, path="dequant"))
            return y

        old = planned_and_right()
        # New storage behind the same tensor object (the plan's word view would be stale):
        # a new plan, on the new codes.
        gen = torch.Generator().manual_seed(3)
        packed.data = packed.clone()[torch.randperm(N, generator=gen)]
        moved = planned_and_right()
        assert not torch.equal(moved, old)
        # An in-place update of the codes: the plan's kernels read the tensor itself.
        packed.copy_(packed.flip(0))
        assert not torch.equal(planned_and_right(), moved)


def test_plan_keeps_the_full_paths_errors(full_calls):
    """A malformed call still gets the full path's error, before or after a plan exists."""
    fmt = "fp4_e2m1/g64"
    weight = _weight(fmt)
    x = _x(300)
    with kernels_on_cpu():
        op(x, *weight, None, fmt, K)
        op(x, *weight, None, fmt, K)
        with pytest.raises(KernelInputError, match="bias has dtype float32"):
            op(x, *weight, torch.zeros(N), fmt, K)
        with pytest.raises(KernelInputError, match="scale has shape"):
            op(x, weight[0], weight[1][:, :1], *weight[2:], None, fmt, K)
        with pytest.raises(KernelInputError, match="x has dtype int32"):
            op(x.int(), *weight, None, fmt, K)


def test_other_formats_keep_the_full_path(full_calls):
    """Only FP4 E2M1 has the word kernels a plan launches: INT4 always takes the full path."""
    fmt = "int4/g64"
    weight = _weight(fmt)
    x = _x(260)
    with kernels_on_cpu():
        a = op(x, *weight, None, fmt, K)
        b = op(x, *weight, None, fmt, K)
    assert full_calls[0] == 2 and torch.equal(a, b)


def compiled_prefills(module, recipe: str, monkeypatch, packed_at: int = 1) -> dict:
    """A tiny Llama compiled with ``torch.compile(backend="qcompile")`` and ``recipe``
    (Inductor; kernels under the interpreter), called three times on 260 tokens: twice with
    ``module.prefill`` (a plan module; ``packed`` its argument at ``packed_at``) watched,
    then with the plans off. Returns the logits (``first``, ``planned``, ``full``), each
    watched call's ``(id(packed), planned)`` (``seen_first``, ``seen``) and ``plans``."""
    import qcompile
    from qcompile.testing import tiny_model

    seen: list[tuple[int, bool]] = []
    real = module.prefill

    def spy(*args):
        y = real(*args)
        seen.append((id(args[packed_at]), y is not None))
        return y

    monkeypatch.setattr(module, "prefill", spy)
    module.clear()
    torch._dynamo.reset()
    model = tiny_model("llama")
    qcompile.compile(model, recipe=recipe, lower="always")
    ids = torch.randint(3, 256, (1, 260), generator=torch.Generator().manual_seed(0))
    out: dict = {}
    try:
        with torch.no_grad(), kernels_on_cpu():
            out["first"] = model(ids).logits
            out["seen_first"], seen[:] = list(seen), []
            out["planned"] = model(ids).logits
            out["seen"], out["plans"] = list(seen), module.plans()
            monkeypatch.setattr(module, "prefill", lambda *args: None)  # full path only
            out["full"] = model(ids).logits
    finally:
        torch._dynamo.reset()
        module.clear()
    return out


def test_compiled_model_reuses_its_plans(tuner, monkeypatch):
    """``torch.compile(backend="qcompile")`` (Inductor) passes the same weight tensors at every
    call, so a prefill's linears run through their plans from the second call, with the
    logits of the full path."""
    times, _ = tuner
    times.update(TIMES)
    got = compiled_prefills(w4a16_plan, "w4-fp4", monkeypatch)
    weights = {p for p, _ in got["seen_first"]}
    seen = got["seen"]
    assert len(seen) == 8 and all(used for _, used in seen), seen
    assert {p for p, _ in seen} == weights and got["plans"] == len(weights)
    assert torch.equal(got["planned"], got["full"]) and torch.equal(got["first"], got["full"])


def test_plan_goes_with_its_weight(full_calls):
    """A plan holds nothing that keeps its weight's ``packed`` tensor alive: when the model
    lets go of the weight, the plan goes too."""
    import gc
    import weakref

    fmt = "fp4_e2m1/g64"
    weight = list(_weight(fmt))
    x = _x(260)
    with kernels_on_cpu():
        op(x, *weight, None, fmt, K)
        op(x, *weight, None, fmt, K)
    assert full_calls[0] == 1 and w4a16_plan.plans() == 1
    alive = weakref.ref(weight[0])
    del weight
    gc.collect()
    assert alive() is None and w4a16_plan.plans() == 0
