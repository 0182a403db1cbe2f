"""SmolLM2 lowered with ``lower-triton`` on a GPU: perplexity within 0.5 % of the reference.

Needs CUDA and triton (skipped otherwise; CI is CPU-only). The same check with 40 windows and
more pipelines is ``python benchmarks/kernels.py --only-ppl``.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PIPELINES = [
    "quantize{w=fp4_e2m1/g128/asym},cleanup",
    "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token},cleanup",
    "quantize{w=fp4_e2m1/g128/m2 a=fp8_e4m3/token},cleanup",
]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_smollm2_lowered_perplexity(smollm2, pipeline):
    pytest.importorskip("triton")
    from qcompile.api import quantize_graph
    from qcompile.backends.reference import compile_reference
    from qcompile.capture import capture
    from qcompile.data import load_text
    from qcompile.evaluate import perplexity

    model, tok = smollm2
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)  # the fixture's model stays put
    text = load_text("wikitext2-test")
    gm, _ = quantize_graph(capture(model), pipeline, tokenizer=tok, progress=False)
    ref = perplexity(compile_reference(gm, fold=False), tok, text, windows=20,
                     progress=False)["ppl"]
    gm, report = quantize_graph(gm, "lower-triton,cleanup", progress=False)
    assert not report["passes"][0]["facts"]["not_lowered"]
    low = perplexity(compile_reference(gm, fold=False), tok, text, windows=20,
                     progress=False)["ppl"]
    assert abs(low / ref - 1) <= 0.005, (ref, low)
