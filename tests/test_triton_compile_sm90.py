"""Ahead-of-time compile of the Triton kernels for an H100 (sm_90), on a machine without a GPU.

What this proves: every kernel family in ``qcompile.backends.triton`` (the FP8 GEMM, tiled and
persistent; W4A8 on each of its three group-exponent paths; the fused per-token quantize with
no, a power-of-two and a Kronecker Hadamard, and its RMSNorm variant; the W4A16 split-K GEMV,
its reduction and the GEMM; the W8A16 GEMV, GEMM and dequantize) goes through Triton's whole CUDA pipeline (TTIR, TTGIR, LLVM IR,
PTX) and assembles with ``ptxas`` into an sm_90 cubin, for the cases in :data:`CASES`, with
the argument specialization a real launch gets (16-byte aligned pointers, ints divisible by 16
marked so, ints equal to 1 turned into constants). Each cubin must also fit the hardware: at
most 227 KiB of shared memory per block and no register spills (or the small, stated number a
case allows; kernels known to spill more xfail with the measured numbers). The FP8, W4A8 and
bf16 W4A16 GEMMs must use the matching tensor-core MMA (wgmma/mma.sync), not an FMA fallback.
No GPU or driver is needed: ``triton.compile`` gets an explicit ``GPUTarget("cuda", 90, 32)``
and Triton ships ``ptxas``; registers and the stack frame (where ``ptxas`` spills) are read
from the cubin with Triton's ``cuobjdump``: what the driver would report as ``n_regs`` and,
divided by 4, ``n_spills``.

What it does not prove: that the kernels compute the right numbers on a GPU (the interpreter
tests check their logic, the ``gpu`` tests their numerics on hardware), that they are fast or
well tuned, that the autotune configs not compiled here assemble or fit (one config per GEMM
code path, see :func:`_heaviest`; run this file as a script with ``--all`` to compile every
autotune config), or anything about other GPUs or other Triton / ``ptxas`` versions.

The compile runs in one subprocess (this file run as a script) without ``TRITON_INTERPRET``:
conftest sets it on machines without CUDA, and ``@triton.jit`` then returns interpreter functions
that cannot be compiled. The subprocess uses a fresh Triton cache, so every case really runs
``ptxas``. Cases of ``w4a16.py``, which another engineer may still be editing, skip (saying
why) when the module does not import or its kernels' parameters or config tables no longer
match what this file passes.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

#: sm_90's largest shared memory per block (opt-in dynamic), 227 KiB.
SM90_MAX_SHARED = 227 * 1024
#: H100 SXM multiprocessors: the persistent FP8 GEMM's program count.
H100_SMS = 132
#: Whole-file compile budget (seconds) before the subprocess is killed.
TIMEOUT_S = 900

# (id, family, params). Shapes are Llama-like (N = K = 4096) unless a case needs another; M
# picks the autotune bucket. ``block_m``: the autotune configs with that BLOCK_M are the
# candidates (see _heaviest). ``spills``: spilled words allowed (Triton's ``n_spills``: stack
# frame bytes / 4), 0 unless measured and explained. ``known_spills``: a kernel known to spill
# more; the case then xfails (with the numbers) instead of failing, until the kernel is fixed.
# ``mma``: a substring every MMA instruction of the PTX must contain ("": any MMA, at least one).
# Measured numbers below: Triton 3.9.0 with its bundled ptxas 13.4 (sm_90a).
_ACT_HAD_SPILLS = ("with a Hadamard, _act_quant_kernel keeps the whole row tile in registers "
                   "and spills 0.1-2 KB per thread on sm_90 with tf32x3 dots (kilobytes "
                   "with ieee FMAs); a chunked-row redesign is open work")
CASES: list[tuple[str, str, dict]] = [
    # FP8 GEMM: prefill / medium / decode tiles of the tiled kernel, one persistent config.
    # Tiles with BLOCK_M < 64 get mma.sync on fp16 (Triton converts the FP8 tiles; wgmma
    # needs 64 rows), hence "" for the decode cases.
    ("fp8-tiled-bm128-bias", "fp8", dict(persistent=False, m=4000, block_m=128, bias=True,
                                          mma="e4m3")),
    ("fp8-tiled-bm64", "fp8", dict(persistent=False, m=100, block_m=64, bias=False, mma="e4m3")),
    ("fp8-tiled-bm16-decode", "fp8", dict(persistent=False, m=1, block_m=16, bias=False,
                                          mma="")),
    # 128x256x128, 8 warps: 255 registers and one spilled register (8-byte stack frame).
    ("fp8-persistent-bm128-bias", "fp8", dict(persistent=True, m=4000, block_m=128, bias=True,
                                              mma="e4m3", spills=2)),
    # fast_accum=False: a second fp32 accumulator for the promoted sums (fp8_gemm.PROMOTE_K):
    # 255 registers and 64-78 spilled words at 128x256 (the autotuner also has 128x128 tiles).
    ("fp8-tiled-bm128-promoted", "fp8", dict(persistent=False, m=4000, block_m=128, bias=True,
                                             mma="e4m3", spills=80, promote=32)),
    # W4A8: GROUP_SIZE % BLOCK_K == 0 (one exponent per row), BLOCK_K % GROUP_SIZE == 0 (an
    # exponent tile), neither (per-column select), all with BLOCK_K 128, with the default
    # decode (w4a8.DECODE); the other two decodes on the row path; fast accumulation (the
    # default) except the -promoted case (a second accumulator: 46 spilled words at 128x256).
    ("w4a8-gexp-row-g128", "w4a8", dict(m=4000, block_m=128, group_size=128, mma="e4m3")),
    ("w4a8-place-row-g128", "w4a8", dict(m=4000, block_m=128, group_size=128, decode="place",
                                         mma="e4m3")),
    ("w4a8-shift-row-g128", "w4a8", dict(m=4000, block_m=128, group_size=128, decode="shift",
                                         mma="e4m3")),
    ("w4a8-gexp-row-g128-promoted", "w4a8", dict(m=4000, block_m=128, group_size=128,
                                                 mma="e4m3", spills=56, promote=32)),
    ("w4a8-gexp-tile-g32", "w4a8", dict(m=4000, block_m=128, group_size=32, mma="e4m3")),
    ("w4a8-gexp-select-g192", "w4a8", dict(m=4000, block_m=128, group_size=192, mma="e4m3")),
    ("w4a8-gexp-tile-g32-decode", "w4a8", dict(m=1, block_m=16, group_size=32, mma="")),
    # W4A8 with the operands swapped (w4a8_swap): the decoded weight is the WGMMA's first
    # operand, read from registers (``a_regs``), for a small and a large activation tile.
    ("w4a8-swap-g128-m64", "w4a8_swap", dict(m=64, block_m=64, group_size=128, mma="e4m3",
                                             a_regs=True)),
    ("w4a8-swap-g32-m256", "w4a8_swap", dict(m=256, block_m=256, group_size=32, mma="e4m3",
                                             a_regs=True)),
    # One warp group on 64 weight rows x 256 activation rows: 248 registers, no spills.
    ("w4a8-swap-g128-m256-bn64", "w4a8_swap", dict(m=256, block_m=256, block_n=64,
                                                   group_size=128, mma="e4m3", a_regs=True)),
    # W4A8 prefill: the FP4 -> FP8 shift of the whole weight, on each exponent path.
    ("w4a8-shift-g512", "w4a8_shift", dict(group_size=512)),
    ("w4a8-shift-g128", "w4a8_shift", dict(group_size=128)),
    ("w4a8-shift-g50", "w4a8_shift", dict(group_size=50)),
    # Fused per-token quantize (bf16 rows): every warp count the kernel's own _prune keeps.
    # The general kernel runs fp32 rows (Kronecker sizes, powers of two over 4096), several
    # Kronecker blocks per row, and RMSNorm; one bf16 block of 1536 now runs kron_quant
    # (below), and the case stays as the general kernel's measure.
    ("act-quant-had8192-fp8-qdq", "act_quant", dict(had_size=8192, d=8192,
                                                     fmt="fp8_e4m3/token", out="qdq",
                                                     known_spills=_ACT_HAD_SPILLS)),
    ("act-quant-had1536-kron-fp8-codes", "act_quant", dict(had_size=1536, d=1536,
                                                           fmt="fp8_e4m3/token", out="codes",
                                                           known_spills=_ACT_HAD_SPILLS)),
    # Power-of-two Hadamards (and none) as two products over a row loop (had_quant), every
    # autotune config: 8192 = 64 x 128 (three bf16 parts on the left), 128-blocks (right
    # product only), no Hadamard, fp16 and fp32 rows.
    ("had2-8192-fp8-codes", "had2", dict(had_size=8192, d=8192, fmt="fp8_e4m3/token",
                                         out="codes", mma="16", ahead=True)),
    # Kronecker sizes as products over the row's axes (kron_quant), every config it keeps:
    # three for 14336 = (16 x 32) x 28, 3072 = (16 x 16) x 12 and 9216 = (16 x 16) x 36; two
    # (no middle axis) for 1536 = 128 x 12, 576 = 16 x 36 and 13824 = 128 x 108.
    *[(f"kron-{had}-{fmt.split('_')[0].split('/')[0]}-{out}", "kron",
       dict(had_size=had, fmt=fmt, out=out, mma="f16"))
      for had, fmt, out in ((14336, "fp8_e4m3/token", "codes"), (3072, "fp8_e4m3/token", "codes"),
                            (9216, "int8/token", "qdq"), (1536, "fp8_e4m3/token", "codes"),
                            (576, "fp8_e4m3/token", "qdq"), (13824, "fp8_e4m3/token", "codes"))],
    # The asymmetric per-token formats' quantize (INT4 asym: a zero point; FP4 AFPQ: a scale
    # per sign), qdq outputs.
    ("had2-8192-int4asym-qdq", "had2", dict(had_size=8192, d=8192, fmt="int4/token/asym",
                                            out="qdq", mma="16")),
    ("had2-8192-afpq-qdq", "had2", dict(had_size=8192, d=8192, fmt="fp4_e2m1/token/asym",
                                        out="qdq", mma="16")),
    ("had2-8192-fp8-codes-3parts", "had2", dict(had_size=8192, d=8192, fmt="fp8_e4m3/token",
                                                out="codes", parts=3, mma="bf16")),
    ("had2-8192-fp8-codes-trans", "had2", dict(had_size=8192, d=8192, fmt="fp8_e4m3/token",
                                               out="codes", parts=2, trans=True, mma="f16")),
    ("had2-8192-fp8-codes-1part", "had2", dict(had_size=8192, d=8192, fmt="fp8_e4m3/token",
                                               out="codes", parts=1, mma="f16")),
    ("had2-8192-fp8-codes-1part-trans", "had2", dict(had_size=8192, d=8192,
                                                     fmt="fp8_e4m3/token", out="codes", parts=1,
                                                     trans=True, mma="f16")),
    # The left factor as fp32 butterflies in registers: only the right product is an MMA.
    ("had2-8192-fp8-codes-butterfly", "had2", dict(had_size=8192, d=8192, fmt="fp8_e4m3/token",
                                                   out="codes", parts=0, mma="bf16")),
    ("had2-16384-int8-qdq", "had2", dict(had_size=16384, d=16384, fmt="int8/token", out="qdq",
                                         mma="16")),
    ("had2-128-fp4-asym-qdq", "had2", dict(had_size=128, d=4096, fmt="fp4_e2m1/token/asym",
                                           out="qdq", mma="bf16")),
    ("had2-0-fp8-codes", "had2", dict(had_size=0, d=4096, fmt="fp8_e4m3/token", out="codes")),
    ("had2-4096-int4-asym-fp16", "had2", dict(had_size=4096, d=4096, fmt="int4/token/asym",
                                              out="qdq", dtype="fp16", mma="")),
    ("had2-2048-fp8-fp32", "had2", dict(had_size=2048, d=2048, fmt="fp8_e4m3/token",
                                        out="qdq", dtype="fp32", mma="tf32")),
    ("had2-8192-fp8-fp16", "had2", dict(had_size=8192, d=8192, fmt="fp8_e4m3/token",
                                        out="qdq", dtype="fp16")),
    # 4 warps: ptxas stops at 64 registers and spills one (8-byte stack frame).
    ("rmsnorm-quant-fp8-codes", "act_quant", dict(had_size=0, d=4096, fmt="fp8_e4m3/token",
                                                  out="codes", norm=True, spills=2)),
    # The SiLU gate in front of a down_proj's FP8 codes (14336: Llama-3-8B's intermediate).
    ("silu-quant-fp8-codes", "act_quant", dict(had_size=0, d=14336, fmt="fp8_e4m3/token",
                                               out="codes", gate=True)),
    # W4A16 (group 128 takes the one-scale-per-tile path, group 32 the gathered-scale path;
    # asym INT4 and AFPQ cover the zero-point and negative-scale decodes). SPLIT 5 is what
    # _pick_split gives N = K = 4096 on 132 SMs. The fp32 GEMM's large-M bucket holds the
    # config closest to the shared-memory limit (128x128x128: 212 KiB).
    ("w4a16-gemv-bf16-g128", "w4a16_gemv", dict(dtype="bf16", m=1, group_size=128, split=5,
                                                zero=True, bias=False)),
    ("w4a16-gemv-fp32-g32-afpq", "w4a16_gemv", dict(dtype="fp32", m=4, group_size=32, split=5,
                                                    neg=True, outer=True, bias=True)),
    # W4A8 at M = 2..16: FP8 code rows, fp32 weights, per-row scales, bf16 out.
    ("w4a16-gemv-fp8-m7-g64-w4a8", "w4a16_gemv", dict(dtype="bf16", x="fp8e4nv", m=7,
                                                      group_size=64, split=4, outer=True,
                                                      xs=True, bias=True)),
    # M = 7 (BLOCK_M 8) with group 1000 (per channel, K = 1000): the picked-rows path that
    # Triton 3.6 failed to compile with tl.gather (TritonGPUOptimizeThreadLocality). Triton
    # 3.6's ptxas stops this 4-warp kernel at 64 registers and spills two words.
    ("w4a16-gemv-bf16-m7-g1000", "w4a16_gemv", dict(dtype="bf16", m=7, group_size=1000,
                                                    split=2, bias=True, spills=2)),
    # Batch-1 GEMV with hoisted group scales: FP4 integer decode, AFPQ, and table + zero.
    ("w4a16-gemv1-bf16-g128-fp4", "w4a16_gemv1", dict(dtype="bf16", group_size=128, split=5,
                                                      fp4=True, bias=False)),
    ("w4a16-gemv1-bf16-g128-afpq", "w4a16_gemv1", dict(dtype="bf16", group_size=128, split=5,
                                                       fp4=True, neg=True, bias=True)),
    ("w4a16-gemv1-fp32-g64-int4", "w4a16_gemv1", dict(dtype="fp32", group_size=64, split=1,
                                                      zero=True, outer=True, bias=True)),
    # The FP4 word kernel: 8 codes per int32, pairs of codes decoded as two fp16 at once;
    # every config (tiles of 1..8 groups and inside one group), AFPQ and M2 outer scales.
    ("w4a16-gemv1w-bf16-g128-fp4", "w4a16_gemv1w", dict(dtype="bf16", group_size=128, split=4,
                                                        bias=False)),
    ("w4a16-gemv1w-bf16-g128-afpq", "w4a16_gemv1w", dict(dtype="bf16", group_size=128, split=1,
                                                         neg=True, bias=True)),
    ("w4a16-gemv1w-fp16-g64-m2", "w4a16_gemv1w", dict(dtype="fp16", group_size=64, split=4,
                                                      outer=True, bias=False)),
    # The same on tensor cores (w4a16_gemv_mma): fp16 code tiles times an x column, every
    # tile; symmetric FP4, AFPQ (two MMAs per tile), M2 outer scales and W4A8's FP8 codes.
    ("w4a16-gemv1mma-bf16-g128-fp4", "w4a16_gemv1mma", dict(dtype="bf16", group_size=128,
                                                            split=4, bias=False, mma="f16")),
    ("w4a16-gemv1mma-bf16-g128-afpq", "w4a16_gemv1mma", dict(dtype="bf16", group_size=128,
                                                             split=1, neg=True, bias=True,
                                                             mma="f16")),
    ("w4a16-gemv1mma-fp16-g64-m2", "w4a16_gemv1mma", dict(dtype="fp16", group_size=64,
                                                          split=4, outer=True, bias=False,
                                                          mma="f16")),
    ("w4a16-gemv1mma-fp8-g128-w4a8", "w4a16_gemv1mma", dict(dtype="bf16", x="fp8e4nv",
                                                            group_size=128, split=4,
                                                            outer=True, xs=True, bias=True,
                                                            mma="f16")),
    # The persistent TMA GEMV (w4a16_gemv_tma): its word tiles arrive by TMA copies,
    # pipelined STAGES - 1 tiles ahead (the shared memory holds them); every config for FP4,
    # the default and the largest for AFPQ, M2, W4A8's FP8 codes and the fusions with PDL
    # (split over K, partials summed in place).
    ("w4a16-gemv1tma-bf16-g128-fp4", "w4a16_gemv1tma", dict(dtype="bf16", group_size=128,
                                                            bias=False, tma=True, every=True)),
    ("w4a16-gemv1tma-bf16-g128-afpq", "w4a16_gemv1tma", dict(dtype="bf16", group_size=128,
                                                             neg=True, bias=True, tma=True)),
    ("w4a16-gemv1tma-fp16-g64-m2", "w4a16_gemv1tma", dict(dtype="fp16", group_size=64,
                                                          outer=True, tma=True)),
    ("w4a16-gemv1tma-fp8-g128-w4a8", "w4a16_gemv1tma", dict(dtype="bf16", x="fp8e4nv",
                                                            group_size=128, outer=True,
                                                            xs=True, bias=True, tma=True)),
    ("w4a16-gemv1tma-bf16-g128-fp4-rms-res-pdl", "w4a16_gemv1tma", dict(
        dtype="bf16", group_size=128, pro=1, res=True, pdl=True, tma=True, split=2)),
    ("w4a16-gemv1tma-bf16-g128-afpq-gate-res", "w4a16_gemv1tma", dict(
        dtype="bf16", group_size=128, neg=True, pro=2, res=True, tma=True)),
    # Its tensor-core configs (``-mma``: w4a16_gemv_mma's tile products, fed by TMA).
    ("w4a16-gemv1tma-mma-bf16-g128-fp4", "w4a16_gemv1tma", dict(
        dtype="bf16", group_size=128, bias=False, tma=True, products="mma", every=True,
        mma="f16")),
    ("w4a16-gemv1tma-mma-bf16-g128-afpq", "w4a16_gemv1tma", dict(
        dtype="bf16", group_size=128, neg=True, bias=True, tma=True, products="mma",
        mma="f16")),
    ("w4a16-gemv1tma-mma-fp8-g128-w4a8", "w4a16_gemv1tma", dict(
        dtype="bf16", x="fp8e4nv", group_size=128, outer=True, xs=True, bias=True, tma=True,
        products="mma", mma="f16")),
    ("w4a16-gemv1tma-mma-bf16-g128-fp4-rms-res-pdl", "w4a16_gemv1tma", dict(
        dtype="bf16", group_size=128, pro=1, res=True, pdl=True, tma=True, split=2,
        products="mma", mma="f16")),
    # W4A8 at batch 1: FP8 code rows, group scales 2^gexp, row scale, the rows' scale and a
    # bias in the epilogue, bf16 out (split and not).
    ("w4a16-gemv1w-fp8-g128-w4a8", "w4a16_gemv1w", dict(dtype="bf16", x="fp8e4nv",
                                                        group_size=128, split=4, outer=True,
                                                        xs=True, bias=True)),
    ("w4a16-gemv1-fp8-g64-w4a8", "w4a16_gemv1", dict(dtype="fp16", x="fp8e4nv", group_size=64,
                                                     split=1, fp4=True, outer=True, xs=True,
                                                     bias=True)),
    # Decode fusions (gemv_fusion): RMSNorm (pre-pass over the row, rounded products) or
    # SiLU gate in front, residual add behind, on each batch-1 kernel, split and not.
    ("w4a16-gemv1w-bf16-g128-fp4-rms-res", "w4a16_gemv1w", dict(dtype="bf16", group_size=128,
                                                                split=4, pro=1, res=True)),
    ("w4a16-gemv1w-bf16-g128-afpq-gate-res", "w4a16_gemv1w", dict(
        dtype="bf16", group_size=128, split=1, neg=True, pro=2, res=True)),
    ("w4a16-gemv1mma-bf16-g128-fp4-rms-res", "w4a16_gemv1mma", dict(
        dtype="bf16", group_size=128, split=4, pro=1, res=True, mma="f16")),
    ("w4a16-gemv1mma-bf16-g128-fp4-gate", "w4a16_gemv1mma", dict(
        dtype="bf16", group_size=128, split=1, pro=2, mma="f16")),
    ("w4a16-gemv1-bf16-g64-int4-rms-res", "w4a16_gemv1", dict(
        dtype="bf16", group_size=64, split=5, zero=True, pro=1, res=True)),
    # Programmatic dependent launch (pdl): L2 prefetch of the first weight lines, then the
    # grid-dependency wait before any load, on each batch-1 kernel with a fused decode step.
    ("w4a16-gemv1w-bf16-g128-afpq-rms-res-pdl", "w4a16_gemv1w", dict(
        dtype="bf16", group_size=128, split=4, neg=True, pro=1, res=True, pdl=True)),
    ("w4a16-gemv1mma-bf16-g128-fp4-gate-res-pdl", "w4a16_gemv1mma", dict(
        dtype="bf16", group_size=128, split=1, pro=2, res=True, mma="f16", pdl=True)),
    ("w4a16-gemv1-bf16-g64-int4-res-pdl", "w4a16_gemv1", dict(
        dtype="bf16", group_size=64, split=5, zero=True, res=True, pdl=True)),
    # Prefill: the weight decoded once to x's dtype (then cuBLAS), odd group sizes included.
    ("w4a16-dequant-bf16-g128-afpq", "w4a16_dequant", dict(dtype="bf16", group_size=128,
                                                           neg=True, outer=True)),
    ("w4a16-dequant-fp16-g33-int4", "w4a16_dequant", dict(dtype="fp16", group_size=33,
                                                          zero=True)),
    # FP4 prefill decode from int32 words (no table), AFPQ and M2.
    ("w4a16-dequant-fp4w-bf16-g128-afpq", "w4a16_dequant_fp4w", dict(dtype="bf16",
                                                                     group_size=128, neg=True)),
    ("w4a16-dequant-fp4w-fp16-g32-m2", "w4a16_dequant_fp4w", dict(dtype="fp16", group_size=32,
                                                                  outer=True)),
    ("w4a16-dequant-fp4w-bf16-g40-afpq", "w4a16_dequant_fp4w", dict(dtype="bf16",
                                                                    group_size=40, neg=True)),
    ("w4a16-dequant-fp4w-bf16-g1024-afpq", "w4a16_dequant_fp4w", dict(dtype="bf16",
                                                                      group_size=1024, neg=True)),
    # The pair kernel (timed against the word kernel per shape).
    ("w4a16-dequant-fp4p-bf16-g128-afpq", "w4a16_dequant_fp4p", dict(dtype="bf16",
                                                                     group_size=128, neg=True)),
    ("w4a16-dequant-fp4p-fp16-g32-m2", "w4a16_dequant_fp4p", dict(dtype="fp16", group_size=32,
                                                                  outer=True)),
    ("w4a16-dequant-fp4f-bf16-g128-afpq", "w4a16_dequant_fp4f", dict(dtype="bf16",
                                                                     group_size=128, neg=True)),
    ("w4a16-dequant-fp4f-fp16-g40-m2", "w4a16_dequant_fp4f", dict(dtype="fp16", group_size=40,
                                                                  outer=True)),
    ("w4a16-splitk-reduce-bf16", "w4a16_reduce", dict(dtype="bf16", m=1, split=5, bias=True)),
    ("w4a16-splitk-reduce-bf16-xs", "w4a16_reduce", dict(dtype="bf16", m=1, split=5, bias=True,
                                                         xs=True)),
    ("w4a16-splitk-reduce-bf16-res", "w4a16_reduce", dict(dtype="bf16", m=1, split=5,
                                                          bias=True, res=True)),
    # The tiled GEMM runs 16 < M < 256 (from 256 rows the weight is decoded once and cuBLAS
    # multiplies), so its largest bucket in use is 256. (The M >= 256 bucket serves only a
    # raised DEQUANT_MIN_M; with x tiles pipelined through shared memory its fp32 128x128x128
    # config needs 276 KiB and the autotuner drops it as out of resources.)
    ("w4a16-gemm-bf16-g128", "w4a16_gemm", dict(dtype="bf16", m=200, group_size=128,
                                                zero=True, bias=True, mma="bf16")),
    ("w4a16-gemm-bf16-g128-m4000", "w4a16_gemm", dict(dtype="bf16", m=4000, group_size=128,
                                                      zero=True, bias=True, mma="bf16")),
    # The W4A16 GEMM with swapped operands (w4a16_swap): the decoded weight in registers as
    # the WGMMA's first operand, at a medium and a prefill M (AFPQ: two scales per group).
    ("w4a16-swap-bf16-g128-m200", "w4a16_swap", dict(dtype="bf16", m=200, group_size=128,
                                                     neg=True, mma="bf16", a_regs=True)),
    ("w4a16-swap-bf16-g32-m4000", "w4a16_swap", dict(dtype="bf16", m=4000, group_size=32,
                                                      mma="bf16", a_regs=True)),
    # Decode attention, every autotune config its prune keeps: Llama-3-8B (4 query heads per
    # kv head, head_dim 128, rotary queries) with a boolean mask split 16 ways, also with the
    # step's cache write (rotary key) as decode_attention_write launches it; an additive
    # fp16 mask; head_dim 256; 64 query heads per kv head; an fp32 cache (three-pass TF32
    # products), no mask.
    ("decode-attn-bf16-g4-d128-bool", "decode_attn", dict(dtype="bf16", g=4, d=128, mask=1,
                                                          nsplit=16, mma="tf32", rope=True)),
    ("decode-attn-bf16-g4-d128-bool-write", "decode_attn", dict(
        dtype="bf16", g=4, d=128, mask=1, nsplit=32, mma="tf32", rope=True, write=True)),
    # As a programmatic dependent launch: the first run's L2 prefetch, then the wait before
    # any global load, then the next kernel's launch.
    ("decode-attn-bf16-g4-d128-bool-write-pdl", "decode_attn", dict(
        dtype="bf16", g=4, d=128, mask=1, nsplit=32, mma="tf32", rope=True, write=True,
        pdl=True)),
    ("decode-attn-fp16-g8-d64-add", "decode_attn", dict(dtype="fp16", g=8, d=64, mask=2,
                                                        nsplit=1, mma="tf32")),
    ("decode-attn-bf16-g4-d256-bool", "decode_attn", dict(dtype="bf16", g=4, d=256, mask=1,
                                                          nsplit=8, mma="tf32")),
    ("decode-attn-bf16-g64-d128-bool", "decode_attn", dict(dtype="bf16", g=64, d=128, mask=1,
                                                           nsplit=2, mma="tf32")),
    ("decode-attn-fp32-g4-d128-none", "decode_attn", dict(dtype="fp32", g=4, d=128, mask=0,
                                                          nsplit=4, mma="tf32")),
    ("w4a16-gemm-fp32-g32-afpq", "w4a16_gemm", dict(
        dtype="fp32", m=200, group_size=32, neg=True, outer=True, bias=False,
        known_spills="with fp32 activations _w4a16_gemm_kernel's fp32 tiles spill 0.2 to 1 "
                     "KB per thread even with tf32x3 dots (bf16 activations, the normal "
                     "case, do not)")),
    # W8A16: every config of each kernel (small lists), INT8 asym groups and FP8 channels.
    ("w8a16-gemv-bf16-g128-int8asym", "w8a16_gemv", dict(dtype="bf16", group_size=128,
                                                         elem="int8", zero=True, split=4)),
    ("w8a16-gemv-bf16-channel-e4m3", "w8a16_gemv", dict(dtype="bf16", group_size=4096,
                                                        elem="fp8_e4m3", outer=True, split=1)),
    ("w8a16-gemv-bf16-channel-int8-rms-res", "w8a16_gemv", dict(
        dtype="bf16", group_size=4096, elem="int8", split=1, pro=1, res=True)),
    ("w8a16-gemv-bf16-g128-int8-silu-res", "w8a16_gemv", dict(
        dtype="bf16", group_size=128, elem="int8", split=4, pro=2, res=True)),
    ("w8a16-gemm-bf16-g128-int8", "w8a16_gemm", dict(dtype="bf16", group_size=128,
                                                     elem="int8", m=200, mma="bf16")),
    ("w8a16-gemm-fp16-channel-e5m2", "w8a16_gemm", dict(dtype="fp16", group_size=4096,
                                                            elem="fp8_e5m2", m=32, mma="f16")),
    ("w8a16-gemm-bf16-g64-int8asym", "w8a16_gemm", dict(dtype="bf16", group_size=64,
                                                        elem="int8", zero=True, m=100,
                                                        mma="bf16")),
    ("w8a16-dequant-bf16-g128-int8asym", "w8a16_dequant", dict(dtype="bf16", group_size=128,
                                                               elem="int8", zero=True)),
    ("w8a16-dequant-fp16-g32-e4m3", "w8a16_dequant", dict(dtype="fp16", group_size=32,
                                                          elem="fp8_e4m3", outer=True)),
]

_MODULES = {"fp8": "fp8_gemm", "w4a8": "w4a8", "act_quant": "act_quant", "had2": "had_quant",
            "kron": "kron_quant",
            "w4a16_gemv": "w4a16", "w4a16_reduce": "w4a16", "w4a16_gemm": "w4a16",
            "w4a16_gemv1": "w4a16_gemv", "w4a16_gemv1w": "w4a16_gemv",
            "w4a16_gemv1mma": "w4a16_gemv_mma", "w4a16_gemv1tma": "w4a16_gemv_tma",
            "w4a16_dequant": "w4a16_dequant", "w4a16_dequant_fp4w": "w4a16_dequant",
            "w4a16_dequant_fp4p": "w4a16_dequant", "w4a16_dequant_fp4f": "w4a16_dequant",
            "w4a8_shift": "w4a8_dequant", "w4a8_swap": "w4a8_swap",
            "w4a16_swap": "w4a16_swap", "decode_attn": "decode_attention",
            "w8a16_gemv": "w8a16", "w8a16_gemm": "w8a16", "w8a16_dequant": "w8a16"}
#: Module that another engineer may still be editing: failures to import it or a kernel
#: signature this file does not know skip its cases instead of failing them.
_IN_PROGRESS = "w4a16"


# --- worker (runs in the subprocess, real JITFunctions) ------------------------------------------

class SignatureMismatch(Exception):
    """The kernel's parameters differ from the arguments this file passes."""


def _heaviest(configs: list, footprint) -> list:
    """The candidate with the largest ``footprint`` (for GEMMs: pipelined shared memory, then
    accumulator registers per thread), the one closest to the hardware's limits. Lighter
    configs usually fit when it does, not always: run the file with ``--all`` to check."""
    return [max(configs, key=footprint)]


def _gemm_footprint(c) -> tuple:
    bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return (c.num_stages * (bm + bn) * bk, bm * bn // c.num_warps)


def _specialize(fn, args: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` as a launch with
    these values gets them: ``"*dtype"`` strings are 16-byte aligned pointers, ints equal to 1
    become constants, other ints are i32/i64 (divisibility 16 marked), floats fp32,
    ``"tensordesc<...>"`` TMA descriptors; a callable value is called with the constexprs
    (config included) and gives one of these."""
    names = list(fn.arg_names)
    given = set(args) | set(constexprs)
    if set(names) != given:
        raise SignatureMismatch(f"{fn.__name__} takes {names}; this test passes "
                                f"{sorted(given)} (missing {sorted(set(names) - given)}, "
                                f"unknown {sorted(given - set(names))})")
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name], consts[name] = "constexpr", constexprs[name]
            continue
        value = args[name]
        if callable(value):  # depends on the config (a TMA descriptor's block shape)
            value = value(constexprs)
        if isinstance(value, str) and value.startswith("tensordesc"):
            signature[name] = value
        elif isinstance(value, str):
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _build_fp8(mod, p: dict, all_configs: bool):
    m, n, k = p["m"], 4096, 4096
    args = dict(a_ptr="*fp8e4nv", b_ptr="*fp8e4nv", c_ptr="*bf16", as_ptr="*fp32",
                bs_ptr="*fp32", bias_ptr="*bf16", M=m, N=n, K=k, M_BUCKET=mod.m_bucket(m),
                stride_am=k, stride_ak=1, stride_bn=k, stride_bk=1, stride_cm=n, stride_cn=1)
    consts = dict(HAS_BIAS=p["bias"], PROMOTE=p.get("promote", 0))
    fn = mod._fp8_mm_kernel
    if p["persistent"]:
        fn, consts["NUM_PROGRAMS"] = mod._fp8_mm_persistent_kernel, H100_SMS
    configs = [c for c in mod.FP8_CONFIGS if all_configs or c.kwargs["BLOCK_M"] == p["block_m"]]
    return fn, args, consts, configs if all_configs else _heaviest(configs, _gemm_footprint)


def _build_w4a8(mod, p: dict, all_configs: bool):
    m, n, k, gs = p["m"], 4096, 4096, p["group_size"]
    groups = -(-k // gs)
    args = dict(a_ptr="*fp8e4nv", w_ptr="*u8", c_ptr="*bf16", as_ptr="*fp32", rs_ptr="*fp32",
                gexp_ptr="*i8", bias_ptr="*bf16", M=m, N=n, K=k, M_BUCKET=mod.m_bucket(m),
                stride_am=k, stride_ak=1, stride_wn=(k + 1) // 2, stride_gn=groups,
                stride_cm=n, stride_cn=1)
    consts = dict(GROUP_SIZE=gs, HAS_BIAS=False,
                  DECODE=mod.DECODES.index(p.get("decode", mod.DECODE)),
                  PROMOTE=p.get("promote", 0))
    configs = [c for c in mod.W4A8_CONFIGS
               if all_configs or c.kwargs["BLOCK_M"] == p["block_m"]]
    return (mod._w4a8_kernel, args, consts,
            configs if all_configs else _heaviest(configs, _gemm_footprint))


def _build_w4a8_swap(mod, p: dict, all_configs: bool):
    m, n, k, gs = p["m"], 4096, 4096, p["group_size"]
    args = dict(a_ptr="*fp8e4nv", w_ptr="*u8", c_ptr="*bf16", as_ptr="*fp32", rs_ptr="*fp32",
                gexp_ptr="*i8", bias_ptr="*bf16", M=m, N=n, K=k, M_BUCKET=mod.m_bucket(m),
                stride_am=k, stride_ak=1, stride_wn=(k + 1) // 2, stride_gn=-(-k // gs),
                stride_cm=n, stride_cn=1)
    consts = dict(GROUP_SIZE=gs, HAS_BIAS=False, DECODE=2, PROMOTE=0)
    configs = [c for c in mod.SWAP_CONFIGS if all_configs or (
        c.kwargs["BLOCK_M"] == p["block_m"] and c.kwargs["BLOCK_N"] == p.get("block_n",
                                                                           c.kwargs["BLOCK_N"]))]
    return (mod._w4a8_swap_kernel, args, consts,
            configs if all_configs else _heaviest(configs, _gemm_footprint))


def _build_act_quant(mod, p: dict, all_configs: bool):
    d, had, out = p["d"], p["had_size"], p["out"]
    norm = p.get("norm", False)
    spec = mod._spec(p["fmt"], out, mod._OUTS)
    plan = mod._plan(had, d)
    elem, lmax = mod._FORMATS[(spec.elem, spec.asym)]
    codes = {"fp8_e4m3": "*fp8e4nv", "int8": "*i8"}
    args = dict(x_ptr="*bf16", w_ptr="*bf16", base_ptr="*i8" if plan.base else "*fp32",
                out_ptr=codes[spec.elem] if out == "codes" else "*bf16", scale_ptr="*fp32",
                D=d, d_f=float(d), stride_x=d, stride_o=d, stride_w=d if p.get("gate") else 0,
                nblk=plan.nblk, size=plan.size, qn=plan.q, inv_norm=plan.inv_norm,
                eps=1e-6 if norm else 0.0)
    tile = dict(NB=plan.nb, P1=plan.p1, P2=plan.p2, Q=plan.qp)
    consts = dict(tile, R1=plan.r1, R2=plan.r2, HAD=had > 0, NORM=norm, HAS_W=norm,
                  GATE=p.get("gate", False),
                  ELEM=elem, ASYM=spec.asym, LMAX=lmax, OUT=mod._OUTS.index(out), XDT=1,
                  NATIVE=True)
    configs = mod.CONFIGS if all_configs else mod._prune(mod.CONFIGS, {}, **tile)
    return mod._act_quant_kernel, args, consts, configs


def _build_had2(mod, p: dict, all_configs: bool):
    import torch

    from qcompile.backends.triton.act_quant import _FORMATS, _OUTS, _XDT, _spec

    d, had, out = p["d"], p["had_size"], p["out"]
    dtype = p.get("dtype", "bf16")
    spec = _spec(p["fmt"], out, _OUTS)
    plan = mod.had2_plan(had, d)
    elem, lmax = _FORMATS[(spec.elem, spec.asym)]
    codes = {"fp8_e4m3": "*fp8e4nv", "int8": "*i8"}
    args = dict(x_ptr="*" + dtype, out_ptr=codes[spec.elem] if out == "codes" else "*" + dtype,
                scale_ptr="*fp32", M=4096, D=d, stride_x=d, stride_o=d,
                inv_norm=plan.inv_norm, m_bucket=4096)
    xdt = _XDT[{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]]
    step = 128 // {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    consts = dict(NR=plan.nr, RP=plan.rp, R=plan.r, C=plan.c, HAD=had > 0, ELEM=elem,
                  ASYM=spec.asym, LMAX=lmax, OUT=_OUTS.index(out), XDT=xdt, NATIVE=True,
                  PARTS=p.get("parts", mod.DEFAULT_PARTS), TRANS=p.get("trans", mod.DEFAULT_TRANS),
                  STEP=step, LINES=mod._pow2_ceil(-(-d // step)))
    # The L2-prefetching configs only where the case asks (compile time).
    configs = [c for c in mod.HAD2_ROW_CONFIGS if p.get("ahead") or not c.kwargs["AHEAD"]]
    configs = configs if all_configs else mod._prune(configs, {}, **consts)
    return mod._had2_quant_kernel, args, consts, configs


def _build_kron(mod, p: dict, all_configs: bool):
    from qcompile.backends.triton.act_quant import _FORMATS, _OUTS, _spec

    had, out = p["had_size"], p["out"]
    spec = _spec(p["fmt"], out, _OUTS)
    plan = mod.kron_plan(had, had)
    elem, lmax = _FORMATS[(spec.elem, spec.asym)]
    codes = {"fp8_e4m3": "*fp8e4nv", "int8": "*i8"}
    args = dict(x_ptr="*bf16", base_ptr="*i8",
                out_ptr=codes[spec.elem] if out == "codes" else "*bf16", scale_ptr="*fp32",
                M=4096, stride_x=had, stride_o=had, inv_norm=plan.inv_norm, m_bucket=4096)
    consts = dict(A=plan.a, B=plan.b, Q=plan.q, MB=plan.m, ELEM=elem, ASYM=spec.asym,
                  LMAX=lmax, OUT=_OUTS.index(out), XDT=1, NATIVE=True)
    configs = mod.HAD2_CONFIGS if all_configs else mod._prune(mod.HAD2_CONFIGS, {}, **consts)
    return mod._kron_quant_kernel, args, consts, configs


def _w4a16_pointers(p: dict) -> dict:
    x = "*" + p["dtype"]
    return dict(x_ptr="*" + p.get("x", p["dtype"]), packed_ptr="*u8", table_ptr="*fp32", scale_ptr="*fp32",
                neg_ptr="*fp32", zero_ptr="*fp32", outer_ptr="*fp32",
                bias_ptr=x if p.get("bias") else "*fp32")


def _w4a16_flags(mod, p: dict) -> dict:
    kind = {"fp32": 0, "bf16": 1, "fp16": 2}[p["dtype"]]
    return dict(GROUP_SIZE=p["group_size"], HAS_NEG=p.get("neg", False),
                HAS_ZERO=p.get("zero", False), HAS_OUTER=p.get("outer", False),
                HAS_BIAS=p.get("bias", False), KIND=kind, EXACT=False)


def _build_w4a16_gemv(mod, p: dict, all_configs: bool):
    m, n, k, gs = p["m"], 4096, 4096, p["group_size"]
    block_m = 1 << max(m - 1, 0).bit_length()
    out = "*" + p["dtype"]
    args = dict(_w4a16_pointers(p), part_ptr="*fp32" if p["split"] > 1 else out, out_ptr=out,
                count_ptr="*i32", xs_ptr="*fp32", M=m, N=n, K=k, KB=(k + 1) // 2,
                G=-(-k // gs), outer_stride=int(p.get("outer", 0)))
    flags = _w4a16_flags(mod, p)
    consts = dict(flags, SPLIT=p["split"], REDUCE=p["split"] > 1, BLOCK_M=block_m,
                  HAS_XS=p.get("xs", False), OUT_KIND=flags["KIND"])
    if "x" in p:  # FP8 code rows (W4A8): fp32 weights
        consts["KIND"] = 0
    configs = mod.GEMV_CONFIGS[mod._bucket(mod.GEMV_CONFIGS, block_m)]
    if all_configs:
        configs = [c for cs in mod.GEMV_CONFIGS.values() for c in cs]
    else:  # the broadcast product [BLOCK_M, BLOCK_K/2, BLOCK_N] per thread
        configs = _heaviest(configs, lambda c: (block_m * c.kwargs["BLOCK_K"]
                                                * c.kwargs["BLOCK_N"] // c.num_warps,))
    return mod._w4a16_gemv_kernel, args, consts, configs


def _fusion(p: dict, args: dict, consts: dict) -> None:
    """The batch-1 GEMVs' decode-fusion arguments (``p["pro"]``: 1 RMSNorm, 2 SiLU gate;
    ``p["res"]``: residual add), inserted after ``xs_ptr`` and ``outer_stride``, and their
    ``PDL`` flag (``p["pdl"]``: a programmatic dependent launch)."""
    x = "*" + p.get("x", p["dtype"])
    items = list(args.items())
    at = [k for k, _ in items].index("xs_ptr") + 1
    items[at:at] = [("g_ptr", x), ("up_ptr", x), ("res_ptr", "*" + p["dtype"])]
    at = [k for k, _ in items].index("outer_stride") + 1
    items[at:at] = [("eps", 1e-6)]
    args.clear()
    args.update(items)
    consts.update(PRO=p.get("pro", 0), HAS_G=p.get("pro", 0) == 1, HAS_RES=p.get("res", False),
                  PDL=p.get("pdl", False))


def _build_w4a16_gemv1(mod, p: dict, all_configs: bool):
    n, k, gs = 4096, 4096, p["group_size"]
    out = "*" + p["dtype"]
    args = dict(_w4a16_pointers(p), part_ptr="*fp32" if p["split"] > 1 else out,
                out_ptr=out, count_ptr="*i32", xs_ptr="*fp32", N=n, K=k, KB=(k + 1) // 2,
                G=-(-k // gs), outer_stride=int(p.get("outer", 0)))
    flags = _w4a16_flags(mod, p)
    consts = dict(flags, SPLIT=p["split"], FP4=p.get("fp4", False), HAS_XS=p.get("xs", False),
                  REDUCE=p["split"] > 1)
    _fusion(p, args, consts)
    configs = list(mod._eligible_configs(gs))
    if not all_configs:  # the widest tile per thread
        configs = _heaviest(configs, lambda c: (c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"]
                                                // c.num_warps,))
    return mod._gemv1_kernel, args, consts, configs


def _build_w4a16_gemv1w(mod, p: dict, all_configs: bool):
    n, k, gs = 4096, 4096, p["group_size"]
    out = "*" + p["dtype"]
    args = dict(x_ptr="*" + p.get("x", p["dtype"]), words_ptr="*i32", scale_ptr="*fp32",
                neg_ptr="*fp32", outer_ptr="*fp32", bias_ptr=out if p.get("bias") else "*fp32",
                part_ptr="*fp32" if p["split"] > 1 else out, out_ptr=out, count_ptr="*i32",
                xs_ptr="*fp32", N=n, K=k, KW=k // 8, G=-(-k // gs),
                outer_stride=int(p.get("outer", 0)))
    kind = {"fp32": 0, "bf16": 1, "fp16": 2}[p["dtype"]]
    consts = dict(GROUP_SIZE=gs, HAS_NEG=p.get("neg", False), HAS_OUTER=p.get("outer", False),
                  HAS_BIAS=p.get("bias", False), HAS_XS=p.get("xs", False), SPLIT=p["split"],
                  REDUCE=p["split"] > 1, KIND=kind, EXACT=False)
    _fusion(p, args, consts)
    return mod._gemv1_fp4w_kernel, args, consts, list(mod._fp4w_configs(gs))


def _build_w4a16_gemv1tma(mod, p: dict, all_configs: bool):
    import triton

    from qcompile.backends.triton import w4a16_gemv

    _, base, consts, _ = _build_w4a16_gemv1w(w4a16_gemv, dict(p, split=p.get("split", 1)),
                                             all_configs)
    args = {}
    for name, value in base.items():
        args[name] = value
        if name == "x_ptr":
            args["w_desc"] = lambda c: f"tensordesc<i32[{c['BLOCK_N']}, {c['BLOCK_K'] // 8}]>"
    consts.pop("REDUCE")
    mma = p.get("products") == "mma"  # the tensor-core configs, else the FMA ones
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "MMA": m},
                             num_warps=w)
               for bn, bk, st, _, w, m in mod._configs(p["group_size"], False) if m == mma]
    if not (all_configs or p.get("every")):  # the first and the most shared memory
        most = max(configs, key=lambda c: (c.kwargs["STAGES"] - 1) * c.kwargs["BLOCK_N"]
                   * c.kwargs["BLOCK_K"])
        configs = [configs[0]] + ([most] if most is not configs[0] else [])
    return mod._gemv1_tma_kernel, args, consts, configs


def _build_w4a16_gemv1mma(mod, p: dict, all_configs: bool):
    from qcompile.backends.triton import w4a16_gemv

    _, args, consts, _ = _build_w4a16_gemv1w(w4a16_gemv, p, all_configs)
    return mod._gemv1_fp4mma_kernel, args, consts, list(mod._mma_configs(p["group_size"]))


def _build_w4a16_dequant(mod, p: dict, all_configs: bool):
    import triton

    n, k, gs = 4096, 4096, p["group_size"]
    args = dict(packed_ptr="*u8", table_ptr="*fp32", scale_ptr="*fp32", neg_ptr="*fp32",
                zero_ptr="*fp32", outer_ptr="*fp32", w_ptr="*" + p["dtype"], N=n, K=k,
                KB=k // 2, G=-(-k // gs), outer_stride=int(p.get("outer", 0)))
    kind = {"fp32": 0, "bf16": 1, "fp16": 2}[p["dtype"]]
    consts = dict(GROUP_SIZE=gs, HAS_NEG=p.get("neg", False), HAS_ZERO=p.get("zero", False),
                  HAS_OUTER=p.get("outer", False), KIND=kind, EXACT=False,
                  BLOCK_N=mod._BLOCK_N, BLOCK_K=mod._block_k(gs))
    return mod._dequant_kernel, args, consts, [triton.Config({}, num_warps=4)]


def _build_w4a16_dequant_fp4w(mod, p: dict, all_configs: bool):

    n, k, gs = 4096, 4096, p["group_size"]
    args = dict(words_ptr="*i32", scale_ptr="*fp32", neg_ptr="*fp32", outer_ptr="*fp32",
                w_ptr="*" + p["dtype"], N=n, K=k, KW=k // 8, G=-(-k // gs),
                outer_stride=int(p.get("outer", 0)))
    consts = dict(GROUP_SIZE=gs, HAS_NEG=p.get("neg", False), HAS_OUTER=p.get("outer", False),
                  KIND={"fp32": 0, "bf16": 1, "fp16": 2}[p["dtype"]], EXACT=False)
    configs = mod.FP4W_CONFIGS if all_configs else _heaviest(
        mod.FP4W_CONFIGS, lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // c.num_warps)
    return mod._dequant_fp4w_kernel, args, consts, configs


def _build_w4a16_dequant_fp4p(mod, p: dict, all_configs: bool):
    import triton

    _, args, consts, _ = _build_w4a16_dequant_fp4w(mod, p, False)
    consts = dict(consts, BLOCK_N=mod._FP4P_BLOCK_N, BLOCK_K=mod._FP4P_BLOCK_K)
    return mod._dequant_fp4p_kernel, args, consts, [triton.Config({}, num_warps=4)]


def _build_w4a16_dequant_fp4f(mod, p: dict, all_configs: bool):
    _, args, consts, _ = _build_w4a16_dequant_fp4w(mod, p, False)
    return mod._dequant_fp4f_kernel, args, consts, mod.FP4F_CONFIGS


def _build_w4a8_shift(mod, p: dict, all_configs: bool):

    n, k, gs = 4096, 4096, p["group_size"]
    args = dict(packed_ptr="*u8", gexp_ptr="*i8", w_ptr="*u8", N=n, K=k, KB=k // 2,
                G=-(-k // gs), stride_gn=-(-k // gs))
    consts = dict(GROUP_SIZE=gs)
    configs = mod._prune(mod.SHIFT_CONFIGS + mod.GATHER_CONFIGS, {}, GROUP_SIZE=gs)
    if not all_configs:  # the most tile bytes per thread, then the widest rows
        configs = _heaviest(configs, lambda c: (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]
                                                // c.num_warps, c.kwargs["BLOCK_K"]))
    return mod._shift_kernel, args, consts, configs


def _build_w4a16_reduce(mod, p: dict, all_configs: bool):
    import triton

    kind = {"fp32": 0, "bf16": 1, "fp16": 2}[p["dtype"]]
    args = dict(part_ptr="*fp32", bias_ptr="*" + p["dtype"] if p["bias"] else "*fp32",
                out_ptr="*" + p["dtype"], xs_ptr="*fp32", M=p["m"], N=4096)
    args["res_ptr"] = "*" + p["dtype"]
    args["M"], args["N"] = args.pop("M"), args.pop("N")  # after res_ptr, as in the kernel
    consts = dict(SPLIT=p["split"], HAS_BIAS=p["bias"], KIND=kind, EXACT=False, BLOCK=1024,
                  HAS_XS=p.get("xs", False), HAS_RES=p.get("res", False))
    return mod._splitk_reduce_kernel, args, consts, [triton.Config({})]  # launch defaults


def _w4a16_gemm_args(p: dict) -> dict:
    """Arguments of the W4A16 tiled GEMMs (plain and swapped) on a 4096 x 4096 weight."""
    m, n, k, gs = p["m"], 4096, 4096, p["group_size"]
    return dict(_w4a16_pointers(p), out_ptr="*" + p["dtype"], M=m, N=n, K=k, KB=(k + 1) // 2,
                G=-(-k // gs), outer_stride=int(p.get("outer", 0)),
                M_BUCKET=min(1 << max(m - 1, 0).bit_length(), 1 << 16))


def _build_w4a16_gemm(mod, p: dict, all_configs: bool):
    import torch

    m = p["m"]
    args = _w4a16_gemm_args(p)
    consts = dict(_w4a16_flags(mod, p), GROUP_M=8)
    if all_configs:
        configs = [c for cs in mod.GEMM_CONFIGS.values() for c in cs]
    else:
        configs = mod.GEMM_CONFIGS[mod._bucket(mod.GEMM_CONFIGS, m)]
    # The candidates the autotuner gets for this activation dtype (fewer stages for fp32).
    x = torch.empty(0, dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                              "fp16": torch.float16}[p["dtype"]])
    configs = mod._fit_x_dtype(configs, {"x_ptr": x})
    if not all_configs:
        configs = _heaviest(configs, _gemm_footprint)
    return mod._w4a16_gemm_kernel, args, consts, configs


def _build_w4a16_swap(mod, p: dict, all_configs: bool):
    args = _w4a16_gemm_args(p)
    consts = dict(_w4a16_flags(mod, p), GROUP_N=8)
    kept = mod._prune_by_m(mod.SWAP_CONFIGS, {"M_BUCKET": args["M_BUCKET"]})
    configs = mod.SWAP_CONFIGS if all_configs else _heaviest(kept, _gemm_footprint)
    return mod._w4a16_swap_kernel, args, consts, configs


def _build_decode_attn(mod, p: dict, all_configs: bool):
    dt, g, d, n = p["dtype"], p["g"], p["d"], 4096
    ptr = "*" + dt
    args = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr,
                mask_ptr={0: ptr, 1: "*i1", 2: ptr}[p["mask"]], cos_ptr=ptr, sin_ptr=ptr,
                out_ptr=ptr,
                part_ptr="*fp32", ml_ptr="*fp32", count_ptr="*i32", L=n, HKV=8, G=g, DK=d,
                DV=d, qk_scale=0.125, sq_b=8 * g * d, sq_h=d, sq_d=1, sk_b=8 * n * d,
                sk_h=n * d, sk_l=d, sk_d=1, sv_b=8 * n * d, sv_h=n * d, sv_l=d, sv_d=1,
                sm_b=n, sm_h=0, sm_l=1, sc_b=d, sc_h=0, sc_d=1, ss_b=d, ss_h=0, ss_d=1,
                idx_ptr="*i64", kn_ptr=ptr, vn_ptr=ptr, kcos_ptr=ptr, ksin_ptr=ptr,
                skn_b=(8 + 2 * 8 + 8 * g) * d, skn_h=d, skn_d=1,
                svn_b=(8 + 2 * 8 + 8 * g) * d, svn_h=d, svn_d=1,
                skc_b=d, skc_h=0, skc_d=1, sks_b=d, sks_h=0, sks_d=1)
    write = p.get("write", False)
    consts = dict(MASK=p["mask"], ROPE=p.get("rope", False), WRITE=write, KROPE=write,
                  NSPLIT=p["nsplit"], PDL=p.get("pdl", False),
                  PREC="tf32x3" if dt == "fp32" else "tf32", BLOCK_G=max(16, g), BLOCK_DK=d,
                  BLOCK_DV=d)
    kept = mod._prune(mod.CONFIGS, {"L": n}, **consts)
    return mod._decode_attn_kernel, args, consts, mod.CONFIGS if all_configs else kept


def _w8a16_args(mod, p: dict, **extra) -> tuple[dict, dict]:
    n, k, gs = 4096, 4096, p["group_size"]
    args = dict(w_ptr="*u8", scale_ptr="*fp32", zero_ptr="*fp32", outer_ptr="*fp32", N=n, K=k,
                G=-(-k // gs), outer_stride=int(p.get("outer", 0)), **extra)
    elem = mod.ELEMS[p["elem"]]
    consts = dict(GROUP_SIZE=gs, ELEM=elem, HAS_ZERO=p.get("zero", False),
                  HAS_OUTER=p.get("outer", False), EXACT=False,
                  KIND={"fp32": 0, "bf16": 1, "fp16": 2}[p["dtype"]])
    return args, consts


def _build_w8a16_gemv(mod, p: dict, all_configs: bool):
    dt = "*" + p["dtype"]
    args, consts = _w8a16_args(mod, p, x_ptr=dt, bias_ptr=dt, part_ptr="*fp32", out_ptr=dt,
                               count_ptr="*i32", g_ptr=dt, up_ptr=dt, res_ptr=dt, M=1, eps=1e-5)
    consts.update(CHANNEL=p["group_size"] == args["K"], HAS_BIAS=True, SPLIT=p["split"],
                  REDUCE=p["split"] > 1, PRO=p.get("pro", 0), HAS_G=p.get("pro", 0) == 1,
                  HAS_RES=p.get("res", False))
    return mod._gemv_kernel, args, consts, mod._prune_gemv(mod.GEMV_CONFIGS, args, **consts)


def _build_w8a16_gemm(mod, p: dict, all_configs: bool):
    import torch

    dt = "*" + p["dtype"]
    m = p["m"]
    args, consts = _w8a16_args(mod, p, x_ptr=dt, bias_ptr=dt, out_ptr=dt, M=m,
                               M_BUCKET=1 << (m - 1).bit_length())
    consts.update(CHANNEL=p["group_size"] == args["K"], HAS_BIAS=True)
    x = torch.empty(0, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[p["dtype"]])
    return mod._gemm_kernel, args, consts, mod._prune_gemm(mod.GEMM_CONFIGS, dict(args, x_ptr=x),
                                                           **consts)


def _build_w8a16_dequant(mod, p: dict, all_configs: bool):
    import triton

    args, consts = _w8a16_args(mod, p, out_ptr="*" + p["dtype"])
    consts.update(BLOCK_N=mod._DQ_BLOCK_N, BLOCK_K=mod._DQ_BLOCK_K)
    return mod._dequant_kernel, args, consts, [triton.Config({}, num_warps=4)]


_BUILDERS = {"fp8": _build_fp8, "w4a8": _build_w4a8, "act_quant": _build_act_quant,
             "had2": _build_had2, "kron": _build_kron,
             "w4a16_gemv": _build_w4a16_gemv, "w4a16_reduce": _build_w4a16_reduce,
             "w4a16_gemm": _build_w4a16_gemm, "w4a16_gemv1": _build_w4a16_gemv1,
             "w4a16_gemv1mma": _build_w4a16_gemv1mma,
             "w4a16_gemv1w": _build_w4a16_gemv1w, "w4a16_dequant": _build_w4a16_dequant,
             "w4a16_gemv1tma": _build_w4a16_gemv1tma,
             "w4a16_dequant_fp4w": _build_w4a16_dequant_fp4w,
             "w4a16_dequant_fp4p": _build_w4a16_dequant_fp4p,
             "w4a16_dequant_fp4f": _build_w4a16_dequant_fp4f, "w4a8_shift": _build_w4a8_shift,
             "w4a8_swap": _build_w4a8_swap, "w4a16_swap": _build_w4a16_swap,
             "decode_attn": _build_decode_attn, "w8a16_gemv": _build_w8a16_gemv,
             "w8a16_gemm": _build_w8a16_gemm, "w8a16_dequant": _build_w8a16_dequant}


def _resources(cubin: bytes, cuobjdump: str, name: str) -> tuple[int, int]:
    """(registers, stack frame bytes per thread) of kernel ``name`` in ``cubin``. The stack
    frame is where ``ptxas`` spills registers (the driver's ``LOCAL_SIZE_BYTES``; cuobjdump's
    ``LOCAL`` is only statically declared ``.local`` data, 0 here)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    match = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+)\s+STACK:(\d+)", text)
    if match is None:
        raise RuntimeError(f"no resource usage for {name} in cuobjdump output:\n{text}")
    return int(match.group(1)), int(match.group(2))


def _compile_one(fn, args: dict, consts: dict, config, cuobjdump: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialize(fn, args, dict(consts, **config.kwargs))
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    seconds = time.perf_counter() - start
    regs, stack = _resources(kernel.asm["cubin"], cuobjdump, kernel.metadata.name)
    mma = sorted(set(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*", kernel.asm["ptx"])))
    # A WGMMA whose A operand is in registers lists them in braces after the accumulator's;
    # from shared memory it is a descriptor (a 64-bit register).
    a_regs = bool(re.search(r"wgmma\.mma_async[\w.]*\s*\{[^}]*\},\s*\{", kernel.asm["ptx"]))
    # Line numbers in the PTX of the grid-dependency instructions, the L2 prefetches and the
    # first global load (what a programmatic dependent launch must order).
    lines = kernel.asm["ptx"].splitlines()
    where = {what: [i for i, line in enumerate(lines) if re.search(pattern, line)]
             for what, pattern in (("wait", r"griddepcontrol\.wait"),
                                   ("launch", r"griddepcontrol\.launch_dependents"),
                                   ("prefetch", r"prefetch\.global\.L2"),
                                   ("load", r"\bld\.global"))}
    tma = len(re.findall(r"cp\.async\.bulk\.tensor", kernel.asm["ptx"]))
    return {"config": dict(config.kwargs, num_warps=config.num_warps,
                           num_stages=config.num_stages),
            "ok": True, "n_regs": regs, "n_spills": stack // 4, "stack_bytes": stack,
            "n_tma": tma,
            "shared": kernel.metadata.shared, "mma": mma, "a_regs": a_regs,
            "pdl": {k: v[:1] + v[-1:] for k, v in where.items()}
            | {f"n_{k}": len(v) for k, v in where.items()},
            "seconds": round(seconds, 2)}


def _worker(cases: list[tuple[str, str, dict]], all_configs: bool = False) -> dict:
    """Compile ``cases``; ``{id: {"status": ..., "variants": [...]}}`` (never raises per case)."""
    import importlib
    import traceback

    from triton import knobs
    from triton.runtime.jit import JITFunction

    cuobjdump = knobs.nvidia.cuobjdump.path
    modules: dict[str, object] = {}
    report: dict[str, dict] = {}
    for case_id, family, params in cases:
        name = _MODULES[family]
        if name not in modules:
            try:
                modules[name] = importlib.import_module(f"qcompile.backends.triton.{name}")
            except Exception:
                modules[name] = traceback.format_exc(limit=3)
        mod = modules[name]
        if isinstance(mod, str):
            report[case_id] = {"status": "import_error", "error": mod}
            continue
        try:
            fn, args, consts, configs = _BUILDERS[family](mod, params, all_configs)
            if not isinstance(fn, JITFunction):
                raise TypeError(f"{fn!r} is not a JITFunction (is TRITON_INTERPRET set?)")
        except Exception as exc:
            report[case_id] = {"status": "setup_error", "error": f"{type(exc).__name__}: {exc}"}
            continue
        variants = []
        for config in configs:
            try:
                variants.append(_compile_one(fn, args, consts, config, cuobjdump))
            except SignatureMismatch as exc:
                report[case_id] = {"status": "signature_mismatch", "error": str(exc)}
                break
            except Exception as exc:  # a compile error is the result
                variants.append({"config": dict(config.kwargs, num_warps=config.num_warps,
                                                num_stages=config.num_stages),
                                 "ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:]})
        else:
            report[case_id] = {"status": "done", "kernel": fn.__name__, "variants": variants}
    return report


def _format(report: dict) -> str:
    lines = [f"{'case':36} {'config':44} {'regs':>4} {'spill':>5} {'smem':>7} {'s':>5}  mma"]
    for case_id, res in report.items():
        if res["status"] != "done":
            lines.append(f"{case_id:36} {res['status']}: {res['error'].splitlines()[-1]}")
            continue
        for v in res["variants"]:
            cfg = " ".join(f"{k}={x}" for k, x in v["config"].items())
            if not v["ok"]:
                lines.append(f"{case_id:36} {cfg:44} FAILED: {v['error'].splitlines()[0]}")
                continue
            mma = ",".join(v["mma"]) or "-"
            lines.append(f"{case_id:36} {cfg:44} {v['n_regs']:4} {v['n_spills']:5} "
                         f"{v['shared']:7} {v['seconds']:5.1f}  {mma}"
                         f"{' (A in registers)' if v.get('a_regs') else ''}")
    return "\n".join(lines)


# --- pytest side ---------------------------------------------------------------------------------

def _require_toolchain() -> None:
    """Skip unless triton (with the 3.x ``ASTSource(fn, signature, constexprs, attrs)`` API) and
    the ``ptxas`` Triton uses for sm_90 are present and run."""
    try:
        import triton  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"triton is not importable: {exc}")
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this triton's ASTSource predates the (signature, constexprs, attrs) API")
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas

        for tool in (get_ptxas(90), knobs.nvidia.cuobjdump):
            subprocess.run([tool.path, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:  # any failure: no usable toolchain
        pytest.skip(f"Triton's ptxas/cuobjdump for sm_90 cannot be found or run: {exc}")


@pytest.fixture(scope="module")
def sm90_report(tmp_path_factory) -> dict:
    """Compile every case in one subprocess (real JITFunctions, fresh Triton cache)."""
    _require_toolchain()
    tmp = tmp_path_factory.mktemp("triton_sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    out = tmp / "report.json"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--json", str(out)], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"AOT compile of {len(CASES)} cases took over {TIMEOUT_S} s")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"compile subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(out.read_text())
    print(f"\nsm_90 AOT compile of {len(CASES)} cases: {time.perf_counter() - start:.1f} s\n"
          + _format(report))
    return report


@pytest.mark.parametrize("case_id,family,params", CASES, ids=[c[0] for c in CASES])
def test_compiles_for_sm90(sm90_report, case_id, family, params):
    """The kernel assembles for sm_90 within shared memory, with the expected MMA, and spills
    no more than allowed."""
    res = sm90_report[case_id]
    if res["status"] != "done":
        if _MODULES[family] == _IN_PROGRESS:  # import, API or signature out of step
            pytest.skip(f"{_IN_PROGRESS}.py (still being edited when this test was written) "
                        f"no longer matches it: {res['status'].replace('_', ' ')}: "
                        f"{res['error'].splitlines()[-1]}")
        pytest.fail(f"{res['status']}: {res['error']}")
    assert res["variants"], "no config to compile"
    spilling = []
    for v in res["variants"]:
        what = f"{res['kernel']} {v['config']}"
        assert v["ok"], f"{what} does not compile for sm_90:\n{v['error']}"
        assert v["shared"] <= SM90_MAX_SHARED, (
            f"{what} needs {v['shared']} bytes of shared memory; sm_90 has {SM90_MAX_SHARED}")
        if "mma" in params:
            assert v["mma"] and all(params["mma"] in op for op in v["mma"]), (
                f"{what} should use {params['mma'] or 'some'} MMA; its PTX has {v['mma']}")
        if "a_regs" in params:
            assert v["a_regs"] == params["a_regs"], (
                f"{what}: the WGMMA's A operand should {'' if params['a_regs'] else 'not '}"
                "come from registers")
        # had2's AHEAD is an L2 prefetch (the decode attention's AHEAD issues loads early).
        _check_pdl(what, v["pdl"], params.get("pdl", False),
                   family == "had2" and v["config"].get("AHEAD", 0) > 0)
        if params.get("tma"):
            cfg = v["config"]
            tile = cfg["BLOCK_N"] * cfg["BLOCK_K"] // 2  # bytes of words per tile
            assert v["n_tma"] >= 1, f"{what}: no TMA copy (cp.async.bulk.tensor) in its PTX"
            assert v["shared"] >= (cfg["STAGES"] - 1) * tile, (
                f"{what}: {v['shared']} bytes of shared memory cannot hold "
                f"{cfg['STAGES'] - 1} tiles in flight: the loads are not pipelined")
        if v["n_spills"] > params.get("spills", 0):
            spilling.append(f"{what}: {v['stack_bytes']} bytes/thread of spills "
                            f"({v['n_regs']} registers)")
    if spilling and "known_spills" in params:
        pytest.xfail(f"known: {params['known_spills']}. " + "; ".join(spilling))
    assert not spilling, (f"spills beyond the allowed {params.get('spills', 0)} words: "
                          + "; ".join(spilling))


def _check_pdl(what: str, pdl: dict, expected: bool, prefetches: bool = False) -> None:
    """A kernel compiled for a programmatic dependent launch prefetches, then waits for the
    previous grid before its first global load (nothing another kernel writes is read
    early), then lets the next grid launch; every other kernel has none of it, and L2
    prefetches only where its config asks for them (``prefetches``: had2's ``AHEAD``)."""
    if not expected:
        assert pdl["n_wait"] == pdl["n_launch"] == 0, (
            f"{what}: grid-dependency code without PDL: {pdl}")
        assert (pdl["n_prefetch"] > 0) == prefetches, (
            f"{what}: {'no' if prefetches else 'unasked'} L2 prefetches: {pdl}")
        return
    assert pdl["n_wait"] == 1 and pdl["n_launch"] == 1 and pdl["n_prefetch"] >= 1, (
        f"{what}: expected one wait, one launch_dependents and L2 prefetches: {pdl}")
    assert pdl["prefetch"][-1] < pdl["wait"][0] < pdl["launch"][0], (
        f"{what}: the prefetches must come before the wait, the wait before the launch: {pdl}")
    assert pdl["load"] and pdl["wait"][0] < pdl["load"][0], (
        f"{what}: a global load before griddepcontrol.wait: {pdl}")


if __name__ == "__main__":  # the subprocess: python test_triton_compile_sm90.py [--all] [--json F]
    argv = sys.argv[1:]
    result = _worker(CASES, all_configs="--all" in argv)
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as fh:
            json.dump(result, fh)
    print(_format(result))
