"""ONNX lowerings of the indexing, matmul, normalization and attention aten ops.

``scaled_dot_product_attention`` is ``softmax(q k^T * scale + mask) v``; boolean masks select
(``Where`` with ``-inf``), float masks add, ``is_causal`` builds the lower-triangular mask
aligned to the end of the keys (so it also serves a KV-cache decode step).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from qcompile.backends.onnx.aten import _args, register
from qcompile.backends.onnx.translate import Translator
from qcompile.errors import UnsupportedGraphError

__all__ = ["attention"]

aten = torch.ops.aten


# -- indexing ----------------------------------------------------------------------------------

@register(aten.embedding.default)
def _embedding(t: Translator, node: fx.Node) -> str:
    w, ids = node.args[0], node.args[1]
    return t.b.op("Gather", [t.val(w), t.val(ids)], node.name, axis=0)


@register(aten.index.Tensor)
def _index(t: Translator, node: fx.Node) -> str:
    x, indices = node.args
    used = [i for i, idx in enumerate(indices) if idx is not None]
    if len(used) == 1:
        return t.b.op("Gather", [t.val(x), t.val(indices[used[0]], torch.int64)], node.name,
                      axis=used[0])
    if used != list(range(len(used))):
        raise UnsupportedGraphError(
            f"node {node.name}: advanced indexing with gaps between index tensors has no lowering"
        )
    idx = [t.val(indices[i], torch.int64) for i in used]
    total = idx[0]
    for other in idx[1:]:
        total = t.b.op("Add", [total, other])
    shape = t.b.op("Shape", [total])
    last = t.b.const([-1])
    stacked = t.b.op("Concat", [t.b.op("Unsqueeze", [t.b.op("Expand", [i, shape]), last])
                                for i in idx], axis=-1)
    return t.b.op("GatherND", [t.val(x), stacked], node.name)


# -- matmul, norms, attention ------------------------------------------------------------------

@register(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _matmul(t: Translator, node: fx.Node) -> str:
    return t.b.op("MatMul", [t.val(node.args[0]), t.val(node.args[1])], node.name)


@register(aten.layer_norm.default)
def _layer_norm(t: Translator, node: fx.Node) -> str:
    a = _args(node, ("input", "normalized_shape", "weight", "bias", "eps"),
              {"weight": None, "bias": None, "eps": 1e-5})
    x = t.val(a["input"])
    dims = len(a["normalized_shape"])
    inputs = [x]
    if a["weight"] is not None:
        inputs.append(t.val(a["weight"]))
    else:
        ones = np.ones([int(s) for s in a["normalized_shape"]], dtype=np.float32)
        inputs.append(t.b.const(ones, np.float32))
    if a["bias"] is not None:
        inputs.append(t.val(a["bias"]))
    return t.b.op("LayerNormalization", inputs, node.name, axis=-dims, epsilon=float(a["eps"]))


@register(aten.scaled_dot_product_attention.default)
def _sdpa(t: Translator, node: fx.Node) -> str:
    a = _args(node, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
              {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None})
    if a.get("enable_gqa"):
        raise UnsupportedGraphError(f"node {node.name}: SDPA with enable_gqa has no lowering")
    q, k, v = t.val(a["query"]), t.val(a["key"]), t.val(a["value"])
    mask = a["attn_mask"]
    mask_val = t.val(mask) if mask is not None else None
    return attention(t, q, k, v, mask_val, mask is not None and t.dtype(mask) == torch.bool,
                     bool(a["is_causal"]), a["scale"], _head_dim(t, a["query"]), node.name)


def _head_dim(t: Translator, q: fx.Node) -> int:
    shape = t.shape(q)
    if shape is None or not shape[-1].isdigit():
        raise UnsupportedGraphError(f"attention query {q.name} has no static head dim")
    return int(shape[-1])


def attention(t: Translator, q: str, k: str, v: str, mask: str | None, bool_mask: bool,
              causal: bool, scale: float | None, head_dim: int, name: str) -> str:
    """``softmax(q @ k^T * scale + mask) @ v`` (boolean masks select, float masks add)."""
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    scores = t.b.op("MatMul", [q, t.b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = t.b.op("Mul", [scores, t.b.const(scale, np.float32)])
    ninf = t.b.const(-np.inf, np.float32)
    if causal:
        # query i (of Lq) sees key j (of Lk) when j <= i + (Lk - Lq)
        lq = t.b.op("Squeeze", [t.b.op("Shape", [q], start=-2, end=-1), t.b.const([0])])
        lk = t.b.op("Squeeze", [t.b.op("Shape", [k], start=-2, end=-1), t.b.const([0])])
        one, zero = t.b.const(1), t.b.const(0)
        qi = t.b.op("Add", [t.b.op("Range", [zero, lq, one]), t.b.op("Sub", [lk, lq])])
        kj = t.b.op("Range", [zero, lk, one])
        keep = t.b.op("LessOrEqual", [t.b.op("Unsqueeze", [kj, t.b.const([0])]),
                                      t.b.op("Unsqueeze", [qi, t.b.const([1])])])
        scores = t.b.op("Where", [keep, scores, ninf])
    if mask is not None:
        scores = (t.b.op("Where", [mask, scores, ninf]) if bool_mask
                  else t.b.op("Add", [scores, mask]))
    probs = t.b.op("Softmax", [scores], axis=-1)
    return t.b.op("MatMul", [probs, v], name)


@register(aten.linear.default)
def _linear(t: Translator, node: fx.Node) -> str:
    from qcompile.backends.onnx.qops import linear

    return linear(t, node)
