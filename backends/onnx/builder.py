"""A small ONNX graph builder: unique value names, constants, initializers, opset tracking.

Every emitter of the exporter (aten ops, qcompile ops, KV-cache plumbing) appends nodes through
one :class:`GraphBuilder`. It records which standard opset each construct needs
(:meth:`GraphBuilder.require`), so the exported model declares the lowest opset that covers
what it uses, and it collects the model-local ``qcompile`` functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

__all__ = ["BASE_OPSET", "MS_DOMAIN", "QC_DOMAIN", "GraphBuilder", "onnx_dtype"]

#: Lowest standard opset emitted (ReduceMean/ReduceMax with ``axes`` as an input).
BASE_OPSET = 18
QC_DOMAIN = "qcompile"
MS_DOMAIN = "com.microsoft"

_DTYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE,
    torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32,
    torch.int16: TensorProto.INT16,
    torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL,
}


def onnx_dtype(dtype: torch.dtype) -> int:
    """The ONNX element type of a torch dtype.

    Raises:
        TypeError: No ONNX equivalent is handled here.
    """
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise TypeError(f"torch dtype {dtype} has no ONNX lowering here") from None


class GraphBuilder:
    """Accumulates the nodes, initializers and functions of one ONNX graph.

    Attributes:
        nodes: Nodes in topological order.
        initializers: Initializer tensors by name.
        functions: Model-local functions by name (domain ``qcompile``).
        opset: The standard opset the emitted nodes need so far.
        domains: Non-standard domains used (``qcompile``, ``com.microsoft``).
        reasons: Why the opset was raised, e.g. ``{"21": "blocked DequantizeLinear"}``.
    """

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.functions: dict[str, onnx.FunctionProto] = {}
        self.opset = BASE_OPSET
        self.domains: set[str] = set()
        self.reasons: dict[str, str] = {}
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def require(self, opset: int, why: str) -> None:
        """Record that the model needs standard opset ``opset`` (because of ``why``)."""
        if opset > BASE_OPSET:
            self.reasons.setdefault(str(opset), why)
        self.opset = max(self.opset, opset)

    def fresh(self, base: str) -> str:
        """A value name not used before, derived from ``base``."""
        base = "".join(c if c.isalnum() or c in "._/" else "_" for c in base) or "v"
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Mark ``name`` (a graph input) as taken and return it."""
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, *,
           outputs: int = 1, domain: str = "", **attrs: Any) -> Any:
        """Append a node; return its output name (or the list of names if ``outputs > 1``)."""
        outs = [self.fresh(f"{name or op_type.lower()}") for _ in range(outputs)]
        node = helper.make_node(op_type, inputs, outs, name=self.fresh(f"n_{outs[0]}"),
                                domain=domain, **attrs)
        self.nodes.append(node)
        if domain:
            self.domains.add(domain)
        return outs[0] if outputs == 1 else outs

    def initializer(self, base: str, value: np.ndarray | TensorProto) -> str:
        """Add an initializer (a numpy array or a ready TensorProto); return its name."""
        name = self.fresh(base)
        tensor = value if isinstance(value, TensorProto) else numpy_helper.from_array(value)
        tensor.name = name
        self.initializers[name] = tensor
        return name

    def const(self, value: Any, dtype: np.dtype | type = np.int64) -> str:
        """A small constant initializer (deduplicated by value and dtype)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer("const", arr)
        return self._consts[key]

    def add_function(self, fn: onnx.FunctionProto) -> None:
        """Register a model-local function (idempotent by name)."""
        self.functions.setdefault(fn.name, fn)
        self.domains.add(fn.domain)

    def prune(self, outputs: list[str]) -> int:
        """Drop nodes and initializers that no graph output depends on; return nodes dropped."""
        live = set(outputs)
        kept: list[onnx.NodeProto] = []
        for node in reversed(self.nodes):
            if any(o in live for o in node.output):
                kept.append(node)
                live.update(i for i in node.input if i)
        dropped = len(self.nodes) - len(kept)
        self.nodes = kept[::-1]
        self.initializers = {k: v for k, v in self.initializers.items() if k in live}
        return dropped
