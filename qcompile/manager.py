"""Run a pipeline over a GraphModule and report what each pass did."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from qcompile.errors import PassError, PostconditionError, QCompileError
from qcompile.graph import has_attr
from qcompile.pass_base import PassContext
from qcompile.pipeline import Pipeline, parse_pipeline

__all__ = ["PassManager", "jsonable"]


def jsonable(value: Any) -> Any:
    """Turn facts (tensors, tuples, numpy scalars, nested dicts) into JSON-able values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _node_names(gm: torch.fx.GraphModule) -> set[str]:
    return {n.name for n in gm.graph.nodes}


def verify_graph(gm: torch.fx.GraphModule, pass_name: str) -> None:
    """Structural check of a graph: fx lint, and every get_attr target exists."""
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises plain RuntimeError/AssertionError
        raise PostconditionError(f"graph after pass {pass_name!r} is malformed: {e}") from e
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not has_attr(gm, node.target):
            raise PostconditionError(
                f"after pass {pass_name!r}, node {node.name} reads attribute "
                f"{node.target!r} that does not exist"
            )


class PassManager:
    """Runs the passes of a pipeline in order.

    Args:
        pipeline: Pipeline text or a parsed ``Pipeline``.
        verify: Check the graph after every pass (fx lint, attributes exist).
        context: Shared state for the passes (tokenizer, progress, device).
        probe: Optional check run after every pass, ``probe(gm) -> dict`` of facts to add to
            that pass's report entry (e.g. logits error on a probe input).
    """

    def __init__(
        self,
        pipeline: str | Pipeline,
        *,
        verify: bool = True,
        context: PassContext | None = None,
        probe: Callable[[torch.fx.GraphModule], dict[str, Any]] | None = None,
    ) -> None:
        self.pipeline = parse_pipeline(pipeline)
        self.verify = verify
        self.context = context if context is not None else PassContext()
        self.probe = probe

    def run(self, gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
        """Run every pass; return the final graph and a JSON-able report.

        The report is ``{"pipeline": text, "seconds": total, "passes": [entry, ...]}``; each
        entry holds name, text, options, seconds, modified, nodes before/after/added/removed
        and the pass's own facts.

        Raises:
            QCompileError: Whatever a pass raises, with the failing pass named.
        """
        entries = []
        t_all = time.perf_counter()
        for index, step in enumerate(self.pipeline):
            before = _node_names(gm)
            p = step.instantiate(self.context)
            t0 = time.perf_counter()
            try:
                result = p(gm)
            except QCompileError:
                raise
            except Exception as e:
                raise PassError(f"pass {step} (#{index}) failed: {type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - t0
            gm = result.graph_module
            if self.verify:
                verify_graph(gm, step.name)
            after = _node_names(gm)
            facts = dict(result.facts)
            if self.probe is not None:
                facts.update(self.probe(gm))
            entries.append(
                {
                    "name": step.name,
                    "text": str(step),
                    "options": jsonable(step.option_dict()),
                    "seconds": round(seconds, 4),
                    "modified": bool(result.modified),
                    "nodes_before": len(before),
                    "nodes_after": len(after),
                    "nodes_added": len(after - before),
                    "nodes_removed": len(before - after),
                    "facts": jsonable(facts),
                }
            )
        report = {
            "pipeline": str(self.pipeline),
            "seconds": round(time.perf_counter() - t_all, 4),
            "passes": entries,
        }
        return gm, report
