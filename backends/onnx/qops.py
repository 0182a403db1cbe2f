"""Lowering of ``qcompile::`` ops and of linears that read a quantized weight.

``aten.linear(x, W, b)`` becomes ``MatMul(x, W^T) (+ b)``; which ONNX value stands for
``W^T`` depends on how ``W`` is stored:

1. a plain attribute: a transposed initializer (a ``Transpose`` node when the attribute is
   also read elsewhere, e.g. a tied embedding, so its bytes are stored once);
2. ``qcompile::dequantize_weight`` of an INT4 format with groups of a power of two >= 16 or
   per-channel scales, and ``int4="matmulnbits"``: one ``com.microsoft.MatMulNBits``
   replaces the MatMul (the K tail of a ragged row is padded to the block with codes that
   decode to zero; a channel scale repeats over blocks of 128); weight-only INT8 the same
   way with an 8-bit MatMulNBits (``int8="matmulnbits"``);
3. INT8 of W8A8 linears (and INT4/INT8 with ``"dq"``) and symmetric FP8 weights: a standard
   ``DequantizeLinear`` of a ``[K, N]`` initializer, per channel (axis 1) or blocked along K
   (axis 0, ``ceil(K / g)`` scales per column);
4. FP4 E2M1 (symmetric or AFPQ) with groups of a power of two >= 16 and
   ``fp4="matmulnbits"``: two 4-bit MatMulNBits whose outputs add up. E2M1 values times 2
   are the integers {0, 1, 2, 3, 4, 6, 8, 12} (and negatives), so the positive half
   ``2 max(v, 0)`` is a 4-bit code with zero point 0 and scale ``s_pos / 2``, the negative
   half ``12 + 2 min(v, 0)`` a 4-bit code with zero point 12 and scale ``s_neg / 2``; both
   reproduce the weight exactly (``s / 2`` and ``2 v`` are exact);
5. symmetric FP4 E2M1 with ``fp4="dq"``: opset-23 ``DequantizeLinear`` of FLOAT4E2M1;
6. everything else (FP4, AFPQ, NF4, po2/m2/e8m0/e4m3 scales, odd INT widths): the model-local
   ``qcompile.DequantizeWeight_*`` function, then a ``Transpose``.

Activation ops: ``quantize_activation_static`` is a standard ``QuantizeLinear`` ->
``DequantizeLinear`` pair (per-tensor scale); ``quantize_activation`` is a
``qcompile.QuantizeActivation_*`` function; ``hadamard`` is ``qcompile.Hadamard_<n>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from onnx import TensorProto
from torch import fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.backends.onnx.builder import MS_DOMAIN, QC_DOMAIN
from qcompile.backends.onnx.functions import (
    activation_function,
    dequant_weight_function,
    hadamard_function,
)
from qcompile.backends.onnx.translate import Translator, _LazyAttr
from qcompile.errors import FormatError, UnsupportedGraphError
from qcompile.formats import FormatSpec, parse_format, unpack_codes
from qcompile.graph import get_attr_value

__all__ = ["QOP_HANDLERS", "linear"]

qc = torch.ops.qcompile
_DQ_ELEMS = {"int8": (TensorProto.INT8, TensorProto.UINT8),
             "int4": (TensorProto.INT4, TensorProto.UINT4)}
_FP8 = {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "fp8_e5m2": TensorProto.FLOAT8E5M2}


class _QWeight:
    """The tensors and format of one ``dequantize_weight`` node (all attributes)."""

    def __init__(self, t: Translator, node: fx.Node) -> None:
        args = list(node.args) + [None] * (8 - len(node.args))
        tensors = []
        for a in args[:5]:
            if a is None:
                tensors.append(None)
            elif isinstance(a, fx.Node) and a.op == "get_attr":
                tensors.append(get_attr_value(t.gm, str(a.target)).detach().cpu())
            else:
                raise UnsupportedGraphError(
                    f"node {node.name}: dequantize_weight reads a computed tensor "
                    f"({a}); ONNX export needs stored weights"
                )
        self.packed, self.scale, self.scale_neg, self.zero, self.outer = tensors
        self.args = args[:5]
        self.spec: FormatSpec = parse_format(args[5])
        self.k: int = int(args[6])
        self.dtype: torch.dtype = args[7] or torch.float32
        self.node = node
        self.n = int(self.packed.shape[0])
        if self.packed.dim() != 2:
            raise UnsupportedGraphError(f"node {node.name}: ONNX export needs 2-D weights")
        self.name = node.meta.get("source_module") or node.name

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes ``[N, K]``."""
        return unpack_codes(self.packed, self.spec.bits, self.k)

    def effective(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-group scales times the outer scale, fp32 (the product the reference takes)."""
        s, sn = self.scale.float(), self.scale_neg
        if self.outer is not None:
            s = s * self.outer.float()
            sn = None if sn is None else sn.float() * self.outer.float()
        return s.numpy(), None if sn is None else sn.float().numpy()


def _pack_nibbles(values: np.ndarray) -> bytes:
    """Pack 4-bit values (flattened, low nibble first) as ONNX INT4/UINT4 raw data."""
    flat = (values.reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _raw_tensor(name: str, dtype: int, dims: list[int], raw: bytes) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = dtype
    tensor.dims.extend(dims)
    tensor.raw_data = raw
    return tensor


def _block_ok(spec: FormatSpec) -> bool:
    g = spec.group_size or 0
    return spec.granularity == "group" and g >= 16 and g & (g - 1) == 0


def nbits_block(spec: FormatSpec, k: int, at_most: int | None = None) -> int | None:
    """MatMulNBits ``block_size`` for a weight format, or None if it has no such layout.

    Groups of a power of two >= 16 are the blocks; a per-channel scale is the same scale
    repeated over blocks of 128 (fewer for short rows), which is exact. ``at_most`` (a power
    of two >= 16) splits larger blocks, repeating their scales and zero points (exact too).
    """
    if _block_ok(spec):
        block = int(spec.group_size)
    elif spec.granularity == "channel":
        block = max(16, min(128, 1 << max(k - 1, 1).bit_length()))
    else:
        return None
    return min(block, at_most) if at_most else block


def _scale_layout(q: _QWeight, scale: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Scales for a DequantizeLinear of the transposed ``[K, N]`` weight, and its attributes."""
    spec = q.spec
    if spec.granularity == "tensor":
        return scale.reshape(()), {}
    if spec.granularity == "channel":
        return scale.reshape(q.n), {"axis": 1}
    return np.ascontiguousarray(scale.T), {"axis": 0, "block_size": int(spec.group_size)}


def _dq_weight(t: Translator, q: _QWeight) -> str:
    """``[K, N]`` fp32 weight from a standard DequantizeLinear (INT8, INT4, symmetric FP8/FP4)."""
    spec = q.spec
    scale, _ = q.effective()
    scale, attrs = _scale_layout(q, scale)
    codes = q.codes().numpy().astype(np.int64).T  # [K, N]
    dims = [q.k, q.n]
    zero = None
    if spec.elem in _DQ_ELEMS:
        signed, unsigned = _DQ_ELEMS[spec.elem]
        if q.zero is None:
            values, dtype = codes + int(spec.element.min), signed
        else:
            values, dtype = codes, unsigned
            z, _ = _scale_layout(q, q.zero.float().numpy())
            zero = z.astype(np.int64)
        if spec.bits == 4:
            t.b.require(21, "INT4/UINT4 DequantizeLinear")
            w = _raw_tensor("w", dtype, dims, _pack_nibbles(values))
            if zero is not None:
                zero = _raw_tensor("z", dtype, list(zero.shape), _pack_nibbles(zero))
        else:
            npdt = np.int8 if dtype == TensorProto.INT8 else np.uint8
            w = values.astype(npdt)
            if zero is not None:
                zero = zero.astype(npdt)
    elif spec.elem in _FP8:
        t.b.require(19, "FP8 DequantizeLinear")
        w = _raw_tensor("w", _FP8[spec.elem], dims, codes.astype(np.uint8).tobytes())
    else:  # fp4_e2m1, symmetric
        t.b.require(23, "FLOAT4E2M1 DequantizeLinear")
        w = _raw_tensor("w", TensorProto.FLOAT4E2M1, dims, _pack_nibbles(codes))
    if "block_size" in attrs:
        t.b.require(21, "blocked DequantizeLinear")
    inputs = [t.b.initializer(f"{q.name}.qweight", w),
              t.b.initializer(f"{q.name}.scale", scale.astype(np.float32))]
    if zero is not None:
        inputs.append(t.b.initializer(f"{q.name}.zero_point", zero))
    return t.b.op("DequantizeLinear", inputs, f"{q.name}.weight_t", **attrs)


def _function_weight(t: Translator, q: _QWeight) -> str:
    """``[N, K]`` weight from the model-local DequantizeWeight function."""
    fn = dequant_weight_function(q.spec, q.k, has_neg=q.scale_neg is not None,
                                 has_zero=q.zero is not None, has_outer=q.outer is not None)
    t.b.add_function(fn)
    inputs = [t.b.initializer(f"{q.name}.qweight", q.packed.numpy()),
              t.b.initializer(f"{q.name}.scale", q.scale.float().numpy())]
    for extra, label in ((q.scale_neg, "scale_neg"), (q.zero, "zero"), (q.outer, "outer")):
        if extra is not None:
            inputs.append(t.b.initializer(f"{q.name}.{label}", extra.float().numpy()))
    w = t.b.op(fn.name, inputs, f"{q.name}.weight", domain=QC_DOMAIN)
    if q.dtype != torch.float32:
        from qcompile.backends.onnx.builder import onnx_dtype

        w = t.b.op("Cast", [w], to=onnx_dtype(q.dtype))
    return w


def _lowering(t: Translator, q: _QWeight) -> str:
    """Which lowering a quantized weight gets: ``nbits``, ``dq`` or ``function``."""
    spec = q.spec
    plain_scale = spec.scale in ("fp32", "bf16", "fp16", "po2", "m2")
    if spec.kind == "int" and spec.bits == 4 and plain_scale:
        if t.options.int4 == "matmulnbits" and nbits_block(spec, q.k):
            return "nbits"
        return "dq"
    if spec.kind == "int" and spec.bits == 8:
        if t.options.int8 == "matmulnbits" and plain_scale and nbits_block(spec, q.k):
            return "nbits"
        return "dq"
    if spec.elem in _FP8 and not spec.asym:
        return "dq"
    if spec.elem == "fp4_e2m1" and t.options.fp4 == "matmulnbits" and _block_ok(spec):
        return "fp4nbits"
    if spec.elem == "fp4_e2m1" and not spec.asym and t.options.fp4 == "dq":
        return "dq"
    return "function"


def _nbits_node(t: Translator, q: _QWeight, x: str, codes: np.ndarray, zero: np.ndarray,
                scale: np.ndarray, label: str, bits: int = 4) -> str:
    """One 4- or 8-bit MatMulNBits from codes ``[N, K]``, per-block zero points and scales
    (``[N, blocks]``, or ``[N, 1]`` for a per-channel format: repeated over the blocks)."""
    bs = nbits_block(q.spec, q.k, t.options.nbits_block)
    blocks = -(-q.k // bs)
    if scale.shape[-1] != blocks:  # per channel, or groups split into smaller blocks
        group = q.k if scale.shape[-1] == 1 else int(q.spec.group_size)
        owner = np.minimum(np.arange(blocks) * bs // group, scale.shape[-1] - 1)
        scale, zero = scale.reshape(q.n, -1)[:, owner], zero.reshape(q.n, -1)[:, owner]
    padded = np.zeros((q.n, blocks * bs), dtype=np.uint8)
    padded[:, : q.k] = codes
    # the K tail (ragged last block) decodes to exactly zero: code = the block's zero point
    padded[:, q.k:] = zero[:, -1:]
    if bits == 4:
        pairs = padded.reshape(q.n, -1, 2)
        b = (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(q.n, blocks, bs // 2)
        zpad = np.concatenate([zero, np.zeros((q.n, blocks % 2), np.uint8)], axis=1)
        zp = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).reshape(-1)
    else:
        b, zp = padded.reshape(q.n, blocks, bs), zero.astype(np.uint8).reshape(-1)
    inputs = [x, t.b.initializer(f"{q.name}.qweight{label}", b),
              t.b.initializer(f"{q.name}.scales{label}", scale.astype(np.float32).reshape(-1)),
              t.b.initializer(f"{q.name}.zero_points{label}", zp)]
    return t.b.op("MatMulNBits", inputs, f"{q.name}.matmul{label}", domain=MS_DOMAIN, K=q.k,
                  N=q.n, bits=bits, block_size=bs, accuracy_level=t.options.accuracy_level)


def _matmul_nbits(t: Translator, q: _QWeight, x: str) -> str:
    scale, _ = q.effective()
    codes = q.codes().numpy().astype(np.uint8)
    blocks = scale.shape[-1]
    if q.zero is None:  # symmetric: the code of 0 is -min (8 for INT4, 128 for INT8)
        zero = np.full((q.n, blocks), -int(q.spec.element.min), dtype=np.uint8)
    else:
        zero = q.zero.float().numpy().astype(np.uint8)
    return _nbits_node(t, q, x, codes, zero, scale, "", bits=q.spec.bits)


def _matmul_fp4_nbits(t: Translator, q: _QWeight, x: str) -> str:
    """FP4 E2M1 weights as the sum of two exact 4-bit MatMulNBits (positive, negative half)."""
    pos, neg = q.effective()
    neg = pos if neg is None else neg
    twice = np.rint(np.asarray(q.spec.element.values, dtype=np.float64) * 2).astype(np.int64)
    v2 = twice[q.codes().numpy().astype(np.int64)]  # 2 * value: integers in [-12, 12]
    blocks = pos.shape[-1]
    hi = _nbits_node(t, q, x, np.maximum(v2, 0).astype(np.uint8),
                     np.zeros((q.n, blocks), np.uint8), pos / 2, ".pos")
    lo = _nbits_node(t, q, x, (12 + np.minimum(v2, 0)).astype(np.uint8),
                     np.full((q.n, blocks), 12, np.uint8), neg / 2, ".neg")
    return t.b.op("Add", [hi, lo], f"{q.name}.matmul")


def _weight_t(t: Translator, w: fx.Node) -> str:
    """The ``[K, N]`` ONNX value of a linear's weight (plain attribute or dequantized)."""
    value = t.env[w]
    if isinstance(value, _LazyAttr):
        if t.attr_uses.get(value.target, 0) > 1 or _read_elsewhere(t, value.target):
            return t.b.op("Transpose", [t.weight(value.target)], perm=[1, 0])
        return t.weight(value.target, "T")
    if isinstance(value, _DeferredWeight):
        return value.transposed(t)
    return t.b.op("Transpose", [t.val(w)], perm=[1, 0])


def _read_elsewhere(t: Translator, target: str) -> bool:
    return any(n.op == "get_attr" and str(n.target) != target and
               get_attr_value(t.gm, str(n.target)) is get_attr_value(t.gm, target)
               for n in t.gm.graph.nodes)


def linear(t: Translator, node: fx.Node) -> str:
    """``aten.linear(x, W, b)`` -> ``MatMul`` / ``MatMulNBits`` (+ ``Add``)."""
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    value = t.env.get(w)
    if isinstance(value, _DeferredWeight) and value.lowering == "nbits":
        y = _matmul_nbits(t, value.q, t.val(x))
    elif isinstance(value, _DeferredWeight) and value.lowering == "fp4nbits":
        y = _matmul_fp4_nbits(t, value.q, t.val(x))
    else:
        y = t.b.op("MatMul", [t.val(x), _weight_t(t, w)], node.name)
    if bias is not None:
        y = t.b.op("Add", [y, t.val(bias)], node.name + ".bias")
    return y


class _DeferredWeight:
    """A dequantized weight emitted on first use: transposed for linears, as is otherwise."""

    def __init__(self, t: Translator, q: _QWeight) -> None:
        self.q = q
        self.lowering = _lowering(t, q)
        self._t: str | None = None
        self._plain: str | None = None

    def transposed(self, t: Translator) -> str:
        if self._t is None:
            if self.lowering in ("dq", "nbits"):
                self._t = _dq_weight(t, self.q) if _dq_possible(self.q) else \
                    t.b.op("Transpose", [self.plain(t)], perm=[1, 0])
            else:
                self._t = t.b.op("Transpose", [self.plain(t)], perm=[1, 0])
        return self._t

    def plain(self, t: Translator) -> str:
        if self._plain is None:
            self._plain = _function_weight(t, self.q)
        return self._plain


def _dq_possible(q: _QWeight) -> bool:
    return q.spec.elem in _DQ_ELEMS or q.spec.elem in _FP8 or q.spec.elem == "fp4_e2m1"


def _dequantize_weight(t: Translator, node: fx.Node) -> Any:
    q = _QWeight(t, node)
    deferred = _DeferredWeight(t, q)
    for user in node.users:
        if user.target is not torch.ops.aten.linear.default or user.args[1] is not node:
            # a non-linear reader needs the dense weight itself
            if deferred.lowering == "nbits":
                deferred.lowering = "dq"
            elif deferred.lowering == "fp4nbits":
                deferred.lowering = "function"
        elif q.spec.bits == 8 and deferred.lowering == "nbits" and _quantized_input(user):
            deferred.lowering = "dq"  # W8A8: keep the QDQ pair ORT fuses into integer GEMMs
    t.dtypes[node] = q.dtype
    t.ranks[node] = 2
    return deferred


def _quantized_input(linear: fx.Node) -> bool:
    x = linear.args[0]
    return isinstance(x, fx.Node) and x.target in (qc.quantize_activation.default,
                                                   qc.quantize_activation_static.default)


def _quantize_activation(t: Translator, node: fx.Node) -> str:
    x, fmt = node.args
    spec = parse_format(fmt)
    shape = t.shape(x)
    if shape is None or not shape[-1].isdigit():
        raise UnsupportedGraphError(f"node {node.name}: activation quantize needs a static "
                                    "last dim")
    k = int(shape[-1])
    if spec.granularity in ("token", "channel") and spec.elem in ("int8", "fp8_e4m3",
                                                                  "fp8_e5m2"):
        t.b.require(21, "blocked QuantizeLinear (per-token INT8/FP8 activations)")
    elif spec.granularity == "tensor" and spec.elem.startswith("fp8"):
        t.b.require(19, "FP8 QuantizeLinear")
    fn = activation_function(spec, k)
    t.b.add_function(fn)
    t.dtypes[node] = t.dtype(x)
    t.ranks[node] = t.rank(x)
    return t.b.op(fn.name, [t.val(x)], node.name, domain=QC_DOMAIN)


def _quantize_activation_static(t: Translator, node: fx.Node) -> str:
    x, scale, fmt = node.args
    spec = parse_format(fmt)
    if spec.elem == "int8":
        zp = t.b.const(0, np.int8)
    elif spec.elem in _FP8:
        t.b.require(19, "FP8 QuantizeLinear")
        zp = t.b.initializer("zero_fp8", _raw_tensor("z", _FP8[spec.elem], [], b"\x00"))
    else:
        raise FormatError(
            f"node {node.name}: static activation format {spec} has no ONNX lowering "
            f"(int8/tensor and fp8_e4m3/tensor, fp8_e5m2/tensor have one)"
        )
    s = t.b.op("Reshape", [t.val(scale, torch.float32), t.b.const([], np.int64)])
    q = t.b.op("QuantizeLinear", [t.val(x), s, zp], node.name + ".q")
    t.dtypes[node] = t.dtype(x)
    t.ranks[node] = t.rank(x)
    return t.b.op("DequantizeLinear", [q, s, zp], node.name)


def _hadamard(t: Translator, node: fx.Node) -> str:
    x, size = node.args
    fn = hadamard_function(int(size))
    t.b.add_function(fn)
    t.dtypes[node] = t.dtype(x)
    t.ranks[node] = t.rank(x)
    return t.b.op(fn.name, [t.val(x)], node.name, domain=QC_DOMAIN)


QOP_HANDLERS = {
    qc.dequantize_weight.default: _dequantize_weight,
    qc.quantize_activation.default: _quantize_activation,
    qc.quantize_activation_static.default: _quantize_activation_static,
    qc.hadamard.default: _hadamard,
}
