"""Decode-step attention patterns: one-query-row SDPA, rotary embeddings, KV-cache writes.

``lower-triton`` (:mod:`qcompile.passes.lower_triton_attention`) replaces what
:func:`decode_sdpa` matches with ``qcompile::decode_attention``, folds the query's rotary
embedding that :func:`rope_of` matches into it and, where :func:`cache_writes` finds the
step's KV-cache update, that too (``qcompile::decode_attention_write``). Both work on dataflow, as
:mod:`qcompile.attention` does, whose GQA head-repeat walk they share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.attention import _SDPA, _call, _int, _shape, _skip_repeat

__all__ = ["CacheWrites", "DecodeSDPA", "Rope", "cache_writes", "decode_sdpa", "rope_of"]

aten = torch.ops.aten


@dataclass(frozen=True)
class DecodeSDPA:
    """An SDPA of one query row per head over a KV cache (a decode step), in the terms of
    ``qcompile::decode_attention``.

    Attributes:
        node: The ``aten.scaled_dot_product_attention`` node.
        q: The query ``[B, Hq, 1, D]``.
        k, v: The key and value as the cache holds them: before a GQA head repeat, or as
            SDPA reads them with ``enable_gqa``.
        mask: The attention mask node (boolean or additive), or None.
        scale: The SDPA's ``scale`` (None: ``1 / sqrt(D)``).
        gqa: The SDPA repeats the kv heads itself (``enable_gqa=True``).
        repeats: The head-repeat nodes between the cache and the SDPA (dead once it goes).
    """

    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    scale: float | None
    gqa: bool
    repeats: tuple[fx.Node, ...]


_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def decode_sdpa(node: fx.Node) -> tuple[DecodeSDPA | None, str]:
    """``node`` as a decode-step attention, or why not.

    Returns:
        ``(match, "")``; ``(None, reason)`` for a one-query-row SDPA that cannot be taken;
        ``(None, "")`` for anything else (not an SDPA, or several query rows).
    """
    if not _call(node, _SDPA):
        return None, ""
    args = dict(_SDPA_DEFAULTS, **dict(zip(("attn_mask", "dropout_p", "is_causal"),
                                           node.args[3:], strict=False)), **node.kwargs)
    q, k, v = node.args[:3]
    qs, ks, vs = (_shape(x) if isinstance(x, fx.Node) else None for x in (q, k, v))
    if not qs or len(qs) != 4 or _int(qs[2]) != 1:
        return None, ""
    if args["dropout_p"]:
        return None, f"attention {node.name}: dropout_p {args['dropout_p']}"
    if args["is_causal"]:
        return None, f"attention {node.name}: is_causal with one query row"
    if not ks or not vs or len(ks) != 4 or len(vs) != 4:
        return None, f"attention {node.name}: key/value are not 4-D"
    repeats: list[fx.Node] = []
    if not args["enable_gqa"]:
        k_cache, _, k_rep = _skip_repeat(k, node)
        v_cache, _, v_rep = _skip_repeat(v, node)
        if k_rep != v_rep:
            return None, f"attention {node.name}: keys repeated {k_rep}x, values {v_rep}x"
        for x, cache in ((k, k_cache), (v, v_cache)):
            while x is not cache:
                repeats.append(x)
                x = x.args[0]
        k, v = k_cache, v_cache
    heads, kv_heads = _int(qs[1]), _int(_shape(k)[1])
    if heads is None or not kv_heads or heads % kv_heads or _int(_shape(v)[1]) != kv_heads:
        return None, f"attention {node.name}: {qs[1]} query heads over {_shape(k)[1]} kv heads"
    vals = [x.meta.get("val") for x in (q, k, v)]
    if len({getattr(t, "dtype", None) for t in vals}) != 1:
        return None, f"attention {node.name}: q, k and v differ in dtype"
    mask = args["attn_mask"]
    if mask is not None:
        mval = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if not isinstance(mval, torch.Tensor) or mval.dim() > 4 or not (
                mval.dtype == torch.bool or mval.is_floating_point()):
            return None, f"attention {node.name}: mask {mask} is not a boolean or float tensor"
    scale = args["scale"]
    return DecodeSDPA(node, q, k, v, mask, None if scale is None else float(scale),
                      bool(args["enable_gqa"]), tuple(repeats)), ""


@dataclass(frozen=True)
class Rope:
    """``out = x * cos + cat(-x2, x1) * sin`` (Hugging Face's ``apply_rotary_pos_emb`` on
    ``x``'s halves ``x1``, ``x2``), as :func:`rope_of` found it.

    Attributes:
        x, cos, sin: Its inputs.
        nodes: Its own ops, readers first: the add, the two products, the cat, the negation
            and the two half slices.
    """

    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    nodes: tuple[fx.Node, ...]


def _operands(node: object, target) -> list[tuple[object, object]]:
    """``[(a, b), (b, a)]`` for a binary ``target`` node without kwargs, else []."""
    if not _call(node, {target}) or node.kwargs or len(node.args) != 2:
        return []
    a, b = node.args
    return [(a, b), (b, a)]


def _half_slice(node: object, x: fx.Node, nd: int, start: int, end: int | None) -> bool:
    """``node`` is ``x[..., start:end]`` (unit step; ``end`` None: to the end)."""
    if not _call(node, {aten.slice.Tensor}) or node.args[0] is not x or node.kwargs:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    dim, lo, hi, step = args[1], args[2] or 0, args[3], args[4] or 1
    if dim not in (-1, nd - 1) or lo != start or step != 1:
        return False
    return hi == end if end is not None else (hi is None or hi >= 2 * start)


def rope_of(out: fx.Node) -> Rope | None:
    """``out`` as a rotary embedding of one tensor (:class:`Rope`), else None.

    Matched: ``add(mul(x, cos), mul(cat([neg(x[..., h:]), x[..., :h]], -1), sin))`` with ``h``
    half of ``x``'s static last dim, every operand order, ``cos``/``sin`` in ``x``'s dtype
    and broadcasting to ``x`` (so the sum has ``x``'s shape and dtype).
    """
    val = out.meta.get("val") if isinstance(out, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 1 or _int(val.shape[-1]) is None:
        return None
    nd, d = val.dim(), _int(val.shape[-1])
    if d % 2:
        return None
    h = d // 2
    for straight, rotated in _operands(out, aten.add.Tensor):
        for cat, sin in _operands(rotated, aten.mul.Tensor):
            if not _call(cat, {aten.cat.default}) or cat.kwargs or len(cat.args[0]) != 2 or (
                    (cat.args[1] if len(cat.args) > 1 else 0) not in (-1, nd - 1)):
                continue
            neg, lo = cat.args[0]
            if not _call(neg, {aten.neg.default}) or not isinstance(neg.args[0], fx.Node):
                continue
            x = neg.args[0].args[0] if isinstance(neg.args[0].args[0], fx.Node) else None
            if x is None or not (_half_slice(neg.args[0], x, nd, h, None)
                                 and _half_slice(lo, x, nd, 0, h)):
                continue
            for xx, cos in _operands(straight, aten.mul.Tensor):
                if xx is x and _same_as(x, cos, sin, val):
                    return Rope(x, cos, sin, (out, rotated, straight, cat, neg, neg.args[0], lo))
    return None


def _same_as(x: fx.Node, cos: object, sin: object, val: torch.Tensor) -> bool:
    """``cos`` and ``sin`` are tensors in ``x``'s dtype broadcasting to ``x`` (= ``val``)."""
    xv = x.meta.get("val")
    if not isinstance(xv, torch.Tensor) or xv.dtype != val.dtype or xv.shape != val.shape:
        return False
    for t in (cos, sin):
        tv = t.meta.get("val") if isinstance(t, fx.Node) else None
        if not isinstance(tv, torch.Tensor) or tv.dtype != xv.dtype:
            return False
        try:
            if torch.broadcast_shapes(tv.shape, xv.shape) != xv.shape:
                return False
        except RuntimeError:
            return False
    return True


@dataclass(frozen=True)
class CacheWrites:
    """The decode step's in-place cache update that a :class:`DecodeSDPA` reads:
    ``k = k_cache.index_copy_(2, index, k_new)`` and the same for ``v``.

    Attributes:
        k_cache, v_cache: The caches (read and written by nothing else in the graph).
        index: The positions written (one, as the query has one row).
        k_new, v_new: The rows written.
        nodes: The two ``index_copy_`` nodes.
    """

    k_cache: fx.Node
    v_cache: fx.Node
    index: fx.Node
    k_new: fx.Node
    v_new: fx.Node
    nodes: tuple[fx.Node, fx.Node]


def cache_writes(match: DecodeSDPA) -> CacheWrites | None:
    """The cache update feeding ``match`` when a fused op may do it in the attention's place:
    both caches written by ``index_copy_`` along the sequence at one shared position, nothing
    else reading or writing them, the written caches read only by the attention (through
    its head repeat), the new rows one position each in the caches' dtype. Else None."""
    k, v = match.k, match.v
    copy = {aten.index_copy_.default}
    if not (_call(k, copy) and _call(v, copy)) or k.kwargs or v.kwargs:
        return None
    (kc, kdim, idx, k_new), (vc, vdim, vidx, v_new) = k.args, v.args
    if vidx is not idx or kc is vc or kdim not in (2, -2) or vdim not in (2, -2):
        return None
    if set(kc.users) != {k} or set(vc.users) != {v}:
        return None
    readers = {*match.repeats, match.node}
    if any(u not in readers for u in (*k.users, *v.users)):
        return None
    ival = idx.meta.get("val") if isinstance(idx, fx.Node) else None
    if not isinstance(ival, torch.Tensor) or ival.dim() != 1 or _int(ival.shape[0]) != 1 or \
            ival.dtype not in (torch.int64, torch.int32):
        return None
    for new, cache in ((k_new, kc), (v_new, vc)):
        nv, cv = (x.meta.get("val") if isinstance(x, fx.Node) else None for x in (new, cache))
        if not isinstance(nv, torch.Tensor) or not isinstance(cv, torch.Tensor) or \
                nv.dim() != 4 or _int(nv.shape[2]) != 1 or nv.dtype != cv.dtype:
            return None
    return CacheWrites(kc, vc, idx, k_new, v_new, (k, v))
