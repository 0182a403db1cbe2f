"""Bring the graph dynamo hands a backend to the aten-level form the offline capture produces.

Dynamo (``inline_inbuilt_nn_modules``, the default) gives a backend a torch-level graph whose
parameters and buffers are ordinary placeholders next to the user's inputs. :func:`lift_graph`
retraces it with ``make_fx(pre_dispatch=True)`` under dynamo's own fake mode, so the ops are the
pre-dispatch ATen ops ``torch.export`` emits (``aten.linear`` stays undecomposed, symbolic
sizes stay symbolic), and turns every module parameter and buffer placeholder into a
``get_attr`` named by its fully qualified name and bound to the model's own tensor (no copy).
What is left as placeholders are the runtime inputs: token ids, positions, KV-cache tensors,
symbolic sizes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from qcompile.errors import CaptureError
from qcompile.graph import set_attr_value

__all__ = ["LiftedGraph", "fqn_from_source", "lift_graph"]

_SEGMENT = re.compile(r"\._(modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]")
_IDENTITY_OPS = {torch.ops.aten.alias.default, torch.ops.aten.detach.default}


@dataclass
class LiftedGraph:
    """An aten-level graph whose module state is read through ``get_attr``.

    Attributes:
        gm: The graph: placeholders are the runtime inputs only; parameters and buffers are
            ``get_attr`` nodes targeting their fully qualified names.
        runtime_index: For each placeholder of ``gm``, its position in dynamo's inputs.
        state: FQN -> the model tensor bound to it (parameters and buffers of this graph).
    """

    gm: fx.GraphModule
    runtime_index: list[int]
    state: dict[str, torch.Tensor]


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else str(name)


def fqn_from_source(source: str) -> str | None:
    """The module-relative qualified name in a dynamo source, or None for non-module state.

    ``L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']``
    gives ``model.layers.0.weight``; sources that do not end in a ``_parameters[...]`` or
    ``_buffers[...]`` entry (user inputs, cache tensors) give None.
    """
    matches = list(_SEGMENT.finditer(source))
    if not matches or matches[-1].group(1) == "modules" or matches[-1].end() != len(source):
        return None
    return ".".join(m.group(2) for m in matches)


def _is_state(value: Any, source: str | None) -> bool:
    if not isinstance(value, torch.Tensor) or source is None:
        return False
    return fqn_from_source(source) is not None


def lift_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    fqn_of: Callable[[torch.Tensor], str | None] | None = None,
) -> LiftedGraph:
    """Retrace dynamo's graph to pre-dispatch ATen and lift module state to ``get_attr``.

    Args:
        gm: The graph dynamo passed to the backend.
        example_inputs: Dynamo's example inputs (real tensors and ints), one per placeholder.
        fqn_of: Optional authoritative name of a tensor (for models registered through
            :func:`qcompile.compile`); otherwise names come from dynamo's input sources, which
            are relative to the compiled frame's ``self``.

    Returns:
        The lifted graph; see :class:`LiftedGraph`.

    Raises:
        CaptureError: The graph cannot be retraced (the message quotes the node being
            executed when the tracer reports it).
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise CaptureError(
            f"dynamo graph has {len(placeholders)} inputs but {len(example_inputs)} example "
            "inputs were given"
        )
    _bake_module_scalars(placeholders, example_inputs)
    fakes = []
    for node, real in zip(placeholders, example_inputs, strict=True):
        fake = node.meta.get("example_value")
        fakes.append(fake if fake is not None else real)
    try:
        with _scalar_outputs(fakes):
            traced = make_fx(gm, pre_dispatch=True, tracing_mode="symbolic")(*fakes)
    except Exception as exc:  # make_fx raises many types; all mean "cannot retrace"
        lines = str(exc).strip().splitlines()
        first = lines[0] if lines else type(exc).__name__
        where = next((ln.strip() for ln in lines if ln.strip().startswith("While executing")),
                     "")
        raise CaptureError(
            f"cannot bring the dynamo graph to aten level: {type(exc).__name__}: {first}"
            + (f" ({where})" if where else "")
        ) from exc

    for node in traced.graph.nodes:
        stack = node.meta.pop("nn_module_stack", None)
        if node.op == "call_function":
            node.meta["source_module"] = _module_path(stack)
    root = torch.nn.Module()
    for target, value in _constants(traced):
        set_attr_value(root, target, value)
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(traced.graph, copies))
    lifted = fx.GraphModule(root, graph)

    state: dict[str, torch.Tensor] = {}
    runtime_index: list[int] = []
    seen: dict[int, str] = {}
    for index, (node, src_node, real) in enumerate(
        zip(traced.graph.find_nodes(op="placeholder"), placeholders, example_inputs, strict=True)
    ):
        source = _source_name(src_node)
        if not _is_state(real, source):
            runtime_index.append(index)
            continue
        name = (fqn_of(real) if fqn_of is not None else None) or fqn_from_source(source)
        if id(real) in seen:  # one tensor under two placeholders: read one attribute
            name = seen[id(real)]
        elif name in state:
            raise CaptureError(f"two different tensors lift to the same name {name!r}")
        seen[id(real)] = name
        if name not in state:
            set_attr_value(lifted, name, real)
            state[name] = real
        placeholder = copies[node]
        with graph.inserting_before(placeholder):
            attr = graph.get_attr(name)
        attr.meta.update(placeholder.meta)
        placeholder.replace_all_uses_with(attr)
        graph.erase_node(placeholder)

    _drop_identities(graph)
    graph.eliminate_dead_code()
    graph.lint()
    lifted.recompile()
    lifted.meta["source_model"] = "torch._dynamo graph"
    lifted.meta["tied_params"] = []
    return LiftedGraph(lifted, runtime_index, state)


def _bake_module_scalars(placeholders: list[fx.Node], example_inputs: Sequence[Any]) -> None:
    """Replace ``.item()`` of 0-d module attributes by their value.

    With ``dynamic=True`` dynamo passes float module attributes (attention ``scaling``,
    embedding ``norm_type``) as 0-d tensors read with ``.item()``; retraced, such an unbacked
    float cannot drive ops that branch on it (SDPA's ``scale``). They are constants of the
    module, so their value is used; a change of them after compiling is not seen.
    """
    for node, real in zip(placeholders, example_inputs, strict=True):
        source = _source_name(node) or ""
        if (not isinstance(real, torch.Tensor) or real.dim() != 0 or "._modules[" not in source
                or fqn_from_source(source) is not None):
            continue
        for user in list(node.users):
            if user.op == "call_method" and user.target == "item" and not user.kwargs:
                user.replace_all_uses_with(real.item())
                node.graph.erase_node(user)


@contextlib.contextmanager
def _scalar_outputs(fakes: Sequence[Any]) -> Iterator[None]:
    """Let ``.item()`` trace to an unbacked symbol, as dynamo did when it produced the graph.

    With ``dynamic=True`` dynamo turns float module attributes into 0-d tensor inputs read
    with ``.item()``; its graph is valid only if retracing may do the same.
    """
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([f for f in fakes if isinstance(f, torch.Tensor)])
    if mode is None:
        yield
        return
    saved = mode.allow_scalar_outputs
    mode.allow_scalar_outputs = True
    try:
        yield
    finally:
        mode.allow_scalar_outputs = saved


def _module_path(stack: Any) -> str:
    """Qualified name of the innermost module in an ``nn_module_stack`` ("" if none)."""
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def _constants(traced: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """Tensor constants make_fx stored on its module (``_tensor_constant0`` ...)."""
    out = []
    for node in traced.graph.find_nodes(op="get_attr"):
        target = str(node.target)
        value = getattr(traced, target, None)
        if isinstance(value, torch.Tensor) and "." not in target:
            out.append((target, value))
    return out


def _drop_identities(graph: fx.Graph) -> None:
    """Remove ``aten.alias`` / ``aten.detach`` (no-ops here) so they do not hide patterns."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _IDENTITY_OPS and node.args:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
