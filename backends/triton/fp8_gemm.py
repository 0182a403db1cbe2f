"""FP8 W8A8 GEMM: ``(a @ b.T) * a_scale * b_scale (+ bias)`` on FP8 tensor cores.

``a`` holds per-token FP8 E4M3 activations ``[M, K]`` with fp32 scales ``[M, 1]``, ``b`` per-channel
FP8 E4M3 weights ``[N, K]`` with fp32 scales ``[N]``. The kernel multiplies FP8 tiles with
``tl.dot`` (an fp32 accumulator, summed as described under Accumulation below on Hopper; exact
fp32 products under the interpreter) and applies both scales and the bias in the epilogue, in
the reference's order.

Accumulation: Hopper's FP8 WGMMA keeps about 14 significant bits in its accumulator. By default
the kernels leave the sums there, as Triton's sm_90 default and
``torch._scaled_mm(use_fast_accum=True)`` do (an H100 gave the same maximum error as that mode:
4.5e-3 of the output's absmax at K = 4096, ``benchmarks/fp8_accuracy.py``); it ran at
1.04x cuBLAS's default (promoting) mode and 0.93x its fast mode at 8192^3.
``fast_accum=False`` adds each MMA instruction's K = 32 products into a separate fp32
accumulator (:data:`PROMOTE_K`): 4.5e-5 of absmax, three times more accurate than cuBLAS's
default mode, but 0.55-0.60x its speed (the promoted sums serialize the asynchronous MMAs and
the second accumulator spills at 128x256 tiles).

Two launch schemes share one tile routine:

* tiled: one program per output tile, in grouped ("super-grouping") order so ``GROUP_M``
  row-blocks sweep the same weight columns while they are in L2;
* persistent: one program per SM striding over tiles in the same order, which amortizes
  per-program setup over several tiles; ``persistent=None`` picks it for multi-wave problems
  (:func:`use_persistent`, a size heuristic not yet tuned on hardware).

K and N need not be multiples of the blocks: the K tail is loaded masked (zeros), so no padding
is needed even when K is not a multiple of 16 (the MMA's K step); rows past M/N wrap around on
load and are masked on store.

On CUDA (compute capability 8.9+) the kernels are autotuned over :data:`FP8_CONFIGS`, bucketed
by M (decode-sized M gets 16/32-row tiles, prefill 64-256); under the interpreter they run one
fixed small config.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qcompile.backends.triton.jit import fp8_dot, tile_coords
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import (
    KernelInputError,
    cdiv,
    check_tensor,
    interpreting,
    next_pow2,
    plain_bench,
    sm_count,
    tuning,
)

__all__ = ["FP8_CONFIGS", "OUT_DTYPES", "fp8_scaled_mm", "fp8_scaled_mm_ref", "m_bucket",
           "mm_call"]

#: Output dtypes the kernels store.
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP8 = torch.float8_e4m3fn
#: With ``fast_accum=False``: K elements an FP8 MMA accumulates in the tensor core's
#: reduced-precision accumulator before they are added into the fp32 one (Triton's
#: ``max_num_imprecise_acc``; 32 = one sm_90 WGMMA instruction).
PROMOTE_K = 32
# Under the interpreter: small tiles (numpy cost grows with tile size) that still exercise
# several K steps, K tails, grouped ordering and persistent striding on the test shapes.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}
_INTERPRET_SMS = 3


def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps)


#: Autotune candidates for H100 (sm90). FP8 tiles are half the bytes of bf16 ones, so BLOCK_K
#: 128 with 3-5 stages fits shared memory (128x256x128 x 3 stages = 144 KiB).
FP8_CONFIGS = [
    # decode / small batch (M <= 32): thin M tiles, wide N and deep pipelines for bandwidth
    _cfg(16, 64, 128, 5, 4), _cfg(16, 128, 128, 4, 4), _cfg(16, 256, 128, 3, 4),
    _cfg(32, 64, 128, 5, 4), _cfg(32, 128, 128, 4, 4),
    # medium M (<= 128)
    _cfg(64, 64, 128, 5, 4), _cfg(64, 128, 128, 4, 4), _cfg(64, 256, 128, 3, 8),
    # large M: the classic Hopper GEMM tiles
    _cfg(128, 128, 128, 4, 8), _cfg(128, 128, 128, 3, 4), _cfg(128, 256, 128, 3, 8),
    _cfg(256, 128, 128, 3, 8), _cfg(128, 64, 128, 4, 4),
]


def m_bucket(m: int) -> int:
    """Autotune bucket of M: the next power of two, capped at 4096 (a prefill is a prefill)."""
    return min(next_pow2(max(m, 1)), 4096)


def prune_configs_by_m(configs: list[triton.Config], named_args: dict,
                       **kwargs: object) -> list[triton.Config]:
    """Keep the configs whose BLOCK_M suits the M bucket (tiny M wastes big tiles)."""
    bucket = named_args["M_BUCKET"]

    def fits(bm: int) -> bool:
        if bucket <= 64:
            return bucket // 2 <= bm <= max(bucket, 16)
        return bm >= 64 and bm <= max(bucket, 64)

    kept = [c for c in configs if fits(c.kwargs["BLOCK_M"])]
    return kept or configs


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def check_fp8_device(device: torch.device) -> None:
    """Refuse CUDA devices without FP8 tensor cores (compute capability below 8.9)."""
    if device.type == "cuda" and _capability(_index(device)) < (8, 9):
        major, minor = _capability(_index(device))
        raise KernelInputError(f"FP8 kernels need a GPU with FP8 tensor cores (compute "
                               f"capability 8.9+, Ada/Hopper); {device} has {major}.{minor}")


def num_programs_cap(device: torch.device) -> int:
    """Programs of a persistent launch: the SM count (a fixed small number when interpreting)."""
    if device.type != "cuda":
        return _INTERPRET_SMS
    return sm_count(device)


# --- reference ---------------------------------------------------------------------------------

def fp8_scaled_mm_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Plain PyTorch reference of :func:`fp8_scaled_mm` (any device).

    Args:
        a: float8_e4m3fn activations ``[M, K]``.
        a_scale: fp32 per-token scales ``[M, 1]`` (or ``[M]``).
        b: float8_e4m3fn weights ``[N, K]``.
        b_scale: fp32 per-channel scales ``[N]`` (or ``[N, 1]``).
        bias: Optional ``[N]`` bias.
        out_dtype: Output dtype.

    Returns:
        ``((a.float() @ b.float().T) * a_scale * b_scale.T + bias).to(out_dtype)``, in fp32
        until the final cast.
    """
    out = (a.float() @ b.float().T) * a_scale.float().reshape(-1, 1)
    out = out * b_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# --- kernels -----------------------------------------------------------------------------------

@triton.jit
def _fp8_mm_tile(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                 pid_m, pid_n, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROMOTE: tl.constexpr):
    """Compute and store output tile (pid_m, pid_n)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N wrap around: loads stay in bounds without a mask; the store drops them.
    # int64 row offsets: M*K may pass 2^31 for long prefills.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + rn[:, None] * stride_bn + offs_k[None, :] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        # Masked K tail (zeros): no padding of K to a multiple of 16 or of BLOCK_K.
        k_mask = offs_k[None, :] < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=k_mask, other=0.0)
        b = tl.load(b_ptrs, mask=k_mask, other=0.0)
        # b is K-major [BLOCK_N, BLOCK_K]; its transpose is the K-major B operand FP8 MMA needs.
        acc = fp8_dot(a, tl.trans(b), acc, PROMOTE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    # Epilogue in the reference's order: ((acc * a_scale) * b_scale) + bias.
    out = acc * tl.load(as_ptr + rm)[:, None]
    out = out * tl.load(bs_ptr + rn)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_mm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET,
                   stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                   HAS_BIAS: tl.constexpr, PROMOTE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One program per output tile. M_BUCKET only keys the autotuner."""
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _fp8_mm_tile(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                 pid_m, pid_n, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, PROMOTE)


@triton.jit
def _fp8_mm_persistent_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET,
                              stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                              NUM_PROGRAMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                              PROMOTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """NUM_PROGRAMS programs (one per SM) striding over the tiles in grouped order."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
        pid_m, pid_n = tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _fp8_mm_tile(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                     pid_m, pid_n, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, PROMOTE)


_fp8_mm_tuned = triton.autotune(FP8_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS", "PROMOTE"],
                                prune_configs_by=tuning(prune_configs_by_m, _fp8_mm_kernel),
                                do_bench=plain_bench)(_fp8_mm_kernel)
_fp8_mm_persistent_tuned = triton.autotune(
    FP8_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS", "PROMOTE", "NUM_PROGRAMS"],
    prune_configs_by=tuning(prune_configs_by_m, _fp8_mm_persistent_kernel),
    do_bench=plain_bench)(
    _fp8_mm_persistent_kernel)


# --- wrapper -----------------------------------------------------------------------------------

def check_scale_vector(t: object, name: str, length: int, device: torch.device) -> torch.Tensor:
    """Check an fp32 scale of ``length`` entries, shaped ``[length]`` or ``[length, 1]``;
    return it contiguous ``[length]``."""
    t = check_tensor(t, name, (torch.float32,), device=device)
    if tuple(t.shape) not in ((length,), (length, 1)):
        raise KernelInputError(
            f"{name} has shape {tuple(t.shape)}; expected ({length},) or ({length}, 1)")
    return t.reshape(length).contiguous()


def check_bias_and_dtype(bias: torch.Tensor | None, n: int, device: torch.device,
                         out_dtype: torch.dtype) -> torch.Tensor | None:
    """Check ``bias`` (``[N]``, a float dtype, or None) and ``out_dtype``."""
    if out_dtype not in OUT_DTYPES:
        raise KernelInputError(
            f"out_dtype {out_dtype} is not supported; expected bfloat16, float16 or float32")
    if bias is None:
        return None
    return check_tensor(bias, "bias", OUT_DTYPES, shape=(n,), device=device).contiguous()


def use_persistent(m: int, n: int, num_programs: int) -> bool:
    """Default launch scheme: persistent once the output has more 128x128 tiles than SMs
    (several waves, where relaunching CTAs and the last-wave tail cost most)."""
    return cdiv(m, 128) * cdiv(n, 128) > num_programs


def fp8_scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    persistent: bool | None = None,
    fast_accum: bool = True,
) -> torch.Tensor:
    """FP8 x FP8 GEMM with per-token and per-channel scales (see :func:`fp8_scaled_mm_ref`).

    Args:
        a: float8_e4m3fn activations ``[M, K]`` (any strides).
        a_scale: fp32 per-token scales ``[M, 1]`` (or ``[M]``).
        b: float8_e4m3fn weights ``[N, K]`` (any strides; K-contiguous is fastest).
        b_scale: fp32 per-channel scales ``[N]`` (or ``[N, 1]``).
        bias: Optional ``[N]`` bias (bf16, fp16 or fp32).
        out_dtype: bfloat16, float16 or float32.
        persistent: Launch one program per SM striding over tiles (True), one program per
            tile (False), or choose by problem size (None, :func:`use_persistent`).
        fast_accum: Keep sums in the FP8 MMA's reduced-precision accumulator on sm_90 (about
            14 significant bits; cuBLAS's fast mode); False adds every instruction's products
            into fp32 (:data:`PROMOTE_K`; slower, see the module docstring).

    Returns:
        ``[M, N]`` tensor of ``out_dtype``: the reference up to fp32 accumulation order and
        the final rounding (the interpreter truncates it).

    Raises:
        KernelInputError: A wrong dtype, shape or device, a CPU tensor without the
            interpreter, or a GPU without FP8 tensor cores.
    """
    a = check_tensor(a, "a", (_FP8,), ndim=2)
    m, k = a.shape
    dev = a.device
    check_fp8_device(dev)
    b = check_tensor(b, "b", (_FP8,), ndim=2, device=dev)
    if b.shape[1] != k:
        raise KernelInputError(
            f"b has shape {tuple(b.shape)}; its dim 1 must equal a's K = {k} (b is [N, K])")
    n = b.shape[0]
    a_scale = check_scale_vector(a_scale, "a_scale", m, dev)
    b_scale = check_scale_vector(b_scale, "b_scale", n, dev)
    bias = check_bias_and_dtype(bias, n, dev, out_dtype)
    return scaled_mm_checked(a, a_scale, b, b_scale, bias, out_dtype, persistent, fast_accum)


def scaled_mm_checked(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                      b_scale: torch.Tensor, bias: torch.Tensor | None,
                      out_dtype: torch.dtype, persistent: bool | None,
                      fast_accum: bool) -> torch.Tensor:
    """:func:`fp8_scaled_mm` on inputs its checks passed (scales contiguous ``[M]`` and
    ``[N]``): for callers that checked them already (the W4A8 prefill), whose second check
    was host time on every call."""
    m, k = a.shape
    n = b.shape[0]
    dev = a.device
    c = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m == 0 or n == 0:
        return c
    if interpreting():
        # Autotuning is meaningless (and slow) in the interpreter: one fixed config.
        progs = num_programs_cap(dev)
        if persistent is None:
            persistent = use_persistent(m, n, progs)
        meta = _INTERPRET_CONFIG
        tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])
        args, flags = _mm_args(a, a_scale, b, b_scale, bias, c, fast_accum)
        if persistent:
            _fp8_mm_persistent_kernel[(min(progs, tiles),)](*args, NUM_PROGRAMS=progs,
                                                            **flags, **meta)
        else:
            _fp8_mm_kernel[(tiles,)](*args, **flags, **meta)
        return c
    fn, grid, args, kwargs = mm_call(a, a_scale, b, b_scale, bias, c, persistent, fast_accum)
    launch(fn, grid, *args, **kwargs)
    return c


def _mm_args(a, a_scale, b, b_scale, bias, c, fast_accum) -> tuple[tuple, dict]:
    m, k = a.shape
    args = (a, b, c, a_scale, b_scale, c if bias is None else bias, m, b.shape[0], k,
            m_bucket(m), a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
            c.stride(1))
    return args, {"HAS_BIAS": bias is not None, "PROMOTE": 0 if fast_accum else PROMOTE_K}


def mm_call(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
            bias: torch.Tensor | None, c: torch.Tensor, persistent: bool | None,
            fast_accum: bool) -> tuple:
    """``(kernel, grid, args, kwargs)``: the autotuned launch :func:`scaled_mm_checked` makes
    on a GPU to write ``c`` (``[M, N]``, M and N not 0), for callers that prepare it
    (:func:`~qcompile.backends.triton.launch.prepare`: the W4A8 prefill's plans)."""
    m, n = c.shape
    progs = num_programs_cap(a.device)
    if persistent is None:
        persistent = use_persistent(m, n, progs)
    args, flags = _mm_args(a, a_scale, b, b_scale, bias, c, fast_accum)

    def tiles(meta: dict) -> int:
        return cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])

    if persistent:
        return (_fp8_mm_persistent_tuned, lambda meta: (min(progs, tiles(meta)),), args,
                {"NUM_PROGRAMS": progs, **flags})
    return _fp8_mm_tuned, lambda meta: (tiles(meta),), args, flags
