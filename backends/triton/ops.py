"""Fused graph ops that ``lower-triton`` puts in place of qcompile Q/DQ + linear chains.

Each op's CPU implementation is the exact composition of the reference ops it replaces
(:mod:`qcompile.ops`), so a lowered graph computes the same bits as the unlowered one on the
CPU. The CUDA implementation launches the Triton kernel (imported on first use); its numerics
differ from the reference only by fp32 accumulation order and the final rounding.

Ops:
    ``qcompile::w4a16_linear(x, packed, scale, scale_neg, zero, outer, bias, fmt, k,
    rms_weight=None, rms_eps=-1, up=None, residual=None)``
        ``linear(x, dequantize_weight(packed, ..., fmt, k, x.dtype), bias)`` for 4-bit weights;
        with ``rms_eps >= 0`` on ``rms_norm(x, rms_weight, rms_eps)``, with ``up`` on
        ``silu(x) * up``, and with ``residual`` the result is ``residual + linear(...)``
        (batch-1 decode fusions, :mod:`qcompile.backends.triton.gemv_fusion`).
    ``qcompile::w8a16_linear(x, codes, scale, zero, outer, bias, fmt, k, rms_weight=None,
    rms_eps=-1, up=None, residual=None)``
        ``linear(x, dequantize_weight(codes, scale, None, zero, outer, fmt, k, x.dtype), bias)``
        for 8-bit weights (INT8 sym/asym, FP8 E4M3/E5M2; :mod:`qcompile.backends.triton.w8a16`),
        with the decode fusions of ``w4a16_linear``.
    ``qcompile::quantize_rows(x, fmt, had_size, rms_weight=None, rms_eps=-1, up=None)
    -> (q, scale)``
        Per-token FP8/INT8 codes of ``hadamard(x, had_size)`` (or ``x`` when 0, or
        ``rms_norm(x, rms_weight, rms_eps)`` when ``rms_eps >= 0``, or ``silu(x) * up``) and
        their fp32 scales ``[..., 1]``: ``q * scale`` is ``quantize_activation(...)`` exactly.
    ``qcompile::fp8_linear(q, q_scale, wq, w_scale, bias, dtype, fast_accum=True)``
        ``linear((q * q_scale).to(dtype), (wq * w_scale).to(dtype), bias)``: W8A8 FP8.
    ``qcompile::w4a8_linear(q, q_scale, packed, gexp, row_scale, bias, group_size, k, dtype,
    fast_accum=True, residual=None)``
        ``linear((q * q_scale).to(dtype), W.to(dtype), bias)`` with the FP4 weight
        ``W = decode(codes) * 2^gexp * row_scale`` (ZeroQuant-FP M1/M2 scales), plus
        ``residual`` when given.
    ``qcompile::hadamard_quantize(x, size, fmt, rms_weight=None, rms_eps=-1)``
        ``quantize_activation(hadamard(x, size), fmt)`` in one pass (``size`` 0: no rotation;
        ``rms_eps >= 0``: RMSNorm instead of the rotation).
    ``qcompile::decode_attention(q, k, v, mask=None, scale=None, gqa=False, cos=None,
    sin=None)``
        ``scaled_dot_product_attention(q', K, V, mask, scale=scale)`` with ``K``/``V`` the
        cache ``k``/``v`` with each head repeated for its ``Hq / Hkv`` query heads (as
        ``repeat_kv`` does; ``gqa``: as ``enable_gqa=True`` does) and ``q'`` the queries,
        rotated by :func:`rope` when ``cos``/``sin`` are given; one query row on CUDA runs
        :mod:`qcompile.backends.triton.decode_attention`, which reads each kv head once.
    ``qcompile::decode_attention_write(q, k_cache!, v_cache!, index, k_new, v_new, mask=None,
    scale=None, gqa=False, cos=None, sin=None, k_cos=None, k_sin=None)``
        The same after ``k_cache.index_copy_(2, index, rope(k_new, k_cos, k_sin) or k_new)``
        and ``v_cache.index_copy_(2, index, v_new)``: a decode step's cache update, done in
        place by the same kernel (one launch instead of three).

On CUDA the RMSNorm variants quantize the fp32 normalized values directly (the graph rounds
them to the activation dtype first): identical for fp32 models, within one quantization step
at rare ties for bf16 ones.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from qcompile.backends.triton.runtime import element_table, interpreting, triton_available
from qcompile.device_cache import outside_graph_pools
from qcompile.errors import FormatError
from qcompile.formats.elements import _round_f32
from qcompile.formats.scales import compute_scales, group_stats
from qcompile.oplib import define_op
from qcompile.ops import dequantize_weight, hadamard, quantize_activation, spec_of

__all__ = [
    "decode_attention", "decode_attention_ref", "decode_attention_write", "fp8_linear",
    "hadamard_quantize", "kernels_on_cpu", "linear_input", "quantize_rows", "rms_norm", "rope", "w4a16_linear",
    "w4a8_linear", "w8a16_linear", "with_residual",
]

_state = threading.local()


@contextlib.contextmanager
def kernels_on_cpu() -> Iterator[None]:
    """Run the ops' Triton kernels on CPU tensors under the interpreter (tests only).

    Raises:
        RuntimeError: Triton is missing or ``TRITON_INTERPRET`` is not set.
    """
    if not (triton_available() and interpreting()):
        raise RuntimeError("kernels_on_cpu needs triton and TRITON_INTERPRET=1")
    old = getattr(_state, "cpu", False)
    _state.cpu = True
    try:
        yield
    finally:
        _state.cpu = old


def _use_kernel(t: torch.Tensor) -> bool:
    if t.is_cuda:
        return triton_available()
    return getattr(_state, "cpu", False)


def _rows_spec(fmt: str):
    spec = spec_of(fmt)
    if spec.granularity != "token" or spec.asym or spec.elem not in ("fp8_e4m3", "int8"):
        raise FormatError(f"quantize_rows codes need fp8_e4m3/token or int8/token, got {fmt!r}")
    return spec


@functools.cache
def _kernels():
    # Imported lazily: importing triton is slow and it is not a hard dependency.
    from qcompile.backends.triton import act_quant, fp8_gemm, w4a8, w4a16

    return act_quant, fp8_gemm, w4a8, w4a16


@functools.cache
def _backend(name: str):
    """``qcompile.backends.triton.<name>``, imported at its first use (the plans)."""
    return importlib.import_module(f"qcompile.backends.triton.{name}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm as HF Llama-family models compute it (fp32 statistics, cast back, then gamma).

    ``lower-triton`` fuses a graph's RMSNorm only after checking on a probe that this gives
    the graph's own bits.
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return h if weight is None else weight * h


def linear_input(x: torch.Tensor, had_size: int = 0, rms_weight: torch.Tensor | None = None,
                 rms_eps: float = -1.0, up: torch.Tensor | None = None) -> torch.Tensor:
    """What a fused op multiplies or quantizes, as the graph ops it replaces compute it.

    The reference of every fused prologue: the CPU ops here, the GEMV's
    (:func:`qcompile.backends.triton.gemv_fusion.prologue_ref`) and the quantize kernels'.

    Args:
        x: The op's input ``[..., K]``.
        had_size: Hadamard block size; 0: no rotation.
        rms_weight: RMSNorm gamma ``[K]`` or None.
        rms_eps: RMSNorm epsilon; negative: no RMSNorm.
        up: The gate's other factor, ``[..., K]``: the input is ``silu(x) * up``.

    Returns:
        ``rms_norm(x, rms_weight, rms_eps)`` when ``rms_eps >= 0``, else ``silu(x) * up``
        when ``up`` is given, else ``hadamard(x, had_size)`` when ``had_size``, else ``x``.
    """
    if rms_eps >= 0:
        return rms_norm(x, rms_weight, rms_eps)
    if up is not None:
        return F.silu(x) * up
    return hadamard(x, had_size) if had_size else x


def with_residual(y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + y`` (the eager add's bits) or ``y``: the fused residual epilogue's
    reference."""
    return y if residual is None else residual + y


@functools.cache
def _int_codes(bits: int, offset: int, device: str) -> torch.Tensor:
    return outside_graph_pools(
        lambda: torch.arange(1 << bits, dtype=torch.float32, device=device) + offset, device)


def _code_values(spec, device: torch.device) -> torch.Tensor:
    """What the W4A16 kernel subtracts the zero point from / scales: the element value of
    each code, or for INT asym the unsigned level itself (``qcompile.formats.quantize``)."""
    info = spec.element
    if info.kind == "int":
        return _int_codes(info.bits, 0 if spec.asym else int(info.min), str(device))
    return element_table(spec.elem, device)


# --- W4A16 ---------------------------------------------------------------------------------

def _w4a16_linear_fake(x, packed, scale, scale_neg, zero, outer, bias, fmt, k, rms_weight=None,
                       rms_eps=-1.0, up=None, residual=None):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@define_op(
    "w4a16_linear(Tensor x, Tensor packed, Tensor scale, Tensor? scale_neg, Tensor? zero, "
    "Tensor? outer, Tensor? bias, str fmt, SymInt k, Tensor? rms_weight=None, "
    "float rms_eps=-1.0, Tensor? up=None, Tensor? residual=None) -> Tensor",
    _w4a16_linear_fake)
def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    scale_neg: torch.Tensor | None,
    zero: torch.Tensor | None,
    outer: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    k: int,
    rms_weight: torch.Tensor | None = None,
    rms_eps: float = -1.0,
    up: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """4-bit weight-only linear, optionally with its decode fusions; see the module docstring."""
    fused = rms_eps >= 0 or up is not None or residual is not None
    if _use_kernel(x):
        if not fused:  # a prefill whose host work per weight is done (w4a16_plan)
            y = _backend("w4a16_plan").prefill(x, packed, scale, scale_neg, zero, outer, bias,
                                               fmt, k)
            if y is not None:
                return y

        def full() -> torch.Tensor:
            spec = spec_of(fmt)
            gs = spec.group_size if spec.granularity == "group" else k
            fusion = None
            if fused:
                from qcompile.backends.triton.gemv_fusion import GemvFusion

                fusion = GemvFusion(rms_weight, rms_eps, up, residual)
            return _kernels()[3].w4a16_linear(
                x.contiguous(), packed, _code_values(spec, x.device), scale, scale_neg, zero,
                outer, gs, bias, fusion=fusion)

        if k and x.numel() == k and packed.dim() == 2 and packed.shape[0]:
            # a decode step's GEMV, relaunched once its call shape is known (gemv_plan)
            return _backend("gemv_plan").run(
                packed, (scale, scale_neg, zero, outer, bias), ("w4a16", fmt, k, rms_eps),
                packed.shape[0], x, full, up=up, res=residual, g=rms_weight)
        return full()
    x = linear_input(x, 0, rms_weight, rms_eps, up)
    w = dequantize_weight(packed, scale, scale_neg, zero, outer, fmt, k, x.dtype)
    return with_residual(F.linear(x, w, bias), residual)


# --- W8A16 -----------------------------------------------------------------------------------

def _w8a16_linear_fake(x, codes, scale, zero, outer, bias, fmt, k, rms_weight=None,
                       rms_eps=-1.0, up=None, residual=None):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@define_op(
    "w8a16_linear(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? outer, "
    "Tensor? bias, str fmt, SymInt k, Tensor? rms_weight=None, float rms_eps=-1.0, "
    "Tensor? up=None, Tensor? residual=None) -> Tensor",
    _w8a16_linear_fake)
def w8a16_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, outer: torch.Tensor | None,
                 bias: torch.Tensor | None, fmt: str, k: int,
                 rms_weight: torch.Tensor | None = None, rms_eps: float = -1.0,
                 up: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit weight-only linear, optionally with its decode fusions; see the module
    docstring."""
    if _use_kernel(x):
        def full() -> torch.Tensor:
            spec = spec_of(fmt)
            gs = spec.group_size if spec.granularity == "group" else k
            fusion = None
            if rms_eps >= 0 or up is not None or residual is not None:
                from qcompile.backends.triton.gemv_fusion import GemvFusion

                fusion = GemvFusion(rms_weight, rms_eps, up, residual)
            return _backend("w8a16").w8a16_linear(x, codes, scale, zero, outer, gs, spec.elem,
                                                  bias, fusion=fusion)

        if k and x.numel() == k and codes.dim() == 2 and codes.shape[0]:
            # a decode step's GEMV, relaunched once its call shape is known (gemv_plan)
            return _backend("gemv_plan").run(
                codes, (scale, zero, outer, bias), ("w8a16", fmt, k, rms_eps), codes.shape[0],
                x, full, up=up, res=residual, g=rms_weight)
        return full()
    x = linear_input(x, 0, rms_weight, rms_eps, up)
    w = dequantize_weight(codes, scale, None, zero, outer, fmt, k, x.dtype)
    return with_residual(F.linear(x, w, bias), residual)


# --- per-token activation codes --------------------------------------------------------------

def _fits(x: torch.Tensor, had_size: int, rms_eps: float, gate: bool = False) -> bool:
    """Whether the fused quantize kernel takes these rows (sizes it cannot hold on the GPU,
    e.g. a 14336 Kronecker Hadamard, run the reference ops instead of failing to launch)."""
    return _kernels()[0].fused_fits(had_size, x.shape[-1], x.dtype, x.device,
                                    rms_eps >= 0 or gate)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the row kernels read it: each row contiguous, the rows at any stride (the
    gate and up halves of a fused projection's output are read in place, not copied);
    anything else copied."""
    if t.dim() and t.stride(-1) == 1:
        try:
            t.view(-1, t.shape[-1])
            return t
        except RuntimeError:  # rows that no single stride steps through
            pass
    return t.contiguous()


def _quantize_rows_fake(x, fmt, had_size, rms_weight=None, rms_eps=-1.0, up=None):
    spec = _rows_spec(fmt)
    dtype = torch.float8_e4m3fn if spec.elem == "fp8_e4m3" else torch.int8
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((*x.shape[:-1], 1),
                                                           dtype=torch.float32)


@define_op(
    "quantize_rows(Tensor x, str fmt, SymInt had_size, Tensor? rms_weight=None, "
    "float rms_eps=-1., Tensor? up=None) -> (Tensor, Tensor)",
    _quantize_rows_fake)
def quantize_rows(
    x: torch.Tensor,
    fmt: str,
    had_size: int,
    rms_weight: torch.Tensor | None = None,
    rms_eps: float = -1.0,
    up: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8/INT8 codes and fp32 scales; see the module docstring."""
    if _use_kernel(x):  # rows whose launch is prepared (rows_plan)
        got = _backend("rows_plan").quantize(x, fmt, had_size, rms_weight, rms_eps, up)
        if got is not None:
            return got
    spec = _rows_spec(fmt)
    if _use_kernel(x) and _fits(x, had_size, rms_eps, up is not None):
        aq = _kernels()[0]
        if up is not None:
            run = lambda: aq.silu_quant(_row_major(x), _row_major(up), fmt,  # noqa: E731
                                        out="codes")
        elif rms_eps >= 0:
            run = lambda: aq.rmsnorm_quant(_row_major(x), rms_weight, rms_eps,  # noqa: E731
                                           fmt, out="codes")
        else:
            run = lambda: aq.act_quant(_row_major(x), fmt, had_size,  # noqa: E731
                                       out="codes")
        return _backend("rows_plan").build(x, fmt, had_size, rms_weight, rms_eps, up, run)
    xr = linear_input(x, had_size, rms_weight, rms_eps, up).float()
    s = compute_scales(spec, group_stats(xr, spec), None).scale  # [..., 1], as quantize uses
    q = _round_f32(xr / s, spec.elem)
    dtype = torch.float8_e4m3fn if spec.elem == "fp8_e4m3" else torch.int8
    return q.to(dtype), s


def _dq_rows(q: torch.Tensor, q_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * q_scale).to(dtype)


# --- W8A8 FP8 ----------------------------------------------------------------------------

def _fp8_linear_fake(q, q_scale, wq, w_scale, bias, dtype, fast_accum=True):
    return q.new_empty((*q.shape[:-1], wq.shape[0]), dtype=dtype)


@define_op(
    "fp8_linear(Tensor q, Tensor q_scale, Tensor wq, Tensor w_scale, Tensor? bias, "
    "ScalarType dtype, bool fast_accum=True) -> Tensor",
    _fp8_linear_fake)
def fp8_linear(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    fast_accum: bool = True,
) -> torch.Tensor:
    """FP8 activations x FP8 weights, scales in the epilogue; see the module docstring.
    ``fast_accum``: the kernel's accumulation mode (``fp8_gemm.fp8_scaled_mm``); the CPU
    reference sums in fp32 either way."""
    if _use_kernel(q) and q.dtype == torch.float8_e4m3fn:
        y = _backend("fp8_plan").linear(q, q_scale, wq, w_scale, bias, dtype, fast_accum)
        if y is not None:  # the weight's checks and launches done once (fp8_plan)
            return y
        lead = q.shape[:-1]
        out = _kernels()[1].fp8_scaled_mm(
            q.reshape(-1, q.shape[-1]), q_scale.reshape(-1, 1), wq, w_scale.reshape(-1),
            bias, out_dtype=dtype, fast_accum=fast_accum)
        return out.reshape(*lead, wq.shape[0])
    w = (wq.float() * w_scale).to(dtype)
    return F.linear(_dq_rows(q, q_scale, dtype), w, bias)


# --- W4A8 (ZeroQuant-FP) -------------------------------------------------------------------

def _w4a8_weight(packed, gexp, row_scale, group_size, k, dtype):
    fmt = f"fp4_e2m1/g{group_size}/m2"
    factor = torch.ldexp(torch.ones_like(gexp, dtype=torch.float32), gexp.to(torch.int32))
    return dequantize_weight(packed, factor, None, None, row_scale.reshape(-1, 1).float(),
                             fmt, k, dtype)


def _w4a8_linear_fake(q, q_scale, packed, gexp, row_scale, bias, group_size, k, dtype,
                      fast_accum=True, residual=None):
    return q.new_empty((*q.shape[:-1], packed.shape[0]), dtype=dtype)


@define_op(
    "w4a8_linear(Tensor q, Tensor q_scale, Tensor packed, Tensor gexp, Tensor row_scale, "
    "Tensor? bias, SymInt group_size, SymInt k, ScalarType dtype, "
    "bool fast_accum=True, Tensor? residual=None) -> Tensor",
    _w4a8_linear_fake)
def w4a8_linear(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    packed: torch.Tensor,
    gexp: torch.Tensor,
    row_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    k: int,
    dtype: torch.dtype,
    fast_accum: bool = True,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP8 activations x FP4 weights shifted to FP8; see the module docstring
    (``fast_accum`` as in :func:`fp8_linear`; ``residual``: the result is
    ``residual + linear(...)``, added in the batch-1 GEMV's epilogue on CUDA)."""
    if _use_kernel(q):
        if residual is None:  # a prefill whose host work per weight is done (w4a8_plan)
            y = _backend("w4a8_plan").prefill(q, q_scale, packed, gexp, row_scale, bias,
                                              group_size, k, dtype, fast_accum)
            if y is not None:
                return y
        n = packed.shape[0] if packed.dim() == 2 else 0

        def full() -> torch.Tensor:
            out = _kernels()[2].w4a8_linear(
                q.reshape(-1, q.shape[-1]), q_scale.reshape(-1, 1), packed, gexp, row_scale,
                group_size, bias, out_dtype=dtype, fast_accum=fast_accum,
                residual=None if residual is None else residual.reshape(-1, n))
            return out.reshape(*q.shape[:-1], n)

        if k and q.numel() == k and n:  # a decode step's GEMV (gemv_plan)
            return _backend("gemv_plan").run(
                packed, (gexp, row_scale, bias), ("w4a8", group_size, k, dtype, fast_accum), n,
                q, full, res=residual, xs=q_scale)
        return full()
    w = _w4a8_weight(packed, gexp, row_scale, group_size, k, dtype)
    return with_residual(F.linear(_dq_rows(q, q_scale, dtype), w, bias), residual)


# --- Hadamard + dynamic quantize (qdq) -----------------------------------------------------

def _hadamard_quantize_fake(x, size, fmt, rms_weight=None, rms_eps=-1.0):
    return torch.empty_like(x)


@define_op(
    "hadamard_quantize(Tensor x, SymInt size, str fmt, Tensor? rms_weight=None, "
    "float rms_eps=-1.) -> Tensor",
    _hadamard_quantize_fake)
def hadamard_quantize(
    x: torch.Tensor,
    size: int,
    fmt: str,
    rms_weight: torch.Tensor | None = None,
    rms_eps: float = -1.0,
) -> torch.Tensor:
    """``quantize_activation(hadamard(x, size), fmt)`` fused; see the module docstring."""
    if _use_kernel(x) and _fits(x, size, rms_eps):
        if rms_eps >= 0:
            return _kernels()[0].rmsnorm_quant(x.contiguous(), rms_weight, rms_eps, fmt,
                                               out="qdq")
        return _kernels()[0].act_quant(x.contiguous(), fmt, size, out="qdq")
    return quantize_activation(linear_input(x, size, rms_weight, rms_eps), fmt)


# --- decode attention ------------------------------------------------------------------------

def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Hugging Face's ``apply_rotary_pos_emb`` computes it:
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` of x's halves."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None = None, scale: float | None = None,
                         gqa: bool = False, cos: torch.Tensor | None = None,
                         sin: torch.Tensor | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` over ``k``/``v`` with each head repeated for its
    query heads, as the graph computed it: Hugging Face's ``repeat_kv`` (``unsqueeze(2)``,
    ``expand``, ``reshape``; nothing when every kv head has one query head), or with
    ``gqa`` the ``enable_gqa=True`` form, which repeats inside the op.

    Args:
        q: ``[B, Hq, S, DK]``.
        k: ``[B, Hkv, L, DK]`` with ``Hq`` a multiple of ``Hkv``.
        v: ``[B, Hkv, L, DV]``.
        mask: Boolean (true attends) or additive, broadcastable to ``[B, Hq, S, L]``.
        scale: Score scale (default ``1 / sqrt(DK)``).
        gqa: Call the attention with ``enable_gqa=True`` on ``k``/``v`` as they are.
        cos, sin: With both, the queries are ``rope(q, cos, sin)`` (:func:`rope`; both
            broadcastable to ``q``, in ``q``'s dtype).

    Returns:
        ``[B, Hq, S, DV]`` in ``q``'s dtype.
    """
    if cos is not None:
        q = rope(q, cos, sin)
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        b, hkv, n = k.shape[:3]
        k = k[:, :, None].expand(b, hkv, rep, n, k.shape[-1]).reshape(b, hkv * rep, n, -1)
        v = v[:, :, None].expand(b, hkv, rep, n, v.shape[-1]).reshape(b, hkv * rep, n, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _decode_attention_fake(q, k, v, mask=None, scale=None, gqa=False, cos=None, sin=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@define_op(
    "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, float? scale=None, "
    "bool gqa=False, Tensor? cos=None, Tensor? sin=None) -> Tensor",
    _decode_attention_fake)
def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    gqa: bool = False,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over a KV cache whose heads serve several query heads; see the module
    docstring. Shapes the kernel does not take (several query rows, head_dim > 256) run the
    reference on CUDA too."""
    if (cos is None) != (sin is None):
        raise ValueError("decode_attention: give both cos and sin (rotary queries) or neither")
    if _use_kernel(q):
        from qcompile.backends.triton import decode_attention as da

        def full() -> torch.Tensor:
            if da.kernel_fits(q, k, v, mask, cos, sin) is None:
                return da.run_checked(q, k, v, mask, scale, cos=cos, sin=sin)
            return decode_attention_ref(q, k, v, mask, scale, gqa, cos, sin)

        if q.dim() == k.dim() == v.dim() == 4:  # a decode step's, once its shape is known
            return _backend("attention_plan").run(q, k, v, mask, scale, cos, sin, None, full)
        return full()
    return decode_attention_ref(q, k, v, mask, scale, gqa, cos, sin)


def _decode_attention_write_fake(q, k_cache, v_cache, index, k_new, v_new, mask=None,
                                 scale=None, gqa=False, cos=None, sin=None, k_cos=None,
                                 k_sin=None):
    return q.new_empty((*q.shape[:-1], v_cache.shape[-1]))


@define_op(
    "decode_attention_write(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor index, "
    "Tensor k_new, Tensor v_new, Tensor? mask=None, float? scale=None, bool gqa=False, "
    "Tensor? cos=None, Tensor? sin=None, Tensor? k_cos=None, Tensor? k_sin=None) -> Tensor",
    _decode_attention_write_fake)
def decode_attention_write(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    gqa: bool = False,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    k_cos: torch.Tensor | None = None,
    k_sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """``decode_attention`` after writing the step's key/value row into the caches in place
    (``index_copy_`` along the sequence; ``k_new`` rotated by ``k_cos``/``k_sin`` first when
    given); see the module docstring."""
    for a, b_, what in ((cos, sin, "cos and sin"), (k_cos, k_sin, "k_cos and k_sin")):
        if (a is None) != (b_ is None):
            raise ValueError(f"decode_attention_write: give both {what} or neither")
    if _use_kernel(q):
        from qcompile.backends.triton import decode_attention as da

        write = da.CacheWrite(index, k_new, v_new, k_cos, k_sin)

        def full() -> torch.Tensor:
            if da.kernel_fits(q, k_cache, v_cache, mask, cos, sin, write) is None:
                return da.run_checked(q, k_cache, v_cache, mask, scale, cos=cos, sin=sin,
                                      write=write)
            return _write_then_attend(q, k_cache, v_cache, index, k_new, v_new, mask, scale,
                                      gqa, cos, sin, k_cos, k_sin)

        if q.dim() == k_cache.dim() == v_cache.dim() == 4:  # a decode step's (attention_plan)
            return _backend("attention_plan").run(q, k_cache, v_cache, mask, scale, cos, sin,
                                                  write, full)
        return full()
    return _write_then_attend(q, k_cache, v_cache, index, k_new, v_new, mask, scale, gqa, cos,
                              sin, k_cos, k_sin)


def _write_then_attend(q, k_cache, v_cache, index, k_new, v_new, mask, scale, gqa, cos, sin,
                       k_cos, k_sin) -> torch.Tensor:
    """``decode_attention_write`` as the graph's ops compute it."""
    k_cache.index_copy_(2, index, k_new if k_cos is None else rope(k_new, k_cos, k_sin))
    v_cache.index_copy_(2, index, v_new)
    return decode_attention_ref(q, k_cache, v_cache, mask, scale, gqa, cos, sin)
