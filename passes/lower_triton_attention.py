"""``lower-triton``'s decode-attention rewrite: one-query-row SDPAs -> ``decode_attention``.

Pattern (:func:`qcompile.attention_decode.decode_sdpa`): ``scaled_dot_product_attention(q,
K, V, mask)`` with ``q`` of one row per head, ``K``/``V`` a GQA head repeat of the cache
(``reshape(expand(unsqueeze(cache, 2)))``, ``repeat_interleave``, none when every kv head
has one query head) or the cache itself under ``enable_gqa``. Check: no dropout, not
``is_causal``, a boolean or float mask, one dtype. Rewrite: ``qcompile::decode_attention(q,
k_cache, v_cache, mask, scale, gqa)``; the repeat nodes the SDPA alone read go with it.

Folded in as well, each saving an element-wise kernel per layer and token:

* a query that is a rotary embedding read only by the SDPA
  (:func:`qcompile.attention_decode.rope_of`): rotated in the op (``cos``/``sin``);
* the step's cache update (:func:`qcompile.attention_decode.cache_writes`: ``index_copy_``
  of the new key and value rows into caches nothing else touches): the op becomes
  ``qcompile::decode_attention_write``, which writes the rows in place (the new key's rotary
  embedding too, when only the write reads it) and attends over the updated caches;
* the per-layer position counters of a static cache (:func:`batch_cache_counters`): bumped
  by one ``_foreach_add_`` at the graph's end instead of a kernel per layer.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

import qcompile.backends.triton.ops  # noqa: F401  (registers qcompile::decode_attention)
from qcompile.attention_decode import cache_writes, decode_sdpa, rope_of

__all__ = ["lower_decode_attention"]

log = logging.getLogger(__name__)


def _single_rope(x: fx.Node):
    """``rope_of(x)`` when ``x`` has one reader (its ops can go), else None."""
    return rope_of(x) if isinstance(x, fx.Node) and len(x.users) == 1 else None


def lower_decode_attention(gm: fx.GraphModule, skipped: list[dict[str, str]],
                           write: bool = True) -> dict[str, int]:
    """Rewrite every decode-step SDPA of ``gm``; append those that cannot be to ``skipped``
    (``{"node", "reason"}``). ``write``: also fold the cache updates.

    Returns:
        Counts: ``attention`` (rewritten), ``attention_rope`` (with the query's rotary
        embedding), ``attention_write`` (with the cache update), ``attention_counters``
        (static-cache position counters bumped together, :func:`batch_cache_counters`).
    """
    counts = {"attention": 0, "attention_rope": 0, "attention_write": 0,
              "attention_counters": 0}
    for node in list(gm.graph.nodes):
        match, why = decode_sdpa(node)
        if match is None:
            if why:
                skipped.append({"node": node.name, "reason": why})
            continue
        q, rope = match.q, _single_rope(match.q)
        tables = (None, None)
        if rope is not None:
            q, tables = rope.x, (rope.cos, rope.sin)
        dead = list(match.repeats) + (list(rope.nodes) if rope is not None else [])
        writes = cache_writes(match) if write else None
        if writes is None:
            target = torch.ops.qcompile.decode_attention.default
            args = (q, match.k, match.v, match.mask, match.scale, match.gqa, *tables)
        else:
            k_new, k_rope = writes.k_new, _single_rope(writes.k_new)
            k_tables = (None, None)
            if k_rope is not None:
                k_new, k_tables = k_rope.x, (k_rope.cos, k_rope.sin)
                dead += list(k_rope.nodes)
            dead[len(match.repeats):len(match.repeats)] = list(writes.nodes)
            target = torch.ops.qcompile.decode_attention_write.default
            args = (q, writes.k_cache, writes.v_cache, writes.index, k_new, writes.v_new,
                    match.mask, match.scale, match.gqa, *tables, *k_tables)
        while args[-1] is None and len(args) > 6:  # defaults left out
            args = args[:-1]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(target, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for n in dead:  # readers before what they read
            if not n.users:
                gm.graph.erase_node(n)
        log.debug("lower-triton: %s -> %s (rope %s)", node.name, target.name(),
                  rope is not None)
        counts["attention"] += 1
        counts["attention_rope"] += rope is not None
        counts["attention_write"] += writes is not None
    if counts["attention_write"]:
        counts["attention_counters"] = batch_cache_counters(gm)
    return counts


_ADD = (torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar)
_BUMP = (torch.ops.aten.add_.Tensor, torch.ops.aten.add_.Scalar)
_ARANGE = (torch.ops.aten.arange.default, torch.ops.aten.arange.start)


def _is_one_arange(n: object) -> bool:
    """``arange(1)`` (or ``arange(0, 1)``): the ``[1]`` tensor ``[0]``."""
    if not (isinstance(n, fx.Node) and n.target in _ARANGE):
        return False
    return list(n.args) in ([1], [0, 1])


def _before(a: fx.Node, b: fx.Node) -> bool:
    """Whether node ``a`` comes before node ``b`` in their graph's order."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def _step_counter(index: object) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``(counter, bump, dead)`` when a cache write's ``index`` is ``arange(1) + c`` for a
    graph input ``c`` (one integer) that is read by nothing else and bumped by ``c.add_(1)``
    alone afterwards (transformers' static-cache layer: its ``cumulative_length``)."""
    if not (isinstance(index, fx.Node) and index.target in _ADD and len(index.users) == 1):
        return None
    a, b = index.args[:2]
    counter = b if _is_one_arange(a) else a if _is_one_arange(b) else None
    arange = a if counter is b else b
    if not (isinstance(counter, fx.Node) and counter.op == "placeholder"):
        return None
    val = counter.meta.get("val")
    if not (isinstance(val, torch.Tensor) and val.numel() == 1 and not val.is_floating_point()
            and not val.is_complex()):
        return None
    bumps = [u for u in counter.users if u is not index]
    if len(bumps) != 1 or len(counter.users) != 2:
        return None
    bump = bumps[0]
    if bump.target not in _BUMP or bump.users or list(bump.args) != [counter, 1] or bump.kwargs:
        return None
    if not _before(index, bump):  # the index must read the value before the bump
        return None
    return counter, bump, [index] + ([arange] if len(arange.users) == 1 else [])


def batch_cache_counters(gm: fx.GraphModule) -> int:
    """Bump the per-layer static-cache counters of a decode step's graph all at once, at its
    end: each layer's ``c.add_(1)`` (and its ``arange(1) + c`` index) is an Inductor kernel
    of its own, a tiny launch per layer and token. Where a counter is read by the write's
    index alone and bumped right after, the write reads the counter itself (as ``[1]``) and
    one ``_foreach_add_`` after every other node bumps them all: the same values everywhere,
    one launch. Counters read elsewhere (the first layer's, which also gives the positions
    and the mask) keep their kernels.

    Returns:
        The number of counters moved.
    """
    counters: list[fx.Node] = []
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.qcompile.decode_attention_write.default:
            continue
        found = _step_counter(node.args[3])
        if found is None:
            continue
        counter, bump, dead = found
        with gm.graph.inserting_before(node):
            view = gm.graph.call_function(torch.ops.aten.view.default, (counter, [1]))
        view.meta["val"] = dead[0].meta.get("val")
        node.update_arg(3, view)
        gm.graph.erase_node(bump)
        for n in dead:
            gm.graph.erase_node(n)
        counters.append(counter)
    if counters:
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.ops.aten._foreach_add_.Scalar, (counters, 1))
    log.debug("lower-triton: %d static-cache counters bumped together", len(counters))
    return len(counters)
