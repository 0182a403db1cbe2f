"""The Python entry points: quantize a model with a pipeline, evaluate, save."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from qcompile.errors import PipelineError
from qcompile.manager import PassManager
from qcompile.pass_base import PassContext
from qcompile.pipeline import Pipeline, parse_pipeline

__all__ = ["quantize_graph", "quantize_model", "resolve_pipeline"]


def resolve_pipeline(recipe: str | None = None, pipeline: str | Pipeline | None = None
                     ) -> Pipeline:
    """A pipeline from exactly one of a recipe name or pipeline text.

    Raises:
        PipelineError: Both or neither given, an unknown recipe, or malformed text.
    """
    from qcompile.recipes import get_recipe

    if (recipe is None) == (pipeline is None):
        raise PipelineError("give exactly one of a recipe name or pipeline text")
    if recipe is not None:
        return get_recipe(recipe).parse()
    return parse_pipeline(pipeline)


def quantize_graph(gm: torch.fx.GraphModule, pipeline: str | Pipeline, *, tokenizer: Any = None,
                   progress: bool = True, verify: bool = True
                   ) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """Run ``pipeline`` over a captured graph (in place); return it and the report."""
    ctx = PassContext(tokenizer=tokenizer, progress=progress)
    return PassManager(pipeline, verify=verify, context=ctx).run(gm)


def quantize_model(model: torch.nn.Module, pipeline: str | Pipeline, *, tokenizer: Any = None,
                   progress: bool = True) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """Capture ``model`` and run ``pipeline`` over it.

    Returns:
        The quantized graph (callable ``input_ids -> logits``) and the pipeline report.
    """
    from qcompile.capture import capture

    gm = capture(model)
    return quantize_graph(gm, pipeline, tokenizer=tokenizer, progress=progress)
