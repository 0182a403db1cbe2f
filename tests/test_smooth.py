"""smooth (SmoothQuant): exact function, the scale formula, GQA sharing, and W8A8 quality."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from qcompile.capture import capture
from qcompile.errors import PipelineError, PreconditionError
from qcompile.graph import get_attr_value
from qcompile.manager import PassManager
from qcompile.pass_base import PassContext
from qcompile.passes.calibrate import CALIBRATION_KEY, drop_stats
from qcompile.pipeline import parse_pipeline
from qcompile.recipes import get_recipe
from qcompile.testing import FAMILIES, ByteTokenizer, tiny_model

_BASE: dict[str, tuple[nn.Module, fx.GraphModule]] = {}
CAL = "calibrate{samples=2 seqlen=48}"


def _calibrated(family: str) -> tuple[nn.Module, fx.GraphModule]:
    """The eager model and a private copy of its calibrated capture (built once per session)."""
    if family not in _BASE:
        model = tiny_model(family)
        gm, _ = _run(capture(model), CAL)
        _BASE[family] = (model, gm)
    model, gm = _BASE[family]
    return model, copy.deepcopy(gm)


def _run(gm: fx.GraphModule, text: str) -> tuple[fx.GraphModule, dict]:
    ctx = PassContext(tokenizer=ByteTokenizer(), progress=False)
    return PassManager(text, context=ctx).run(gm)


def _stats(gm: fx.GraphModule, name: str) -> torch.Tensor:
    return gm.meta[CALIBRATION_KEY]["linears"][name]["absmax"].clone()


def _rel_to_eager(model: nn.Module, gm: fx.GraphModule) -> float:
    ids = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        return float((gm(ids) - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_function_preserved_and_groups_found(family):
    model, gm = _calibrated(family)
    gm, report = _run(gm, "smooth")
    entry = report["passes"][0]
    facts = entry["facts"]
    assert entry["modified"] and facts["rel_dlogits"] < 1e-4
    assert _rel_to_eager(model, gm) < 1e-4
    want = {"norm": 4, "attn_vo": 2, "mlp_up_down": 2}
    if family == "phi":  # parallel block: one norm per layer; GELU MLP has no gate to scale
        want = {"norm": 2, "attn_vo": 2, "mlp_up_down": 0}
    assert facts["groups_smoothed"] == want
    final = "model.final_layernorm" if family == "phi" else "model.norm"
    assert "output heads" in facts["skipped"][final]


def test_scales_follow_the_smoothquant_formula():
    _, gm = _calibrated("llama")
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    a = _stats(gm, q)
    w = torch.stack([get_attr_value(gm, f"{n}.weight").detach().abs().amax(0)
                     for n in (q, k, v)]).amax(0)
    gamma = get_attr_value(gm, "model.layers.0.input_layernorm.weight").detach().clone()
    wq = get_attr_value(gm, f"{q}.weight").detach().clone()
    gm, _ = _run(gm, "smooth{alpha=0.75}")
    s = a.double().pow(0.75) / w.double().pow(0.25)
    torch.testing.assert_close(_stats(gm, q).double(), a.double() / s)
    torch.testing.assert_close(_stats(gm, k), _stats(gm, q), rtol=0, atol=0)
    new_gamma = get_attr_value(gm, "model.layers.0.input_layernorm.weight").detach()
    torch.testing.assert_close(new_gamma.double(), gamma.double() / s)
    torch.testing.assert_close(get_attr_value(gm, f"{q}.weight").double(), wq.double() * s)


def test_updated_statistics_match_a_recalibration():
    _, gm = _calibrated("qwen2")
    gm, _ = _run(gm, "smooth")
    names = list(gm.meta[CALIBRATION_KEY]["linears"])
    updated = {n: _stats(gm, n) for n in names}
    gm, _ = _run(gm, CAL)
    for n in names:
        torch.testing.assert_close(_stats(gm, n), updated[n], rtol=1e-4, atol=1e-5)


def test_v_scales_are_shared_by_query_heads_of_one_kv_head():
    _, gm = _calibrated("mistral")  # 4 query heads, 2 kv heads, head_dim 16
    o, v, q = (f"model.layers.1.self_attn.{p}_proj" for p in "ovq")
    wo, wv, wq = (get_attr_value(gm, f"{n}.weight").detach().clone() for n in (o, v, q))
    gm, _ = _run(gm, "smooth")
    ratio = {n: get_attr_value(gm, f"{n}.weight").double() / w.double()
             for n, w in ((o, wo), (v, wv), (q, wq))}
    s_o = ratio[o][0].view(4, 16)  # o's columns were multiplied by s
    s_norm = ratio[q][0]  # q, k, v columns carry the input norm's scales too
    s_v = (s_norm[0] / ratio[v][:, 0]).view(2, 16)  # v's rows were divided by s
    torch.testing.assert_close(s_o[0], s_o[1])  # heads 0, 1 read kv head 0
    torch.testing.assert_close(s_o[2], s_o[3])
    torch.testing.assert_close(s_o[::2], s_v)
    assert not torch.allclose(s_o[0], torch.ones(16, dtype=torch.float64))


def test_needs_calibration():
    model = tiny_model("llama")
    with pytest.raises(PreconditionError, match="calibrate"):
        _run(capture(model), "smooth")


@pytest.mark.parametrize("text", ["smooth{alpha=1.5}", "smooth{alpha=-0.1}"])
def test_alpha_outside_unit_interval_is_refused(text):
    with pytest.raises(PipelineError, match="alpha"):
        parse_pipeline(text)


def test_missing_statistics_skip_only_that_group():
    _, gm = _calibrated("llama")
    drop_stats(gm, ["model.layers.0.mlp.down_proj"])
    gm, report = _run(gm, "smooth")
    facts = report["passes"][0]["facts"]
    assert facts["groups_smoothed"]["mlp_up_down"] == 1
    assert "no calibration statistics" in facts["skipped"]["model.layers.0.mlp.down_proj"]


def test_lm_head_group_on_request():
    model, gm = _calibrated("gemma2")
    head = get_attr_value(gm, "lm_head.weight")
    gm, report = _run(gm, "smooth{lm_head=true}")
    assert report["passes"][0]["facts"]["groups_smoothed"]["norm"] == 5
    assert get_attr_value(gm, "lm_head.weight") is not head
    assert _rel_to_eager(model, gm) < 1e-4


def test_after_fuse_norms_and_meta_moves_the_norm():
    model, gm = _calibrated("llama")
    gm, _ = _run(gm, "fuse-norms,smooth")
    record = gm.meta["qcompile.fuse_norms"]
    assert set(record["smoothed"]) == {f"model.layers.{i}.{n}" for i in (0, 1)
                                       for n in ("input_layernorm", "post_attention_layernorm")}
    assert list(record["fused"]) == ["model.norm"]
    assert _rel_to_eager(model, gm) < 1e-4


def test_recipe_runs_end_to_end_on_a_tiny_model():
    recipe = get_recipe("smoothquant-w8a8")
    assert str(recipe.parse()) == recipe.pipeline
    model = tiny_model("llama")
    gm, report = _run(capture(model), recipe.pipeline)
    names = [p["name"] for p in report["passes"]]
    assert names == ["calibrate", "smooth", "quantize", "cleanup"]
    static = torch.ops.qcompile.quantize_activation_static.default
    assert len(gm.graph.find_nodes(op="call_function", target=static)) == 8
    assert report["passes"][1]["facts"]["groups_smoothed"] == {
        "norm": 4, "attn_vo": 2, "mlp_up_down": 2}
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(gm(ids)).all()


@pytest.mark.slow
def test_smollm2_smoothing_beats_plain_static_w8a8(smollm2):
    """W8A8 with static per-tensor INT8 activations, 20 windows x 512 of WikiText-2 test
    (half the usual 40, to keep CI time down): smoothing must lower the perplexity."""
    from qcompile.backends.reference import compile_reference
    from qcompile.data import load_text
    from qcompile.evaluate import perplexity

    model, tok = smollm2
    text = load_text("wikitext2-test")
    ppl = {}
    for label, smooth in (("plain", ""), ("smooth", "smooth,")):
        pipeline = (f"calibrate{{samples=16}},{smooth}"
                    "quantize{w=int8/channel a=int8/tensor static=true},cleanup")
        gm, _ = PassManager(pipeline, context=PassContext(tokenizer=tok, progress=False)
                            ).run(capture(model))
        ppl[label] = perplexity(compile_reference(gm), tok, text, windows=20,
                                progress=False)["ppl"]
    print(f"\nstatic W8A8 ppl (20 windows): {ppl}")
    assert ppl["smooth"] < ppl["plain"]
