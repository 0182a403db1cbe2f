"""ONNX export: every format family on tiny random models, ORT and onnx.reference vs the
reference backend, dynamic batch, ragged groups, opsets, domains and errors.

Tolerance: with fp32 compute on both sides (``accuracy_level=0`` for INT4) ORT and
``onnx.reference`` logits equal the reference backend's to ``ATOL = 1e-4`` (logits have a
standard deviation of about 1; observed differences are below 4e-6: float summation order
only). MatMulNBits at ``accuracy_level=4`` quantizes activations to int8 inside the kernel
and is checked against a looser bound.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")

from qcompile.api import quantize_graph  # noqa: E402
from qcompile.backends.onnx import OnnxLM, build_model, export_onnx  # noqa: E402
from qcompile.backends.onnx.reference_ops import reference_evaluator  # noqa: E402
from qcompile.backends.reference import compile_reference  # noqa: E402
from qcompile.capture import capture  # noqa: E402
from qcompile.errors import FormatError, UnsupportedGraphError  # noqa: E402
from qcompile.recipes import get_recipe  # noqa: E402
from qcompile.testing import ByteTokenizer, tiny_model  # noqa: E402

ATOL = 1e-4
ALLOWED_DOMAINS = {"", "qcompile", "com.microsoft"}

# name -> (family, pipeline, export options, expected lowering marker)
CASES = {
    "int8-w8a8": ("llama", "quantize{w=int8/channel a=int8/token},cleanup", {},
                  "DequantizeLinear"),
    "fp8-w8a8": ("llama", "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token},cleanup", {},
                 "DequantizeLinear"),
    "int4-matmulnbits": ("llama", "quantize{w=int4/g32/asym},cleanup",
                         {"accuracy_level": 0}, "MatMulNBits"),
    "int4-blocked-dq": ("llama", "quantize{w=int4/g32/asym},cleanup", {"int4": "dq"},
                        "DequantizeLinear"),
    "fp4": ("llama", "quantize{w=fp4_e2m1/g32},cleanup", {}, "DequantizeWeight"),
    "afpq": ("llama", "quantize{w=fp4_e2m1/g128/asym},cleanup", {}, "DequantizeWeight"),
    "fp4-matmulnbits": ("llama", "quantize{w=fp4_e2m1/g32},cleanup",
                        {"fp4": "matmulnbits", "accuracy_level": 0}, "MatMulNBits"),
    "ragged-afpq-matmulnbits": ("qwen2", "quantize{w=fp4_e2m1/g64/asym},cleanup",
                                {"fp4": "matmulnbits", "accuracy_level": 0}, "MatMulNBits"),
    "nf4": ("llama", "quantize{w=nf4/g32},cleanup", {}, "DequantizeWeight"),
    "rotated-w4a4": ("llama", get_recipe("quarot-w4a4").pipeline, {}, "Hadamard"),
    "ragged-int4-matmulnbits": ("qwen2", "quantize{w=int4/g64},cleanup",
                                {"accuracy_level": 0}, "MatMulNBits"),
    "ragged-int4-blocked-dq": ("qwen2", "quantize{w=int4/g64/asym},cleanup", {"int4": "dq"},
                               "DequantizeLinear"),
    "ragged-afpq": ("qwen2", "quantize{w=fp4_e2m1/g64/asym},cleanup", {}, "DequantizeWeight"),
    "ragged-nf4-asym-w-nf4-act": ("qwen2", "quantize{w=nf4/g64/asym a=nf4/g32},cleanup", {},
                                  "QuantizeActivation"),
    "po2-fp4": ("qwen2", "quantize{w=fp4_e2m1/g64/po2},cleanup", {}, "DequantizeWeight"),
    "m2-int4": ("qwen2", "quantize{w=int4/g32/m2},cleanup", {"accuracy_level": 0},
                "MatMulNBits"),
    "nvfp4": ("qwen2", "quantize{w=nvfp4},cleanup", {}, "DequantizeWeight"),
    "int3-asym-int4-act": ("qwen2", "quantize{w=int3/g32/asym a=int4/token/asym},cleanup", {},
                           "QuantizeActivation"),
    "fp8-afpq-fp4-act": ("qwen2", "quantize{w=fp8_e4m3/g32/asym a=fp4_e2m1/token/asym},"
                         "cleanup", {}, "DequantizeWeight"),
    "w4a8-fp4-fp8": ("llama", get_recipe("w4a8-fp4-fp8").pipeline, {}, "QuantizeActivation"),
    "int8-weight-only-matmulnbits": ("llama", "quantize{w=int8/channel},cleanup",
                                     {"accuracy_level": 0}, "MatMulNBits"),
    "ragged-int8-asym-matmulnbits": ("qwen2", "quantize{w=int8/g64/asym},cleanup",
                                     {"accuracy_level": 0}, "MatMulNBits"),
    "int8-weight-only-dq": ("llama", "quantize{w=int8/g32},cleanup", {"int8": "dq"},
                            "DequantizeLinear"),
    "int4-channel-matmulnbits": ("qwen2", "quantize{w=int4/channel/asym},cleanup",
                                 {"accuracy_level": 0}, "MatMulNBits"),
    "int4-body-int8-head": ("llama-tied", "quantize{w=int4/g32/asym},"
                            "quantize{w=int8/channel lm_head=true},cleanup",
                            {"accuracy_level": 0}, "MatMulNBits"),
    "int4-split-into-16-blocks": ("qwen2", "quantize{w=int4/g64/asym},cleanup",
                                  {"accuracy_level": 0, "nbits_block": 16}, "MatMulNBits"),
    "afpq-matmulnbits-16-blocks": ("llama", "quantize{w=fp4_e2m1/g32/asym},cleanup",
                                   {"fp4": "matmulnbits", "accuracy_level": 0,
                                    "nbits_block": 16}, "MatMulNBits"),
    # fuse-linears: q/k/v and gate/up as one wider weight, outputs sliced.
    "fused-int4-matmulnbits": ("qwen2", "quantize{w=int4/g32/asym},fuse-linears,cleanup",
                               {"accuracy_level": 0}, "MatMulNBits"),
    "fused-nvfp4": ("llama", "quantize{w=nvfp4},fuse-linears,cleanup", {}, "DequantizeWeight"),
    "zqfp-m2-lorc": ("qwen2", "lorc{w=fp4_e2m1/g32/m2 rank=4 bits=8},"
                     "quantize{w=fp4_e2m1/g32/m2 a=fp8_e4m3/token},cleanup", {},
                     "DequantizeWeight"),
}


def _graph(family: str, pipeline: str | None):
    gm = capture(tiny_model(family))
    if pipeline:
        gm, _ = quantize_graph(gm, pipeline, tokenizer=ByteTokenizer(), progress=False)
    return gm


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _reference_rows(ref, ids: torch.Tensor) -> np.ndarray:
    """The reference backend runs batch 1 (captured batch); stack its rows."""
    return torch.cat([ref(ids[i:i + 1]) for i in range(ids.shape[0])]).numpy()


def _all_domains(model: onnx.ModelProto) -> set[str]:
    domains = {o.domain for o in model.opset_import} | {n.domain for n in model.graph.node}
    for fn in model.functions:
        domains |= {n.domain for n in fn.node} | {o.domain for o in fn.opset_import}
    return domains


@pytest.mark.parametrize("case", list(CASES))
def test_ort_and_onnx_reference_match_reference_backend(case, tmp_path):
    family, pipeline, options, marker = CASES[case]
    gm = _graph(family, pipeline)
    ref = compile_reference(gm)
    path = tmp_path / "model.onnx"
    report = export_onnx(gm, path, **options)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert _all_domains(model) <= ALLOWED_DOMAINS
    assert any(marker in n.op_type for n in model.graph.node), case
    # the functions' bodies are standard ops only
    assert all(n.domain == "" for fn in model.functions for n in fn.node)

    ids = _ids(2, 9)  # batch 2: the batch axis is dynamic though the capture had batch 1
    expected = _reference_rows(ref, ids)
    got = OnnxLM(path, dq_accuracy_level=0)(ids).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).all()

    ev = reference_evaluator(model)
    (ref_logits,) = ev.run(["logits"], {"input_ids": ids[:1].numpy()})
    np.testing.assert_allclose(ref_logits, expected[:1], atol=ATOL, rtol=0)
    assert report["opset"] == model.opset_import[0].version


def test_matmulnbits_default_is_exact_and_level_4_is_close(tmp_path):
    """ORT's int8-compute MatMulNBits (opt-in, faster) stays within a few % of the logits."""
    gm = _graph("qwen2", "quantize{w=int4/g64/asym},cleanup")
    expected = _reference_rows(compile_reference(gm), _ids(1, 12))
    export_onnx(gm, tmp_path / "m.onnx", accuracy_level=4)
    got = OnnxLM(tmp_path / "m.onnx")(_ids(1, 12)).numpy()
    err = np.abs(got - expected)
    export_onnx(gm, tmp_path / "exact.onnx")  # default accuracy_level 1: fp32 compute
    exact = OnnxLM(tmp_path / "exact.onnx")(_ids(1, 12)).numpy()
    np.testing.assert_allclose(exact, expected, atol=ATOL, rtol=0)
    assert err.mean() < 0.05 * expected.std() and err.max() < 0.25 * expected.std()


def test_lowering_structure_per_format():
    """INT4 -> MatMulNBits (uint8 [N, blocks, 16] blocks), INT8/FP8 -> standard Q/DQ with the
    right element types, FP4/AFPQ -> a qcompile function; opsets match what is used (without
    the opset-23 fused attention/norm/RoPE ops)."""
    int4 = build_model(_graph("qwen2", "quantize{w=int4/g64},cleanup"),
                       export_options(fuse=False))
    nbits = [n for n in int4.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14 and int4.opset_import[0].version == 18
    inits = {i.name: i for i in int4.graph.initializer}
    b = inits[nbits[0].input[1]]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["block_size"] == 64 and attrs["K"] == 96 and attrs["bits"] == 4
    assert list(b.dims) == [attrs["N"], 2, 32]  # ragged K=96 padded to two blocks of 64

    fp8 = build_model(_graph("llama", get_recipe("w8a8-fp8").pipeline),
                      export_options(fuse=False))
    types = {i.data_type for i in fp8.graph.initializer}
    assert onnx.TensorProto.FLOAT8E4M3FN in types
    props = {p.key: p.value for p in fp8.metadata_props}
    assert fp8.opset_import[0].version == 21 and "21" in json.loads(props["qcompile.opset_reasons"])
    fn = next(f for f in fp8.functions if f.name.startswith("QuantizeActivation"))
    assert [n.op_type for n in fn.node].count("QuantizeLinear") == 1

    afpq = build_model(_graph("llama", get_recipe("w4-afpq").pipeline))
    fn = next(f for f in afpq.functions if f.name.startswith("DequantizeWeight"))
    ops = {n.op_type for n in fn.node}
    assert {"Gather", "Where", "BitShift", "BitwiseAnd"} <= ops
    assert list(fn.input) == ["packed", "scale", "scale_neg"]


def test_int8_matmulnbits_only_for_weight_only_linears():
    """Weight-only INT8 -> 8-bit MatMulNBits (per-channel scales repeated over blocks, ragged K
    padded with the zero point); W8A8 keeps the standard QDQ pair ORT fuses."""
    head = build_model(_graph("llama-tied", "quantize{w=int4/g32/asym},"
                              "quantize{w=int8/channel lm_head=true},cleanup"))
    nodes = [n for n in head.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert sorted(a["bits"] for a in attrs) == [4] * 14 + [8]
    eight = attrs[[a["bits"] for a in attrs].index(8)]
    inits = {i.name: i for i in head.graph.initializer}
    b = inits[nodes[[a["bits"] for a in attrs].index(8)].input[1]]
    assert eight["block_size"] == 64 and list(b.dims) == [256, 1, 64]  # K = 64, one block
    w8a8 = build_model(_graph("llama", "quantize{w=int8/channel a=int8/token},cleanup"))
    assert not [n for n in w8a8.graph.node if n.op_type == "MatMulNBits"]
    assert [n.op_type for n in w8a8.graph.node].count("DequantizeLinear") == 14  # 7 per layer


def test_fp4_matmulnbits_is_two_exact_halves():
    """fp4="matmulnbits": per linear a positive half (zero point 0) and a negative half (zero
    point 12) whose dequantized sum is exactly the AFPQ weight."""
    from qcompile.backends.onnx.reference_ops import matmul_nbits
    from qcompile.graph import get_attr_value
    from qcompile.ops import dequantize_weight

    gm = _graph("qwen2", "quantize{w=fp4_e2m1/g64/asym},cleanup")
    model = build_model(gm, export_options(fp4="matmulnbits"))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 28 and not model.functions
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = next(n for n in gm.graph.nodes if n.target is torch.ops.qcompile.dequantize_weight.default)
    args = [get_attr_value(gm, a.target) if isinstance(a, torch.fx.Node) else a
            for a in dq.args]
    weight = dequantize_weight(*args).numpy()  # q_proj of layer 0: [96, 96]
    eye = np.eye(96, dtype=np.float32)
    total = 0
    for node in nodes[:2]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        b, scales, zero = (inits[i] for i in node.input[1:4])
        total = total + matmul_nbits(eye, b, scales, zero, attrs["K"], attrs["block_size"])
    np.testing.assert_array_equal(total, weight.T)


def test_fp4_dequantize_linear_option_is_opset_23(tmp_path):
    """fp4="dq": FLOAT4E2M1 DequantizeLinear (opset 23); onnx.reference runs it, ORT 1.32 CPU
    has no kernel for it (the reason the function lowering is the default)."""
    gm = _graph("llama", "quantize{w=fp4_e2m1/g32},cleanup")
    expected = _reference_rows(compile_reference(gm), _ids(1, 7))
    model = build_model(gm, export_options(fp4="dq"))
    assert model.opset_import[0].version == 23
    assert any(i.data_type == onnx.TensorProto.FLOAT4E2M1 for i in model.graph.initializer)
    (got,) = reference_evaluator(model).run(["logits"], {"input_ids": _ids(1, 7).numpy()})
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def export_options(**kw):
    from qcompile.backends.onnx import ExportOptions

    return ExportOptions(**kw)


def test_static_int8_activations_are_standard_qdq(tmp_path):
    gm = _graph("llama", "calibrate{samples=2 seqlen=32},"
                "quantize{w=int8/channel a=int8/tensor static=true},cleanup")
    ref = compile_reference(gm)
    model = build_model(gm)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 8 and not model.functions  # 4 inputs per layer
    onnx.save(model, tmp_path / "m.onnx")
    ids = _ids(2, 6)
    np.testing.assert_allclose(OnnxLM(tmp_path / "m.onnx")(ids).numpy(),
                               _reference_rows(ref, ids), atol=ATOL, rtol=0)


def test_shapes_inferred_dynamic_axes_and_external_data(tmp_path):
    gm = _graph("llama", get_recipe("w4-afpq").pipeline)
    path = tmp_path / "m.onnx"
    report = export_onnx(gm, path, external_data=True)
    assert report["external_data"] == "m.onnx.data" and (tmp_path / "m.onnx.data").stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(path, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert len(model.graph.value_info) > 100  # intermediate shapes inferred
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence", 256]
    ids = _ids(3, 4)
    np.testing.assert_allclose(OnnxLM(path)(ids).numpy(),
                               _reference_rows(compile_reference(gm), ids), atol=ATOL, rtol=0)


def test_export_from_model_with_recipe(tmp_path):
    report = export_onnx(tiny_model("llama"), tmp_path / "m.onnx", recipe="w4-nf4")
    assert report["pipeline"] == get_recipe("w4-nf4").pipeline
    assert report["functions"] and report["domains"] == ["", "qcompile"]


@pytest.mark.parametrize("family", ["llama", "llama-tied", "mistral", "qwen2", "phi3", "gemma2",
                                    "gemma3", "phi"])
def test_fp32_families(family, tmp_path):
    gm = _graph(family, None)
    export_onnx(gm, tmp_path / "m.onnx")
    ids = _ids(2, 20)  # longer than the 16-token sliding windows of mistral/gemma
    np.testing.assert_allclose(OnnxLM(tmp_path / "m.onnx")(ids).numpy(),
                               _reference_rows(compile_reference(gm), ids), atol=ATOL, rtol=0)


def test_tied_embedding_is_stored_once():
    model = build_model(_graph("llama-tied", None))
    big = [i for i in model.graph.initializer if list(i.dims) == [256, 64]]
    assert len(big) == 1


# -- errors -------------------------------------------------------------------------------------

def test_unsupported_op_names_the_node():
    gm = _graph("llama", None)
    emb = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    with gm.graph.inserting_after(emb):
        odd = gm.graph.call_function(torch.ops.aten.cumprod.default, (emb, -1))
    odd.meta["val"] = emb.meta["val"]
    for user in list(emb.users):
        if user is not odd:
            user.replace_input_with(emb, odd)
    gm.recompile()
    with pytest.raises(UnsupportedGraphError, match=rf"node {odd.name} \(aten\.cumprod"):
        build_model(gm)


def test_unsupported_activation_format_names_the_format():
    gm = _graph("llama", "quantize{a=int8/token/po2},cleanup")
    with pytest.raises(FormatError, match=r"int8/token/po2 has no ONNX lowering"):
        build_model(gm)


def test_bad_lowering_option_is_rejected(tmp_path):
    from qcompile.errors import QCompileError

    with pytest.raises(QCompileError, match="int4 lowering must be"):
        export_onnx(_graph("llama", None), tmp_path / "m.onnx", int4="gptq")
    with pytest.raises(QCompileError, match="int8 lowering must be"):
        export_onnx(_graph("llama", None), tmp_path / "m.onnx", int8="fast")
    for bad in (24, 8, True, 32.0):
        with pytest.raises(QCompileError, match="nbits_block must be a power of two >= 16"):
            export_onnx(_graph("llama", None), tmp_path / "m.onnx", nbits_block=bad)


def test_split_blocks_repeat_the_group_scales():
    """nbits_block=16 on g64: four blocks per group, each with the group's scale and zero."""
    gm = _graph("qwen2", "quantize{w=int4/g64/asym},cleanup")
    coarse = build_model(gm)
    fine = build_model(gm, export_options(nbits_block=16))
    for a, b in zip([n for n in coarse.graph.node if n.op_type == "MatMulNBits"],
                    [n for n in fine.graph.node if n.op_type == "MatMulNBits"], strict=True):
        ia = {i.name: onnx.numpy_helper.to_array(i) for i in coarse.graph.initializer}
        ib = {i.name: onnx.numpy_helper.to_array(i) for i in fine.graph.initializer}
        k = next(x.i for x in b.attribute if x.name == "K")
        n = ia[a.input[1]].shape[0]
        sa, sb = ia[a.input[2]].reshape(n, -1), ib[a.input[2]].reshape(n, -1)
        groups, blocks = -(-k // 64), -(-k // 16)
        assert sa.shape[1] == groups and sb.shape[1] == blocks
        owner = np.minimum(np.arange(blocks) // 4, groups - 1)
        np.testing.assert_array_equal(sb, sa[:, owner])
        # same codes (two per byte), the K tail padded with the last group's zero point
        codes_a, codes_b = ia[a.input[1]].reshape(n, -1), ib[a.input[1]].reshape(n, -1)
        np.testing.assert_array_equal(codes_b, codes_a[:, : blocks * 8])


def test_non_float32_graph_is_refused():
    gm = capture(tiny_model("llama").to(torch.float16))
    with pytest.raises(UnsupportedGraphError, match="ONNX export handles float32 graphs"):
        build_model(gm)


def test_lazy_top_level_name_and_light_import():
    import subprocess
    import sys

    import qcompile

    assert qcompile.export_onnx is export_onnx
    code = "import sys, qcompile; assert 'onnx' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "ok"
