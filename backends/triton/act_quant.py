"""Per-token activation quantization, with a fused online Hadamard or RMSNorm in front.

Functions (``x``: ``[..., D]`` bf16/fp16/fp32, one row per token):

* :func:`act_quant` / :func:`act_quant_ref`: ``quantize_activation(hadamard(x, had_size), fmt)``
  (``had_size`` 0: no rotation) in one pass over each row.
* :func:`rmsnorm_quant` / :func:`rmsnorm_quant_ref`: RMSNorm (optionally times a weight)
  followed by the same quantization, the normalized row never leaving the chip.

Formats: ``fp8_e4m3/token``, ``int8/token``, ``int4/token/asym``, ``fp4_e2m1/token`` and
``fp4_e2m1/token/asym`` (AFPQ), fp32 scales, no clipping. ``out="qdq"`` gives the dequantized
tensor in ``x``'s dtype; ``out="codes"`` (FP8/INT8 only) gives ``(q, scale)`` with ``q``
float8_e4m3fn/int8 and ``scale`` fp32 ``[..., 1]``; :func:`act_quant` also has
``out="rotated"``: the rotated row in ``x``'s dtype, unquantized (to check the transform).

Numerics. The scale rule, the divide-then-round order and the RNE rounding are those of
:func:`qcompile.formats.scales.compute_scales` and ``_fake_quantize_f32``, computed in fp32:
the scale with an IEEE division (``div_rn``: plain ``/`` is approximate on CUDA), each element's
quotient as a correctly rounded product by the reciprocal with one fma correction, rounded
on the GPU by the hardware's FP8 conversion and otherwise with the exact helpers of
:mod:`qcompile.backends.triton.jit` (the quantize of :mod:`had_quant`, shared), so without a
Hadamard the result is bit-exact. The rotation is ``x @ H / sqrt(size)`` like :func:`qcompile.hadamard.hadamard_transform`
and, like the unfused ``qcompile::hadamard`` op, its result is rounded to ``x``'s dtype
before quantization; its sums run in another order, so rotated values differ from the
reference by fp32 rounding. RMSNorm uses ``1 / sqrt_rn(mean + eps)`` and a tree sum, so it
matches PyTorch to fp32 rounding of the mean.

Hadamard layout. ``size = 2^k * m`` (:func:`qcompile.hadamard.hadamard_factors`, ``m`` <= 128).
Each block of a row is a tile ``[P1, P2, Q]``: ``Q`` holds the Paley base of order ``m``
(zero-padded to a power of two, at least 16; a ``2^k`` below 16 is folded into it while the
product stays <= 128), ``P1 x P2`` the Sylvester factor ``2^k`` (one axis up to 128, else split
in two halves of up to 128; an axis below 16 is zero-padded to 16), built in the kernel from
bit parities. Every factor is one ``tl.dot`` against a +-1 matrix on its axis, at fp32-level
accuracy (``input_precision="tf32x3"``: three TF32 MMAs; the +-1 factors are exact in TF32, so
only x's split into two TF32 parts rounds; ``ieee`` FMAs spilled kilobytes per thread on sm_90
in the offline compile), normalized once at the end; the whole row,
``[blocks, P1, P2, Q]``, stays on chip (at most 2^16 padded elements).

Dispatch. Without RMSNorm, ``had_size`` 0 or a power of two >= 16 on rows of at most 16384
(fp32 rows with a Hadamard: at most 4096) run :mod:`qcompile.backends.triton.had_quant`: the row
as a matrix, two plain products, a persistent row loop (on an H100, Hadamard-8192 + FP8 codes at
1.28x a copy, where the kernel below took 100x). One Kronecker block per bf16/fp16 row (1536,
576, 14336, 12288, ...) runs :mod:`qcompile.backends.triton.kron_quant` (two or three
products, no permutes of the whole tile). The kernel below takes the other Kronecker (Paley)
layouts (several blocks per row, a base over 64 columns with a middle axis), fp32 rows and
RMSNorm.

fp16 outputs saturate at +-65504 where a cast would give inf (only for values beyond fp16's
range). NaN/inf inputs are not checked (the reference raises on them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qcompile.backends.triton.act_jit import round_to, sylvester
from qcompile.backends.triton.had_quant import _pow2_ceil, _quantize_store, had2_plan, launch_had2
from qcompile.backends.triton.kron_quant import base_matrix, kron_plan, launch_kron
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.ops import linear_input
from qcompile.backends.triton.runtime import (
    KernelInputError,
    check_tensor,
    interpreting,
    plain_bench,
    tuning,
)
from qcompile.errors import FormatError
from qcompile.formats import FormatSpec
from qcompile.formats.elements import _round_f32
from qcompile.formats.scales import compute_scales, group_stats
from qcompile.hadamard import hadamard_factors
from qcompile.ops import hadamard, quantize_activation, spec_of

__all__ = ["CONFIGS", "act_quant", "act_quant_ref", "fused_fits", "rmsnorm_quant",
           "rmsnorm_quant_ref", "silu_quant", "silu_quant_ref"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_XDT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# (elem, asym) -> (kernel element id: 0 fp8_e4m3, 1 fp4_e2m1, 2 int; L = largest level)
_FORMATS: dict[tuple[str, bool], tuple[int, float]] = {
    ("fp8_e4m3", False): (0, 448.0),
    ("fp4_e2m1", False): (1, 6.0),
    ("fp4_e2m1", True): (1, 6.0),
    ("int8", False): (2, 127.0),
    ("int4", True): (2, 15.0),  # asym INT: L is the number of levels minus one
}
_SUPPORTED = ("fp8_e4m3/token, int8/token, int4/token/asym, fp4_e2m1/token, "
              "fp4_e2m1/token/asym (fp32 scales, no clip)")
_CODES = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
_OUTS = ("qdq", "codes", "rotated")
_MAX_BASE = 128  # largest padded Paley base / Sylvester factor: one dot operand in registers
_MAX_TILE = 1 << 16  # padded elements of one row held by one program
# On a GPU, with a Hadamard: its permutes stage the tile through shared memory at 16 bytes per
# element (offline sm_90 compile: 128 KiB at 8192, 256 KiB at 16384, over the 227 KiB a block
# may use). Without one (RMSNorm, plain rows) the tile stays in registers.
_MAX_TILE_GPU = 1 << 13

#: Autotune configs (CUDA): the row is one tile, so only the warp count varies.
CONFIGS = [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]


def _prune(configs, named_args, **kwargs):
    """Keep the (at most two) warp counts giving each thread 16..63 elements of the row tile:
    fewer spill or starve the SM, and each extra config is one more compile per shape."""
    tile = kwargs["NB"] * kwargs["P1"] * kwargs["P2"] * kwargs["Q"]
    keep = [c for c in configs if 16 <= tile // (32 * c.num_warps) < 64]
    return keep or [min(configs, key=lambda c: abs(tile // (32 * c.num_warps) - 32))]


# --- kernel ----------------------------------------------------------------------------------

@triton.jit
def _hadamard(x, base_ptr, NB: tl.constexpr, P1: tl.constexpr, R1: tl.constexpr,
              P2: tl.constexpr, R2: tl.constexpr, Q: tl.constexpr):
    """Unnormalized ``H_R1 (x) H_R2 (x) base`` on each ``[P1, P2, Q]`` block of ``x``."""
    if Q > 1:
        k = tl.arange(0, Q)
        hq = tl.load(base_ptr + k[:, None] * Q + k[None, :]).to(tl.float32)
        t = tl.dot(tl.reshape(x, [NB * P1 * P2, Q]), hq, input_precision="tf32x3")
        x = tl.reshape(t, [NB, P1, P2, Q])
    if P2 > 1:
        t = tl.reshape(tl.permute(x, (0, 1, 3, 2)), [NB * P1 * Q, P2])
        t = tl.dot(t, sylvester(P2, R2), input_precision="tf32x3")
        x = tl.permute(tl.reshape(t, [NB, P1, Q, P2]), (0, 1, 3, 2))
    if P1 > 1:
        t = tl.reshape(tl.permute(x, (0, 2, 3, 1)), [NB * P2 * Q, P1])
        t = tl.dot(t, sylvester(P1, R1), input_precision="tf32x3")
        x = tl.permute(tl.reshape(t, [NB, P2, Q, P1]), (0, 3, 1, 2))
    return x


@triton.jit
def _act_quant_kernel(
    x_ptr, w_ptr, base_ptr, out_ptr, scale_ptr,
    D, d_f, stride_x, stride_o, stride_w, nblk, size, qn, inv_norm, eps,
    NB: tl.constexpr, P1: tl.constexpr, R1: tl.constexpr, P2: tl.constexpr,
    R2: tl.constexpr, Q: tl.constexpr,
    HAD: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, GATE: tl.constexpr,
    ELEM: tl.constexpr, ASYM: tl.constexpr, LMAX: tl.constexpr,
    OUT: tl.constexpr, XDT: tl.constexpr, NATIVE: tl.constexpr,
):
    """One row per program. Element d = b*size + (i1*R2 + i2)*qn + j of the [NB, P1, P2, Q]
    tile; padding lanes load 0, which changes no statistic (asym ranges clamp at 0).
    ``w_ptr``: the RMSNorm weight (``stride_w`` 0) or, with ``GATE``, the rows of ``up``: the
    row quantized is then ``silu(x) * up``, rounded to x's dtype after each op as the two
    eager ops round (``silu(0) * 0 = 0`` on padding lanes)."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, NB)[:, None, None, None]
    i1 = tl.arange(0, P1)[None, :, None, None]
    i2 = tl.arange(0, P2)[None, None, :, None]
    j = tl.arange(0, Q)[None, None, None, :]
    off = b * size + (i1 * R2 + i2) * qn + j
    mask = (b < nblk) & (i1 < R1) & (i2 < R2) & (j < qn)
    x = tl.load(x_ptr + row * stride_x + off, mask=mask, other=0.0).to(tl.float32)
    if GATE:
        u = tl.load(w_ptr + row * stride_w + off, mask=mask, other=0.0).to(tl.float32)
        x = round_to(round_to(x / (1.0 + tl.exp(-x)), XDT) * u, XDT)
    if HAD:
        # Rounded to x's dtype like the unfused qcompile::hadamard op's output.
        x = round_to(_hadamard(x, base_ptr, NB, P1, R1, P2, R2, Q) * inv_norm, XDT)
    if NORM:
        ms = tl.div_rn(tl.sum(x * x), d_f)
        x = x * tl.div_rn(1.0, tl.sqrt_rn(ms + eps))
        if HAS_W:
            x = x * tl.load(w_ptr + off, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + row * stride_o + off
    if OUT == 2:
        tl.store(o_ptrs, x.to(out_ptr.dtype.element_ty), mask=mask)  # already exact
    else:  # the row kernels' quantize (no IEEE division per element; FP8 by the hardware)
        _quantize_store(x, o_ptrs, mask, scale_ptr + row, ELEM, ASYM, LMAX, OUT, XDT, NATIVE)


_act_quant_tuned = triton.autotune(
    configs=CONFIGS,
    key=["D", "NB", "P1", "P2", "Q", "HAD", "NORM", "GATE", "ELEM", "ASYM", "OUT"],
    prune_configs_by=tuning(_prune, _act_quant_kernel), do_bench=plain_bench,
)(_act_quant_kernel)


# --- planning --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """Row tile ``[nb, p1, p2, qp]`` of a launch (see the module docstring)."""

    size: int  # Hadamard block (D without one)
    nblk: int  # blocks per row
    nb: int  # padded blocks (power of two; enough that every dot has M >= 16)
    r1: int
    p1: int
    r2: int
    p2: int
    q: int  # elements per Q row (base order, or D without Hadamard)
    qp: int  # padded q
    base: tuple[int, int] | None  # (2^j, m): the Q-axis matrix H_{2^j} (x) H_m
    inv_norm: float


@functools.lru_cache(maxsize=256)
def _plan(had_size: int, d: int) -> _Plan:
    if had_size == 0:
        return _Plan(d, 1, 1, 1, 1, 1, 1, d, _pow2_ceil(d), None, 1.0)
    factors = hadamard_factors(had_size)
    if factors is None:
        raise ValueError(f"no Hadamard construction of order {had_size} (sizes are 2^k * m "
                         "with m 1 or a Paley order: 12, 20, 28, 36, 40, 60, ...)")
    if d % had_size:
        raise ValueError(f"Hadamard size {had_size} does not divide the last dim {d}")
    pow2, m = factors
    if m > _MAX_BASE:
        raise ValueError(f"Hadamard size {had_size} = {pow2} x {m}: the fused kernel takes "
                         f"base orders m <= {_MAX_BASE}")
    if pow2 < 16 and pow2 * m <= _MAX_BASE:
        base, q, rest = (pow2, m), pow2 * m, 1  # small 2^k folded into the base matrix
    else:
        base, q, rest = ((1, m), m, pow2) if m > 1 else (None, 1, pow2)
    qp = max(16, _pow2_ceil(q)) if q > 1 else 1
    if rest == 1:
        r1 = r2 = 1
    elif rest <= _MAX_BASE:
        r1, r2 = 1, rest
    else:
        k = rest.bit_length() - 1
        r1, r2 = 1 << (k // 2), 1 << (k - k // 2)
        if r2 > _MAX_BASE:
            raise ValueError(f"Hadamard size {had_size}: the fused kernel takes power-of-two "
                             f"factors up to {_MAX_BASE * _MAX_BASE}")
    p1, p2 = max(r1, 16) if r1 > 1 else 1, max(r2, 16) if r2 > 1 else 1
    # Every tl.dot needs M >= 16: pad the block axis until the smallest one has it.
    others = [n for n, on in ((p1 * p2, qp > 1), (p1 * qp, p2 > 1), (p2 * qp, p1 > 1)) if on]
    nblk = d // had_size
    nb = _pow2_ceil(nblk)
    while others and nb * min(others) < 16:
        nb *= 2
    return _Plan(had_size, nblk, nb, r1, p1, r2, p2, q, qp, base,
                 1.0 / math.sqrt(had_size))


def _spec(fmt: str, out: str, outs: tuple[str, ...]) -> FormatSpec:
    if out not in outs:
        raise ValueError(f"out must be one of {', '.join(map(repr, outs))}, got {out!r}")
    spec = spec_of(fmt)
    if (spec.granularity != "token" or spec.scale != "fp32" or spec.clip != 1.0
            or (spec.elem, spec.asym) not in _FORMATS):
        raise FormatError(f"activation format {fmt!r} has no fused quantize kernel; "
                          f"supported: {_SUPPORTED}")
    if out == "codes" and (spec.asym or spec.elem not in _CODES):
        raise FormatError(f"out='codes' needs fp8_e4m3/token or int8/token, got {fmt!r}")
    return spec


def _rows(x: object, name: str = "x") -> torch.Tensor:
    check_tensor(x, name, _DTYPES)
    assert isinstance(x, torch.Tensor)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise KernelInputError(f"{name} needs a non-empty last dim, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise KernelInputError(f"{name} must be contiguous in its last dim, got strides "
                               f"{x.stride()}")
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        raise KernelInputError(f"{name} (shape {tuple(x.shape)}, strides {x.stride()}) cannot "
                               "be viewed as [rows, D]: make it contiguous") from None


def _launch(x: torch.Tensor, spec: FormatSpec, had_size: int, out: str,
            weight: torch.Tensor | None = None, eps: float | None = None,
            up: torch.Tensor | None = None):
    x2 = _rows(x)
    m_rows, d = x2.shape
    fp32 = x.dtype == torch.float32
    plain = eps is None and up is None  # the row kernels take neither prologue
    plan2 = had2_plan(had_size, d, fp32) if plain else None
    kplan = kron_plan(had_size, d, fp32) if plain and plan2 is None else None
    plan = _plan(had_size, d) if plan2 is None and kplan is None else None
    tile = plan.nb * plan.p1 * plan.p2 * plan.qp if plan is not None else 0
    if tile > _MAX_TILE:
        raise ValueError(f"row of {d} elements (padded tile {tile}) is too long for the fused "
                         f"quantize kernel (at most {_MAX_TILE} padded elements)")
    if x.is_cuda and had_size and tile > _MAX_TILE_GPU:
        raise ValueError(
            f"row of {d} elements with Hadamard size {had_size} (padded tile {tile}): the "
            f"general fused quantize kernel needs 16 bytes of shared memory per tile element, "
            f"more than a GPU block has above {_MAX_TILE_GPU}; powers of two up to 16384 run "
            "in the two-product kernel for bf16/fp16 rows (up to 4096 for fp32); the "
            "qcompile::hadamard_quantize op runs the reference ops for such rows instead")
    if out == "codes":
        y = torch.empty((m_rows, d), dtype=_CODES[spec.elem], device=x.device)
    else:
        y = torch.empty((m_rows, d), dtype=x.dtype, device=x.device)
    scale = torch.empty((m_rows, 1), dtype=torch.float32, device=x.device)
    elem, lmax = _FORMATS[(spec.elem, spec.asym)]
    if m_rows and plan2 is not None:
        launch_had2(x2, y, scale, plan2, had_size, elem, spec.asym, lmax, _OUTS.index(out),
                    _XDT[x.dtype])
    elif m_rows and kplan is not None:
        launch_kron(x2, y, scale, kplan, elem, spec.asym, lmax, _OUTS.index(out), _XDT[x.dtype])
    elif m_rows:
        base = base_matrix(*plan.base, plan.qp, str(x.device)) if plan.base else scale
        w = up if up is not None else weight if weight is not None else x2
        args = (x2, w, base, y, scale,
                d, float(d), x2.stride(0), y.stride(0), 0 if up is None else up.stride(0),
                plan.nblk, plan.size, plan.q, plan.inv_norm, 0.0 if eps is None else float(eps))
        meta = dict(NB=plan.nb, P1=plan.p1, R1=plan.r1, P2=plan.p2, R2=plan.r2, Q=plan.qp,
                    HAD=had_size > 0, NORM=eps is not None, HAS_W=weight is not None,
                    GATE=up is not None,
                    ELEM=elem, ASYM=spec.asym, LMAX=lmax,
                    OUT=_OUTS.index(out), XDT=_XDT[x.dtype], NATIVE=not interpreting())
        if interpreting():  # autotuning under the interpreter only costs time
            _act_quant_kernel[(m_rows,)](*args, **meta, num_warps=4)
        else:
            launch(_act_quant_tuned, (m_rows,), *args, **meta)
    y = y.view(x.shape)
    if out == "codes":
        return y, scale.view(*x.shape[:-1], 1)
    return y


def fused_fits(had_size: int, d: int, dtype: torch.dtype, device: torch.device,
               norm: bool = False) -> bool:
    """Whether a fused kernel takes rows of ``d`` ``dtype`` elements on ``device`` with this
    Hadamard (``norm``: the RMSNorm variant, ``had_size`` 0); False for sizes the kernels
    reject (callers then run the reference ops)."""
    try:
        fp32 = dtype == torch.float32
        if not norm and (had2_plan(had_size, d, fp32) is not None
                         or kron_plan(had_size, d, fp32) is not None):
            return True
        plan = _plan(had_size, d)
    except ValueError:
        return False
    tile = plan.nb * plan.p1 * plan.p2 * plan.qp
    gpu = torch.device(device).type == "cuda" and had_size > 0  # only the permutes stage
    return tile <= (_MAX_TILE_GPU if gpu else _MAX_TILE)


# --- public API ------------------------------------------------------------------------------

def _check_had_size(had_size: object) -> int:
    if isinstance(had_size, bool) or not isinstance(had_size, int) or had_size < 0:
        raise ValueError(f"had_size must be a non-negative int (0: no rotation), got {had_size!r}")
    return had_size


def act_quant(x: torch.Tensor, fmt: str, had_size: int = 0, out: str = "qdq"):
    """Per-token quantization of ``x`` (after an optional online Hadamard), fused.

    Args:
        x: ``[..., D]`` bf16/fp16/fp32 on CUDA (or CPU under ``TRITON_INTERPRET=1``),
            contiguous in the last dim.
        fmt: ``fp8_e4m3/token``, ``int8/token``, ``int4/token/asym``, ``fp4_e2m1/token`` or
            ``fp4_e2m1/token/asym``.
        had_size: 0, or the order of the normalized Hadamard applied to each trailing block of
            the last dim first (``2^k * m``, ``m`` a Paley order up to 128; it must divide D).
        out: ``"qdq"`` (dequantized, ``x``'s dtype), ``"codes"`` (``(q, scale)``, FP8/INT8
            only) or ``"rotated"`` (the rotated ``x`` in its dtype, not quantized).

    Returns:
        ``"qdq"``/``"rotated"``: a tensor like ``x``. ``"codes"``: ``q`` (float8_e4m3fn or
        int8, ``x``'s shape) and fp32 ``scale`` ``[..., 1]`` with ``q.float() * scale`` the qdq
        result in fp32.

    Raises:
        FormatError: ``fmt`` has no kernel here (or no codes for ``out="codes"``).
        ValueError: Bad ``out``, or ``had_size`` unsupported or not dividing D.
        KernelInputError: ``x`` has the wrong dtype, layout or device.
    """
    spec = _spec(fmt, out, _OUTS)
    return _launch(x, spec, _check_had_size(had_size), out)


def act_quant_ref(x: torch.Tensor, fmt: str, had_size: int = 0, out: str = "qdq"):
    """Plain PyTorch reference of :func:`act_quant` (any device): the qcompile ops."""
    spec = _spec(fmt, out, _OUTS)
    xr = hadamard(x, _check_had_size(had_size)) if had_size else x
    return _ref_out(xr, spec, fmt, out, x.dtype)


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor | None, eps: float, fmt: str,
                  out: str = "qdq"):
    """RMSNorm then per-token quantization in one pass over each row.

    ``y = x * rsqrt(mean(x^2) + eps) * weight`` in fp32 (``weight`` optional), quantized from
    fp32 as :func:`act_quant` quantizes (the qdq result is rounded to ``x``'s dtype once).

    Args:
        x: ``[..., D]`` bf16/fp16/fp32, as for :func:`act_quant`.
        weight: ``[D]`` bf16/fp16/fp32 on ``x``'s device, or None.
        eps: Added to the mean square.
        fmt: As for :func:`act_quant`.
        out: ``"qdq"`` or ``"codes"``.

    Returns:
        As :func:`act_quant`.

    Raises:
        FormatError, ValueError, KernelInputError: As :func:`act_quant`; also for ``weight``.
    """
    spec = _spec(fmt, out, _OUTS[:2])
    x2 = _rows(x)
    if weight is not None:
        check_tensor(weight, "weight", _DTYPES, shape=(x2.shape[1],), device=x.device)
        if not weight.is_contiguous():
            raise KernelInputError("weight must be contiguous")
    return _launch(x, spec, 0, out, weight, float(eps))


def silu_quant(x: torch.Tensor, up: torch.Tensor, fmt: str, out: str = "qdq"):
    """``silu(x) * up`` (rounded to ``x``'s dtype after each op, as the eager ops round) then
    per-token quantization, in one pass over each row: the SiLU gate of a Llama MLP in front
    of an FP8 or W4A8 ``down_proj``.

    Args:
        x: The gate ``[..., D]`` bf16/fp16/fp32, as for :func:`act_quant`.
        up: Like ``x`` (shape and dtype), contiguous in its last dim.
        fmt: As for :func:`act_quant`.
        out: ``"qdq"`` or ``"codes"``.

    Returns:
        As :func:`act_quant`.

    Raises:
        FormatError, ValueError, KernelInputError: As :func:`act_quant`; also for ``up``.
    """
    spec = _spec(fmt, out, _OUTS[:2])
    x2 = _rows(x)
    if not isinstance(up, torch.Tensor) or up.shape != x.shape or up.dtype != x.dtype:
        raise KernelInputError(f"up must be a tensor of x's shape {tuple(x.shape)} and dtype "
                               f"{x.dtype}, got {getattr(up, 'shape', type(up))} "
                               f"{getattr(up, 'dtype', '')}")
    u2 = _rows(up, "up")
    if u2.device != x2.device:
        raise KernelInputError(f"up is on {u2.device}, x on {x2.device}")
    return _launch(x, spec, 0, out, up=u2)


def silu_quant_ref(x: torch.Tensor, up: torch.Tensor, fmt: str, out: str = "qdq"):
    """Plain PyTorch reference of :func:`silu_quant`."""
    spec = _spec(fmt, out, _OUTS[:2])
    return _ref_out(linear_input(x, up=up), spec, fmt, out, x.dtype)


def rmsnorm_quant_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, fmt: str,
                      out: str = "qdq"):
    """Plain PyTorch reference of :func:`rmsnorm_quant`."""
    spec = _spec(fmt, out, _OUTS[:2])
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return _ref_out(y, spec, fmt, out, x.dtype)


def _ref_out(xr: torch.Tensor, spec: FormatSpec, fmt: str, out: str, dtype: torch.dtype):
    if out == "rotated":
        return xr
    if out == "qdq":
        return quantize_activation(xr, fmt).to(dtype)
    xf = xr.float()
    s = compute_scales(spec, group_stats(xf, spec), None).scale
    return _round_f32(xf / s, spec.elem).to(_CODES[spec.elem]), s
