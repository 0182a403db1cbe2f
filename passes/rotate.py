"""Fold QuaRot rotations (R1, R2) into the weights and insert online Hadamards (R3, R4)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.hadamard)
from qcompile.attention import AttentionSite, find_attention, insert_on_edge
from qcompile.errors import UnsupportedGraphError
from qcompile.graph import get_attr_value, is_linear, set_attr_value
from qcompile.hadamard import has_hadamard, orthogonal_matrix, random_orthogonal
from qcompile.pass_base import Pass, PassResult
from qcompile.passes.calibrate import drop_stats
from qcompile.passes.fuse_norms import check_invariance, default_tol, probe_ids, run_probe
from qcompile.patterns import linear_name
from qcompile.registry import register_pass
from qcompile.stream_rotation import (
    fold_r1,
    plan_r1,
    require_weightless_stream,
    retie,
    weight_attr,
)

__all__ = ["RotatePass", "finish_rewrite"]

log = logging.getLogger(__name__)
aten = torch.ops.aten
ROTATE_KEY = "qcompile.rotate"

# Elementwise ops an MLP activation is built from (rule R4): gates, GELU/SiLU, their decompositions.
_ACT_OPS = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default,
            aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default,
            aten.tanh.default, aten.pow.Tensor_Scalar, aten.chunk.default, aten.split.Tensor,
            aten.split_with_sizes.default, aten.slice.Tensor, aten.to.dtype,
            aten._to_copy.default, aten.type_as.default, aten.contiguous.default}


@dataclass(frozen=True)
class RotateOptions:
    """Options of ``rotate``.

    Attributes:
        r1: Residual-stream rotation: ``hadamard`` (randomized Hadamard ``H diag(s)/sqrt(n)``,
            signs from ``seed``; a seeded random orthogonal matrix when ``n`` has no Hadamard
            construction, reported), ``random`` (seeded random orthogonal) or ``none``.
        r2: Per-head rotation of values / output-projection inputs: ``hadamard`` (the same
            normalized Hadamard of head_dim for every head), ``random`` (an independent seeded
            random orthogonal matrix per kv head) or ``none``.
        r3: Online Hadamard on queries and keys after RoPE: ``hadamard`` or ``none``.
        r4: Online Hadamard on MLP down-projection inputs, inverse folded into the weight.
        ro: Online Hadamard on attention output-projection inputs (all heads at once, QuaRot's
            ``H_heads (x) I`` generalized to any hidden size), inverse folded into the weight.
        seed: Seed of the R1 signs / random matrices and of the probe input.
        seq: Length of the probe input of the self-check.
        tol: Largest allowed max |delta logits| / max |logits| on the probe; none: 1e-3 for
            fp32 graphs, 3e-2 for fp16 and 1e-1 for bf16 ones.
    """

    r1: Literal["hadamard", "random", "none"] = "hadamard"
    r2: Literal["hadamard", "random", "none"] = "hadamard"
    r3: Literal["hadamard", "none"] = "hadamard"
    r4: Literal["hadamard", "none"] = "hadamard"
    ro: Literal["hadamard", "none"] = "none"
    seed: int = 0
    seq: int = 16
    tol: float | None = None


@register_pass
class RotatePass(Pass):
    """QuaRot: make activations outlier-free with orthogonal rotations; keep the function.

    Rotations map row vectors ``x -> x Q``; weights are rewritten in float64 and stored in
    their dtype (attributes replaced, never modified in place). Rules:
        R1. Residual stream (:mod:`qcompile.patterns`), with Q from ``r1`` of order hidden:
            the embedding ``E -> E Q``; every linear reading a stream norm (q/k/v, gate/up,
            fused qkv / gate_up, the head) ``W -> W Q``; every linear writing the stream
            (o_proj, down_proj, parallel-block branches) ``W -> Q^T W``, ``b -> b Q``. Exact
            because weightless RMSNorm commutes with Q. Tied attributes getting the same
            transform stay tied.
        R1 NOT applied -- ``PreconditionError`` (nothing changed): a norm reading the stream
            has a weight, a bias, or subtracts the mean (run ``fuse-norms`` first).
            ``UnsupportedGraphError`` naming the node: a post-norm with a weight between a
            writer and its residual add (Gemma 2/3: ``RMS(yQ) diag(g) != RMS(y) diag(g) Q``);
            a weightless post-norm commutes and is accepted; a stream or norm output read by
            anything but norms, linears and residual adds; a writer whose output is also
            read elsewhere; a weight also read by a node outside the plan; a stream that does
            not start at an embedding lookup (times constants).
        R2. Every attention (:mod:`qcompile.attention`): the V rows of the value projection
            (a row range of a fused qkv) ``W_g -> R_g^T W_g``, ``b_g -> b_g R_g`` per kv head g,
            and the o_proj columns of query head h ``W_h -> W_h R_{h // n_rep}`` (GQA: query
            heads sharing a kv head share its rotation). NOT applied (error naming the node):
            V or the attention output reaches anything but head split/merge, casts and the
            GQA repeat; V rows are read by another node.
        R3. ``qcompile::hadamard(., head_dim)`` on the query at the attention input and on the
            cached key (after RoPE, before the GQA repeat): ``(q H)(k H)^T = q k^T``.
        R4. Every MLP down projection -- a linear whose input is computed from other linears'
            outputs by elementwise ops only (SwiGLU, GeGLU, GELU) --: ``qcompile::hadamard(x,
            in_features)`` on its input and ``W -> W H``.
        RO. ``ro=hadamard``: the same for every attention output projection (input width
            heads * head_dim): QuaRot's online ``H_heads (x) I`` on o_proj inputs, done as one
            Hadamard of the full width so head counts without a Hadamard (SmolLM2's 9) work.
        R2-R4, RO NOT applied (error naming the node): the order (head_dim, in_features) has no
            Hadamard construction for an online op (R2 falls back to a random orthogonal
            matrix, reported, since it is folded).
        Nothing to do (all ``none``): ``modified`` is False and the graph is untouched.
        Self-check: logits on a seeded probe before and after; ``PostconditionError`` above
        ``tol``. Calibration statistics of linears whose input changed are dropped.
    """

    name = "rotate"
    Options = RotateOptions
    summary = "QuaRot R1-R4: fold orthogonal rotations into weights, online Hadamards"

    def requires(self, gm: fx.GraphModule) -> None:
        if self.options.r1 == "none":
            return
        require_weightless_stream(gm, "rotate r1", "(e.g. 'fuse-norms,rotate'), or set r1=none")

    def call(self, gm: fx.GraphModule) -> PassResult:
        o = self.options
        if (o.r1, o.r2, o.r3, o.r4, o.ro) == ("none",) * 5:
            return PassResult(gm, False, {})
        sites = find_attention(gm)
        # plan everything first: errors leave the graph untouched
        r1 = plan_r1(gm) if o.r1 != "none" else None
        if o.r2 != "none":
            self._check_r2(gm, sites)
        downs = _check_online(gm, _mlp_downs(gm), "r4") if o.r4 != "none" else []
        if o.ro != "none":
            for s in sites:
                if s.o_proj is None:
                    raise UnsupportedGraphError(f"ro: attention {s.node.name}: "
                                                f"{s.problems['o_proj']}; set ro=none")
        outs = _check_online(gm, [s.o_proj for s in sites], "ro") if o.ro != "none" else []
        if o.r3 != "none":
            for s in sites:
                if not has_hadamard(s.head_dim):
                    raise UnsupportedGraphError(f"r3: head_dim {s.head_dim} of attention "
                                                f"{s.node.name} has no Hadamard; set r3=none")
        ids = probe_ids(gm, o.seq, o.seed)
        before = run_probe(gm, ids)
        facts: dict[str, Any] = {}
        changed: list[str] = []
        if r1 is not None:
            kind = "randomized-hadamard" if o.r1 == "hadamard" else "random"
            rot = orthogonal_matrix(r1.hidden_of(gm), kind, o.seed)
            facts["r1"] = fold_r1(gm, r1, rot, changed)
        if o.r2 != "none" and sites:
            facts["r2"] = self._apply_r2(gm, sites, changed)
        if o.r3 != "none" and sites:
            had = torch.ops.qcompile.hadamard.default
            for s in sites:
                insert_on_edge(gm, s.q, had, s.head_dim)
                insert_on_edge(gm, s.k, had, s.head_dim)
            facts["r3"] = {"attention": len(sites), "online_hadamards": 2 * len(sites),
                           "head_dim": sites[0].head_dim}
        if downs:
            facts["r4"] = _apply_online(gm, downs, changed)
        if outs:
            facts["ro"] = _apply_online(gm, outs, changed)
        modified = bool(facts)
        if modified:
            facts.update(finish_rewrite(gm, before, ids, o.tol, "rotate", changed))
            gm.meta[ROTATE_KEY] = {k: facts[k] for k in ("r1", "r2", "r3", "r4", "ro")
                                   if k in facts}
        return PassResult(gm, modified, facts)

    # ------------------------------------------------------------------------------ R1

    # ------------------------------------------------------------------------------ R2

    @staticmethod
    def _check_r2(gm: fx.GraphModule, sites: list[AttentionSite]) -> None:
        for s in sites:
            for key in ("v_proj", "o_proj"):
                if key in s.problems:
                    raise UnsupportedGraphError(f"r2: attention {s.node.name}: "
                                                f"{s.problems[key]}; set r2=none")
            for lin in (s.v_proj.linear, s.o_proj):
                weight_attr(lin, 1)
                weight_attr(lin, 2)

    def _apply_r2(self, gm, sites: list[AttentionSite], changed: list[str]) -> dict[str, Any]:
        desc = ""
        for i, s in enumerate(sites):
            d = s.v_head_dim
            if self.options.r2 == "hadamard":
                rot = orthogonal_matrix(d, "hadamard", self.options.seed)
                mats = [rot.matrix] * s.kv_heads
                desc = rot.description
            else:
                mats = [random_orthogonal(d, self.options.seed + 1 + i * s.kv_heads + g)
                        for g in range(s.kv_heads)]
                desc = "random orthogonal per kv head"
            r = torch.stack(mats)  # [kv_heads, d, d]
            proj = s.v_proj
            rows = slice(proj.start, proj.start + proj.width)
            for t, eq in ((weight_attr(proj.linear, 1), "gji,gjk->gik"),  # W_g -> R_g^T W_g
                          (weight_attr(proj.linear, 2), "gjk,gj->gk")):  # b_g -> b_g R_g
                if t is not None:
                    old = get_attr_value(gm, t)
                    new = old.detach().double().clone()
                    block = new[rows].reshape(s.kv_heads, d, *new.shape[1:])
                    new[rows] = torch.einsum(eq, r, block).reshape(proj.width, *new.shape[1:])
                    set_attr_value(gm, t, new.to(old.dtype))
            ot = weight_attr(s.o_proj, 1)
            old = get_attr_value(gm, ot)
            wo = old.detach().double().reshape(old.shape[0], s.heads, d)
            per_head = r.repeat_interleave(s.n_rep, dim=0)  # query head h uses R_{h // n_rep}
            wo = torch.einsum("ohj,hjk->ohk", wo, per_head).reshape(old.shape)
            set_attr_value(gm, ot, wo.to(old.dtype))
            changed.append(linear_name(s.o_proj))
        return {"attention": len(sites), "head_dim": sites[0].v_head_dim, "rotation": desc}


def finish_rewrite(gm: fx.GraphModule, before: torch.Tensor, ids: torch.Tensor,
                   tol: float | None, who: str, changed: list[str]) -> dict[str, Any]:
    """After folding rotations: recompile, self-check the probe logits against ``before``
    (``PostconditionError`` above ``tol``; none: :func:`default_tol`), drop the statistics of
    linears whose input changed and record tied attributes. Returns the facts to report."""
    gm.graph.lint()
    gm.recompile()
    tol = tol if tol is not None else default_tol(gm)
    facts = check_invariance(before, run_probe(gm, ids), tol, who)
    facts["stats_dropped"] = drop_stats(gm, sorted(set(changed)))
    retie(gm)
    return facts


def _mlp_downs(gm: fx.GraphModule) -> list[fx.Node]:
    """Linears whose input is computed from other linears' outputs by elementwise ops only."""
    from_linears: dict[fx.Node, bool | None] = {}  # None: a constant (get_attr)
    downs = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            from_linears[node] = None
        elif is_linear(node):
            if from_linears.get(node.args[0]) and node.args[1].op == "get_attr":
                downs.append(node)
            from_linears[node] = True
        elif node.op == "call_function" and (node.target in _ACT_OPS or
                                             getattr(node.target, "__name__", "") == "getitem"):
            states = [from_linears.get(a, False) for a in node.all_input_nodes]
            states = [s for s in states if s is not None]
            from_linears[node] = bool(states) and all(states)
        else:
            from_linears[node] = False
    return downs


def _check_online(gm: fx.GraphModule, linears: list[fx.Node], rule: str) -> list[fx.Node]:
    """Raise unless each linear's input width has a Hadamard and its weight is its own."""
    for node in linears:
        k = node.args[0].meta["val"].shape[-1]
        if not has_hadamard(int(k)):
            raise UnsupportedGraphError(f"{rule}: input width {k} of {node.name} has no "
                                        f"Hadamard construction; set {rule}=none")
        target = weight_attr(node, 1)
        for g in gm.graph.find_nodes(op="get_attr", target=target):
            if any(u is not node for u in g.users):
                raise UnsupportedGraphError(f"{rule}: weight {target} of {node.name} is read "
                                            "by other nodes too")
    return linears


def _apply_online(gm: fx.GraphModule, linears: list[fx.Node], changed: list[str]
                  ) -> dict[str, Any]:
    """``x -> hadamard(x)`` online before each linear and ``W -> W H`` (H orthonormal)."""
    had = torch.ops.qcompile.hadamard.default
    sizes = set()
    for node in linears:
        k = int(node.args[0].meta["val"].shape[-1])
        sizes.add(k)
        target = weight_attr(node, 1)
        w = get_attr_value(gm, target)
        h = orthogonal_matrix(k, "hadamard")  # the H the online op applies
        set_attr_value(gm, target, h.apply(w.detach()).to(w.dtype))
        insert_on_edge(gm, (node.args[0], node), had, k)
        changed.append(linear_name(node))
    return {"linears": len(linears), "online_hadamards": len(linears), "sizes": sorted(sizes)}
