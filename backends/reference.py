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

__all__ = ["compile_reference"]


def compile_reference(
    gm: torch.fx.GraphModule, device: str | torch.device | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Make ``gm`` a callable ``input_ids -> logits`` that runs eagerly.

    Args:
        gm: A graph from ``qcompile.capture`` (after any passes).
        device: Device to move the graph's tensors to; None keeps them where they are.

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
    target = torch.device(device) if device is not None else None

    def run(input_ids: torch.Tensor) -> torch.Tensor:
        if target is not None:
            input_ids = input_ids.to(target)
        with torch.inference_mode():
            return gm(input_ids)

    return run
