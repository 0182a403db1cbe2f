"""Per-token quantization with a Kronecker online Hadamard ``H_2^k (x) H_m`` as two or three
products.

For bf16/fp16 rows with one Hadamard block per row of a Paley size (``m`` > 1, a Paley base of
order ``m`` <= 128, ``2^k >= 16``, at most 16384 padded elements): SmolLM2's 1536 = 128 x 12
and 576 = 16 x 36, Llama-3-8B's 14336 = 512 x 28, 12288 = 1024 x 12. The row is the tensor
``X[a, b, j]`` (``d = (a * B + b) * m + j``, ``2^k = A * B``, ``m`` padded to ``Q``), and the
transform, ``x @ H`` as in :func:`qcompile.hadamard.hadamard_transform`, is one product per
axis:

1. ``Z = X @ H_m`` on ``[A * B, Q]`` (tensor cores, the input as it is: exact products);
2. ``H_B`` on the middle axis: the fp16 parts of ``Z`` permuted to ``[A, Q, B]``, ``@ H_B``;
3. ``H_A`` from the left on ``[A, Q * B]``.

Up to ``2^k = 128`` there is no middle axis (``B = 1``, ``A = 2^k``: steps 1 and 3, the
layout of :mod:`qcompile.backends.triton.had_quant` with a Paley right factor); 256 is
``16 x 16``, larger ones ``(2^k / 32) x 32``. Every left factor is at least 16 (a dot's
smallest side).

The fp32 operands of steps 2 and 3 are split as in :mod:`qcompile.backends.triton.had_quant`
(the tile scaled by a power of two into fp16's range, then ``hi + lo`` in fp16), so the rotation
keeps fp32 accuracy; the output is stored from the ``[A, Q, B]`` order through matching
offsets. Quantization is ``had_quant``'s (compute_scales' rule, correctly rounded division).

The general kernel of :mod:`qcompile.backends.triton.act_quant` also takes these sizes (and
fp32 rows, several blocks per row, a fused RMSNorm), but holds its whole tile in registers
through three permutes: with 1536 it spilled 224 bytes per thread in the offline sm_90
compile, where this kernel spills nothing (``tests/test_triton_compile_sm90.py``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qcompile.backends.triton.act_jit import sylvester
from qcompile.backends.triton.had_quant import (
    HAD2_CONFIGS,
    _grid,
    _operand,
    _pow2_ceil,
    _quantize_store,
    _to_dtype_grid,
)
from qcompile.backends.triton.jit import exp2i, floor_log2
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import graph_bench, interpreting, sm_count, tuning
from qcompile.device_cache import outside_graph_pools
from qcompile.hadamard import hadamard_base, hadamard_factors

__all__ = ["KronPlan", "base_matrix", "kron_plan", "launch_kron"]

_B = 32  # middle factor from 2^k = 512
_MAX_TILE = 1 << 14


@functools.lru_cache(maxsize=64)
def base_matrix(pow2: int, m: int, qp: int, device: str) -> torch.Tensor:
    """int8 ``[qp, qp]``: H_pow2 (x) H_m (+-1, Sylvester x Paley) zero-padded."""
    h = hadamard_base(m)
    while h.shape[0] < pow2 * m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # H_2 (x) h
    out = torch.zeros(qp, qp, dtype=torch.int8)
    out[: h.shape[0], : h.shape[1]] = h.to(torch.int8)
    return outside_graph_pools(lambda: out.to(device), device)  # kept by the cache


@triton.jit
def _split16(t):
    """``t * 2^s`` (largest magnitude in [2^14, 2^15)) as fp16 ``hi + lo`` (22 bits), and
    ``s``; an all-zero tile takes s = 0, tiny ones at most 2^114."""
    e = floor_log2(tl.max(tl.abs(t)))
    e = tl.minimum(tl.maximum(tl.where(e < -126, 14, e), -100), 113)
    t = t * exp2i(14 - e)
    hi = t.to(tl.float16)
    lo = (t - hi.to(tl.float32)).to(tl.float16)
    return hi, lo, 14 - e


@triton.jit
def _kron_quant_kernel(
    x_ptr, base_ptr, out_ptr, scale_ptr, M, stride_x, stride_o, inv_norm,
    A: tl.constexpr, B: tl.constexpr, Q: tl.constexpr, MB: tl.constexpr,
    ELEM: tl.constexpr, ASYM: tl.constexpr, LMAX: tl.constexpr, OUT: tl.constexpr,
    XDT: tl.constexpr, NATIVE: tl.constexpr, PER_SM: tl.constexpr, m_bucket=1,
):
    """Rows ``pid, pid + programs, ...``; element ``(a * B + b) * MB + j`` of a row is
    ``X[a, b, j]`` (``j < MB``, the base order); padding columns load 0 and stay 0. ``B`` 1:
    no middle axis, two products (``H_A @ (X @ H_m)``)."""
    ab = tl.arange(0, A * B)[:, None]
    j = tl.arange(0, Q)[None, :]
    off_in = ab * MB + j
    mask_in = (ab >= 0) & (j < MB)
    if B > 1:
        a3 = tl.arange(0, A)[:, None, None]
        j3 = tl.arange(0, Q)[None, :, None]
        b3 = tl.arange(0, B)[None, None, :]
        off_out = tl.reshape((a3 * B + b3) * MB + j3, [A, Q * B])
        mask_out = tl.reshape((a3 >= 0) & (j3 < MB) & (b3 >= 0), [A, Q * B])
    else:  # the output keeps the input's [A, Q] order
        off_out = off_in
        mask_out = mask_in
    k = tl.arange(0, Q)
    h_m = tl.load(base_ptr + k[:, None] * Q + k[None, :]).to(tl.float32)
    h_a = sylvester(A, A)
    if NATIVE:
        h_m = h_m.to(x_ptr.dtype.element_ty)  # exact: +-1 and 0
        h_a = h_a.to(tl.float16)
    if B > 1:
        h_b = sylvester(B, B)
        if NATIVE:
            h_b = h_b.to(tl.float16)
    pid = tl.program_id(0)
    for row in tl.range(pid, M, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(x_ptr + row64 * stride_x + off_in, mask=mask_in, other=0.0)
        z = tl.dot(_operand(x, NATIVE), h_m)  # [A*B, Q]
        if B > 1:
            hi, lo, s1 = _split16(z)
            hi = tl.reshape(tl.permute(tl.reshape(hi, [A, B, Q]), (0, 2, 1)), [A * Q, B])
            lo = tl.reshape(tl.permute(tl.reshape(lo, [A, B, Q]), (0, 2, 1)), [A * Q, B])
            w = tl.dot(_operand(lo, NATIVE), h_b)
            w = tl.dot(_operand(hi, NATIVE), h_b, w)  # [A*Q, B], scaled by 2^s1
            hi, lo, s2 = _split16(tl.reshape(w, [A, Q * B]))
            y = tl.dot(h_a, _operand(lo, NATIVE))
            y = tl.dot(h_a, _operand(hi, NATIVE), y)  # [A, Q*B], scaled by 2^(s1 + s2)
            y = (y * exp2i(-s2)) * exp2i(-s1)
        else:
            hi, lo, s1 = _split16(z)
            y = tl.dot(h_a, _operand(lo, NATIVE))
            y = tl.dot(h_a, _operand(hi, NATIVE), y) * exp2i(-s1)  # [A, Q]
        y = _to_dtype_grid(y * inv_norm, XDT, NATIVE)
        o_ptrs = out_ptr + row64 * stride_o + off_out
        if OUT == 2:  # the rotated row, unquantized
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_out)
        else:
            _quantize_store(y, o_ptrs, mask_out, scale_ptr + row64, ELEM, ASYM, LMAX, OUT, XDT,
                            NATIVE)


#: Row-tile elements a thread may hold (the input, Z and its split parts, the result):
#: 16384-element tiles need 8 warps (the offline sm_90 compile spills with 4).
_PER_THREAD = 64
#: Tiles a 4-warp program holds at this many elements per thread or fewer take no more warps
#: (in the offline sm_90 compile 576's 1024-element tile spilled 2 words with 8 warps).
_SMALL = 16


def _prune(configs, named_args, **kwargs):
    """Warp counts that leave a thread at most :data:`_PER_THREAD` tile elements (only the
    fewest warps for a small tile: :data:`_SMALL`); if none does, the configs with the most
    warps."""
    tile = kwargs["A"] * kwargs["B"] * kwargs["Q"]
    fewest = min(c.num_warps for c in configs)
    small = tile // (32 * fewest) <= _SMALL
    keep = [c for c in configs if tile // (32 * c.num_warps) <= _PER_THREAD
            and not (small and c.num_warps > fewest)]
    most = max(c.num_warps for c in configs)
    return keep or [c for c in configs if c.num_warps == most]


_kron_tuned = triton.autotune(
    configs=HAD2_CONFIGS,
    key=["A", "B", "Q", "MB", "ELEM", "ASYM", "OUT", "XDT", "NATIVE", "m_bucket"],
    prune_configs_by=tuning(_prune, _kron_quant_kernel), do_bench=graph_bench,
)(_kron_quant_kernel)


@dataclass(frozen=True)
class KronPlan:
    """``2^k = a * b``, base order ``m`` padded to ``q``."""

    a: int
    b: int
    q: int
    m: int
    inv_norm: float


@functools.lru_cache(maxsize=256)
def kron_plan(had_size: int, d: int, fp32: bool = False) -> KronPlan | None:
    """The two- or three-product layout (module docstring), or None: one Kronecker block
    per row of bf16/fp16, ``2^k >= 16``, the base padded to at most 128 columns (64 with a
    middle axis), a tile of at most 16384 padded elements."""
    if fp32 or had_size != d or had_size < 16:
        return None
    factors = hadamard_factors(had_size)
    if factors is None or factors[1] == 1:
        return None
    pow2, m = factors
    q = max(16, _pow2_ceil(m))
    if pow2 < 16:
        return None
    if pow2 <= 128:
        a, b, q_max = pow2, 1, 128
    else:
        b = 16 if pow2 == 256 else _B
        a, q_max = pow2 // b, 64
    if q > q_max or a * b * q > _MAX_TILE:
        return None
    return KronPlan(a, b, q, m, 1.0 / math.sqrt(had_size))


def launch_kron(x2: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, plan: KronPlan,
                elem: int, asym: bool, lmax: float, out: int, xdt: int) -> None:
    """Launch on ``x2`` ``[M, D]`` (checked by the caller) into ``y`` and ``scale``."""
    m_rows = x2.shape[0]
    base = base_matrix(1, plan.m, plan.q, str(x2.device))
    args = (x2, base, y, scale, m_rows, x2.stride(0), y.stride(0), plan.inv_norm)
    meta = dict(A=plan.a, B=plan.b, Q=plan.q, MB=plan.m, ELEM=elem, ASYM=asym, LMAX=lmax,
                OUT=out, XDT=xdt, NATIVE=not interpreting())
    if interpreting():
        _kron_quant_kernel[(min(m_rows, 2),)](*args, **meta, PER_SM=1, num_warps=8)
        return
    sms = sm_count(x2.device)
    launch(_kron_tuned, _grid(m_rows, sms), *args, **meta,
           m_bucket=min(_pow2_ceil(m_rows), 4096))
