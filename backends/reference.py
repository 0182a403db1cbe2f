"""Reference backend: run a (quantized) graph eagerly with the ops' PyTorch implementations.

This is the numerics every other backend is compared against. It works on CPU and on CUDA
(the reference implementations are device-agnostic PyTorch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.errors import UnsupportedGraphError
from qcompile.graph import get_attr_value, set_attr_value

__all__ = ["compile_reference", "fold_weight_dequant"]


def fold_weight_dequant(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """A copy of ``gm`` in which weight dequantization ran once, ahead of time.

    ``qcompile::dequantize_weight`` nodes that read only attributes are evaluated with their
    reference implementation and replaced by a read of the result, so every forward skips
    them. The function (bits included) is unchanged; the original graph is not touched.

    Returns:
        The new GraphModule (sharing untouched tensors with ``gm``) and how many nodes folded.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    out = torch.fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    folded = 0
    for node in list(out.graph.nodes):
        if node.target is not torch.ops.qcompile.dequantize_weight.default:
            continue
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if not all(a.op == "get_attr" for a in tensor_args):
            continue
        args = [get_attr_value(out, a.target) if isinstance(a, torch.fx.Node) else a
                for a in node.args]
        with torch.inference_mode(False), torch.no_grad():
            value = node.target(*args)
        target = f"{tensor_args[0].target}_dequantized"
        set_attr_value(out, target, value)
        with out.graph.inserting_before(node):
            new = out.graph.get_attr(target)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        out.graph.erase_node(node)
        folded += 1
    out.graph.eliminate_dead_code()
    out.recompile()
    return out, folded


def compile_reference(
    gm: torch.fx.GraphModule, device: str | torch.device | None = None, *, fold: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Make ``gm`` a callable ``input_ids -> logits`` that runs eagerly.

    Args:
        gm: A graph from ``qcompile.capture`` (after any passes).
        device: Device to move the graph's tensors to; None keeps them where they are.
        fold: Dequantize constant weights once up front (same bits, faster forwards, memory
            of the dequantized weights).

    Raises:
        UnsupportedGraphError: The graph calls a module or method (only aten-level
            ``call_function`` graphs are run here); the message names the node.
    """
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_method"):
            raise UnsupportedGraphError(
                f"reference backend runs aten-level graphs only; node {node.name} is "
                f"{node.op} {node.target!r}"
            )
    if device is not None:
        # export bakes the capture device into some nodes; move_graph rewrites those too
        from qcompile.capture import move_graph

        gm = move_graph(gm, device)
    if fold:
        gm, _ = fold_weight_dequant(gm)
    target = torch.device(device) if device is not None else None

    def run(input_ids: torch.Tensor) -> torch.Tensor:
        if target is not None:
            input_ids = input_ids.to(target)
        with torch.inference_mode():
            return gm(input_ids)

    return run
