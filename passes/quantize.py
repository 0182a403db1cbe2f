"""Replace linear weights by packed codes + a dequantize op, and quantize linear inputs."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.errors import FormatError, UnsupportedGraphError, WeightError
from qcompile.formats import dequantize, pack_codes, parse_format, quantize, search_clip
from qcompile.graph import delete_attr, get_attr_value, linear_nodes, set_attr_value
from qcompile.pass_base import Pass, PassResult
from qcompile.registry import register_pass

__all__ = ["QuantizePass"]

log = logging.getLogger(__name__)

_WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
_ACT_GRANULARITIES = ("tensor", "token", "group")


def _canonical_format(text: str | None, role: str, allowed: tuple[str, ...]) -> str | None:
    if text is None:
        return None
    spec = parse_format(text)
    if spec.granularity not in allowed:
        raise FormatError(
            f"{role} format {text!r} has granularity {spec.granularity!r}; "
            f"{role} formats take one of: {', '.join(allowed)}"
        )
    return str(spec)


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of ``quantize``.

    Attributes:
        w: Weight format (``qcompile.formats`` text), or none to leave weights alone.
        a: Activation format for the inputs of quantized linears (dynamic, per token,
            group or tensor), or none.
        include: ``|``-separated globs over linear names (weight attribute without
            ``.weight``); only matching linears are quantized.
        exclude: ``|``-separated globs of linears to leave alone.
        lm_head: Also quantize output heads (linears that feed the graph output, or that
            share their weight with an embedding). Off by default.
        clip: ``none`` or ``search`` (per-group MSE search of the clip ratio for weights).
    """

    w: str | None = None
    a: str | None = None
    include: str = "*"
    exclude: str = ""
    lm_head: bool = False
    clip: Literal["none", "search"] = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "w", _canonical_format(self.w, "weight", _WEIGHT_GRANULARITIES))
        object.__setattr__(self, "a", _canonical_format(self.a, "activation", _ACT_GRANULARITIES))
        if self.w is None and self.a is None:
            raise ValueError("quantize needs w=<format> and/or a=<format>")


def _matches(name: str, globs: str) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs.split("|") if g)


def _linear_name(weight_target: str) -> str:
    return weight_target[: -len(".weight")] if weight_target.endswith(".weight") else weight_target


_PASS_THROUGH = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.slice.Tensor, torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default,
    torch.ops.aten.contiguous.default, torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor,
    torch.ops.aten.tanh.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default,
}


def head_linears(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Output heads, found by dataflow.

    A head is a linear whose result reaches the graph output through shape/cast/scale ops
    only (logits, softcapping), or whose weight an embedding lookup also reads (tied).
    """
    heads: set[torch.fx.Node] = set()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    stack = list(out.all_input_nodes)
    seen: set[torch.fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default:
            heads.add(n)
        elif n.op == "call_function" and n.target in _PASS_THROUGH:
            stack.extend(n.all_input_nodes)
    embedded = {
        n.args[0].target
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.embedding.default
        and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"
    }
    heads.update(n for n in linear_nodes(gm) if n.args[1].target in embedded)
    return heads


@register_pass
class QuantizePass(Pass):
    """Quantize linears: weights to packed codes, inputs to dynamic Q/DQ.

    Rules:
        1. ``aten.linear(x, get_attr W, b)`` with W selected (include/exclude, not a head
           unless ``lm_head=true``) and ``w`` set: W becomes packed codes, scales (and zero
           points / AFPQ negative scales / outer scales) stored as buffers, read through one
           ``qcompile::dequantize_weight`` placed at the top of the graph; W is dropped when
           nothing else reads it. A weight shared by several selected linears is quantized once.
        2. With ``a`` set, the input x of every selected linear goes through one
           ``qcompile::quantize_activation`` per (x, format), shared by sibling linears.
        3. A linear whose weight is not a 2-D floating tensor is left alone and reported.
        4. Heads are skipped by default and reported as skipped.
        5. NaN or infinite weights raise ``WeightError`` naming the weight.
    """

    name = "quantize"
    Options = QuantizeOptions
    summary = "weights to packed codes + dequantize; dynamic activation Q/DQ before linears"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        opts = self.options
        heads = head_linears(gm)
        selected, skipped = [], {}
        for node in linear_nodes(gm):
            name = _linear_name(node.args[1].target)
            if not _matches(name, opts.include) or _matches(name, opts.exclude):
                skipped[name] = "excluded by include/exclude"
            elif node in heads and not opts.lm_head:
                skipped[name] = "output head (set lm_head=true to quantize)"
            else:
                w = get_attr_value(gm, node.args[1].target)
                if w.dim() != 2 or not w.is_floating_point():
                    skipped[name] = f"weight is not a 2-D float tensor ({tuple(w.shape)}, {w.dtype})"
                else:
                    selected.append(node)
        facts: dict = {"linears_matched": len(selected), "skipped": skipped}
        if opts.w is not None:
            facts.update(self._quantize_weights(gm, selected))
        if opts.a is not None:
            facts["act_quant_nodes"] = self._quantize_inputs(gm, selected)
        gm.graph.lint()
        gm.recompile()
        modified = bool(selected)
        return PassResult(gm, modified, facts)

    def _quantize_weights(self, gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> dict:
        spec = parse_format(self.options.w)
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        dequant_of: dict[str, torch.fx.Node] = {}
        bits = numel = 0
        err_num = err_den = 0.0
        clip_sum, clip_count = 0.0, 0
        for node in nodes:
            target = node.args[1].target
            if target not in dequant_of:
                w = get_attr_value(gm, target).detach()
                if not torch.isfinite(w).all():
                    bad = int((~torch.isfinite(w)).sum())
                    raise WeightError(
                        f"weight {target!r} (linear {node.name}) holds {bad} NaN/inf values; "
                        "cannot quantize it"
                    )
                clip = None
                if self.options.clip == "search":
                    clip = search_clip(w.float(), spec)
                    clip_sum += float(clip.sum())
                    clip_count += clip.numel()
                q = quantize(w.float(), spec, clip=clip)
                w_hat = dequantize(q)
                err_num += float((w_hat - w.float()).pow(2).sum())
                err_den += float(w.float().pow(2).sum())
                bits += spec.bits_per_element(w.shape[-1]) * w.numel()
                numel += w.numel()
                dequant_of[target] = self._insert_dequant(gm, first, target, q, w.dtype)
            node.replace_input_with(node.args[1], dequant_of[target])
            log.debug("quantize: %s weight %s -> %s", node.name, target, spec)
        self._drop_unused(gm, dequant_of)
        out = {
            "weight_format": str(spec),
            "weights_quantized": len(dequant_of),
            "linears_quantized": len(nodes),
            "bits_per_weight": round(bits / numel, 4) if numel else None,
            "weight_rel_mse": (err_num / err_den) if err_den else None,
        }
        if clip_count:
            out["clip_mean"] = round(clip_sum / clip_count, 4)
        return out

    def _insert_dequant(self, gm, anchor, target, q, dtype) -> torch.fx.Node:
        base = _linear_name(target)
        tensors = {
            "qweight": pack_codes(q.codes, q.spec.bits),
            "wscale": q.scale,
            "wscale_neg": q.scale_neg,
            "wzero": q.zero,
            "wouter": q.outer,
        }
        args = []
        with gm.graph.inserting_before(anchor):
            for suffix, t in tensors.items():
                if t is None:
                    args.append(None)
                    continue
                attr = f"{base}.{suffix}" if base != target else f"{target}_{suffix}"
                set_attr_value(gm, attr, t.contiguous())
                args.append(gm.graph.get_attr(attr))
            node = gm.graph.call_function(
                torch.ops.qcompile.dequantize_weight.default,
                (*args, str(q.spec), q.k, dtype),
            )
        node.meta["source_module"] = base
        return node

    @staticmethod
    def _drop_unused(gm: torch.fx.GraphModule, targets) -> None:
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and node.target in targets and not node.users:
                gm.graph.erase_node(node)
        still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for target in targets:
            if target not in still_read:
                delete_attr(gm, target)

    def _quantize_inputs(self, gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> int:
        fmt = self.options.a
        made: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in nodes:
            x = node.args[0]
            if not isinstance(x, torch.fx.Node):
                raise UnsupportedGraphError(f"linear {node.name} has a non-tensor input {x!r}")
            if x not in made:
                with gm.graph.inserting_after(x):
                    qx = gm.graph.call_function(
                        torch.ops.qcompile.quantize_activation.default, (x, fmt)
                    )
                qx.meta["source_module"] = node.meta.get("source_module", "")
                if "val" in x.meta:
                    qx.meta["val"] = x.meta["val"]
                made[x] = qx
            node.replace_input_with(x, made[x])
        return len(made)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.target is not torch.ops.qcompile.dequantize_weight.default:
                continue
            packed, scale = (get_attr_value(gm, a.target) for a in node.args[:2])
            spec, k = parse_format(node.args[5]), node.args[6]
            row_bytes = -(-k * spec.bits // 8)
            if packed.shape[-1] != row_bytes or scale.shape[-1] != spec.num_groups(k):
                self.fail_ensures(
                    f"{node.name}: packed row of {packed.shape[-1]} bytes / {scale.shape[-1]} "
                    f"scales, expected {row_bytes} / {spec.num_groups(k)} for {spec} with k={k}"
                )
