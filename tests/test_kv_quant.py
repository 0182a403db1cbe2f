"""KV-cache quantization (``quantize{kv=...}``): structure on every family, numerics against
a hand-written attention that fake-quantizes K and V itself.

The reference quantizes K/V *after* the GQA head repeat; the pass quantizes them *before* it
(what a cache stores). Equal outputs show the two are the same function.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile.ops  # noqa: F401
from qcompile.attention import find_attention
from qcompile.capture import capture
from qcompile.errors import FormatError, PipelineError, UnsupportedGraphError
from qcompile.formats import fake_quantize, parse_format
from qcompile.hadamard import hadamard_matrix
from qcompile.manager import PassManager
from qcompile.pipeline import parse_pipeline
from qcompile.testing import FAMILIES, tiny_model

QACT = torch.ops.qcompile.quantize_activation.default
HAD = torch.ops.qcompile.hadamard.default


class _AttnLM(nn.Module):
    """Embedding, one causal GQA attention block with a residual, and a head."""

    def __init__(self, eager: bool = False, kv_fmt: str | None = None, rotate_qk: bool = False,
                 heads: int = 4, kv_heads: int = 2, d: int = 16, hidden: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.heads, self.kv_heads, self.d, self.eager = heads, kv_heads, d, eager
        self.spec = parse_format(kv_fmt) if kv_fmt else None
        self.rotate_qk = rotate_qk
        self.embed = nn.Embedding(256, hidden)
        self.q = nn.Linear(hidden, heads * d, bias=False)
        self.k = nn.Linear(hidden, kv_heads * d, bias=False)
        self.v = nn.Linear(hidden, kv_heads * d, bias=True)
        self.o = nn.Linear(heads * d, hidden, bias=False)
        self.head = nn.Linear(hidden, 256, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.d).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.d).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, rep, s, self.d).reshape(b, self.heads, s, self.d)
        v = v[:, :, None].expand(b, self.kv_heads, rep, s, self.d).reshape(b, self.heads, s, self.d)
        if self.rotate_qk:
            h = hadamard_matrix(self.d, dtype=x.dtype)
            q, k = q @ h, k @ h
        if self.spec is not None:  # after the repeat, unlike the pass
            k, v = fake_quantize(k, self.spec), fake_quantize(v, self.spec)
        if self.eager:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d)
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            out = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.d)
        return self.head(x + self.o(out))


class _NoAttnLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(256, 32), nn.Linear(32, 256)

    def forward(self, input_ids):
        return self.head(torch.relu(self.embed(input_ids)))


def _ids(seq: int = 23) -> torch.Tensor:
    return torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(1))


def _run(gm, pipeline):
    return PassManager(pipeline).run(gm)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_quant_nodes_per_attention_on_cached_k_and_v(family):
    gm = capture(tiny_model(family))
    sites = find_attention(gm)
    cached = {n for s in sites for n in (s.k[0], s.v[0])}
    gm, report = _run(gm, "quantize{kv=int4/token/asym}")
    quants = [n for n in gm.graph.nodes if n.target is QACT]
    assert len(quants) == 2 * len(sites) == 4
    assert {q.args[0] for q in quants} == cached and all(q.args[1] == "int4/token/asym"
                                                         for q in quants)
    facts = report["passes"][0]["facts"]
    assert facts["kv_quant_nodes"] == 4 and facts["kv_attention_sites"] == 2
    assert "act_quant_nodes" not in facts and report["passes"][0]["modified"] is True


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
@pytest.mark.parametrize("fmt", ["int4/g8/asym", "fp4_e2m1/token", "int8/token", "int4/token"])
def test_numerics_match_hand_written_reference(eager, fmt):
    ids = _ids()
    gm = capture(_AttnLM(eager=eager))
    gm, _ = _run(gm, f"quantize{{kv={fmt}}}")
    with torch.no_grad():
        ref = _AttnLM(eager=eager, kv_fmt=fmt)(ids)
        plain = _AttnLM(eager=eager)(ids)
        out = gm(ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)  # the quantization did something


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_kv_quant_after_r3_hadamard(eager):
    ids = _ids()
    gm = capture(_AttnLM(eager=eager))
    gm, _ = _run(gm, "rotate{r1=none r2=none r4=none},quantize{kv=int4/token/asym}")
    k_quant = [n for n in gm.graph.nodes if n.target is QACT and n.args[0].target is HAD]
    assert len(k_quant) == 1  # K: hadamard -> quantize -> repeat
    with torch.no_grad():
        ref = _AttnLM(eager=eager, kv_fmt="int4/token/asym", rotate_qk=True)(ids)
        out = gm(ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_hand_written_attention_structure_is_found():
    for eager in (False, True):
        (site,) = find_attention(capture(_AttnLM(eager=eager)))
        assert (site.kind, site.heads, site.kv_heads, site.head_dim) == (
            "eager" if eager else "sdpa", 4, 2, 16)
        assert site.v_proj.width == 32 and site.o_proj is not None and not site.problems
        assert site.q_proj is not None and site.k_proj is not None


def test_graph_without_attention_raises():
    gm = capture(_NoAttnLM())
    with pytest.raises(UnsupportedGraphError, match="no attention"):
        _run(gm, "quantize{kv=int4/token}")


def test_kv_option_text():
    text = "quantize{w=int4/channel a=int4/token kv=int4/g64/asym}"
    assert str(parse_pipeline(text)) == text
    assert str(parse_pipeline("quantize{kv=INT4/G64/ASYM}")) == "quantize{kv=int4/g64/asym}"
    with pytest.raises(FormatError, match="kv format"):
        parse_pipeline("quantize{kv=int4/channel}")
    with pytest.raises(PipelineError, match="kv=<format>"):
        parse_pipeline("quantize")
