"""Per-token quantization with a power-of-two online Hadamard as two matrix products.

The fast path of :func:`qcompile.backends.triton.act_quant.act_quant` for ``had_size`` 0 or a
power of two ``2^k >= 16`` with ``D <= 16384``: each token row ``x`` (``D = nblk * size``) is
viewed row-major as a matrix ``X`` ``[nblk * R, C]`` with ``C = min(size, 128)`` and
``R = size / C``. The Sylvester matrix factors as ``H_size = H_R (x) H_C`` on that layout
(``popcount(i & j)`` splits over the high and the low index bits), so the rotated row is

    ``Y = (I_nblk (x) H_R) @ (X @ H_C) / sqrt(size)``

two plain 2-D products and no permutes (the general kernel of ``act_quant`` moves its tile
through three permutes per row). ``8192 = 64 x 128`` takes ``2 * (128 + 3 * 64)`` flops per
element.

Numerics. ``X @ H_C`` runs on bf16/fp16 tensor cores with the input as it is: +-1 products are
exact and the sums are fp32, like the reference's fp32 butterfly up to order. Its fp32 result
``T`` is then split for the left product so that it keeps fp32 accuracy: scaled by a power of
two into fp16's range and split as ``hi + lo`` in fp16 (22 bits; :data:`DEFAULT_PARTS`), or as
three bf16 parts (24 bits). Two bf16 parts would leave 0.24 % of bf16 outputs one ulp off the
reference; either split leaves 0.003 %, the fp32 summation-order floor. One fp16 part is a
speed variant, not the default (its error: :data:`DEFAULT_PARTS`). Parts 0 skips the split:
the left factor runs as ``log2(R)`` butterfly stages of fp32 adds on ``T`` in registers (the
compiler moves ``T`` once into a layout that holds a column per thread), which is the
reference's own arithmetic on ``T``'s exact sums. fp32 inputs use ``tf32x3`` dots instead
(or, with parts 0, the same butterflies). The rotated row is
rounded to ``x``'s dtype (RNE conversion), then quantized with the scale rule of
:func:`qcompile.formats.scales.compute_scales`; the divide by the scale is a multiply by its
reciprocal with one fma correction (Markstein), which gives the correctly rounded quotient of
``x / s`` for every finite input without an IEEE division per element (rows whose scale is
below 2^-64 take a branch that scales them up by 2^64 first, which changes no quotient; the
usual row pays no multiply for it). On the GPU the bf16/fp16 and FP8 roundings are the
hardware's RNE conversions, and FP8 codes are stored straight from the conversion; under the
interpreter (whose RTNE casts drop the carry into the next binade, and turn subnormals into
wrong values) the bit-trick roundings of :mod:`jit`. Without a Hadamard the result is
bit-exact with the reference.

Each program walks rows ``pid, pid + programs, ...`` with the next row's load in flight
(``tl.range`` pipelining), so the two constant matrices are built once per program.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qcompile.backends.triton.act_jit import nonzero_or_one, round_elem, round_to
from qcompile.backends.triton.jit import exp2i, floor_log2, rint
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.pdl import prefetch
from qcompile.backends.triton.runtime import graph_bench, interpreting, sm_count, tuning

__all__ = ["HAD2_CONFIGS", "HAD2_ROW_CONFIGS", "had2_plan", "launch_had2"]

_MAX_C = 128  # right factor: one [C, C] operand
_MAX_RP = 128  # left factor (block diagonal over the blocks of a row), padded
_MAX_TILE = 1 << 14  # elements of one row tile held by a program
#: Parts of the left product's fp32 operand: 3 (bf16 hi + mid + lo, 24 bits) or 2 (fp16 hi +
#: lo of the tile scaled by a power of two, 22 bits, one MMA less). Emulated on 64 heavy-tailed
#: bf16 rows of 8192, both leave 0.003 % of the bf16 outputs one ulp off the reference's
#: (the fp32 summation-order floor); two bf16 parts would leave 0.24 %. 1 (the fp16 hi part
#: alone, one MMA less again) is a speed variant measured by ``benchmarks/kernels_act.py``:
#: on 16 heavy-tailed rows of 8192 it left 10 % of the bf16 outputs one ulp off, 1.1 % of the
#: FP8 codes one step off the reference's, and an error beyond the output's own rounding of
#: at most 2^-12 of the row's absmax (:data:`ONE_PART_ERROR`, with margin, is what the tests
#: allow). On the H100, going from three parts to two cut 37 us (1.63x -> 1.24x of a copy).
#: 0 (no split: the left factor as fp32 butterflies) is the most accurate: on those 16 rows
#: no bf16 output differed from the reference's (fp16: 0.01 %, against 0.05 % with two parts;
#: ``benchmarks/had_accuracy.py`` measures every variant).
#: It halves the MMA work but adds ``log2(R)`` adds per element: offline sm_90 SASS counts
#: 21.1 instructions per element on the row loop's hot path against two parts' 17.8 and one
#: part's 13.9 (``benchmarks/sass_census.py``, 4 warps), so which is faster is for
#: ``kernels_act.py`` to time; it is not the default until then.
DEFAULT_PARTS = 2
#: Error bound of one part beyond the rounding to x's dtype, relative to the row's absmax.
ONE_PART_ERROR = 2.0**-10
#: With two parts: compute the transposed products (``T^T = H_C X^T``, ``Y^T = T^T H_L``), so
#: the constant ``H_C`` and the split parts are register operands of the MMAs and only the
#: loaded rows and ``H_L`` sit in shared memory.
DEFAULT_TRANS = False

#: Autotune configs (CUDA): warps, pipeline stages of the row loop, programs per SM (PER_SM).
#: (Also :mod:`kron_quant`'s.)
HAD2_CONFIGS = [
    triton.Config({"PER_SM": ps}, num_warps=w, num_stages=s)
    for w, s, ps in ((4, 2, 2), (8, 2, 2), (4, 3, 2), (8, 2, 1), (4, 2, 4), (8, 3, 1))
]
#: This kernel's configs: those, and four that also ask L2 for the row a program takes
#: ``AHEAD`` iterations later. In the sm_90 SASS a 2-stage program (96 KB of shared memory
#: with 4 warps, so two fit on an SM) issues the next row's load at the end of an iteration
#: and waits for it at the top of the next (``DEPBAR.LE SB0, 0x0``): its loads never overlap
#: its own work. A 3-stage one (112 KB; two still fit) keeps one row in flight while it
#: computes (``DEPBAR.LE SB0, 0x1``). The prefetches make the waited-for load an L2 hit
#: without more shared memory (the H100's 1.24x of a copy was about the sum of its load and
#: compute times, not the larger of them).
HAD2_ROW_CONFIGS = [triton.Config(dict(c.kwargs, AHEAD=0), num_warps=c.num_warps,
                                  num_stages=c.num_stages) for c in HAD2_CONFIGS] + [
    triton.Config({"PER_SM": ps, "AHEAD": a}, num_warps=w, num_stages=s)
    for w, s, ps, a in ((4, 2, 2, 2), (4, 2, 2, 4), (4, 3, 2, 2), (8, 2, 1, 2))
]


@triton.jit
def _div(x, s, inv):
    """``x / s`` correctly rounded from ``inv = 1 / s`` (rounded): product + fma correction."""
    q = x * inv
    return tl.fma(tl.fma(-q, s, x), inv, q)


@triton.jit
def _operand(v, NATIVE: tl.constexpr):
    """A bf16/fp16 dot operand as it is on the GPU; as fp32 holding the same values under the
    interpreter (its dots read bf16 tensors as their raw bits)."""
    if not NATIVE:
        v = v.to(tl.float32)
    return v


@triton.jit
def _to_dtype_grid(y, XDT: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 rounded (RNE) onto the grid of x's dtype (0 fp32, 1 bf16, 2 fp16), as fp32: by the
    hardware conversion (``NATIVE``), else by the bit tricks (the interpreter's RTNE casts
    lose the carry when a mantissa rounds up into the next binade)."""
    if not NATIVE:
        y = round_to(y, XDT)
    elif XDT == 1:
        y = y.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    elif XDT == 2:
        y = tl.minimum(tl.maximum(y, -65504.0), 65504.0)  # saturate like the fp16 reference
        y = y.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    return y


@triton.jit
def _quantize_store(y, o_ptrs, mask, scale_ptr, ELEM: tl.constexpr, ASYM: tl.constexpr,
                    LMAX: tl.constexpr, OUT: tl.constexpr, XDT: tl.constexpr,
                    NATIVE: tl.constexpr):
    """Per-row scale (compute_scales' rule), quantize ``y`` and store codes or qdq values."""
    if ASYM:
        hi = tl.maximum(tl.max(y), 0.0)
        lo = tl.maximum(-tl.min(y), 0.0)
        # As for the symmetric formats below: a scale under 2^-64 (1/s would overflow) takes
        # a branch that scales x and s up by 2^64 (exact); the usual row pays no multiply.
        if ELEM == 2:
            s = nonzero_or_one(tl.div_rn(hi + lo, LMAX))
            if s < 5.421010862427522e-20:
                q = _div(y * 1.8446744073709552e19, s * 1.8446744073709552e19,
                         tl.div_rn(1.0, s * 1.8446744073709552e19))
            else:
                q = _div(y, s, tl.div_rn(1.0, s))
            z = tl.minimum(tl.maximum(rint(tl.div_rn(lo, s)), 0.0), LMAX)
            v = tl.minimum(tl.maximum(rint(q) + z, 0.0), LMAX)
            val = (v - z) * s
        else:  # AFPQ: one scale per sign
            s = nonzero_or_one(tl.div_rn(hi, LMAX))
            sn = nonzero_or_one(tl.div_rn(lo, LMAX))
            neg = y < 0
            sy = tl.where(neg, sn, s)
            if tl.minimum(s, sn) < 5.421010862427522e-20:
                # Only the tiny side's values and scale go up: the other scale may be too
                # large to take 2^64 (fp32 overflow).
                ks = tl.where(s < 5.421010862427522e-20, 1.8446744073709552e19, 1.0)
                kn = tl.where(sn < 5.421010862427522e-20, 1.8446744073709552e19, 1.0)
                k = tl.where(neg, kn, ks)
                q = _div(y * k, sy * k,
                         tl.where(neg, tl.div_rn(1.0, sn * kn), tl.div_rn(1.0, s * ks)))
            else:
                q = _div(y, sy, tl.where(neg, tl.div_rn(1.0, sn), tl.div_rn(1.0, s)))
            v = round_elem(q, ELEM, LMAX)
            val = v * sy  # v < 0 only where y < 0 (else v is +-0 and either scale gives 0)
    else:
        s = nonzero_or_one(tl.div_rn(tl.max(tl.abs(y)), LMAX))
        if s < 5.421010862427522e-20:  # 1/s would overflow: x and s up by 2^64 (exact)
            q = _div(y * 1.8446744073709552e19, s * 1.8446744073709552e19,
                     tl.div_rn(1.0, s * 1.8446744073709552e19))
        else:  # the usual row: no per-element rescale
            q = _div(y, s, tl.div_rn(1.0, s))
        if ELEM == 0 and NATIVE:
            v = q.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
        else:
            v = round_elem(q, ELEM, LMAX)
        val = v * s
    if OUT == 1:
        if not ASYM and ELEM == 0 and NATIVE:  # FP8 codes: the conversion itself, no round trip
            tl.store(o_ptrs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
        else:
            tl.store(o_ptrs, v.to(o_ptrs.dtype.element_ty), mask=mask)  # on the grid: exact
        tl.store(scale_ptr, s)
    else:
        tl.store(o_ptrs, _to_dtype_grid(val, XDT, NATIVE).to(o_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _butterfly(y, RP: tl.constexpr, C: tl.constexpr, H: tl.constexpr):
    """One stage of the left factor: rows ``i`` and ``i + H`` of each ``2 H``-row block of
    ``y`` ``[RP, C]`` become their sum and difference (fp32 adds, as the reference's
    butterfly). The split axis is a register axis of the stage's layout, so the compiler keeps
    it in each thread (sm_90: one layout change for all stages, none per stage)."""
    y = tl.permute(tl.reshape(y, [RP // (2 * H), 2, H * C]), (0, 2, 1))
    a, b = tl.split(y)
    y = tl.permute(tl.join(a + b, a - b), (0, 2, 1))
    return tl.reshape(y, [RP, C])


@triton.jit
def _had2_quant_kernel(
    x_ptr, out_ptr, scale_ptr, M, D, stride_x, stride_o, inv_norm,
    NR: tl.constexpr, RP: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    HAD: tl.constexpr, ELEM: tl.constexpr, ASYM: tl.constexpr, LMAX: tl.constexpr,
    OUT: tl.constexpr, XDT: tl.constexpr, NATIVE: tl.constexpr, PARTS: tl.constexpr,
    TRANS: tl.constexpr, PER_SM: tl.constexpr, LINES: tl.constexpr, STEP: tl.constexpr,
    AHEAD: tl.constexpr = 0, m_bucket=1,
):
    """Rows ``pid, pid + programs, ...``; element ``d = r * C + c`` of a row is ``X[r, c]``
    (``r < NR``, ``d < D``); padding loads 0, which changes no statistic. ``PER_SM`` sizes
    the grid and ``m_bucket`` (the row count's power-of-two bucket) keys the autotuning.
    ``AHEAD`` > 0: each iteration first asks L2 for the row ``AHEAD`` iterations on, as
    ``LINES`` 128-byte lines of ``STEP`` elements (compiled kernels only: a hint)."""
    r = tl.arange(0, RP)[:, None]
    c = tl.arange(0, C)[None, :]
    off = r * C + c
    mask = (r < NR) & (off < D)
    if HAD:
        # Right factor H_C and left factor I (x) H_R (zero past NR), +-1 from bit parities.
        t = tl.arange(0, C)[:, None] & tl.arange(0, C)[None, :]
        t = t ^ (t >> 4)
        t = t ^ (t >> 2)
        t = t ^ (t >> 1)
        h_c = 1.0 - 2.0 * (t & 1).to(tl.float32)
        if XDT != 0 and NATIVE:
            h_c = h_c.to(x_ptr.dtype.element_ty)  # exact; the dot then runs at bf16/fp16 rate
        if R > 1 and PARTS > 0:
            i = tl.arange(0, RP)[:, None]
            j = tl.arange(0, RP)[None, :]
            u = i & j & (R - 1)
            u = u ^ (u >> 4)
            u = u ^ (u >> 2)
            u = u ^ (u >> 1)
            same = ((i // R) == (j // R)) & (i < NR) & (j < NR)
            h_l = tl.where(same, 1.0 - 2.0 * (u & 1).to(tl.float32), 0.0)
            h_l16 = h_l
            if XDT != 0 and NATIVE:
                h_l16 = h_l.to(tl.float16)
                h_l = h_l.to(tl.bfloat16)
    pid = tl.program_id(0)
    for row in tl.range(pid, M, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        if AHEAD > 0 and NATIVE:
            ahead = tl.minimum(row + AHEAD * tl.num_programs(0), M - 1)
            lines = tl.minimum(tl.arange(0, LINES) * STEP, D - 1)
            prefetch(x_ptr + tl.cast(ahead, tl.int64) * stride_x + lines)
        x = tl.load(x_ptr + row64 * stride_x + off, mask=mask, other=0.0)
        if HAD:
            post = inv_norm  # what multiplies the rotated row before its rounding
            if XDT == 0:
                y = tl.dot(x, h_c, input_precision="tf32x3")
                if R > 1 and PARTS > 0:
                    y = tl.dot(h_l, y, input_precision="tf32x3")
            else:
                if not (TRANS and R > 1 and (PARTS == 1 or PARTS == 2)):
                    y = tl.dot(_operand(x, NATIVE), h_c)
                if R > 1 and PARTS == 3:
                    # fp32 T as hi + mid + lo in bf16 (24 bits), smallest part first.
                    hi = y.to(tl.bfloat16)
                    rest = y - hi.to(tl.float32)
                    mid = rest.to(tl.bfloat16)
                    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
                    y = tl.dot(h_l, _operand(lo, NATIVE))
                    y = tl.dot(h_l, _operand(mid, NATIVE), y)
                    y = tl.dot(h_l, _operand(hi, NATIVE), y)
                elif R > 1 and PARTS > 0:
                    if TRANS:  # T^T = H_C X^T: the constant H_C is the register (A) operand
                        y = tl.dot(h_c, tl.trans(_operand(x, NATIVE)))
                    # T scaled by a power of two to put its largest magnitude in [2^14, 2^15),
                    # then hi + lo in fp16 (22 bits; the scaling keeps both in fp16's range).
                    # e is at least -100, so 2^(14-e) and 2^(e-14)/sqrt(size) are normal
                    # numbers; a tile under 2^-100 (or all zero) is scaled by 2^114 and its
                    # parts only lose bits below fp32's normal range.
                    e = tl.maximum(floor_log2(tl.max(tl.abs(y))), -100)
                    y = y * exp2i(14 - e)
                    hi = y.to(tl.float16)
                    if PARTS == 1:  # hi alone: 11 bits, one MMA (see ONE_PART_REL_ERROR)
                        if TRANS:
                            y = tl.trans(tl.dot(_operand(hi, NATIVE), h_l16))
                        else:
                            y = tl.dot(h_l16, _operand(hi, NATIVE))
                    else:
                        lo = (y - hi.to(tl.float32)).to(tl.float16)
                        if TRANS:  # Y^T = T^T H_L: the parts stay in registers as A operands
                            y = tl.dot(_operand(lo, NATIVE), h_l16)
                            y = tl.trans(tl.dot(_operand(hi, NATIVE), h_l16, y))
                        else:
                            y = tl.dot(h_l16, _operand(lo, NATIVE))
                            y = tl.dot(h_l16, _operand(hi, NATIVE), y)
                    # The scaling undone with the 1/sqrt(size) in one multiply: 2^(e-14) is a
                    # power of two and the product a normal number, so it rounds as the two did.
                    post = exp2i(e - 14) * inv_norm
            if R > 1 and PARTS == 0:  # I (x) H_R: log2(R) fp32 stages, on T's exact sums
                for stage in tl.static_range(0, 7):  # R <= RP <= 128
                    if (1 << stage) < R:
                        y = _butterfly(y, RP, C, 1 << stage)
            # Rounded to x's dtype like the unfused qcompile::hadamard op's output.
            y = _to_dtype_grid(y * post, XDT, NATIVE)
        else:
            y = x.to(tl.float32)
        o_ptrs = out_ptr + row64 * stride_o + off
        if OUT == 2:  # the rotated row, unquantized (already on x's grid)
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            _quantize_store(y, o_ptrs, mask, scale_ptr + row64, ELEM, ASYM, LMAX, OUT, XDT,
                            NATIVE)


#: Row-tile elements per thread a config may hold (bf16 rows, fp16 rows, fp32 rows): beyond
#: them ptxas spills on sm_90 (offline compile: 16384 bf16 at 128 per thread spilled 480 B,
#: 4096 fp16 at 32 spilled 8 B; fp32's tf32x3 dots need the most registers).
_PER_THREAD = {1: 64, 2: 16, 0: 8}


def _prune(configs, named_args, **kwargs):
    """Drop warp counts that would leave a thread more of the row tile than it holds without
    spilling; if none is left, keep the configs with the most warps."""
    tile = kwargs["RP"] * kwargs["C"]
    limit = _PER_THREAD[kwargs["XDT"]]
    keep = [c for c in configs if tile // (32 * c.num_warps) <= limit]
    most = max(c.num_warps for c in configs)
    return keep or [c for c in configs if c.num_warps == most]


def _grid(m_rows: int, sms: int):
    return lambda meta: (max(1, min(m_rows, sms * meta["PER_SM"])),)


_had2_tuned = triton.autotune(
    configs=HAD2_ROW_CONFIGS,
    key=["D", "NR", "RP", "R", "C", "HAD", "ELEM", "ASYM", "OUT", "XDT", "NATIVE", "PARTS",
         "TRANS", "m_bucket"],
    prune_configs_by=tuning(_prune, _had2_quant_kernel), do_bench=graph_bench,
)(_had2_quant_kernel)


@dataclass(frozen=True)
class Had2Plan:
    """Row matrix ``[nr (padded rp), c]`` of a launch; ``r`` the left factor's order."""

    nr: int
    rp: int
    r: int
    c: int
    inv_norm: float


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=256)
def had2_plan(had_size: int, d: int, fp32: bool = False) -> Had2Plan | None:
    """The two-product layout for ``(had_size, D)``, or None when this kernel does not take it
    (``had_size`` not 0 or a power of two >= 16, not dividing D, a row over 16384, or fp32
    rows with a Hadamard over 4096: their tf32x3 tiles need more shared memory than sm_90
    has with Triton 3.6, and the general kernel takes them)."""
    if had_size == 0:
        c = min(_pow2_ceil(d), _MAX_C)
        r, nr = 1, -(-d // c)
    elif had_size >= 16 and had_size & (had_size - 1) == 0 and d % had_size == 0:
        c = min(had_size, _MAX_C)
        r, nr = had_size // c, d // c
    else:
        return None
    rp = max(16, _pow2_ceil(nr))
    if rp * c > _MAX_TILE or (had_size and rp > _MAX_RP) or (had_size and fp32 and rp * c > 4096):
        return None
    return Had2Plan(nr, rp, r, c, 1.0 / math.sqrt(had_size) if had_size else 1.0)


def launch_had2(x2: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, plan: Had2Plan,
                had_size: int, elem: int, asym: bool, lmax: float, out: int, xdt: int,
                parts: int | None = None, config: triton.Config | None = None) -> None:
    """Launch on ``x2`` ``[M, D]`` (checked by the caller) into ``y`` and ``scale``;
    ``parts``: how the left product splits its fp32 operand (default :data:`DEFAULT_PARTS`);
    ``config``: one of :data:`HAD2_ROW_CONFIGS` instead of the autotuner's pick (CUDA,
    benchmarks)."""
    m_rows, d = x2.shape
    args = (x2, y, scale, m_rows, d, x2.stride(0), y.stride(0), plan.inv_norm)
    meta = dict(NR=plan.nr, RP=plan.rp, R=plan.r, C=plan.c, HAD=had_size > 0, ELEM=elem,
                ASYM=asym, LMAX=lmax, OUT=out, XDT=xdt, NATIVE=not interpreting(),
                PARTS=DEFAULT_PARTS if parts is None else parts, TRANS=DEFAULT_TRANS,
                STEP=128 // x2.element_size())
    meta["LINES"] = _pow2_ceil(-(-d // meta["STEP"]))
    if interpreting():  # a few programs, so the row loop runs more than once
        _had2_quant_kernel[(min(m_rows, 3),)](*args, **meta, PER_SM=1, num_warps=4)
        return
    sms = sm_count(x2.device)
    bucket = min(_pow2_ceil(m_rows), 4096)
    if config is not None:
        launch(_had2_quant_kernel, _grid(m_rows, sms)(config.kwargs), *args, **meta,
               **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
               m_bucket=bucket)
        return
    launch(_had2_tuned, _grid(m_rows, sms), *args, **meta, m_bucket=bucket)
