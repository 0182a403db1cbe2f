"""SmolLM2-135M exported to ONNX: ORT perplexity and greedy generation vs the reference backend.

Perplexity is measured on the first 4 WikiText-2 test windows of 512 tokens through the
KV-cache export (empty cache, whole window) and must lie within 0.5 % of the reference
backend's on the same windows; greedy generation must give the same 24 new tokens.
MatMulNBits at ``accuracy_level=1`` computes in fp32 (exact); at level 4 (opt-in) it
quantizes activations to int8 per MatMulNBits block inside the kernel (measured +1.25 %
perplexity on these windows with 128-wide blocks), so that setting gets a 2 % bound and its
generation is only reported; with 32-wide blocks (``nbits_block=32``, scales repeated) the
int8 activations keep SmolLM2's outlier channels to their own blocks (+0.08 %), and that
export gets the 0.5 % bound and must generate the reference tokens.
"""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.mark.parametrize("recipe, accuracy_level, block, bound", [
    ("w4-afpq", 1, None, 0.005),  # FP4 functions: no MatMulNBits, exact fp32 compute
    ("w4-int4", 1, None, 0.005),
    ("w4-int4", 4, None, 0.02),
    # the decode-speed export: int8 activations per 32-wide block (measured +0.08 %)
    ("w4-int4-head8", 4, 32, 0.005),
])
def test_smollm2_ort_perplexity_and_generation(recipe, accuracy_level, block, bound, smollm2,
                                               smollm2_graph, tmp_path):
    from qcompile.api import quantize_graph
    from qcompile.backends.onnx import OnnxLM, export_onnx
    from qcompile.backends.onnx.runtime import greedy_reference
    from qcompile.backends.reference import compile_reference
    from qcompile.data import load_text
    from qcompile.evaluate import perplexity
    from qcompile.recipes import get_recipe

    _, tok = smollm2
    gm, _ = quantize_graph(smollm2_graph, get_recipe(recipe).pipeline, progress=False)
    ref = compile_reference(gm)
    report = export_onnx(gm, tmp_path / "m.onnx", kv_cache=True,
                         accuracy_level=accuracy_level, nbits_block=block)
    assert report["external_data"] == "m.onnx.data"  # 167 MiB of weights
    lm = OnnxLM(tmp_path / "m.onnx")

    text = load_text("wikitext2-test")
    ppl_ref = perplexity(ref, tok, text, seqlen=512, windows=4, progress=False)["ppl"]
    ppl_ort = perplexity(lm, tok, text, seqlen=512, windows=4, progress=False)["ppl"]
    print(f"\n{recipe} (accuracy_level {accuracy_level}): reference ppl {ppl_ref:.4f}, "
          f"ORT ppl {ppl_ort:.4f} ({100 * (ppl_ort / ppl_ref - 1):+.3f} %)")
    assert abs(ppl_ort / ppl_ref - 1) < bound

    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    got = lm.generate(ids, 24)
    expected = greedy_reference(ref, ids, 24)
    same = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), 24)
    print(f"ORT: {tok.decode(got)!r}; first {same} of 24 tokens equal the reference")
    if accuracy_level < 4 or block:
        assert got == expected
