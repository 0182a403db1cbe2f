"""Dataflow patterns of transformer graphs: norms, the residual stream and what writes into it.

Everything here reads a captured aten graph (:mod:`qcompile.capture`) and changes nothing.
Structure is found by dataflow only, never by module or class names.

Norms (:func:`find_norms`) -> :class:`Norm`:

* RMSNorm: ``x * rsqrt(mean(x^2, -1, keepdim) + eps)`` (``x ** 2`` may be ``x * x``;
  ``x / sqrt(...)`` is accepted too), then optionally a weight: ``gamma * n`` or
  ``n * (gamma + 1)`` (Gemma's ``(1 + w)``, recorded as ``offset=1.0``). The dtype casts HF
  inserts (``aten.to`` / ``type_as`` before, between and after) belong to the pattern.
* LayerNorm: ``aten.layer_norm(x, [d], gamma, beta, eps)`` with get_attr (or absent) weight
  and bias, or the decomposed form ``xc = x - mean(x)``, ``xc * rsqrt(mean(xc^2) + eps)``
  ``[* gamma] [+ beta]``.

A norm's ``input`` is the normalized value with the norm's own leading casts stripped (for a
pre-norm: a residual-stream value); ``output`` is the last node of the pattern. Its readers are
split into ``consumers`` (``aten.linear`` nodes reading the normed value as their input, possibly
through casts) and ``other_users``. The effective scale is ``weight + offset`` (all ones
without a weight); a LayerNorm's bias is ``bias``.

Residual stream (:func:`find_residual_stream`) -> :class:`ResidualStream`: walking back from
the output head (the linear that reaches the graph output through casts, scalar scaling and
soft-capping) to its norm (the final norm) and from its input back through residual adds
``add(stream, branch)`` -- the operand that is an ancestor of the other is the stream --
until a value that is no such add: the stream start, normally an ``aten.embedding`` lookup,
possibly times a scalar (Gemma's ``sqrt(hidden)``) and cast. In fp32 captures the stream often
runs *through* a norm's leading cast (``.to(float32)`` returns its input), so casts are part of
the stream (``values``).

Writers (:func:`stream_writers`) -> :class:`StreamWriter`: per residual add, the terms of its
branch operand, followed back through casts and branch-internal adds (parallel attention+MLP
blocks add two branches first). Each term is a linear (o_proj/down_proj-like) or an explained
non-linear. Post-norms (Gemma 2/3: a norm applied to the branch output right before the
residual add) are recorded on the writer: they make a rotation Q of the stream inexact, because
``RMS(yQ) diag(gamma) != RMS(y) diag(gamma) Q`` unless gamma is all ones (the weight cannot be
folded into the writer: the scale acts after the normalization), so a rotation must refuse them
or keep an online op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.errors import UnsupportedGraphError
from qcompile.graph import get_attr_value

__all__ = [
    "CAST_OPS",
    "Norm",
    "ResidualStream",
    "StreamWriter",
    "cast_closure",
    "find_norms",
    "find_residual_stream",
    "head_linear",
    "is_ancestor",
    "linear_name",
    "readers",
    "strip_casts",
    "stream_writers",
]

aten = torch.ops.aten

CAST_OPS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
                      aten.type_as.default})
# Ops between the head linear and the graph output that do not change which linear is the head.
_HEAD_PASS = frozenset({*CAST_OPS, aten.mul.Tensor, aten.div.Tensor, aten.tanh.default,
                        aten.view.default, aten.reshape.default, aten.contiguous.default})


def _call(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _scalar(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _last_dim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim():
        try:
            return int(val.shape[-1])
        except (TypeError, ValueError):  # symbolic last dim
            return None
    return None


def _ndim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def is_cast(node: fx.Node, of: fx.Node | None = None) -> bool:
    """Whether ``node`` is a dtype cast (of ``of`` when given) that keeps the shape."""
    if not _call(node, *CAST_OPS) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return of is None or node.args[0] is of


def strip_casts(node: fx.Node) -> fx.Node:
    """Follow dtype casts back to the value they cast."""
    while is_cast(node):
        node = node.args[0]
    return node


def cast_closure(node: fx.Node) -> list[fx.Node]:
    """``node`` and every node that is a (chain of) dtype cast(s) of it, in discovery order."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(u for u in n.users if is_cast(u, of=n))
    return out


def readers(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` or of its casts, casts of it excluded (graph order)."""
    closure = cast_closure(node)
    members = set(closure)
    found = {u for n in closure for u in n.users if u not in members}
    return [n for n in node.graph.nodes if n in found]


def linear_name(node: fx.Node) -> str:
    """The name of a linear: its weight attribute without ``.weight`` (else the node name)."""
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, fx.Node) and w.op == "get_attr":
        target = str(w.target)
        return target[: -len(".weight")] if target.endswith(".weight") else target
    return node.name


def is_ancestor(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``b`` depends on ``a`` (``a`` is reachable from ``b`` going backwards)."""
    order = {n: i for i, n in enumerate(a.graph.nodes)}
    lo = order[a]
    stack, seen = [b], set()
    while stack:
        n = stack.pop()
        if n is a:
            return True
        if n in seen or order[n] < lo:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


@dataclass(frozen=True, eq=False)
class Norm:
    """One normalization found in a graph.

    Attributes:
        kind: ``"rms"`` or ``"layer"``.
        input: The normalized value, the norm's own leading casts stripped.
        output: Last node of the pattern; what readers read.
        weight: get_attr of the scale gamma, or None.
        bias: get_attr of the LayerNorm shift beta, or None.
        eps: The epsilon added to the mean square / variance.
        offset: Constant added to the weight (1.0 for Gemma's ``(1 + w)``, else 0.0).
        dim: Size of the normalized (last) dimension, when known.
        nodes: Every call node of the pattern, leading casts to ``output`` (get_attrs
            of weight and bias excluded).
        consumers: ``aten.linear`` nodes reading ``output`` (or a cast of it) as input.
        other_users: Every other reader of ``output`` or its casts.
    """

    kind: str
    input: fx.Node
    output: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float
    offset: float
    dim: int | None
    nodes: tuple[fx.Node, ...]
    consumers: tuple[fx.Node, ...]
    other_users: tuple[fx.Node, ...]

    @property
    def name(self) -> str:
        """Readable name: the weight attribute without ``.weight``, else the output's source."""
        if self.weight is not None:
            t = str(self.weight.target)
            return t[: -len(".weight")] if t.endswith(".weight") else t
        return self.output.meta.get("source_module") or self.output.name

    def scale(self, gm: fx.GraphModule) -> torch.Tensor | None:
        """The effective gamma (``weight + offset``) as fp32, or None without a weight."""
        if self.weight is None:
            return None
        return get_attr_value(gm, str(self.weight.target)).detach().float() + self.offset

    def shift(self, gm: fx.GraphModule) -> torch.Tensor | None:
        """The LayerNorm beta as fp32, or None."""
        if self.bias is None:
            return None
        return get_attr_value(gm, str(self.bias.target)).detach().float()


# ---------------------------------------------------------------------------------- norms


def _param(node: object) -> tuple[fx.Node | None, list[fx.Node]]:
    """A get_attr (possibly cast): (get_attr node, cast nodes) or (None, [])."""
    casts = []
    while is_cast(node):
        casts.append(node)
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node, casts
    return None, []


def _is_vector(attr: fx.Node, dim: int | None) -> bool:
    """Whether a get_attr holds a 1-D tensor of ``dim`` elements (any length if unknown)."""
    gm = attr.graph.owning_module
    try:
        shape = tuple(get_attr_value(gm, str(attr.target)).shape)
    except AttributeError:
        return False
    return len(shape) == 1 and (dim is None or shape[0] == dim)


def _weight_expr(node: object) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """``gamma``, ``cast(gamma)`` or ``gamma + c``: (get_attr, offset c, pattern nodes)."""
    attr, casts = _param(node)
    if attr is not None:
        return attr, 0.0, casts
    if _call(node, aten.add.Tensor) and len(node.args) == 2:
        for a, b in (node.args, node.args[::-1]):
            c = _scalar(b)
            attr, casts = _param(a)
            if attr is not None and c is not None:
                return attr, c, [*casts, node]
    return None


def _mean_last(node: object, of: fx.Node) -> bool:
    """``mean(of, [-1], keepdim=True)``."""
    if not _call(node, aten.mean.dim) or node.args[0] is not of:
        return False
    dims = list(node.args[1]) if len(node.args) > 1 and node.args[1] is not None else []
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    nd = _ndim(of)
    return bool(keep) and len(dims) == 1 and (dims[0] == -1 or (nd is not None and dims[0] == nd - 1))


def _square_of(node: fx.Node) -> fx.Node | None:
    if _call(node, aten.pow.Tensor_Scalar) and _scalar(node.args[1]) == 2.0:
        return node.args[0]
    if _call(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _match_core(root: fx.Node) -> tuple[fx.Node, fx.Node, float, list[fx.Node]] | None:
    """From an rsqrt (or sqrt) node: (x, normalized node, eps, nodes) of x * rsqrt(ms + eps)."""
    a = root.args[0]
    if not _call(a, aten.add.Tensor) or len(a.users) != 1 or len(root.users) != 1:
        return None
    for m, e in (a.args, a.args[::-1]):
        eps = _scalar(e)
        if eps is None or not isinstance(m, fx.Node) or len(m.users) != 1:
            continue
        sq = m.args[0] if _call(m, aten.mean.dim) else None
        x = _square_of(sq) if isinstance(sq, fx.Node) and len(sq.users) == 1 else None
        if x is None or not _mean_last(m, sq):
            continue
        (user,) = root.users
        if root.target is aten.rsqrt.default:
            ok = _call(user, aten.mul.Tensor) and set(user.args) == {x, root}
        else:
            ok = _call(user, aten.div.Tensor) and user.args[0] is x and user.args[1] is root
        if ok:
            return x, user, eps, [sq, m, a, root, user]
    return None


def _forward_casts(node: fx.Node, nodes: list[fx.Node]) -> fx.Node:
    while len(node.users) == 1:
        (u,) = node.users
        if not is_cast(u, of=node):
            break
        nodes.append(u)
        node = u
    return node


def _build(kind, x, out, weight, bias, eps, offset, nodes) -> Norm:
    lead = []
    while is_cast(x):
        lead.append(x)
        x = x.args[0]
    closure = set(cast_closure(out))
    users = readers(out)
    consumers = tuple(u for u in users if _call(u, aten.linear.default) and u.args[0] in closure)
    others = tuple(u for u in users if u not in consumers)
    return Norm(kind, x, out, weight, bias, eps, offset, _last_dim(x),
                tuple([*reversed(lead), *nodes]), consumers, others)


def _match_rms_like(root: fx.Node) -> Norm | None:
    core = _match_core(root)
    if core is None:
        return None
    x, out, eps, nodes = core
    kind = "rms"
    centered = x.args[1] if _call(x, aten.sub.Tensor) and len(x.args) == 2 else None
    if isinstance(centered, fx.Node) and _mean_last(centered, x.args[0]) and len(x.users) == 2:
        if len(centered.users) == 1:
            kind, nodes, x = "layer", [centered, x, *nodes], x.args[0]
    dim = _last_dim(x)
    out = _forward_casts(out, nodes)
    weight = bias = None
    offset = 0.0
    if len(out.users) == 1:
        (u,) = out.users
        other = None
        if _call(u, aten.mul.Tensor) and len(u.args) == 2 and out in u.args:
            other = u.args[1] if u.args[0] is out else u.args[0]
        w = _weight_expr(other) if other is not None else None
        if w is not None and _is_vector(w[0], dim):
            weight, offset = w[0], w[1]
            nodes.extend([*w[2], u])
            out = u
            if kind == "layer" and len(out.users) == 1:
                (b,) = out.users
                if _call(b, aten.add.Tensor) and len(b.args) == 2 and out in b.args:
                    battr, bcasts = _param(b.args[1] if b.args[0] is out else b.args[0])
                    if battr is not None and _is_vector(battr, dim):
                        bias, out = battr, b
                        nodes.extend([*bcasts, b])
            out = _forward_casts(out, nodes)
    return _build(kind, x, out, weight, bias, eps, offset, nodes)


def _match_layer_norm(node: fx.Node) -> Norm | None:
    args = list(node.args) + [None] * (6 - len(node.args))
    x, shape, w, b, eps = args[0], args[1], args[2], args[3], args[4]
    w = node.kwargs.get("weight", w)
    b = node.kwargs.get("bias", b)
    eps = node.kwargs.get("eps", 1e-5 if eps is None else eps)
    dim = _last_dim(x) if isinstance(x, fx.Node) else None
    if not isinstance(x, fx.Node) or len(shape) != 1 or (dim is not None and shape[0] != dim):
        return None
    weight, wcasts = _param(w) if w is not None else (None, [])
    bias, bcasts = _param(b) if b is not None else (None, [])
    if (w is not None and weight is None) or (b is not None and bias is None):
        return None
    if any(a is not None and not _is_vector(a, shape[0]) for a in (weight, bias)):
        return None
    nodes = [*wcasts, *bcasts, node]
    out = _forward_casts(node, nodes)
    return _build("layer", x, out, weight, bias, float(eps), 0.0, nodes)


def find_norms(gm: fx.GraphModule) -> list[Norm]:
    """Every RMSNorm / LayerNorm pattern of ``gm`` (module docstring), in graph order."""
    found = []
    for node in gm.graph.nodes:
        norm = None
        if _call(node, aten.rsqrt.default, aten.sqrt.default):
            norm = _match_rms_like(node)
        elif _call(node, aten.layer_norm.default):
            norm = _match_layer_norm(node)
        if norm is not None:
            found.append(norm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(found, key=lambda n: order[n.output])


# ------------------------------------------------------------------------ residual stream


@dataclass(frozen=True, eq=False)
class ResidualStream:
    """The residual stream from the embedding to the final norm.

    Attributes:
        embedding: The ``aten.embedding`` node the stream starts from, or None if the start
            is something else (then ``start`` says what).
        start: The first stream value (embedding output after scalar scaling, casts stripped).
        start_path: Nodes after ``embedding`` up to and including ``start`` (scalar
            multiplies, casts); empty when ``start`` is the embedding itself.
        adds: Residual ``aten.add`` nodes, first to last.
        branches: For each add, its branch operand (the other input).
        values: Every node carrying the stream: ``start``, the adds, and casts of them.
        final_norm: The norm feeding the head, or None when the head reads the stream directly.
        head: The output head linear.
        pre_norms: Norms whose input is a stream value, the final norm excluded.
        other_readers: Readers of stream values that are neither the next stream value nor a
            norm reading the stream (each makes the stream not shift/rotation invariant).
    """

    embedding: fx.Node | None
    start: fx.Node
    start_path: tuple[fx.Node, ...]
    adds: tuple[fx.Node, ...]
    branches: tuple[fx.Node, ...]
    values: tuple[fx.Node, ...]
    final_norm: Norm | None
    head: fx.Node
    pre_norms: tuple[Norm, ...]
    other_readers: tuple[fx.Node, ...]


def head_linear(gm: fx.GraphModule) -> fx.Node:
    """The linear producing the logits (through casts, scalar scaling, soft-capping).

    Raises:
        UnsupportedGraphError: The output is not reached from one linear that way.
    """
    (out,) = gm.graph.find_nodes(op="output")
    node = out.args[0]
    while isinstance(node, fx.Node) and not _call(node, aten.linear.default):
        if not _call(node, *_HEAD_PASS):
            raise UnsupportedGraphError(
                f"graph output is computed by {node.name} ({node.target}); expected a linear "
                "head reached through casts, scalar scaling or tanh soft-capping"
            )
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 1:
            raise UnsupportedGraphError(f"output path node {node.name} mixes {len(tensors)} tensors")
        node = tensors[0]
    if not isinstance(node, fx.Node):
        raise UnsupportedGraphError("graph output is not a tensor computed by the graph")
    return node


def _embedding_of(start: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    node, path = start, []
    while True:
        if _call(node, aten.embedding.default):
            return node, path
        if is_cast(node):
            path.append(node)
            node = node.args[0]
            continue
        if _call(node, aten.mul.Tensor, aten.div.Tensor) and len(node.args) == 2:
            data, factor = node.args
            if node.target is aten.mul.Tensor and _is_constant(data):
                data, factor = factor, data
            if isinstance(data, fx.Node) and _is_constant(factor):
                path.append(node)
                node = data
                continue
        return None, path


def _is_constant(node: object) -> bool:
    """A Python number, or a one-element value that depends on no graph input."""
    if _scalar(node) is not None:
        return True
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() != 1:
        return False
    stack = [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return False
        stack.extend(n.all_input_nodes)
    return True


def find_residual_stream(gm: fx.GraphModule, norms: list[Norm] | None = None) -> ResidualStream:
    """The residual stream of ``gm`` (see the module docstring for how it is found).

    Args:
        gm: A captured graph.
        norms: ``find_norms(gm)`` if already computed.

    Raises:
        UnsupportedGraphError: No linear head, or no residual add before it; the message
            names the node where the walk stopped.
    """
    norms = find_norms(gm) if norms is None else norms
    head = head_linear(gm)
    x = head.args[0]
    final = next((n for n in norms if x in cast_closure(n.output)), None)
    node = final.input if final is not None else strip_casts(x)
    adds, branches = [], []
    while True:
        base = strip_casts(node)
        if not (_call(base, aten.add.Tensor) and len(base.args) == 2
                and all(isinstance(a, fx.Node) for a in base.args)):
            break
        a, b = (strip_casts(v) for v in base.args)
        if is_ancestor(a, b):
            resid, branch = base.args
        elif is_ancestor(b, a):
            branch, resid = base.args
        else:
            break
        adds.append(base)
        branches.append(branch)
        node = resid
    start = strip_casts(node)
    if not adds:
        raise UnsupportedGraphError(
            f"no residual add found walking back from the head {head.name}: the stream stops "
            f"at {start.name} ({start.target})"
        )
    embedding, start_path = _embedding_of(start)
    stream_nodes = {start, *adds}
    values = [n for base in (start, *adds) for n in cast_closure(base)]
    value_set = set(values)
    pre = tuple(n for n in norms if n.input in stream_nodes and n is not final)
    norm_nodes = {m for n in (*pre, *([final] if final else [])) for m in n.nodes}
    others = []
    for v in values:
        for u in v.users:
            if u not in value_set and u not in norm_nodes and u not in adds and u not in others:
                others.append(u)
    return ResidualStream(
        embedding, start, tuple(reversed(start_path)), tuple(reversed(adds)),
        tuple(reversed(branches)), tuple(values), final, head, pre, tuple(others),
    )


# --------------------------------------------------------------------------------- writers


@dataclass(frozen=True, eq=False)
class StreamWriter:
    """One term of a residual add's branch.

    Attributes:
        add: The residual add.
        linear: The linear whose output is added into the stream, or None (see ``reason``).
        post_norm: A norm applied between ``linear`` and ``add`` (Gemma 2/3), or None.
        path: Nodes between ``linear`` (exclusive) and ``add`` (exclusive): casts, branch
            adds, the post-norm's nodes.
        reason: Why the term is not a plain linear (None when ``linear`` is set).
    """

    add: fx.Node
    linear: fx.Node | None
    post_norm: Norm | None
    path: tuple[fx.Node, ...]
    reason: str | None = None


def stream_writers(stream: ResidualStream, norms: list[Norm]) -> list[StreamWriter]:
    """Every term written into the stream by the residual adds of ``stream``, in order."""
    by_output = {n.output: n for n in norms}
    out: list[StreamWriter] = []
    for add, branch in zip(stream.adds, stream.branches, strict=True):
        stack: list[tuple[fx.Node, tuple[fx.Node, ...], Norm | None]] = [(branch, (), None)]
        while stack:
            node, path, post = stack.pop()
            if node in by_output and post is None:
                norm = by_output[node]
                stack.append((norm.input, path + norm.nodes, norm))
            elif is_cast(node):
                stack.append((node.args[0], path + (node,), post))
            elif _call(node, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in node.args):
                for a in reversed(node.args):
                    stack.append((a, path + (node,), post))
            elif _call(node, aten.linear.default):
                out.append(StreamWriter(add, node, post, path))
            else:
                out.append(StreamWriter(add, None, post, path, reason=(
                    f"branch of residual add {add.name} reaches it through {node.name} "
                    f"({node.target}), not a linear")))
    return out
