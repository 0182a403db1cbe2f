"""ONNX export of quantized graphs that stock ONNX Runtime runs (``qcompile.backends.onnx``).

* :func:`export_onnx`: a captured (quantized) graph or a model to an ``.onnx`` file;
  :func:`build_model` for the in-memory model.
* :class:`OnnxLM`: an ONNX Runtime session wrapper: logits, perplexity-compatible calls and
  greedy generation (with the KV cache when the export has one).

Lowerings: INT8/FP8 weights and activations to standard Q/DQ, INT4 weights to
``com.microsoft.MatMulNBits`` (or blocked DequantizeLinear), FP4/AFPQ/NF4/po2, dynamic
activation quantization and online Hadamard rotations to model-local functions in the
``qcompile`` domain built from standard ops (see :mod:`~qcompile.backends.onnx.qops` and
:mod:`~qcompile.backends.onnx.functions`); options put FP4 E2M1 weights in two exact 4-bit
MatMulNBits or in opset-23 FLOAT4E2M1 DequantizeLinear. The KV-cache decoder is described in
:mod:`~qcompile.backends.onnx.kv`; :mod:`~qcompile.backends.onnx.reference_ops` lets
``onnx.reference`` run MatMulNBits. Importing this package imports onnx.
"""

from __future__ import annotations

from qcompile.backends.onnx.export import ExportOptions, build_model, export_onnx
from qcompile.backends.onnx.runtime import OnnxLM

__all__ = ["ExportOptions", "OnnxLM", "build_model", "export_onnx"]
