"""Fused lowerings: attention, RMSNorm and RoPE as single opset-23 standard ops.

A captured decoder spells attention, RMSNorm and rotary embeddings as chains of small aten ops
(SDPA with a materialized causal mask and a GQA head repeat, ``x * rsqrt(mean(x^2) + eps) *
w``, ``x cos + rotate_half(x) sin``). Emitted one for one, a SmolLM2 decode step is some 2,300
ONNX nodes whose per-node cost rivals the matmuls. Opset 23 has standard ops for all three,
which ONNX Runtime (1.23+) runs as single kernels and ``onnx.reference`` knows:

* ``Attention`` (4-D ``[batch, heads, seq, head_dim]`` inputs): query/key/value, the cached
  key/value *before* the GQA head repeat (the op maps query head ``h`` to kv head
  ``h // n_rep``, as the repeat does), ``is_causal=1`` and the graph's scale. In a KV-cache
  export it also takes ``past_key``/``past_value`` and returns ``present_key``/
  ``present_value``, its causal mask aligned to the end of the keys;
* ``RMSNormalization`` (axis -1, the norm's epsilon and effective scale ``weight + offset``);
* ``RotaryEmbedding`` with 3-D ``[batch, seq, head_dim / 2]`` cos/sin caches (no position ids),
  the halves of the graph's own ``cos(cat(f, f))`` / ``sin(cat(f, f))`` tables, computed once
  per model.

Each pattern is checked before it is replaced and left as it is otherwise: attention only when
a probe shows every SDPA mask is plainly causal (no sliding window, no padding; dropout 0),
RoPE only when the cos/sin tables are provably two equal halves (``cat([f, f], -1)`` through
``cos``/``sin``, a scalar scale and casts) and the rotation is the half-split ``rotate_half``
over the whole head. Nodes of a replaced pattern that nothing else reads are pruned with the
rest of the dead graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from qcompile.attention import AttentionSite, find_attention
from qcompile.backends.onnx.translate import Translator
from qcompile.errors import UnsupportedGraphError
from qcompile.patterns import _call, _last_dim, _ndim, find_norms, is_cast

__all__ = ["FusionPlan", "attention_node", "plan_fusions"]

aten = torch.ops.aten
_OPSET = 23
_INT_MAX = 2**62


@dataclass
class FusionPlan:
    """What was fused and what was not (with reasons), for the export report."""

    attention: int = 0
    rmsnorm: int = 0
    rope: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def plan_fusions(t: Translator, *, causal: dict[fx.Node, bool] | None = None) -> FusionPlan:
    """Install the fused handlers on ``t`` (node overrides); the export then translates.

    Args:
        t: The translator, before :meth:`Translator.run`.
        causal: SDPA node -> whether a probe showed its mask is plainly causal
            (:func:`~qcompile.backends.onnx.kv.causal_masks`); None leaves attention alone
            (the KV-cache plan fuses it itself).
    """
    plan = FusionPlan()
    if causal is not None:
        for site in find_attention(t.gm):
            reason = fusable_attention(site)
            if not reason and not causal.get(site.node, False):
                reason = "its mask is not plainly causal on a probe (sliding window, padding?)"
            if reason:
                plan.skipped[f"attention {site.name}"] = reason
                continue
            t.node_override[site.node] = _attention_handler(site)
            plan.attention += 1
    for norm in find_norms(t.gm):
        if norm.kind != "rms":
            continue
        t.node_override[norm.output] = _rms_handler(norm)
        plan.rmsnorm += 1
    tables: dict[fx.Node, str] = {}
    for node in t.gm.graph.nodes:
        match = _match_rope(node)
        if match is not None:
            t.node_override[node] = _rope_handler(match, tables)
            plan.rope += 1
    if plan.attention or plan.rmsnorm or plan.rope:
        t.b.require(_OPSET, "fused Attention / RMSNormalization / RotaryEmbedding")
    return plan


# -- attention ---------------------------------------------------------------------------------

def fusable_attention(site: AttentionSite) -> str:
    """Empty if ``site`` can be one ``Attention`` node, else why not."""
    if site.kind != "sdpa":
        return "eager attention (matmul/softmax), not SDPA"
    args = _sdpa_args(site.node)
    if float(args.get("dropout_p") or 0.0) != 0.0:
        return "dropout"
    if site.heads % site.kv_heads:
        return f"{site.heads} query heads are not a multiple of {site.kv_heads} kv heads"
    for label, node in (("query", site.q[0]), ("key", site.k[0]), ("value", site.v[0])):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 4:
            return f"{label} is not a 4-D [batch, heads, seq, head_dim] tensor"
    return ""


def _sdpa_args(node: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    return dict(zip(names, node.args, strict=False), **node.kwargs)


def attention_node(t: Translator, site: AttentionSite, past: tuple[str, str] | None = None
                   ) -> list[str]:
    """Emit ``Attention`` for ``site``: ``[y]``, or ``[y, present_key, present_value]``."""
    scale = _sdpa_args(site.node).get("scale")
    scale = 1.0 / math.sqrt(site.head_dim) if scale is None else float(scale)
    inputs = [t.val(site.q[0]), t.val(site.k[0]), t.val(site.v[0])]
    if past is not None:
        inputs += ["", past[0], past[1]]
    t.b.require(_OPSET, "fused Attention / RMSNormalization / RotaryEmbedding")
    outs = t.b.op("Attention", inputs, site.node.name, outputs=3 if past else 1, is_causal=1,
                  scale=scale)
    return outs if past else [outs]


def _attention_handler(site: AttentionSite):
    def handler(t: Translator, node: fx.Node) -> str:
        return attention_node(t, site)[0]
    return handler


# -- RMSNorm -----------------------------------------------------------------------------------

def _rms_handler(norm):
    def handler(t: Translator, node: fx.Node) -> str:
        if norm.weight is None:
            dim = norm.dim
            if dim is None:
                raise UnsupportedGraphError(f"RMSNorm {norm.name}: no static normalized size")
            scale = t.b.const(np.ones(dim, np.float32), np.float32)
        elif norm.offset == 0.0:
            scale = t.weight(str(norm.weight.target))
        else:
            scale = t.b.initializer(f"{norm.name}.scale", norm.scale(t.gm).numpy())
        return t.b.op("RMSNormalization", [t.val(norm.input), scale], node.name, axis=-1,
                      epsilon=float(norm.eps))
    return handler


# -- RoPE --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rope:
    x: fx.Node
    cos: fx.Node  # [batch, seq, head_dim] table (before the head-axis unsqueeze)
    sin: fx.Node
    half: int


def _is_last_dim(node: fx.Node, dim: object) -> bool:
    nd = _ndim(node)
    return isinstance(dim, int) and nd is not None and dim % nd == nd - 1


def _slice(node: object, of: fx.Node, start: int, end: int) -> bool:
    if not _call(node, aten.slice.Tensor) or node.args[0] is not of:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    dim, lo, hi, step = args[1], args[2] or 0, args[3], args[4] or 1
    return (_is_last_dim(of, dim) and lo == start and step == 1
            and (hi == end or (end == _INT_MAX and isinstance(hi, int) and hi >= _last_dim(of))))


def _rotate_half_of(node: object) -> fx.Node | None:
    """``x`` if ``node`` is ``cat([-x[..., h:], x[..., :h]], -1)`` over the whole last dim."""
    if not _call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    neg, first = node.args[0]
    if not _call(neg, aten.neg.default) or not _call(first, aten.slice.Tensor):
        return None
    x = first.args[0]
    d = _last_dim(x)
    dim = node.args[1] if len(node.args) > 1 else 0
    if d is None or d % 2 or not _is_last_dim(node, dim):
        return None
    if _slice(first, x, 0, d // 2) and _slice(neg.args[0], x, d // 2, _INT_MAX):
        return x
    return None


def _strip(node: object) -> object:
    while isinstance(node, fx.Node) and is_cast(node):
        node = node.args[0]
    return node


def _table(node: object, fn: object) -> tuple[fx.Node, fx.Node, float] | None:
    """``unsqueeze(T, 1)`` with ``T = cast(fn(cat([f, f], -1)) [* c])``: (T, cat, c)."""
    if not _call(node, aten.unsqueeze.default) or node.args[1] != 1:
        return None
    table = node.args[0]
    inner = _strip(table)
    scale = 1.0
    if _call(inner, aten.mul.Tensor) and isinstance(inner.args[1], (int, float)):
        scale, inner = float(inner.args[1]), _strip(inner.args[0])
    if not _call(inner, fn):
        return None
    cat = inner.args[0]
    if not _call(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    a, b = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else 0
    if a is not b or not _is_last_dim(cat, dim) or _ndim(table) != 3:
        return None
    return table, cat, scale


def _match_rope(node: fx.Node) -> _Rope | None:
    """``x * unsqueeze(cos, 1) + rotate_half(x) * unsqueeze(sin, 1)`` (either operand order)."""
    if not _call(node, aten.add.Tensor) or len(node.args) != 2:
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        if not (_call(plain, aten.mul.Tensor) and _call(rotated, aten.mul.Tensor)):
            continue
        for x, c in (plain.args, plain.args[::-1]):
            for r, s in (rotated.args, rotated.args[::-1]):
                if not isinstance(x, fx.Node) or _ndim(x) != 4 or _rotate_half_of(r) is not x:
                    continue
                cos, sin = _table(c, aten.cos.default), _table(s, aten.sin.default)
                if cos is None or sin is None or cos[1] is not sin[1] or cos[2] != sin[2]:
                    continue
                d = _last_dim(x)
                if d is None or _last_dim(cos[0]) != d:
                    continue
                return _Rope(x, cos[0], sin[0], d // 2)
    return None


def _rope_handler(match: _Rope, tables: dict[fx.Node, str]):
    def half_table(t: Translator, table: fx.Node) -> str:
        # computed once per model: the first half of the table, expanded to the batch of the
        # rotated tensor (HF tables have batch 1 and broadcast; the op wants the batch)
        if table not in tables:
            half = t.b.op("Slice", [t.val(table), t.b.const([0]), t.b.const([match.half]),
                                    t.b.const([-1])], f"{table.name}.half")
            batch = t.b.op("Shape", [t.val(match.x)], start=0, end=1)
            rest = t.b.op("Shape", [half], start=1, end=3)
            shape = t.b.op("Concat", [batch, rest], axis=0)
            tables[table] = t.b.op("Expand", [half, shape], f"{table.name}.rope")
        return tables[table]

    def handler(t: Translator, node: fx.Node) -> str:
        cos, sin = half_table(t, match.cos), half_table(t, match.sin)
        return t.b.op("RotaryEmbedding", [t.val(match.x), cos, sin], node.name)
    return handler
