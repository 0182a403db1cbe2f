"""W4A16 linear: packed 4-bit weight codes with per-group scales times bf16/fp16/fp32 activations.

``y = linear(x, W.to(x.dtype), bias)`` where ``W`` is the fp32 weight that
:func:`qcompile.formats.quantize.dequantize` decodes from the codes: ``eff = scale * outer``,
``v = table[code]`` (``- zero`` for INT asym), ``w = v * (eff_neg if v < 0 else eff)`` for AFPQ,
else ``v * eff``. Group of element ``k`` is ``k // group_size`` (ragged last group).

Three kernels decode the weight in registers, never materializing ``W``; a fourth path
materializes it for long prefills:

* M == 1 with a group size that a config's BLOCK_K divides: the batch-1 GEMV of
  :mod:`qcompile.backends.triton.w4a16_gemv` (group scales hoisted out of the inner product).
* M <= 16 (decode): split-K GEMV. Programs tile (N blocks x K splits) and write fp32 partial
  sums ``[SPLIT, M, N]``; a second kernel sums them in a fixed order (no atomics, so the same
  inputs give the same bits), adds the bias and casts. With one split the GEMV writes ``y``.
* 16 < M < 256: tiled GEMM with ``tl.dot`` on the decoded tile cast to ``x``'s dtype,
  fp32 accumulator, grouped program order for L2 reuse.
* M >= 256 (prefill): :mod:`qcompile.backends.triton.w4a16_dequant` writes the weight in
  ``x``'s dtype once and cuBLAS multiplies (the tiled GEMM ran a 2048-token prefill at a tenth
  of cuBLAS on an H100).

The GEMV and the GEMM round the decoded weight to ``x``'s dtype before multiplying, like the reference. Under the
interpreter (which truncates fp32 -> bf16 casts, and whose ``tl.dot`` misreads bf16) the
kernels round to bf16 with integer bit tricks and multiply in fp32, which is exact.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qcompile.backends.triton import path_tuning
from qcompile.backends.triton.jit import tile_coords
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import (
    KernelInputError,
    arrival_counts,
    cdiv,
    check_tensor,
    element_table,
    interpreting,
    next_pow2,
    plain_bench,
    sm_count,
    tuning,
)
from qcompile.backends.triton.w4a16_tiles import (  # noqa: F401  (re-exported)
    _decode,
    _decode_at,
    _group_eff,
    _last_arrival,
    _mul_rn,
    _pick_rows,
    _reset_count,
    _rne_bf16,
    _round_to,
    _rows_epilogue,
    _sum_splits,
    _weight_tile,
)
from qcompile.formats.packing import unpack_codes

__all__ = ["GEMM_CONFIGS", "GEMV_CONFIGS", "GEMV_MAX_M", "w4a16_linear", "w4a16_linear_ref"]

#: Largest M (flattened rows of ``x``) that takes the split-K GEMV path.
GEMV_MAX_M = 16

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cfg(num_warps: int, num_stages: int, **kw: int) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# Autotune configs by M bucket (key: largest M of the bucket). GEMV tiles multiply a
# [BLOCK_M, BLOCK_K/2, BLOCK_N] broadcast product in registers, so they shrink as M grows.
GEMV_CONFIGS: dict[int, list[triton.Config]] = {
    1: [_cfg(4, 3, BLOCK_N=64, BLOCK_K=128), _cfg(4, 3, BLOCK_N=32, BLOCK_K=256),
        _cfg(8, 3, BLOCK_N=64, BLOCK_K=256), _cfg(8, 2, BLOCK_N=128, BLOCK_K=128),
        _cfg(4, 4, BLOCK_N=16, BLOCK_K=512), _cfg(4, 4, BLOCK_N=128, BLOCK_K=64)],
    4: [_cfg(4, 3, BLOCK_N=32, BLOCK_K=128), _cfg(4, 3, BLOCK_N=64, BLOCK_K=64),
        _cfg(8, 3, BLOCK_N=64, BLOCK_K=128), _cfg(4, 3, BLOCK_N=16, BLOCK_K=256)],
    16: [_cfg(4, 3, BLOCK_N=16, BLOCK_K=64), _cfg(4, 3, BLOCK_N=32, BLOCK_K=32),
         _cfg(8, 3, BLOCK_N=64, BLOCK_K=32), _cfg(8, 2, BLOCK_N=32, BLOCK_K=64)],
}
GEMM_CONFIGS: dict[int, list[triton.Config]] = {
    64: [_cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
         _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
         _cfg(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
         _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)],
    256: [_cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
          _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
          _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
          _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)],
    1 << 62: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
              _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
              _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
              _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
              _cfg(4, 3, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8)],
}
# Every config above compiles for sm_90 within its shared memory with bf16/fp16 activations
# (checked ahead of time for group sizes 16, 33 and 128); with fp32 activations the GEMM keeps
# the smaller tiles at fewer stages (_fit_x_dtype).
# One small fixed config each under the interpreter, where autotuning only costs time.
_INTERP_GEMV = {"BLOCK_N": 64, "BLOCK_K": 128}
_MIN_GEMV_BLOCK_N = min(min(c.kwargs["BLOCK_N"] for cs in GEMV_CONFIGS.values() for c in cs),
                        _INTERP_GEMV["BLOCK_N"])
_INTERP_GEMM = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}


@triton.jit
def _w4a16_gemv_kernel(x_ptr, packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr, outer_ptr,
                       bias_ptr, part_ptr, out_ptr, count_ptr, xs_ptr, M, N, K, KB, G,
                       outer_stride, GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr,
                       HAS_ZERO: tl.constexpr, HAS_OUTER: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_XS: tl.constexpr, SPLIT: tl.constexpr, REDUCE: tl.constexpr,
                       KIND: tl.constexpr, OUT_KIND: tl.constexpr,
                       EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Split-K GEMV: partial sums of K tiles [pid_s*per, (pid_s+1)*per) into part[pid_s].

    The weight is rounded to ``KIND`` (x's dtype), the result to ``OUT_KIND``; ``xs`` (W4A8's
    FP8 rows) holds per-row scales applied before the bias. With ``REDUCE`` the last program
    of each column tile to store its partial sums them all into ``out`` (as
    ``w4a16_gemv._finish`` does; ``count_ptr``: the arrival counts)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * K
    tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(tiles, SPLIT)  # whole tiles per split keep k0 a multiple of BLOCK_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(pid_s * per, tl.minimum(pid_s * per + per, tiles)):
        k0 = t * BLOCK_K
        w_lo, w_hi = _weight_tile(packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr,
                                  outer_ptr, k0, offs_n, N, K, KB, G, outer_stride,
                                  GROUP_SIZE, HAS_NEG, HAS_ZERO, HAS_OUTER, BLOCK_K, False)
        w_lo = _round_to(w_lo, KIND, EXACT)
        w_hi = _round_to(w_hi, KIND, EXACT)
        k_lo = k0 + 2 * tl.arange(0, BLOCK_K // 2)
        x_lo = tl.load(x_row + k_lo[None, :], mask=m_ok[:, None] & (k_lo < K)[None, :],
                       other=0.0).to(tl.float32)
        x_hi = tl.load(x_row + k_lo[None, :] + 1,
                       mask=m_ok[:, None] & (k_lo + 1 < K)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x_lo[:, :, None] * w_lo[None, :, :], axis=1)
        acc += tl.sum(x_hi[:, :, None] * w_hi[None, :, :], axis=1)
    out_mask = m_ok[:, None] & (offs_n < N)[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if SPLIT == 1:  # the only partial is the result: finish here, no second kernel
        _rows_epilogue(acc, bias_ptr, out_ptr, xs_ptr, offs_m, m_ok, offs_n, offs, out_mask, N,
                       HAS_BIAS, HAS_XS, OUT_KIND, EXACT)
    else:
        tl.store(part_ptr + pid_s.to(tl.int64) * M * N + offs, acc, mask=out_mask)
        if REDUCE:
            if _last_arrival(count_ptr, pid_n, SPLIT):
                tot = _sum_splits(part_ptr, offs, out_mask, M * N, SPLIT)
                _rows_epilogue(tot, bias_ptr, out_ptr, xs_ptr, offs_m, m_ok, offs_n, offs,
                               out_mask, N, HAS_BIAS, HAS_XS, OUT_KIND, EXACT)
                _reset_count(count_ptr, pid_n)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, xs_ptr, res_ptr, M, N,
                          SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_XS: tl.constexpr,
                          KIND: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr,
                          HAS_RES: tl.constexpr):
    """out = cast(sum_s part[s] * xs[row] + bias), summing splits in index order
    (deterministic); ``xs``: optional fp32 per-row activation scales (W4A8's FP8 rows);
    ``res``: a residual ``[M, N]`` added after the cast (and rounded again), or unused."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = _sum_splits(part_ptr, offs, mask, M * N, SPLIT)
    if HAS_XS:
        acc = _mul_rn(acc, tl.load(xs_ptr + offs // N, mask=mask, other=0.0), EXACT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    acc = _round_to(acc, KIND, EXACT)
    if HAS_RES:
        acc = _round_to(acc + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32),
                        KIND, EXACT)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a16_gemm_kernel(x_ptr, packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr, outer_ptr,
                       bias_ptr, out_ptr, M, N, K, KB, G, outer_stride, M_BUCKET,
                       GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr, HAS_ZERO: tl.constexpr,
                       HAS_OUTER: tl.constexpr, HAS_BIAS: tl.constexpr, KIND: tl.constexpr,
                       EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Tiled GEMM; ``M_BUCKET`` only feeds the autotune key."""
    # Grouped order: weight tiles (the bulk of the bytes) are reused from L2.
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_lo, w_hi = _weight_tile(packed_ptr, table_ptr, scale_ptr, neg_ptr, zero_ptr,
                                  outer_ptr, k0, offs_n, N, K, KB, G, outer_stride,
                                  GROUP_SIZE, HAS_NEG, HAS_ZERO, HAS_OUTER, BLOCK_K, True)
        # Back to K order (row 2j: low nibbles, 2j + 1: high ones), so x loads as one
        # contiguous [BLOCK_M, BLOCK_K] tile (two half tiles of every other element compiled
        # to 2-byte loads on sm_90) and one MMA chain covers the block.
        w = tl.trans(tl.interleave(tl.trans(w_lo), tl.trans(w_hi)))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_row + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :],
                     other=0.0)
        if KIND == 0:
            # fp32 activations: tf32x3 (three TF32 MMAs, about fp32 accuracy); ieee FMAs
            # spilled kilobytes per thread in the sm_90 compile.
            acc = tl.dot(xk, w, acc, input_precision="tf32x3")
        elif EXACT:
            # Interpreter: its bf16 dot is wrong, so multiply the exactly rounded values in
            # fp32 (products of two 16-bit floats are exact in fp32).
            acc = tl.dot(xk.to(tl.float32), _round_to(w, KIND, EXACT), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(xk, w.to(x_ptr.dtype.element_ty), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    acc = _round_to(acc, KIND, EXACT)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n < N)[None, :])


def _gemv1():
    """The batch-1 GEMV module (imported late: it builds on this one's jit helpers)."""
    from qcompile.backends.triton import w4a16_gemv

    return w4a16_gemv


def _dequant():
    """The prefill module (imported late: it builds on this one's jit helpers)."""
    from qcompile.backends.triton import w4a16_dequant

    return w4a16_dequant


def _bucket(table: dict[int, list[triton.Config]], m: int) -> int:
    return min(b for b in table if b >= m)


#: The tiled GEMM's limits with fp32 activations: at most this many pipeline stages, and a
#: decoded-weight tile (BLOCK_N x BLOCK_K) of at most FP32_MAX_W_TILE elements. Compiled for
#: sm_90 (Triton 3.9), 2-stage tiles of 8192 weights take 86-172 KiB of shared memory, those of
#: 16384 take 232-280 KiB (over the 227 KiB limit); on an H100 four stages of the 32x64x128
#: tile asked for 232 KiB.
FP32_MAX_STAGES = 2
FP32_MAX_W_TILE = 8192


def _fit_x_dtype(configs: list[triton.Config], named_args: dict,
                 **kwargs) -> list[triton.Config]:
    """GEMM configs for this call's activation dtype: with fp32 ``x`` those within the
    :data:`FP32_MAX_W_TILE` weight tile, each at most :data:`FP32_MAX_STAGES` stages deep, so
    that every candidate, the first one included, fits in shared memory."""
    if named_args["x_ptr"].dtype != torch.float32:
        return list(configs)
    fitted: dict[tuple, triton.Config] = {}
    for c in configs:
        if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] > FP32_MAX_W_TILE:
            continue
        stages = min(c.num_stages, FP32_MAX_STAGES)
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, stages)
        fitted.setdefault(key, triton.Config(dict(c.kwargs), num_warps=c.num_warps,
                                             num_stages=stages))
    if not fitted:
        raise ValueError("no W4A16 GEMM config fits fp32 activations (every BLOCK_N x BLOCK_K "
                         f"is over {FP32_MAX_W_TILE})")
    return list(fitted.values())


@functools.cache
def _tuned(kind: str, bucket: int) -> triton.runtime.Autotuner:
    """The autotuned kernel for one M bucket (each bucket has its own config list)."""
    if kind == "gemv":
        return triton.autotune(GEMV_CONFIGS[bucket], key=["N", "K", "GROUP_SIZE", "SPLIT"],
                               prune_configs_by=tuning(None, _w4a16_gemv_kernel),
                               do_bench=plain_bench)(
            _w4a16_gemv_kernel)
    return triton.autotune(GEMM_CONFIGS[bucket], key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                           prune_configs_by=tuning(_fit_x_dtype, _w4a16_gemm_kernel),
                           do_bench=plain_bench)(
        _w4a16_gemm_kernel)


def _pick_split(n: int, k: int, device: torch.device) -> int:
    """K splits of the GEMV: enough programs to fill the GPU, at least 256 K per split."""
    cap = max(1, min(16, -(-k // 256)))
    if device.type != "cuda":
        return min(4, cap)  # interpreter: exercise the split path on small shapes
    sms = sm_count(device)
    return max(1, min(cap, -(-2 * sms // -(-n // 64))))


def _check_any(t: object, name: str, dtypes, ndim=None, shape=None, device=None) -> torch.Tensor:
    """:func:`check_tensor` minus the kernel-device rule (the reference runs anywhere)."""
    if not torch.is_tensor(t) or t.dtype not in dtypes:
        return check_tensor(t, name, dtypes)  # raises the dtype/type message
    if shape is not None and (t.dim() != len(shape) or any(
            w is not None and h != w for h, w in zip(t.shape, shape, strict=True))):
        raise KernelInputError(f"{name} has shape {tuple(t.shape)}; expected "
                               f"{tuple('*' if w is None else w for w in shape)}")
    if ndim is not None and t.dim() != ndim:
        raise KernelInputError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise KernelInputError(f"{name} is on {t.device}, the other inputs on {device}")
    return t


def _validate(x, packed, table, scale, scale_neg, zero, outer, group_size, bias, check):
    """Check every input with ``check``; return ``(N, K, G)``."""
    check(x, "x", _X_DTYPES)
    if x.dim() < 1:
        raise KernelInputError("x must have at least one dim (its last dim is K)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise KernelInputError(f"group_size must be a positive int, got {group_size!r}")
    dev, k = x.device, x.shape[-1]
    check(packed, "packed", (torch.uint8,), ndim=2, device=dev)
    n, g = packed.shape[0], -(-k // group_size)
    check(packed, "packed", (torch.uint8,), shape=(n, -(-k // 2)), device=dev)
    check(table, "table", (torch.float32,), shape=(16,), device=dev)
    check(scale, "scale", (torch.float32,), shape=(n, g), device=dev)
    for name, t in (("scale_neg", scale_neg), ("zero", zero)):
        if t is not None:
            check(t, name, (torch.float32,), shape=(n, g), device=dev)
    if outer is not None:
        check(outer, "outer", (torch.float32,), ndim=2, device=dev)
        if tuple(outer.shape) not in ((n, 1), (1, 1)):
            raise KernelInputError(f"outer has shape {tuple(outer.shape)}; expected ({n}, 1) "
                                   "or (1, 1)")
    if bias is not None:
        check(bias, "bias", (x.dtype,), shape=(n,), device=dev)
    return n, k, g


def _dequant_ref(packed, table, scale, scale_neg, zero, outer, group_size: int, k: int):
    """fp32 weight ``[N, K]``, the same fp32 operations as ``formats.quantize.dequantize``."""
    t = table[unpack_codes(packed, 4, k).long()]
    idx = torch.arange(k, device=packed.device) // group_size
    eff = scale if outer is None else scale * outer
    v = t if zero is None else t - zero[:, idx]
    w = v * eff[:, idx]
    if scale_neg is None:
        return w
    eff_neg = scale_neg if outer is None else scale_neg * outer
    return torch.where(t < 0, v * eff_neg[:, idx], w)


def w4a16_linear_ref(x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor,
                     scale: torch.Tensor, scale_neg: torch.Tensor | None,
                     zero: torch.Tensor | None, outer: torch.Tensor | None, group_size: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch W4A16 linear (any device): the numerics the kernels reproduce.

    Args:
        x: Activations ``[..., K]``, bf16/fp16/fp32.
        packed: ``uint8`` codes ``[N, ceil(K/2)]``, element 2i in the low nibble of byte i.
        table: fp32 ``[16]``, the value of each code.
        scale: fp32 ``[N, ceil(K/group_size)]`` group scales (AFPQ: the positive side).
        scale_neg: fp32 like ``scale`` for codes with negative value (AFPQ), or None.
        zero: fp32 like ``scale``, INT asym zero points, or None.
        outer: fp32 ``[N, 1]`` or ``[1, 1]`` multiplying every group scale, or None.
        group_size: Elements per group along K (K itself for per-channel).
        bias: ``[N]`` in ``x``'s dtype, or None.

    Returns:
        ``[..., N]`` in ``x``'s dtype: ``linear(x, W.to(x.dtype), bias)`` accumulated in fp32.

    Raises:
        KernelInputError: A malformed input.
    """
    _validate(x, packed, table, scale, scale_neg, zero, outer, group_size, bias, _check_any)
    w = _dequant_ref(packed, table, scale, scale_neg, zero, outer, group_size, x.shape[-1])
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w.to(x.dtype).float(), b).to(x.dtype)


def route_key(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, has_neg: bool,
              has_zero: bool, has_outer: bool, has_bias: bool, fp4: bool) -> tuple:
    """:mod:`~qcompile.backends.triton.path_tuning`'s key for the route of an ``m``-row call
    above the GEMVs (``fp4``: the cached FP4 table, which has its own decode kernels)."""
    return ("w4a16", next_pow2(m), n, k, group_size, dtype, has_neg, has_zero, has_outer,
            has_bias, fp4)


def launch_gemv(args: tuple, out: torch.Tensor, k: int, kb: int, g: int, o_stride: int,
                common: dict, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The split-K GEMV (and its reduce) of ``args[0]``'s rows into ``out`` ``[M, N]``.

    ``args``: the kernel's pointer arguments up to the bias, validated and contiguous (unused
    ones filled with placeholders); ``common``: its flags (``KIND`` is the dtype the weight is
    rounded to). The result is rounded to ``out``'s dtype. ``x_scale`` (fp32 ``[M]``)
    multiplies each row's sums before the bias.
    """
    x2 = args[0]
    m, n = out.shape
    exact = common["EXACT"]
    split = _pick_split(n, k, x2.device)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    block_m = next_pow2(m)
    kern = _w4a16_gemv_kernel if exact else _tuned("gemv", _bucket(GEMV_CONFIGS, block_m))
    cfg = _INTERP_GEMV if exact else {}
    xs = args[3] if x_scale is None else x_scale  # a placeholder when unused
    out_kind = _DTYPE_KIND[out.dtype]
    counts = arrival_counts(x2.device, cdiv(n, _MIN_GEMV_BLOCK_N)) if split > 1 else None
    launch(
        kern, lambda meta: (cdiv(n, meta["BLOCK_N"]), split), *args, part, out,
        args[3] if counts is None else counts, xs, m, n, k, kb, g, o_stride,
        SPLIT=split, REDUCE=counts is not None, BLOCK_M=block_m, HAS_XS=x_scale is not None,
        OUT_KIND=out_kind, **cfg, **common)
    if split > 1 and counts is None:
        block = 1024
        launch(
            _splitk_reduce_kernel, (cdiv(m * n, block),), part, args[-1], out, xs, xs, m, n,
            SPLIT=split, HAS_BIAS=common["HAS_BIAS"],
            HAS_XS=x_scale is not None, KIND=out_kind, EXACT=exact, BLOCK=block, HAS_RES=False)
    return out


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor,
                 scale: torch.Tensor, scale_neg: torch.Tensor | None,
                 zero: torch.Tensor | None, outer: torch.Tensor | None, group_size: int,
                 bias: torch.Tensor | None = None, path: str | None = None,
                 fusion=None) -> torch.Tensor:
    """W4A16 linear with Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

    Same arguments and result as :func:`w4a16_linear_ref` (up to fp32 summation order): the
    batch-1 or split-K GEMV for at most :data:`GEMV_MAX_M` rows, the tiled GEMM above, and
    decode-then-cuBLAS from ``w4a16_dequant.DEQUANT_MIN_M`` rows; above the GEMVs on a GPU,
    the fastest of the tiled GEMM, the swapped one and decode-then-cuBLAS, timed at the first
    call of each shape (:mod:`qcompile.backends.triton.path_tuning`). ``path`` forces one
    for any M (benchmarks): ``"gemm"``, ``"dequant"``, or ``"swap"`` (the tiled GEMM with the
    decoded weight as the MMA's register operand, :mod:`qcompile.backends.triton.w4a16_swap`;
    bf16 and fp16 activations).

    ``fusion`` (a :class:`~qcompile.backends.triton.gemv_fusion.GemvFusion`): an RMSNorm or
    SiLU gate on ``x`` and a residual add on the result. The batch-1 GEMV does them in its
    kernel; every other route runs them as separate ops around the linear.

    Raises:
        KernelInputError: A malformed input, mixed devices, tensors no kernel can run on, or
            an unknown ``path``.
    """
    n, k, g = _validate(x, packed, table, scale, scale_neg, zero, outer, group_size, bias,
                        check_tensor)
    if fusion is not None and not fusion.empty:
        fusion.check(x, n)
        if (path is not None or x.numel() != k or k == 0 or n == 0
                or not _gemv1().gemv1_eligible(1, group_size)):
            from qcompile.backends.triton import gemv_fusion as gf

            y = w4a16_linear(gf.prologue_ref(x, fusion), packed, table, scale, scale_neg, zero,
                             outer, group_size, bias, path)
            return gf.epilogue_ref(y, fusion)
    if path not in (None, "gemm", "dequant", "swap"):
        raise KernelInputError(
            f"path must be 'gemm', 'dequant', 'swap' or None, got {path!r}")
    if path == "swap" and x.dtype == torch.float32:
        raise KernelInputError("path 'swap' needs bf16 or fp16 activations, got float32")
    lead = x.shape[:-1]
    m = lead.numel()
    x2 = x.reshape(m, k).contiguous()  # (-1, k) is ambiguous for K = 0
    if m == 0 or n == 0 or k == 0:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        return (out.zero_() if bias is None else out.copy_(bias.expand(m, n))).reshape(*lead, n)
    packed, table, scale = packed.contiguous(), table.contiguous(), scale.contiguous()
    neg = scale if scale_neg is None else scale_neg.contiguous()  # unused placeholders
    zer = scale if zero is None else zero.contiguous()
    out_t = scale if outer is None else outer.contiguous()
    bias_t = scale if bias is None else bias.contiguous()
    exact = interpreting()
    common = dict(GROUP_SIZE=group_size, HAS_NEG=scale_neg is not None,
                  HAS_ZERO=zero is not None, HAS_OUTER=outer is not None,
                  HAS_BIAS=bias is not None, KIND=_DTYPE_KIND[x.dtype], EXACT=exact)
    o_stride = 0 if outer is None or outer.shape[0] == 1 else 1
    args = (x2, packed, table, scale, neg, zer, out_t, bias_t)
    gemv1 = _gemv1()
    route = path
    if route is None:
        if m == 1 and gemv1.gemv1_eligible(m, group_size):
            route = "gemv1"
        elif m >= _dequant().DEQUANT_MIN_M:
            route = "dequant"
        else:
            route = "gemv" if m <= GEMV_MAX_M else "gemm"
        if route in ("gemm", "dequant") and m <= path_tuning.MAX_M:  # the fastest, timed once
            paths = ("gemm", "dequant") + (("swap",) if x.dtype != torch.float32 else ())
            key = route_key(m, n, k, group_size, x.dtype, scale_neg is not None,
                            zero is not None, outer is not None, bias is not None,
                            table is element_table("fp4_e2m1", x.device))
            route = path_tuning.pick(key, route, paths, lambda p: w4a16_linear(
                x2, packed, table, scale, scale_neg, zero, outer, group_size, bias, path=p),
                x.device)
    # The batch-1 GEMV and the prefill path allocate their own result.
    out = None if route in ("gemv1", "dequant") else torch.empty(m, n, dtype=x.dtype,
                                                                device=x.device)
    if route == "swap":
        from qcompile.backends.triton.w4a16_swap import w4a16_swap_launch

        out = w4a16_swap_launch(args, out, m, n, k, packed.shape[1], g, o_stride, common)
    elif route == "gemv1":
        fp4 = table is element_table("fp4_e2m1", x.device)  # the cached table: no device sync
        out = gemv1.w4a16_gemv1(x2, packed, table, scale, None if scale_neg is None else neg,
                                None if zero is None else zer, None if outer is None
                                else out_t, group_size, None if bias is None else bias_t, fp4,
                                fusion=None if fusion is None or fusion.empty else fusion)
    elif route == "dequant":
        # prefill: decode W once, then cuBLAS
        w = _dequant().w4a16_dequant(packed, table, scale, scale_neg if scale_neg is None
                                     else neg, zero if zero is None else zer, None if
                                     outer is None else out_t, group_size, k, x.dtype)
        out = _dequant().gemm(x2, w, None if bias is None else bias_t)
    elif route == "gemv":
        launch_gemv(args, out, k, packed.shape[1], g, o_stride, common)
    else:
        m_bucket = min(next_pow2(m), 1 << 16)
        kern = _w4a16_gemm_kernel if exact else _tuned("gemm", _bucket(GEMM_CONFIGS, m))
        cfg = _INTERP_GEMM if exact else {}
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        launch(kern, grid, *args, out, m, n, k, packed.shape[1], g, o_stride, m_bucket, **cfg,
               **common)
    return out.reshape(*lead, n)
