"""fuse-norms: exact folding of norm weights into linears, on every tiny family and SmolLM2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from qcompile.capture import capture
from qcompile.errors import PostconditionError
from qcompile.graph import get_attr_value
from qcompile.manager import PassManager
from qcompile.pass_base import PassContext
from qcompile.passes.calibrate import CALIBRATION_KEY
from qcompile.passes.fuse_norms import FuseNormsOptions, FuseNormsPass
from qcompile.patterns import find_norms, find_residual_stream, linear_name
from qcompile.pipeline import parse_pipeline
from qcompile.testing import FAMILIES, ByteTokenizer, tiny_model

_BASE: dict[str, tuple[nn.Module, fx.GraphModule]] = {}
LAYER_NORM = torch.ops.aten.layer_norm.default


def _fresh(family: str) -> tuple[nn.Module, fx.GraphModule]:
    """The eager model and a private copy of its capture (captured once per session)."""
    if family not in _BASE:
        model = tiny_model(family)
        _BASE[family] = (model, capture(model))
    model, gm = _BASE[family]
    return model, copy.deepcopy(gm)


def _ids(seq: int = 33, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_invariant_and_norms_weightless(family):
    model = tiny_model(family)
    gm = capture(model)  # shares tensors with the eager model: they must stay untouched
    ids = _ids()
    want = _logits(model, ids)
    readers = {n.name: [(linear_name(c), get_attr_value(gm, str(c.args[1].target)))
                        for c in n.consumers] for n in find_norms(gm)}
    result = FuseNormsPass()(gm)
    assert result.modified
    with torch.no_grad():
        assert _rel(gm(ids), want) < 1e-4
    assert torch.equal(_logits(model, ids), want)  # eager model not modified in place
    facts = result.facts
    assert facts["rel_dlogits"] < 1e-4 and facts["max_abs_dlogits"] >= 0
    fused = gm.meta["qcompile.fuse_norms"]["fused"]
    assert facts["norms_fused"] == len(fused) == (3 if family == "phi" else 5)
    for norm in find_norms(gm):
        if norm.name in fused:
            assert torch.equal(norm.scale(gm), torch.ones(norm.dim))
            assert norm.bias is None  # phi: LayerNorm became RMSNorm, beta folded away
            for name, old in readers[norm.name]:
                assert name in fused[norm.name]["readers"]
                new = get_attr_value(gm, f"{name}.weight")
                assert new is not old and not torch.equal(new, old)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_post_norms_and_qk_norms_are_left_alone_and_reported(family):
    _, gm = _fresh(family)
    before = {n.name: n.scale(gm) for n in find_norms(gm)}
    result = FuseNormsPass()(gm)
    skipped = result.facts["skipped"]
    posts = [k for k in skipped if "post_" in k]
    assert len(posts) == 4 and all(skipped[k].startswith("post-norm") for k in posts)
    qk = [k for k in skipped if k.endswith(("q_norm", "k_norm"))]
    assert len(qk) == (4 if family == "gemma3" else 0)
    assert all("non-linear" in skipped[k] for k in qk)
    for norm in find_norms(gm):
        if norm.name in skipped:
            assert torch.equal(norm.scale(gm), before[norm.name])
    assert gm.meta["qcompile.fuse_norms"]["skipped"] == skipped


def test_tied_head_gets_its_own_tensor():
    model = tiny_model("llama-tied")
    gm = capture(model)
    assert gm.meta["tied_params"] == [("model.embed_tokens.weight", "lm_head.weight")]
    result = FuseNormsPass()(gm)
    assert result.facts["untied"] == ["lm_head.weight"]
    assert gm.meta["tied_params"] == []
    emb = get_attr_value(gm, "model.embed_tokens.weight")
    head = get_attr_value(gm, "lm_head.weight")
    assert emb is model.model.embed_tokens.weight and head is not emb
    gamma = model.model.norm.weight.detach().double()
    torch.testing.assert_close(head.double(), emb.double() * gamma, rtol=1e-6, atol=0)


def test_layernorm_stream_is_centered_and_becomes_rmsnorm():
    model, gm = _fresh("phi")
    ids = _ids()
    result = FuseNormsPass()(gm)
    assert result.facts["layernorms_to_rms"] == 3 and "center_skipped" not in result.facts
    assert not gm.graph.find_nodes(op="call_function", target=LAYER_NORM)
    norms = find_norms(gm)
    assert [n.kind for n in norms] == ["rms"] * 3 and all(n.bias is None for n in norms)
    emb = get_attr_value(gm, "model.embed_tokens.weight")
    assert float(emb.double().mean(1).abs().max()) < 1e-6
    stream = find_residual_stream(gm)
    for w in ("self_attn.dense", "mlp.fc2"):
        for layer in (0, 1):
            wt = get_attr_value(gm, f"model.layers.{layer}.{w}.weight").double()
            assert float(wt.mean(0).abs().max()) < 1e-6  # writers produce zero-mean outputs
    assert gm.meta["qcompile.fuse_norms"]["centered"] is True
    with torch.no_grad():
        assert _rel(gm(ids), _logits(model, ids)) < 1e-4
    assert len(stream.adds) == 2


def test_layernorm_without_centering_keeps_layernorm_with_unit_affine():
    model, gm = _fresh("phi")
    ids = _ids()
    result = FuseNormsPass(FuseNormsOptions(center=False))(gm)
    assert result.facts["center_skipped"] == "center=false"
    lns = gm.graph.find_nodes(op="call_function", target=LAYER_NORM)
    assert len(lns) == 3
    for norm in find_norms(gm):
        assert torch.equal(norm.scale(gm), torch.ones(norm.dim))
        assert torch.equal(norm.shift(gm), torch.zeros(norm.dim))
    with torch.no_grad():
        assert _rel(gm(ids), _logits(model, ids)) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi"])
def test_second_run_has_nothing_to_do_and_leaves_graph_untouched(family):
    _, gm = _fresh(family)
    FuseNormsPass()(gm)
    fused = dict(gm.meta["qcompile.fuse_norms"]["fused"])
    code = gm.code
    state = {k: v for k, v in gm.state_dict(keep_vars=True).items()}
    result = FuseNormsPass()(gm)
    assert result.modified is False and result.facts["norms_fused"] == 0
    assert gm.code == code
    assert all(v is state[k] for k, v in gm.state_dict(keep_vars=True).items())
    assert gm.meta["qcompile.fuse_norms"]["fused"] == fused  # a re-run keeps the record
    assert all("already weightless" in r or "non-linear" in r or "post-norm" in r
               for r in result.facts["skipped"].values())


class _NormToTanh(nn.Module):
    """embedding -> RMSNorm -> tanh branch -> residual -> final RMSNorm -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.g1 = nn.Parameter(torch.rand(16) + 0.5)
        self.g2 = nn.Parameter(torch.rand(16) + 0.5)
        self.head = nn.Linear(16, 64, bias=False)

    @staticmethod
    def _rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

    def forward(self, ids):
        x = self.emb(ids)
        x = x + torch.tanh(self._rms(x, self.g1))
        return self.head(self._rms(x, self.g2))


def test_norm_feeding_a_non_linear_is_reported_and_left_alone():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _NormToTanh()
    gm = capture(model)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    want = model(ids)
    result = FuseNormsPass()(gm)
    assert result.modified and result.facts["norms_fused"] == 1
    assert "tanh" in result.facts["skipped"]["g1"]
    assert get_attr_value(gm, "g1") is model.g1  # untouched
    assert torch.equal(get_attr_value(gm, "g2"), torch.ones(16))
    assert _rel(gm(ids), want) < 1e-5


def test_self_check_raises_above_tolerance():
    _, gm = _fresh("llama")
    with pytest.raises(PostconditionError, match="tol=1e-30"):
        FuseNormsPass(FuseNormsOptions(tol=1e-30))(gm)


def test_calibration_statistics_follow_the_fold():
    _, gm = _fresh("llama")
    ctx = PassContext(tokenizer=ByteTokenizer(), progress=False)
    gm, _ = PassManager("calibrate{samples=2 seqlen=32}", context=ctx).run(gm)
    q = "model.layers.0.self_attn.q_proj"
    before = gm.meta[CALIBRATION_KEY]["linears"][q]["absmax"].clone()
    gamma = get_attr_value(gm, "model.layers.0.input_layernorm.weight").detach().clone()
    gm, _ = PassManager("fuse-norms", context=ctx).run(gm)
    after = gm.meta[CALIBRATION_KEY]["linears"][q]
    torch.testing.assert_close(after["absmax"], before / gamma.abs())
    gm, _ = PassManager("calibrate{samples=2 seqlen=32}", context=ctx).run(gm)
    torch.testing.assert_close(gm.meta[CALIBRATION_KEY]["linears"][q]["absmax"],
                               after["absmax"], rtol=1e-5, atol=1e-6)


def test_options_round_trip_through_pipeline_text():
    text = "fuse-norms{center=false seed=3 seq=8 tol=0.01}"
    assert str(parse_pipeline(text)) == text
    assert str(parse_pipeline("fuse-norms")) == "fuse-norms"


@pytest.mark.slow
def test_smollm2_logits_invariant(smollm2, smollm2_graph):
    model, tok = smollm2
    gm = smollm2_graph
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    want = _logits(model, ids)
    gm, report = PassManager("fuse-norms").run(gm)
    facts = report["passes"][0]["facts"]
    assert facts["norms_fused"] == 61 and facts["untied"] == ["lm_head.weight"]
    with torch.no_grad():
        assert _rel(gm(ids), want) < 1e-4
    assert facts["rel_dlogits"] < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.float16, 3e-2),
                                       (torch.bfloat16, 1e-1)])
def test_default_tolerance_follows_the_weight_dtype(dtype, tol):
    from qcompile.passes.fuse_norms import default_tol

    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)).to(dtype))
    assert default_tol(gm) == tol


def test_bf16_tiny_llama_folds_within_the_default_tolerance():
    model = tiny_model("llama", seed=3).to(torch.bfloat16)
    gm = capture(model)
    from qcompile.api import quantize_graph

    gm, report = quantize_graph(gm, "fuse-norms", progress=False)
    facts = report["passes"][0]["facts"]
    assert 0 < facts["rel_dlogits"] <= 1e-1
