"""Evaluation and calibration text: bundled WikiText-2 splits, tokenization, random windows.

WikiText-2 (the tokenized release, rare words as ``<unk>``) ships in the package under
``qcompile/data/wikitext-2/``: ``test.txt`` is for perplexity only, ``valid.txt`` for
calibration. Files are read verbatim as UTF-8. Both bundled files start with a byte-order mark
(U+FEFF), which is kept: the reference figures in DESIGN.md were measured on the text with it
(SmolLM2 fp32: 25.634 with it, 25.615 without).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import weakref
from pathlib import Path
from typing import Any

import torch

from qcompile.errors import QCompileError

__all__ = [
    "DATASETS",
    "DataError",
    "calibration_batches",
    "encode_text",
    "load_text",
]


class DataError(QCompileError, ValueError):
    """A data set name or text file cannot be resolved, or holds too little text."""


# name -> bundled file under qcompile/data/
DATASETS: dict[str, str] = {
    "wikitext2": "wikitext-2/test.txt",
    "wikitext2-test": "wikitext-2/test.txt",
    "wikitext2-valid": "wikitext-2/valid.txt",
}


def _read_resource(relpath: str) -> str:
    """Read a bundled data file (one place, so tests can see which files are read)."""
    ref = importlib.resources.files("qcompile").joinpath("data", *relpath.split("/"))
    return ref.read_text(encoding="utf-8")


def load_text(name_or_path: str) -> str:
    """Return the text of a bundled data set or of a UTF-8 text file.

    Args:
        name_or_path: ``"wikitext2"`` or ``"wikitext2-test"`` (the test split),
            ``"wikitext2-valid"`` (the validation split), or a path to a text file.

    Raises:
        DataError: The name is unknown and no such file exists.
    """
    key = str(name_or_path).strip().lower()
    if key in DATASETS:
        return _read_resource(DATASETS[key])
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read text file {path}: {exc}") from exc
    raise DataError(
        f"unknown data set or missing file {name_or_path!r}; known names: {', '.join(DATASETS)}"
    )


# Tokenizing WikiText-2 test takes about a second; keep recent results per tokenizer.
_TOKEN_CACHE: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()
_CACHE_TEXTS_PER_TOKENIZER = 4


def encode_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` once, without special tokens (no BOS/EOS is added), as int64 1-D.

    Results are cached in memory per tokenizer object (by a hash of the text), so repeated
    evaluations of the same text do not re-tokenize. Do not modify the returned tensor.

    Args:
        tokenizer: A Hugging Face tokenizer, or any object with
            ``encode(text, add_special_tokens=False) -> list[int]``.
        text: The text.
    """
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    try:
        per_tok = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # the tokenizer cannot be weakly referenced: no caching
        per_tok = {}
    if digest not in per_tok:
        ids = _encode(tokenizer, text)
        if len(per_tok) >= _CACHE_TEXTS_PER_TOKENIZER:
            per_tok.pop(next(iter(per_tok)))
        per_tok[digest] = torch.tensor(ids, dtype=torch.long)
    return per_tok[digest]


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            # verbose=False silences HF's "sequence longer than model max length" warning.
            return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
        except TypeError:
            return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def calibration_batches(
    tokenizer: Any, text: str, samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """Draw ``samples`` random token windows of length ``seqlen`` from ``text``.

    Window starts are drawn uniformly from a ``torch.Generator`` seeded with ``seed``, so the
    same arguments always give the same batch (the global RNG is not used). Pass calibration
    text (``load_text("wikitext2-valid")``), never the evaluation text.

    Args:
        tokenizer: Tokenizer used as in :func:`encode_text`.
        text: Text to draw from.
        samples: Number of windows.
        seqlen: Tokens per window.
        seed: Seed of the window positions.

    Returns:
        int64 tensor ``[samples, seqlen]``.

    Raises:
        DataError: ``samples`` or ``seqlen`` is not positive, or the text has fewer than
            ``seqlen`` tokens.
    """
    if samples < 1 or seqlen < 1:
        raise DataError(f"need samples >= 1 and seqlen >= 1, got {samples} and {seqlen}")
    ids = encode_text(tokenizer, text)
    if ids.numel() < seqlen:
        raise DataError(f"text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
