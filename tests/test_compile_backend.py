"""The ``qcompile`` torch.compile backend against the offline pipeline and reference backend.

Tolerances: the backend quantizes with the same pass on the same weights, so packed codes are
identical to the offline pipeline's. With ``inductor=False`` the graph runs the same ATen ops
eagerly (logits within 1e-5); Inductor fuses and reorders float32 arithmetic, so its logits
are compared with ``atol=rtol=1e-4``, far below the quantization error (about 1 logit here).
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import qcompile
from qcompile.api import quantize_graph
from qcompile.backends.inductor import BackendOptionError, backend_for, qcompile_backend
from qcompile.backends.inductor.plan import weight_fqn
from qcompile.backends.reference import compile_reference
from qcompile.capture import capture
from qcompile.errors import ArtifactError, PipelineError, QCompileError, UnsupportedGraphError
from qcompile.graph import get_attr_value
from qcompile.recipes import get_recipe
from qcompile.serialize import save_quantized
from qcompile.testing import tiny_model

W4 = "quantize{w=fp4_e2m1/g32/asym},cleanup"
DEQ = torch.ops.qcompile.dequantize_weight.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, seq), generator=torch.Generator().manual_seed(seed))


def _reference(model: torch.nn.Module, pipeline: str):
    gm, _report = quantize_graph(capture(model), pipeline, progress=False)
    return gm, compile_reference(gm)


def _dequantized_eager(gm: torch.fx.GraphModule, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny llama whose linear weights are the dequantized weights of ``gm``."""
    model = tiny_model("llama", seed=seed)
    params = dict(model.named_parameters())
    replaced = 0
    for node in gm.graph.nodes:
        if node.target is DEQ:
            args = [get_attr_value(gm, a.target) if isinstance(a, torch.fx.Node) else a
                    for a in node.args]
            with torch.no_grad():
                params[weight_fqn(str(node.args[0].target))].copy_(DEQ(*args))
            replaced += 1
    assert replaced == 14
    return model


def _cause(exc: BaseException, kind: type) -> BaseException:
    """The first exception of ``kind`` in ``exc``'s cause chain (dynamo wraps backend errors)."""
    seen = exc
    while seen is not None and not isinstance(seen, kind):
        seen = getattr(seen, "inner_exception", None) or seen.__cause__
    assert seen is not None, f"no {kind.__name__} in the cause chain of {exc!r}"
    return seen


def _stats(model: torch.nn.Module):
    return model.qcompile_backend.stats


# ------------------------------------------------------------------------- registration


def test_entry_point_resolves_to_the_backend():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    (ep,) = [e for e in eps if e.name == "qcompile"]
    assert ep.load() is qcompile_backend
    assert "qcompile" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("qcompile") is qcompile_backend
    assert qcompile.compile is qcompile.backends.inductor.compile


# ------------------------------------------------------------------------- numerics


def test_torch_compile_recipe_matches_reference_backend_with_inductor():
    model = tiny_model("llama")
    ids = _ids()
    _gm, ref = _reference(model, get_recipe("w4-afpq").pipeline)
    with torch.no_grad():
        fp = model(ids).logits
    stats = backend_for({"recipe": "w4-afpq"}).stats  # shared by every w4-afpq compile
    runs, quantized = stats.pipeline_runs, stats.weights_quantized
    compiled = torch.compile(model, backend="qcompile", options={"recipe": "w4-afpq"})
    with torch.no_grad():
        out = compiled(ids).logits
        compiled(ids)
    expected = ref(ids)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert (out - fp).abs().max() > 0.05  # quantization changed the function
    assert stats.pipeline_runs == runs + 1
    assert stats.weights_quantized == quantized + 14


def test_generate_dynamic_matches_dequantized_eager_with_inductor():
    model = tiny_model("llama")
    gm, _ = _reference(model, W4)
    eager = _dequantized_eager(gm)
    ids = _ids(6, seed=1)
    qcompile.compile(model, pipeline=W4, dynamic=True)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
        want = eager.generate(ids, max_new_tokens=8, do_sample=False)
    assert got.shape == (1, 14)
    assert torch.equal(got, want)
    stats = _stats(model)
    assert stats.pipeline_runs == 1
    assert stats.weights_quantized == 14 and set(stats.per_weight.values()) == {1}
    assert stats.graph_breaks == 0


def test_fp8_dynamic_matches_reference():
    model = tiny_model("llama")
    ids = _ids(9)
    _gm, ref = _reference(model, get_recipe("fp8-dynamic").pipeline)
    qcompile.compile(model, recipe="fp8-dynamic", inductor=False)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref(ids), atol=1e-5, rtol=1e-5)
    assert _stats(model).weights_quantized == 14


@pytest.mark.parametrize("recipe, kind, fuse, acc", [("w4-afpq", "w4a16", True, False),
                                                     ("w4-afpq", "w4a16", False, False),
                                                     ("fp8-dynamic", "fp8", True, False),
                                                     ("fp8-dynamic", "fp8", True, True),
                                                     ("w8a16-int8", "w8a16", True, False)])
def test_lower_always_puts_the_fused_kernel_ops_in_the_compiled_graph(recipe, kind, fuse, acc):
    """``lower=always`` runs ``lower-triton`` on CPU graphs too (CUDA graphs get it with the
    default ``auto``): the fused ops' CPU references keep the reference backend's logits.
    With ``fuse_linears`` (default) q/k/v and gate/up are one kernel each: 8 of 14.
    ``fp32_accumulate`` reaches the lowering's options."""
    model = tiny_model("llama")
    ids = _ids(9)
    _gm, ref = _reference(model, get_recipe(recipe).pipeline)
    qcompile.compile(model, recipe=recipe, lower="always", fuse_linears=fuse,
                     fp32_accumulate=acc)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref(ids), atol=1e-4, rtol=1e-4)
    lowered = [r for r in _stats(model).reports
               if r["passes"] and r["passes"][0]["name"] == "lower-triton"]
    assert lowered and lowered[0]["passes"][0]["facts"][kind] == (8 if fuse else 14)
    assert lowered[0]["passes"][0]["options"]["fp32_accumulate"] is acc
    assert _stats(model).linears_fused == (10 if fuse else 0)


def test_quantizes_once_across_calls_recompiles_and_reset():
    model = tiny_model("llama")
    _gm, ref = _reference(model, W4)
    qcompile.compile(model, pipeline=W4, dynamic=False, inductor=False)
    with torch.no_grad():
        for seq in (5, 5, 9, 12):  # 5 twice: one graph; 9 and 12: recompiles
            torch.testing.assert_close(model(_ids(seq)).logits, ref(_ids(seq)),
                                       atol=1e-5, rtol=1e-5)
        torch._dynamo.reset()  # compiled code gone; quantized weights stay cached
        model(_ids(5))
    stats = _stats(model)
    assert stats.graphs >= 4
    assert stats.pipeline_runs == 1
    assert stats.weights_quantized == 14 and set(stats.per_weight.values()) == {1}
    assert stats.weights_replayed == 14 * (stats.graphs - 1)


class _TwoStage(torch.nn.Module):
    """Two linears with a graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = torch.nn.Linear(64, 96, bias=False)
        self.b = torch.nn.Linear(96, 32, bias=True)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(y)


def test_graph_break_quantizes_each_weight_once_and_is_reported():
    pipeline = "quantize{w=int8/channel lm_head=true},cleanup"
    model = _TwoStage()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp = model(x)
    from qcompile.formats import dequantize, parse_format, quantize

    spec = parse_format("int8/channel")
    wa, wb = (dequantize(quantize(m.weight.detach(), spec)) for m in (model.a, model.b))
    expected = torch.relu(x @ wa.T) @ wb.T + model.b.bias.detach()
    qcompile.compile(model, pipeline=pipeline, inductor=False)
    with torch.no_grad():
        out = model(x)
        model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, fp)
    stats = _stats(model)
    assert stats.graphs == 2 and stats.pipeline_runs == 2  # each piece reads a new weight
    assert stats.per_weight == {"a.weight": 1, "b.weight": 1}
    assert stats.graph_breaks >= 1 and stats.break_reasons


def test_free_weights_releases_quantized_fp_weights():
    model = tiny_model("llama")
    _gm, ref = _reference(model, W4)
    ids = _ids()
    expected = ref(ids)
    linear_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if p.dim() == 2 and "layers" in n)
    qcompile.compile(model, pipeline=W4, free_weights=True, inductor=False)
    with torch.no_grad():
        out = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, again)
    stats = _stats(model)
    assert stats.freed_bytes == stats.fp_weight_bytes == linear_bytes
    assert stats.quantized_bytes < linear_bytes / 4
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().nbytes() == 0
    assert model.lm_head.weight.untyped_storage().nbytes() > 0  # head is not quantized


def test_lifted_graph_has_the_capture_form():
    """The graph the passes see: same weights as get_attr FQNs, same aten.linear count."""
    from qcompile.backends.inductor.lift import lift_graph
    from qcompile.graph import linear_nodes

    model = tiny_model("llama")
    captured = capture(model)
    seen = []

    def spy(gm, example_inputs):
        lifted = lift_graph(gm, example_inputs)
        seen.append(lifted)
        return lambda *args: lifted.gm(*[args[i] for i in lifted.runtime_index])

    with torch.no_grad():
        out = torch.compile(model, backend=spy)(_ids()).logits
        expected = model(_ids()).logits
    (lifted,) = seen
    gm = lifted.gm
    assert [n.args[1].target for n in linear_nodes(gm)] == [
        n.args[1].target for n in linear_nodes(captured)]
    params = dict(model.named_parameters())
    attrs = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    assert set(params) <= attrs
    for name in params:
        assert lifted.state[name] is params[name]  # bound to the model's tensor, no copy
    assert len(list(gm.graph.find_nodes(op="placeholder"))) == len(lifted.runtime_index) >= 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_single_row_linears_become_multiply_reduce():
    from qcompile.backends.inductor.gemv import rewrite_single_row_linears

    model = tiny_model("llama")
    gm, _ = quantize_graph(capture(model, example_seq=1, dynamic_seq=False), W4, progress=False)
    ids = _ids(1)
    with torch.no_grad():
        before = gm(ids)
    assert rewrite_single_row_linears(gm) == 14
    assert not any(n.target is torch.ops.aten.linear.default and n.args[1].target is DEQ
                   for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), before, atol=1e-5, rtol=1e-5)
    multi, _ = quantize_graph(capture(model), W4, progress=False)  # symbolic rows: untouched
    assert rewrite_single_row_linears(multi) == 0


def test_decode_step_graph_with_inductor_matches_reference():
    model = tiny_model("llama")
    _gm, ref = _reference(model, W4)
    qcompile.compile(model, pipeline=W4, dynamic=False)
    with torch.no_grad():
        out = model(_ids(1), use_cache=False).logits  # one row: the multiply-reduce path
    torch.testing.assert_close(out, ref(_ids(1)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gemma3"])
def test_other_families_match_reference(family):
    model = tiny_model(family)
    ids = _ids(10)
    _gm, ref = _reference(model, W4)
    qcompile.compile(model, pipeline=W4, inductor=False)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref(ids), atol=1e-5, rtol=1e-5)
    assert _stats(model).pipeline_runs == 1


def test_tied_head_is_quantized_but_embedding_keeps_its_weight():
    pipeline = "quantize{w=int8/channel lm_head=true},cleanup"
    model = tiny_model("llama-tied")
    ids = _ids()
    _gm, ref = _reference(model, pipeline)
    expected = ref(ids)
    qcompile.compile(model, pipeline=pipeline, free_weights=True, inductor=False)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    stats = _stats(model)
    assert stats.weights_quantized == 15  # 14 layer linears and the tied head
    assert model.model.embed_tokens.weight.untyped_storage().nbytes() > 0  # still read


def test_generate_static_cache_fullgraph_matches_dequantized_eager():
    model = tiny_model("llama")
    gm, _ = _reference(model, W4)
    eager = _dequantized_eager(gm)
    ids = _ids(6, seed=2)
    qcompile.compile(model, pipeline=W4, fullgraph=True, inductor=False)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static"}
    with torch.no_grad():
        got = model.generate(ids, **kwargs)
        want = eager.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert _stats(model).pipeline_runs == 1 and _stats(model).graph_breaks == 0


# ------------------------------------------------------------------------- artifacts


def test_artifact_matches_reference(tmp_path):
    model = tiny_model("llama")
    gm, ref = _reference(model, get_recipe("w4a8-fp4-fp8").pipeline)
    save_quantized(gm, tmp_path / "art", metadata={"pipeline": get_recipe("w4a8-fp4-fp8")
                                                   .pipeline})
    ids = _ids()
    expected = ref(ids)
    qcompile.compile(model, artifact=tmp_path / "art", free_weights=True, inductor=False)
    with torch.no_grad():
        out = model(ids).logits
        again = model(_ids(11)).logits  # a recompile replays the same tensors
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ref(_ids(11)), atol=1e-5, rtol=1e-5)
    stats = _stats(model)
    assert stats.pipeline_runs == 0 and stats.weights_quantized == 0
    assert stats.weights_replayed == 14 * stats.graphs
    assert stats.freed_bytes == stats.fp_weight_bytes > 4 * stats.quantized_bytes > 0


def test_calibrated_smoothquant_artifact_matches_reference(tmp_path):
    """A recipe that needs calibration: smoothed norm weights and static scales replay."""
    from qcompile.testing import ByteTokenizer

    pipeline = ("calibrate{samples=2 seqlen=32},smooth,"
                "quantize{w=int8/channel a=int8/tensor static=true},cleanup")
    model = tiny_model("llama")
    gm, _ = quantize_graph(capture(model), pipeline, tokenizer=ByteTokenizer(), progress=False)
    save_quantized(gm, tmp_path / "sq", metadata={"pipeline": pipeline})
    ids = _ids()
    expected = compile_reference(gm)(ids)
    qcompile.compile(model, artifact=tmp_path / "sq", inductor=False)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert _stats(model).weights_replayed == 14


def test_artifact_of_another_model_is_refused(tmp_path):
    other, _ = _reference(tiny_model("qwen2"), W4)
    save_quantized(other, tmp_path / "qwen2")
    with pytest.raises(ArtifactError, match=r"model\.embed_tokens\.weight has shape"):
        qcompile.compile(tiny_model("llama"), artifact=tmp_path / "qwen2")
    same_shape, _ = _reference(tiny_model("llama", seed=1), W4)
    save_quantized(same_shape, tmp_path / "seed1", metadata={"pipeline": W4})
    with pytest.raises(ArtifactError, match="made from another model"):
        qcompile.compile(tiny_model("llama"), artifact=tmp_path / "seed1")
    folded_pipeline = "fuse-norms,quantize{w=int8/channel},cleanup"
    folded, _ = _reference(tiny_model("llama"), folded_pipeline)
    save_quantized(folded, tmp_path / "folded", metadata={"pipeline": folded_pipeline})
    with pytest.raises(ArtifactError, match="made with fuse-norms"):
        qcompile.compile(tiny_model("llama"), artifact=tmp_path / "folded")
    # through torch.compile the check runs when dynamo hands over the graph
    compiled = torch.compile(tiny_model("llama"), backend="qcompile",
                             options={"artifact": str(tmp_path / "qwen2"), "inductor": False})
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(_ids())
    assert "model.embed_tokens.weight" in str(_cause(info.value, ArtifactError))


# ------------------------------------------------------------------------- errors


def test_bad_options_raise_clear_errors(tmp_path):
    with pytest.raises(BackendOptionError, match=r"'bogus'.*valid options: recipe"):
        backend_for({"recipe": "w4-afpq", "bogus": 1})
    with pytest.raises(PipelineError, match="unknown recipe 'w5'; known recipes: w4-fp4"):
        backend_for({"recipe": "w5"})
    with pytest.raises(BackendOptionError, match="exactly one of"):
        backend_for({"recipe": "w4-afpq", "pipeline": W4})
    with pytest.raises(BackendOptionError, match="exactly one of"):
        backend_for({})
    with pytest.raises(BackendOptionError, match="'free_weights' must be bool"):
        backend_for({"recipe": "w4-afpq", "free_weights": "yes"})
    with pytest.raises(BackendOptionError, match="not a qcompile artifact"):
        backend_for({"artifact": str(tmp_path)})
    with pytest.raises(PipelineError, match="rotate need the whole model"):
        backend_for({"pipeline": "rotate,quantize{w=int4/g32}"})
    with pytest.raises(PipelineError, match="unknown pass 'quantise'"):
        qcompile.compile(tiny_model("llama"), pipeline="quantise{w=int4}")
    compiled = torch.compile(tiny_model("llama"), backend="qcompile",
                             options={"recipe": "w4-afpq", "colour": "red"})
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(_ids())
    assert "'colour'" in str(_cause(info.value, BackendOptionError))


def test_untransformable_graph_names_the_node():
    model = tiny_model("llama")
    qcompile.compile(model, pipeline="quantize{w=int8/channel kv=int8/token}", inductor=False)
    with pytest.raises(Exception) as info, torch.no_grad():
        model(_ids())
    err = _cause(info.value, QCompileError)
    assert isinstance(err, UnsupportedGraphError)
    assert "node " in str(err)


# ------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_w4_afpq_compiled_matches_reference(smollm2):
    """SmolLM2-135M, w4-afpq: Inductor logits vs the reference backend on 16 tokens.

    Tolerance ``atol=2e-3`` (logits reach about 30; 30 layers of reordered float32 sums).
    ``torch.compile`` wraps the model, so the shared session model itself stays uncompiled.
    """
    model, tok = smollm2
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog, and then")])
    _gm, ref = _reference(model, get_recipe("w4-afpq").pipeline)
    expected = ref(ids)
    stats = backend_for({"recipe": "w4-afpq"}).stats
    quantized = stats.weights_quantized
    compiled = torch.compile(model, backend="qcompile", options={"recipe": "w4-afpq"})
    with torch.no_grad():
        out = compiled(ids).logits
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=1e-3)
    assert torch.equal(out.argmax(-1), expected.argmax(-1))
    assert stats.weights_quantized == quantized + 30 * 7  # every layer linear, once


def test_fused_weights_are_held_once_across_graphs(monkeypatch):
    """Each graph fuses q/k/v and gate/up; the cached per-weight tensors become row views of
    the first graph's fused tensors, and later graphs view them instead of copying."""
    from qcompile.passes import fuse_linears

    real = fuse_linears._cat_rows
    views: list[bool] = []

    def spy(parts):
        out = real(parts)
        views.append(out.untyped_storage().data_ptr() == parts[0].untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(fuse_linears, "_cat_rows", spy)
    model = tiny_model("llama")
    _gm, ref = _reference(model, W4)
    qcompile.compile(model, pipeline=W4, dynamic=False)
    with torch.no_grad():
        for seq in (5, 9):  # two graphs
            torch.testing.assert_close(model(_ids(seq)).logits, ref(_ids(seq)),
                                       atol=1e-4, rtol=1e-4)
    stats = _stats(model)
    assert stats.graphs == 2 and stats.linears_fused == 20
    per_graph = len(views) // 2
    assert per_graph and not any(views[:per_graph]) and all(views[per_graph:])
    plans = model.qcompile_backend._plans
    storages = {}
    for lp in plans.values():
        for t in lp.weight.tensors:
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert sum(storages.values()) == stats.quantized_bytes  # nothing held twice


@pytest.mark.parametrize("fusion", [True, False])
def test_decode_graphs_fold_norms_gates_and_residuals_into_the_linears(fusion):
    """A one-token call compiles a one-row graph: with ``decode_fusion`` (default) its lowered
    W4A16 linears absorb both layers' RMSNorms, SiLU gates and residual adds (on the CPU the
    fused ops compose the same ops, so the logits keep the reference backend's values);
    ``decode_fusion=False`` reaches the lowering and leaves them."""
    model = tiny_model("llama")
    ids = _ids(1)
    _gm, ref = _reference(model, get_recipe("w4-afpq").pipeline)
    qcompile.compile(model, recipe="w4-afpq", lower="always", dynamic=False,
                     decode_fusion=fusion)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref(ids), atol=1e-4, rtol=1e-4)
    facts = [r["passes"][0]["facts"] for r in _stats(model).reports
             if r["passes"] and r["passes"][0]["name"] == "lower-triton"][0]
    if fusion:
        assert (facts["gemv_rmsnorm"], facts["gemv_silu_gate"], facts["gemv_residual"]) == (4, 2, 4)
    else:
        assert "gemv_residual" not in facts and facts["w4a16"] == 8
