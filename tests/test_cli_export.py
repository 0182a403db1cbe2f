"""``qcompile export`` and ``qcompile generate`` on a tiny Hugging Face model directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from qcompile.cli import main  # noqa: E402
from qcompile.testing import tiny_model  # noqa: E402


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _save_tiny(path: Path) -> None:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    tiny_model("llama").save_pretrained(path)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 256)}}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    _save_tiny(path)
    return path


def test_export_then_generate(capsys, tmp_path, tiny_dir):
    out = tmp_path / "m.onnx"
    code, stdout, _ = _run(capsys, "export", "--model", str(tiny_dir), "--recipe", "w4-int4",
                           "--out", str(out), "--kv-cache", "--accuracy-level", "0", "--json")
    assert code == 0
    res = json.loads(stdout)
    assert res["onnx"]["domains"] == ["", "com.microsoft"]
    assert "past_key_values.1.value" in res["onnx"]["inputs"]
    assert res["pipeline"].startswith("quantize{w=int4/g128/asym}")
    assert Path(res["tokenizer"], "tokenizer_config.json").is_file()

    code, stdout, _ = _run(capsys, "generate", "--onnx", str(out), "--prompt", "w5 w9 w12",
                           "--max-new-tokens", "6", "--json")
    assert code == 0
    gen = json.loads(stdout)
    assert gen["kv_cache"] is True and len(gen["tokens"]) == 6

    # the same tokens as greedy decoding with the reference backend on the same graph
    from qcompile.api import quantize_graph
    from qcompile.backends.onnx.runtime import greedy_reference
    from qcompile.backends.reference import compile_reference
    from qcompile.capture import capture
    from qcompile.models import load_model
    from qcompile.recipes import get_recipe

    model, _ = load_model(tiny_dir)
    gm, _ = quantize_graph(capture(model), get_recipe("w4-int4").pipeline, progress=False)
    assert gen["tokens"] == greedy_reference(compile_reference(gm), [5, 9, 12], 6)


def test_export_speed_options(capsys, tmp_path, tiny_dir):
    """The decode-speed export: INT4 body + INT8 head, level 4 with 32-wide blocks, fused ops;
    --no-fuse keeps the basic ops (and a lower opset)."""
    import onnx

    out = tmp_path / "fast.onnx"
    code, stdout, _ = _run(capsys, "export", "--model", str(tiny_dir), "--recipe",
                           "w4-int4-head8", "--out", str(out), "--kv-cache", "--accuracy-level",
                           "4", "--nbits-block", "32", "--json")
    assert code == 0
    res = json.loads(stdout)["onnx"]
    assert res["opset"] == 23 and res["fused"]["Attention"] >= 1
    model = onnx.load(out, load_external_data=False)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {a["bits"] for a in attrs} == {4, 8} and {a["block_size"] for a in attrs} == {32}
    assert {a["accuracy_level"] for a in attrs} == {4}

    code, stdout, _ = _run(capsys, "export", "--model", str(tiny_dir), "--out",
                           str(tmp_path / "plain.onnx"), "--no-fuse", "--json")
    assert code == 0
    res = json.loads(stdout)["onnx"]
    assert res["opset"] == 18 and res["fused"] is None

    code, out_text, err = _run(capsys, "export", "--model", str(tiny_dir), "--out",
                               str(tmp_path / "bad.onnx"), "--nbits-block", "24", "--json")
    assert code == 2 and out_text == "" and "nbits_block must be a power of two" in err


def test_export_fp32_without_pipeline_matches_model(capsys, tmp_path, tiny_dir):
    out = tmp_path / "fp32.onnx"
    code, stdout, _ = _run(capsys, "export", "--model", str(tiny_dir), "--out", str(out),
                           "--external-data", "yes", "--json")
    assert code == 0 and json.loads(stdout)["onnx"]["external_data"] == "fp32.onnx.data"
    from qcompile.backends.onnx import OnnxLM
    from qcompile.models import load_model

    model, _ = load_model(tiny_dir)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    np.testing.assert_allclose(OnnxLM(out)(ids).numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("argv, needle", [
    (["export", "--model", "no-such-model", "--recipe", "w4-afpq", "--out", "x.onnx"],
     "ModelError: "),
    (["export", "--model", "smollm2-135m", "--recipe", "w5-magic", "--out", "x.onnx"],
     "PipelineError: unknown recipe 'w5-magic'"),
    (["generate", "--onnx", "missing.onnx", "--prompt", "hi"], "ArtifactError: no ONNX model"),
])
def test_errors_are_one_line(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert needle in err and err.count("\n") == 1


def test_unsupported_format_is_a_one_line_error(capsys, tmp_path, tiny_dir):
    code, out, err = _run(capsys, "export", "--model", str(tiny_dir), "--pipeline",
                          "quantize{a=int8/token/po2}", "--out", str(tmp_path / "m.onnx"),
                          "--json")
    assert code == 2 and out == ""
    assert "FormatError: activation format int8/token/po2 has no ONNX lowering" in err
