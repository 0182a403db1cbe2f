"""``qcompile.compile(model, ...)``: quantize and compile a model's forward in one call."""

from __future__ import annotations

from pathlib import Path

import torch

from qcompile.backends.inductor.backend import QCompileBackend
from qcompile.backends.inductor.options import parse_options

__all__ = ["compile"]


def compile(
    model: torch.nn.Module,
    recipe: str | None = None,
    pipeline: str | None = None,
    artifact: str | Path | None = None,
    *,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    free_weights: bool = False,
    mode: str | None = None,
    inductor: bool = True,
    lower: str = "auto",
    fuse_linears: bool = True,
    fp32_accumulate: bool = False,
    decode_fusion: bool = True,
    decode_attention: bool = True,
) -> torch.nn.Module:
    """Compile ``model`` in place with the ``qcompile`` backend and return it.

    Like ``model.compile(backend="qcompile", options=...)``: the module's ``__call__`` is
    compiled, so ``model(...)`` and ``model.generate(...)`` run the quantized graphs. The
    model's own parameter names are used to match artifact tensors, so graph breaks inside
    submodules still find their weights. The backend (with its :class:`CompileStats` as
    ``.stats``) is attached as ``model.qcompile_backend``; it is private to this model.

    Args:
        model: The model (e.g. a Hugging Face causal LM).
        recipe: Recipe name (``w4-afpq``, ``fp8-dynamic``, ...).
        pipeline: Pipeline text instead of a recipe.
        artifact: Artifact directory instead of a recipe (calibrated / GPTQ recipes).
        dynamic: ``torch.compile``'s ``dynamic``.
        fullgraph: ``torch.compile``'s ``fullgraph`` (error on graph breaks).
        free_weights: Release full-precision weights once quantized (the eager model cannot
            run them afterwards).
        mode: Inductor mode.
        inductor: False runs the quantized graphs eagerly (reference numerics).
        lower: ``auto`` (fused Triton kernel ops on CUDA), ``always`` or ``none``.
        fuse_linears: Merge the quantized linears that read one input (q/k/v, gate/up) into
            one wider linear before lowering (``fuse-linears``).
        fp32_accumulate: Lowered FP8 / W4A8 linears promote their MMA sums to fp32 (more
            accurate, slower; :class:`BackendOptions`).
        decode_fusion: In decode (one-row) graphs, lowered W4A16 linears absorb the RMSNorm
            or SiLU gate before them and the residual add after them.
        decode_attention: In decode graphs, attention over a GQA KV cache runs as one
            ``decode_attention`` op on the cache as it is (no per-query-head copies).

    Returns:
        ``model``, compiled.

    Raises:
        BackendOptionError: Not exactly one of recipe / pipeline / artifact, or a bad value.
        PipelineError: Unknown recipe or malformed pipeline.
        ArtifactError: The artifact cannot be read.
    """
    options = parse_options({
        "recipe": recipe, "pipeline": pipeline,
        "artifact": str(artifact) if artifact is not None else None,
        "free_weights": free_weights, "inductor": inductor, "mode": mode, "lower": lower,
        "fuse_linears": fuse_linears, "fp32_accumulate": fp32_accumulate,
        "decode_fusion": decode_fusion, "decode_attention": decode_attention,
    })
    backend = QCompileBackend(options)
    backend.register_model(model)
    backend.check_model(model)
    model.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    model.qcompile_backend = backend
    return model
