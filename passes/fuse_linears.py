"""Merge quantized linears that read the same input into one wider linear (QKV, gate/up)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.graph import (
    get_attr_value,
    is_linear,
    propagate_fake,
    set_attr_value,
    unique_attr_name,
)
from qcompile.pass_base import Pass, PassResult
from qcompile.passes.quantize import DEQUANT_SUFFIXES
from qcompile.registry import register_pass

__all__ = ["FuseLinearsOptions", "FuseLinearsPass"]

log = logging.getLogger(__name__)

_DEQUANT = torch.ops.qcompile.dequantize_weight.default
_SLICE = torch.ops.aten.slice.Tensor


@dataclass(frozen=True)
class FuseLinearsOptions:
    """Options of ``fuse-linears``.

    Attributes:
        check: Dequantize every fused weight and require it to equal the concatenation of
            its members' weights bit for bit (a group that does not is left alone and
            reported). Costs one dequantization of each fused weight.
    """

    check: bool = True


@dataclass
class _Member:
    linear: fx.Node
    deq: fx.Node
    tensors: tuple[torch.Tensor | None, ...]  # packed, scale, scale_neg, zero, outer
    bias: torch.Tensor | None

    @property
    def rows(self) -> int:
        return int(self.tensors[0].shape[0])

    @property
    def module(self) -> str:
        target = str(self.deq.args[0].target)
        for suffix in (".qweight", "_qweight"):
            if target.endswith(suffix):
                return target[: -len(suffix)]
        return target


@register_pass
class FuseLinearsPass(Pass):
    """Concatenate the quantized weights of linears that read one input, so one kernel reads
    them all (one GEMV / GEMM launch instead of three for q/k/v, two for gate/up).

    Rules:
        1. Members are ``linear(x, dequantize_weight(attrs...)[, bias attr])`` whose
           ``dequantize_weight`` is read by that linear only; they group by input node ``x``
           (an activation quantize is shared by the linears that read it, so W8A8 and W4A8
           linears group too), format, row length, dtype, which optional scale tensors they
           have, their tensors' dtypes, and whether they have a bias.
        2. A group of two or more becomes one linear over the row-wise concatenation of the
           packed codes and scales (and biases); each member's result is a slice of its
           output along the last dim, in the group's graph order.
        3. Per-row tensors concatenate; a tensor shared by the whole weight is kept once if
           it is equal across the group; per-tensor outer scales that differ (NVFP4's tensor
           scales) become a per-row outer scale; anything else leaves the group alone,
           reported in ``facts["skipped"]``.
        4. With ``check`` (default), the fused weight must dequantize to exactly the members'
           concatenated weights, or the group is left alone and reported.
        5. The members' buffers are left unread (``cleanup`` drops them). ``facts["fused"]``
           names, per group, the members' packed-code attributes, their rows and the new
           attributes. Members whose buffers already lie back to back in one storage (the
           rows of an earlier fusion) are viewed, not copied.
        6. Nothing to fuse: ``modified`` is False and the graph is untouched.
    """

    name = "fuse-linears"
    Options = FuseLinearsOptions
    summary = "one wider quantized linear for the linears that read one input (QKV, gate/up)"

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups: dict[tuple, list[_Member]] = {}
        for node in gm.graph.nodes:
            member = _member(gm, node)
            if member is not None:
                groups.setdefault(_key(member), []).append(member)
        fused: list[dict] = []
        skipped: dict[str, str] = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            names = [m.linear.name for m in members]
            tensors, why = _concat(members)
            if why is None and self.options.check:
                why = _check(members, tensors)
            if why is not None:
                skipped[",".join(names)] = why
                continue
            weights = [str(m.deq.args[0].target) for m in members]
            attrs = _rewrite(gm, members, tensors)  # erases the members' nodes
            fused.append({"linears": names, "rows": [m.rows for m in members],
                          "weights": weights, "attrs": attrs})
            log.debug("fuse-linears: %s -> one linear of %d rows", names,
                      sum(m.rows for m in members))
        if fused:
            gm.graph.lint()
            gm.recompile()
        facts = {"groups": len(fused), "linears": sum(len(f["linears"]) for f in fused),
                 "fused": fused, "skipped": skipped}
        return PassResult(gm, bool(fused), facts)


def _attr(gm: fx.GraphModule, arg: object) -> torch.Tensor | None | bool:
    """The tensor an argument reads (None for None; False if it is not an attribute read)."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return get_attr_value(gm, str(arg.target))
    return False


def _member(gm: fx.GraphModule, node: fx.Node) -> _Member | None:
    if not is_linear(node) or node.kwargs or len(node.args) not in (2, 3):
        return None
    x, deq = node.args[0], node.args[1]
    if not isinstance(x, fx.Node) or not isinstance(deq, fx.Node):
        return None
    if deq.op != "call_function" or deq.target is not _DEQUANT or deq.kwargs:
        return None
    if len(deq.users) != 1 or len(deq.args) != 8:
        return None
    tensors = tuple(_attr(gm, a) for a in deq.args[:5])
    if any(t is False for t in tensors) or tensors[0] is None:
        return None
    bias = _attr(gm, node.args[2]) if len(node.args) == 3 else None
    if bias is False:
        return None
    return _Member(node, deq, tensors, bias)  # type: ignore[arg-type]


def _key(m: _Member) -> tuple:
    fmt, k, dtype = m.deq.args[5:8]
    layout = tuple(None if t is None else (t.dtype, tuple(t.shape[1:]), t.device)
                   for t in m.tensors)
    bias = None if m.bias is None else (m.bias.dtype, m.bias.device)
    return (m.linear.args[0], fmt, k, dtype, layout, bias)


def _concat(members: list[_Member]) -> tuple[list[torch.Tensor | None], str | None]:
    """The fused tensors (packed, scales..., bias) or why the group cannot be fused."""
    out: list[torch.Tensor | None] = []
    for j in range(5):
        parts = [m.tensors[j] for m in members]
        if parts[0] is None:
            out.append(None)
        elif all(p.shape[0] == m.rows for p, m in zip(parts, members, strict=True)):
            out.append(_cat_rows(parts))
        elif all(p.shape[0] == 1 for p in parts) and all(torch.equal(p, parts[0])
                                                         for p in parts[1:]):
            out.append(parts[0])  # one value for the whole weight, equal across the group
        elif j == 4 and all(p.shape == (1, 1) for p in parts):
            # Per-tensor outer scales (NVFP4's) that differ: the same values, one per row.
            out.append(torch.cat([p.expand(m.rows, 1) for p, m in zip(parts, members,
                                                                     strict=True)], dim=0))
        else:
            return [], (f"{DEQUANT_SUFFIXES[j]} is neither per row nor equal across the group "
                        "(per-tensor scales that differ)")
    biases = [m.bias for m in members]
    out.append(None if biases[0] is None else torch.cat(biases, dim=0))
    return out, None


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, or a view when the parts already lie back to back in one storage
    (the rows of an earlier fusion: a later graph of the same model then shares its memory)."""
    first = parts[0]
    rest = tuple(first.shape[1:])
    offset = first.storage_offset()
    ptr = first.untyped_storage().data_ptr()
    adjacent = first.is_contiguous()
    for p in parts:
        adjacent = (adjacent and p.is_contiguous() and tuple(p.shape[1:]) == rest
                    and p.untyped_storage().data_ptr() == ptr and p.storage_offset() == offset)
        offset += p.numel()
    if not adjacent:
        return torch.cat(parts, dim=0)
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, *rest), first.stride(), first.storage_offset())


def _check(members: list[_Member], tensors: list[torch.Tensor | None]) -> str | None:
    fmt, k, dtype = members[0].deq.args[5:8]
    with torch.no_grad():
        whole = _DEQUANT(*tensors[:5], fmt, k, dtype)
        parts = torch.cat([_DEQUANT(*m.tensors, fmt, k, dtype) for m in members], dim=0)
    if not torch.equal(whole, parts):
        return "the fused weight does not dequantize to the members' concatenation"
    return None


def _fused_name(members: list[_Member]) -> str:
    mods = [m.module.split(".") for m in members]
    common = 0
    while all(len(p) > common + 1 and p[common] == mods[0][common] for p in mods):
        common += 1
    prefix = ".".join(mods[0][:common])
    leaf = "_".join("_".join(p[common:]) for p in mods)
    return f"{prefix}.{leaf}" if prefix else leaf


def _rewrite(gm: fx.GraphModule, members: list[_Member],
             tensors: list[torch.Tensor | None]) -> list[str | None]:
    """Insert the fused linear and its slices; return the new attribute names (packed codes,
    scale, negative scale, zero point, outer scale, bias; None where absent)."""
    graph = gm.graph
    base = _fused_name(members)
    first = members[0]
    x = first.linear.args[0]
    attrs: list[fx.Node | None] = []
    with graph.inserting_before(first.linear):
        for suffix, t in zip((*DEQUANT_SUFFIXES, "bias"), tensors, strict=True):
            if t is None:
                attrs.append(None)
                continue
            name = unique_attr_name(gm, f"{base}.{suffix}")
            set_attr_value(gm, name, t)
            node = graph.get_attr(name)
            node.meta["val"] = _fake_constant(first.deq, t)
            attrs.append(node)
        deq = graph.call_function(_DEQUANT, (*attrs[:5], *first.deq.args[5:]))
        args = (x, deq) if attrs[5] is None else (x, deq, attrs[5])
        lin = graph.call_function(torch.ops.aten.linear.default, args)
        for node in (deq, lin):
            propagate_fake(node)
        # Graphs whose attribute reads carry no fake values (torch.export's): the members'.
        _cat_vals(deq, [m.deq for m in members], 0)
        _cat_vals(lin, [m.linear for m in members], -1)
        lin.meta.update({k: v for k, v in first.linear.meta.items() if k != "val"})
        lin.meta["source_module"] = base
        start = 0
        for m in members:
            sl = graph.call_function(_SLICE, (lin, -1, start, start + m.rows))
            propagate_fake(sl)
            if "val" not in sl.meta and "val" in m.linear.meta:
                sl.meta["val"] = m.linear.meta["val"]
            start += m.rows
            m.linear.replace_all_uses_with(sl)
    for m in members:
        graph.erase_node(m.linear)
        graph.erase_node(m.deq)
    return [None if a is None else str(a.target) for a in attrs]


def _cat_vals(node: fx.Node, parts: list[fx.Node], dim: int) -> None:
    """``node``'s fake value as the concatenation of ``parts``' values, if it has none."""
    vals = [p.meta.get("val") for p in parts]
    if "val" in node.meta or any(v is None for v in vals):
        return
    mode = getattr(vals[0], "fake_mode", None)
    if mode is not None:
        with mode:
            node.meta["val"] = torch.cat(vals, dim=dim)


def _fake_constant(like: fx.Node, t: torch.Tensor) -> torch.Tensor | None:
    """A fake tensor for a new constant, in the fake mode of ``like``'s inputs (if any)."""
    for a in like.args:
        v = a.meta.get("val") if isinstance(a, fx.Node) else None
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode.from_tensor(t, static_shapes=True)
    return None
