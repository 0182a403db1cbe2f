"""Reference backend: folding weight dequantization keeps every bit; bad graphs are refused."""

from __future__ import annotations

import pytest
import torch

import qcompile.ops  # noqa: F401
from qcompile.backends.reference import compile_reference, fold_weight_dequant
from qcompile.capture import capture
from qcompile.errors import UnsupportedGraphError
from qcompile.manager import PassManager
from qcompile.testing import tiny_model

DEQ = torch.ops.qcompile.dequantize_weight.default


def test_fold_is_bit_exact_and_leaves_original_alone():
    model = tiny_model("qwen2")
    gm, report = PassManager("quantize{w=fp4_e2m1/g32/asym a=fp8_e4m3/token},cleanup").run(
        capture(model))
    n_deq = sum(n.target is DEQ for n in gm.graph.nodes)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator()
                        .manual_seed(0))
    folded, count = fold_weight_dequant(gm)
    assert count == n_deq == report["passes"][0]["facts"]["weights_quantized"]
    assert not any(n.target is DEQ for n in folded.graph.nodes)
    assert sum(n.target is DEQ for n in gm.graph.nodes) == n_deq
    expected = gm(ids)
    assert torch.equal(folded(ids), expected)
    assert torch.equal(compile_reference(gm)(ids), expected)
    assert torch.equal(compile_reference(gm, fold=False)(ids), expected)


def test_refuses_module_calls():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(UnsupportedGraphError, match="node _0 is call_module"):
        compile_reference(gm)
