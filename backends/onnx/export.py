"""``export_onnx``: a (quantized) captured graph or a model to an ONNX file ORT runs as is.

The fx graph is translated node by node (:mod:`~qcompile.backends.onnx.translate`); the model
declares the lowest standard opset covering what it uses (18 at least; 19 for FP8
Q/DQ, 21 for blocked or INT4 Q/DQ, 23 for FLOAT4E2M1) and records why in its metadata
(``qcompile.opset_reasons``). Inputs: ``input_ids`` int64 ``[batch, sequence]`` (both
dynamic; the batch stays fixed only for graphs captured with a batch other than 1); with
``kv_cache=True`` also ``past_key_values.<i>.key/value`` and outputs ``present.<i>.key/value``
(see :mod:`~qcompile.backends.onnx.kv`). Every export passes
``onnx.checker.check_model(full_check=True)`` and carries inferred shapes; initializers of
large models go to one external data file next to the model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from onnx import TensorProto, helper
from torch import fx, nn

import qcompile.backends.onnx.aten_nn  # noqa: F401  (registers its handlers in ATEN_HANDLERS)
from qcompile.backends.onnx.aten import ATEN_HANDLERS
from qcompile.backends.onnx.builder import MS_DOMAIN, QC_DOMAIN, GraphBuilder
from qcompile.backends.onnx.fuse import plan_fusions
from qcompile.backends.onnx.kv import causal_masks, check_causal, plan_kv
from qcompile.backends.onnx.qops import QOP_HANDLERS
from qcompile.backends.onnx.translate import Translator
from qcompile.errors import QCompileError, UnsupportedGraphError

__all__ = ["ExportOptions", "build_model", "export_onnx"]

#: Initializer bytes above which ``external_data=None`` writes an external data file.
EXTERNAL_THRESHOLD = 64 * 2**20


@dataclass(frozen=True)
class ExportOptions:
    """Choices of the ONNX lowering.

    Attributes:
        int4: ``"matmulnbits"`` (com.microsoft MatMulNBits where the group is a power of two
            >= 16, else blocked DequantizeLinear) or ``"dq"`` (always standard blocked
            DequantizeLinear + MatMul).
        int8: Weight-only INT8 (per channel or power-of-two groups >= 16): ``"matmulnbits"``
            (an 8-bit MatMulNBits; ORT would fold a DequantizeLinear of a weight into an fp32
            constant at load, losing the 4x smaller weight reads) or ``"dq"``. INT8 weights
            whose linear reads a quantized activation (W8A8) always get the standard
            DequantizeLinear, so ORT's QDQ fusions make them integer GEMMs.
        fp4: ``"function"`` (the model-local ``qcompile`` function, runs on stock ORT),
            ``"matmulnbits"`` (FP4 E2M1 with power-of-two groups >= 16 as two exact 4-bit
            MatMulNBits, positive and negative half; others fall back to the function) or
            ``"dq"`` (opset-23 FLOAT4E2M1 DequantizeLinear for symmetric FP4; ORT 1.32 CPU has
            no kernel for it, ``onnx.reference`` runs it).
        accuracy_level: MatMulNBits ``accuracy_level``: 1 (default) computes in fp32, exact
            against the reference; 4 quantizes activations to int8 inside the kernel on CPU
            (faster; +1.25 % SmolLM2 perplexity measured with 128-wide blocks, +0.08 % with
            ``nbits_block=32``).
        nbits_block: Largest MatMulNBits block (a power of two >= 16); larger groups are
            split with their scales repeated (exact, more scale bytes). At accuracy level 4
            ORT quantizes the activations per block, so smaller blocks keep activation
            outliers from spoiling whole 128-wide blocks. None: the format's group.
        kv_cache: Export a decoder with past/present key-value inputs and outputs.
        dynamic_batch: Make the batch axis dynamic (needs a graph captured with batch 1).
        fuse: Emit attention, RMSNorm and RoPE as the opset-23 ``Attention``,
            ``RMSNormalization`` and ``RotaryEmbedding`` ops where the patterns check out
            (:mod:`~qcompile.backends.onnx.fuse`); False keeps them as chains of basic ops
            (and the opset at what the rest needs, 18 at least).
    """

    int4: Literal["matmulnbits", "dq"] = "matmulnbits"
    int8: Literal["matmulnbits", "dq"] = "matmulnbits"
    fp4: Literal["function", "matmulnbits", "dq"] = "function"
    accuracy_level: int = 1
    nbits_block: int | None = None
    kv_cache: bool = False
    dynamic_batch: bool = True
    fuse: bool = True

    def __post_init__(self) -> None:
        if self.int4 not in ("matmulnbits", "dq"):
            raise QCompileError(f"int4 lowering must be 'matmulnbits' or 'dq', not {self.int4!r}")
        if self.int8 not in ("matmulnbits", "dq"):
            raise QCompileError(f"int8 lowering must be 'matmulnbits' or 'dq', not {self.int8!r}")
        if self.fp4 not in ("function", "matmulnbits", "dq"):
            raise QCompileError(
                f"fp4 lowering must be 'function', 'matmulnbits' or 'dq', not {self.fp4!r}"
            )
        nb = self.nbits_block
        if nb is not None and (isinstance(nb, bool) or not isinstance(nb, int) or nb < 16
                               or nb & (nb - 1)):
            raise QCompileError(f"nbits_block must be a power of two >= 16, not {nb!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QCompileError(f"accuracy_level must be 0..4, not {self.accuracy_level!r}")


def build_model(gm: fx.GraphModule, options: ExportOptions | None = None,
                metadata: dict[str, Any] | None = None) -> onnx.ModelProto:
    """Translate ``gm`` to an in-memory ONNX model (shapes inferred, checked).

    Raises:
        UnsupportedGraphError: A node has no lowering (named in the message).
        FormatError: A format has no lowering (named in the message).
    """
    options = options or ExportOptions()
    b = GraphBuilder()
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(placeholders) != 1:
        raise UnsupportedGraphError(
            f"ONNX export takes graphs with one input (input_ids), got {len(placeholders)}"
        )
    ids = placeholders[0]
    _require_float32(gm)
    batch_meta = gm.meta.get("batch", 1)
    batch: str | int = "batch" if options.dynamic_batch and batch_meta == 1 else batch_meta
    lo, hi = gm.meta.get("seq_range", (1, 2))
    seq: str | int = "sequence" if lo != hi else lo
    b.reserve("input_ids")
    b.reserve("logits")
    t = Translator(gm, b, {**ATEN_HANDLERS, **QOP_HANDLERS}, options)
    kv_inputs: list = []
    kv_outputs: list = []
    presents: dict[str, str] = {}
    probe = 0
    skipped: dict[str, str] = {}
    if options.kv_cache:
        probe = check_causal(gm)
        _, kv_inputs, kv_outputs, presents = plan_kv(t, ids, fuse=options.fuse)
    if options.fuse:
        causal = None if options.kv_cache else causal_masks(gm)[1]
        skipped = plan_fusions(t, causal=causal).skipped
    t.run({ids: "input_ids"})
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    result = out_node.args[0]
    result = result[0] if isinstance(result, (tuple, list)) else result
    logits = t.val(result)
    vocab = t.shape(result)[-1] if t.shape(result) else "vocab"
    out_names = ["logits"]
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="n_logits"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [
        batch, seq, int(vocab) if str(vocab).isdigit() else "vocab"])]
    for name, heads, d in kv_outputs:
        b.nodes.append(helper.make_node("Identity", [presents[name]], [name], name=f"n_{name}"))
        outputs.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, [batch, heads, "total_sequence", d]))
        out_names.append(name)
    b.prune(out_names)
    fused = {op: sum(n.op_type == op for n in b.nodes)
             for op in ("Attention", "RMSNormalization", "RotaryEmbedding")}
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              *kv_inputs]
    graph = helper.make_graph(b.nodes, "qcompile", inputs, outputs,
                              list(b.initializers.values()))
    opsets = [helper.make_opsetid("", b.opset)]
    used = {n.domain for n in b.nodes}
    if QC_DOMAIN in used:
        opsets.append(helper.make_opsetid(QC_DOMAIN, 1))
    if MS_DOMAIN in used:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    functions = [f for name, f in b.functions.items()
                 if any(n.op_type == name and n.domain == QC_DOMAIN for n in b.nodes)]
    for fn in functions:
        del fn.opset_import[:]
        fn.opset_import.append(helper.make_opsetid("", b.opset))
    model = helper.make_model(graph, opset_imports=opsets, functions=functions,
                              producer_name="qcompile")
    model.ir_version = max(helper.find_min_ir_version_for(list(opsets), True), 8)
    meta = {
        "qcompile.opset": str(b.opset),
        "qcompile.opset_reasons": json.dumps(b.reasons),
        "qcompile.options": json.dumps(asdict(options)),
        "qcompile.kv_cache": json.dumps(
            {"layers": len(kv_outputs) // 2, "probe_tokens": probe} if options.kv_cache
            else None),
        "qcompile.dynamic_batch": json.dumps(batch == "batch"),
        "qcompile.fused": json.dumps({**fused, "skipped": skipped} if options.fuse else None),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()},
    }
    helper.set_model_props(model, meta)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                              data_prop=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _require_float32(gm: fx.GraphModule) -> None:
    """Refuse graphs computing in another float dtype (the lowerings emit fp32 constants)."""
    from qcompile.graph import get_attr_value

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_attr_value(gm, str(node.target))
        else:
            value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.is_floating_point() and \
                value.dtype != torch.float32:
            raise UnsupportedGraphError(
                f"ONNX export handles float32 graphs; node {node.name} is {value.dtype} "
                f"(load the model with dtype=torch.float32)"
            )


def _as_graph(model_or_gm: Any, recipe: str | None, pipeline: Any, tokenizer: Any,
              progress: bool) -> tuple[fx.GraphModule, str]:
    from qcompile.api import quantize_graph, resolve_pipeline

    if isinstance(model_or_gm, fx.GraphModule):
        gm = model_or_gm
    elif isinstance(model_or_gm, nn.Module):
        from qcompile.capture import capture

        gm = capture(model_or_gm)
    else:
        raise QCompileError(
            f"export_onnx takes a captured GraphModule or an nn.Module, not "
            f"{type(model_or_gm).__name__}"
        )
    if recipe is None and pipeline is None:
        return gm, ""
    pipe = resolve_pipeline(recipe, pipeline)
    gm, _ = quantize_graph(gm, pipe, tokenizer=tokenizer, progress=progress)
    return gm, str(pipe)


def export_onnx(model_or_gm: fx.GraphModule | nn.Module, path: str | os.PathLike[str], *,
                recipe: str | None = None, pipeline: Any = None, tokenizer: Any = None,
                kv_cache: bool = False, int4: str = "matmulnbits", int8: str = "matmulnbits",
                fp4: str = "function",
                accuracy_level: int = 1, nbits_block: int | None = None,
                dynamic_batch: bool = True, fuse: bool = True,
                external_data: bool | None = None, progress: bool = False) -> dict[str, Any]:
    """Export a (quantized) captured graph, or capture-quantize-export a model, to ONNX.

    Args:
        model_or_gm: A GraphModule from ``qcompile.capture`` (after any passes) or a model.
        path: The ``.onnx`` file to write.
        recipe: A recipe to run before exporting (at most one of ``recipe``/``pipeline``).
        pipeline: Pipeline text or object to run before exporting.
        tokenizer: Tokenizer for passes that calibrate.
        kv_cache: Decoder with ``past_key_values`` inputs and ``present`` outputs.
        int4: INT4 weight lowering, see :class:`ExportOptions`.
        int8: Weight-only INT8 lowering, see :class:`ExportOptions`.
        fp4: FP4 weight lowering, see :class:`ExportOptions`.
        accuracy_level: MatMulNBits accuracy level.
        nbits_block: Largest MatMulNBits block, see :class:`ExportOptions`.
        dynamic_batch: Dynamic batch axis (graphs captured with batch 1).
        fuse: Fused opset-23 Attention / RMSNormalization / RotaryEmbedding, see
            :class:`ExportOptions`.
        external_data: Write initializers to ``<path>.data``; None: only when they exceed
            64 MiB.
        progress: Progress bars while passes run.

    Returns:
        A report: path, opset (and why), domains, function names, node and initializer
        counts, bytes written, inputs, outputs, external data file, seconds.

    Raises:
        UnsupportedGraphError / FormatError: Nothing lowers a node or format (named).
    """
    start = time.perf_counter()
    options = ExportOptions(int4=int4, int8=int8, fp4=fp4, accuracy_level=accuracy_level,
                            nbits_block=nbits_block, kv_cache=kv_cache,
                            dynamic_batch=dynamic_batch, fuse=fuse)
    gm, pipe = _as_graph(model_or_gm, recipe, pipeline, tokenizer, progress)
    meta = {"qcompile.pipeline": pipe, "qcompile.source_model": gm.meta.get("source_model", "")}
    model = build_model(gm, options, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size > EXTERNAL_THRESHOLD if external_data is None else external_data
    location = path.name + ".data"
    if external:
        (path.parent / location).unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    props = {p.key: p.value for p in model.metadata_props}
    return {
        "path": str(path),
        "opset": int(props["qcompile.opset"]),
        "opset_reasons": json.loads(props["qcompile.opset_reasons"]),
        "domains": sorted({o.domain for o in model.opset_import}),
        "functions": [f.name for f in model.functions],
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "initializer_bytes": size,
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "external_data": location if external else None,
        "fused": json.loads(props["qcompile.fused"]),
        "pipeline": pipe,
        "seconds": round(time.perf_counter() - start, 3),
    }
