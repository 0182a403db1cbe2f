"""LoRC: low-rank compensation of the weight quantization error."""

from __future__ import annotations

import pytest
import torch

from qcompile.api import quantize_graph
from qcompile.capture import capture
from qcompile.data import calibration_batches, load_text
from qcompile.errors import PipelineError, PreconditionError
from qcompile.formats import dequantize, parse_format, quantize
from qcompile.graph import linear_nodes
from qcompile.passes.lorc import low_rank_factors
from qcompile.testing import ByteTokenizer, tiny_model


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("qwen2")  # biases, hidden 96
    tok = ByteTokenizer()
    ids = calibration_batches(tok, load_text("wikitext2-valid"), 2, 40, 5)
    with torch.no_grad():
        ref = model(ids).logits
    return model, tok, ids, ref


def _run(tiny, pipeline: str) -> tuple[torch.Tensor, dict, torch.fx.GraphModule]:
    model, tok, ids, _ = tiny
    gm, report = quantize_graph(capture(model), pipeline, tokenizer=tok, progress=False)
    with torch.no_grad():
        out = torch.cat([gm(i[None]) for i in ids])
    return out, report, gm


def test_low_rank_factors_are_the_truncated_svd() -> None:
    e = torch.randn(30, 50, generator=torch.Generator().manual_seed(0))
    a, b = low_rank_factors(e, 4)
    assert a.shape == (30, 4) and b.shape == (4, 50)
    s = torch.linalg.svdvals(e.double())
    # Eckart-Young: the residual norm is the norm of the dropped singular values.
    assert torch.linalg.norm(e.double() - (a @ b).double()) == pytest.approx(
        float(s[4:].square().sum().sqrt()), rel=1e-5)
    a, b = low_rank_factors(e, 100)  # clamped to full rank: exact
    torch.testing.assert_close(a @ b, e, rtol=1e-5, atol=1e-5)


def test_full_rank_unquantized_lorc_reproduces_the_model(tiny) -> None:
    _, _, _, ref = tiny
    out, report, gm = _run(tiny, "lorc{w=int3/g32/asym rank=1000 bits=0},quantize{w=int3/g32/asym}")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    facts = report["passes"][0]["facts"]
    assert facts["error_left"] < 1e-5 and facts["rtn_planned"] == 14
    # The main weights really are 3-bit: without the branch the model would be far off.
    assert report["passes"][1]["facts"]["weights_quantized"] == 14


def test_rank8_lorc_reduces_error_and_quantize_skips_its_factors(tiny) -> None:
    _, _, _, ref = tiny
    fmt = "fp4_e2m1/g32/m2"
    plain, _, _ = _run(tiny, f"quantize{{w={fmt} a=fp8_e4m3/token}}")
    out, report, gm = _run(tiny, f"lorc{{w={fmt} rank=8}},quantize{{w={fmt} a=fp8_e4m3/token}}")
    assert (out - ref).pow(2).mean() < 0.95 * (plain - ref).pow(2).mean()
    lorc, quant = (p["facts"] for p in report["passes"])
    assert 0 < lorc["error_left"] < 1 and lorc["factor_bits"] == 8
    assert quant["planned_by"] == {"lorc": 14}
    assert sum("lorc" in r for r in quant["skipped"].values()) == 0  # factors are not plain attrs
    deq = [n for n in gm.graph.nodes if n.target is torch.ops.qcompile.dequantize_weight.default]
    assert sum("int8/channel" == n.args[5] for n in deq) == 28  # A and B of 14 linears
    adds = [n for n in gm.graph.nodes if n.meta.get("qcompile.lorc")]
    assert len(adds) == 28


def test_unquantized_factors_are_skipped_by_quantize(tiny) -> None:
    _, report, gm = _run(tiny, "lorc{w=int4/g32 rank=4 bits=0},quantize{w=int4/g32}")
    skipped = report["passes"][1]["facts"]["skipped"]
    assert sum("lorc" in why for why in skipped.values()) == 28
    assert len([n for n in linear_nodes(gm) if n.meta.get("qcompile.lorc")]) == 28


def test_lorc_after_gptq_compensates_the_gptq_weights(tiny) -> None:
    _, _, _, ref = tiny
    fmt = "int4/g32/asym"
    g, _, _ = _run(tiny, f"gptq{{w={fmt} samples=4 seqlen=40}},quantize{{w={fmt}}}")
    out, report, _ = _run(tiny, f"gptq{{w={fmt} samples=4 seqlen=40}},lorc{{rank=8}},"
                                f"quantize{{w={fmt}}}")
    assert (out - ref).pow(2).mean() < (g - ref).pow(2).mean()
    assert report["passes"][1]["facts"]["rtn_planned"] == 0
    assert report["passes"][2]["facts"]["planned_by"] == {"gptq": 14}


def test_lorc_errors(tiny) -> None:
    model, tok, _, _ = tiny
    with pytest.raises(PreconditionError, match="no planned quantization"):
        quantize_graph(capture(model), "lorc{rank=4}", tokenizer=tok, progress=False)
    with pytest.raises(PipelineError, match="bits"):
        quantize_graph(capture(model), "lorc{bits=1 w=int4/g32}", progress=False)
    with pytest.raises(PipelineError, match="rank"):
        quantize_graph(capture(model), "lorc{rank=0 w=int4/g32}", progress=False)


def test_factor_quantization_is_per_row_int() -> None:
    a = torch.randn(20, 8)
    q = quantize(a, parse_format("int8/channel"))
    assert q.scale.shape == (20, 1)
    assert (dequantize(q) - a).abs().max() <= q.scale.max() / 2 + 1e-7
