"""What a quantized graph did to each weight, recorded once and replayed on any later graph.

A pipeline (or a saved artifact) turns ``aten.linear(x, W)`` into
``aten.linear(chain(x), qcompile::dequantize_weight(packed W ...))`` where ``chain`` is a short
run of ``qcompile`` activation ops (dynamic or static Q/DQ, online Hadamard). A
:class:`QuantPlan` holds that per weight, keyed by the weight's qualified name, together with
plain value replacements (weights a pass rewrote, e.g. smoothing). :func:`harvest` reads a plan
out of a quantized graph; :func:`apply_plan` rewrites a fresh graph of the same model with it,
so recompiles and graph breaks reuse the quantized tensors instead of quantizing again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.errors import UnsupportedGraphError
from qcompile.graph import get_attr_value, is_linear, set_attr_value, unique_attr_name
from qcompile.passes.quantize import DEQUANT_SUFFIXES

__all__ = [
    "InputOp", "LinearPlan", "QuantPlan", "WeightPlan", "apply_plan", "harvest", "move_plan",
]

log = logging.getLogger(__name__)

_DEQUANT = torch.ops.qcompile.dequantize_weight.default
_INPUT_OPS = (
    torch.ops.qcompile.quantize_activation.default,
    torch.ops.qcompile.quantize_activation_static.default,
    torch.ops.qcompile.hadamard.default,
)
_X = "__x__"  # stands for the chained input in an InputOp's arguments


@dataclass(frozen=True)
class WeightPlan:
    """A packed weight and the arguments of its ``qcompile::dequantize_weight``.

    Attributes:
        tensors: Packed codes, scale, negative scale, zero point, outer scale (None if absent).
        fmt: Format text. k: Row length. dtype: Dequantized dtype.
        shape: Shape of the full-precision weight it replaces.
    """

    tensors: tuple[torch.Tensor | None, ...]
    fmt: str
    k: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors if t is not None)


@dataclass(frozen=True, eq=False)
class InputOp:
    """One ``qcompile`` op applied to a linear's input: ``target(*args)`` with ``_X`` for x."""

    target: Any
    args: tuple[Any, ...]

    def key(self) -> tuple:
        """Identity of the op: target and arguments, tensors by object identity."""
        return (self.target, tuple(id(a) if isinstance(a, torch.Tensor) else a
                                   for a in self.args))


def chain_key(chain: tuple[InputOp, ...]) -> tuple:
    """Identity of an input chain (equal for chains that compute the same thing)."""
    return tuple(op.key() for op in chain)


@dataclass
class LinearPlan:
    """What replaces the reads of one weight: its packed form and the input chain."""

    weight: WeightPlan | None
    chain: tuple[InputOp, ...] = ()


@dataclass
class QuantPlan:
    """Per-weight decisions of a pipeline or artifact, by qualified name.

    Attributes:
        linears: Weight FQN -> plan for the linears reading it.
        values: FQN -> replacement tensor for state a pass rewrote without quantizing.
        skipped: Weight FQN -> why the pipeline left it in full precision.
    """

    linears: dict[str, LinearPlan] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def decided(self, fqn: str) -> bool:
        """Whether the plan already says what to do with weight ``fqn``."""
        return fqn in self.linears or fqn in self.skipped


def weight_fqn(packed_target: str) -> str:
    """The weight a packed-codes attribute came from (the quantize pass's naming rule)."""
    if packed_target.endswith(".qweight"):
        return packed_target[: -len(".qweight")] + ".weight"
    if packed_target.endswith("_qweight"):
        return packed_target[: -len("_qweight")]
    return packed_target


def _tensor(gm: fx.GraphModule, node: Any) -> Any:
    return get_attr_value(gm, str(node.target)) if isinstance(node, fx.Node) else node


def _weight_plan(gm: fx.GraphModule, lin: fx.Node, deq: fx.Node) -> tuple[str, WeightPlan]:
    tensor_args = deq.args[:5]
    for arg in tensor_args:
        if isinstance(arg, fx.Node) and arg.op != "get_attr":
            raise UnsupportedGraphError(
                f"linear {lin.name}: dequantize node {deq.name} reads computed tensor "
                f"{arg.name}; only attribute weights can be reused across graphs"
            )
    fmt, k, dtype = deq.args[5], deq.args[6], deq.args[7]
    tensors = tuple(_tensor(gm, a) for a in tensor_args)
    shape = (*tensors[0].shape[:-1], int(k))
    return weight_fqn(str(tensor_args[0].target)), WeightPlan(tensors, fmt, int(k), dtype, shape)


def _chain(gm: fx.GraphModule, lin: fx.Node) -> tuple[tuple[InputOp, ...], set[fx.Node]]:
    ops, used = [], set()
    x = lin.args[0]
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _INPUT_OPS:
        args = []
        for i, a in enumerate(x.args):
            if i == 0:
                args.append(_X)
            elif isinstance(a, fx.Node):
                if a.op != "get_attr":
                    raise UnsupportedGraphError(
                        f"linear {lin.name}: input op {x.name} reads computed tensor {a.name}"
                    )
                used.add(a)
                args.append(_tensor(gm, a))
            else:
                args.append(a)
        ops.append(InputOp(x.target, tuple(args)))
        used.add(x)
        x = x.args[0]
    return tuple(reversed(ops)), used


def harvest(gm: fx.GraphModule, state: dict[str, torch.Tensor] | None = None) -> QuantPlan:
    """Read the per-weight plan out of a quantized aten graph.

    Args:
        gm: A graph after a pipeline (or loaded from an artifact).
        state: FQN -> the original tensors; attributes under those names that now hold
            another tensor become value replacements. None: every plain attribute read by the
            graph is a value (the artifact case).

    Raises:
        UnsupportedGraphError: A ``qcompile`` op sits where a replay cannot put it (not on a
            linear's weight or input chain), e.g. K/V quantization or a Hadamard on queries;
            the message names the node.
    """
    plan = QuantPlan()
    claimed: set[fx.Node] = set()
    for lin in gm.graph.nodes:
        if not is_linear(lin):
            continue
        w = lin.args[1]
        if not isinstance(w, fx.Node):
            continue
        if w.op == "get_attr":
            fqn, wplan = str(w.target), None
        elif w.op == "call_function" and w.target is _DEQUANT:
            fqn, wplan = _weight_plan(gm, lin, w)
            claimed.add(w)
            claimed.update(a for a in w.args[:5] if isinstance(a, fx.Node))
        else:
            continue
        chain, used = _chain(gm, lin)
        claimed.update(used)
        if wplan is None and not chain:
            continue
        old = plan.linears.get(fqn)
        if old is not None and chain_key(old.chain) != chain_key(chain):
            raise UnsupportedGraphError(
                f"linear {lin.name}: weight {fqn} is read by linears with different input ops"
            )
        plan.linears[fqn] = LinearPlan(wplan, chain)
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", "") == "qcompile":
            if node not in claimed:
                raise UnsupportedGraphError(
                    f"node {node.name} ({node.target}) is neither a linear's weight dequantize "
                    "nor on its input; the torch.compile backend can only replay weight and "
                    "linear-input quantization (not K/V quantization or online rotations of "
                    "attention)"
                )
    for node in gm.graph.find_nodes(op="get_attr"):
        if node in claimed:
            continue
        target = str(node.target)
        value = get_attr_value(gm, target)
        if state is None or (target in state and value is not state[target]):
            plan.values[target] = value
    return plan


def move_plan(plan: QuantPlan, device: torch.device) -> QuantPlan:
    """A copy of ``plan`` whose tensors live on ``device``."""

    def mv(t: Any) -> Any:
        return t.to(device) if isinstance(t, torch.Tensor) else t

    linears = {}
    for fqn, lp in plan.linears.items():
        wp = lp.weight
        if wp is not None:
            wp = WeightPlan(tuple(mv(t) for t in wp.tensors), wp.fmt, wp.k, wp.dtype, wp.shape)
        chain = tuple(InputOp(op.target, tuple(mv(a) for a in op.args)) for op in lp.chain)
        linears[fqn] = LinearPlan(wp, chain)
    values = {k: mv(v) for k, v in plan.values.items()}
    return QuantPlan(linears, values, dict(plan.skipped))


def apply_plan(gm: fx.GraphModule, plan: QuantPlan) -> list[str]:
    """Rewrite a lifted graph with ``plan``: dequantized weights, input chains, new values.

    Linears whose weight (a ``get_attr`` by FQN) has a plan read a
    ``qcompile::dequantize_weight`` of the plan's packed tensors (shared, not copied) and an
    input passed through the plan's chain (one chain per input and chain, shared by siblings).

    Returns:
        The weight FQNs replaced in this graph.
    """
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    deq_of: dict[str, fx.Node] = {}
    chained: dict[tuple[fx.Node, tuple], fx.Node] = {}
    replaced: list[str] = []
    for node in list(gm.graph.find_nodes(op="get_attr")):
        target = str(node.target)
        if target in plan.values and target not in plan.linears:
            set_attr_value(gm, target, plan.values[target])
    for lin in list(gm.graph.nodes):
        if not is_linear(lin) or not isinstance(lin.args[1], fx.Node):
            continue
        w = lin.args[1]
        if w.op != "get_attr" or str(w.target) not in plan.linears:
            continue
        fqn = str(w.target)
        lp = plan.linears[fqn]
        if lp.weight is not None:
            if fqn not in deq_of:
                deq_of[fqn] = _insert_dequant(gm, first, fqn, lp.weight)
                replaced.append(fqn)
            lin.replace_input_with(w, deq_of[fqn])
        elif fqn in plan.values:
            set_attr_value(gm, fqn, plan.values[fqn])
        if lp.chain:
            x = lin.args[0]
            key = (x, chain_key(lp.chain))
            if key not in chained:
                chained[key] = _insert_chain(gm, x, lp.chain, lin)
            lin.replace_input_with(x, chained[key])
    gm.graph.eliminate_dead_code()
    _drop_unread(gm)
    gm.graph.lint()
    gm.recompile()
    return replaced


def _attr(gm: fx.GraphModule, base: str, value: torch.Tensor) -> fx.Node:
    name = unique_attr_name(gm, base)
    set_attr_value(gm, name, value)
    return gm.graph.get_attr(name)


def _insert_dequant(gm: fx.GraphModule, anchor: fx.Node, fqn: str, wp: WeightPlan) -> fx.Node:
    base = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn + "_q"
    args: list[Any] = []
    with gm.graph.inserting_before(anchor):
        for suffix, t in zip(DEQUANT_SUFFIXES, wp.tensors, strict=True):
            args.append(None if t is None else _attr(gm, f"{base}.{suffix}", t))
        node = gm.graph.call_function(_DEQUANT, (*args, wp.fmt, wp.k, wp.dtype))
    node.meta["source_module"] = base
    return node


def _insert_chain(gm: fx.GraphModule, x: fx.Node, chain: tuple[InputOp, ...], lin: fx.Node
                  ) -> fx.Node:
    cur = last = x
    for i, op in enumerate(chain):
        args = []
        for a in op.args:
            if isinstance(a, str) and a == _X:
                args.append(cur)
            elif isinstance(a, torch.Tensor):
                with gm.graph.inserting_after(last):
                    last = _attr(gm, f"{lin.name}_input{i}", a)
                args.append(last)
            else:
                args.append(a)
        with gm.graph.inserting_after(last):
            cur = last = gm.graph.call_function(op.target, tuple(args))
        if "val" in x.meta:
            cur.meta["val"] = x.meta["val"]
    return cur


def _drop_unread(gm: fx.GraphModule) -> None:
    read = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        if name not in read:
            mod_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(mod_path) if mod_path else gm
            delattr(owner, leaf)
