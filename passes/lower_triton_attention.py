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
  embedding too, when only the write reads it) and attends over the updated caches.
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
        embedding), ``attention_write`` (with the cache update).
    """
    counts = {"attention": 0, "attention_rope": 0, "attention_write": 0}
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
    return counts
