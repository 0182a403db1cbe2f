"""Batch-1 FP4 GEMV that streams its weight tiles through TMA, persistent over row blocks.

The FMA word kernel (:mod:`qcompile.backends.triton.w4a16_gemv`) reached 1.8-2.0 TB/s on the
large decode projections of an H200 (``benchmarks/results/gpu_h200_2026-11-27.md``), under
half the memory rate, while its SASS issue bound is about twice that rate: its programs load a
tile, then decode and multiply it, so a program's loads are in flight only between its
multiplies. Each program there also covers one row block and K range, a few tiles, and starts
with its first tile's full latency; a 28672-row projection takes 1.7 waves of programs.

Here each program loops over whole row blocks ``pid, pid + P, ...`` (``P`` programs, a few per
multiprocessor) and over their K tiles as one flat sequence, and each tile's words come from a
tensor-memory-accelerator copy (``TensorDescriptor``; one instruction per tile, into shared
memory) that Triton's software pipeline issues ``STAGES - 1`` tiles ahead, across row-block
boundaries: the next tiles are on their way while this one is multiplied, without holding them
in registers (the FMA kernel's hand prefetch in registers was no faster, its docstring says).
Each config's products are one of two kernels'. Most configs take the FMA kernel's decode and
products (:func:`~qcompile.backends.triton.fp4_words._staged_products`,
:func:`~qcompile.backends.triton.fp4_words._scaled_sums`), so results are its results bit for
bit at the same K split. The ``-mma`` configs take the tensor-core kernel's
(:func:`~qcompile.backends.triton.w4a16_gemv_mma.tile_sums`): fewer instructions per code, fed
by the same TMA pipeline; their results are that kernel's at the same tile and split. A row
block's sums go through the same epilogue (outer scale, ``x_scale``, bias, fused residual)
when its last tile is done. A weight with fewer row blocks than program slots (a 4096-row
``o_proj`` or ``down_proj``) is split over K into units, and each row's last split sums the
partials in split order, counted per row so that no barrier enters the pipelined loop
(``w4a16_gemv._finish`` with ``ROW_COUNTS``). The fused prologues
(RMSNorm, SiLU gate) and PDL work as in the FMA kernel.

Needs sm_90 or newer (TMA), words 16-byte aligned with rows of whole 16 bytes (K a multiple
of 32), and a group size that a tile's BLOCK_K spans or divides. Each config (tile, pipeline
depth, programs per multiprocessor) is one candidate of a cold-L2 timing at the first call of
each shape (:mod:`qcompile.backends.triton.path_tuning`): the descriptor's block shape is the
tile's, so the configs are not one autotuner's. ``w4a16_gemv.w4a16_gemv1`` runs it with
``runtime.GEMV1_MMA == "tma"`` (``QCOMPILE_GEMV1=tma``), or with ``"auto"`` where it timed
fastest. Status: numerics checked in the interpreter, every config of both kinds compiled for
sm_90; no config of either kind timed on a GPU yet.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from qcompile.backends.triton import path_tuning, pdl
from qcompile.backends.triton.fp4_words import _scaled_sums, _staged_products
from qcompile.backends.triton.gemv_fusion import GemvFusion, fusion_args, load_x, row_rstd
from qcompile.backends.triton.launch import launch
from qcompile.backends.triton.runtime import (
    arrival_counts,
    cdiv,
    interpreting,
    sm_count,
    warm_all,
)
from qcompile.backends.triton.w4a16 import _DTYPE_KIND
from qcompile.backends.triton.w4a16_gemv import _finish, tile_fits
from qcompile.backends.triton.w4a16_gemv_mma import X_DTYPES, column_sums, tile_k_order, tile_sums

__all__ = ["TMA_CONFIGS", "tma_eligible", "w4a16_gemv1_tma"]

#: Candidate configs ``(BLOCK_N, BLOCK_K, STAGES, programs per multiprocessor, warps, MMA)``,
#: the first the default where nothing can be timed. ``MMA`` False: the FMA kernel's products,
#: tiles as its best (16 or 32 x 1024 codes: 8-16 KiB of words) and smaller ones for more
#: programs on short weights; each program has ``STAGES - 1`` tiles in flight, so a
#: multiprocessor 48-144 KiB (a DRAM stream at 3-5 TB/s needs about 30-40 KiB per SM in
#: flight). In the offline sm_90 compile (``tests/test_triton_compile_sm90.py``) 32 x 1024
#: takes 128 registers (168 for AFPQ), 16 x 1024 72, so at most 4 (3) and 7 programs of 4
#: warps fit an SM. ``MMA`` True: the tensor-core kernel's products
#: (``w4a16_gemv_mma.tile_sums``) on its cheapest tiles by the SASS census (128 x 128: about 3
#: instructions per code against the FMA products' 4.3-4.8), fed the same way: 32-80 KiB per
#: multiprocessor in flight. Offline sm_90: 117-120 registers (AFPQ 188-190, so two programs
#: of 4 warps per SM), 63 KiB of shared memory at 128 x 128 x 4 stages. A tile there lies
#: inside one group (BLOCK_K divides the group size) and x is 16-bit or FP8. Programs per SM
#: are capped at launch by what the compiled kernel lets an SM hold (:func:`_launch`).
TMA_CONFIGS: tuple[tuple[int, int, int, int, int, bool], ...] = (
    (32, 1024, 3, 3, 4, False), (16, 1024, 4, 6, 4, False), (16, 1024, 3, 4, 4, False),
    (32, 1024, 4, 2, 4, False), (32, 512, 4, 4, 4, False), (16, 512, 4, 6, 4, False),
    (64, 512, 3, 2, 8, False),
    (128, 128, 4, 2, 4, True), (128, 128, 6, 2, 4, True), (64, 128, 4, 4, 4, True),
    (256, 128, 3, 1, 8, True), (128, 64, 6, 2, 4, True),
)
#: The interpreter's configs: one of each kind.
_INTERP_TMA = ((16, 256, 2, 1, 4, False), (16, 32, 2, 1, 4, True))
#: Bytes a TMA copy needs the base and each row to be aligned to.
_TMA_ALIGN = 16

Config = tuple[int, int, int, int, int, bool]


def _name(cfg: Config) -> str:
    return "n{}k{}s{}p{}w{}".format(*cfg[:5]) + ("-mma" if cfg[5] else "")


@triton.jit
def _gemv1_tma_kernel(x_ptr, w_desc, words_ptr, scale_ptr, neg_ptr, outer_ptr, bias_ptr,
                      part_ptr, out_ptr, count_ptr, xs_ptr, g_ptr, up_ptr, res_ptr, N, K, KW, G,
                      outer_stride, eps, GROUP_SIZE: tl.constexpr, HAS_NEG: tl.constexpr,
                      HAS_OUTER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_XS: tl.constexpr,
                      SPLIT: tl.constexpr, KIND: tl.constexpr, EXACT: tl.constexpr,
                      PRO: tl.constexpr, HAS_G: tl.constexpr, HAS_RES: tl.constexpr,
                      PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      STAGES: tl.constexpr, MMA: tl.constexpr):
    """Work units ``pid, pid + P, ...`` (a unit: a row block's ``1 / SPLIT`` of the K tiles,
    ``SPLIT`` dividing them), their K tiles as one pipelined loop (module docstring). With
    ``SPLIT`` > 1 a unit stores its fp32 partial and each row's last split sums them in split
    order (``_finish``'s ``ROW_COUNTS``: ``count_ptr``'s arrival counts, one per row). ``w_desc``:
    the words ``[N, KW]`` with block ``[BLOCK_N, BLOCK_K / 8]`` (zero-filled past the edges);
    ``words_ptr``: the same words, for PDL's L2 prefetch. ``MMA``: each tile's products on
    tensor cores (``w4a16_gemv_mma.tile_sums``; the tile inside one group, 16-bit or FP8
    x), else on the FMA pipe."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    WK: tl.constexpr = BLOCK_K // 8
    per = tl.cdiv(K, BLOCK_K) // SPLIT  # K tiles per unit
    mine = tl.cdiv(tl.cdiv(N, BLOCK_N) * SPLIT - pid, progs)  # units of this program
    lane = tl.arange(0, BLOCK_N)
    PF: tl.constexpr = WK // 32 if WK >= 32 else 1  # the first tile's 128-byte lines
    pdl.enter(words_ptr, (pid // SPLIT) * BLOCK_N + lane, N, KW, (pid % SPLIT) * per * WK, 32,
              PF, PDL)
    r = row_rstd(x_ptr, K, eps, PRO)
    if MMA:
        xperm = tile_k_order(BLOCK_K)
        acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # The unit and its tile carried from step to step: no integer division per tile.
    unit = pid
    tt = 0
    for _ in tl.range(0, mine * per, num_stages=STAGES):
        rb = unit // SPLIT
        split = unit - rb * SPLIT
        t = split * per + tt
        k0 = t * BLOCK_K
        w = w_desc.load([rb * BLOCK_N, t * WK])
        offs_n = rb * BLOCK_N + lane
        n_ok = offs_n < N
        # x beyond K is 0, so padding codes and rows past N add nothing.
        if MMA:
            xk = k0 + xperm
            xt = load_x(x_ptr, up_ptr, g_ptr, xk, xk < K, r, PRO, HAS_G, KIND, EXACT)
            acc += tile_sums(w, xt, scale_ptr, neg_ptr, offs_n, n_ok, k0, G, GROUP_SIZE,
                             HAS_NEG, BLOCK_N, BLOCK_K)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            xv = load_x(x_ptr, up_ptr, g_ptr, kk, kk < K, r, PRO, HAS_G, KIND, EXACT)
            s_acc = tl.zeros([BLOCK_N, WK], dtype=tl.float32)
            a_acc = tl.zeros([BLOCK_N, WK], dtype=tl.float32)
            s_acc, a_acc = _staged_products(s_acc, a_acc, w, xv, HAS_NEG, WK)
            acc += _scaled_sums(s_acc, a_acc, scale_ptr, neg_ptr, offs_n, n_ok, k0, G,
                                GROUP_SIZE, HAS_NEG, BLOCK_N, BLOCK_K)
        done = tt == per - 1
        if done:  # the unit is done: its epilogue, then the next unit's sums
            if MMA:
                res = column_sums(acc)
            else:
                res = acc * 16384.0  # 2^14: the fp16 placement's unit
            _finish(res, outer_ptr, bias_ptr, part_ptr, out_ptr, count_ptr, xs_ptr, res_ptr,
                    offs_n, n_ok, rb, split, N, outer_stride, HAS_OUTER, HAS_BIAS, HAS_XS,
                    HAS_RES, SPLIT, False, KIND, EXACT, ROW_COUNTS=True)
            acc = tl.zeros_like(acc)
        unit = tl.where(done, unit + progs, unit)
        tt = tl.where(done, 0, tt + 1)


def _fits(cfg: Config, group_size: int, mma_ok: bool) -> bool:
    """Whether ``cfg`` takes this group size (an MMA tile: inside one group, and x that
    converts to fp16 exactly, ``mma_ok``)."""
    if cfg[5]:
        return mma_ok and group_size % cfg[1] == 0
    return tile_fits(cfg[1], group_size)


@functools.cache
def _configs(group_size: int, interp: bool, mma_ok: bool = True) -> tuple[Config, ...]:
    if interp:
        fma = _INTERP_TMA[0] if _fits(_INTERP_TMA[0], group_size, False) else (
            16, 64, 2, 1, 4, False)
        return tuple(c for c in (fma, _INTERP_TMA[1]) if _fits(c, group_size, mma_ok))
    return tuple(c for c in TMA_CONFIGS if _fits(c, group_size, mma_ok))


def tma_eligible(x: torch.Tensor, words: torch.Tensor, group_size: int) -> bool:
    """Whether :func:`w4a16_gemv1_tma` takes this call: one row, contiguous words whose base
    and rows are 16-byte aligned, a group size some config fits, and (on a GPU) TMA
    (sm_90+)."""
    if x.shape[0] != 1 or not words.is_contiguous():
        return False
    if words.data_ptr() % _TMA_ALIGN or (words.stride(0) * 4) % _TMA_ALIGN:
        return False
    interp = interpreting()
    if not interp and not (x.is_cuda and _has_tma(x.device.index if x.device.index is not None
                                                  else torch.cuda.current_device())):
        return False
    return bool(_configs(group_size, interp, x.dtype in X_DTYPES))


def _split(blocks: int, tiles: int, slots: int) -> int:
    """K splits for ``blocks`` row blocks of ``tiles`` K tiles on ``slots`` program slots: the
    fewest of 1, 2, 4, 8 that divide the tiles and give every slot a unit (short weights, e.g.
    a 4096-row ``o_proj``, otherwise leave most of the GPU idle)."""
    best = 1
    for s in (1, 2, 4, 8):
        if tiles % s == 0:
            best = s
            if blocks * s >= slots:
                break
    return best


#: sm_90's per-multiprocessor limits where the device properties do not say: registers,
#: shared memory (bytes), threads, resident blocks; and the shared memory the system keeps per
#: block, and the granularity of a warp's register allocation.
_SM_LIMITS = {"regs": 65536, "shared": 233472, "threads": 2048, "blocks": 32}
_BLOCK_RESERVED_SHARED = 1024
_REG_UNIT = 256
#: Programs of a compiled variant that one multiprocessor holds at once, learned at its first
#: launch (``(config, split, constants, dtypes, device)`` -> count).
_RESIDENT: dict[tuple, int] = {}


def resident_programs(n_regs: int, shared: int, warps: int, limits: dict[str, int]) -> int:
    """How many programs of a kernel with ``n_regs`` registers per thread, ``shared`` bytes of
    shared memory and ``warps`` warps one multiprocessor runs at once (``limits``: its
    registers, shared memory, threads and blocks; at least 1)."""
    per_warp = -(-n_regs * 32 // _REG_UNIT) * _REG_UNIT
    fits = [limits["regs"] // max(per_warp * warps, 1),
            limits["shared"] // (shared + _BLOCK_RESERVED_SHARED),
            limits["threads"] // (warps * 32), limits["blocks"]]
    return max(1, min(fits))


def _sm_limits(device: torch.device) -> dict[str, int]:
    props = torch.cuda.get_device_properties(device)
    return {"regs": getattr(props, "regs_per_multiprocessor", 0) or _SM_LIMITS["regs"],
            "shared": getattr(props, "shared_memory_per_multiprocessor", 0)
            or _SM_LIMITS["shared"],
            "threads": getattr(props, "max_threads_per_multi_processor", 0)
            or _SM_LIMITS["threads"], "blocks": _SM_LIMITS["blocks"]}


def _learn_residency(key: tuple, compiled: object, warps: int, device: torch.device) -> None:
    """Record how many programs of ``compiled`` fit a multiprocessor (nothing where the
    compiled kernel does not say its registers and shared memory)."""
    n_regs = getattr(compiled, "n_regs", None)
    shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    if isinstance(n_regs, int) and isinstance(shared, int) and n_regs > 0:
        _RESIDENT[key] = resident_programs(n_regs, shared, warps, _sm_limits(device))


def _prepare(cfg: Config, args: tuple, flags: dict, device: torch.device,
             split: int | None) -> tuple[tuple, tuple, dict, torch.Tensor, tuple]:
    """``(grid, args, kwargs, y, key)`` of one launch of config ``cfg`` (:func:`_launch`):
    the output buffers allocated, the descriptor made, the split and grid chosen; ``key``
    names the compiled variant (:data:`_RESIDENT`)."""
    bn, bk, stages, per_sm, warps, mma = cfg
    x, words = args[0], args[1]
    n, k, kw = words.shape[0], x.shape[-1], words.shape[1]
    blocks, tiles = cdiv(n, bn), cdiv(k, bk)
    exact = interpreting()
    if split is None:
        split = (2 if tiles % 2 == 0 else 1) if exact else _split(
            blocks, tiles, per_sm * sm_count(device))
    if split < 1 or tiles % split:
        raise ValueError(f"w4a16_gemv1_tma: split must divide the {tiles} K tiles, got {split}")
    counts = arrival_counts(device, n) if split > 1 else None  # one count per row
    if counts is None:
        split = 1  # no in-place reduce here (no counts): unsplit
    out = torch.empty(1, n, dtype=flags["out_dtype"], device=device)
    part = out if split == 1 else torch.empty(split, n, dtype=torch.float32, device=device)
    desc = TensorDescriptor(words, [n, kw], [kw, 1], [bn, bk // 8])
    units = blocks * split
    key = (cfg, split, tuple(sorted(flags["const"].items())), x.dtype, flags["out_dtype"],
           device)
    # The interpreter: about three units per program, so the persistent loop crosses units.
    progs = cdiv(units, 3) if exact else min(
        units, min(per_sm, _RESIDENT.get(key, per_sm)) * sm_count(device))
    call_args = (x, desc, *args[1:6], part, out, out if counts is None else counts, *args[6:])
    kwargs = dict(flags["const"], SPLIT=split, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, MMA=mma,
                  num_warps=warps)
    return (progs,), call_args, kwargs, out, key


def _launch(cfg: Config, args: tuple, flags: dict,
            device: torch.device, split: int | None = None) -> torch.Tensor:
    """One launch of config ``cfg``: ``args`` are the kernel's arguments but ``w_desc`` and
    the output buffers; returns a new ``y``. ``split``: the K split (default :func:`_split`;
    the interpreter: 2 where it divides the tiles, to exercise the reduce).

    The K split follows the config's programs per multiprocessor, so the bits do not change
    from call to call. The grid is capped at what the multiprocessors hold at once, learned
    from the compiled kernel at its first launch (a persistent program that is not resident
    would start only when another ends); the grid does not change the bits."""
    grid, call_args, kwargs, out, key = _prepare(cfg, args, flags, device, split)
    compiled = launch(_gemv1_tma_kernel, grid, *call_args, **kwargs)
    if not interpreting() and key not in _RESIDENT:
        _learn_residency(key, compiled, cfg[4], device)
    return out


def _compile_ahead(configs: list[Config], args: tuple, flags: dict, device: torch.device,
                   split: int | None) -> int:
    """Compile every candidate config for this call at once on a thread pool
    (:func:`~qcompile.backends.triton.runtime.warm_all`) before the first is timed: each
    config's descriptor, split and constexprs differ, so they are not one autotuner's."""
    calls = []
    for cfg in configs:
        grid, call_args, kwargs, _, _ = _prepare(cfg, args, flags, device, split)
        calls.append((grid, call_args, kwargs))
    return warm_all(_gemv1_tma_kernel, calls)


@functools.cache
def _has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def w4a16_gemv1_tma(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor,
                    scale_neg: torch.Tensor | None, outer: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None,
                    x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                    fusion: GemvFusion | None = None, config: str | None = None,
                    split: int | None = None) -> torch.Tensor:
    """``y[1, N]`` for a contiguous ``x[1, K]`` and FP4 E2M1 weights as int32 words
    ``[N, K / 8]`` (see ``w4a16_gemv.w4a16_gemv1``; the caller checks :func:`tma_eligible`).

    ``x_scale``, ``out_dtype`` and ``fusion`` as in ``w4a16_gemv1``. On a GPU the configs
    (:data:`TMA_CONFIGS`) are timed on a cold L2 at the first call of each shape; ``config``
    (a name as :func:`config_names` lists) forces one, ``split`` the K split (a divisor of
    the config's K tiles; default: the fewest that give every program slot a unit).

    Raises:
        ValueError: ``config`` names no config that fits this group size, or ``split`` does
            not divide the K tiles.
    """
    k = x.shape[-1]
    n, g = words.shape[0], scale.shape[1]
    exact = interpreting()
    dtype = out_dtype or x.dtype
    fused = fusion_args(fusion, 1, scale)
    args = (x, words, scale, scale if scale_neg is None else scale_neg,
            scale if outer is None else outer, scale if bias is None else bias,
            scale if x_scale is None else x_scale, *fused[0][:3], n, k, words.shape[1], g,
            0 if outer is None or outer.shape[0] == 1 else 1, fused[0][3])
    flags = {"out_dtype": dtype, "const": dict(
        GROUP_SIZE=group_size, HAS_NEG=scale_neg is not None, HAS_OUTER=outer is not None,
        HAS_BIAS=bias is not None, HAS_XS=x_scale is not None, KIND=_DTYPE_KIND[dtype],
        EXACT=exact, **fused[1], **pdl.launch_flags(x.device))}
    configs = {_name(c): c for c in _configs(group_size, exact, x.dtype in X_DTYPES)}
    if config is not None and config not in configs:
        raise ValueError(f"w4a16_gemv1_tma: config must be one of {sorted(configs)} for group "
                         f"size {group_size}, got {config!r}")
    if config is None:
        names = tuple(configs)
        key = ("w4a16-gemv1-tma", n, k, group_size, x.dtype, dtype, scale_neg is not None,
               outer is not None, bias is not None, x_scale is not None,
               fused[1]["PRO"], fused[1]["HAS_RES"])
        if path_tuning.choice(key) is None and path_tuning.can_time(x.device):
            _compile_ahead(list(configs.values()), args, flags, x.device, split)
        config = path_tuning.pick(
            key, names[0], names, lambda c: _launch(configs[c], args, flags, x.device, split),
            x.device, cold=True)  # a dictionary lookup once the shape is timed
    return _launch(configs[config], args, flags, x.device, split)


def config_names(group_size: int, mma_ok: bool = True) -> tuple[str, ...]:
    """Names of the configs that fit ``group_size`` (``config=`` of :func:`w4a16_gemv1_tma`);
    ``mma_ok``: x converts to fp16 exactly (``w4a16_gemv_mma.X_DTYPES``), so the tensor-core
    configs are among them where the group fits."""
    return tuple(_name(c) for c in _configs(group_size, interpreting(), mma_ok))
