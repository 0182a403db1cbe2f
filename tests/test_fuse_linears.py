"""fuse-linears: one wider quantized linear for the linears that read one input."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from qcompile.api import quantize_graph
from qcompile.capture import capture
from qcompile.graph import get_attr_value
from qcompile.pipeline import parse_pipeline
from qcompile.serialize import load_quantized, save_quantized
from qcompile.testing import tiny_model

DEQUANT = torch.ops.qcompile.dequantize_weight.default
LINEAR = torch.ops.aten.linear.default


@pytest.fixture(scope="module")
def models():
    return {fam: tiny_model(fam).eval() for fam in ("llama", "qwen2")}


def _ids(model, seq=11, seed=0):
    return torch.randint(0, model.config.vocab_size, (1, seq),
                         generator=torch.Generator().manual_seed(seed))


def _logits(gm, ids):
    with torch.no_grad():
        out = gm(ids)
    return out[0] if isinstance(out, (tuple, list)) else out


def _quantized(model, pipeline):
    gm, _ = quantize_graph(capture(model), pipeline, progress=False)
    return gm


def _fuse(gm, text="fuse-linears,cleanup"):
    out, report = quantize_graph(gm, text, progress=False)
    return out, report["passes"][0]


def _count(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize(("fam", "pipeline"), [
    ("llama", "quantize{w=fp4_e2m1/g128/asym},cleanup"),       # W4A16 AFPQ
    ("qwen2", "quantize{w=int4/g32/asym},cleanup"),            # biases on q/k/v
    ("llama", "quantize{w=fp4_e2m1/g64/m2 a=fp8_e4m3/token},cleanup"),  # W4A8: shared act Q/DQ
    ("llama", "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token},cleanup"),
    ("llama", "quantize{w=nvfp4},cleanup"),                    # per-tensor scales -> per row
])
def test_qkv_and_gate_up_fuse_with_the_same_logits(models, fam, pipeline):
    model = models[fam]
    gm = _quantized(model, pipeline)
    ids = _ids(model)
    want = _logits(gm, ids)
    before = _count(gm)
    layers = model.config.num_hidden_layers
    packed = {str(n.args[0].target): get_attr_value(gm, str(n.args[0].target))
              for n in gm.graph.nodes if n.target is DEQUANT}
    fused, entry = _fuse(gm)
    facts = entry["facts"]
    assert entry["modified"] and facts["groups"] == 2 * layers and not facts["skipped"]
    assert facts["linears"] == 5 * layers  # q, k, v and gate, up
    after = _count(fused)
    assert before[LINEAR] - after[LINEAR] == 3 * layers
    assert after[DEQUANT] == before[DEQUANT] - 3 * layers
    assert after[torch.ops.aten.slice.Tensor] - before[torch.ops.aten.slice.Tensor] == 5 * layers
    assert torch.equal(_logits(fused, ids), want)
    # The fused codes are the members' rows in graph order (q, k, v).
    attn = "model.layers.0.self_attn"
    qkv = [n for n in fused.graph.nodes if n.target is DEQUANT
           and str(n.args[0].target).startswith(f"{attn}.q_proj_k_proj_v_proj")]
    assert len(qkv) == 1
    members = [packed[f"{attn}.{p}_proj.qweight"] for p in "qkv"]
    assert torch.equal(get_attr_value(fused, str(qkv[0].args[0].target)), torch.cat(members))
    for name in packed:  # the members' buffers are dropped by cleanup
        if "q_proj" in name or "gate_proj" in name:
            assert not any(str(n.target) == name for n in fused.graph.nodes)


def test_biases_concatenate(models):
    gm = _quantized(models["qwen2"], "quantize{w=fp4_e2m1/g32/asym},cleanup")
    want = torch.cat([get_attr_value(gm, f"model.layers.0.self_attn.{p}_proj.bias")
                      for p in "qkv"])
    fused, entry = _fuse(gm)  # (the pipeline rewrites gm in place)
    lin = next(n for n in fused.graph.nodes
               if n.target is LINEAR and "q_proj_k_proj_v_proj" in n.meta["source_module"])
    assert torch.equal(get_attr_value(fused, str(lin.args[2].target)), want)


def test_lowered_after_fusion_has_one_kernel_per_group(models):
    gm = _quantized(models["llama"], "quantize{w=fp4_e2m1/g64/m2 a=fp8_e4m3/token},cleanup")
    ids = _ids(models["llama"])
    want = _logits(gm, ids)
    fused, _ = _fuse(gm)
    lowered, _ = quantize_graph(fused, "lower-triton", progress=False)
    count = _count(lowered)
    layers = models["llama"].config.num_hidden_layers
    assert count[torch.ops.qcompile.w4a8_linear.default] == 4 * layers
    assert torch.equal(_logits(lowered, ids), want)


def test_formats_that_differ_do_not_group(models):
    gm = _quantized(models["llama"], "quantize{w=int4/g32/asym include=*q_proj},"
                    "quantize{w=fp4_e2m1/g32/asym},cleanup")
    ids = _ids(models["llama"])
    want = _logits(gm, ids)
    fused, entry = _fuse(gm)
    layers = models["llama"].config.num_hidden_layers
    # k+v and gate+up fuse; q (INT4) stays alone.
    assert entry["facts"]["groups"] == 2 * layers and entry["facts"]["linears"] == 4 * layers
    assert torch.equal(_logits(fused, ids), want)


def test_per_tensor_scales_that_differ_are_reported(models):
    gm = _quantized(models["llama"], "quantize{w=int8/tensor},cleanup")
    fused, entry = _fuse(gm)
    assert not entry["modified"] and entry["facts"]["groups"] == 0
    reasons = set(entry["facts"]["skipped"].values())
    assert reasons and all("per-tensor scales that differ" in r for r in reasons)


def test_check_rejects_a_weight_that_changed(models, monkeypatch):
    from qcompile.passes import fuse_linears

    real = fuse_linears._concat

    def corrupt(members):
        tensors, why = real(members)
        tensors[0] = tensors[0].clone()
        tensors[0][0, 0] ^= 0x11  # two codes of the first row
        return tensors, why

    monkeypatch.setattr(fuse_linears, "_concat", corrupt)
    gm = _quantized(models["llama"], "quantize{w=fp4_e2m1/g32/asym},cleanup")
    nodes = len(gm.graph.nodes)
    fused, entry = _fuse(gm, "fuse-linears")
    assert not entry["modified"] and len(fused.graph.nodes) == nodes
    assert all("does not dequantize" in r for r in entry["facts"]["skipped"].values())
    # Without the check the corrupted weight would go in: the check is what stops it.
    fused, entry = _fuse(gm, "fuse-linears{check=false}")
    assert entry["modified"]


def test_nothing_to_fuse(models):
    gm = capture(models["llama"])  # not quantized
    nodes = [n.format_node() for n in gm.graph.nodes]
    out, entry = _fuse(gm, "fuse-linears")
    assert not entry["modified"] and entry["facts"]["groups"] == 0
    assert [n.format_node() for n in out.graph.nodes] == nodes
    once, _ = _fuse(_quantized(models["llama"], "quantize{w=int4/g32},cleanup"))
    _, again = _fuse(once, "fuse-linears")
    assert not again["modified"]


def test_fused_graph_saves_and_loads(models, tmp_path):
    gm = _quantized(models["qwen2"], "quantize{w=fp4_e2m1/g32/asym},cleanup")
    fused, _ = _fuse(gm)
    save_quantized(fused, tmp_path / "art")
    loaded, _, _ = load_quantized(tmp_path / "art", with_tokenizer=False)
    ids = _ids(models["qwen2"], seed=3)
    assert torch.equal(_logits(loaded, ids), _logits(fused, ids))


def test_pipeline_text_round_trips():
    for text in ("fuse-linears", "fuse-linears{check=false}"):
        assert str(parse_pipeline(text)) == text
