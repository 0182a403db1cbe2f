"""W4A8 GEMM: FP4 E2M1 weights shifted to FP8 E4M3 in registers, FP8 activations, FP8 MMA.

Weights are fp4_e2m1 codes packed two per byte (:mod:`qcompile.formats.packing`: element 2i in
the low nibble of byte i), ``[N, ceil(K/2)]``, with ZeroQuant-FP scales in the form
``row_scale[n] * 2^gexp[n, g]`` (:func:`w4a8_split_scales` converts qcompile's ``m2`` and ``po2``
scales). While ``gexp`` lies in :data:`GEXP_RANGE`, every ``fp4 value * 2^gexp`` is exactly an
FP8 E4M3 number, so the kernel builds the FP8 weight tile with integer ops on the code bits
(sign kept, exponent field shifted by ``gexp``, mantissa bit moved; E4M3 subnormals by a right
shift) and multiplies it with the FP8 activation tile on the tensor cores. Only the per-token
activation scale and ``row_scale`` remain, applied in the epilogue:

    out[m, n] = (sum_k a[m, k] * W8[n, k]) * a_scale[m] * row_scale[n] (+ bias[n])

with ``W8 = decode(codes) * 2^gexp`` (:func:`w4a8_weight_fp8`, bit-exact in FP8), so the
kernel equals the fp32 reference up to accumulation order and the final rounding.

Paths of :func:`w4a8_linear` by M (rows): up to :data:`GEMV_MAX_M`, the batch-1 / split-K
W4A16 GEMVs with group scales ``2^gexp`` (decode reads weights, it does not multiply much);
then this fused kernel (weight decode in :data:`DECODES`); from
``w4a8_dequant.DEQUANT_MIN_M``, the weight shifted to FP8 once and the FP8 GEMM.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from qcompile.backends.triton import fp8_gemm, path_tuning
from qcompile.backends.triton.fp8_gemm import (
    check_bias_and_dtype,
    check_fp8_device,
    check_scale_vector,
    m_bucket,
    prune_configs_by_m,
    scaled_mm_checked,
)
from qcompile.backends.triton.jit import exp2i, fp8_dot, tile_coords
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import (
    KernelInputError,
    cdiv,
    check_tensor,
    interpreting,
    next_pow2,
    plain_bench,
    tuning,
)
from qcompile.backends.triton.scales import (
    GEXP_RANGE,
    W4A8ScaleError,
    check_gexp_range,
    w4a8_split_scales,
)
from qcompile.device_cache import outside_graph_pools
from qcompile.formats.elements import decode
from qcompile.formats.packing import packed_len, unpack_codes

__all__ = [
    "GEXP_RANGE",
    "W4A8_CONFIGS",
    "W4A8ScaleError",
    "w4a8_linear",
    "w4a8_linear_ref",
    "w4a8_split_scales",
    "w4a8_weight_fp8",
]

_FP8 = torch.float8_e4m3fn
#: The fused kernel's weight decodes (``_w4a8_kernel``'s ``DECODE`` is the index):
#: ``shift``: integer ops on the code bits, per element (:func:`fp4_to_fp8_bits`; measured at
#: 0.15-0.19x cuBLAS FP8 on an H100 and an H200);
#: ``place``: where a K block lies in one group, the bits placed in an E4M3 byte and 2^gexp
#: applied per column to the accumulator (fewest ops, but the accumulator rescale sits between
#: consecutive MMAs); elsewhere ``shift``;
#: ``mul``: the placed bits times 2^gexp in fp32, per element (:func:`fp4_times_2g`).
DECODES = ("shift", "place", "mul")
#: The decode :func:`w4a8_linear` uses (``benchmarks/kernels_fp8.py`` times all three; only
#: ``shift`` is measured on hardware yet). ``mul``: in the sm_90 compile of the 128 x 256 x 128
#: tile, 2296 SASS instructions against 2464 for ``place`` and 3800 for ``shift``, on every
#: group path, and no accumulator rescale between the MMAs.
DECODE = "mul"
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}
#: Largest M that runs the W4A16 GEMVs (:func:`_gemv`): at decode sizes the weight read is
#: the cost, and the fused kernel's 16-row tiles give an 8192-wide layer only a few dozen
#: programs, no split-K.
GEMV_MAX_M = 16


# --- reference ---------------------------------------------------------------------------------

def w4a8_weight_fp8(packed: torch.Tensor, gexp: torch.Tensor, group_size: int,
                    k: int) -> torch.Tensor:
    """The FP8 weight the kernel builds: ``decode(codes) * 2^gexp`` as float8_e4m3fn ``[N, K]``.

    Exact by construction (the cast rounds nothing): ``W8 * row_scale`` is bit-equal to
    qcompile's dequantized weight.

    Raises:
        W4A8ScaleError: ``gexp`` outside :data:`GEXP_RANGE`.
    """
    check_gexp_range(gexp)
    vals = decode(unpack_codes(packed, 4, k), "fp4_e2m1")
    idx = torch.arange(k, device=packed.device) // group_size
    g = gexp.to(torch.float32).index_select(1, idx)
    return torch.ldexp(vals, g).to(_FP8)


def w4a8_linear_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    packed: torch.Tensor,
    gexp: torch.Tensor,
    row_scale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Plain PyTorch reference of :func:`w4a8_linear` (any device).

    Returns:
        ``((a.float() @ W8.float().T) * a_scale * row_scale + bias).to(out_dtype)`` with
        ``W8 = w4a8_weight_fp8(packed, gexp, group_size, K)``, fp32 until the final cast.
    """
    w = w4a8_weight_fp8(packed, gexp, group_size, a.shape[1])
    out = (a.float() @ w.float().T) * a_scale.float().reshape(-1, 1)
    out = out * row_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# --- decode sizes: the W4A16 GEMVs ------------------------------------------------------------

_POW2: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _pow2_scales(gexp: torch.Tensor) -> torch.Tensor:
    """fp32 ``2^gexp``, cached per ``gexp`` tensor (a graph's constant: computed once, then
    read like any group scale)."""
    hit = _POW2.get(id(gexp))
    if hit is not None and hit[0]() is gexp and hit[1].shape == gexp.shape:
        return hit[1]
    scale = outside_graph_pools(  # kept by the cache
        lambda: torch.ldexp(torch.ones(gexp.shape, device=gexp.device), gexp.to(torch.int32)),
        gexp.device)
    for key in [k for k, (ref, _) in _POW2.items() if ref() is None]:
        del _POW2[key]
    _POW2[id(gexp)] = (weakref.ref(gexp), scale)
    return scale


def _gemv(a, a_scale, packed, gexp, row_scale, group_size, bias, out_dtype, residual=None):
    """``w4a8_linear`` for a few rows by the W4A16 GEMVs, in one launch (two with a K split):
    the FP8 codes read as they are (exact in fp32), FP4 codes times group scales ``2^gexp``
    and outer scale ``row_scale``, then in the epilogue each row's ``a_scale``, the bias and
    the rounding to ``out_dtype`` (and the ``residual`` add, one row only: the caller
    checks). Same products as the reference, summed in another order.
    """
    from qcompile.backends.triton import w4a16, w4a16_gemv
    from qcompile.backends.triton.runtime import element_table

    m, k = a.shape
    a = a.contiguous()
    table = element_table("fp4_e2m1", a.device)
    pow2 = _pow2_scales(gexp)
    outer = row_scale.reshape(-1, 1)  # checked: contiguous fp32 [N]
    if m == 1 and w4a16_gemv.gemv1_eligible(1, group_size):
        fusion = None
        if residual is not None:
            from qcompile.backends.triton.gemv_fusion import GemvFusion

            fusion = GemvFusion(residual=residual)
        return w4a16_gemv.w4a16_gemv1(a, packed, table, pow2, None, None, outer, group_size,
                                      bias, True, x_scale=a_scale, out_dtype=out_dtype,
                                      fusion=fusion)
    out = torch.empty(m, packed.shape[0], dtype=out_dtype, device=a.device)
    args = (a, packed, table, pow2, pow2, pow2, outer, pow2 if bias is None else bias)
    common = dict(GROUP_SIZE=group_size, HAS_NEG=False, HAS_ZERO=False, HAS_OUTER=True,
                  HAS_BIAS=bias is not None, KIND=0, EXACT=interpreting())  # fp32 weights
    return w4a16.launch_gemv(args, out, k, packed.shape[1], pow2.shape[1], 1, common,
                             x_scale=a_scale)


# --- kernel ------------------------------------------------------------------------------------

@triton.jit
def fp4_to_fp8_bits(code, g):
    """E4M3 bit pattern of ``fp4_e2m1(code) * 2^g`` (int32 in, uint8 out), exact for g in
    GEXP_RANGE: the ZeroQuant-FP exponent shift done on the bits."""
    mag = code & 7
    e4 = mag >> 1  # fp4 exponent field (bias 1); 0 with mantissa 1 is the subnormal 0.5
    mant = tl.where(e4 > 0, (mag & 1) << 2, 0)  # fp4's one mantissa bit -> E4M3's top bit
    e8 = e4 + g + 6  # rebias 1 -> 7 and add g (the subnormal 0.5 = 1.0 * 2^-1 lands here too)
    normal = (e8 << 3) | mant
    # e8 <= 0: an E4M3 subnormal; shift the significand (implicit 1) right; exact in range.
    sub = (8 | mant) >> tl.maximum(1 - e8, 0)
    bits = tl.where(mag == 0, 0, tl.where(e8 > 0, normal, sub))
    return (bits | ((code & 8) << 4)).to(tl.uint8)


@triton.jit
def fp4_times_2g(placed, g):
    """E4M3 bits of ``fp4 * 2^g`` from ``placed``, the code's bits placed in an E4M3 byte
    (exactly fp4 * 2^-6, subnormal 0.5 included): one fp32 multiply by 2^(g + 6) and a
    round-to-nearest conversion, both exact for g in GEXP_RANGE. About a third of the
    instructions of :func:`fp4_to_fp8_bits` (sm_90 PTX of the weight-shift kernel)."""
    v = placed.to(tl.float8e4nv, bitcast=True).to(tl.float32) * exp2i(g + 6)
    return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def _w8_bits(src, g, DECODE: tl.constexpr):
    if DECODE == 2:
        return fp4_times_2g(src, g)
    return fp4_to_fp8_bits(src, g)


@triton.jit
def tile_setup(a_ptr, w_ptr, gexp_ptr, M, N, K, offs_m, offs_n, stride_am, stride_ak,
               stride_wn, stride_gn, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row indices (wrapped past M and N: unmasked loads, masked store), the first K block's
    activation and packed-weight pointers, the weight rows' exponent pointers, the packed
    row length and the group count of an output tile."""
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_K // 2)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + rn[:, None] * stride_wn + offs_p[None, :]
    g_row = gexp_ptr + rn * stride_gn
    return rm, rn, offs_k, offs_p, a_ptrs, w_ptrs, g_row, (K + 1) // 2, tl.cdiv(K, GROUP_SIZE)


@triton.jit
def w8_tile(byte, g_row, k0, n_groups, offs_k, GROUP_SIZE: tl.constexpr, DECODE: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The FP8 weight tile ``[BLOCK_N, BLOCK_K]`` at K offset ``k0`` from its packed bytes
    ``[BLOCK_N, BLOCK_K // 2]`` and the rows' exponent pointers ``g_row``: the ``shift`` (0)
    or ``mul`` (2) decode, per group layout."""
    if DECODE == 2:  # placed bits, scaled per element by a multiply (fp4_times_2g)
        src = tl.interleave(((byte & 8) << 4) | ((byte & 7) << 2),
                            (byte & 0x80) | ((byte & 0x70) >> 2))
    else:  # raw codes, shifted on the exponent field (fp4_to_fp8_bits)
        src = tl.interleave(byte & 0xF, byte >> 4).to(tl.int32)
    if GROUP_SIZE % BLOCK_K == 0:
        # The whole K block is in one group: one exponent per row.
        g = tl.load(g_row + k0 // GROUP_SIZE).to(tl.int32)[:, None]
        bits = _w8_bits(src, g, DECODE)
    elif BLOCK_K % GROUP_SIZE == 0:
        # Whole groups per K block: a [BLOCK_N, groups] exponent tile, broadcast over
        # a [BLOCK_N, groups, GROUP_SIZE] view (a per-element gather would spill).
        gi = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
        g = tl.load(g_row[:, None] + gi[None, :], mask=gi[None, :] < n_groups, other=0)
        src3 = tl.reshape(src, (BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE))
        bits3 = _w8_bits(src3, g.to(tl.int32)[:, :, None], DECODE)
        bits = tl.reshape(bits3, (BLOCK_N, BLOCK_K))
    else:
        # Other group sizes (e.g. 50, 192): the block spans at most
        # (BLOCK_K-1)//GROUP_SIZE + 2 groups; load each one's [BLOCK_N] exponents and
        # select per column (a per-element pointer gather would spill registers).
        grp = (k0 + offs_k) // GROUP_SIZE
        g_lo = k0 // GROUP_SIZE
        g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        for j in tl.static_range((BLOCK_K - 1) // GROUP_SIZE + 2):
            # Clamped in bounds; a clamped column lies past K, where activations are 0.
            gj = tl.load(g_row + tl.minimum(g_lo + j, n_groups - 1))
            g = tl.where((grp == g_lo + j)[None, :], gj.to(tl.int32)[:, None], g)
        bits = _w8_bits(src, g, DECODE)
    # Past K (tail, odd K's pad nibble) the activations are zero and W8 is finite
    # (never NaN), so those products vanish without masking W8.
    w = bits.to(tl.float8e4nv, bitcast=True)
    return w


@triton.jit
def _w4a8_kernel(a_ptr, w_ptr, c_ptr, as_ptr, rs_ptr, gexp_ptr, bias_ptr, M, N, K, M_BUCKET,
                 stride_am, stride_ak, stride_wn, stride_gn, stride_cm, stride_cn,
                 GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DECODE: tl.constexpr,
                 PROMOTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One program per output tile; packed rows and gexp rows are contiguous. ``DECODE``: the
    weight decode, an index into :data:`DECODES` (``place`` only where a K block lies in one
    group; elsewhere it falls back to ``shift``). ``PROMOTE``: as in the FP8 GEMM
    (:data:`qcompile.backends.triton.fp8_gemm.PROMOTE_K`)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, rn, offs_k, offs_p, a_ptrs, w_ptrs, g_row, k_bytes, n_groups = tile_setup(
        a_ptr, w_ptr, gexp_ptr, M, N, K, offs_m, offs_n, stride_am, stride_ak, stride_wn,
        stride_gn, GROUP_SIZE, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_prev = tl.zeros((BLOCK_N,), dtype=tl.int32)  # place: the accumulator's exponent
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        byte = tl.load(w_ptrs, mask=offs_p[None, :] < k_bytes - k0 // 2, other=0)
        # Element 2i is the low nibble of byte i: interleaving restores K order.
        if DECODE == 1 and GROUP_SIZE % BLOCK_K == 0:
            # One group per K block and row: place each code's bits in an E4M3 byte (exactly
            # fp4 * 2^-6, subnormal 0.5 included) and apply 2^(gexp + 6) per column to the
            # accumulator - a few byte ops per weight instead of the per-element exponent
            # arithmetic below.
            # The accumulator is kept in units of the current block's 2^(gexp + 6) (exact
            # power-of-two rescales), so the MMA still accumulates in place: a second
            # 128 x 256 fp32 accumulator spilled on sm_90.
            lo = ((byte & 8) << 4) | ((byte & 7) << 2)
            hi = (byte & 0x80) | ((byte & 0x70) >> 2)
            w = tl.interleave(lo, hi).to(tl.float8e4nv, bitcast=True)
            g = tl.load(g_row + k0 // GROUP_SIZE).to(tl.int32)
            acc = acc * exp2i(g_prev - g)[None, :]
            acc = fp8_dot(a, tl.trans(w), acc, PROMOTE)
            g_prev = g
        else:
            w = w8_tile(byte, g_row, k0, n_groups, offs_k, GROUP_SIZE, DECODE, BLOCK_N,
                        BLOCK_K)
            acc = fp8_dot(a, tl.trans(w), acc, PROMOTE)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K // 2
    if DECODE == 1 and GROUP_SIZE % BLOCK_K == 0:
        acc = acc * exp2i(g_prev + 6)[None, :]
    out = acc * tl.load(as_ptr + rm)[:, None]
    out = out * tl.load(rs_ptr + rn)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


#: Autotune candidates for H100: the FP8 GEMM's tiles (the weight stream is half as many bytes).
#: BLOCK_K 256 is left out: the in-register decode of a 256-wide tile spills.
W4A8_CONFIGS = [
    _cfg(16, 64, 128, 5, 4), _cfg(16, 128, 128, 4, 4), _cfg(32, 64, 128, 5, 4),
    _cfg(32, 128, 128, 4, 4),
    _cfg(64, 64, 128, 5, 4), _cfg(64, 128, 128, 4, 4), _cfg(64, 256, 128, 3, 8),
    _cfg(128, 128, 128, 4, 8), _cfg(128, 128, 128, 3, 4), _cfg(128, 256, 128, 3, 8),
    _cfg(256, 128, 128, 3, 8), _cfg(128, 64, 128, 4, 4),
]

_w4a8_tuned = triton.autotune(W4A8_CONFIGS,
                              key=["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_BIAS", "DECODE",
                                   "PROMOTE"],
                              prune_configs_by=tuning(prune_configs_by_m, _w4a8_kernel),
                              do_bench=plain_bench)(
    _w4a8_kernel)


def check_weights(packed: object, gexp: object, row_scale: object, bias: object,
                  group_size: object, k: int, dev: torch.device,
                  out_dtype: torch.dtype) -> tuple:
    """:func:`w4a8_linear`'s checks of the weight's tensors, ``group_size`` and ``out_dtype``
    on ``dev`` (and that ``dev`` has FP8 tensor cores); returns ``(packed, gexp, row_scale,
    bias)`` as the kernels take them: ``packed`` and ``gexp`` unit-stride along K,
    ``row_scale`` contiguous ``[N]``, ``bias`` contiguous or None.

    Raises:
        KernelInputError: As :func:`w4a8_linear` says.
    """
    check_fp8_device(dev)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise KernelInputError(f"group_size must be a positive int, got {group_size!r}")
    packed = check_tensor(packed, "packed", (torch.uint8,), ndim=2, device=dev)
    n = packed.shape[0]
    if packed.shape[1] != packed_len(k, 4):
        raise KernelInputError(
            f"packed has shape {tuple(packed.shape)}; K = {k} fp4 codes need "
            f"{packed_len(k, 4)} bytes per row")
    groups = -(-k // group_size)
    gexp = check_tensor(gexp, "gexp", (torch.int8,), shape=(n, groups), device=dev)
    row_scale = check_scale_vector(row_scale, "row_scale", n, dev)
    bias = check_bias_and_dtype(bias, n, dev, out_dtype)
    # The kernels step through packed bytes and exponents with unit stride along K.
    packed = packed if packed.stride(1) == 1 else packed.contiguous()
    gexp = gexp if gexp.stride(1) == 1 or groups <= 1 else gexp.contiguous()
    return packed, gexp, row_scale, bias


def path_key(m: int, n: int, k: int, group_size: int, has_bias: bool, out_dtype: torch.dtype,
             fast_accum: bool) -> tuple:
    """The ``path_tuning`` key of :func:`w4a8_linear`'s timed path choice (fused, swap or
    shift-then-GEMM) for ``m`` rows; the W4A8 prefill's plans look their route up by it."""
    return ("w4a8", next_pow2(m), n, k, group_size, has_bias, out_dtype, fast_accum)


def w4a8_linear(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    packed: torch.Tensor,
    gexp: torch.Tensor,
    row_scale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    path: str | None = None,
    fast_accum: bool = True,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP8 activations x FP4 weights (exponent-shifted to FP8) on FP8 tensor cores.

    Up to :data:`GEMV_MAX_M` rows the W4A16 GEMVs read the FP4 codes with group scales
    ``2^gexp`` (decode: the weight read is the cost); below ``w4a8_dequant.DEQUANT_MIN_M``
    rows the fused kernel shifts each weight tile to FP8 in registers; from there the weight
    is shifted to FP8 once and the FP8 GEMM multiplies
    (:mod:`qcompile.backends.triton.w4a8_dequant`). Above the GEMVs on a GPU the fastest of
    those two and the fused kernel with swapped operands is timed at the first call of each
    shape instead (:mod:`qcompile.backends.triton.path_tuning`). All give the same products.

    Args:
        a: float8_e4m3fn activations ``[M, K]`` (any strides).
        a_scale: fp32 per-token scales ``[M, 1]`` (or ``[M]``).
        packed: uint8 fp4_e2m1 codes ``[N, ceil(K/2)]`` (sym, no zero point).
        gexp: int8 group exponents ``[N, ceil(K/group_size)]`` in :data:`GEXP_RANGE`, as
            :func:`w4a8_split_scales` returns them (not re-checked here: that would sync).
        row_scale: fp32 row scales ``[N]`` (or ``[N, 1]``).
        group_size: Elements per group along K (any positive int; the last group may be
            shorter).
        bias: Optional ``[N]`` bias (bf16, fp16 or fp32).
        out_dtype: bfloat16, float16 or float32.
        path: ``"gemv"``, ``"fused"``, ``"swap"`` (the fused kernel with the decoded weight as
            the MMA's register operand, :mod:`qcompile.backends.triton.w4a8_swap`; not yet
            picked by M) or ``"dequant"`` to force one path (benchmarks); None picks by M.
        fast_accum: As in :func:`~qcompile.backends.triton.fp8_gemm.fp8_scaled_mm`: sums stay
            in the FP8 MMA's accumulator (False: promoted to fp32 every
            ``fp8_gemm.PROMOTE_K`` products; the GEMVs always sum in fp32).
        residual: Optional ``[M, N]`` of ``out_dtype`` added to the rounded result (and
            rounded again: ``residual + w4a8_linear(...)``); the batch-1 GEMV adds it in its
            epilogue, the other paths as a separate add.

    Returns:
        ``[M, N]`` tensor of ``out_dtype``: :func:`w4a8_linear_ref` up to fp32 accumulation
        order and the final rounding.

    Raises:
        KernelInputError: A wrong dtype, shape, device, ``group_size`` or ``path``, or a GPU
            without FP8 tensor cores.
    """
    a = check_tensor(a, "a", (_FP8,), ndim=2)
    m, k = a.shape
    dev = a.device
    packed, gexp, row_scale, bias = check_weights(packed, gexp, row_scale, bias, group_size,
                                                  k, dev, out_dtype)
    n = packed.shape[0]
    a_scale = check_scale_vector(a_scale, "a_scale", m, dev)
    if path not in (None, "fused", "dequant", "gemv", "swap"):
        raise KernelInputError(
            f"path must be 'fused', 'swap', 'dequant', 'gemv' or None, got {path!r}")
    if residual is not None:
        residual = check_tensor(residual, "residual", (out_dtype,), shape=(m, n), device=dev)
        from qcompile.backends.triton import w4a16_gemv

        if not (m == 1 and path in (None, "gemv") and w4a16_gemv.gemv1_eligible(1, group_size)):
            return residual + w4a8_linear(a, a_scale, packed, gexp, row_scale, group_size, bias,
                                          out_dtype, path, fast_accum)
    from qcompile.backends.triton import w4a8_dequant

    if m and n and (path == "gemv" or (path is None and m <= GEMV_MAX_M)):
        return _gemv(a, a_scale, packed, gexp, row_scale, group_size, bias, out_dtype,
                     residual)
    if m and n and path is None and m <= path_tuning.MAX_M:  # the fastest path, timed once
        default = "dequant" if m >= w4a8_dequant.DEQUANT_MIN_M else "fused"
        key = path_key(m, n, k, group_size, bias is not None, out_dtype, fast_accum)
        path = path_tuning.pick(key, default, ("fused", "swap", "dequant"), lambda p: w4a8_linear(
            a, a_scale, packed, gexp, row_scale, group_size, bias, out_dtype, path=p,
            fast_accum=fast_accum), dev)
    if m and n and (path == "dequant" or (path is None and m >= w4a8_dequant.DEQUANT_MIN_M)):
        w8 = w4a8_dequant.w4a8_dequant(packed, gexp, group_size, k)
        # Checked above (a, scales, bias, out_dtype); w8 is [N, K] FP8 by construction.
        return scaled_mm_checked(a, a_scale, w8, row_scale, bias, out_dtype, None, fast_accum)
    c = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m == 0 or n == 0:
        return c
    promote = 0 if fast_accum else fp8_gemm.PROMOTE_K
    if path == "swap":
        from qcompile.backends.triton.w4a8_swap import w4a8_swap_launch

        # place rescales the accumulator per weight column: the swapped kernel multiplies.
        decode = DECODES.index("mul" if DECODE == "place" else DECODE)
        return w4a8_swap_launch(a, a_scale, packed, gexp, row_scale, group_size, bias, c,
                                decode, promote)
    args = (a, packed, c, a_scale, row_scale, gexp, c if bias is None else bias, m, n, k,
            m_bucket(m), a.stride(0), a.stride(1), packed.stride(0), gexp.stride(0),
            c.stride(0), c.stride(1))
    flags = {"GROUP_SIZE": group_size, "HAS_BIAS": bias is not None,
             "DECODE": DECODES.index(DECODE), "PROMOTE": promote}
    if interpreting():
        meta = _INTERPRET_CONFIG  # autotuning is meaningless under the interpreter
        grid = (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)
        _w4a8_kernel[grid](*args, **flags, **meta)
    else:
        launch(_w4a8_tuned, lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),),
               *args, **flags)
    return c
