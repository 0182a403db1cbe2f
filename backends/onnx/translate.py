"""Walk an aten-level fx graph and emit ONNX nodes for it.

The :class:`Translator` keeps, for every fx node, the ONNX value that holds its result
(``env``), the node's torch dtype and rank, and emits nodes through a
:class:`~qcompile.backends.onnx.builder.GraphBuilder`. Handlers for aten ops live in
:mod:`qcompile.backends.onnx.aten`, handlers for ``qcompile::`` ops in
:mod:`qcompile.backends.onnx.qops`; both are looked up by call target.

Symbolic sizes (``aten.sym_size.int`` and arithmetic on them) are int64 ONNX tensors of shape
``[1]`` (:class:`SymVal`). Shapes are taken from the runtime tensors wherever the captured graph
holds a size that ONNX should keep dynamic (see :meth:`Translator.reshape_target` and the
``expand`` handler): captured graphs bake the batch size (1) into ``view``/``expand`` sizes, and
the KV-cache export changes the key/value length; reading those sizes from the actual input
keeps both axes dynamic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from qcompile.backends.onnx.builder import GraphBuilder, onnx_dtype
from qcompile.errors import UnsupportedGraphError
from qcompile.graph import get_attr_value

__all__ = ["SymVal", "Translator"]

Handler = Callable[["Translator", fx.Node], Any]


@dataclass(frozen=True)
class SymVal:
    """A symbolic integer held in ONNX as an int64 tensor of shape ``[1]``."""

    name: str


class Translator:
    """State of one fx -> ONNX translation.

    Args:
        gm: The graph module (aten-level, possibly with ``qcompile::`` ops).
        builder: Where nodes go.
        handlers: Call target -> handler(translator, node) returning the node's ONNX value
            (a name, a :class:`SymVal`, a list of names, or a Python constant).
        options: Export options, read by handlers (``int4``, ``fp4`` lowering choices).
    """

    def __init__(self, gm: fx.GraphModule, builder: GraphBuilder,
                 handlers: dict[Any, Handler], options: Any) -> None:
        self.gm = gm
        self.b = builder
        self.handlers = handlers
        self.options = options
        self.env: dict[fx.Node, Any] = {}
        self.dtypes: dict[fx.Node, torch.dtype] = {}
        self.ranks: dict[fx.Node, int] = {}
        # (producer, consumer) -> value the consumer reads instead of env[producer]
        self.edge_override: dict[tuple[fx.Node, fx.Node], str] = {}
        # fx node -> replacement handler result computed by a plan (e.g. KV-cache mask)
        self.node_override: dict[fx.Node, Callable[[Translator, fx.Node], Any]] = {}
        self.current: fx.Node | None = None
        self.attr_uses: dict[str, int] = {}
        self._attr_cache: dict[tuple[int, str], str] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self.attr_uses[str(node.target)] = self.attr_uses.get(str(node.target), 0) + \
                    len(node.users)

    # -- node metadata ---------------------------------------------------------------------

    @staticmethod
    def meta(node: Any) -> torch.Tensor | None:
        """The node's example value (a FakeTensor) if export recorded one."""
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        return val if isinstance(val, torch.Tensor) else None

    def dtype(self, arg: Any) -> torch.dtype:
        """The torch dtype of a tensor argument (or of a Python scalar)."""
        if isinstance(arg, fx.Node):
            if arg in self.dtypes:
                return self.dtypes[arg]
            if arg.op == "get_attr":
                return get_attr_value(self.gm, str(arg.target)).dtype
            val = self.meta(arg)
            if val is not None:
                return val.dtype
            raise UnsupportedGraphError(f"node {arg.name} has no known dtype")
        if isinstance(arg, bool):
            return torch.bool
        if isinstance(arg, int):
            return torch.int64
        return torch.float32

    def rank(self, arg: fx.Node) -> int:
        """The rank of a tensor node."""
        if arg in self.ranks:
            return self.ranks[arg]
        if arg.op == "get_attr":
            return get_attr_value(self.gm, str(arg.target)).dim()
        val = self.meta(arg)
        if val is None:
            raise UnsupportedGraphError(f"node {arg.name} has no known rank")
        return val.dim()

    def shape(self, arg: fx.Node) -> list[str] | None:
        """The node's example shape as text per dim (symbols such as ``s0`` stay symbolic)."""
        val = self.meta(arg)
        return None if val is None else [str(d) for d in val.shape]

    # -- values ----------------------------------------------------------------------------

    def val(self, arg: Any, dtype: torch.dtype | None = None) -> str:
        """ONNX tensor name of a tensor argument, or a constant for a Python scalar.

        Args:
            arg: An fx node or a Python number.
            dtype: Cast to this dtype if the value has another one.
        """
        if isinstance(arg, fx.Node):
            override = self.edge_override.get((arg, self.current)) if self.current else None
            value = override if override is not None else self.env[arg]
            if isinstance(value, SymVal):
                value = value.name
            elif isinstance(value, _LazyAttr):
                value = self.weight(value.target)
            elif hasattr(value, "plain"):  # a deferred dequantized weight
                value = value.plain(self)
            if not isinstance(value, str):
                return self.b.const(value, _np_dtype(dtype or self.dtype(arg)))
            if dtype is not None and dtype != self.dtype(arg):
                return self.b.op("Cast", [value], to=onnx_dtype(dtype))
            return value
        if isinstance(arg, (bool, int, float)):
            return self.b.const(arg, _np_dtype(dtype or self.dtype(arg)))
        raise UnsupportedGraphError(
            f"node {self.current.name if self.current else '?'}: cannot lower argument {arg!r}"
        )

    def sym(self, arg: Any) -> str:
        """An int64 ``[1]`` tensor for an int or a symbolic size node."""
        if isinstance(arg, fx.Node):
            value = self.env[arg]
            if isinstance(value, SymVal):
                return value.name
            if isinstance(value, int):
                return self.b.const([value])
            raise UnsupportedGraphError(f"node {arg.name} is not a size")
        return self.b.const([int(arg)])

    def scalar_int(self, arg: Any) -> str:
        """An int64 scalar tensor for an int or symbolic size."""
        if isinstance(arg, fx.Node):
            return self.b.op("Squeeze", [self.sym(arg), self.b.const([0])])
        return self.b.const(int(arg))

    def int_list(self, items: list[Any]) -> str:
        """A 1-D int64 tensor from a list of ints and symbolic sizes."""
        if all(not isinstance(i, fx.Node) for i in items):
            return self.b.const([int(i) for i in items])
        return self.b.op("Concat", [self.sym(i) for i in items], axis=0)

    def weight(self, target: str, transform: str = "") -> str:
        """An initializer holding the attribute ``target`` (``transform``: "" or "T")."""
        value = get_attr_value(self.gm, target)
        key = (id(value), transform)  # tied attributes share one tensor: store it once
        if key not in self._attr_cache:
            t = value.detach().cpu()
            if transform == "T":
                t = t.t()
            arr = t.contiguous().numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
            self._attr_cache[key] = self.b.initializer(target + (".T" if transform else ""),
                                                       np.ascontiguousarray(arr))
        return self._attr_cache[key]

    def reshape_target(self, x: fx.Node, x_name: str, out: fx.Node, sizes: list[Any]) -> str:
        """The ONNX Reshape target of ``view``/``reshape(x, sizes)`` with dynamic dims kept.

        Output dims that match the input's leading dims (same example size, same position)
        are copied (0); dims matching its trailing dims are read from the input's runtime
        shape; the rest come from ``sizes`` (one of them may be -1).
        """
        ins, outs = self.shape(x), self.shape(out)
        if ins is None or outs is None or len(outs) != len(sizes):
            return self.int_list(sizes)
        pre = 0
        while pre < min(len(ins), len(outs)) and ins[pre] == outs[pre]:
            pre += 1
        suf = 0
        while (suf < min(len(ins), len(outs)) - pre and ins[len(ins) - 1 - suf]
               == outs[len(outs) - 1 - suf]):
            suf += 1
        middle = list(range(pre, len(outs) - suf))
        parts: list[str] = []
        for i in range(len(outs)):
            if i < pre:
                parts.append(self.b.const([0]))
            elif i >= len(outs) - suf:
                j = len(ins) - (len(outs) - i)
                parts.append(self.b.op("Shape", [x_name], start=j, end=j + 1))
            elif len(middle) == 1:
                parts.append(self.b.const([-1]))
            else:
                parts.append(self.sym(sizes[i]))
        return self.b.op("Concat", parts, axis=0)

    # -- walking ---------------------------------------------------------------------------

    def run(self, inputs: dict[fx.Node, str]) -> None:
        """Translate every node in order; ``inputs`` maps placeholders to graph inputs."""
        for node in self.gm.graph.nodes:
            self.current = node
            if node.op == "placeholder":
                self.env[node] = inputs[node]
            elif node.op == "get_attr":
                self.env[node] = _LazyAttr(str(node.target))
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                pass
            else:
                raise UnsupportedGraphError(
                    f"ONNX export handles aten-level graphs only; node {node.name} is "
                    f"{node.op} {node.target!r}"
                )
        self.current = None

    def call(self, node: fx.Node) -> Any:
        """Translate one call_function node."""
        if node in self.node_override:
            return self.node_override[node](self, node)
        handler = self.handlers.get(node.target)
        if handler is None:
            raise UnsupportedGraphError(
                f"no ONNX lowering for node {node.name} ({_target_name(node.target)}); "
                f"lowered ops: aten ops of captured LM graphs and qcompile::dequantize_weight, "
                f"quantize_activation, quantize_activation_static, hadamard"
            )
        return handler(self, node)


@dataclass(frozen=True)
class _LazyAttr:
    """A get_attr whose initializer is created on first use (so it can be stored transposed)."""

    target: str


def _target_name(target: Any) -> str:
    name = getattr(target, "__name__", None)
    if hasattr(target, "_schema") or hasattr(target, "_overloadname"):
        return str(target)
    return name or str(target)


def _np_dtype(dtype: torch.dtype) -> Any:
    return {
        torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
        torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_,
        torch.int8: np.int8, torch.uint8: np.uint8,
    }.get(dtype, np.float32)
