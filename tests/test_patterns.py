"""Norm, residual-stream and writer patterns on every tiny family and on hand-built graphs."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from qcompile.capture import capture
from qcompile.errors import UnsupportedGraphError
from qcompile.graph import get_attr_value
from qcompile.patterns import (
    find_norms,
    find_residual_stream,
    head_linear,
    linear_name,
    stream_writers,
    strip_casts,
)
from qcompile.testing import FAMILIES, tiny_model

_CAPTURED: dict[str, tuple[nn.Module, fx.GraphModule]] = {}

# family -> (norms, kind, offset, residual adds, writers, post-norms, q/k norms)
EXPECTED = {
    "llama": (5, "rms", 0.0, 4, 4, 0, 0),
    "llama-tied": (5, "rms", 0.0, 4, 4, 0, 0),
    "mistral": (5, "rms", 0.0, 4, 4, 0, 0),
    "qwen2": (5, "rms", 0.0, 4, 4, 0, 0),
    "phi3": (5, "rms", 0.0, 4, 4, 0, 0),
    "gemma2": (9, "rms", 1.0, 4, 4, 4, 0),
    "gemma3": (13, "rms", 1.0, 4, 4, 4, 4),
    "phi": (3, "layer", 0.0, 2, 4, 0, 0),
}


def _captured(family: str) -> tuple[nn.Module, fx.GraphModule]:
    if family not in _CAPTURED:
        model = tiny_model(family)
        _CAPTURED[family] = (model, capture(model))
    return _CAPTURED[family]


def _values(gm: fx.GraphModule, nodes: list[fx.Node], ids: torch.Tensor) -> dict:
    """Run ``gm`` and keep the values of ``nodes``."""
    keep = set(nodes)
    seen: dict[fx.Node, torch.Tensor] = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in keep:
                seen[n] = out.detach()
            return out

    with torch.no_grad():
        Keep(gm).run(ids)
    return seen


def test_expected_table_covers_every_family():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_norms_found_with_kind_offset_and_readers(family):
    _, gm = _captured(family)
    count, kind, offset, _, _, posts, qk = EXPECTED[family]
    norms = find_norms(gm)
    assert len(norms) == count
    for norm in norms:
        assert norm.kind == kind and norm.offset == offset
        assert norm.weight is not None and norm.weight.op == "get_attr"
        assert (norm.bias is not None) == (kind == "layer")
        assert norm.eps in (1e-5, 1e-6)
        assert norm.output in norm.nodes and norm.input not in norm.nodes
        assert norm.dim == get_attr_value(gm, str(norm.weight.target)).shape[0]
    with_linears = [n for n in norms if n.consumers]
    assert all(not n.other_users for n in with_linears)
    assert len(norms) - len(with_linears) == posts + qk
    for norm in with_linears:
        assert all(c.target is torch.ops.aten.linear.default for c in norm.consumers)


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_semantics_match_the_recorded_parameters(family):
    """Recompute every norm's output from its input, eps, gamma (+offset) and beta."""
    _, gm = _captured(family)
    norms = find_norms(gm)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    vals = _values(gm, [n for norm in norms for n in (norm.input, norm.output)], ids)
    for norm in norms:
        x = vals[norm.input].double()
        if norm.kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        want = want * norm.scale(gm).double()
        if norm.bias is not None:
            want = want + norm.shift(gm).double()
        torch.testing.assert_close(vals[norm.output].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_stream_and_writers(family):
    _, gm = _captured(family)
    _, _, _, adds, writers, posts, _ = EXPECTED[family]
    norms = find_norms(gm)
    stream = find_residual_stream(gm, norms)
    assert stream.embedding is not None
    assert stream.embedding.target is torch.ops.aten.embedding.default
    assert len(stream.adds) == adds
    assert stream.final_norm is norms[-1] and stream.final_norm.consumers == (stream.head,)
    assert stream.head is head_linear(gm) and linear_name(stream.head) == "lm_head"
    assert not stream.other_readers
    assert len(stream.pre_norms) == (4 if family != "phi" else 2)
    assert all(strip_casts(n.input) in {stream.start, *stream.adds} for n in stream.pre_norms)
    if family.startswith("gemma"):  # sqrt(hidden) embedding scale sits on the start path
        assert [n.target for n in stream.start_path] == [torch.ops.aten.mul.Tensor]
    else:
        assert stream.start is stream.embedding and not stream.start_path
    found = stream_writers(stream, norms)
    assert len(found) == writers and all(w.reason is None for w in found)
    assert all(w.linear.target is torch.ops.aten.linear.default for w in found)
    assert sum(w.post_norm is not None for w in found) == posts
    for w in found:  # a post-norm reads the writer's output and feeds the residual add
        if w.post_norm is not None:
            assert w.post_norm.input is w.linear and w.post_norm.other_users == (w.add,)


# ----------------------------------------------------------------------- hand-built graphs


class _Tiny(nn.Module):
    """embedding -> residual block with a hand-written norm -> norm -> head."""

    def __init__(self, norm: str, feed: str = "linear") -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.randn(8))
        self.up = nn.Linear(8, 8)
        self.head = nn.Linear(8, 32)
        self.norm, self.feed = norm, feed

    def _norm(self, x):
        if self.norm == "div_sqrt":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * self.w
        if self.norm == "decomposed_ln":
            xc = x - x.mean(-1, keepdim=True)
            return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w + self.b
        if self.norm == "mean_over_seq":  # not a norm: the mean runs over the sequence
            return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5) * self.w
        return x * torch.rsqrt(x.abs() + 1.0)  # not a norm: no mean square

    def forward(self, ids):
        x = self.emb(ids)
        h = self._norm(x)
        branch = self.up(h) if self.feed == "linear" else torch.tanh(h)
        x = x + branch
        return self.head(self._norm(x))


def _tiny(norm: str, feed: str = "linear") -> fx.GraphModule:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return capture(_Tiny(norm, feed))


@pytest.mark.parametrize("norm, kind, bias", [("div_sqrt", "rms", False),
                                               ("decomposed_ln", "layer", True)])
def test_hand_written_norm_forms_are_found(norm, kind, bias):
    gm = _tiny(norm)
    norms = find_norms(gm)
    assert len(norms) == 2
    assert all(n.kind == kind and (n.bias is not None) == bias for n in norms)
    assert norms[0].consumers and linear_name(norms[0].consumers[0]) == "up"
    assert norms[1].consumers and linear_name(norms[1].consumers[0]) == "head"
    assert norms[0].eps == pytest.approx(1e-5)


@pytest.mark.parametrize("norm", ["mean_over_seq", "abs"])
def test_near_misses_are_not_norms(norm):
    assert find_norms(_tiny(norm)) == []


def test_norm_feeding_a_non_linear_is_found_with_other_users():
    gm = _tiny("div_sqrt", feed="tanh")
    first = find_norms(gm)[0]
    assert not first.consumers
    assert [u.target for u in first.other_users] == [torch.ops.aten.tanh.default]


def test_head_must_be_a_linear():
    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 8)

        def forward(self, ids):
            return torch.softmax(self.emb(ids), -1)

    with pytest.raises(UnsupportedGraphError, match="softmax"):
        head_linear(capture(NoHead()))


def test_stream_needs_a_residual_add():
    class NoResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 8)
            self.head = nn.Linear(8, 32)

        def forward(self, ids):
            return self.head(self.emb(ids))

    with pytest.raises(UnsupportedGraphError, match="no residual add"):
        find_residual_stream(capture(NoResidual()))
