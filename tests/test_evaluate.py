"""Data loading, calibration windows and perplexity (tiny models; SmolLM2 when marked slow)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from qcompile import data
from qcompile.capture import capture
from qcompile.data import DataError, calibration_batches, encode_text, load_text
from qcompile.evaluate import perplexity, tokenize_windows
from qcompile.testing import ByteTokenizer, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # 540 bytes


def test_load_text_names(tmp_path):
    test = load_text("wikitext2")
    assert load_text("wikitext2-test") == test
    assert load_text("WikiText2") == test
    valid = load_text("wikitext2-valid")
    assert valid != test
    assert test.startswith("\ufeff \n = Robert <unk> = \n")  # kept verbatim, BOM included
    assert len(test) > 1_000_000 and len(valid) > 1_000_000
    f = tmp_path / "corpus.txt"
    f.write_text("hello world", encoding="utf-8")
    assert load_text(str(f)) == "hello world"
    with pytest.raises(DataError, match="wikitext2-valid"):
        load_text("penn-treebank")


def test_valid_never_reads_test(monkeypatch):
    read = []
    original = data._read_resource

    def spy(relpath):
        read.append(relpath)
        return original(relpath)

    monkeypatch.setattr(data, "_read_resource", spy)
    valid = load_text("wikitext2-valid")
    assert read == ["wikitext-2/valid.txt"]
    calibration_batches(ByteTokenizer(), valid, samples=4, seqlen=64, seed=0)
    assert read == ["wikitext-2/valid.txt"]


def test_calibration_batches_deterministic():
    tok, text = ByteTokenizer(), load_text("wikitext2-valid")[:20_000]
    a = calibration_batches(tok, text, samples=8, seqlen=128, seed=1)
    b = calibration_batches(tok, text, samples=8, seqlen=128, seed=1)
    c = calibration_batches(tok, text, samples=8, seqlen=128, seed=2)
    assert a.shape == (8, 128) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = bytes(encode_text(tok, text).tolist())
    for row in a:
        assert bytes(row.tolist()) in stream  # each sample is a contiguous window
    with pytest.raises(DataError):
        calibration_batches(tok, "short", samples=1, seqlen=64, seed=0)


def test_tokenize_windows():
    tok = ByteTokenizer()
    w = tokenize_windows(tok, TEXT, seqlen=100, windows=3)
    assert w.shape == (3, 100)
    assert bytes(w.flatten().tolist()) == TEXT.encode()[:300]  # no BOS, no overlap
    assert tokenize_windows(tok, TEXT, seqlen=100, windows=None).shape == (5, 100)
    with pytest.raises(DataError, match="windows=None"):
        tokenize_windows(tok, TEXT, seqlen=100, windows=6)


def _reference_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    """Token-by-token NLL with a float64 log-softmax: the definition, written out."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None]).logits[0].double()
            for t in range(1, row.numel()):
                total -= torch.log_softmax(logits[t - 1], dim=-1)[row[t]].item()
                count += 1
    return total, count


def test_perplexity_matches_hand_computed_nll():
    model, tok = tiny_model("llama"), ByteTokenizer()
    windows = tokenize_windows(tok, TEXT, seqlen=64, windows=4)
    total, count = _reference_nll(model, windows)
    gm = capture(model)
    for fn in (gm, model, lambda ids: model(input_ids=ids).logits):
        result = perplexity(fn, tok, TEXT, seqlen=64, windows=4, progress=False)
        assert result["tokens"] == count == 4 * 63
        assert result["windows"] == 4 and result["seqlen"] == 64
        assert result["nll"] == pytest.approx(total / count, rel=1e-6)
        assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_perplexity_progress_bar_goes_to_stderr(capsys):
    perplexity(tiny_model("llama"), ByteTokenizer(), TEXT, seqlen=64, windows=2, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "perplexity" in err


@pytest.mark.slow
def test_smollm2_graph_matches_eager(smollm2, smollm2_graph):
    model, tokenizer = smollm2
    ids = tokenize_windows(tokenizer, load_text("wikitext2"), seqlen=96, windows=1)
    with torch.inference_mode():
        want = model(input_ids=ids, use_cache=False).logits
        got = smollm2_graph(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert smollm2_graph.meta["tied_params"] == [("model.embed_tokens.weight", "lm_head.weight")]


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity(smollm2, smollm2_graph):
    _, tokenizer = smollm2
    start = time.perf_counter()
    result = perplexity(smollm2_graph, tokenizer, load_text("wikitext2"), progress=False)
    elapsed = time.perf_counter() - start
    print(
        f"\nSmolLM2-135M fp32 WikiText-2 ppl {result['ppl']:.4f} "
        f"({result['windows']}x{result['seqlen']}, {elapsed:.1f} s)"
    )
    assert result["windows"] == 40 and result["tokens"] == 40 * 511
    assert abs(result["ppl"] - 25.6) < 0.5
