"""Perplexity on fixed, non-overlapping token windows.

The protocol (the one behind the figures in DESIGN.md): tokenize the whole text once with no
special tokens (no BOS is prepended, to the text or to windows), cut it into consecutive
non-overlapping windows of ``seqlen`` tokens, keep the first ``windows`` of them, and score
each window on its own: tokens 1..L-1 are predicted from tokens 0..L-2, so every window
contributes ``seqlen - 1`` predictions and its first token only serves as context.
Perplexity is ``exp`` of the mean token negative log-likelihood over all windows.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.data import DataError, encode_text

__all__ = ["perplexity", "tokenize_windows"]


def tokenize_windows(tokenizer: Any, text: str, seqlen: int, windows: int | None) -> torch.Tensor:
    """Cut ``text`` into its first ``windows`` non-overlapping windows of ``seqlen`` tokens.

    Tokenization adds no special tokens and is cached per tokenizer
    (see :func:`qcompile.data.encode_text`); a trailing partial window is dropped.

    Args:
        tokenizer: A Hugging Face tokenizer (or anything :func:`~qcompile.data.encode_text`
            accepts).
        text: The evaluation text.
        seqlen: Tokens per window (at least 2).
        windows: How many windows to keep; ``None`` keeps every full window.

    Returns:
        int64 tensor ``[windows, seqlen]``.

    Raises:
        DataError: ``seqlen < 2``, ``windows < 1``, or the text has fewer full windows.
    """
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2 to predict anything, got {seqlen}")
    if windows is not None and windows < 1:
        raise DataError(f"windows must be at least 1 or None, got {windows}")
    ids = encode_text(tokenizer, text)
    available = ids.numel() // seqlen
    count = available if windows is None else windows
    if count > available or count == 0:
        raise DataError(
            f"text has {ids.numel()} tokens, only {available} full window(s) of {seqlen}; "
            f"asked for {count} (pass windows=None to use all)"
        )
    return ids[: count * seqlen].view(count, seqlen)


def _device_of(model_fn: Callable[..., Any]) -> torch.device:
    if isinstance(model_fn, nn.Module):
        for t in model_fn.parameters():
            return t.device
        for t in model_fn.buffers():
            return t.device
    return torch.device("cpu")


def _as_logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"model returned {type(out).__name__}; expected a logits tensor")


def perplexity(
    model_fn: Callable[[torch.Tensor], Any],
    tokenizer: Any,
    text: str,
    *,
    seqlen: int = 512,
    windows: int | None = 40,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model_fn`` on ``text`` (protocol in the module docstring).

    Args:
        model_fn: Maps int64 ``input_ids [1, seqlen]`` to logits ``[1, seqlen, vocab]``: a
            captured GraphModule, an ``nn.Module`` (an output with ``.logits`` is accepted)
            or a plain function.
        tokenizer: Tokenizer of the model.
        text: Evaluation text, e.g. ``qcompile.data.load_text("wikitext2")``.
        seqlen: Tokens per window.
        windows: Number of windows (the first ones); ``None`` uses all full windows.
        progress: Show a tqdm bar on stderr.
        device: Where the inputs go; default: the module's parameter device, else CPU.

    Returns:
        ``{"ppl", "nll" (mean token NLL, nats), "tokens" (predicted tokens),
        "windows", "seqlen", "seconds" (wall time of the model calls)}``.

    Raises:
        DataError: The text is too short for the requested windows.
    """
    from tqdm.auto import tqdm

    batches = tokenize_windows(tokenizer, text, seqlen, windows)
    dev = torch.device(device) if device is not None else _device_of(model_fn)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for row in tqdm(
            batches, desc="perplexity", unit="win", disable=not progress, file=sys.stderr
        ):
            ids = row.unsqueeze(0).to(dev)
            logits = _as_logits(model_fn(ids))
            # Per-token NLL in float32 (exact enough), summed in float64 so 20k tokens don't drift.
            nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
            total += nll.double().sum().cpu()
            count += nll.numel()
    seconds = time.perf_counter() - start
    mean = float(total) / count
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": count,
        "windows": int(batches.shape[0]),
        "seqlen": seqlen,
        "seconds": seconds,
    }
