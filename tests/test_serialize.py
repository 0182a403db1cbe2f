"""Save/load artifacts: safetensors + JSON, identical logits, safe loading, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from qcompile.capture import capture
from qcompile.errors import ArtifactError
from qcompile.manager import PassManager
from qcompile.serialize import load_quantized, save_quantized
from qcompile.testing import tiny_model


@pytest.mark.parametrize("family, pipeline", [
    ("llama", "quantize{w=fp4_e2m1/g64/asym a=fp8_e4m3/token},cleanup"),
    ("llama-tied", "quantize{w=int4/g32/asym},cleanup"),
    ("phi3", "quantize{w=nvfp4}"),
])
def test_round_trip_gives_identical_logits(tmp_path, family, pipeline):
    model = tiny_model(family)
    gm, report = PassManager(pipeline).run(capture(model))
    ids = torch.randint(0, model.config.vocab_size, (1, 13), generator=torch.Generator()
                        .manual_seed(0))
    expected = gm(ids)
    save_quantized(gm, tmp_path, metadata={"pipeline": pipeline, "report": report})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "qcompile.json"]
    gm2, tok, meta = load_quantized(tmp_path)
    assert tok is None and meta["pipeline"] == pipeline
    assert torch.equal(gm2(ids), expected)
    # dynamic sequence length still works after loading
    assert gm2(ids[:, :5]).shape == (1, 5, model.config.vocab_size)
    names = [n.name for n in gm.graph.nodes]
    assert [n.name for n in gm2.graph.nodes] == names


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loaded_graph_continues_a_pipeline_like_the_saved_one(tmp_path, family):
    """Node values (shapes, dtypes) are restored on load, so the passes that read them (KV
    quantization finds attention by head shapes, rotate's R2/R3 too) work on an artifact
    and give what they give on the graph that was saved."""
    model = tiny_model(family)
    gm, _ = PassManager("fuse-norms").run(capture(model))
    save_quantized(gm, tmp_path)
    gm2, _, _ = load_quantized(tmp_path)
    for a, b in zip(gm.graph.nodes, gm2.graph.nodes, strict=True):
        va, vb = a.meta.get("val"), b.meta.get("val")
        if isinstance(va, torch.Tensor):
            assert isinstance(vb, torch.Tensor) and vb.dtype == va.dtype, a.name
            assert [isinstance(d, int) for d in vb.shape] == [isinstance(d, int)
                                                              for d in va.shape], a.name
            assert [d for d in vb.shape if isinstance(d, int)] == [
                d for d in va.shape if isinstance(d, int)], a.name
    rest = "rotate{r1=none},quantize{kv=int8/token a=int8/token},cleanup"
    ids = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator()
                        .manual_seed(1))
    want, report = PassManager(rest).run(gm)
    got, report2 = PassManager(rest).run(gm2)
    assert report2["passes"][1]["facts"] == report["passes"][1]["facts"]
    assert torch.equal(got(ids), want(ids))


def _saved(tmp_path):
    gm, _ = PassManager("quantize{w=int4/g32}").run(capture(tiny_model("llama")))
    save_quantized(gm, tmp_path)
    return json.loads((tmp_path / "qcompile.json").read_text())


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a qcompile artifact"):
        load_quantized(tmp_path)


def test_refuses_targets_outside_allow_list(tmp_path):
    manifest = _saved(tmp_path)
    node = next(n for n in manifest["graph"] if n["op"] == "call_function")
    node["target"] = "os.system"
    (tmp_path / "qcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="'os.system', which is outside the allowed"):
        load_quantized(tmp_path)


def test_missing_tensor_and_bad_version(tmp_path):
    manifest = _saved(tmp_path)
    node = next(n for n in manifest["graph"] if n["op"] == "get_attr")
    node["target"] = "no.such.tensor"
    (tmp_path / "qcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lacks tensors the graph reads: \\['no.such.tensor'"):
        load_quantized(tmp_path)
    manifest["format"] = "qcompile-artifact/999"
    (tmp_path / "qcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="this qcompile reads qcompile-artifact/1"):
        load_quantized(tmp_path)
