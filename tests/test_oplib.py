"""qcompile.oplib: ops defined with a short dispatch path keep custom_op's contract."""

from __future__ import annotations

import pytest
import torch

import qcompile.backends.triton.ops  # noqa: F401  (defines the fused ops)
from qcompile.formats import pack_codes, parse_format, quantize
from qcompile.ops import dequantize_weight

FMT = "fp4_e2m1/g32"


def _w4a16_args(x: torch.Tensor):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(w, parse_format(FMT))
    return (x, pack_codes(q.codes, 4), q.scale, None, None, q.outer, None, FMT, 64)


def test_opcheck_with_and_without_grad():
    """Schema, fake impl, autograd registration and dispatch checks (torch.library.opcheck)."""
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.qcompile.w4a16_linear.default, _w4a16_args(x))
    # With grad inputs: an autograd kernel is registered (the AOT checks would backprop).
    torch.library.opcheck(torch.ops.qcompile.w4a16_linear.default,
                          _w4a16_args(x.clone().requires_grad_()),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    torch.library.opcheck(torch.ops.qcompile.quantize_rows.default, (x, "fp8_e4m3/token", 64))


def test_forward_with_grad_inputs_then_backward_names_the_op():
    x = torch.randn(3, 64, requires_grad=True)
    y = torch.ops.qcompile.w4a16_linear(*_w4a16_args(x))
    args = _w4a16_args(x.detach())
    w = dequantize_weight(*args[1:6], FMT, 64, torch.float32)
    assert torch.equal(y.detach(), torch.nn.functional.linear(x.detach(), w))
    assert y.requires_grad  # forward works as before; only backward refuses
    with pytest.raises(RuntimeError, match=r"qcompile::w4a16_linear has no derivative"):
        y.sum().backward()


def test_no_grad_outputs_do_not_require_grad():
    x = torch.randn(3, 64, requires_grad=True)
    with torch.no_grad():
        y = torch.ops.qcompile.w4a16_linear(*_w4a16_args(x))
    assert not y.requires_grad and y.grad_fn is None
    q, s = torch.ops.qcompile.quantize_rows(torch.randn(2, 64), "fp8_e4m3/token", 0)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 1) and not q.requires_grad


def test_ops_survive_export_and_compile():
    """The ops stay single nodes under torch.export and run under torch.compile."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            args = _w4a16_args(torch.zeros(1, 64))
            self.register_buffer("packed", args[1])
            self.register_buffer("scale", args[2])

        def forward(self, x):
            return torch.ops.qcompile.w4a16_linear(x, self.packed, self.scale, None, None, None,
                                                   None, FMT, 64) * 2

    m, x = M(), torch.randn(5, 64)
    ep = torch.export.export(m, (x,)).run_decompositions()
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.qcompile.w4a16_linear.default in targets
    assert torch.equal(ep.module()(x), m(x))
    assert torch.equal(torch.compile(m, backend="aot_eager", fullgraph=True)(x), m(x))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_with_grad_enabled_forward_runs_and_backward_names_the_op(backend):
    """A forward outside no_grad() makes AOTAutograd trace the backward too: that trace must
    succeed (it once raised there, failing the compile) and the refusal come at backward."""
    args = _w4a16_args(torch.zeros(1, 64))
    scale = torch.nn.Parameter(torch.ones(64))

    def f(x):
        return torch.ops.qcompile.w4a16_linear(x * scale, *args[1:]) * 2

    x = torch.randn(5, 64, requires_grad=True)
    y = torch.compile(f, backend=backend, fullgraph=True)(x)
    with torch.no_grad():
        ref = f(x)
    assert y.requires_grad
    torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"qcompile::w4a16_linear has no derivative"):
        y.sum().backward()
