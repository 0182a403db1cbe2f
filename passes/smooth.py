"""SmoothQuant: move activation outliers into weights with exact per-channel scales."""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.graph import get_attr_value, set_attr_value
from qcompile.pass_base import Pass, PassResult
from qcompile.passes.calibrate import linear_stats, require_calibration, rescale_input
from qcompile.passes.fuse_norms import (
    FUSED_NORMS_KEY,
    check_invariance,
    default_tol,
    probe_ids,
    run_probe,
)
from qcompile.passes.quantize import head_linears
from qcompile.patterns import Norm, find_norms, is_ancestor, is_cast, linear_name, strip_casts
from qcompile.registry import register_pass

__all__ = ["SmoothPass", "smooth_norm"]

log = logging.getLogger(__name__)
aten = torch.ops.aten
_LIN = aten.linear.default
_NOOP = frozenset({aten.contiguous.default, aten.clone.default})
_RESHAPE = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})


@dataclass(frozen=True)
class SmoothOptions:
    """Options of ``smooth``.

    Attributes:
        alpha: Migration strength: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.
        lm_head: Also smooth groups read only by output heads (they are not quantized by
            default, so this is off).
        seed: Seed of the probe input of the self-check.
        seq: Length of the probe input.
        tol: Largest allowed max |delta logits| / max |logits| on the probe; none: 1e-3 for
            fp32 graphs, 3e-2 for fp16 and 1e-1 for bf16 ones.
    """

    alpha: float = 0.5
    lm_head: bool = False
    seed: int = 0
    seq: int = 16
    tol: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")


@dataclass
class _Group:
    """Consumers read ``x / s`` after the rewrite; ``producer`` divides its output by ``s``."""

    kind: str
    name: str
    consumers: list[fx.Node]
    norm: Norm | None = None
    producer: fx.Node | None = None  # a linear whose output rows feed x
    rows: torch.Tensor | None = None  # producer row of each scale
    row_groups: torch.Tensor | None = None  # consumer input channel -> its scale (GQA sharing)


@register_pass
class SmoothPass(Pass):
    """Divide activations by per-channel scales s and multiply them into the readers' weights.

    Groups (found by dataflow; each needs calibration statistics of its readers):
        1. Norm -> linears: linears reading one normed value. gamma (and a LayerNorm's beta)
           become gamma/s (Gemma's ``w + 1`` too); the readers' input columns W[:, j] * s_j.
           ``s_j = max|X_j|^alpha / max_i,readers |W_ij|^(1 - alpha)``.
        2. v -> o (attention): o_proj-like linears whose input is the attention output
           ``reshape(transpose(attn(q, k, v)))`` with v a (row slice of a) linear, repeated over
           query heads by ``unsqueeze/expand/reshape`` (GQA) or ``enable_gqa``. The v rows of
           channel (kv head g, dim d) are divided by one scale shared by every query head
           using g (its statistics are the max over those heads); o's columns multiplied.
        3. up -> down (gated MLP): down_proj-like linears reading ``a * u`` where u is a (row
           slice of a) linear read only there (fused gate_up: disjoint slices/chunks); u's
           rows (and bias) are divided by s, down's columns multiplied.
        4. NOT rewritten, reported in ``facts["skipped"]``: norms read by non-linears or
           without a weight attribute, groups with missing statistics, attention or MLP
           shapes that do not match rules 2-3 exactly (e.g. GELU MLPs without a gate, extra
           readers of v or u), shared weight attributes, head-only groups (unless
           ``lm_head=true``).
        5. Channels with zero activation or weight range keep s = 1; s is clamped to
           [1e-5, 1e5]. Statistics of the readers are rescaled (absmax / s, Hessian too), so
           static activation scales see the smoothed inputs.
        6. Self-check: logits on a seeded probe before/after, ``PostconditionError`` above tol.

    Order: smoothing is exact anywhere, but ``fuse-norms`` after ``smooth`` folds the smoothed
    gamma back into the readers and so undoes rule 1 (rules 2-3 survive). Run ``smooth``
    after ``fuse-norms`` (and rotations), or without ``fuse-norms``. A norm smoothed after
    ``fuse-norms`` is no longer weightless: it is moved from ``fused`` to ``smoothed`` in
    ``gm.meta["qcompile.fuse_norms"]``.
    """

    name = "smooth"
    Options = SmoothOptions
    summary = "SmoothQuant per-channel scales: norm->linears, v->o, up->down"

    def requires(self, gm: fx.GraphModule) -> None:
        require_calibration(gm, self.name)

    def call(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        ids = probe_ids(gm, opts.seq, opts.seed)
        before = run_probe(gm, ids)
        heads = head_linears(gm)
        groups, skipped = self._groups(gm)
        done: dict[str, int] = {"norm": 0, "attn_vo": 0, "mlp_up_down": 0}
        smin, smax = float("inf"), 0.0
        for g in groups:
            if not opts.lm_head and all(c in heads for c in g.consumers):
                skipped[g.name] = "read only by output heads (set lm_head=true to smooth)"
                continue
            reason = _check(gm, g)
            if reason is not None:
                skipped[g.name] = reason
                continue
            s = self._scales(gm, g)
            _apply(gm, g, s)
            done[g.kind] += 1
            smin, smax = min(smin, float(s.min())), max(smax, float(s.max()))
            log.debug("smooth: %s group %s, s in [%.3g, %.3g]", g.kind, g.name, s.min(), s.max())
        modified = any(done.values())
        facts: dict[str, Any] = {"alpha": opts.alpha, "groups_smoothed": done,
                                 "skipped": skipped}
        if modified:
            facts.update({"scale_min": smin, "scale_max": smax})
            gm.recompile()
            tol = opts.tol if opts.tol is not None else default_tol(gm)
            facts.update(check_invariance(before, run_probe(gm, ids), tol, "smooth"))
        return PassResult(gm, modified, facts)

    # ------------------------------------------------------------------------ discovery

    def _groups(self, gm: fx.GraphModule) -> tuple[list[_Group], dict[str, str]]:
        groups: list[_Group] = []
        skipped: dict[str, str] = {}
        for norm in find_norms(gm):
            if not norm.consumers:
                continue  # post-norms and q/k-norms: nothing reads them as a linear input
            if norm.other_users:
                skipped[norm.name] = "normed value is also read by non-linear nodes"
            elif norm.weight is None:
                skipped[norm.name] = "norm has no weight attribute to absorb 1/s"
            else:
                groups.append(_Group("norm", norm.name, list(norm.consumers), norm=norm))
        for lin in gm.graph.find_nodes(op="call_function", target=_LIN):
            if not isinstance(lin.args[0], fx.Node):
                continue
            for finder in (_vo_group, _mlp_group):
                group, reason = finder(lin)
                if group is not None:
                    groups.append(group)
                elif reason is not None:
                    skipped[linear_name(lin)] = reason
        return groups, skipped

    # ---------------------------------------------------------------------------- scales

    def _scales(self, gm: fx.GraphModule, g: _Group) -> torch.Tensor:
        """One scale per shared channel (per producer row / per consumer input channel)."""
        a = torch.stack([linear_stats(gm, linear_name(c))["absmax"] for c in g.consumers])
        a = a.amax(dim=0).double()
        w = torch.stack([get_attr_value(gm, str(c.args[1].target)).detach().abs().double()
                         .amax(dim=0) for c in g.consumers]).amax(dim=0)
        if g.row_groups is not None:  # one scale per v channel, shared by its query heads
            n = int(g.row_groups.max()) + 1
            a = torch.zeros(n, dtype=a.dtype).scatter_reduce(0, g.row_groups, a, "amax")
            w = torch.zeros(n, dtype=w.dtype).scatter_reduce(0, g.row_groups, w, "amax")
        alpha = self.options.alpha
        s = a.pow(alpha) / w.pow(1.0 - alpha)
        s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
        return s.clamp(1e-5, 1e5)

def _apply(gm: fx.GraphModule, g: _Group, s: torch.Tensor) -> None:
    """Readers' input columns times s, the producer (norm gamma, or linear rows) divided."""
    s_in = s[g.row_groups] if g.row_groups is not None else s
    for c in g.consumers:
        wt = str(c.args[1].target)
        w = get_attr_value(gm, wt)
        set_attr_value(gm, wt, (w.double() * s_in).to(w.dtype))
        rescale_input(gm, linear_name(c), s_in.float())
    if g.norm is not None:
        norm = g.norm
        wt = str(norm.weight.target)
        w = get_attr_value(gm, wt)
        set_attr_value(gm, wt, ((w.double() + norm.offset) / s - norm.offset).to(w.dtype))
        if norm.bias is not None:
            bt = str(norm.bias.target)
            b = get_attr_value(gm, bt)
            set_attr_value(gm, bt, (b.double() / s).to(b.dtype))
        record = gm.meta.get(FUSED_NORMS_KEY)
        if record and norm.name in record.get("fused", {}):
            record.setdefault("smoothed", {})[norm.name] = record["fused"].pop(norm.name)
        return
    assert g.producer is not None and g.rows is not None
    for arg in g.producer.args[1:3]:
        if arg is None:
            continue
        t = get_attr_value(gm, str(arg.target))
        div = torch.ones(t.shape[0], dtype=torch.float64)
        div[g.rows] = s
        new = t.double() / (div[:, None] if t.dim() == 2 else div)
        set_attr_value(gm, str(arg.target), new.to(t.dtype))


def smooth_norm(gm: fx.GraphModule, norm: Norm, s: torch.Tensor) -> None:
    """Rule 1 with given scales: ``norm``'s gamma (and beta) divided by ``s``, its readers'
    input columns multiplied (their calibration statistics rescaled)."""
    _apply(gm, _Group("norm", norm.name, list(norm.consumers), norm=norm), s)


# ----------------------------------------------------------------------- group matching


def _check(gm: fx.GraphModule, g: _Group) -> str | None:
    """Why a group cannot be smoothed exactly (shared attributes, missing stats), or None."""
    own: set[fx.Node] = set(g.consumers)
    attrs = [c.args[1] for c in g.consumers]
    if g.norm is not None:
        own |= set(g.norm.nodes)
        attrs += [a for a in (g.norm.weight, g.norm.bias) if a is not None]
    if g.producer is not None:
        own.add(g.producer)
        attrs += [a for a in g.producer.args[1:3] if a is not None]
    for a in attrs:
        if not (isinstance(a, fx.Node) and a.op == "get_attr"):
            return "a weight/bias is not a plain attribute (already quantized?)"
        readers = {u for n in gm.graph.find_nodes(op="get_attr", target=a.target)
                   for u in n.users}
        if readers - own:
            return f"attribute {a.target} is also read outside the group"
    for c in g.consumers:
        if linear_stats(gm, linear_name(c)) is None:
            return (f"no calibration statistics for {linear_name(c)} (run calibrate after "
                    "passes that change linear inputs)")
    return None


def _out_features(lin: fx.Node) -> int:
    return int(lin.meta["val"].shape[-1])


def _is_last_dim(lin: fx.Node, dim: int) -> bool:
    return dim == -1 or dim == lin.meta["val"].dim() - 1


def _row_source(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(linear, first row, end row) when ``node`` is a linear output or a last-dim slice of one
    (``aten.slice`` with step 1, or a ``getitem`` of ``aten.chunk``)."""
    if node.op != "call_function":
        return None
    if node.target is _LIN:
        return node, 0, _out_features(node)
    if node.target is aten.slice.Tensor and node.args[0].target is _LIN:
        lin = node.args[0]
        args = list(node.args) + [None] * (5 - len(node.args))
        dim, start, end, step = args[1] or 0, args[2] or 0, args[3], args[4] or 1
        n = _out_features(lin)
        if step == 1 and _is_last_dim(lin, dim) and 0 <= start:
            return lin, int(start), n if end is None else min(int(end), n)
    if node.target is operator.getitem and node.args[0].target is aten.chunk.default:
        chunk, idx = node.args
        lin = chunk.args[0]
        dim = chunk.args[2] if len(chunk.args) > 2 else 0
        if lin.target is _LIN and _is_last_dim(lin, dim):
            n = _out_features(lin)
            size = -(-n // chunk.args[1])
            return lin, idx * size, min((idx + 1) * size, n)
    return None


def _exclusive(src: fx.Node, reader: fx.Node) -> bool:
    """``src`` (a linear or a row slice of one) is read only by ``reader``, and every other
    reader of that linear is a slice/chunk of rows disjoint from ``src``'s."""
    if set(src.users) != {reader}:
        return False
    if src.target is _LIN:
        return True
    mine = _row_source(src)
    lin = mine[0]
    for user in lin.users:
        others = list(user.users) if user.target is aten.chunk.default else [user]
        for o in others:
            r = _row_source(o)
            if r is None or (o is not src and r[1] < mine[2] and mine[1] < r[2]):
                return False
    return True


def _reader_of(src: fx.Node, node: fx.Node) -> fx.Node | None:
    """Walking back from ``node`` along first arguments: the node that reads ``src``, if every
    node on the way has a single user."""
    while node.args and isinstance(node.args[0], fx.Node):
        if node.args[0] is src:
            return node
        node = node.args[0]
        if len(node.users) != 1:
            return None
    return None


def _skip_noops(node: fx.Node) -> fx.Node:
    while True:
        if is_cast(node) or node.target in _NOOP:
            node = node.args[0]
        elif node.target in _RESHAPE and _shape(node) and _shape(node) == _shape(node.args[0]):
            node = node.args[0]
        else:
            return node


def _shape(node: fx.Node) -> list[str]:
    val = node.meta.get("val")
    return [str(d) for d in val.shape] if isinstance(val, torch.Tensor) else []


def _is_swap12(node: fx.Node) -> bool:
    if node.target is aten.transpose.int:
        return sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    if node.target is aten.permute.default:
        return [d % 4 for d in node.args[1]] == [0, 2, 1, 3]
    return False


def _vo_group(o: fx.Node) -> tuple[_Group | None, str | None]:
    """Rule 2: match ``o(reshape(transpose(attention(..., v))))`` back to the v linear."""
    x = strip_casts(o.args[0])
    if x.target not in _RESHAPE:
        return None, None
    t = _skip_noops(x.args[0])
    if not _is_swap12(t):
        return None, None
    attn = _skip_noops(t.args[0])
    if attn.target is aten.scaled_dot_product_attention.default:
        v4, gqa = attn.args[2], bool(attn.kwargs.get("enable_gqa", False))
    elif attn.target is aten.matmul.default and not is_ancestor(attn.args[1], attn.args[0]):
        v4, gqa = attn.args[1], False
    else:
        return None, None
    shape = attn.meta["val"].shape
    if len(shape) != 4:
        return None, f"attention output {attn.name} is not [batch, heads, seq, head_dim]"
    heads, hd = int(shape[1]), int(shape[3])
    if _shape(x)[-1] != str(heads * hd):
        return None, f"attention output {attn.name} is not reshaped to heads x head_dim"
    v = _skip_noops(v4)
    rep = 1
    if v.target in _RESHAPE and v.args[0].target is aten.expand.default:
        ex = v.args[0]
        un = _skip_noops(ex.args[0])
        es = ex.meta["val"].shape
        if un.target is not aten.unsqueeze.default or un.args[1] % 5 != 2 or len(es) != 5:
            return None, f"v of {attn.name} is expanded in a way not matched as a GQA repeat"
        rep, v = int(es[2]), _skip_noops(un.args[0])
    if not _is_swap12(v):
        return None, f"value path of {attn.name} does not match [batch, kv_heads, seq, head_dim]"
    kv_heads = int(v.meta["val"].shape[1])
    rep = heads // kv_heads if gqa else rep
    split = _skip_noops(v.args[0])
    if (kv_heads * rep != heads or split.target not in _RESHAPE
            or _shape(split)[-2:] != [str(kv_heads), str(hd)]):
        return None, f"value path of {attn.name} is not a head split of a linear"
    src = strip_casts(split.args[0])
    rows = _row_source(src)
    if rows is None or rows[2] - rows[1] != kv_heads * hd:
        return None, f"value of {attn.name} is not (a row slice of) a linear output"
    reader = _reader_of(src, v4)
    if reader is None or len(v4.users) != 1 or not _exclusive(src, reader):
        return None, f"v of {attn.name} is also read outside the attention"
    channels = torch.arange(heads * hd)
    kv_of = (channels // hd) // rep * hd + channels % hd
    return _Group("attn_vo", linear_name(o), [o], producer=rows[0],
                  rows=rows[1] + torch.arange(kv_heads * hd), row_groups=kv_of), None


def _mlp_group(down: fx.Node) -> tuple[_Group | None, str | None]:
    """Rule 3: match ``down(a * u)`` with u a linear (row slice) read only by the product."""
    x = strip_casts(down.args[0])
    if x.target is not aten.mul.Tensor or not all(isinstance(a, fx.Node) for a in x.args):
        return None, None
    for u, other in ((x.args[1], x.args[0]), (x.args[0], x.args[1])):
        src = strip_casts(u)
        rows = _row_source(src)
        if rows is None:
            continue
        reader = x if u is src else _reader_of(src, u)
        if reader is None or not _exclusive(src, reader) or is_ancestor(src, other):
            return None, "up projection output is also read outside the gated product"
        return _Group("mlp_up_down", linear_name(down), [down], producer=rows[0],
                      rows=torch.arange(rows[1], rows[2])), None
    return None, None
