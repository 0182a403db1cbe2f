"""Fused ONNX lowerings (opset-23 Attention, RMSNormalization, RotaryEmbedding): which patterns
fuse in each tiny family, that fused and unfused exports both equal the reference backend
(ORT and onnx.reference, ``ATOL`` as in test_onnx_export.py), and that patterns failing their
checks (sliding windows, eager attention, RoPE tables that are not two equal halves) stay
unfused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")

from qcompile.api import quantize_graph  # noqa: E402
from qcompile.backends.onnx import OnnxLM, build_model, export_onnx  # noqa: E402
from qcompile.backends.onnx.export import ExportOptions  # noqa: E402
from qcompile.backends.onnx.kv import causal_masks  # noqa: E402
from qcompile.backends.onnx.reference_ops import reference_evaluator  # noqa: E402
from qcompile.backends.reference import compile_reference  # noqa: E402
from qcompile.capture import capture  # noqa: E402
from qcompile.testing import ByteTokenizer, tiny_config, tiny_model  # noqa: E402

ATOL = 1e-4
FUSED_OPS = ("Attention", "RMSNormalization", "RotaryEmbedding")

# family -> fused (Attention, RMSNormalization, RotaryEmbedding) of the 2-layer tiny model.
# mistral: 16-token sliding window on every layer; gemma2: eager attention; gemma3: layer 0
# slides, layer 1 is global; phi: LayerNorm (aten.layer_norm, already one op), partial RoPE;
# gemma3 also normalizes q and k (RMSNorm per head) and its blocks have four norms.
EXPECTED = {
    "llama": (2, 5, 4),
    "llama-tied": (2, 5, 4),
    "qwen2": (2, 5, 4),
    "phi3": (2, 5, 4),
    "mistral": (0, 5, 4),
    "gemma2": (0, 9, 4),
    "gemma3": (1, 13, 4),
    "phi": (2, 0, 4),
}


def _counts(model: onnx.ModelProto) -> tuple[int, ...]:
    ops = [n.op_type for n in model.graph.node]
    return tuple(ops.count(op) for op in FUSED_OPS)


def _rows(ref, ids: torch.Tensor) -> np.ndarray:
    return torch.cat([ref(ids[i:i + 1]) for i in range(ids.shape[0])]).numpy()


@pytest.mark.parametrize("family", list(EXPECTED))
def test_fused_export_per_family(family, tmp_path):
    gm = capture(tiny_model(family))
    ids = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(1))
    expected = _rows(compile_reference(gm), ids)
    fused = build_model(gm, ExportOptions())
    plain = build_model(gm, ExportOptions(fuse=False))
    assert _counts(fused) == EXPECTED[family]
    assert _counts(plain) == (0, 0, 0) and plain.opset_import[0].version == 18
    assert fused.opset_import[0].version == 23
    assert len(fused.graph.node) < len(plain.graph.node)
    props = {p.key: p.value for p in fused.metadata_props}
    if EXPECTED[family][0] < 2:  # the report says which attention stayed and why
        assert "attention model.layers.0.self_attn" in props["qcompile.fused"]
    for model, name in ((fused, "fused"), (plain, "plain")):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        np.testing.assert_allclose(OnnxLM(path)(ids).numpy(), expected, atol=ATOL, rtol=0)
    (got,) = reference_evaluator(fused).run(["logits"], {"input_ids": ids[:1].numpy()})
    np.testing.assert_allclose(got, expected[:1], atol=ATOL, rtol=0)


def test_fused_kv_decoder_has_no_cache_plumbing(tmp_path):
    """Each present key/value is an output of an Attention node that reads the past directly
    (no Concat, no GQA head repeat: 4 query heads read 2 cached kv heads)."""
    gm = capture(tiny_model("llama"))
    model = build_model(gm, ExportOptions(kv_cache=True))
    producers = {o: n for n in model.graph.node for o in n.output}
    for i in range(2):
        for kind in ("key", "value"):
            ident = producers[f"present.{i}.{kind}"]
            assert producers[ident.input[0]].op_type == "Attention"
    readers = [n.op_type for n in model.graph.node if "past_key_values.0.key" in n.input]
    assert readers.count("Attention") == 1 and "Concat" not in readers
    assert not [n for n in model.graph.node if n.op_type == "Expand"
                and "past" in "".join(n.input)]


def test_rope_with_unequal_table_halves_is_not_fused(tmp_path):
    """RotaryEmbedding takes half tables; a cos/sin table whose halves differ stays as it is."""
    gm = capture(tiny_model("llama"))
    cat = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default
               and n.args[0][0] is n.args[0][1])
    freqs = cat.args[0][0]
    with gm.graph.inserting_before(cat):
        other = gm.graph.call_function(torch.ops.aten.mul.Tensor, (freqs, 1.25))
    other.meta["val"] = freqs.meta["val"]
    cat.args = ([freqs, other], *cat.args[1:])
    gm.recompile()
    ids = torch.randint(3, 250, (1, 11), generator=torch.Generator().manual_seed(2))
    expected = _rows(compile_reference(gm), ids)
    model = build_model(gm, ExportOptions())
    assert _counts(model) == (2, 5, 0)
    onnx.save(model, tmp_path / "m.onnx")
    np.testing.assert_allclose(OnnxLM(tmp_path / "m.onnx")(ids).numpy(), expected, atol=ATOL,
                               rtol=0)


def test_sliding_window_longer_than_the_default_probe_is_seen(tmp_path):
    """A 64-token window would look causal to a 48-token probe; the probe grows past it."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("mistral")
    config.sliding_window = 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                             dtype=torch.float32).eval()
    gm = capture(model)
    assert gm.meta["sliding_window"] == 64
    n, verdict = causal_masks(gm)
    assert n > 64 and not any(verdict.values())
    onnx_model = build_model(gm, ExportOptions())
    assert _counts(onnx_model)[0] == 0
    ids = torch.randint(3, 250, (1, 90), generator=torch.Generator().manual_seed(3))
    onnx.save(onnx_model, tmp_path / "m.onnx")
    np.testing.assert_allclose(OnnxLM(tmp_path / "m.onnx")(ids).numpy(),
                               _rows(compile_reference(gm), ids), atol=ATOL, rtol=0)


def test_fused_rotated_w4a4_with_kv4(tmp_path):
    """QuaRot W4A4: Hadamard on q/k after RoPE and an FP4 KV cache between RoPE and the
    attention; the fused export still equals the reference."""
    from qcompile.recipes import get_recipe

    gm = capture(tiny_model("qwen2"))
    gm, _ = quantize_graph(gm, get_recipe("quarot-w4a4").pipeline, tokenizer=ByteTokenizer(),
                           progress=False)
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(4))
    expected = _rows(compile_reference(gm), ids)
    report = export_onnx(gm, tmp_path / "m.onnx", kv_cache=True)
    assert report["fused"]["Attention"] == 2 and report["fused"]["RotaryEmbedding"] == 4
    lm = OnnxLM(tmp_path / "m.onnx")
    first, cache = lm.run(ids[:, :7].numpy())
    rest, _ = lm.run(ids[:, 7:].numpy(), cache)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), expected, atol=ATOL,
                               rtol=0)
