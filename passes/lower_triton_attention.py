"""``lower-triton``'s decode-attention rewrite: one-query-row SDPAs -> ``decode_attention``.

Pattern (:func:`qcompile.attention.decode_sdpa`): ``scaled_dot_product_attention(q, K, V,
mask)`` with ``q`` of one row per head, ``K``/``V`` a GQA head repeat of the cache
(``reshape(expand(unsqueeze(cache, 2)))``, ``repeat_interleave``, none when every kv head
has one query head) or the cache itself under ``enable_gqa``. Check: no dropout, not
``is_causal``, a boolean or float mask, one dtype. Rewrite: ``qcompile::decode_attention(q,
k_cache, v_cache, mask, scale, gqa)``; the repeat nodes the SDPA alone read go with it.
A query that is a rotary embedding read only by the SDPA (:func:`rope_of`) is rotated in
the op instead (``cos``/``sin`` arguments): one element-wise kernel fewer per layer.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

import qcompile.backends.triton.ops  # noqa: F401  (registers qcompile::decode_attention)
from qcompile.attention_decode import decode_sdpa, rope_of

__all__ = ["lower_decode_attention"]

log = logging.getLogger(__name__)


def lower_decode_attention(gm: fx.GraphModule,
                           skipped: list[dict[str, str]]) -> tuple[int, int]:
    """Rewrite every decode-step SDPA of ``gm``; append those that cannot be to ``skipped``
    (``{"node", "reason"}``). Returns the number rewritten and how many of them took in
    their query's rotary embedding."""
    op = torch.ops.qcompile.decode_attention.default
    n = ropes = 0
    for node in list(gm.graph.nodes):
        match, why = decode_sdpa(node)
        if match is None:
            if why:
                skipped.append({"node": node.name, "reason": why})
            continue
        q, rope = match.q, None
        if len(q.users) == 1 and (rope := rope_of(q)) is not None:
            q = rope.x
        args = (q, match.k, match.v, match.mask, match.scale, match.gqa)
        if rope is not None:
            args += (rope.cos, rope.sin)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(op, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        # Repeat nodes (reshape, expand, unsqueeze) and the rotation's ops, readers first.
        for dead in match.repeats + (rope.nodes if rope is not None else ()):
            if not dead.users:
                gm.graph.erase_node(dead)
        log.debug("lower-triton: %s -> decode_attention (gqa=%s, %d repeat nodes, rope %s)",
                  node.name, match.gqa, len(match.repeats), rope is not None)
        n += 1
        ropes += rope is not None
    return n, ropes
