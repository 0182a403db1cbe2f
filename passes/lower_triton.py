"""Lower qcompile Q/DQ + linear chains to the fused Triton ops of ``qcompile.backends.triton``.

Patterns (weights are ``qcompile::dequantize_weight`` of attribute reads, as ``quantize``
leaves them):

* W4A16: ``linear(x, dequantize_weight(4-bit fmt))`` with ``x`` not quantized
  -> ``qcompile::w4a16_linear`` (FP4, AFPQ, INT4 sym/asym, NF4; groups or per channel;
  ragged groups).
* W8A16: the same with an 8-bit weight (INT8 sym/asym with integer zero points, FP8
  E4M3/E5M2; one scale per group or channel) -> ``qcompile::w8a16_linear``.
* W8A8 FP8: ``linear(quantize_activation(x, fp8_e4m3/token), dequantize_weight(fp8_e4m3/channel))``
  -> ``qcompile::quantize_rows`` (one per activation, shared by sibling linears) +
  ``qcompile::fp8_linear``.
* W4A8 (ZeroQuant-FP): the same with an FP4 ``po2``/``m2`` weight -> ``qcompile::w4a8_linear``;
  scales must allow an exact FP4 -> FP8 exponent shift.
* A ``qcompile::hadamard`` read only by the activation quantize folds into
  ``quantize_rows`` (``had_size``).
* Activation Q/DQ left over (W4A4, KV cache, unsupported linears) in a format the fused
  quantize kernel handles -> ``qcompile::hadamard_quantize`` (with the Hadamard folded in
  the same way, or size 0).
* An RMSNorm (no offset, optional gamma) read only by an activation quantize folds into
  either op (``rms_weight``/``rms_eps``) once a probe shows the op's reference RMSNorm gives
  the graph's own bits; otherwise it stays and is reported.
* A SiLU gate ``silu(a) * b`` read only by such an activation quantize folds into
  ``quantize_rows`` (``up=b``, option ``gate``): the quantize kernel computes it per row.
* Decode attention (``attention``): an SDPA of one query row per head (a decode step) over
  keys/values that a GQA head repeat (``repeat_kv``) or ``enable_gqa`` spreads over the query
  heads -> ``qcompile::decode_attention`` on the cache as it is (no repeated copy; on CUDA
  one kernel reads each kv head once, :mod:`qcompile.backends.triton.decode_attention`),
  taking in the query's rotary embedding when the SDPA alone reads it (``attention_rope``)
  and the step's KV-cache writes (``index_copy_`` of the new rows, with the key's rotary
  embedding) when nothing else touches the caches (``attention_write``:
  ``qcompile::decode_attention_write`` updates them in place; a static cache's per-layer
  position counters, read only by those writes, are then bumped together at the graph's end,
  ``attention_counters``: :mod:`qcompile.passes.lower_triton_attention`).
  Dropout, ``is_causal`` and masks that are neither boolean nor float stay and are reported.
* Decode fusions (``decode_fusion``): a ``w4a16_linear`` or ``w8a16_linear`` whose input is
  statically one row (a decode step's graph) takes in the RMSNorm (checked by the same probe) or the
  ``silu(a) * b`` that feeds it, and it or a one-row ``w4a8_linear`` the residual ``add``
  that is its only reader: the batch-1 GEMV does them in the kernel
  (:mod:`qcompile.backends.triton.gemv_fusion`), saving a launch each. Graphs with more rows
  keep them as Inductor's element-wise kernels.

Everything else stays on the reference ops; the report lists each such linear or activation
and why. On the CPU the fused ops run the exact reference composition, so lowering never
changes a CPU result; on CUDA they launch the kernels.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

import qcompile.backends.triton.ops  # noqa: F401  (registers the fused ops)
from qcompile.backends.triton.ops import rms_norm
from qcompile.backends.triton.runtime import triton_available
from qcompile.backends.triton.scales import W4A8ScaleError, w4a8_split_scales
from qcompile.graph import get_attr_value, propagate_fake, set_attr_value, unique_attr_name
from qcompile.ops import spec_of
from qcompile.pass_base import Pass, PassResult
from qcompile.passes.lower_triton_attention import lower_decode_attention
from qcompile.patterns import Norm, find_norms
from qcompile.registry import register_pass

__all__ = ["LowerTritonOptions", "LowerTritonPass"]

log = logging.getLogger(__name__)

_q = torch.ops.qcompile
_DEQUANT = _q.dequantize_weight.default
_QACT = _q.quantize_activation.default
_HADAMARD = _q.hadamard.default
_LINEAR = torch.ops.aten.linear.default
_ROWS_FMT = "fp8_e4m3/token"
_W4_ELEMS = ("fp4_e2m1", "int4", "nf4")
_W8_ELEMS = ("int8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class LowerTritonOptions:
    """Options of ``lower-triton``: which kernel families to use.

    Attributes:
        w4a16: 4-bit weight-only linears.
        w8a16: 8-bit weight-only linears (an 8-bit output head of a W4 model, W8A16).
        fp8: W8A8 FP8 linears (FP8 per-token activations x FP8 per-channel weights).
        w4a8: FP4 (po2/m2 scales) weights with FP8 per-token activations.
        act: Remaining dynamic activation quantization (with a preceding online Hadamard).
        rmsnorm: Fold an RMSNorm read only by an activation quantize into that quantize.
        fp32_accumulate: FP8 and W4A8 linears add each MMA instruction's products into fp32
            (about 3x more accurate than cuBLAS's default mode, 0.55-0.6x the speed on an
            H100); by default the sums stay in the FP8 MMA's accumulator (about 14
            significant bits, cuBLAS's fast mode). No effect on the CPU reference ops.
        decode_fusion: Fold the RMSNorm or SiLU gate in front of a one-row W4A16 or W8A16
            linear, and the residual add behind a one-row W4A16, W8A16 or W4A8 linear, into
            the linear (module docstring).
        gate: Fold ``silu(a) * b`` read only by an FP8/W4A8 activation quantize into that
            quantize (``quantize_rows(..., up=b)``; any row count).
        attention: Replace one-query-row SDPAs (decode steps) with ``decode_attention`` on
            the unrepeated KV cache (module docstring).
        attention_write: With ``attention``, fold the step's KV-cache writes into the op
            (``decode_attention_write``) where nothing else touches the caches.
    """

    w4a16: bool = True
    w8a16: bool = True
    fp8: bool = True
    w4a8: bool = True
    act: bool = True
    rmsnorm: bool = True
    fp32_accumulate: bool = False
    decode_fusion: bool = True
    gate: bool = True
    attention: bool = True
    attention_write: bool = True


def _is(node: object, target: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _act_supported(fmt: str) -> str | None:
    """Why the fused activation quantize kernel cannot take ``fmt`` (None: it can)."""
    spec = spec_of(fmt)
    if spec.granularity != "token":
        return f"activation format {fmt}: the fused quantize kernel is per token only"
    if spec.clip != 1.0 or spec.scale != "fp32":
        return f"activation format {fmt}: clip ratios and constrained scales are not fused"
    ok = {("fp8_e4m3", False), ("int8", False), ("int4", True), ("fp4_e2m1", False),
          ("fp4_e2m1", True)}
    if (spec.elem, spec.asym) not in ok:
        return f"activation format {fmt}: no fused quantize kernel for this element"
    return None


@dataclass
class _Match:
    linear: fx.Node
    deq: fx.Node
    kind: str  # "w4a16" | "fp8" | "w4a8"
    act: fx.Node | None = None  # the quantize_activation node (fp8/w4a8)
    w4a8: tuple[torch.Tensor, torch.Tensor] | None = None


@register_pass
class LowerTritonPass(Pass):
    """Replace Q/DQ + linear chains with fused kernel ops (module docstring).

    Rules:
        1. Only linears whose weight is a ``dequantize_weight`` of attribute reads match.
        2. A match is rewritten only if its formats have a kernel; every other quantized
           linear and activation is reported with the reason in ``facts["not_lowered"]``.
        3. An activation quantize read by several lowered FP8/W4A8 linears becomes one
           ``quantize_rows``; users that are not lowered keep the original Q/DQ.
        4. Nodes and buffers left unread are removed (``cleanup`` drops the buffers).
        5. Nothing to lower: ``modified`` is False and the graph is untouched.
        6. A 4-bit weight read with another activation format (W4A4) becomes a W4A16 GEMM on
           the quantize-dequantized activation, whose Q/DQ is lowered on its own; an 8-bit
           one (e.g. W8A8 INT8) a W8A16 GEMM in the same way.
        7. An RMSNorm read only by an activation quantize folds into it when a probe shows
           the fused op's reference RMSNorm reproduces the graph's bits (else reported).
        8. A one-query-row SDPA becomes ``decode_attention`` on the unrepeated cache; an SDPA
           of several rows is not touched; a one-row SDPA that cannot be taken is reported.
    """

    name = "lower-triton"
    Options = LowerTritonOptions
    summary = ("fused Triton kernels for W4A16, W8A16, W8A8 FP8, W4A8, activation quantize "
               "and decode attention")

    def call(self, gm: fx.GraphModule) -> PassResult:
        skipped: list[dict[str, str]] = []
        self._skipped = skipped
        self._fused_norms: list[Norm] = []
        self._norms = {n.output: n for n in find_norms(gm)
                       if n.kind == "rms" and n.offset == 0.0 and n.bias is None}
        matches = [m for n in list(gm.graph.nodes) if (m := self._check(gm, n, skipped))]
        counts = {"w4a16": 0, "w8a16": 0, "fp8": 0, "w4a8": 0, "act": 0, "rmsnorm": 0, "silu_gate": 0,
                  "attention": 0, "attention_rope": 0, "attention_write": 0,
                  "attention_counters": 0}
        self._gates: list[fx.Node] = []
        rows: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        for m in matches:
            self._rewrite(gm, m, rows)
            counts[m.kind] += 1
        if self.options.act:
            counts["act"] = self._lower_acts(gm, skipped)
        counts["rmsnorm"] = len(self._fused_norms)
        counts["silu_gate"] = len(self._gates) // 2
        if self.options.attention:
            counts.update(lower_decode_attention(gm, skipped, self.options.attention_write))
        gemv_norms: list[Norm] = []
        if self.options.decode_fusion:
            counts.update(self._fuse_decode(gm, gemv_norms))
        modified = any(counts.values())
        if modified:
            self._drop_dead(gm, {n for norm in self._fused_norms + gemv_norms
                                 for n in norm.nodes} | set(self._gates))
            gm.graph.lint()
            gm.recompile()
        facts = {**counts, "not_lowered": skipped, "triton_available": triton_available()}
        return PassResult(gm, modified, facts)

    # -- check -------------------------------------------------------------------------------

    def _check(self, gm: fx.GraphModule, node: fx.Node, skipped: list) -> _Match | None:
        if not _is(node, _LINEAR) or not _is(node.args[1], _DEQUANT):
            return None
        deq = node.args[1]
        why = self._weight_problem(deq)
        if why is None:
            x = node.args[0]
            spec = spec_of(deq.args[5])
            if _is(x, _QACT):
                m, why = self._check_quantized(gm, node, deq, x, spec)
            elif spec.elem in _W4_ELEMS and spec.granularity in ("group", "channel"):
                m = _Match(node, deq, "w4a16") if self.options.w4a16 else None
                why = None if m else "w4a16 lowering is off"
            elif (why := self._w8_problem(gm, deq, spec)) is None:
                m = _Match(node, deq, "w8a16")
            else:
                m = None
            if m is not None:
                return m
        skipped.append({"node": node.name, "reason": why})
        return None

    @staticmethod
    def _weight_problem(deq: fx.Node) -> str | None:
        tensors = deq.args[:5]
        if not all(t is None or (isinstance(t, fx.Node) and t.op == "get_attr") for t in tensors):
            return "weight codes or scales are not attribute reads"
        spec = spec_of(deq.args[5])
        if spec.granularity == "tensor":
            return f"per-tensor weight scales ({spec}) are not lowered"
        return None

    def _w8_problem(self, gm: fx.GraphModule, deq: fx.Node, spec) -> str | None:
        """Why the W8A16 kernels cannot take this weight (None: they can)."""
        if spec.elem not in _W8_ELEMS:
            return (f"weight-only {spec} has no kernel (W4A16 takes 4-bit formats, W8A16 "
                    f"{', '.join(_W8_ELEMS)})")
        if deq.args[2] is not None:
            return f"weight {spec}: two scales per group (AFPQ) have no 8-bit kernel"
        if deq.args[3] is not None:
            zero = get_attr_value(gm, deq.args[3].target)
            if not torch.equal(zero, zero.round()):
                return f"weight {spec}: zero points that are not integers have no 8-bit kernel"
        if not self.options.w8a16:
            return "w8a16 lowering is off"
        return None

    def _check_quantized(self, gm, node, deq, act, wspec) -> tuple[_Match | None, str | None]:
        afmt = act.args[1]
        if str(spec_of(afmt)) != _ROWS_FMT:
            if wspec.elem in _W4_ELEMS and wspec.granularity in ("group", "channel"):
                # e.g. W4A4: the activation Q/DQ gets its own kernel (rule 6), the product
                # is a W4A16 GEMM on the dequantized activation.
                if not self.options.w4a16:
                    return None, "w4a16 lowering is off"
                return _Match(node, deq, "w4a16"), None
            if wspec.elem in _W8_ELEMS:  # e.g. W8A8 INT8: the same with an 8-bit weight
                why = self._w8_problem(gm, deq, wspec)
                return (None, why) if why else (_Match(node, deq, "w8a16"), None)
            return None, f"activation {afmt} with weight {wspec}: GEMM kernels take fp8_e4m3/token"
        if wspec.elem == "fp8_e4m3" and not wspec.asym and wspec.granularity == "channel":
            if not self.options.fp8:
                return None, "fp8 lowering is off"
            return _Match(node, deq, "fp8", act), None
        if (wspec.elem == "fp4_e2m1" and not wspec.asym and wspec.scale in ("po2", "m2")
                and wspec.granularity in ("group", "channel")):
            if not self.options.w4a8:
                return None, "w4a8 lowering is off"
            scale = get_attr_value(gm, deq.args[1].target)
            outer = None if deq.args[4] is None else get_attr_value(gm, deq.args[4].target)
            try:
                split = w4a8_split_scales(scale, outer)
            except W4A8ScaleError as e:
                return None, f"weight {wspec}: {e}"
            return _Match(node, deq, "w4a8", act, split), None
        return None, (f"activation {afmt} with weight {wspec}: FP8 GEMMs take fp8_e4m3/channel "
                      "or fp4_e2m1 po2/m2 weights")

    # -- rewrite -------------------------------------------------------------------------------

    def _source(self, gm: fx.GraphModule, act: fx.Node,
                gate_ok: bool = False) -> tuple[fx.Node, tuple]:
        """The activation's input and the extra op arguments: a Hadamard read only by
        ``act`` folds in as ``(had_size,)``, an RMSNorm as ``(0, weight, eps)``, and (with
        ``gate_ok``: ``quantize_rows``) a SiLU gate as ``(0, None, -1.0, up)``."""
        src = act.args[0]
        if _is(src, _HADAMARD) and len(src.users) == 1:
            return src.args[0], (int(src.args[1]),)
        gate = _silu_gate(src) if gate_ok and self.options.gate else None
        if gate is not None:
            silu, up = gate
            self._gates += [src, silu]
            return silu.args[0], (0, None, -1.0, up)
        norm = self._norms.get(src) if self.options.rmsnorm else None
        if norm is not None and len(src.users) == 1:
            if _norm_reproduced(gm, norm):
                self._fused_norms.append(norm)
                return norm.input, (0, norm.weight, float(norm.eps))
            self._skipped.append({"node": src.name, "reason": "RMSNorm computed differently "
                                  "from the fused op's reference; left unfused"})
        return src, (0,)

    def _rows(self, gm: fx.GraphModule, act: fx.Node, rows: dict) -> tuple[fx.Node, fx.Node]:
        if act not in rows:
            src, extra = self._source(gm, act, gate_ok=True)
            with gm.graph.inserting_after(act):
                r = gm.graph.call_function(_q.quantize_rows.default,
                                           (src, act.args[1], *extra))
            with gm.graph.inserting_after(r):
                q = gm.graph.call_function(operator.getitem, (r, 0))
            with gm.graph.inserting_after(q):
                s = gm.graph.call_function(operator.getitem, (r, 1))
            propagate_fake(r)
            propagate_fake(q)
            propagate_fake(s)
            rows[act] = (q, s)
        return rows[act]

    def _rewrite(self, gm: fx.GraphModule, m: _Match, rows: dict) -> None:
        lin, deq = m.linear, m.deq
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        packed, scale, scale_neg, zero, outer, fmt, k, dtype = deq.args
        if m.kind == "w4a16":
            target = _q.w4a16_linear.default
            args = (lin.args[0], packed, scale, scale_neg, zero, outer, bias, fmt, k)
        elif m.kind == "w8a16":
            target = _q.w8a16_linear.default
            args = (lin.args[0], packed, scale, zero, outer, bias, fmt, k)
        else:
            q, s = self._rows(gm, m.act, rows)
            base = packed.target.rsplit(".", 1)[0] if "." in packed.target else packed.target
            if m.kind == "fp8":
                wq = get_attr_value(gm, packed.target).view(torch.float8_e4m3fn)
                w = self._attr(gm, lin, f"{base}.qweight_fp8", wq)
                target = _q.fp8_linear.default
                args = (q, s, w, scale, bias, dtype, not self.options.fp32_accumulate)
            else:
                gexp, row = m.w4a8
                spec = spec_of(fmt)
                gs = spec.group_size if spec.granularity == "group" else k
                g = self._attr(gm, lin, f"{base}.w4a8_gexp", gexp)
                r = self._attr(gm, lin, f"{base}.w4a8_row_scale", row)
                target = _q.w4a8_linear.default
                args = (q, s, packed, g, r, bias, gs, k, dtype, not self.options.fp32_accumulate)
        with gm.graph.inserting_before(lin):
            new = gm.graph.call_function(target, args)
        new.meta.update({k_: v for k_, v in lin.meta.items() if k_ != "val"})
        new.meta["val"] = lin.meta.get("val")
        lin.replace_all_uses_with(new)
        gm.graph.erase_node(lin)

    @staticmethod
    def _attr(gm: fx.GraphModule, anchor: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
        name = unique_attr_name(gm, name)
        set_attr_value(gm, name, value)
        with gm.graph.inserting_before(anchor):
            return gm.graph.get_attr(name)

    def _lower_acts(self, gm: fx.GraphModule, skipped: list) -> int:
        n = 0
        for act in [a for a in gm.graph.nodes if _is(a, _QACT)]:
            if not act.users:
                continue
            why = _act_supported(act.args[1])
            if why is not None:
                skipped.append({"node": act.name, "reason": why})
                continue
            src, extra = self._source(gm, act)
            with gm.graph.inserting_before(act):
                new = gm.graph.call_function(_q.hadamard_quantize.default,
                                             (src, extra[0], act.args[1], *extra[1:]))
            new.meta.update(act.meta)
            act.replace_all_uses_with(new)
            gm.graph.erase_node(act)
            n += 1
        return n

    # -- decode fusions ----------------------------------------------------------------------

    def _fuse_decode(self, gm: fx.GraphModule, norms: list[Norm]) -> dict[str, int]:
        """Fold prologues, then residual adds, into one-row ``w4a16_linear`` (and
        ``w8a16_linear``) nodes; return
        the counts. Prologues first: a norm's input may be the add a residual fusion replaces
        (``replace_all_uses_with`` then points the fused linear at the new node)."""
        counts = {"gemv_rmsnorm": 0, "gemv_silu_gate": 0, "gemv_residual": 0}
        # Rows of the linear's result (those of its input; a quantized input's codes may
        # carry no shape).
        ops = [n for n in gm.graph.nodes if (_is(n, _W4A16) or _is(n, _W8A16)) and _one_row(n)]
        for op in ops:
            x = op.args[0]
            norm = self._norms.get(x) if self.options.rmsnorm else None
            if norm is not None and len(x.users) == 1 and _same_dtype(norm.input, x) and (
                    norm.weight is None or _same_dtype(norm.weight, x)):
                if _norm_reproduced(gm, norm):
                    op.args = _with(op, x=norm.input, rms_weight=norm.weight,
                                    rms_eps=float(norm.eps))
                    norms.append(norm)
                    counts["gemv_rmsnorm"] += 1
                else:
                    self._skipped.append({"node": x.name, "reason": "RMSNorm computed "
                                          "differently from the fused op's reference; left "
                                          "unfused"})
            elif (gate := _silu_gate(x)) is not None:
                silu, up = gate
                op.args = _with(op, x=silu.args[0], up=up)
                gm.graph.erase_node(x)
                if not silu.users:
                    gm.graph.erase_node(silu)
                counts["gemv_silu_gate"] += 1
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        ops += [n for n in gm.graph.nodes if _is(n, _W4A8) and _one_row(n)]
        for op in ops:
            users = list(op.users)
            if len(users) != 1 or not _is(users[0], _ADD) or users[0].kwargs:
                continue
            add = users[0]
            res = add.args[1] if add.args[0] is op else add.args[0]
            if (not isinstance(res, fx.Node) or res is op or order[res] > order[op]
                    or not _same_value(res, add) or not _same_value(op, add)):
                continue
            op.args = _with(op, residual=res)
            add.replace_all_uses_with(op)
            gm.graph.erase_node(add)
            counts["gemv_residual"] += 1
        return counts

    @staticmethod
    def _drop_dead(gm: fx.GraphModule, norm_nodes: set[fx.Node]) -> None:
        # Reverse order: a dead Q/DQ frees its Hadamard, norm and attribute reads.
        dead = (_DEQUANT, _QACT, _HADAMARD)
        for node in reversed(list(gm.graph.nodes)):
            if node.users:
                continue
            if (node.op == "get_attr" or node in norm_nodes
                    or (node.op == "call_function" and node.target in dead)):
                gm.graph.erase_node(node)


_W4A16 = _q.w4a16_linear.default
_W8A16 = _q.w8a16_linear.default
_W4A8 = _q.w4a8_linear.default
_ADD = torch.ops.aten.add.Tensor
_MUL = torch.ops.aten.mul.Tensor
_SILU = torch.ops.aten.silu.default
def _with(op: fx.Node, **new: object) -> tuple:
    """``op``'s positional arguments with ``new`` set by name: its schema gives each
    argument's position, and the defaults of any skipped before the last one set."""
    schema = op.target._schema.arguments
    names = [a.name for a in schema]
    out = list(op.args)
    last = max(names.index(name) for name in new)
    out += [a.default_value for a in schema[len(out):last + 1]]
    for name, value in new.items():
        out[names.index(name)] = value
    return tuple(out)


def _one_row(x: object) -> bool:
    """Whether ``x``'s rows (all dims but the last) are statically one: a decode step."""
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        return False
    return all(isinstance(d, int) and d == 1 for d in val.shape[:-1])


def _same_dtype(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype


def _same_value(a: fx.Node, b: fx.Node) -> bool:
    """Same dtype and the same shape (no broadcasting in a fused add or gate); symbolic sizes
    match when they are the same expression."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (_same_dtype(a, b) and va.dim() == vb.dim()
            and all(str(x) == str(y) for x, y in zip(va.shape, vb.shape, strict=True)))


def _silu_gate(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(silu, up)`` when ``x = silu(a) * up`` (either order), read only by its linear,
    all in one dtype and shape."""
    if not _is(x, _MUL) or x.kwargs or len(x.users) != 1 or len(x.args) != 2:
        return None
    for silu, up in (x.args, x.args[::-1]):
        if (_is(silu, _SILU) and len(silu.users) == 1 and isinstance(up, fx.Node)
                and up is not silu and _same_value(silu, x) and _same_value(up, x)
                and _same_value(silu.args[0], x)):
            return silu, up
    return None


def _norm_reproduced(gm: fx.GraphModule, norm: Norm) -> bool:
    """Whether :func:`rms_norm` gives the graph's RMSNorm bits on a seeded probe."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {norm.input: g.placeholder("x")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise KeyError(a.name)
            env[a] = g.get_attr(a.target)
        return env[a]

    try:
        for n in norm.nodes:
            env[n] = g.node_copy(n, arg)
    except KeyError:
        return False  # the pattern reads something besides its input and its weight
    g.output(env[norm.output])
    sub = fx.GraphModule(gm, g)
    val = norm.input.meta.get("val")
    dtype = val.dtype if val is not None else torch.float32
    dim = norm.dim or (val.shape[-1] if val is not None else None)
    if not isinstance(dim, int):
        return False
    weight = None if norm.weight is None else get_attr_value(gm, norm.weight.target)
    device = weight.device if weight is not None else "cpu"
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(2, 5, dim, generator=gen) * 3).to(device=device, dtype=dtype)
    with torch.no_grad():
        return torch.equal(sub(probe), rms_norm(probe, weight, float(norm.eps)))
