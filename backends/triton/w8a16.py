"""W8A16: 8-bit weight-only linear (INT8 symmetric or asymmetric, FP8 E4M3 or E5M2) with
fp32 scales per output channel or per group along K, activations in bf16/fp16/fp32.

An 8-bit weight reads half the bytes of a 16-bit one. Where a W4 model keeps a layer at 8 bits
(the output head of ``w4-int4-head8``, a sensitive layer) or a model is 8-bit weight-only
throughout, the layer is memory-bound at decode and this halves its time.

Three routes by the rows ``M`` of ``x`` (flattened leading dims):

* ``M <= GEMV_MAX_M``: a split-K GEMV (:func:`_gemv_kernel`), one activation row per program
  row of the grid; the code values are multiplied by ``x`` in fp32 and each group's sum is
  scaled once (``y[n] = sum_g s[n, g] * sum_k v[n, k] x[k]``). The last program of a column
  tile sums the splits (one launch, so a batch-1 call gets a ``gemv_plan``). For one row it
  also does the decode fusions of :mod:`qcompile.backends.triton.gemv_fusion`.
* up to :data:`DEQUANT_MIN_M` rows: a tiled tensor-core GEMM (:func:`_gemm_kernel`) on the
  code values in ``x``'s dtype. INT8 values (``c - 128``, or ``c - zero`` for integer zero
  points: -255..255) and E4M3 and E5M2 values are all exact in bf16 and fp16, so the MMA
  sees the codes exactly and the scales apply to its fp32 sums.
* above: the weight decoded once into ``x``'s dtype (:func:`w8a16_dequant`, bit-exact with
  :func:`qcompile.ops.dequantize_weight`), then ``torch.nn.functional.linear`` (cuBLAS).

Codes decode without a table: INT8 through the fp32 bits of ``2^23 + c`` (an OR and one
exact subtraction); E4M3 by the hardware's conversion to fp16 (sm_89+: two codes per
instruction, where shifting its fields into an fp16 took about four per code); E5M2 as an
fp16's top byte. Every finite code decodes exactly. What the codes that no quantizer writes
(E4M3 NaN, E5M2 inf and NaN) decode to is left to the conversion (NaN on a GPU; the
interpreter's may differ).

With per-channel scales the GEMV can also keep a ``[BLOCK_N, BLOCK_K]`` accumulator through
the K loop (``ACC2`` configs): one FMA per code and a single sum at the end, against a sum of
products per K tile (see :data:`GEMV_CONFIGS`).

Numerics: the GEMV and the GEMM do not round ``W`` to ``x``'s dtype before the product as
:func:`w8a16_linear_ref` does, so 16-bit results can differ from it by that rounding summed
over K; fp32 results by the fp32 summation order. The dequantize route matches the reference
up to cuBLAS's summation order. Splits are summed in a fixed order: the same call gives the
same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qcompile.backends.triton import path_tuning
from qcompile.backends.triton.gemv_fusion import (
    GemvFusion,
    add_residual,
    epilogue_ref,
    fusion_args,
    load_x,
    prologue_ref,
    row_rstd,
)
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import (
    KernelInputError,
    arrival_counts,
    cdiv,
    check_tensor,
    interpreting,
    next_pow2,
    plain_bench,
    tuning,
)
from qcompile.backends.triton.w4a16 import (
    _DTYPE_KIND,
    _X_DTYPES,
    _check_any,
    _pick_split,
    _round_to,
    _splitk_reduce_kernel,
)
from qcompile.backends.triton.w4a16_tiles import _last_arrival, _reset_count, _sum_splits

__all__ = ["DEQUANT_MIN_M", "ELEMS", "GEMM_CONFIGS", "GEMV_CONFIGS", "GEMV_MAX_M",
           "default_route", "route_key", "w8a16_dequant", "w8a16_linear", "w8a16_linear_ref"]

#: 8-bit elements the kernels decode, by their ``qcompile.formats`` names.
ELEMS = {"int8": 0, "fp8_e4m3": 1, "fp8_e5m2": 2}
#: Largest M that takes the GEMV.
GEMV_MAX_M = 16
#: Smallest M that decodes the weight and calls cuBLAS; between the two, the tiled GEMM.
#: W4A16's crossover (``w4a16_dequant.DEQUANT_MIN_M``): the defaults where nothing is timed.
DEQUANT_MIN_M = 256
#: Smallest power-of-two factor of the group size the GEMV and GEMM take: their K tiles lie
#: inside one group, and a dot needs 16 along K. Other group sizes take the dequantize route.
MIN_TILE_K = 16


def _cfg(warps: int, stages: int, **kw: int) -> triton.Config:
    return triton.Config(kw, num_warps=warps, num_stages=stages)


#: GEMV tiles (64 codes per thread at 4 warps, 32-128 bytes of each row per program).
#: ``ACC2``: per-channel scales only; a [BLOCK_N, BLOCK_K] fp32 accumulator summed once after
#: the K loop, i.e. one FMA per code instead of a sum per tile (sm_90 SASS: 3.2 instead of
#: 8.6 instructions per E4M3 code, 4.8 instead of 5.7 per INT8 code) at about 50 more
#: registers, so fewer programs and bytes in flight per SM: the autotuner weighs the two.
GEMV_CONFIGS = [_cfg(4, 3, BLOCK_N=32, BLOCK_K=256, ACC2=0),
                _cfg(4, 3, BLOCK_N=16, BLOCK_K=512, ACC2=0),
                _cfg(4, 3, BLOCK_N=64, BLOCK_K=128, ACC2=0),
                _cfg(8, 3, BLOCK_N=32, BLOCK_K=512, ACC2=0),
                _cfg(4, 3, BLOCK_N=128, BLOCK_K=64, ACC2=0),
                _cfg(4, 3, BLOCK_N=64, BLOCK_K=32, ACC2=0),
                _cfg(4, 3, BLOCK_N=128, BLOCK_K=16, ACC2=0),
                _cfg(4, 3, BLOCK_N=32, BLOCK_K=256, ACC2=1),
                _cfg(4, 3, BLOCK_N=64, BLOCK_K=128, ACC2=1),
                _cfg(8, 3, BLOCK_N=32, BLOCK_K=512, ACC2=1)]
#: GEMM tiles; BLOCK_M above the call's M (rounded up to 16) is pruned.
GEMM_CONFIGS = [_cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),
                _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128),
                _cfg(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128),
                _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
                _cfg(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
                _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
                _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=16)]
# One small config each under the interpreter, where autotuning only costs time.
_INTERP_GEMV = {"BLOCK_N": 32, "BLOCK_K": 16, "ACC2": 1}  # ACC2 acts on channel scales only
_INTERP_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}
_MIN_GEMV_BLOCK_N = min(min(c.kwargs["BLOCK_N"] for c in GEMV_CONFIGS), _INTERP_GEMV["BLOCK_N"])
_DQ_BLOCK_N, _DQ_BLOCK_K = 32, 128


@triton.jit
def _values(c, zb, ELEM: tl.constexpr, HAS_ZERO: tl.constexpr):
    """fp32 values of codes ``c`` (uint8): INT8 ``c - 128``, or ``c - z`` (asym, ``zb`` =
    ``2^23 + z``, exact for integer zero points); E4M3 and E5M2 their values (E4M3 by the
    hardware's conversion to fp16, two codes per instruction on sm_89+)."""
    if ELEM == 0:
        m = (c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + c, exactly
        if HAS_ZERO:
            v = m - zb  # (2^23 + c) - (2^23 + z) = c - z: one exact subtraction
        else:
            v = m - 8388736.0  # 2^23 + 128
    elif ELEM == 1:
        v = c.to(tl.float8e4nv, bitcast=True).to(tl.float16).to(tl.float32)
    else:  # E5M2 is an fp16's top byte (one byte move; the interpreter's E5M2 conversion
        # flushes subnormals)
        v = (c.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _scales(acc, scale_ptr, outer_ptr, offs_n, n_ok, outer_stride, CHANNEL: tl.constexpr,
            HAS_OUTER: tl.constexpr):
    """The per-channel scale (when not applied per group) and the outer scale."""
    if CHANNEL:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_OUTER:
        acc = acc * tl.load(outer_ptr + offs_n * outer_stride, mask=n_ok, other=0.0)
    return acc


@triton.jit
def _store_row(acc, bias_ptr, out_ptr, res_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr,
               HAS_RES: tl.constexpr, KIND: tl.constexpr, EXACT: tl.constexpr):
    """``round(acc + bias)`` (then ``+ residual``, rounded again) into one row of ``out``
    (the order of ``_splitk_reduce_kernel``)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = add_residual(_round_to(acc, KIND, EXACT), res_ptr, offs_n, n_ok, HAS_RES, KIND, EXACT)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, outer_ptr, bias_ptr, part_ptr, out_ptr,
                 count_ptr, g_ptr, up_ptr, res_ptr, M, N, K, G, outer_stride, eps,
                 GROUP_SIZE: tl.constexpr, CHANNEL: tl.constexpr, ELEM: tl.constexpr,
                 HAS_ZERO: tl.constexpr, HAS_OUTER: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, REDUCE: tl.constexpr,
                 KIND: tl.constexpr, EXACT: tl.constexpr, PRO: tl.constexpr,
                 HAS_G: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ACC2: tl.constexpr):
    """Row ``pid_m`` of ``y`` over K tiles ``[pid_s * per, (pid_s + 1) * per)``: into ``out``
    (one split) or ``part[pid_s]``. Every K tile lies inside one group. With ``REDUCE`` the
    last program to store a column tile's partial (an arrival count per row and tile) sums
    the tile's partials in split order and writes ``y``: one launch, the reduce kernel's
    bits. ``PRO``/``HAS_G``/``HAS_RES``: the decode fusions of
    :mod:`qcompile.backends.triton.gemv_fusion` (RMSNorm or SiLU gate on ``x``, residual on
    ``y``)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    x_row = x_ptr + pid_m.to(tl.int64) * K
    up_row = up_ptr + pid_m.to(tl.int64) * K
    r = row_rstd(x_row, K, eps, PRO)
    tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(tiles, SPLIT)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K if ACC2 and CHANNEL else 1], dtype=tl.float32)
    for t in range(pid_s * per, tl.minimum(pid_s * per + per, tiles)):
        k = t * BLOCK_K + offs_k
        k_ok = k < K
        # Masked codes and x are 0: padding columns add nothing, whatever their value.
        c = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        x = load_x(x_row, up_row, g_ptr, k, k_ok, r, PRO, HAS_G, KIND, EXACT)
        s_off = offs_n * G + (t * BLOCK_K) // GROUP_SIZE
        zb = 0.0
        if HAS_ZERO:
            zb = tl.load(zero_ptr + s_off, mask=n_ok, other=0.0)[:, None] + 8388608.0
        prod = _values(c, zb, ELEM, HAS_ZERO) * x[None, :]
        if ACC2 and CHANNEL:
            acc2 += prod  # one FMA per code; summed across K once, after the loop
        elif CHANNEL:
            acc += tl.sum(prod, axis=1)
        else:
            acc += tl.sum(prod, axis=1) * tl.load(scale_ptr + s_off, mask=n_ok, other=0.0)
    if ACC2 and CHANNEL:
        acc = tl.sum(acc2, axis=1)
    acc = _scales(acc, scale_ptr, outer_ptr, offs_n, n_ok, outer_stride, CHANNEL, HAS_OUTER)
    row = pid_m.to(tl.int64) * N
    if SPLIT == 1:
        _store_row(acc, bias_ptr, out_ptr + row, res_ptr + row, offs_n, n_ok, HAS_BIAS, HAS_RES,
                   KIND, EXACT)
    else:
        tl.store(part_ptr + pid_s.to(tl.int64) * M * N + row + offs_n, acc, mask=n_ok)
        if REDUCE:
            tile = pid_m * tl.num_programs(0) + pid_n
            if _last_arrival(count_ptr, tile, SPLIT):
                tot = _sum_splits(part_ptr + row, offs_n, n_ok, M * N, SPLIT)
                _store_row(tot, bias_ptr, out_ptr + row, res_ptr + row, offs_n, n_ok, HAS_BIAS,
                           HAS_RES, KIND, EXACT)
                _reset_count(count_ptr, tile)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, outer_ptr, bias_ptr, out_ptr, M, N, K, G,
                 outer_stride, M_BUCKET, GROUP_SIZE: tl.constexpr, CHANNEL: tl.constexpr,
                 ELEM: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_OUTER: tl.constexpr, HAS_BIAS: tl.constexpr, KIND: tl.constexpr,
                 EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y``; the programs of one weight tile are adjacent
    (M varies fastest), so they read it from L2 together."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        c = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        s_off = offs_n * G + k0 // GROUP_SIZE
        zb = 0.0
        if HAS_ZERO:
            zb = tl.load(zero_ptr + s_off, mask=n_ok, other=0.0)[:, None] + 8388608.0
        v = _values(c, zb, ELEM, HAS_ZERO)
        if EXACT or x_ptr.dtype.element_ty == tl.float32:
            # The interpreter's dots read 16-bit operands as raw bits; fp32 activations need
            # full fp32 products (tf32 would round them).
            p = tl.dot(x.to(tl.float32), tl.trans(v), input_precision="ieee")
        else:
            p = tl.dot(x, tl.trans(v.to(x.dtype)))  # the values are exact in bf16/fp16
        if CHANNEL:
            acc += p
        else:
            acc += p * tl.load(scale_ptr + s_off, mask=n_ok, other=0.0)[None, :]
    acc = _scales(acc, scale_ptr, outer_ptr, offs_n, n_ok, outer_stride, CHANNEL, HAS_OUTER)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = _round_to(acc, KIND, EXACT)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_kernel(w_ptr, scale_ptr, zero_ptr, outer_ptr, out_ptr, N, K, G, outer_stride,
                    GROUP_SIZE: tl.constexpr, ELEM: tl.constexpr, HAS_ZERO: tl.constexpr,
                    HAS_OUTER: tl.constexpr, KIND: tl.constexpr, EXACT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``W[n, k] = value * (scale * outer)`` rounded once to the output dtype, as
    ``dequantize`` computes it."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    ok = n_ok[:, None] & (k < K)[None, :]
    c = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * K + k[None, :], mask=ok,
                other=0)
    s_off = offs_n[:, None] * G + k[None, :] // GROUP_SIZE
    zb = 0.0
    if HAS_ZERO:
        zb = tl.load(zero_ptr + s_off, mask=ok, other=0.0) + 8388608.0
    eff = tl.load(scale_ptr + s_off, mask=ok, other=0.0)
    if HAS_OUTER:
        eff = eff * tl.load(outer_ptr + offs_n * outer_stride, mask=n_ok, other=0.0)[:, None]
    w = _round_to(_values(c, zb, ELEM, HAS_ZERO) * eff, KIND, EXACT)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=ok)


def _tile_fits(config: triton.Config, group_size: int, k: int) -> bool:
    return group_size == k or group_size % config.kwargs["BLOCK_K"] == 0


def _prune_gemv(configs, named_args, **kwargs):
    """Tiles inside one group, ``ACC2`` for per-channel scales only (the autotuner passes
    the constexprs as ``kwargs``)."""
    gs, k = kwargs["GROUP_SIZE"], named_args["K"]
    return [c for c in configs if _tile_fits(c, gs, k)
            and (kwargs["CHANNEL"] or not c.kwargs["ACC2"])]


def _prune_gemm(configs, named_args, **kwargs):
    """Tiles inside one group, BLOCK_M at most the call's M (rounded up to 16), and with fp32
    activations the smaller tiles."""
    gs, k = kwargs["GROUP_SIZE"], named_args["K"]
    m = max(16, named_args["M_BUCKET"])
    kept = [c for c in configs if _tile_fits(c, gs, k) and c.kwargs["BLOCK_M"] <= m]
    if named_args["x_ptr"].dtype == torch.float32:  # fp32 operands: half the tile per stage
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128]
    return kept


_GEMV = triton.autotune(GEMV_CONFIGS, key=["N", "K", "GROUP_SIZE", "SPLIT", "ELEM"],
                        prune_configs_by=tuning(_prune_gemv, _gemv_kernel),
                        do_bench=plain_bench)(_gemv_kernel)
_GEMM = triton.autotune(GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE", "ELEM"],
                        prune_configs_by=tuning(_prune_gemm, _gemm_kernel),
                        do_bench=plain_bench)(_gemm_kernel)


def _validate(x, codes, scale, zero, outer, group_size, elem, bias, check) -> tuple[int, int]:
    if elem not in ELEMS:
        raise KernelInputError(f"elem must be one of {', '.join(ELEMS)}, got {elem!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise KernelInputError(f"group_size must be a positive integer, got {group_size!r}")
    x = check(x, "x", _X_DTYPES)
    if x.dim() < 1:
        raise KernelInputError("x must have at least one dim (the K axis last)")
    dev = x.device
    k = x.shape[-1]
    codes = check(codes, "codes", (torch.uint8,), ndim=2, device=dev)
    n = codes.shape[0]
    if codes.shape[1] != k:
        raise KernelInputError(f"codes has shape {tuple(codes.shape)}; x has K = {k}, so "
                               f"dim 1 must be {k}")
    g = cdiv(k, group_size)
    check(scale, "scale", (torch.float32,), shape=(n, g), device=dev)
    if zero is not None:
        if elem != "int8":
            raise KernelInputError(f"zero points are for int8 weights, not {elem}")
        check(zero, "zero", (torch.float32,), shape=(n, g), device=dev)
    if outer is not None:
        check(outer, "outer", (torch.float32,), ndim=2, device=dev)
        if outer.shape not in ((n, 1), (1, 1)):
            raise KernelInputError(f"outer has shape {tuple(outer.shape)}; expected "
                                   f"({n}, 1) or (1, 1)")
    if bias is not None:
        check(bias, "bias", (x.dtype,), shape=(n,), device=dev)
    return n, k


def _dequant_ref(codes, scale, zero, outer, group_size: int, k: int, elem: str) -> torch.Tensor:
    from qcompile.formats.elements import element_info

    info = element_info(elem)
    c = codes.to(torch.float32)
    if info.kind == "int":
        v = c + info.min if zero is None else c - zero.repeat_interleave(group_size, 1)[:, :k]
    else:
        v = info.table().to(codes.device)[codes.long()]
    eff = scale if outer is None else scale * outer
    return v * eff.repeat_interleave(group_size, 1)[:, :k]


def w8a16_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                     zero: torch.Tensor | None, outer: torch.Tensor | None, group_size: int,
                     elem: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch W8A16 linear (any device): the numerics the kernels reproduce.

    Args:
        x: Activations ``[..., K]``, bf16/fp16/fp32.
        codes: ``uint8`` codes ``[N, K]`` as ``qcompile.formats`` stores them (INT8 offset
            binary, or the unsigned level with ``zero``; FP8 the element's bits).
        scale: fp32 ``[N, ceil(K/group_size)]`` scales.
        zero: fp32 like ``scale``, INT8 asym zero points, or None.
        outer: fp32 ``[N, 1]`` or ``[1, 1]`` multiplying every scale, or None.
        group_size: Elements per group along K (K itself for per-channel).
        elem: ``int8``, ``fp8_e4m3`` or ``fp8_e5m2``.
        bias: ``[N]`` in ``x``'s dtype, or None.

    Returns:
        ``[..., N]`` in ``x``'s dtype: ``linear(x, W.to(x.dtype), bias)`` accumulated in fp32.

    Raises:
        KernelInputError: A malformed input.
    """
    _validate(x, codes, scale, zero, outer, group_size, elem, bias, _check_any)
    w = _dequant_ref(codes, scale, zero, outer, group_size, x.shape[-1], elem)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w.to(x.dtype).float(), b).to(x.dtype)


def _flags(zero, outer, group_size, elem, dtype) -> dict:
    e = ELEMS[elem]
    return dict(GROUP_SIZE=group_size, ELEM=e, HAS_ZERO=zero is not None,
                HAS_OUTER=outer is not None, KIND=_DTYPE_KIND[dtype], EXACT=interpreting())


def w8a16_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  outer: torch.Tensor | None, group_size: int, elem: str,
                  dtype: torch.dtype) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype``, bit for bit ``dequantize_weight``'s. Inputs as
    :func:`w8a16_linear` validates them (contiguous, on a Triton device)."""
    n, k = codes.shape
    w = torch.empty(n, k, dtype=dtype, device=codes.device)
    if n == 0 or k == 0:
        return w
    o_stride = 0 if outer is None or outer.shape[0] == 1 else 1
    launch(_dequant_kernel, (cdiv(n, _DQ_BLOCK_N), cdiv(k, _DQ_BLOCK_K)), codes, scale,
           scale if zero is None else zero, scale if outer is None else outer, w, n, k,
           scale.shape[1], o_stride, **_flags(zero, outer, group_size, elem, dtype),
           BLOCK_N=_DQ_BLOCK_N, BLOCK_K=_DQ_BLOCK_K, num_warps=4)
    return w


def tiled(group_size: int, k: int) -> bool:
    """Whether the GEMV and GEMM take this grouping (K tiles of at least 16 inside a group)."""
    return group_size >= k or group_size % MIN_TILE_K == 0


def default_route(m: int, group_size: int, k: int) -> str:
    """The route of an ``m``-row call where nothing is timed: by the M thresholds."""
    if not tiled(group_size, k) or m >= DEQUANT_MIN_M:
        return "dequant"
    return "gemv" if m <= GEMV_MAX_M else "gemm"


def route_key(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, elem: str,
              has_zero: bool, has_outer: bool, has_bias: bool) -> tuple:
    """:mod:`~qcompile.backends.triton.path_tuning`'s key for the route of an ``m``-row call
    (``group_size`` clamped to ``k``)."""
    return ("w8a16", next_pow2(m), n, k, group_size, dtype, elem, has_zero, has_outer,
            has_bias)


def w8a16_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, outer: torch.Tensor | None, group_size: int,
                 elem: str, bias: torch.Tensor | None = None, path: str | None = None,
                 fusion: GemvFusion | None = None) -> torch.Tensor:
    """W8A16 linear with Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

    Same arguments and result as :func:`w8a16_linear_ref` (module docstring for the routes
    and the numerics). On a GPU, calls of 2 to ``path_tuning.MAX_M`` rows take the fastest
    of the routes their grouping allows (the GEMV only up to :data:`GEMV_MAX_M` rows), timed
    at the first call of each shape (:mod:`qcompile.backends.triton.path_tuning`; a cold L2
    up to :data:`GEMV_MAX_M` rows); elsewhere, and for one row, the M thresholds choose
    (:func:`default_route`). ``path`` forces a route for any M (tests, benchmarks): ``"gemv"``,
    ``"gemm"`` (both need :func:`tiled` groups) or ``"dequant"``. ``fusion`` (a
    :class:`~qcompile.backends.triton.gemv_fusion.GemvFusion`): an RMSNorm or SiLU gate on
    ``x`` and a residual add on the result, done by the GEMV for one row and as separate ops
    around the linear otherwise.

    Raises:
        KernelInputError: A malformed input, tensors no kernel can run on, or a ``path`` that
            is unknown or does not take the grouping.
    """
    n, k = _validate(x, codes, scale, zero, outer, group_size, elem, bias, check_tensor)
    gs = min(group_size, k) if k else group_size
    if path not in (None, "gemv", "gemm", "dequant"):
        raise KernelInputError(f"path must be 'gemv', 'gemm', 'dequant' or None, got {path!r}")
    if path in ("gemv", "gemm") and not tiled(gs, k):
        raise KernelInputError(f"path {path!r} needs a group size that is a multiple of "
                               f"{MIN_TILE_K} or per-channel scales, got {group_size}")
    if fusion is not None and not fusion.empty:
        fusion.check(x, n)
        if path not in (None, "gemv") or x.numel() != k or 0 in (n, k) or not tiled(gs, k):
            y = w8a16_linear(prologue_ref(x, fusion), codes, scale, zero, outer, group_size,
                             elem, bias, path)
            return epilogue_ref(y, fusion)
    else:
        fusion = None
    lead = x.shape[:-1]
    m = lead.numel()
    x2 = x.reshape(m, k).contiguous()  # (-1, k) is ambiguous for K = 0
    if m == 0 or n == 0 or k == 0:
        out = torch.zeros(m, n, dtype=x.dtype, device=x.device)
        return (out if bias is None else out.copy_(bias.expand(m, n))).reshape(*lead, n)
    codes, scale = codes.contiguous(), scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    outer = None if outer is None else outer.contiguous()
    route = path or default_route(m, gs, k)
    if path is None and tiled(gs, k) and 1 < m <= path_tuning.MAX_M:
        # The thresholds are W4A16's; each shape's first call times the routes that take it.
        paths = ("gemv", "gemm", "dequant") if m <= GEMV_MAX_M else ("gemm", "dequant")
        route = path_tuning.pick(
            route_key(m, n, k, gs, x.dtype, elem, zero is not None, outer is not None,
                      bias is not None), route, paths,
            lambda p: w8a16_linear(x2, codes, scale, zero, outer, gs, elem, bias, path=p),
            x.device, cold=m <= GEMV_MAX_M)
    if route == "dequant":
        from qcompile.backends.triton import w4a16_dequant  # its cuBLAS call (benchmarks swap it)

        w = w8a16_dequant(codes, scale, zero, outer, gs, elem, x.dtype)
        return w4a16_dequant.gemm(x2, w, bias).reshape(*lead, n)
    flags = _flags(zero, outer, gs, elem, x.dtype)
    flags.update(CHANNEL=gs == k, HAS_BIAS=bias is not None)
    o_stride = 0 if outer is None or outer.shape[0] == 1 else 1
    ptrs = (x2, codes, scale, scale if zero is None else zero, scale if outer is None else outer,
            scale if bias is None else bias)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    exact = flags["EXACT"]
    if route == "gemm":
        kern, cfg = (_gemm_kernel, _INTERP_GEMM) if exact else (_GEMM, {})
        launch(kern, lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])), *ptrs,
               out, m, n, k, scale.shape[1], o_stride, next_pow2(m), **flags, **cfg)
        return out.reshape(*lead, n)
    split = _pick_split(n, k, x.device)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    counts = arrival_counts(x.device, cdiv(n, _MIN_GEMV_BLOCK_N) * m) if split > 1 else None
    (g, up, res, eps), fused = fusion_args(fusion, m, scale)
    kern, cfg = (_gemv_kernel, _INTERP_GEMV) if exact else (_GEMV, {})
    launch(kern, lambda meta: (cdiv(n, meta["BLOCK_N"]), split, m), *ptrs, part, out,
           scale if counts is None else counts, g, up, res, m, n, k, scale.shape[1], o_stride,
           eps, SPLIT=split, REDUCE=counts is not None, **fused, **flags, **cfg)
    if split > 1 and counts is None:
        block = 1024
        launch(_splitk_reduce_kernel, (cdiv(m * n, block),), part, ptrs[5], out, scale, res,
               m, n, SPLIT=split, HAS_BIAS=bias is not None, HAS_XS=False,
               KIND=flags["KIND"], EXACT=exact, BLOCK=block, HAS_RES=fused["HAS_RES"])
    return out.reshape(*lead, n)
