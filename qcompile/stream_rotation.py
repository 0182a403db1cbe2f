"""The residual-stream rotation R1: which weights it touches, and folding a matrix into them.

Shared by ``rotate`` (a Hadamard or random R1) and ``learn-rotation`` (an R1 trained with the
quantizers in the loop). Rotations map row vectors ``x -> x Q``: the embedding ``E -> E Q``,
linears reading a stream norm ``W -> W Q``, linears writing the stream ``W -> Q^T W``,
``b -> b Q``. Exact when every norm on the stream is a weightless RMSNorm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.errors import PreconditionError, UnsupportedGraphError
from qcompile.graph import get_attr_value, set_attr_value
from qcompile.hadamard import Rotation
from qcompile.patterns import Norm, find_norms, find_residual_stream, linear_name, stream_writers

__all__ = ["R1Plan", "fold_r1", "plan_r1", "require_weightless_stream", "retie", "weight_attr",
           "weightless"]

log = logging.getLogger(__name__)


@dataclass
class R1Plan:
    """The nodes R1 rewrites: the embedding lookup, stream readers and stream writers."""

    embedding: fx.Node
    readers: list[fx.Node]
    writers: list[fx.Node]

    def hidden_of(self, gm: fx.GraphModule) -> int:
        """Order of the rotation: the embedding table's width."""
        return int(get_attr_value(gm, str(self.embedding.args[0].target)).shape[1])


def weightless(norm: Norm, gm: fx.GraphModule) -> bool:
    """Whether ``norm`` is an RMSNorm without a (non-unit) weight and without a bias."""
    scale, shift = norm.scale(gm), norm.shift(gm)
    return norm.kind == "rms" and (scale is None or bool((scale == 1).all())) and (
        shift is None or not bool(shift.any()))


def weight_attr(node: fx.Node, index: int) -> str | None:
    """The attribute a linear/embedding reads as argument ``index`` (None when absent).

    Raises:
        UnsupportedGraphError: The argument is computed, not an attribute (already quantized).
    """
    arg = node.args[index] if len(node.args) > index else None
    if arg is None:
        return None
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        raise UnsupportedGraphError(f"{node.name} reads its weight/bias from {arg}, not an "
                                    "attribute (rotations must run before quantize)")
    return str(arg.target)


def require_weightless_stream(gm: fx.GraphModule, who: str, hint: str) -> None:
    """Raise ``PreconditionError`` unless every norm reading the stream is weightless RMS.

    Args:
        gm: The graph.
        who: What needs it, starting the message (``"rotate r1"``).
        hint: How to get there, ending the message.
    """
    norms = find_norms(gm)
    stream = find_residual_stream(gm, norms)
    for norm in [*stream.pre_norms, *([stream.final_norm] if stream.final_norm else [])]:
        if not weightless(norm, gm):
            what = "LayerNorm (mean subtraction)" if norm.kind == "layer" else "a weight"
            raise PreconditionError(
                f"{who} needs weightless RMSNorms on the residual stream, but norm "
                f"{norm.name} (node {norm.output.name}) has {what}: run fuse-norms first "
                f"{hint}"
            )


def plan_r1(gm: fx.GraphModule) -> R1Plan:
    """Find the embedding, readers and writers of the residual stream; check R1 is exact.

    Raises:
        UnsupportedGraphError: naming the node that makes R1 inexact (see ``rotate``'s rules).
    """
    norms = find_norms(gm)
    stream = find_residual_stream(gm, norms)
    reading = [*stream.pre_norms, *([stream.final_norm] if stream.final_norm else [])]
    for norm in reading:
        if norm.other_users:
            u = norm.other_users[0]
            raise UnsupportedGraphError(f"r1: output of norm {norm.name} is read by {u.name} "
                                        f"({u.target}), not a linear; R1 cannot be exact")
    if stream.other_readers:
        u = stream.other_readers[0]
        raise UnsupportedGraphError(f"r1: the residual stream is read by {u.name} "
                                    f"({u.target}), not a norm or residual add")
    emb = stream.embedding
    if emb is None or emb.args[0].op != "get_attr":
        raise UnsupportedGraphError(f"r1: the residual stream starts at {stream.start.name} "
                                    f"({stream.start.target}), not an embedding lookup")
    readers = [c for n in reading for c in n.consumers]
    if stream.final_norm is None:
        readers.append(stream.head)
    writers = []
    for w in stream_writers(stream, norms):
        if w.linear is None:
            raise UnsupportedGraphError(f"r1: {w.reason}; R1 cannot be exact")
        if w.post_norm is not None and not weightless(w.post_norm, gm):
            raise UnsupportedGraphError(
                f"r1: post-norm {w.post_norm.name} (node {w.post_norm.output.name}) scales "
                f"the output of {w.linear.name} before residual add {w.add.name}; its "
                "weight cannot be folded, so rotating the stream would not be exact: use "
                "r1=none for this model")
        outside = [u for u in w.linear.users if u not in {*w.path, w.add}]
        if outside:
            raise UnsupportedGraphError(f"r1: writer {w.linear.name} is also read by "
                                        f"{outside[0].name}; R1 cannot be exact")
        writers.append(w.linear)
    planned = {emb, *readers, *writers}
    for node in planned:
        targets = [weight_attr(emb, 0)] if node is emb else [weight_attr(node, 1),
                                                              weight_attr(node, 2)]
        for target in targets:
            for g in gm.graph.find_nodes(op="get_attr", target=target) if target else []:
                extra = [u for u in g.users if u not in planned]
                if extra:
                    raise UnsupportedGraphError(f"r1: attribute {target} is also read by "
                                                f"{extra[0].name}; R1 cannot be exact")
    return R1Plan(emb, readers, writers)


def fold_r1(gm: fx.GraphModule, plan: R1Plan, rot: Rotation, changed: list[str]
            ) -> dict[str, Any]:
    """Fold ``rot`` into every weight of ``plan`` (float64 math, stored in each dtype).

    Attributes are replaced, never modified; tied attributes getting the same transform get
    one new tensor. Readers' names are appended to ``changed`` (their inputs changed).
    """
    emb, readers, writers = plan.embedding, plan.readers, plan.writers
    hidden = plan.hidden_of(gm)
    ops: dict[str, tuple[bool, bool]] = {}  # target -> (left Q^T, right Q)
    for node in (emb, *readers, *writers):
        t = weight_attr(node, 0 if node is emb else 1)
        left, right = ops.get(t, (False, False))
        ops[t] = (left or node in writers, right or node is emb or node in readers)
        if node in writers and weight_attr(node, 2):
            ops[weight_attr(node, 2)] = (True, False)
    made: dict[tuple[int, bool, bool], torch.Tensor] = {}
    for target, (left, right) in ops.items():
        old = get_attr_value(gm, target)
        key = (id(old), left, right)
        if key not in made:
            w = old.detach()
            if w.dim() == 1:  # bias: b -> b Q
                w = rot.apply(w)
            else:
                w = rot.apply(w.T).T if left else w  # Q^T W = (W^T Q)^T
                w = rot.apply(w) if right else w
            new = w.to(old.dtype).contiguous()
            if isinstance(old, torch.nn.Parameter):  # one Parameter for every tied name
                new = torch.nn.Parameter(new, requires_grad=False)
            made[key] = new
        set_attr_value(gm, target, made[key])
    changed.extend(linear_name(n) for n in readers)
    log.debug("r1: %s on %d readers, %d writers", rot.description, len(readers), len(writers))
    return {"rotation": rot.description, "method": rot.method, "hidden": hidden,
            "readers": len(readers), "writers": len(writers), "embeddings": 1,
            "attributes_rotated": len(ops)}


def retie(gm: fx.GraphModule) -> None:
    """Record attribute names sharing one tensor in ``gm.meta["tied_params"]``."""
    groups: dict[int, list[str]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        names = groups.setdefault(id(get_attr_value(gm, str(node.target))), [])
        if node.target not in names:
            names.append(str(node.target))
    gm.meta["tied_params"] = [tuple(g) for g in groups.values() if len(g) > 1]
