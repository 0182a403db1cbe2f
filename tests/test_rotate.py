"""The rotate pass (QuaRot R1-R4): one test per rule, exactness on every tiny family."""

from __future__ import annotations

import pytest
import torch

import qcompile.ops  # noqa: F401
from qcompile.capture import capture
from qcompile.errors import (
    PipelineError,
    PostconditionError,
    PreconditionError,
    UnsupportedGraphError,
)
from qcompile.graph import get_attr_value
from qcompile.manager import PassManager
from qcompile.pipeline import parse_pipeline
from qcompile.testing import tiny_config, tiny_model

HAD = torch.ops.qcompile.hadamard.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default
R1_FAMILIES = ["llama", "llama-tied", "mistral", "qwen2", "phi3", "phi"]  # no post-norms
EMB = "model.embed_tokens.weight"


def _ids(seq: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(seed))


def _eager(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _run(gm, pipeline):
    return PassManager(pipeline).run(gm)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _facts(report, index=-1):
    return report["passes"][index]["facts"]


def _hadamards(gm):
    return [n for n in gm.graph.nodes if n.target is HAD]


def test_options_round_trip_and_defaults():
    text = "rotate{r1=random r2=none r3=none seed=3 tol=0.01}"
    assert str(parse_pipeline(text)) == text
    assert str(parse_pipeline("rotate{r1=hadamard seed=0}")) == "rotate"
    with pytest.raises(PipelineError, match="r1"):
        parse_pipeline("rotate{r1=qr}")


@pytest.mark.parametrize("family", R1_FAMILIES)
def test_r1_to_r4_keep_the_function(family):
    model = tiny_model(family)
    ids = _ids()  # 40 tokens: past mistral's 16-token window
    ref = _eager(model, ids)
    gm, report = _run(capture(model), "fuse-norms,rotate")
    with torch.no_grad():
        out = gm(ids)
    assert _rel(out, ref) < 1e-4
    facts = _facts(report)
    assert facts["rel_dlogits"] < 1e-4 and facts["max_abs_dlogits"] >= 0
    layers = 2
    assert facts["r1"]["writers"] == 2 * layers and facts["r1"]["embeddings"] == 1
    assert facts["r2"]["attention"] == layers
    assert facts["r3"]["online_hadamards"] == 2 * layers
    assert facts["r4"]["linears"] == layers and facts["r4"]["sizes"] == [160]
    assert len(_hadamards(gm)) == 3 * layers
    assert torch.equal(_eager(model, ids), ref)  # the eager model's tensors are untouched


def test_r1_rotates_stream_weights():
    model = tiny_model("llama")
    gm, report = _run(capture(model), "fuse-norms,rotate{r2=none r3=none r4=none}")
    assert set(_facts(report)) >= {"r1"} and "r2" not in _facts(report)
    emb = get_attr_value(gm, EMB)
    assert emb is not model.model.embed_tokens.weight
    # rows keep their norms (orthogonal Q), but the values move
    torch.testing.assert_close(emb.norm(dim=1), model.model.embed_tokens.weight.norm(dim=1))
    assert not torch.allclose(emb, model.model.embed_tokens.weight)
    assert _facts(report)["r1"]["rotation"].endswith("diag(signs, seed=0)")
    assert _hadamards(gm) == []


def test_r3_places_hadamards_on_query_and_cached_key():
    gm, _ = _run(capture(tiny_model("llama")), "rotate{r1=none r2=none r4=none}")
    for sdpa in gm.graph.find_nodes(op="call_function", target=SDPA):
        q, k = sdpa.args[:2]
        assert q.target is HAD and q.args[1] == 16
        # k: reshape(expand(unsqueeze(hadamard(k_rope), 2))): the cached key, before the repeat
        unsq = k.args[0].args[0]
        assert unsq.target is torch.ops.aten.unsqueeze.default and unsq.args[0].target is HAD


def test_r4_online_hadamard_feeds_down_projection_only():
    gm, report = _run(capture(tiny_model("phi3")), "rotate{r1=none r2=none r3=none}")
    hads = _hadamards(gm)
    assert len(hads) == 2 and _facts(report)["r4"]["sizes"] == [160]
    for h in hads:
        (user,) = h.users
        assert user.target is torch.ops.aten.linear.default
        assert "down_proj" in str(user.args[1].target)


def test_ro_online_hadamard_feeds_output_projections():
    model = tiny_model("qwen2")
    ids = _ids()
    gm, report = _run(capture(model), "fuse-norms,rotate{r3=none r4=none ro=hadamard}")
    assert _facts(report)["ro"] == {"linears": 2, "online_hadamards": 2, "sizes": [96]}
    for h in _hadamards(gm):
        (user,) = h.users
        assert "o_proj" in str(user.args[1].target) and h.args[1] == 96
    with torch.no_grad():
        assert _rel(gm(ids), _eager(model, ids)) < 1e-4


def test_r2_random_per_kv_head_respects_gqa():
    model = tiny_model("qwen2")  # 4 query heads share 2 kv heads; v/o have biases
    ids = _ids()
    gm, report = _run(capture(model), "rotate{r1=none r2=random r3=none r4=none seed=4}")
    assert _facts(report)["r2"]["rotation"] == "random orthogonal per kv head"
    with torch.no_grad():
        assert _rel(gm(ids), _eager(model, ids)) < 1e-4
    v = get_attr_value(gm, "model.layers.0.self_attn.v_proj.weight")
    assert not torch.allclose(v, model.model.layers[0].self_attn.v_proj.weight)


def test_r2_fused_qkv_only_changes_value_rows():
    model = tiny_model("phi3")
    gm, _ = _run(capture(model), "rotate{r1=none r3=none r4=none}")
    w = get_attr_value(gm, "model.layers.0.self_attn.qkv_proj.weight")
    old = model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(w[:144], old[:144])  # q (96 rows) and k (48 rows) untouched
    assert not torch.allclose(w[144:], old[144:])


def test_weightless_tied_model_stays_tied():
    model = tiny_model("llama-tied")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
    gm = capture(model)
    assert gm.meta["tied_params"]
    gm, _ = _run(gm, "rotate{r2=none r3=none r4=none}")  # already weightless: no fuse-norms
    (group,) = gm.meta["tied_params"]
    assert get_attr_value(gm, group[0]) is get_attr_value(gm, group[1])
    ids = _ids()
    with torch.no_grad():
        assert _rel(gm(ids), _eager(model, ids)) < 1e-4


@pytest.mark.parametrize("family, what", [("llama", "has a weight"),
                                          ("phi", "LayerNorm")])
def test_r1_without_fuse_norms_is_a_precondition_error(family, what):
    model = tiny_model(family)
    gm = capture(model)
    with pytest.raises(PreconditionError, match=f"{what}.*run fuse-norms first"):
        _run(gm, "rotate")
    assert get_attr_value(gm, EMB) is model.model.embed_tokens.weight


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_post_norms_make_r1_inexact_and_raise(family):
    model = tiny_model(family)
    gm, _ = _run(capture(model), "fuse-norms")
    emb = get_attr_value(gm, EMB)
    with pytest.raises(UnsupportedGraphError,
                       match=r"post-norm model\.layers\.0\.post_attention_layernorm \(node "):
        _run(gm, "rotate")
    assert get_attr_value(gm, EMB) is emb and _hadamards(gm) == []  # nothing changed


def test_weightless_post_norms_commute_with_r1():
    model = tiny_model("gemma2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "post_" in name:
                p.zero_()  # Gemma's (1 + w): scale exactly 1
    ids = _ids()
    gm, report = _run(capture(model), "fuse-norms,rotate")
    with torch.no_grad():
        assert _rel(gm(ids), _eager(model, ids)) < 1e-4
    assert _facts(report)["r1"]["writers"] == 4


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_r2_to_r4_alone_work_with_post_norms(family):
    model = tiny_model(family)  # gemma2: eager attention with soft-capping
    ids = _ids()
    gm, report = _run(capture(model), "rotate{r1=none}")
    with torch.no_grad():
        assert _rel(gm(ids), _eager(model, ids)) < 1e-4
    assert len(_hadamards(gm)) == 6 and "r1" not in _facts(report)


def _odd_llama():
    import transformers

    config = tiny_config("llama")
    config.hidden_size, config.head_dim = 92, 46  # no Hadamard of order 92 or 46 here
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_orders_without_hadamard_fall_back_or_refuse():
    model = _odd_llama()
    ids = _ids()
    gm, report = _run(capture(model), "fuse-norms,rotate{r3=none}")
    facts = _facts(report)
    assert facts["r1"]["method"] == "random" and "fallback" in facts["r1"]["rotation"]
    assert "fallback" in facts["r2"]["rotation"]
    with torch.no_grad():
        assert _rel(gm(ids), _eager(model, ids)) < 1e-4
    gm2 = capture(model)
    with pytest.raises(UnsupportedGraphError, match="head_dim 46 .* set r3=none"):
        _run(gm2, "rotate{r1=none r2=none}")


def test_rotate_after_quantize_is_refused():
    gm, _ = _run(capture(tiny_model("llama")), "fuse-norms,quantize{w=int4/g32}")
    with pytest.raises(UnsupportedGraphError, match="rotations must run before quantize"):
        _run(gm, "rotate")


def test_nothing_to_do_leaves_graph_untouched():
    gm = capture(tiny_model("llama"))
    before = [n.name for n in gm.graph.nodes]
    gm, report = _run(gm, "rotate{r1=none r2=none r3=none r4=none}")
    assert report["passes"][0]["modified"] is False and _facts(report) == {}
    assert [n.name for n in gm.graph.nodes] == before


def test_seed_is_deterministic_and_matters():
    def emb(seed: int) -> torch.Tensor:
        gm, _ = _run(capture(tiny_model("llama")), f"fuse-norms,rotate{{seed={seed}}}")
        return get_attr_value(gm, EMB)

    assert torch.equal(emb(1), emb(1))
    assert not torch.equal(emb(1), emb(2))


def test_self_check_raises_above_tolerance():
    gm = capture(tiny_model("llama"))
    with pytest.raises(PostconditionError, match="rotate changed the logits"):
        _run(gm, "fuse-norms,rotate{tol=1e-12}")


def test_calibration_stats_of_changed_inputs_are_dropped():
    gm, _ = _run(capture(tiny_model("llama")), "fuse-norms")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
             "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj"]
    gm.meta["qcompile.calibration"] = {"linears": {n: {"absmax": torch.ones(1)} for n in names}}
    gm, report = _run(gm, "rotate{r1=none r3=none}")  # R2: o_proj input, R4: down input
    assert _facts(report)["stats_dropped"] == sorted(names[1:3])
    assert set(gm.meta["qcompile.calibration"]["linears"]) == {names[0], names[3]}


def test_rotated_graph_survives_compile():
    model = tiny_model("qwen2")
    ids = _ids(12)
    gm, _ = _run(capture(model), "fuse-norms,rotate")
    with torch.no_grad():
        ref = gm(ids)
        out = torch.compile(gm, backend="aot_eager")(ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ SmolLM2-135M (slow)


@pytest.mark.slow
def test_smollm2_rotation_is_exact(smollm2, smollm2_ppl):
    model, _ = smollm2
    ids = torch.randint(0, 49152, (1, 512), generator=torch.Generator().manual_seed(3))
    gm = capture(model)
    with torch.no_grad():
        ref = gm(ids)
    gm, report = PassManager("fuse-norms,rotate").run(gm)
    with torch.no_grad():
        assert _rel(gm(ids), ref) < 1e-4
    assert _facts(report)["r1"]["rotation"].startswith("16 x 36")  # 576 = 16 * 36 (Paley II)
    assert abs(smollm2_ppl("fuse-norms,rotate")[0] - smollm2_ppl("")[0]) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("recipe, bound", [("quarot-w4a4", 6.5), ("quarot-w4a4-int4", 25.0)])
def test_smollm2_quarot_w4a4kv4_recipes_within_bounds(smollm2_ppl, recipe, bound):
    from qcompile.recipes import get_recipe

    ppl, report = smollm2_ppl(get_recipe(recipe).pipeline)
    assert ppl / smollm2_ppl("")[0] <= bound  # unrotated W4A4 int4 RTN is ~9,500 (ratio ~370)
    quantize = report["passes"][2]["facts"]
    assert quantize["kv_quant_nodes"] == 60 and quantize["act_quant_nodes"] > 0
