"""calibrate (activation statistics) and static activation quantization built on it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile)
from qcompile.capture import capture
from qcompile.data import calibration_batches, load_text
from qcompile.errors import FormatError, PipelineError, PreconditionError
from qcompile.formats import fake_quantize, parse_format
from qcompile.graph import get_attr_value
from qcompile.manager import PassManager
from qcompile.pass_base import PassContext
from qcompile.passes.calibrate import CALIBRATION_KEY, drop_stats, rescale_input
from qcompile.pipeline import parse_pipeline
from qcompile.serialize import load_quantized, save_quantized
from qcompile.testing import ByteTokenizer, tiny_model

STATIC = torch.ops.qcompile.quantize_activation_static.default
_BASE: dict[str, tuple[nn.Module, fx.GraphModule]] = {}


def _fresh(family: str) -> tuple[nn.Module, fx.GraphModule]:
    if family not in _BASE:
        model = tiny_model(family)
        _BASE[family] = (model, capture(model))
    model, gm = _BASE[family]
    return model, copy.deepcopy(gm)


def _ctx() -> PassContext:
    return PassContext(tokenizer=ByteTokenizer(), progress=False)


def _run(gm: fx.GraphModule, text: str) -> tuple[fx.GraphModule, dict]:
    return PassManager(text, context=_ctx()).run(gm)


def _eager_inputs(model: nn.Module, samples: int, seqlen: int, seed: int = 0) -> dict:
    """Every nn.Linear's inputs (flattened to [tokens, in]) over the calibration windows."""
    batches = calibration_batches(ByteTokenizer(), load_text("wikitext2-valid"), samples,
                                  seqlen, seed)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.setdefault(name, []).append(
            args[0].detach().reshape(-1, args[0].shape[-1])))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            for row in batches:
                model(input_ids=row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma2"])
def test_absmax_equals_hooked_eager_reference(family):
    model, gm = _fresh(family)
    gm, report = _run(gm, "calibrate{samples=3 seqlen=48 seed=5}")
    record = gm.meta[CALIBRATION_KEY]
    assert report["passes"][0]["modified"] is False
    assert (record["samples"], record["seqlen"], record["seed"]) == (3, 48, 5)
    ref = _eager_inputs(model, 3, 48, seed=5)
    assert set(record["linears"]) == set(ref)
    for name, x in ref.items():
        entry = record["linears"][name]
        assert torch.equal(entry["absmax"], x.abs().amax(0)), name
        assert entry["tensor_absmax"] == float(x.abs().max())
        assert entry["tokens"] == 3 * 48 and "hessian" not in entry
    assert report["passes"][0]["facts"]["linears_observed"] == len(ref)


def test_hessian_equals_two_over_n_xtx():
    model, gm = _fresh("llama")
    gm, _ = _run(gm, "calibrate{samples=2 seqlen=40 hessian=true}")
    ref = _eager_inputs(model, 2, 40)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        x = ref[name].double()
        want = 2.0 / x.shape[0] * x.T @ x
        got = gm.meta[CALIBRATION_KEY]["linears"][name]["hessian"]
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_deterministic_and_seed_dependent():
    _, g1 = _fresh("llama")
    _, g2 = _fresh("llama")
    _, g3 = _fresh("llama")
    a = _run(g1, "calibrate{samples=2 seqlen=32}")[0].meta[CALIBRATION_KEY]["linears"]
    b = _run(g2, "calibrate{samples=2 seqlen=32}")[0].meta[CALIBRATION_KEY]["linears"]
    c = _run(g3, "calibrate{samples=2 seqlen=32 seed=1}")[0].meta[CALIBRATION_KEY]["linears"]
    assert all(torch.equal(a[k]["absmax"], b[k]["absmax"]) for k in a)
    assert any(not torch.equal(a[k]["absmax"], c[k]["absmax"]) for k in a)


@pytest.mark.parametrize("text", ["wikitext2", "wikitext2-test", "WikiText2-Test"])
def test_refuses_test_text(text):
    with pytest.raises(PipelineError, match="test"):
        parse_pipeline(f"calibrate{{text={text}}}")


def test_needs_a_tokenizer_and_a_valid_seqlen():
    _, gm = _fresh("llama")
    with pytest.raises(PreconditionError, match="tokenizer"):
        PassManager("calibrate").run(gm)
    with pytest.raises(PreconditionError, match="sequence range"):
        _run(gm, "calibrate{seqlen=5000}")


def test_rescale_and_drop_keep_entries_true():
    _, gm = _fresh("llama")
    gm, _ = _run(gm, "calibrate{samples=1 seqlen=16 hessian=true}")
    name = "model.layers.0.mlp.gate_proj"
    entry = gm.meta[CALIBRATION_KEY]["linears"][name]
    absmax, hess = entry["absmax"].clone(), entry["hessian"].clone()
    s = torch.linspace(0.5, 2.0, absmax.numel())
    assert rescale_input(gm, name, -s)  # the sign of s does not matter for |x|
    torch.testing.assert_close(entry["absmax"], absmax / s)
    torch.testing.assert_close(entry["hessian"], hess / torch.outer(s, s))
    assert entry["tensor_absmax"] == float(entry["absmax"].max())
    with pytest.raises(ValueError, match="zero"):
        rescale_input(gm, name, torch.zeros_like(s))
    assert drop_stats(gm, [name, "nope"]) == [name]
    assert not rescale_input(gm, name, s)


# ----------------------------------------------------------------- static activation quant


@pytest.mark.parametrize("fmt", ["int8/tensor", "fp8_e4m3/tensor", "int4/tensor"])
def test_static_op_reference_and_opcheck(fmt):
    spec = parse_format(fmt)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(3))
    scale = (x.abs().max() / spec.element.max).reshape(())
    out = torch.ops.qcompile.quantize_activation_static(x, scale, fmt)
    torch.testing.assert_close(out, fake_quantize(x, spec), rtol=0, atol=0)
    small = torch.ops.qcompile.quantize_activation_static(x, scale / 4, fmt)
    assert float(small.max()) == pytest.approx(float(scale / 4 * spec.element.max))  # saturates
    torch.library.opcheck(STATIC, (x, scale, fmt))
    half = torch.ops.qcompile.quantize_activation_static(x.bfloat16(), scale, fmt)
    assert half.dtype == torch.bfloat16


def test_static_op_refuses_non_tensor_formats():
    with pytest.raises(FormatError, match="per-tensor"):
        torch.ops.qcompile.quantize_activation_static(torch.ones(2, 4), torch.tensor(1.0),
                                                      "int8/token")


@pytest.mark.parametrize("text", ["quantize{w=int8/channel a=int8/token static=true}",
                                  "quantize{w=int8/channel static=true}"])
def test_static_option_needs_a_per_tensor_format(text):
    with pytest.raises(FormatError, match="static=true"):
        parse_pipeline(text)


def test_static_needs_calibration():
    _, gm = _fresh("llama")
    with pytest.raises(PreconditionError, match="calibrate"):
        _run(gm, "quantize{w=int8/channel a=int8/tensor static=true}")


def test_static_quantization_equals_eager_reference():
    model, gm = _fresh("qwen2")
    text = "calibrate{samples=2 seqlen=32},quantize{w=int8/channel a=int8/tensor static=true}"
    gm, report = _run(gm, text)
    stats = gm.meta[CALIBRATION_KEY]["linears"]
    nodes = gm.graph.find_nodes(op="call_function", target=STATIC)
    assert len(nodes) == report["passes"][1]["facts"]["act_quant_nodes"] == 8  # q/k/v shared
    scale = get_attr_value(gm, "model.layers.0.self_attn.q_proj.input_scale")
    assert float(scale) == pytest.approx(
        stats["model.layers.0.self_attn.q_proj"]["tensor_absmax"] / 127, rel=1e-6)

    ref = copy.deepcopy(model)
    w_spec = parse_format("int8/channel")
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            mod.weight = nn.Parameter(fake_quantize(mod.weight.detach(), w_spec))
            s = torch.tensor(stats[name]["tensor_absmax"] / 127, dtype=torch.float32)
            mod.register_forward_pre_hook(
                lambda m, args, s=s: (torch.ops.qcompile.quantize_activation_static(
                    args[0], s, "int8/tensor"),))
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), ref(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)


def test_static_graph_survives_save_and_load(tmp_path):
    _, gm = _fresh("llama")
    gm, _ = _run(gm, "calibrate{samples=1 seqlen=16},quantize{w=int8/channel a=int8/tensor "
                     "static=true},cleanup")
    save_quantized(gm, tmp_path / "art")
    loaded, _, _ = load_quantized(tmp_path / "art")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), gm(ids), rtol=0, atol=0)
