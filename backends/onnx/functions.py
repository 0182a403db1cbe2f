"""Model-local ONNX functions (domain ``qcompile``) whose bodies use only standard ops.

One function is made per distinct configuration (format, row length, inputs present), so
each body is specialised and needs no attributes. Stock ONNX Runtime inlines them; the
``onnx.reference`` evaluator runs them as they are.

* ``DequantizeWeight_*``: packed codes (:mod:`qcompile.formats.packing` layout) and per-group
  parameters to a dense ``[N, K]`` weight, exactly as ``qcompile::dequantize_weight``:
  nibbles split with ``BitwiseAnd``/``BitShift`` (any other width through a bit stream),
  code -> value with ``Gather`` on the element's table (INT codes by arithmetic), group
  scales broadcast per element with ``Gather`` (ragged last group included), and AFPQ's
  negative-side scale selected with ``Where`` on the decoded sign.
* ``QuantizeActivation_*``: dynamic quantize-dequantize along the last dim (per token,
  per group, per tensor) with scales computed as :mod:`qcompile.formats.scales` does; symmetric
  INT8/FP8 per-token bodies are standard blocked ``QuantizeLinear``/``DequantizeLinear``, other
  elements round onto their grid with comparisons against the decision midpoints (ties to the
  even code) and a ``Gather``.
* ``Hadamard_<n>``: ``x @ H_n / sqrt(n)`` per trailing block, as one ``MatMul`` per Kronecker
  factor (Sylvester factors of at most 128 and the Paley base).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.backends.onnx.builder import QC_DOMAIN
from qcompile.errors import FormatError
from qcompile.formats import FormatSpec
from qcompile.formats.elements import _lookup
from qcompile.hadamard import hadamard_base, hadamard_factors, hadamard_matrix

__all__ = [
    "activation_function",
    "dequant_weight_function",
    "format_tag",
    "hadamard_function",
]

_ACT_SCALES = ("fp32", "bf16", "fp16")


def format_tag(text: str) -> str:
    """A format's text as an identifier fragment: ``fp4_e2m1/g128/asym`` -> ``fp4_e2m1_g128_asym``."""
    return "".join(c if c.isalnum() else "_" for c in text)


class _Body:
    """Collects the nodes of a function body with local value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        self._n += 1
        out = f"t{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def const(self, value: object, dtype: object = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], value=numpy_helper.from_array(arr))

    def out(self, value: str, name: str) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name]))


def _function(name: str, inputs: list[str], outputs: list[str], body: _Body) -> onnx.FunctionProto:
    # The standard opset is set when the model is assembled (it depends on the whole model).
    return helper.make_function(QC_DOMAIN, name, inputs, outputs, body.nodes,
                                opset_imports=[helper.make_opsetid("", 18)])


# -- grids --------------------------------------------------------------------------------------

def _round_to_grid(f: _Body, y: str, elem: str) -> str:
    """Round fp32 ``y`` onto ``elem``'s grid (round to nearest, ties to the even code, saturating)."""
    lut = _lookup(elem, _cpu())
    points = lut.points.numpy().astype(np.float32)
    mids = lut.mids.numpy().astype(np.float32)
    a = f.op("Abs", [y]) if lut.signed else y
    a = f.op("Clip", [a, f.const(lut.lo), f.const(lut.hi)])
    a = f.op("Unsqueeze", [a, f.const([-1], np.int64)])
    # the code index is the number of midpoints passed; an exact tie at midpoint i goes up
    # (to the even code) when the lower point's index i is odd
    up = f.op("Concat", [f.op("GreaterOrEqual", [a, f.const(mids[1::2])]),
                         f.op("Greater", [a, f.const(mids[0::2])])], axis=-1)
    idx = f.op("ReduceSum", [f.op("Cast", [up], to=TensorProto.INT64),
                             f.const([-1], np.int64)], keepdims=0)
    v = f.op("Gather", [f.const(points), idx], axis=0)
    if lut.signed:
        v = f.op("Where", [f.op("Less", [y, f.const(0.0)]), f.op("Neg", [v]), v])
    return v


def _cpu():
    import torch

    return torch.device("cpu")


# -- weights ------------------------------------------------------------------------------------

def _unpack(f: _Body, packed: str, bits: int, k: int) -> str:
    """int64 codes ``[N, k]`` from packed uint8 rows ``[N, ceil(k * bits / 8)]``."""
    keep_n = f.const([0, -1], np.int64)
    if bits == 8:
        return f.op("Cast", [packed], to=TensorProto.INT64)
    last = f.const([-1], np.int64)
    if bits == 4:
        lo = f.op("BitwiseAnd", [packed, f.const(15, np.uint8)])
        hi = f.op("BitShift", [packed, f.const(4, np.uint8)], direction="RIGHT")
        pairs = f.op("Concat", [f.op("Unsqueeze", [lo, last]), f.op("Unsqueeze", [hi, last])],
                     axis=-1)
        flat = f.op("Reshape", [pairs, keep_n])
        codes = f.op("Slice", [flat, f.const([0], np.int64), f.const([k], np.int64),
                               f.const([1], np.int64)])
        return f.op("Cast", [codes], to=TensorProto.INT64)
    shifts = f.const(np.arange(8), np.uint8)
    stream = f.op("BitwiseAnd", [f.op("BitShift", [f.op("Unsqueeze", [packed, last]), shifts],
                                      direction="RIGHT"), f.const(1, np.uint8)])
    stream = f.op("Slice", [f.op("Reshape", [stream, keep_n]), f.const([0], np.int64),
                            f.const([k * bits], np.int64), f.const([1], np.int64)])
    stream = f.op("Cast", [f.op("Reshape", [stream, f.const([0, k, bits], np.int64)])],
                  to=TensorProto.INT64)
    weights = f.const(1 << np.arange(bits), np.int64)
    return f.op("ReduceSum", [f.op("Mul", [stream, weights]), last], keepdims=0)


def _expand_groups(f: _Body, s: str, spec: FormatSpec, k: int) -> str:
    if spec.granularity != "group":
        return s
    idx = np.arange(k, dtype=np.int64) // spec.group_size
    if k % spec.group_size == 0:
        # [N, G] -> [N, G, g] -> [N, K]: no index constant needed
        g = spec.group_size
        tiled = f.op("Expand", [f.op("Unsqueeze", [s, f.const([-1], np.int64)]),
                                f.const([1, 1, g], np.int64)])
        return f.op("Reshape", [tiled, f.const([0, k], np.int64)])
    return f.op("Gather", [s, f.const(idx, np.int64)], axis=1)


def dequant_weight_function(spec: FormatSpec, k: int, *, has_neg: bool, has_zero: bool,
                            has_outer: bool) -> onnx.FunctionProto:
    """``DequantizeWeight_<format>_k<k>``: (packed, scale[, scale_neg][, zero][, outer]) -> fp32 ``[N, k]``."""
    f = _Body()
    inputs = ["packed", "scale"] + (["scale_neg"] if has_neg else []) + \
        (["zero"] if has_zero else []) + (["outer"] if has_outer else [])
    codes = _unpack(f, "packed", spec.bits, k)
    info = spec.element
    if info.kind == "int":
        c = f.op("Cast", [codes], to=TensorProto.FLOAT)
        v = (f.op("Sub", [c, _expand_groups(f, "zero", spec, k)]) if has_zero
             else f.op("Add", [c, f.const(info.min)]))
    else:
        v = f.op("Gather", [f.const(np.array(info.values, dtype=np.float32)), codes], axis=0)
    e = f.op("Mul", ["scale", "outer"]) if has_outer else "scale"
    e = _expand_groups(f, e, spec, k)
    w = f.op("Mul", [v, e])
    if has_neg:
        en = f.op("Mul", ["scale_neg", "outer"]) if has_outer else "scale_neg"
        en = _expand_groups(f, en, spec, k)
        w = f.op("Where", [f.op("Less", [v, f.const(0.0)]), f.op("Mul", [v, en]), w])
    f.out(w, "weight")
    name = f"DequantizeWeight_{format_tag(str(spec))}_k{k}" + ("_zero" if has_zero else "")
    return _function(name, inputs, ["weight"], f)


# -- activations --------------------------------------------------------------------------------

def _constrain(f: _Body, r: str, spec: FormatSpec) -> str:
    """The scale rule for activations (fp32/bf16/fp16), zero scales replaced by 1."""
    s = r
    if spec.scale in ("bf16", "fp16"):
        big = 3.3895313892515355e38 if spec.scale == "bf16" else 65504.0
        to = TensorProto.BFLOAT16 if spec.scale == "bf16" else TensorProto.FLOAT16
        s = f.op("Cast", [f.op("Cast", [f.op("Min", [r, f.const(big)])], to=to)],
                 to=TensorProto.FLOAT)
    zero, one = f.const(0.0), f.const(1.0)
    s = f.op("Where", [f.op("Greater", [r, zero]), s, zero])
    return f.op("Where", [f.op("Greater", [s, zero]), s, one])


def _reduce(f: _Body, op: str, x: str, spec: FormatSpec) -> str:
    if spec.granularity == "tensor":
        return f.op(op, [x], keepdims=1)
    return f.op(op, [x, f.const([-1], np.int64)], keepdims=1)


def activation_function(spec: FormatSpec, k: int) -> onnx.FunctionProto:
    """``QuantizeActivation_<format>_k<k>``: dynamic quantize-dequantize of ``x [..., k]``.

    Raises:
        FormatError: The format's scale type or grouping has no ONNX lowering.
    """
    if spec.scale not in _ACT_SCALES:
        raise FormatError(
            f"activation format {spec} has no ONNX lowering: dynamic activation scales "
            f"must be one of {', '.join(_ACT_SCALES)}, not {spec.scale}"
        )
    if spec.granularity == "group" and k % spec.group_size:
        raise FormatError(
            f"activation format {spec} has no ONNX lowering for rows of {k}: dynamic "
            f"activation groups must divide the row"
        )
    f = _Body()
    x = "x"
    if spec.granularity == "group":
        lead = f.op("Shape", [x], end=-1)
        groups = f.const([k // spec.group_size, spec.group_size], np.int64)
        x = f.op("Reshape", [x, f.op("Concat", [lead, groups], axis=0)])
    info = spec.element
    clip = spec.clip
    hi = f.op("Max", [_reduce(f, "ReduceMax", x, spec), f.const(0.0)])
    lo = f.op("Max", [f.op("Neg", [_reduce(f, "ReduceMin", x, spec)]), f.const(0.0)])
    if clip != 1.0:
        hi, lo = (f.op("Mul", [t, f.const(clip)]) for t in (hi, lo))
    if info.kind == "int" and spec.asym:
        levels = float((1 << info.bits) - 1)
        s = _constrain(f, f.op("Div", [f.op("Add", [hi, lo]), f.const(levels)]), spec)
        z = f.op("Clip", [f.op("Round", [f.op("Div", [lo, s])]), f.const(0.0), f.const(levels)])
        q = f.op("Clip", [f.op("Add", [f.op("Round", [f.op("Div", [x, s])]), z]),
                          f.const(0.0), f.const(levels)])
        y = f.op("Mul", [f.op("Sub", [q, z]), s])
    elif spec.asym:
        pos = _constrain(f, f.op("Div", [hi, f.const(info.max)]), spec)
        neg = _constrain(f, f.op("Div", [lo, f.const(-info.min)]), spec)
        negative = f.op("Less", [x, f.const(0.0)])
        v = _round(f, f.op("Where", [negative, f.op("Div", [x, neg]), f.op("Div", [x, pos])]),
                   spec)
        y = f.op("Where", [f.op("Less", [v, f.const(0.0)]), f.op("Mul", [v, neg]),
                          f.op("Mul", [v, pos])])
    else:
        s = _constrain(f, f.op("Div", [f.op("Max", [hi, lo]), f.const(info.max)]), spec)
        if spec.elem in ("int8", "fp8_e4m3", "fp8_e5m2") and spec.granularity != "group":
            to = {"int8": TensorProto.INT8, "fp8_e4m3": TensorProto.FLOAT8E4M3FN,
                  "fp8_e5m2": TensorProto.FLOAT8E5M2}[spec.elem]
            attrs: dict[str, int] = {}
            if spec.granularity == "tensor":
                s = f.op("Reshape", [s, f.const([], np.int64)])
            else:
                attrs = {"axis": -1, "block_size": k}
            q = f.op("QuantizeLinear", [x, s], output_dtype=to, **attrs)
            y = f.op("DequantizeLinear", [q, s], **attrs)
        elif info.kind == "int":
            y = f.op("Mul", [f.op("Clip", [f.op("Round", [f.op("Div", [x, s])]),
                                           f.const(info.min), f.const(info.max)]), s])
        else:
            y = f.op("Mul", [_round(f, f.op("Div", [x, s]), spec), s])
    if spec.granularity == "group":
        y = f.op("Reshape", [y, f.op("Shape", ["x"])])
    f.out(y, "y")
    return _function(f"QuantizeActivation_{format_tag(str(spec))}_k{k}", ["x"], ["y"], f)


def _round(f: _Body, y: str, spec: FormatSpec) -> str:
    if spec.elem in ("fp8_e4m3", "fp8_e5m2"):
        to = TensorProto.FLOAT8E4M3FN if spec.elem == "fp8_e4m3" else TensorProto.FLOAT8E5M2
        return f.op("Cast", [f.op("Cast", [y], to=to, saturate=1)], to=TensorProto.FLOAT)
    return _round_to_grid(f, y, spec.elem)


# -- Hadamard -----------------------------------------------------------------------------------

def hadamard_function(size: int) -> onnx.FunctionProto:
    """``Hadamard_<size>``: ``x @ H_size / sqrt(size)`` over each trailing block of ``size``.

    Raises:
        FormatError: ``size`` has no Hadamard construction.
    """
    factors = hadamard_factors(size)
    if factors is None:
        raise FormatError(f"qcompile::hadamard size {size} has no Hadamard construction")
    pow2, m = factors
    sizes = []
    while pow2 > 1:
        sizes.append(min(pow2, 128))
        pow2 //= sizes[-1]
    if m > 1:
        sizes.append(m)
    f = _Body()
    y = f.op("Reshape", ["x", f.const([-1, *sizes], np.int64)])
    rank = len(sizes) + 1
    for axis, n in enumerate(sizes, start=1):
        if n == m and axis == len(sizes) and m > 1:
            h = (hadamard_base(m).double() / math.sqrt(m)).float().numpy()
        else:
            h = hadamard_matrix(n).float().numpy()
        hc = f.const(h)
        if axis == rank - 1:
            y = f.op("MatMul", [y, hc])
        else:
            perm = list(range(rank))
            perm[axis], perm[-1] = perm[-1], perm[axis]
            y = f.op("Transpose", [f.op("MatMul", [f.op("Transpose", [y], perm=perm), hc])],
                     perm=perm)
    f.out(f.op("Reshape", [y, f.op("Shape", ["x"])]), "y")
    return _function(f"Hadamard_{size}", ["x"], ["y"], f)
