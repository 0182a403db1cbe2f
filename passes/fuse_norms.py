"""Fold norm weights (and LayerNorm biases) into the linears that read the normed value."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.errors import PostconditionError, UnsupportedGraphError
from qcompile.graph import delete_attr, get_attr_value, set_attr_value, unique_attr_name
from qcompile.pass_base import Pass, PassResult
from qcompile.passes.calibrate import drop_stats, rescale_input
from qcompile.patterns import (
    Norm,
    ResidualStream,
    find_norms,
    find_residual_stream,
    linear_name,
    stream_writers,
    strip_casts,
)
from qcompile.registry import register_pass

__all__ = ["FUSED_NORMS_KEY", "FuseNormsPass", "check_invariance", "probe_ids", "run_probe"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

FUSED_NORMS_KEY = "qcompile.fuse_norms"


# ------------------------------------------------------------ self-check (shared by passes)


def probe_ids(gm: fx.GraphModule, seq: int, seed: int) -> torch.Tensor:
    """Deterministic random token ids ``[batch, seq]`` for a graph (its vocabulary and device).

    Raises:
        UnsupportedGraphError: The graph has no embedding lookup to size the vocabulary from.
    """
    emb = next((n for n in gm.graph.nodes if n.op == "call_function"
                and n.target is aten.embedding.default and n.args[0].op == "get_attr"), None)
    if emb is None:
        raise UnsupportedGraphError("graph has no aten.embedding of an attribute; cannot "
                                    "build a probe input for the self-check")
    weight = get_attr_value(gm, str(emb.args[0].target))
    lo, hi = gm.meta.get("seq_range", (seq, seq))
    seq = min(max(seq, lo), hi)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, weight.shape[0], (int(gm.meta.get("batch", 1)), seq), generator=gen)
    return ids.to(weight.device)


def run_probe(gm: fx.GraphModule, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``gm`` on ``ids`` as fp32."""
    with torch.no_grad():
        return gm(ids).detach().float()


def check_invariance(before: torch.Tensor, after: torch.Tensor, tol: float, what: str
                     ) -> dict[str, float]:
    """Facts ``max_abs_dlogits`` / ``rel_dlogits`` (relative to max |logits|).

    Raises:
        PostconditionError: The relative change exceeds ``tol`` (or is not finite).
    """
    delta = float((after - before).abs().max())
    rel = delta / max(float(before.abs().max()), 1e-30)
    if not rel <= tol:
        raise PostconditionError(
            f"{what} changed the logits on the probe input by {delta:.3g} ({rel:.3g} of max "
            f"|logits|), above tol={tol:g}; the rewrite is not function-preserving here"
        )
    return {"max_abs_dlogits": delta, "rel_dlogits": rel}


def default_tol(gm: fx.GraphModule) -> float:
    """1e-3 for fp32/fp64 graphs, 3e-2 for fp16 and 1e-1 for bf16 weights: folding re-rounds
    the weights and the probe runs in the graph's dtype, so the change grows with the dtype's
    epsilon and the depth (bf16 SmolLM2-135M, 30 layers: 3.4e-2 from fuse-norms alone, on an
    H200). A wrong fold moves the logits by O(1) of their maximum, far above either."""
    for t in gm.parameters():
        if t.is_floating_point():
            if t.dtype in (torch.float32, torch.float64):
                return 1e-3
            return 1e-1 if t.dtype == torch.bfloat16 else 3e-2
    return 1e-3


# ------------------------------------------------------------------------------------ pass


@dataclass(frozen=True)
class FuseNormsOptions:
    """Options of ``fuse-norms``.

    Attributes:
        center: For LayerNorm residual streams, fold the mean subtraction into the stream's
            writers and embedding and turn the LayerNorms into RMSNorms (rule 3).
        seed: Seed of the probe input of the self-check.
        seq: Length of the probe input.
        tol: Largest allowed max |delta logits| / max |logits| on the probe; none: 1e-3 for
            fp32 graphs, 3e-2 for fp16 and 1e-1 for bf16 ones.
    """

    center: bool = True
    seed: int = 0
    seq: int = 16
    tol: float | None = None


@register_pass
class FuseNormsPass(Pass):
    """Make norms weightless by folding gamma (and beta) into the linears that read them.

    Rules (patterns: :mod:`qcompile.patterns`; all math in float64, stored in the weights'
    dtype; attributes are replaced, never modified in place):
        1. A norm with a weight attribute whose normed value is read only by linears (through
           casts) with plain, unshared weight attributes: each reader gets
           ``W' = W diag(gamma)`` (gamma = ``w + offset``, so Gemma's ``(1 + w)`` too) and, for
           LayerNorm, ``b' = b + W beta`` (a bias attribute is created if it had none). The
           norm's weight becomes the value giving scale 1 (ones; zeros for ``(1 + w)``) and
           beta becomes zeros; the graph keeps its nodes.
        2. The final norm folds into the head. A head tied to the embedding gets its own
           tensor (the tie was two attributes on one tensor); ``gm.meta["tied_params"]`` is
           updated.
        3. LayerNorm streams (``center=true``): when every norm reading the residual stream is
           a LayerNorm, the stream starts at an embedding lookup (times constants), every
           branch is a sum of linears written straight into the residual adds and nothing
           else reads the stream, the embedding rows and the writers' output rows (weights and
           biases) are centered, so the stream is zero-mean per token, and each of those
           LayerNorms is replaced by ``x * rsqrt(mean(x^2) + eps) * gamma`` (+ beta if rule 1
           did not fold it). Exact: LayerNorm ignores the mean, and is RMSNorm on zero-mean x.
        4. NOT rewritten, reported in ``facts["skipped"]`` with the reason: norms whose normed
           value reaches anything but linear inputs (q/k-norms, post-norms feeding residual
           adds, the graph output), norms without a weight attribute or already at scale 1
           and shift 0, norms whose weight attribute is read elsewhere, or whose readers'
           weights are not plain attributes or are shared with other nodes.
        5. A LayerNorm stream failing rule 3's conditions keeps its LayerNorms (rule 1 still
           applies); the reason is ``facts["center_skipped"]``.
        6. Nothing to do: ``modified`` is False and the graph is untouched.
        7. Self-check: logits on a seeded probe before and after; ``PostconditionError``
           above ``tol``. Calibration statistics of readers are rescaled (input x/gamma) or
           dropped when beta was folded or gamma has zeros.

    ``gm.meta["qcompile.fuse_norms"]`` records ``fused`` (norm name -> kind, weight attribute,
    offset, readers; kept across re-runs), ``skipped`` (norm name -> reason) and ``centered``
    (rule 3 applied). A norm's name is its weight attribute without ``.weight``.
    """

    name = "fuse-norms"
    Options = FuseNormsOptions
    summary = "fold norm gamma/beta into reading linears; LayerNorm streams -> RMSNorm"

    def call(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        norms = find_norms(gm)
        ids = probe_ids(gm, opts.seq, opts.seed)
        before = run_probe(gm, ids)
        fused: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        untied: list[str] = []
        for norm in norms:
            reason = self._why_not(gm, norm)
            if reason is not None:
                skipped[norm.name] = reason
                continue
            self._fold(gm, norm, untied)
            fused[norm.name] = {"kind": norm.kind, "weight": str(norm.weight.target),
                                "offset": norm.offset,
                                "readers": [linear_name(c) for c in norm.consumers]}
            log.debug("fuse-norms: folded %s into %s", norm.name, fused[norm.name]["readers"])
        center_reason, converted = None, 0
        if any(n.kind == "layer" for n in norms):
            if opts.center:
                center_reason, converted = self._center(gm, norms)
            else:
                center_reason = "center=false"
        modified = bool(fused or converted)
        facts: dict[str, Any] = {
            "norms_found": len(norms),
            "norms_fused": len(fused),
            "fused_by_kind": {k: sum(v["kind"] == k for v in fused.values())
                              for k in ("rms", "layer")},
            "linears_updated": sum(len(v["readers"]) for v in fused.values()),
            "skipped": skipped,
            "untied": untied,
            "layernorms_to_rms": converted,
        }
        if center_reason is not None:
            facts["center_skipped"] = center_reason
        if modified:
            gm.graph.lint()
            gm.recompile()
            tol = opts.tol if opts.tol is not None else default_tol(gm)
            facts.update(check_invariance(before, run_probe(gm, ids), tol, "fuse-norms"))
        record = gm.meta.setdefault(FUSED_NORMS_KEY, {"fused": {}, "skipped": {},
                                                      "centered": False})
        record["fused"].update(fused)  # a re-run keeps what earlier runs fused
        record["skipped"] = {k: v for k, v in skipped.items() if k not in record["fused"]}
        record["centered"] = record["centered"] or converted > 0
        return PassResult(gm, modified, facts)

    # -------------------------------------------------------------------------- rule 1/4

    @staticmethod
    def _why_not(gm: fx.GraphModule, norm: Norm) -> str | None:
        if norm.other_users and _call_is(norm.input, aten.linear.default) and all(
                _call_is(u, aten.add.Tensor) for u in norm.other_users):
            return ("post-norm: normalizes the branch output of linear "
                    f"{linear_name(norm.input)} and is added into the residual stream by "
                    f"{norm.other_users[0].name}; its gamma acts after the normalization and "
                    "cannot be folded into a linear")
        if norm.other_users:
            users = ", ".join(f"{u.name} ({u.target})" for u in norm.other_users[:3])
            return f"normed value is read by non-linear nodes: {users}"
        if not norm.consumers:
            return "normed value has no readers"
        if norm.weight is None:
            return "norm has no weight attribute (nothing to fold)"
        gamma, beta = norm.scale(gm), norm.shift(gm)
        if bool((gamma == 1).all()) and (beta is None or not bool(beta.any())):
            return "already weightless (scale 1, shift 0)"
        own = set(norm.nodes)
        for attr in (norm.weight, norm.bias):
            if attr is not None:
                extra = _readers_of_target(gm, str(attr.target)) - own
                if extra:
                    return f"attribute {attr.target} is also read by {sorted(n.name for n in extra)}"
        consumers = set(norm.consumers)
        for lin in norm.consumers:
            for arg in lin.args[1:3]:
                if arg is None:
                    continue
                if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                    return f"reader {lin.name} has a weight/bias that is not a plain attribute"
                extra = _readers_of_target(gm, str(arg.target)) - consumers
                if extra:
                    return (f"reader {lin.name}'s attribute {arg.target} is also read by "
                            f"{sorted(n.name for n in extra)}")
        return None

    def _fold(self, gm: fx.GraphModule, norm: Norm, untied: list[str]) -> None:
        gamma = norm.scale(gm).double()
        beta = norm.shift(gm)
        has_beta = beta is not None and bool(beta.any())
        done: set[str] = set()
        for lin in norm.consumers:
            wt = str(lin.args[1].target)
            if wt in done:
                continue
            done.add(wt)
            w = get_attr_value(gm, wt)
            if has_beta:
                self._add_bias(gm, lin, w.double() @ beta.double())
            _replace(gm, wt, (w.double() * gamma).to(w.dtype), untied)
            name = linear_name(lin)
            if has_beta or not bool((gamma != 0).all()):
                drop_stats(gm, [name])
            else:
                rescale_input(gm, name, gamma.float())
        wt = str(norm.weight.target)
        w = get_attr_value(gm, wt)
        _replace(gm, wt, torch.full_like(w, 1.0 - norm.offset), untied)
        if norm.bias is not None:
            bt = str(norm.bias.target)
            _replace(gm, bt, torch.zeros_like(get_attr_value(gm, bt)), untied)

    @staticmethod
    def _add_bias(gm: fx.GraphModule, lin: fx.Node, delta: torch.Tensor) -> None:
        b = lin.args[2] if len(lin.args) > 2 else None
        if b is not None:
            old = get_attr_value(gm, str(b.target))
            set_attr_value(gm, str(b.target), (old.double() + delta).to(old.dtype))
            return
        w = get_attr_value(gm, str(lin.args[1].target))
        target = unique_attr_name(gm, f"{linear_name(lin)}.bias")
        set_attr_value(gm, target, delta.to(w.dtype))
        with gm.graph.inserting_before(lin):
            node = gm.graph.get_attr(target)
        lin.args = (lin.args[0], lin.args[1], node)

    # ----------------------------------------------------------------------------- rule 3

    def _center(self, gm: fx.GraphModule, norms: list[Norm]) -> tuple[str | None, int]:
        try:
            stream = find_residual_stream(gm, norms)
        except UnsupportedGraphError as e:
            return f"no residual stream: {e}", 0
        reason = self._why_not_center(gm, stream, norms)
        if reason is not None:
            return reason, 0
        untied: list[str] = []
        et = str(stream.embedding.args[0].target)
        e = get_attr_value(gm, et)
        _replace(gm, et, _centered(e, dim=1), untied)
        for w in stream_writers(stream, norms):
            wt = str(w.linear.args[1].target)
            _replace(gm, wt, _centered(get_attr_value(gm, wt), dim=0), untied)
            b = w.linear.args[2] if len(w.linear.args) > 2 else None
            if b is not None:
                _replace(gm, str(b.target), _centered(get_attr_value(gm, str(b.target)), 0),
                         untied)
        reading = [*stream.pre_norms, stream.final_norm]
        for norm in reading:
            beta = norm.shift(gm)
            _to_rms(gm, norm, drop_bias=beta is None or not bool(beta.any()))
        return None, len(reading)

    @staticmethod
    def _why_not_center(gm: fx.GraphModule, stream: ResidualStream, norms: list[Norm]
                        ) -> str | None:
        reading = [*stream.pre_norms, *([stream.final_norm] if stream.final_norm else [])]
        if stream.final_norm is None:
            return f"the head {stream.head.name} reads the stream without a final norm"
        kinds = {n.kind for n in reading}
        if kinds != {"layer"}:
            return f"the stream is read by norms of kinds {sorted(kinds)}, not only LayerNorm"
        if stream.other_readers:
            return f"the stream is also read by {[n.name for n in stream.other_readers[:3]]}"
        emb = stream.embedding
        if emb is None or emb.args[0].op != "get_attr":
            return f"the stream starts at {stream.start.name}, not an embedding of an attribute"
        if _readers_of_target(gm, str(emb.args[0].target)) != {emb}:
            return f"embedding attribute {emb.args[0].target} is read by other nodes too"
        for w in stream_writers(stream, norms):
            if w.linear is None:
                return w.reason
            if w.post_norm is not None:
                return f"writer {w.linear.name} goes through norm {w.post_norm.name}"
            allowed = {*w.path, w.add}
            if any(u not in allowed for u in w.linear.users):
                return f"writer {w.linear.name}'s output is also read outside the residual add"
            for arg in w.linear.args[1:3]:
                if arg is not None and (arg.op != "get_attr"
                                        or _readers_of_target(gm, str(arg.target)) != {w.linear}):
                    return f"writer {w.linear.name} has a non-plain or shared weight/bias"
        return None


def _call_is(node: fx.Node, target: object) -> bool:
    return node.op == "call_function" and node.target is target


def _readers_of_target(gm: fx.GraphModule, target: str) -> set[fx.Node]:
    return {u for n in gm.graph.find_nodes(op="get_attr") if n.target == target for u in n.users}


def _centered(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` minus its mean along ``dim`` (float64 math, ``t``'s dtype)."""
    d = t.detach().double()
    return (d - d.mean(dim=dim, keepdim=True)).to(t.dtype)


def _replace(gm: fx.GraphModule, target: str, value: torch.Tensor, untied: list[str]) -> None:
    """Bind ``target`` to ``value``; drop it from tied groups (it no longer shares a tensor)."""
    set_attr_value(gm, target, value)
    groups = []
    for group in gm.meta.get("tied_params", []):
        if target in group:
            untied.append(target)
            group = tuple(t for t in group if t != target)
        if len(group) > 1:
            groups.append(group)
    if "tied_params" in gm.meta:
        gm.meta["tied_params"] = groups


def _to_rms(gm: fx.GraphModule, norm: Norm, drop_bias: bool) -> None:
    """Rewrite a LayerNorm on a zero-mean stream as an RMSNorm (same eps, gamma, beta)."""
    graph = gm.graph
    ln = next((n for n in norm.nodes if n.target is aten.layer_norm.default), None)
    if ln is None:  # decomposed: x - mean(x) becomes x; the mean-square core stays
        sub = next(n for n in norm.nodes if n.target is aten.sub.Tensor)
        mean = sub.args[1]
        sub.replace_all_uses_with(sub.args[0])
        graph.erase_node(sub)
        graph.erase_node(mean)
        if drop_bias and norm.bias is not None:
            add = next(n for n in reversed(norm.nodes) if n.target is aten.add.Tensor
                       and any(isinstance(a, fx.Node) and strip_casts(a) is norm.bias
                               for a in n.args))
            data, beta = add.args if strip_casts(add.args[1]) is norm.bias else add.args[::-1]
            add.replace_all_uses_with(data)
            graph.erase_node(add)
            _erase_dead(gm, beta)
        return
    x, weight, bias = ln.args[0], ln.args[2], ln.args[3] if len(ln.args) > 3 else None
    val = x.meta.get("val")
    f32 = isinstance(val, torch.Tensor) and val.dtype not in (torch.float32, torch.float64)
    with graph.inserting_before(ln):
        made = []

        def call(target, *args):
            made.append(graph.call_function(target, args))
            return made[-1]

        h = call(aten.to.dtype, x, torch.float32) if f32 else x
        r = call(aten.rsqrt.default,
                 call(aten.add.Tensor, call(aten.mean.dim, call(aten.pow.Tensor_Scalar, h, 2),
                                            [-1], True), norm.eps))
        out = call(aten.mul.Tensor, h, r)
        if f32:
            out = call(aten.to.dtype, out, val.dtype)
        if weight is not None:
            out = call(aten.mul.Tensor, out, weight)
        if bias is not None and not drop_bias:
            out = call(aten.add.Tensor, out, bias)
    for n in made:
        n.meta["source_module"] = ln.meta.get("source_module", "")
    out.meta["val"] = ln.meta.get("val")
    ln.replace_all_uses_with(out)
    graph.erase_node(ln)
    if bias is not None and drop_bias:
        _erase_dead(gm, bias)


def _erase_dead(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node`` and its cast/get_attr producers once unused; delete orphaned attributes."""
    while not node.users:
        inputs = node.all_input_nodes
        if node.op == "get_attr":
            target = str(node.target)
            gm.graph.erase_node(node)
            if not gm.graph.find_nodes(op="get_attr", target=target):
                delete_attr(gm, target)
            return
        gm.graph.erase_node(node)
        if len(inputs) != 1:
            return
        node = inputs[0]
