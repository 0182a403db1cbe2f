"""The quantize pass on tiny captured models, against an eager reference built independently.

The reference is the original eager HF model with each linear weight replaced by
``formats.fake_quantize(W)`` and (for activation formats) a pre-hook fake-quantizing its input:
the pass must produce exactly that function from graph rewrites.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile)
from qcompile.capture import capture
from qcompile.errors import FormatError, PipelineError, WeightError
from qcompile.formats import fake_quantize, parse_format
from qcompile.graph import get_attr_value, linear_nodes
from qcompile.manager import PassManager
from qcompile.testing import tiny_model

DEQ = torch.ops.qcompile.dequantize_weight.default
QACT = torch.ops.qcompile.quantize_activation.default


def _ids(vocab: int, seq: int = 11, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, seq), generator=g)


def _reference(model, w_fmt, a_fmt=None, skip=("lm_head",)):
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name in skip:
            continue
        if w_fmt:
            mod.weight = torch.nn.Parameter(fake_quantize(mod.weight.detach(),
                                                          parse_format(w_fmt)))
        if a_fmt:
            spec = parse_format(a_fmt)
            mod.register_forward_pre_hook(lambda m, args, s=spec: (fake_quantize(args[0], s),))
    return ref


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize(
    "w_fmt, a_fmt",
    [
        ("int4/g32/asym", None),
        ("fp4_e2m1/g64/asym", None),
        ("nf4/g64", None),
        ("int8/channel", "int8/token"),
        ("fp8_e4m3/channel", "fp8_e4m3/token"),
        ("fp4_e2m1/g32/asym", "fp8_e4m3/token"),
    ],
)
def test_quantized_graph_equals_eager_reference(family, w_fmt, a_fmt):
    model = tiny_model(family)
    ids = _ids(model.config.vocab_size)
    text = f"quantize{{w={w_fmt}" + (f" a={a_fmt}" if a_fmt else "") + "},cleanup"
    gm, report = PassManager(text).run(capture(model))
    expected = _logits(_reference(model, w_fmt, a_fmt), ids)
    torch.testing.assert_close(gm(ids), expected, rtol=1e-5, atol=1e-5)
    facts = report["passes"][0]["facts"]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # minus lm_head
    assert facts["linears_quantized"] == n_linear
    assert report["passes"][0]["modified"] is True
    assert "lm_head" in facts["skipped"]
    # structure: every non-head linear reads a dequantize node; the head reads its fp weight
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.linear.default:
            w = node.args[1]
            is_head = w.op == "get_attr"
            assert is_head == (w.target == "lm_head.weight") or w.target is DEQ
            if a_fmt and not is_head:
                assert node.args[0].target is QACT


def test_ragged_groups_in_graph():
    # g48 on 64/160-wide rows: full groups plus a shorter last group with its own scales
    model = tiny_model("llama")
    k = model.config.hidden_size
    assert k % 48 != 0, "rows must be ragged for this test"
    gm, _ = PassManager("quantize{w=fp4_e2m1/g48/asym}").run(capture(model))
    deq = next(n for n in gm.graph.nodes if n.target is DEQ and n.args[6] == k)
    scale = get_attr_value(gm, deq.args[1].target)
    assert scale.shape[-1] == math.ceil(k / 48)
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(gm(ids), _logits(_reference(model, "fp4_e2m1/g48/asym"), ids),
                               rtol=1e-5, atol=1e-5)


def test_include_exclude_and_heads():
    model = tiny_model("llama")
    gm, report = PassManager(
        "quantize{w=int4/g32 include=*.mlp.* exclude=*.down_proj}").run(capture(model))
    facts = report["passes"][0]["facts"]
    quantized = {n.meta["source_module"] for n in gm.graph.nodes if n.target is DEQ}
    layers = model.config.num_hidden_layers
    assert quantized == {f"model.layers.{i}.mlp.{p}" for i in range(layers)
                         for p in ("gate_proj", "up_proj")}
    assert facts["skipped"]["model.layers.0.mlp.down_proj"] == "excluded by include/exclude"


def test_lm_head_option_and_tied_embedding():
    model = tiny_model("llama-tied")
    ids = _ids(model.config.vocab_size)
    gm, report = PassManager("quantize{w=int8/channel lm_head=true},cleanup").run(capture(model))
    facts = report["passes"][0]["facts"]
    assert "skipped" in facts and not facts["skipped"]
    # the embedding still reads full-precision weights
    emb = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    assert emb.args[0].op == "get_attr"
    torch.testing.assert_close(
        get_attr_value(gm, emb.args[0].target), model.get_input_embeddings().weight)
    # assigning a new lm_head weight in the reference unties it from the embedding
    expected = _logits(_reference(model, "int8/channel", skip=()), ids)
    torch.testing.assert_close(gm(ids), expected, rtol=1e-5, atol=1e-5)


def test_nothing_selected_is_not_modified():
    gm0 = capture(tiny_model("llama"))
    code = gm0.code
    gm, report = PassManager("quantize{w=int4/g32 include=nomatch*}").run(gm0)
    assert report["passes"][0]["modified"] is False
    assert gm.code == code
    assert not any(n.target is DEQ for n in gm.graph.nodes)


def test_nan_weight_names_the_weight():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 3] = float("nan")
    with pytest.raises(WeightError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        PassManager("quantize{w=int4/g32}").run(capture(model))


@pytest.mark.parametrize(
    "text, err",
    [
        ("quantize{w=int4/g0}", FormatError),
        ("quantize{w=int9/g32}", FormatError),
        ("quantize{w=int8/token}", FormatError),
        ("quantize{a=int8/channel}", FormatError),
        ("quantize", PipelineError),
        ("quantize{clip=maybe w=int4}", PipelineError),
    ],
)
def test_bad_options_are_one_line_typed_errors(text, err):
    with pytest.raises(err) as info:
        PassManager(text)
    assert "\n" not in str(info.value)


def test_clip_search_lowers_weight_error_and_is_deterministic():
    model = tiny_model("llama")
    _, plain = PassManager("quantize{w=int4/g32}").run(capture(model))
    gm1, searched = PassManager("quantize{w=int4/g32 clip=search}").run(capture(model))
    gm2, _ = PassManager("quantize{w=int4/g32 clip=search}").run(capture(model))
    assert (searched["passes"][0]["facts"]["weight_rel_mse"]
            < plain["passes"][0]["facts"]["weight_rel_mse"])
    for (n1, t1), (n2, t2) in zip(gm1.state_dict().items(), gm2.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(t1, t2)


def test_cleanup_drops_replaced_weights_and_reports_bytes():
    model = tiny_model("llama")
    gm, report = PassManager("quantize{w=int4/g32},cleanup").run(capture(model))
    names = set(gm.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert "model.layers.0.self_attn.q_proj.qweight" in names
    assert linear_nodes(gm)  # only the head still reads a plain weight
    clean = report["passes"][1]
    assert clean["modified"] is False  # quantize already dropped what it replaced
    _, again = PassManager("cleanup").run(gm)
    assert again["passes"][0]["modified"] is False
