"""Run many calibration windows through a graph one node at a time.

Sequential error compensation (GPTQ with ``sequential=true``) needs each linear's Hessian
computed from inputs that already went through the quantized earlier linears. A graph has no
"layers" to loop over, so :func:`run_wavefront` walks the nodes in topological order and
evaluates each node for every window before moving on; a hook sees all windows' inputs of a
watched linear before it runs and may swap its weight. Values are freed after their last
reader, so memory is one node's worth of activations per live value, across all windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import UnsupportedGraphError
from qcompile.graph import get_attr_value

__all__ = ["run_wavefront"]

# hook(linear node, [input of each window][, [full-precision input]]) -> weight or None
LinearHook = Callable[..., torch.Tensor | None]


def run_wavefront(
    gm: fx.GraphModule,
    batches: Sequence[torch.Tensor],
    watch: set[fx.Node],
    hook: LinearHook,
    progress: Callable[[fx.Node], None] | None = None,
    twin: bool = False,
) -> None:
    """Evaluate ``gm`` on ``batches`` node by node, calling ``hook`` at watched linears.

    Args:
        gm: An aten-level graph with one placeholder (input ids).
        batches: Graph inputs, one per window batch (each the graph's static batch size).
        watch: ``aten.linear`` nodes whose inputs ``hook`` receives.
        hook: Called once per watched linear, before it runs, with the list of its input
            tensors (one per batch); a returned tensor replaces the linear's weight for this
            run (the graph's attribute is not changed).
        progress: Called after each watched linear.
        twin: Also run the graph with its own weights alongside (twice the activations and
            compute); ``hook`` then gets a third argument, the inputs on that
            full-precision path.

    Raises:
        UnsupportedGraphError: The graph has call_module/call_method nodes or more than one
            placeholder.
    """
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedGraphError(
            f"sequential calibration needs a graph with one input, got {len(placeholders)}")
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    dying: dict[int, list[fx.Node]] = {}
    for n, i in last_use.items():
        dying.setdefault(i, []).append(n)

    env: dict[fx.Node, list[Any]] = {}
    ref: dict[fx.Node, list[Any]] = {}  # the full-precision twin (twin=True)
    count = len(batches)
    left = len(watch)
    with torch.no_grad():
        for i, n in enumerate(nodes):
            if not left:
                break  # nothing after the last watched linear matters (e.g. the LM head)
            if n.op == "placeholder":
                env[n] = list(batches)
            elif n.op == "get_attr":
                value = get_attr_value(gm, n.target)
                env[n] = [value] * count
            elif n.op == "call_function":
                override = None
                if n in watch:
                    extra = (ref.get(n.args[0], env[n.args[0]]),) if twin else ()
                    override = hook(n, env[n.args[0]], *extra)
                if twin:
                    ref[n] = [_call(n, ref, b, None, env) for b in range(count)]
                env[n] = [_call(n, env, b, override) for b in range(count)]
                if n in watch:
                    left -= 1
                    if progress is not None:
                        progress(n)
            elif n.op == "output":
                pass
            else:
                raise UnsupportedGraphError(
                    f"sequential calibration runs aten-level graphs only; node {n.name} is "
                    f"{n.op} {n.target!r}")
            for dead in dying.get(i, ()):
                env.pop(dead, None)
                ref.pop(dead, None)


def _call(n: fx.Node, env: dict[fx.Node, list[Any]], b: int,
          weight: torch.Tensor | None, fallback: dict[fx.Node, list[Any]] | None = None) -> Any:
    def value(a: fx.Node) -> Any:
        # The twin shares placeholders and attributes with the main run.
        return env[a][b] if a in env or fallback is None else fallback[a][b]

    args = fx.node.map_arg(n.args, value)
    kwargs = fx.node.map_arg(n.kwargs, value)
    if weight is not None:
        args = (args[0], weight, *args[2:])
    return n.target(*args, **kwargs)
