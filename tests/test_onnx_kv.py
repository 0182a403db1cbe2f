"""KV-cache decoder export: token-by-token ORT decoding equals full-sequence reference logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")

from qcompile.api import quantize_graph  # noqa: E402
from qcompile.backends.onnx import OnnxLM, build_model, export_onnx  # noqa: E402
from qcompile.backends.onnx.export import ExportOptions  # noqa: E402
from qcompile.backends.onnx.runtime import greedy_reference  # noqa: E402
from qcompile.backends.reference import compile_reference  # noqa: E402
from qcompile.capture import capture  # noqa: E402
from qcompile.errors import UnsupportedGraphError  # noqa: E402
from qcompile.recipes import get_recipe  # noqa: E402
from qcompile.testing import ByteTokenizer, tiny_model  # noqa: E402

ATOL = 1e-4  # fp32 on both sides; see test_onnx_export.py


def _graph(family: str, pipeline: str | None):
    gm = capture(tiny_model(family))
    if pipeline:
        gm, _ = quantize_graph(gm, pipeline, tokenizer=ByteTokenizer(), progress=False)
    return gm


@pytest.mark.parametrize("family, pipeline", [
    ("llama", None),
    ("llama", get_recipe("quarot-w4a4").pipeline),  # rotated W4A4 with an FP4 KV cache
    ("qwen2", "quantize{w=int4/g64/asym},cleanup"),  # ragged MatMulNBits, q/k/v biases
    ("phi3", "quantize{w=fp4_e2m1/g32/asym},cleanup"),  # fused qkv projection
])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_cached_decoding_matches_full_sequence(family, pipeline, fuse, tmp_path):
    gm = _graph(family, pipeline)
    ref = compile_reference(gm)
    path = tmp_path / "kv.onnx"
    report = export_onnx(gm, path, kv_cache=True, accuracy_level=0, fuse=fuse)
    ops = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
    assert ops.count("Attention") == (2 if fuse else 0)
    assert report["inputs"][1:3] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert report["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]
    lm = OnnxLM(path)
    ids = torch.randint(3, 250, (2, 13), generator=torch.Generator().manual_seed(0))
    full = torch.cat([ref(ids[i:i + 1]) for i in range(2)]).numpy()
    logits, cache = lm.run(ids[:, :5].numpy())  # prompt, then steps of 1, 1, 4, 2 tokens
    chunks, pos = [logits], 5
    for n in (1, 1, 4, 2):
        logits, cache = lm.run(ids[:, pos:pos + n].numpy(), cache)
        chunks.append(logits)
        pos += n
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=ATOL, rtol=0)
    assert cache["past_key_values.0.key"].shape[:3] == (2, 2, 13)

    prompt = ids[0, :6].tolist()
    assert lm.generate(prompt, 10) == greedy_reference(ref, prompt, 10)


def test_kv_export_checks_and_records(tmp_path):
    model = build_model(_graph("llama", None), ExportOptions(kv_cache=True))
    onnx.checker.check_model(model, full_check=True)
    past = model.graph.input[1].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in past] == ["batch", 2, "past_sequence", 16]
    props = {p.key: p.value for p in model.metadata_props}
    assert '"layers": 2' in props["qcompile.kv_cache"]


def test_sliding_window_mask_is_refused():
    with pytest.raises(UnsupportedGraphError, match="does not use a plain causal mask"):
        build_model(_graph("mistral", None), ExportOptions(kv_cache=True))


def test_eager_attention_is_refused():
    with pytest.raises(UnsupportedGraphError, match="is eager"):
        build_model(_graph("gemma2", None), ExportOptions(kv_cache=True))
