"""learn-rotation: the training interpreter matches the quantized graph, folding is exact,
training lowers the quantized loss, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qcompile.backends.reference import compile_reference
from qcompile.capture import capture
from qcompile.data import calibration_batches, load_text
from qcompile.errors import FormatError, PipelineError, PreconditionError, UnsupportedGraphError
from qcompile.formats.spec import parse_format
from qcompile.graph import get_attr_value
from qcompile.hadamard import Rotation, random_orthogonal
from qcompile.manager import PassManager
from qcompile.pass_base import PassContext
from qcompile.passes.quantize import head_linears
from qcompile.pipeline import parse_pipeline
from qcompile.rotation_training import RotatedQuantInterpreter, skew_rotation
from qcompile.stream_rotation import fold_r1, plan_r1
from qcompile.testing import ByteTokenizer, tiny_model

EMB = "model.embed_tokens.weight"
FAST = "steps=30 samples=6 seqlen=64 holdout=3 lr=0.003"
# the held-out windows of FAST: drawn after its 6 training windows (seed 0)
HELD = calibration_batches(ByteTokenizer(), load_text("wikitext2-valid"), 9, 64, 0)[6:]


def _run(gm, text):
    ctx = PassContext(tokenizer=ByteTokenizer(), progress=False)
    return PassManager(text, context=ctx).run(gm)


def _facts(report, index=-1):
    return report["passes"][index]["facts"]


def _windows(n=3, seqlen=32, seed=7):
    return calibration_batches(ByteTokenizer(), load_text("wikitext2-valid"), n, seqlen, seed)


def _loss(fn, windows):
    """Mean next-token loss of a batch-1 callable over the rows of ``windows``."""
    total = 0.0
    with torch.no_grad():
        for ids in windows.split(1):
            logits = fn(ids)
            total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))
    return total / windows.shape[0]


def _kl(fn, ref, windows):
    """Mean KL(ref || fn) of next-token distributions over the rows of ``windows``."""
    total = 0.0
    with torch.no_grad():
        for ids in windows.split(1):
            p, q = F.log_softmax(ref(ids)[0], -1), F.log_softmax(fn(ids)[0], -1)
            total += float(F.kl_div(q, p, reduction="batchmean", log_target=True))
    return total / windows.shape[0]


def _interp(gm, a="fp4_e2m1/token/asym", w=None):
    plan = plan_r1(gm)
    quantized = {n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default}
    quantized -= head_linears(gm)
    return plan, RotatedQuantInterpreter(gm, plan.readers, plan.writers, quantized,
                                         parse_format(a), None if w is None else parse_format(w))


def test_options_round_trip_and_validation():
    text = ("learn-rotation{a=nvfp4 w=int4/g32/asym loss=ce scales=true lr_scales=0.1 steps=5 "
            "lr=0.5 samples=3 seqlen=16 holdout=2}")
    assert str(parse_pipeline(text)) == text
    assert str(parse_pipeline("learn-rotation{steps=100 w=none}")) == "learn-rotation"
    with pytest.raises((PipelineError, FormatError), match="fp5"):
        parse_pipeline("learn-rotation{a=fp5}")
    for bad in ("steps=0", "samples=-1", "lr=0", "holdout=0", "lr_scales=-1", "loss=mse"):
        with pytest.raises(PipelineError, match=bad.split("=")[0]):
            parse_pipeline(f"learn-rotation{{{bad}}}")
    with pytest.raises(PipelineError, match="test"):
        parse_pipeline("learn-rotation{text=wikitext2-test}")


def test_interpreter_matches_the_quantized_graph():
    """With the identity, the interpreter is the graph after quantize{a=..., w=...}."""
    gm, _ = _run(capture(tiny_model("llama")), "fuse-norms,rotate")
    ids = _windows(2)
    # the last case is exact up to an NVFP4 rounding flip or two: quantize's dequantized
    # weights are computed in another order, and E4M3 block scales amplify 1-ulp differences
    for a, w, tol in (("fp4_e2m1/token/asym", None, 1e-5),
                      ("fp4_e2m1/token/asym", "int4/g16/asym", 1e-5),
                      ("nvfp4", None, 1e-5), ("nvfp4", "fp4_e2m1/g32/asym", 3e-3)):
        _, interp = _interp(gm, a=a, w=w)
        got = _loss(interp.run, ids)
        q = f"quantize{{a={a}" + (f" w={w}}}" if w else "}")
        qgm, _ = _run(capture(tiny_model("llama")), f"fuse-norms,rotate,{q}")
        assert got == pytest.approx(_loss(compile_reference(qgm), ids), rel=0, abs=tol)


def test_interpreter_rotation_equals_folding():
    """Loss under R in the interpreter == loss of the graph with R folded in (any R)."""
    gm, _ = _run(capture(tiny_model("qwen2")), "fuse-norms")
    ids = _windows(2)
    plan, interp = _interp(gm)
    n = plan.hidden_of(gm)
    rot = random_orthogonal(n, 5)
    with torch.no_grad():
        rotated = float(interp.loss(rot.float(), ids[:1]))
        plain = float(interp.loss(None, ids[:1]))
    fold_r1(gm, plan, Rotation(n, "random", "test", dense=rot), [])
    _, folded = _interp(gm)
    with torch.no_grad():
        assert float(folded.loss(None, ids[:1])) == pytest.approx(rotated, abs=2e-4)
    assert plain != pytest.approx(rotated, abs=1e-6)  # R matters


def test_interpreter_scales_equal_smoothing_the_norms():
    """Loss under (R, s) in the interpreter == loss after folding R and smoothing the norms."""
    from qcompile.passes.learn_rotation import _scalable_norms
    from qcompile.passes.smooth import smooth_norm

    gm, _ = _run(capture(tiny_model("llama")), "fuse-norms")
    ids = _windows(1)
    plan = plan_r1(gm)
    quantized = {n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default}
    quantized -= head_linears(gm)
    norms = _scalable_norms(gm, quantized)
    assert len(norms) == 4  # two layers x (attention, MLP) norms; the head's norm is not
    groups = {c: i for i, norm in enumerate(norms) for c in norm.consumers}
    interp = RotatedQuantInterpreter(gm, plan.readers, plan.writers, quantized,
                                     parse_format("fp4_e2m1/token/asym"), None, groups)
    n = plan.hidden_of(gm)
    rot = random_orthogonal(n, 2)
    log_s = 0.3 * torch.randn(len(norms), n, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = float(interp.loss(rot.float(), ids, log_scales=log_s))
        assert float(interp.loss(rot.float(), ids)) != pytest.approx(expect, abs=1e-6)
    fold_r1(gm, plan, Rotation(n, "random", "test", dense=rot), [])
    for norm, row in zip(norms, log_s.double().exp(), strict=True):
        smooth_norm(gm, norm, row)
    _, folded = _interp(gm)
    with torch.no_grad():
        assert float(folded.loss(None, ids)) == pytest.approx(expect, abs=2e-4)


def test_skew_rotation_is_orthogonal_and_differentiable():
    gen = torch.randn(24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gen.requires_grad_(True)
    r = skew_rotation(gen)
    torch.testing.assert_close(r @ r.T, torch.eye(24, dtype=torch.float64), atol=1e-12, rtol=0)
    r.sum().backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    torch.testing.assert_close(skew_rotation(torch.zeros(5, 5)), torch.eye(5))


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen2", "mistral"])
def test_learned_rotation_keeps_the_function_and_lowers_the_quantized_loss(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    gm, _ = _run(capture(model), "fuse-norms,rotate")
    with torch.no_grad():
        ref = gm(ids)
    emb = get_attr_value(gm, EMB).detach().clone()
    gm, report = _run(gm, f"learn-rotation{{{FAST}}}")
    facts = _facts(report)
    assert report["passes"][-1]["modified"] and facts["kept"] == "learned"
    assert facts["heldout_loss_after"] < facts["heldout_loss_before"]
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), ref, rtol=1e-4, atol=1e-4)
    new = get_attr_value(gm, EMB)
    assert not torch.allclose(new, emb, atol=1e-3)  # rotated ...
    torch.testing.assert_close(new @ new.T, emb @ emb.T, rtol=1e-4, atol=1e-4)  # ... orthogonally
    assert gm.meta["qcompile.rotate"]["r1_learned"]["method"] == "learned"
    # the gain is real for the quantized model, not only the interpreter's bookkeeping: the
    # graph quantized by quantize{} scores the pass's held-out windows as the pass reported
    q = "quantize{a=fp4_e2m1/token/asym},cleanup"
    base, _ = _run(capture(tiny_model(family)), f"fuse-norms,rotate,{q}")
    learned, _ = _run(gm, q)
    fp = capture(tiny_model(family))
    after, before = _kl(compile_reference(learned), fp, HELD), _kl(compile_reference(base), fp, HELD)
    assert after == pytest.approx(facts["heldout_loss_after"], abs=2e-5)
    assert before == pytest.approx(facts["heldout_loss_before"], abs=2e-5)
    assert after < before


def test_learned_scales_are_smoothed_into_the_norms():
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    gm, _ = _run(capture(tiny_model("llama")), "fuse-norms,rotate")
    with torch.no_grad():
        ref = gm(ids)
    gm, report = _run(gm, f"learn-rotation{{{FAST} scales=true}}")
    facts = _facts(report)
    assert facts["kept"] == "learned" and facts["scales"]["norms"] == 4
    assert facts["scales"]["min"] < 0.95 and facts["scales"]["max"] > 1.0
    gamma = get_attr_value(gm, "model.layers.0.input_layernorm.weight")
    assert not torch.allclose(gamma, torch.ones_like(gamma))
    assert "model.layers.0.input_layernorm" in gm.meta["qcompile.fuse_norms"]["smoothed"]
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), ref, rtol=1e-4, atol=1e-4)
    q = "quantize{a=fp4_e2m1/token/asym},cleanup"
    learned, _ = _run(gm, q)
    after = _kl(compile_reference(learned), capture(tiny_model("llama")), HELD)
    assert after == pytest.approx(facts["heldout_loss_after"], abs=2e-5)
    assert after < facts["heldout_loss_before"]


def test_same_options_give_the_same_bits():
    outs = []
    for _ in range(2):
        gm, _ = _run(capture(tiny_model("llama")), f"fuse-norms,rotate,learn-rotation{{{FAST}}}")
        outs.append(get_attr_value(gm, "model.layers.0.self_attn.q_proj.weight").clone())
    assert torch.equal(outs[0], outs[1])


def test_weights_in_the_loop_and_nvfp4_activations():
    gm, report = _run(capture(tiny_model("llama")),
                      f"fuse-norms,rotate,learn-rotation{{{FAST} a=nvfp4 w=fp4_e2m1/g32/asym}}")
    facts = _facts(report)
    assert facts["a"] == "nvfp4" and facts["w"] == "fp4_e2m1/g32/asym"
    q = "quantize{a=nvfp4 w=fp4_e2m1/g32/asym},cleanup"
    base, _ = _run(capture(tiny_model("llama")), f"fuse-norms,rotate,{q}")
    before = _kl(compile_reference(base), capture(tiny_model("llama")), HELD)
    assert before == pytest.approx(facts["heldout_loss_before"], abs=2e-5)
    if report["passes"][-1]["modified"]:
        assert facts["heldout_loss_after"] < before


def test_a_rotation_that_does_not_help_is_not_kept():
    gm = capture(tiny_model("llama"))
    gm, _ = _run(gm, "fuse-norms,rotate")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    gm, report = _run(gm, "learn-rotation{steps=2 samples=2 seqlen=32 holdout=3 lr=50}")
    assert not report["passes"][-1]["modified"]
    assert _facts(report)["kept"].startswith("identity")
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_requires_weightless_norms_and_unquantized_weights():
    with pytest.raises(PreconditionError, match="fuse-norms"):
        _run(capture(tiny_model("llama")), f"learn-rotation{{{FAST}}}")
    gm, _ = _run(capture(tiny_model("llama")), "fuse-norms,quantize{w=int4/g32}")
    with pytest.raises(UnsupportedGraphError, match="before quantize"):
        _run(gm, f"learn-rotation{{{FAST}}}")
    with pytest.raises(PreconditionError, match="tokenizer"):
        PassManager("fuse-norms,learn-rotation").run(capture(tiny_model("llama")))


@pytest.mark.slow
def test_smollm2_learned_rotation_keeps_the_function(smollm2, smollm2_graph):
    """Real weights: a few steps move R1 away from the identity, the fp32 logits stay put and
    the learned rotation lowers the held-out NVFP4 loss it reports."""
    _, tok = smollm2
    gm = smollm2_graph
    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(3))
    gm, _ = PassManager("fuse-norms,rotate{ro=hadamard}").run(gm)
    with torch.no_grad():
        ref = gm(ids)
    ctx = PassContext(tokenizer=tok, progress=False)
    gm, report = PassManager("learn-rotation{a=nvfp4 steps=4 lr=0.005 samples=4 seqlen=128 "
                             "holdout=2}", context=ctx).run(gm)
    facts = _facts(report)
    assert facts["kept"] == "learned" and facts["r1"]["readers"] == 151  # 30 x 5 + head
    assert facts["heldout_loss_after"] < facts["heldout_loss_before"]
    with torch.no_grad():
        out = gm(ids)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
