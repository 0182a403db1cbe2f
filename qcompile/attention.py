"""Attention structure in captured graphs, and KV-cache quantization on it.

:func:`find_attention` finds every attention by dataflow (never by module names):

* SDPA: ``aten.scaled_dot_product_attention(q, k, v, ...)``.
* Eager: ``matmul(q, transpose(k, -2, -1))`` -> scaling / soft-capping / mask ops ->
  ``softmax`` -> casts -> ``matmul(probs, v)``.

From the attention inputs it walks back:

* through a GQA head repeat -- ``reshape(expand(unsqueeze(x, 2)))`` (Hugging Face's
  ``repeat_kv``) or ``repeat_interleave(x, n, dim=1)`` -- to the key/value *as a KV cache would
  store them* (``[batch, kv_heads, seq, head_dim]``, after RoPE); the repeat maps query head
  ``h`` to kv head ``h // n_rep``;
* from the value through the head split ``transpose(1, 2)`` <- ``view([b, s, kv_heads, d])``
  (casts and ``contiguous`` allowed) and a slice / ``split`` / ``chunk`` of a fused projection
  to the value projection: a linear and the row range of its output that is V (a problem is
  recorded when anything but disjoint slices / other split items also reads those rows);
* from queries and keys back through RoPE and q/k norms (elementwise ops, slices, ``cat``) to
  the single linear that produced them (reported, not needed for rewriting);

and forward from the attention output through the head merge (``transpose(1, 2)``, casts,
``contiguous``, a reshape ``[.., heads, d] -> [.., heads * d]``) to the output projection.
A walk that meets anything else records why in :attr:`AttentionSite.problems` instead.

:func:`quantize_kv` inserts ``qcompile::quantize_activation`` on the cached K and V.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.errors import UnsupportedGraphError
from qcompile.graph import is_linear

__all__ = ["AttentionSite", "Projection", "find_attention", "insert_on_edge", "quantize_kv"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

_SDPA = {aten.scaled_dot_product_attention.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
          aten.contiguous.default, aten.clone.default, aten.dropout.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Ops between the score matmul and softmax: scaling, soft-capping, masking.
_SCORE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor,
              aten.tanh.default, aten.masked_fill.Scalar, aten.where.self, *_CASTS}
# Ops RoPE and q/k norms are made of (walked back to find the q/k projection).
_QK_OPS = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.cat.default,
           aten.slice.Tensor, aten.transpose.int, aten.pow.Tensor_Scalar, aten.mean.dim,
           aten.rsqrt.default, aten.div.Tensor, aten.unsqueeze.default, *_VIEWS, *_CASTS}

_GETITEM = operator.getitem
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}

Edge = tuple[fx.Node, fx.Node]  # (producer, consumer)


@dataclass(frozen=True)
class Projection:
    """The rows of a linear's output that hold one of q/k/v (all of them unless fused).

    Attributes:
        linear: The ``aten.linear`` node.
        start: First output feature of the projection.
        width: Number of output features (heads * head_dim).
        path: Nodes from the linear (exclusive) to the cached value (inclusive).
    """

    linear: fx.Node
    start: int
    width: int
    path: tuple[fx.Node, ...] = ()


@dataclass
class AttentionSite:
    """One attention in a graph.

    Attributes:
        node: The SDPA node, or the eager ``matmul(probs, v)``.
        kind: ``"sdpa"`` or ``"eager"``.
        q: Edge (query value, attention node or eager score matmul) as attention reads it.
        k: Edge (cached key: after RoPE, before the GQA repeat; its reader on the way).
        v: Edge (cached value, its reader on the way).
        heads: Query heads; ``kv_heads``: key/value heads; ``head_dim`` of q/k;
            ``v_head_dim`` of v.
        v_proj: Where V is computed, or None (``problems["v_proj"]`` says why).
        o_proj: The output projection linear, or None (``problems["o_proj"]`` says why).
        q_proj, k_proj: The linears producing q and k, when found.
        problems: Why a walk stopped, per walk.
    """

    node: fx.Node
    kind: str
    q: Edge
    k: Edge
    v: Edge
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    v_proj: Projection | None = None
    o_proj: fx.Node | None = None
    q_proj: fx.Node | None = None
    k_proj: fx.Node | None = None
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Readable name: the attention node's source module, else its node name."""
        return self.node.meta.get("source_module") or self.node.name

    @property
    def n_rep(self) -> int:
        """Query heads per kv head."""
        return self.heads // self.kv_heads


def _call(node: object, targets: set) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _int(x: object) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _last_two_swapped(node: fx.Node) -> bool:
    if node.target is aten.transpose.int:
        nd = len(_shape(node.args[0]) or ())
        return {d % nd for d in node.args[1:3]} == {nd - 2, nd - 1} if nd else False
    return False


def _skip_repeat(x: fx.Node, reader: fx.Node) -> tuple[fx.Node, fx.Node, int]:
    """(cached value, its reader, n_rep) under a GQA repeat ending at ``x``."""
    if _call(x, _VIEWS) and _call(x.args[0], {aten.expand.default}):
        unsq = x.args[0].args[0]
        if _call(unsq, {aten.unsqueeze.default}) and unsq.args[1] in (2, -3):
            rep = _int(_shape(x.args[0])[2])
            if rep is not None:
                return unsq.args[0], unsq, rep
    if _call(x, {aten.repeat_interleave.self_int}):
        dim = x.args[2] if len(x.args) > 2 else x.kwargs.get("dim")
        if dim == 1:
            return x.args[0], x, int(x.args[1])
    return x, reader, 1


def _eager_pair(softmax: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(score matmul, output matmul) around an eager softmax, or None."""
    stack, seen, scores = [softmax.args[0]], set(), None
    while stack and scores is None:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if _call(n, _MATMUL) and _last_two_swapped(n.args[1]):
            scores = n
        elif _call(n, _SCORE_OPS):
            stack.extend(n.all_input_nodes)
    node = softmax
    while scores is not None and len(node.users) == 1:
        (user,) = node.users
        if _call(user, _MATMUL) and user.args[0] is node:
            return scores, user
        if not _call(user, _CASTS):
            break
        node = user
    return None


def _source_linear(x: fx.Node, limit: int = 64) -> fx.Node | None:
    """The one linear q or k comes from through RoPE / q-k norm ops, else None."""
    stack, seen, found = [x], set(), set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_linear(n):
            found.add(n)
        elif _call(n, _QK_OPS):
            stack.extend(a for a in n.all_input_nodes if a.op != "get_attr")
    return found.pop() if len(found) == 1 else None


def _v_projection(cache: fx.Node, head_dim: int) -> tuple[Projection | None, str]:
    """Walk from the cached V back to its projection rows (module docstring)."""
    node, path, split, start = cache, [], None, 0
    while not is_linear(node):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None, f"V comes from {node} (not a linear)"
        path.append(node)
        shape, prev = _shape(node), node.args[0]
        last = _int(shape[-1]) if shape else None
        prev_last = _int(_shape(prev)[-1]) if isinstance(prev, fx.Node) and _shape(prev) else None
        if _call(node, _CASTS) or (node.target is aten.transpose.int and shape and
                                   not {d % len(shape) for d in node.args[1:3]} & {len(shape) - 1}):
            pass
        elif _call(node, _VIEWS) and split is None and last == head_dim and \
                prev_last is not None and prev_last == _int(shape[-2]) * head_dim:
            split = prev_last
        elif _call(node, _VIEWS) and last is not None and last == prev_last:
            pass
        elif split is not None and node.target is aten.slice.Tensor and \
                node.args[1] in (-1, len(shape) - 1) and (node.args[4:5] or [1])[0] == 1:
            start += node.args[2] or 0
        elif split is not None and node.target is _GETITEM:
            offset = _split_offset(prev, node.args[1])
            if offset is None:
                return None, f"V is item {node.args[1]} of {prev.name} ({prev.target})"
            start += offset
            path.append(prev)
            prev = prev.args[0]
        else:
            return None, f"V passes through {node.name} ({node.target})"
        node = prev
    if split is None:
        return None, f"no [.., heads, {head_dim}] view between {node.name} and the cached V"
    return Projection(node, start, split, tuple(reversed(path))), ""


def _value_rows_shared(proj: Projection, reader: fx.Node) -> str:
    """Why V's rows are read outside the path to attention ("" when they are not)."""
    lo, hi = proj.start, proj.start + proj.width
    chain = [proj.linear, *proj.path]
    for node, nxt in zip(chain, [*chain[1:], reader], strict=True):
        for u in node.users:
            if u is nxt or (node is proj.linear and _disjoint_slice(u, lo, hi)):
                continue
            if _call(node, _SPLITS) and u.target is _GETITEM:
                continue  # another item of the split: other rows
            return f"value rows of {proj.linear.name} also reach {u.name} ({u.target})"
    return ""


def _disjoint_slice(node: fx.Node, lo: int, hi: int) -> bool:
    """A unit-step slice of the last dim whose range misses ``[lo, hi)``."""
    if node.target is not aten.slice.Tensor or len(node.args) < 4:
        return False
    nd = len(_shape(node.args[0]) or ())
    if node.args[1] not in (-1, nd - 1) or (node.args[4:5] or [1])[0] != 1:
        return False
    start, end = node.args[2] or 0, node.args[3]
    return end <= lo or start >= hi


def _split_offset(split: fx.Node, index: int) -> int | None:
    """Start offset along the last dim of item ``index`` of a split / chunk, else None."""
    shape = _shape(split.args[0])
    if not shape or _int(shape[-1]) is None:
        return None
    total, nd = _int(shape[-1]), len(shape)
    args = list(split.args)
    if split.target is aten.split_with_sizes.default:
        sizes, dim = args[1], args[2] if len(args) > 2 else 0
    elif split.target is aten.split.Tensor:
        dim = args[2] if len(args) > 2 else 0
        sizes = [args[1]] * (-(-total // args[1]))
    elif split.target is aten.chunk.default:
        dim = args[2] if len(args) > 2 else 0
        size = -(-total // args[1])
        sizes = [size] * args[1]
    else:
        return None
    if dim % nd != nd - 1:
        return None
    return sum(sizes[:index])


def _o_projection(out: fx.Node, heads: int, head_dim: int) -> tuple[fx.Node | None, str]:
    """Walk from the attention output through the head merge to the output projection."""
    node, merged = out, False
    while True:
        if len(node.users) != 1:
            return None, f"attention output {node.name} has {len(node.users)} readers"
        (user,) = node.users
        shape = _shape(user)
        if is_linear(user) and user.args[0] is node:
            if not merged:
                return None, f"{user.name} reads the attention output before a head merge"
            return user, ""
        if _call(user, _CASTS):
            pass
        elif user.target is aten.transpose.int and shape and \
                not {d % len(shape) for d in user.args[1:3]} & {len(shape) - 1}:
            pass
        elif _call(user, _VIEWS) and shape and not merged and \
                _int(shape[-1]) == heads * head_dim and \
                tuple(_int(s) for s in _shape(node)[-2:]) == (heads, head_dim):
            merged = True
        elif _call(user, _VIEWS) and shape and _int(shape[-1]) == _int(_shape(node)[-1]):
            pass
        else:
            return None, f"attention output reaches {user.name} ({user.target})"
        node = user


def _site(node: fx.Node, kind: str, q: fx.Node, k_reader: fx.Node, k: fx.Node,
          v: fx.Node, q_reader: fx.Node) -> AttentionSite | None:
    qs, vs = _shape(q), _shape(v)
    if not qs or not vs or len(qs) != 4 or len(vs) != 4:
        return None
    k_cache, k_read, _ = _skip_repeat(k, k_reader)
    v_cache, v_read, _ = _skip_repeat(v, node)
    heads, head_dim, v_dim = _int(qs[1]), _int(qs[-1]), _int(vs[-1])
    kv_heads = _int(_shape(k_cache)[1])
    if None in (heads, head_dim, v_dim, kv_heads) or heads % kv_heads:
        return None
    site = AttentionSite(node, kind, (q, q_reader), (k_cache, k_read), (v_cache, v_read),
                         heads, kv_heads, head_dim, v_dim)
    site.v_proj, why = _v_projection(v_cache, v_dim)
    if not why:
        why = _value_rows_shared(site.v_proj, v_read)
    if why:
        site.problems["v_proj"] = why
    site.o_proj, why = _o_projection(node, heads, v_dim)
    if why:
        site.problems["o_proj"] = why
    site.q_proj, site.k_proj = _source_linear(q), _source_linear(k_cache)
    return site


def find_attention(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention of ``gm`` (see the module docstring), in graph order."""
    sites = []
    for node in gm.graph.nodes:
        site = None
        if _call(node, _SDPA):
            q, k, v = node.args[:3]
            site = _site(node, "sdpa", q, node, k, v, node)
        elif _call(node, _SOFTMAX):
            pair = _eager_pair(node)
            if pair is not None:
                scores, out = pair
                kt = scores.args[1]
                site = _site(out, "eager", scores.args[0], kt, kt.args[0], out.args[1], scores)
        if site is not None:
            sites.append(site)
    return sites


def insert_on_edge(gm: fx.GraphModule, edge: Edge, target, *args) -> fx.Node:
    """Put ``target(producer, *args)`` between ``producer`` and ``consumer`` (that edge only)."""
    producer, consumer = edge
    with gm.graph.inserting_after(producer):
        node = gm.graph.call_function(target, (producer, *args))
    consumer.replace_input_with(producer, node)
    node.meta["source_module"] = consumer.meta.get("source_module", "")
    if "val" in producer.meta:
        node.meta["val"] = producer.meta["val"]
    return node


def quantize_kv(gm: fx.GraphModule, fmt: str) -> dict:
    """Quantize K and V as a KV cache would hold them: per head and token, along head_dim.

    ``qcompile::quantize_activation(x, fmt)`` is inserted on each attention's cached key and
    value (:attr:`AttentionSite.k` / ``v``): after RoPE and after any online Hadamard the
    ``rotate`` pass put on the key, *before* the GQA head repeat (quantizing after it is the
    same function, since the repeat only copies heads; before it is what a cache stores).

    Returns:
        Facts: ``kv_format``, ``kv_attention_sites``, ``kv_quant_nodes`` (2 per attention).

    Raises:
        UnsupportedGraphError: The graph has no attention to quantize.
    """
    sites = find_attention(gm)
    if not sites:
        raise UnsupportedGraphError("kv quantization found no attention (SDPA or "
                                    "matmul-softmax-matmul) in the graph")
    op = torch.ops.qcompile.quantize_activation.default
    for site in sites:
        for edge in (site.k, site.v):
            insert_on_edge(gm, edge, op, fmt)
        log.debug("kv quant: %s K/V -> %s", site.name, fmt)
    return {"kv_format": fmt, "kv_attention_sites": len(sites), "kv_quant_nodes": 2 * len(sites)}
