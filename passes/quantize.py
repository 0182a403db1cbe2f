"""Replace linear weights by packed codes + a dequantize op, and quantize linear inputs."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.attention import quantize_kv
from qcompile.errors import (
    FormatError,
    PassError,
    PreconditionError,
    UnsupportedGraphError,
    WeightError,
)
from qcompile.formats import dequantize, pack_codes, parse_format, quantize, search_clip
from qcompile.formats.quantize import QTensor
from qcompile.formats.scales import GroupStats, compute_scales
from qcompile.graph import delete_attr, get_attr_value, linear_nodes, set_attr_value
from qcompile.pass_base import Pass, PassResult
from qcompile.passes.calibrate import linear_stats, require_calibration
from qcompile.planned import planned_weight, plans
from qcompile.registry import register_pass

__all__ = ["QuantizePass", "insert_dequant", "select_linears"]

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
        clip: ``none`` or ``search``: per-group search of the weight clip ratio minimizing the
            squared error weighted by w^2 (importance of large weights).
        static: Quantize activations with a fixed per-tensor scale from the calibrated input
            absmax (``calibrate`` must run first) instead of a dynamic one; ``a`` must be a
            symmetric per-tensor format such as ``int8/tensor``.
        kv: KV-cache format (per token, group or tensor along head_dim, e.g. ``int4/g64/asym``
            or ``fp4_e2m1/token``), or none; see rule 7.
    """

    w: str | None = None
    a: str | None = None
    include: str = "*"
    exclude: str = ""
    lm_head: bool = False
    clip: Literal["none", "search"] = "none"
    static: bool = False
    kv: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "w", _canonical_format(self.w, "weight", _WEIGHT_GRANULARITIES))
        object.__setattr__(self, "a", _canonical_format(self.a, "activation", _ACT_GRANULARITIES))
        object.__setattr__(self, "kv", _canonical_format(self.kv, "kv", _ACT_GRANULARITIES))
        if self.w is None and self.a is None and self.kv is None:
            raise ValueError("quantize needs w=<format>, a=<format> and/or kv=<format>")
        if self.static:
            spec = parse_format(self.a) if self.a is not None else None
            if spec is None or spec.granularity != "tensor" or spec.asym:
                raise FormatError(
                    f"static=true needs a symmetric per-tensor activation format (e.g. "
                    f"a=int8/tensor), got a={self.a}"
                )


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


LORC_META = "qcompile.lorc"


def select_linears(gm: torch.fx.GraphModule, include: str = "*", exclude: str = "",
                   lm_head: bool = False) -> tuple[list[torch.fx.Node], dict[str, str]]:
    """Linears a weight pass should touch, and the reason each other one is skipped.

    Selected: ``aten.linear`` with a plain 2-D float weight attribute, whose name matches
    ``include`` and not ``exclude``, that is not an output head unless ``lm_head``, and that
    is not a low-rank compensation factor added by ``lorc``.
    """
    heads = head_linears(gm)
    selected, skipped = [], {}
    for node in linear_nodes(gm):
        name = _linear_name(node.args[1].target)
        if node.meta.get(LORC_META):
            skipped[name] = "low-rank compensation factor (added by lorc)"
        elif not _matches(name, include) or _matches(name, exclude):
            skipped[name] = "excluded by include/exclude"
        elif node in heads and not lm_head:
            skipped[name] = "output head (set lm_head=true to quantize)"
        else:
            w = get_attr_value(gm, node.args[1].target)
            if w.dim() != 2 or not w.is_floating_point():
                skipped[name] = f"weight is not a 2-D float tensor ({tuple(w.shape)}, {w.dtype})"
            else:
                selected.append(node)
    return selected, skipped


#: Attribute suffixes of a packed weight's tensors, in ``dequantize_weight``'s argument order.
DEQUANT_SUFFIXES = ("qweight", "wscale", "wscale_neg", "wzero", "wouter")


def insert_dequant(gm: torch.fx.GraphModule, anchor: torch.fx.Node, target: str, q: QTensor,
                   dtype: torch.dtype) -> torch.fx.Node:
    """Store ``q`` packed as buffers named after ``target`` and insert, before ``anchor``,
    the ``qcompile::dequantize_weight`` node that decodes it to ``dtype``."""
    base = _linear_name(target)
    tensors = (pack_codes(q.codes, q.spec.bits), q.scale, q.scale_neg, q.zero, q.outer)
    args = []
    with gm.graph.inserting_before(anchor):
        for suffix, t in zip(DEQUANT_SUFFIXES, tensors, strict=True):
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
        6. With ``static=true`` the activation op is ``qcompile::quantize_activation_static``
           with a fixed scale computed (by the format's scale rule) from the largest
           calibrated per-tensor absmax of the linears reading x, stored as the buffer
           ``<linear>.input_scale``; missing statistics raise ``PreconditionError``.
        7. With ``kv`` set, the cached K and V of every attention (after RoPE and any
           ``rotate`` R3 Hadamard, before the GQA head repeat) go through
           ``qcompile::quantize_activation`` (:func:`qcompile.attention.quantize_kv`); a graph
           without attention raises ``UnsupportedGraphError``.
    """

    name = "quantize"
    Options = QuantizeOptions
    summary = "weights to packed codes + dequantize; dynamic activation Q/DQ before linears"

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if self.options.static:
            require_calibration(gm, self.name)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        opts = self.options
        selected, skipped = select_linears(gm, opts.include, opts.exclude, opts.lm_head)
        facts: dict = {"linears_matched": len(selected), "skipped": skipped}
        names = {node: _linear_name(node.args[1].target) for node in selected}
        planned = {n.args[1].target for n in selected} & set(plans(gm))
        modified = False
        if opts.w is not None or planned:
            facts.update(self._quantize_weights(gm, selected))
            modified = facts["weights_quantized"] > 0
        if opts.a is not None:
            facts["act_quant_nodes"] = self._quantize_inputs(gm, selected, names)
            modified = modified or bool(selected)
        if opts.kv is not None:
            facts.update(quantize_kv(gm, opts.kv))
            modified = True
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified, facts)

    def _quantize_weights(self, gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> dict:
        spec = parse_format(self.options.w) if self.options.w is not None else None
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        dequant_of: dict[str, torch.fx.Node] = {}
        bits = numel = 0
        err_num = err_den = 0.0
        clip_sum, clip_count = 0.0, 0
        by: dict[str, int] = {}
        formats: set[str] = set()
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
                plan = planned_weight(gm, target)
                if plan is not None:
                    q = plan.qtensor
                    if spec is not None and str(q.spec) != str(spec):
                        raise PassError(
                            f"weight {target!r} was quantized by `{plan.by}` as {q.spec}, but "
                            f"quantize asks w={spec}; use the same format (or drop w=)"
                        )
                    by[plan.by] = by.get(plan.by, 0) + 1
                elif spec is None:
                    continue  # w unset: only planned weights are quantized
                else:
                    clip = None
                    if self.options.clip == "search":
                        # Weighted by w^2: the plain-MSE optimum clips the few large weights
                        # that carry most of the output (it raised SmolLM2 int4 g128 ppl
                        # from 32.4 to 39.5); w^2-weighted search lowered it to 32.2.
                        clip = search_clip(w.float(), spec, importance=w.float().square())
                        clip_sum += float(clip.sum())
                        clip_count += clip.numel()
                    q = quantize(w.float(), spec, clip=clip)
                w_hat = dequantize(q)
                err_num += float((w_hat - w.float()).pow(2).sum())
                err_den += float(w.float().pow(2).sum())
                bits += q.spec.bits_per_element(w.shape[-1]) * w.numel()
                numel += w.numel()
                formats.add(str(q.spec))
                dequant_of[target] = insert_dequant(gm, first, target, q, w.dtype)
                plans(gm).pop(target, None)
            node.replace_input_with(node.args[1], dequant_of[target])
            log.debug("quantize: %s weight %s", node.name, target)
        self._drop_unused(gm, dequant_of)
        out = {
            "weight_format": str(spec) if spec is not None else "|".join(sorted(formats)),
            "weights_quantized": len(dequant_of),
            "linears_quantized": sum(1 for n in nodes if n.args[1] in dequant_of.values()),
            "bits_per_weight": round(bits / numel, 4) if numel else None,
            "weight_rel_mse": (err_num / err_den) if err_den else None,
        }
        if by:
            out["planned_by"] = by
        if clip_count:
            out["clip_mean"] = round(clip_sum / clip_count, 4)
        return out

    @staticmethod
    def _drop_unused(gm: torch.fx.GraphModule, targets) -> None:
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and node.target in targets and not node.users:
                gm.graph.erase_node(node)
        still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for target in targets:
            if target not in still_read:
                delete_attr(gm, target)

    def _quantize_inputs(self, gm: torch.fx.GraphModule, nodes: list[torch.fx.Node],
                         names: dict[torch.fx.Node, str]) -> int:
        fmt = self.options.a
        made: dict[torch.fx.Node, torch.fx.Node] = {}
        readers: dict[torch.fx.Node, list[str]] = {}
        for node in nodes:
            readers.setdefault(node.args[0], []).append(names[node])
        for node in nodes:
            x = node.args[0]
            if not isinstance(x, torch.fx.Node):
                raise UnsupportedGraphError(f"linear {node.name} has a non-tensor input {x!r}")
            if x not in made:
                if self.options.static:
                    attr = f"{names[node]}.input_scale"
                    set_attr_value(gm, attr, self._static_scale(gm, readers[x]))
                    with gm.graph.inserting_after(x):
                        scale = gm.graph.get_attr(attr)
                    with gm.graph.inserting_after(scale):
                        qx = gm.graph.call_function(
                            torch.ops.qcompile.quantize_activation_static.default,
                            (x, scale, fmt),
                        )
                else:
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

    def _static_scale(self, gm: torch.fx.GraphModule, names: list[str]) -> torch.Tensor:
        """fp32 one-element scale from the largest calibrated tensor absmax of ``names``."""
        amax = 0.0
        for name in names:
            stats = linear_stats(gm, name)
            if stats is None:
                raise PreconditionError(
                    f"static=true: linear {name} has no calibration statistics; run "
                    "`calibrate` after every pass that changes linear inputs"
                )
            amax = max(amax, float(stats["tensor_absmax"]))
        spec = parse_format(self.options.a)
        a = torch.tensor([amax], dtype=torch.float32)
        clip = None if spec.clip == 1.0 else spec.clip
        return compute_scales(spec, GroupStats(a, a), clip).scale.reshape(())

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
