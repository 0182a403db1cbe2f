"""ONNX lowerings of the aten ops captured language-model graphs contain.

Each handler takes the :class:`~qcompile.backends.onnx.translate.Translator` and the fx node
and returns the node's ONNX value. Numerics follow PyTorch's eager CPU semantics: binary ops
compute in the promoted dtype (``torch.result_type``), ``pow(x, 2)`` is ``x * x``,
``silu(x) = x * sigmoid(x)``, exact ``gelu`` uses ``Erf``, and
``scaled_dot_product_attention`` is ``softmax(q k^T * scale + mask) v`` with boolean masks
turned into ``-inf`` fills.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
from torch import fx

from qcompile.backends.onnx.builder import onnx_dtype
from qcompile.backends.onnx.translate import SymVal, Translator, _np_dtype
from qcompile.errors import UnsupportedGraphError

__all__ = ["ATEN_HANDLERS"]

aten = torch.ops.aten
ATEN_HANDLERS: dict[Any, Any] = {}


def register(*targets: Any):
    """Decorator: make the function the handler of the given call targets."""
    def deco(fn):
        for t in targets:
            ATEN_HANDLERS[t] = fn
        return fn
    return deco


def _args(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    out = dict(defaults or {})
    out.update(zip(names, node.args, strict=False))
    out.update(node.kwargs)
    return out


def _out_dtype(t: Translator, node: fx.Node, fallback: Any) -> torch.dtype:
    val = t.meta(node)
    return val.dtype if val is not None else t.dtype(fallback)


def _promote(t: Translator, a: Any, b: Any) -> torch.dtype:
    def example(x: Any) -> Any:
        if isinstance(x, fx.Node):
            return torch.empty(1, dtype=t.dtype(x))
        return x
    return torch.result_type(example(a), example(b))


# -- elementwise -------------------------------------------------------------------------------

_BINARY = {
    aten.add.Tensor: "Add", aten.add.Scalar: "Add", aten.sub.Tensor: "Sub",
    aten.sub.Scalar: "Sub", aten.mul.Tensor: "Mul", aten.mul.Scalar: "Mul",
    aten.div.Tensor: "Div", aten.div.Scalar: "Div", aten.pow.Tensor_Tensor: "Pow",
}
_COMPARE = {
    aten.eq.Tensor: ("Equal", False), aten.eq.Scalar: ("Equal", False),
    aten.ne.Tensor: ("Equal", True), aten.ne.Scalar: ("Equal", True),
    aten.lt.Tensor: ("Less", False), aten.lt.Scalar: ("Less", False),
    aten.le.Tensor: ("LessOrEqual", False), aten.le.Scalar: ("LessOrEqual", False),
    aten.gt.Tensor: ("Greater", False), aten.gt.Scalar: ("Greater", False),
    aten.ge.Tensor: ("GreaterOrEqual", False), aten.ge.Scalar: ("GreaterOrEqual", False),
}
_UNARY = {
    aten.neg.default: "Neg", aten.cos.default: "Cos", aten.sin.default: "Sin",
    aten.tanh.default: "Tanh", aten.exp.default: "Exp", aten.sigmoid.default: "Sigmoid",
    aten.relu.default: "Relu", aten.sqrt.default: "Sqrt", aten.abs.default: "Abs",
    aten.reciprocal.default: "Reciprocal", aten.log.default: "Log", aten.erf.default: "Erf",
    aten.logical_not.default: "Not", aten.bitwise_not.default: "Not",
}


def _binary(t: Translator, node: fx.Node) -> str:
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    compute = _out_dtype(t, node, a)  # true division of integers gives a float output
    xb = t.val(b, compute)
    if alpha != 1:
        xb = t.b.op("Mul", [xb, t.val(alpha, compute)])
    return t.b.op(_BINARY[node.target], [t.val(a, compute), xb], node.name)


for _t in _BINARY:
    ATEN_HANDLERS[_t] = _binary


def _compare(t: Translator, node: fx.Node) -> str:
    a, b = node.args[0], node.args[1]
    compute = _promote(t, a, b)
    op, negate = _COMPARE[node.target]
    y = t.b.op(op, [t.val(a, compute), t.val(b, compute)], node.name)
    return t.b.op("Not", [y]) if negate else y


for _t in _COMPARE:
    ATEN_HANDLERS[_t] = _compare


def _unary(t: Translator, node: fx.Node) -> str:
    return t.b.op(_UNARY[node.target], [t.val(node.args[0])], node.name)


for _t in _UNARY:
    ATEN_HANDLERS[_t] = _unary


@register(aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default,
           aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.logical_or.default)
def _logic(t: Translator, node: fx.Node) -> str:
    is_and = node.target in (aten.__and__.Tensor, aten.bitwise_and.Tensor,
                             aten.logical_and.default)
    dtype = _promote(t, node.args[0], node.args[1])
    if dtype == torch.bool or node.target in (aten.logical_and.default, aten.logical_or.default):
        op = "And" if is_and else "Or"
        dtype = torch.bool
    else:
        op = "BitwiseAnd" if is_and else "BitwiseOr"
    return t.b.op(op, [t.val(node.args[0], dtype), t.val(node.args[1], dtype)], node.name)


@register(aten.rsqrt.default)
def _rsqrt(t: Translator, node: fx.Node) -> str:
    return t.b.op("Reciprocal", [t.b.op("Sqrt", [t.val(node.args[0])])], node.name)


@register(aten.pow.Tensor_Scalar)
def _pow(t: Translator, node: fx.Node) -> str:
    x, e = t.val(node.args[0]), node.args[1]
    if e == 2:
        return t.b.op("Mul", [x, x], node.name)
    if e == 0.5:
        return t.b.op("Sqrt", [x], node.name)
    return t.b.op("Pow", [x, t.val(float(e), t.dtype(node.args[0]))], node.name)


@register(aten.silu.default)
def _silu(t: Translator, node: fx.Node) -> str:
    x = t.val(node.args[0])
    return t.b.op("Mul", [x, t.b.op("Sigmoid", [x])], node.name)


@register(aten.gelu.default)
def _gelu(t: Translator, node: fx.Node) -> str:
    x = t.val(node.args[0])
    dt = _np_dtype(t.dtype(node.args[0]))
    approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    half = t.b.op("Mul", [x, t.b.const(0.5, dt)])
    if approx == "tanh":
        cube = t.b.op("Mul", [t.b.op("Mul", [x, x]), x])
        inner = t.b.op("Add", [x, t.b.op("Mul", [cube, t.b.const(0.044715, dt)])])
        th = t.b.op("Tanh", [t.b.op("Mul", [inner, t.b.const(math.sqrt(2 / math.pi), dt)])])
    else:
        th = t.b.op("Erf", [t.b.op("Mul", [x, t.b.const(1 / math.sqrt(2), dt)])])
    return t.b.op("Mul", [half, t.b.op("Add", [th, t.b.const(1.0, dt)])], node.name)


@register(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(t: Translator, node: fx.Node) -> str:
    cond, a, b = node.args
    dtype = _out_dtype(t, node, a if isinstance(a, fx.Node) else b)
    return t.b.op("Where", [t.val(cond, torch.bool), t.val(a, dtype), t.val(b, dtype)],
                  node.name)


@register(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(t: Translator, node: fx.Node) -> str:
    x, mask, value = node.args
    dtype = t.dtype(x)
    return t.b.op("Where", [t.val(mask, torch.bool), t.val(value, dtype), t.val(x)], node.name)


# -- casts and identities ----------------------------------------------------------------------

@register(aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device,
           aten.type_as.default)
def _cast(t: Translator, node: fx.Node) -> Any:
    x = node.args[0]
    if node.target is aten.type_as.default:
        dtype = t.dtype(node.args[1])
    elif node.target is aten.to.dtype and len(node.args) > 1:
        dtype = node.args[1]
    elif node.target is aten.to.device and len(node.args) > 2:
        dtype = node.args[2]
    else:
        dtype = node.kwargs.get("dtype") or t.dtype(x)
    return t.val(x, dtype)


@register(aten.clone.default, aten.contiguous.default, aten.alias.default,
           aten.detach.default, aten.lift_fresh_copy.default, aten.dropout.default)
def _identity(t: Translator, node: fx.Node) -> Any:
    return t.val(node.args[0])


# -- shapes ----------------------------------------------------------------------------------

@register(aten.sym_size.int)
def _sym_size(t: Translator, node: fx.Node) -> SymVal:
    x, d = node.args
    rank = t.rank(x)
    d = d % rank
    return SymVal(t.b.op("Shape", [t.val(x)], node.name, start=d, end=d + 1))


def _sym_arith(onnx_op: str):
    def handler(t: Translator, node: fx.Node) -> SymVal:
        a, b = node.args
        return SymVal(t.b.op(onnx_op, [t.sym(a), t.sym(b)], node.name))
    return handler


for _t, _op in [(operator.add, "Add"), (operator.sub, "Sub"), (operator.mul, "Mul"),
                (operator.floordiv, "Div")]:
    ATEN_HANDLERS[_t] = _sym_arith(_op)


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(t: Translator, node: fx.Node) -> str:
    x, sizes = node.args[0], list(node.args[1])
    xv = t.val(x)
    return t.b.op("Reshape", [xv, t.reshape_target(x, xv, node, sizes)], node.name)


@register(aten.expand.default)
def _expand(t: Translator, node: fx.Node) -> str:
    x, sizes = node.args[0], list(node.args[1])
    ins = t.shape(x) or []
    offset = len(sizes) - len(ins)
    target: list[Any] = []
    for i, s in enumerate(sizes):
        j = i - offset
        same = j >= 0 and ins and (s == -1 or str(s) == ins[j] or (
            isinstance(s, fx.Node) and t.meta(s) is None and str(s.meta.get("val")) == ins[j]))
        # ONNX Expand broadcasts both ways: 1 keeps the runtime size of the input dim.
        target.append(1 if same or s == -1 else s)
    return t.b.op("Expand", [t.val(x), t.int_list(target)], node.name)


@register(aten.unsqueeze.default)
def _unsqueeze(t: Translator, node: fx.Node) -> str:
    x, d = node.args
    d = d % (t.rank(x) + 1)
    return t.b.op("Unsqueeze", [t.val(x), t.b.const([d])], node.name)


@register(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(t: Translator, node: fx.Node) -> str:
    x, dims = node.args
    dims = [dims] if isinstance(dims, int) else list(dims)
    rank = t.rank(x)
    return t.b.op("Squeeze", [t.val(x), t.b.const([d % rank for d in dims])], node.name)


@register(aten.transpose.int)
def _transpose(t: Translator, node: fx.Node) -> str:
    x, d0, d1 = node.args
    rank = t.rank(x)
    perm = list(range(rank))
    perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    return t.b.op("Transpose", [t.val(x)], node.name, perm=perm)


@register(aten.t.default)
def _t(t: Translator, node: fx.Node) -> str:
    return t.b.op("Transpose", [t.val(node.args[0])], node.name, perm=[1, 0])


@register(aten.permute.default)
def _permute(t: Translator, node: fx.Node) -> str:
    x, dims = node.args
    rank = t.rank(x)
    return t.b.op("Transpose", [t.val(x)], node.name, perm=[d % rank for d in dims])


@register(aten.slice.Tensor)
def _slice(t: Translator, node: fx.Node) -> str:
    a = _args(node, ("self", "dim", "start", "end", "step"),
              {"dim": 0, "start": None, "end": None, "step": 1})
    start = 0 if a["start"] is None else a["start"]
    end = 2**63 - 1 if a["end"] is None else a["end"]
    end = min(end, 2**63 - 1) if isinstance(end, int) else end
    return t.b.op("Slice", [t.val(a["self"]), t.int_list([start]), t.int_list([end]),
                            t.b.const([a["dim"]]), t.b.const([a["step"]])], node.name)


@register(aten.cat.default)
def _cat(t: Translator, node: fx.Node) -> str:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dtype = _out_dtype(t, node, tensors[0])
    return t.b.op("Concat", [t.val(x, dtype) for x in tensors], node.name, axis=dim)


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def _split(t: Translator, node: fx.Node) -> list[str]:
    x = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    vals = node.meta.get("val")
    if not isinstance(vals, (list, tuple)):
        raise UnsupportedGraphError(f"node {node.name}: split without recorded output sizes")
    rank = t.rank(x)
    sizes = [int(v.shape[dim % rank]) for v in vals]
    outs = t.b.op("Split", [t.val(x), t.b.const(sizes)], node.name, outputs=len(sizes),
                  axis=dim)
    return outs if isinstance(outs, list) else [outs]


@register(operator.getitem)
def _getitem(t: Translator, node: fx.Node) -> Any:
    seq, i = node.args
    return t.env[seq][i]


# -- creation --------------------------------------------------------------------------------

@register(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(t: Translator, node: fx.Node) -> str:
    if node.target is aten.arange.default:
        start, end, step = 0, node.args[0], 1
    else:
        start, end = node.args[0], node.args[1]
        step = node.args[2] if len(node.args) > 2 else 1
    dtype = _out_dtype(t, node, end)
    if dtype == torch.int64:
        parts = [t.scalar_int(v) for v in (start, end, step)]
    else:
        parts = [t.b.op("Cast", [t.scalar_int(v)], to=onnx_dtype(dtype))
                 if isinstance(v, fx.Node) else t.b.const(v, _np_dtype(dtype))
                 for v in (start, end, step)]
    return t.b.op("Range", parts, node.name)


def _filled(t: Translator, node: fx.Node, sizes: list[Any], value: Any) -> str:
    dtype = _out_dtype(t, node, value)
    fill = np.array([value], dtype=_np_dtype(dtype))
    from onnx import numpy_helper

    return t.b.op("ConstantOfShape", [t.int_list(sizes)], node.name,
                  value=numpy_helper.from_array(fill))


@register(aten.new_ones.default, aten.new_zeros.default)
def _new_filled(t: Translator, node: fx.Node) -> str:
    value = 1 if node.target is aten.new_ones.default else 0
    return _filled(t, node, list(node.args[1]), value)


@register(aten.ones.default, aten.zeros.default)
def _filled_op(t: Translator, node: fx.Node) -> str:
    return _filled(t, node, list(node.args[0]), 1 if node.target is aten.ones.default else 0)


@register(aten.full.default)
def _full(t: Translator, node: fx.Node) -> str:
    return _filled(t, node, list(node.args[0]), node.args[1])


@register(aten.scalar_tensor.default)
def _scalar_tensor(t: Translator, node: fx.Node) -> str:
    return t.b.const(node.args[0], _np_dtype(_out_dtype(t, node, node.args[0])))


# -- reductions and scans ---------------------------------------------------------------------

@register(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
def _reduce(t: Translator, node: fx.Node) -> str:
    x = node.args[0]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    op = {aten.mean.dim: "ReduceMean", aten.sum.dim_IntList: "ReduceSum",
          aten.amax.default: "ReduceMax"}[node.target]
    dims = [dims] if isinstance(dims, int) else list(dims)
    return t.b.op(op, [t.val(x, _out_dtype(t, node, x)), t.b.const(dims)], node.name,
                  keepdims=int(bool(keep)))


@register(aten.cumsum.default)
def _cumsum(t: Translator, node: fx.Node) -> str:
    x, dim = node.args[0], node.args[1]
    dtype = _out_dtype(t, node, x)
    return t.b.op("CumSum", [t.val(x, dtype), t.b.const(dim)], node.name)


@register(aten.diff.default)
def _diff(t: Translator, node: fx.Node) -> str:
    a = _args(node, ("self", "n", "dim", "prepend", "append"),
              {"n": 1, "dim": -1, "prepend": None, "append": None})
    if a["n"] != 1:
        raise UnsupportedGraphError(f"node {node.name}: diff with n={a['n']} has no lowering")
    dtype = _out_dtype(t, node, a["self"])
    parts = [t.val(p, dtype) for p in (a["prepend"], a["self"], a["append"]) if p is not None]
    x = t.b.op("Concat", parts, axis=a["dim"]) if len(parts) > 1 else parts[0]
    axis = t.b.const([a["dim"]])
    hi = t.b.op("Slice", [x, t.b.const([1]), t.b.const([2**63 - 1]), axis])
    lo = t.b.op("Slice", [x, t.b.const([0]), t.b.const([-1]), axis])
    return t.b.op("Sub", [hi, lo], node.name)


@register(aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
def _softmax(t: Translator, node: fx.Node) -> str:
    x, dim = node.args[0], node.args[1]
    return t.b.op("Softmax", [t.val(x, _out_dtype(t, node, x))], node.name, axis=dim)
