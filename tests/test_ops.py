"""qcompile custom ops: reference numerics, opcheck, and survival through export/compile."""

from __future__ import annotations

import pytest
import torch

import qcompile.ops  # noqa: F401
from qcompile.formats import dequantize, fake_quantize, pack_codes, parse_format, quantize

FORMATS = ["int4/g128/asym", "int8/channel", "fp4_e2m1/g128/asym", "fp4_e2m1/g64/m2",
           "nf4/g64", "int3/g128/asym", "mxfp4", "nvfp4", "fp8_e4m3/channel"]


def _args(fmt: str, n: int = 24, k: int = 576, dtype=torch.float32):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    q = quantize(w, parse_format(fmt))
    packed = pack_codes(q.codes, q.spec.bits)
    return q, (packed, q.scale, q.scale_neg, q.zero, q.outer, str(q.spec), k, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_weight_matches_formats_reference(fmt):
    q, args = _args(fmt)
    out = torch.ops.qcompile.dequantize_weight(*args)
    torch.testing.assert_close(out, dequantize(q), rtol=0, atol=0)
    assert out.shape == (24, 576) and out.dtype == torch.float32


@pytest.mark.parametrize("fmt", ["int4/g128/asym", "fp4_e2m1/g128/asym", "nvfp4"])
def test_dequantize_weight_opcheck(fmt):
    _, args = _args(fmt)
    torch.library.opcheck(torch.ops.qcompile.dequantize_weight.default, args)
    _, args16 = _args(fmt, dtype=torch.bfloat16)
    assert torch.ops.qcompile.dequantize_weight(*args16).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["int8/token", "fp8_e4m3/token", "fp8_e4m3/tensor",
                                 "fp4_e2m1/g32"])
def test_quantize_activation_reference_and_opcheck(fmt):
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(3))
    out = torch.ops.qcompile.quantize_activation(x, fmt)
    torch.testing.assert_close(out, fake_quantize(x, parse_format(fmt)), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.qcompile.quantize_activation.default, (x, fmt))


class _QLinear(torch.nn.Module):
    def __init__(self, fmt: str):
        super().__init__()
        _, args = _args(fmt, n=16, k=96)
        self.fmt = str(args[5])
        for name, t in zip(("packed", "scale", "scale_neg", "zero", "outer"), args[:5],
                           strict=True):
            self.register_buffer(name, t)

    def forward(self, x):
        w = torch.ops.qcompile.dequantize_weight(self.packed, self.scale, self.scale_neg,
                                                 self.zero, self.outer, self.fmt, 96,
                                                 torch.float32)
        x = torch.ops.qcompile.quantize_activation(x, "fp8_e4m3/token")
        return torch.nn.functional.linear(x, w)


def test_ops_survive_export_and_compile():
    m = _QLinear("fp4_e2m1/g64/asym")
    x = torch.randn(3, 7, 96)
    ref = m(x)
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(m, (x,), dynamic_shapes={"x": {1: seq}})
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.qcompile.dequantize_weight.default in targets
    assert torch.ops.qcompile.quantize_activation.default in targets
    torch.testing.assert_close(ep.module()(x), ref, rtol=0, atol=0)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ref, rtol=0, atol=0)
