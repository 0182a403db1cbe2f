"""Capture: tiny HF families and plain modules into plain aten GraphModules."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from qcompile.capture import capture, move_graph
from qcompile.errors import CaptureError
from qcompile.graph import get_attr_value, linear_nodes, set_attr_value
from qcompile.testing import FAMILIES, tiny_model

_CAPTURED: dict[str, tuple[nn.Module, fx.GraphModule]] = {}


def _captured(family: str) -> tuple[nn.Module, fx.GraphModule]:
    # Each family is captured once per test session (about a second each).
    if family not in _CAPTURED:
        model = tiny_model(family)
        _CAPTURED[family] = (model, capture(model))
    return _CAPTURED[family]


def _ids(seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager_at_several_lengths(family):
    model, gm = _captured(family)
    with torch.inference_mode():
        for seq in (1, 7, 40):  # 40 exceeds the sliding window (16) of mistral/gemma
            ids = _ids(seq, seed=seq)
            want = model(input_ids=ids, use_cache=False).logits
            got = gm(ids)
            assert isinstance(got, torch.Tensor) and got.shape == (1, seq, 256)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_structure(family):
    model, gm = _captured(family)
    assert type(gm.graph._codegen) is fx.graph.CodeGen  # no pytree in/out spec
    placeholders = gm.graph.find_nodes(op="placeholder")
    assert [p.name for p in placeholders] == ["input_ids"]
    (output,) = gm.graph.find_nodes(op="output")
    assert isinstance(output.args[0], fx.Node)  # the logits node itself, not a tuple
    assert not gm.graph.find_nodes(op="call_module")
    assert not any(str(n.target).startswith("aten._assert") for n in gm.graph.nodes)

    names = dict(model.named_parameters(remove_duplicate=False))
    names.update(dict(model.named_buffers(remove_duplicate=False)))
    for node in gm.graph.find_nodes(op="get_attr"):
        assert node.target in names, node.target
        assert get_attr_value(gm, node.target) is names[node.target]  # shared, not copied
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert isinstance(node.meta.get("source_module"), str), node.name


@pytest.mark.parametrize("family", FAMILIES)
def test_linears_are_aten_linear_with_source_module(family):
    model, gm = _captured(family)
    modules = dict(model.named_modules())
    expected = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    found = linear_nodes(gm)
    all_linear = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
    assert len(found) == len(all_linear) == len(expected)
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default)
    sources = set()
    for site in found:
        source = site.meta["source_module"]
        assert site.args[1].target == f"{source}.weight"
        bias = site.args[2] if len(site.args) > 2 else None
        has_bias = modules[source].bias is not None
        assert (bias is not None) == has_bias
        if has_bias:
            assert bias.target == f"{source}.bias"
        sources.add(source)
    assert sources == expected


def test_fused_and_biased_projections_are_kept():
    _, phi3 = _captured("phi3")
    targets = {s.args[1].target for s in linear_nodes(phi3)}
    assert "model.layers.0.self_attn.qkv_proj.weight" in targets
    assert "model.layers.0.mlp.gate_up_proj.weight" in targets
    _, qwen2 = _captured("qwen2")
    biased = {s.meta["source_module"] for s in linear_nodes(qwen2)
              if len(s.args) > 2 and s.args[2] is not None}
    assert biased == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"}


def test_tied_weights_get_one_attribute_per_user():
    model, gm = tiny_model("llama-tied"), None
    gm = capture(model)
    assert gm.meta["tied_params"] == [("model.embed_tokens.weight", "lm_head.weight")]
    assert gm.lm_head.weight is gm.model.embed_tokens.weight is model.lm_head.weight
    (emb,) = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.embedding.default)
    assert emb.args[0].target == "model.embed_tokens.weight"
    assert linear_nodes(gm)[-1].args[1].target == "lm_head.weight"

    # Replacing one attribute unties it and leaves the eager model alone.
    ids = _ids(6)
    before = model(input_ids=ids, use_cache=False).logits.detach()
    set_attr_value(gm, "lm_head.weight", torch.zeros_like(model.lm_head.weight))
    assert isinstance(gm.lm_head.weight, nn.Parameter)
    assert torch.count_nonzero(gm(ids)) == 0
    assert gm.model.embed_tokens.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, before)


def test_meta_and_static_capture():
    model = tiny_model("llama")
    gm = capture(model, example_seq=5, dynamic_seq=False)
    assert gm.meta["seq_range"] == (5, 5)
    assert gm.meta["batch"] == 1
    assert "LlamaForCausalLM" in gm.meta["source_model"]
    ids = _ids(5)
    torch.testing.assert_close(gm(ids), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_batch_two():
    model = tiny_model("qwen2")
    gm = capture(model, batch=2, max_seq=64)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gm(ids), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_move_graph_rewrites_devices_without_touching_model():
    model = tiny_model("llama-tied")
    gm = move_graph(capture(model), "meta")
    out = gm(torch.zeros(1, 9, dtype=torch.long, device="meta"))
    assert out.shape == (1, 9, 256) and out.device.type == "meta"
    assert gm.lm_head.weight is gm.model.embed_tokens.weight  # still tied
    assert model.lm_head.weight.device.type == "cpu"


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 32, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(tokens)))


def test_plain_module():
    torch.manual_seed(0)
    model = _TinyLM().eval()
    gm = capture(model, max_seq=128)
    ids = torch.randint(0, 32, (1, 13))
    torch.testing.assert_close(gm(ids), model(ids), rtol=1e-6, atol=1e-6)
    targets = {s.args[1].target: s.meta["source_module"] for s in linear_nodes(gm)}
    assert targets == {"body.0.weight": "body.0", "head.weight": "head"}


class _NoInput(nn.Module):
    def forward(self) -> torch.Tensor:
        return torch.zeros(1)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        if x.sum() > 0:  # data-dependent branch: export cannot trace it
            return x
        return -x


class _ReturnsText(nn.Module):
    def forward(self, input_ids: torch.Tensor) -> str:
        return "logits"


@pytest.mark.parametrize("cls", [_NoInput, _DataDependent, _ReturnsText])
def test_unsupported_models_raise_capture_error(cls):
    with pytest.raises(CaptureError) as info:
        capture(cls())
    message = str(info.value)
    assert cls.__name__ in message
    assert "\n" not in message


def test_bad_arguments_and_missing_attribute():
    with pytest.raises(CaptureError, match="example_seq"):
        capture(_TinyLM(), example_seq=10, max_seq=4)
    _, gm = _captured("llama")
    with pytest.raises(AttributeError, match="nope"):
        get_attr_value(gm, "model.nope.weight")


def _refuse_named_dims(monkeypatch):
    """Make torch.export refuse a named sequence Dim the way torch 2.11 did on CUDA."""
    real = torch.export.export

    def export(mod, args, *a, dynamic_shapes=None, **kw):
        dims = dynamic_shapes["input_ids"] if dynamic_shapes else {}
        if any(isinstance(d, torch.export.Dim) for d in dims.values()):
            raise torch._dynamo.exc.UserError(
                torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION,
                "Constraints violated (seq)! min(16*s, 32*s) == 16*s")
        return real(mod, args, *a, dynamic_shapes=dynamic_shapes, **kw)

    monkeypatch.setattr(torch.export, "export", export)


def test_unprovable_guard_falls_back_to_an_auto_length(monkeypatch):
    model = tiny_model("llama")
    _refuse_named_dims(monkeypatch)
    gm = capture(model, max_seq=64)
    assert gm.meta["seq_range"][0] <= 2 and gm.meta["seq_range"][1] == 64
    for seq in (3, 11):
        ids = torch.randint(0, model.config.vocab_size, (1, seq))
        with torch.no_grad():
            torch.testing.assert_close(gm(ids), model(ids).logits, atol=1e-5, rtol=1e-5)


def test_auto_length_that_export_specializes_is_an_error(monkeypatch):
    real = torch.export.export

    def export(mod, args, *a, dynamic_shapes=None, **kw):
        if any(isinstance(d, torch.export.Dim) for d in dynamic_shapes["input_ids"].values()):
            raise torch._dynamo.exc.UserError(
                torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION,
                "Constraints violated (seq)! min(16*s, 32*s) == 16*s")
        return real(mod, args, *a, dynamic_shapes=None, **kw)  # AUTO, but made static

    monkeypatch.setattr(torch.export, "export", export)
    with pytest.raises(CaptureError, match=r"specialized it to 8 .*dynamic_seq=False"):
        capture(tiny_model("llama"))
