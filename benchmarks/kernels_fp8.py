"""FP8 kernel throughput on CUDA: qcompile's Triton kernels vs ``torch._scaled_mm`` rowwise.

* ``fp8_scaled_mm`` (tiled and persistent) vs ``torch._scaled_mm`` with row-wise scales
  (``scale_a [M, 1]``, ``scale_b [1, N]``, bf16 out) at M = N = K = 8192: TFLOP/s and ratio.
* ``w4a8_linear`` (FP4 g128 m2 weights shifted to FP8) vs ``torch._scaled_mm`` on the same
  shape at M = 128, 256, 1024, 4096, 8192 with N = K = 8192: ratio (> 1: faster than cuBLAS
  FP8). The default path at every M (``w4a8_linear (dequant)`` from ``DEQUANT_MIN_M`` rows: the
  weight shifted to FP8 once, then the FP8 GEMM; ``(fused)`` below), and at M = 128, where the
  fused kernel is the default, that kernel with each weight decode
  (``w4a8_linear/fused-<decode>``, ``w4a8.DECODES``; each autotunes its own configs); on the
  shift-then-GEMM path, the GEMM of the shifted weight alone.
* At 8192: ours (fast accumulation, the default) also against ``use_fast_accum=True``, and
  ours with ``fast_accum=False`` (sums promoted to fp32) against cuBLAS's default.
* Every FP8 GEMM config forced at M = 256 (``sweep_configs``).
* ``w4a8_linear(path="swap")`` (``w4a8_swap``: the decoded weight as the MMA's register
  operand) at M = 128, 256, 1024, 4096.

Times are CUDA-graph replays (``do_bench_cudagraph``, ms) unless a row says eager (``do_bench``
of the calls, host work included). Needs CUDA with FP8 tensor cores (sm89+).

Usage::

    python benchmarks/kernels_fp8.py            # prints one JSON list
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

FP8 = torch.float8_e4m3fn


def _tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def _rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    return (x / scale).to(FP8), scale.float()


def _bench(fn: Callable[[], torch.Tensor], eager: bool = False) -> float:
    """Milliseconds per call: replays of a CUDA graph of ``fn`` (what a compiled model with
    CUDA graphs sees: no host work; the first call, outside the graph, autotunes), or with
    ``eager`` (or when capture fails) ``do_bench`` of the calls themselves, host work
    included: a small-M kernel of tens of microseconds can be bounded by its Python wrapper."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if not eager:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=100))
        except Exception:  # noqa: BLE001 - not capturable: time it eagerly
            torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=50, rep=200))


def sweep_configs(m: int, n: int, k: int, promote: int) -> list[dict]:
    """Time the tiled FP8 GEMM at ``[m, k] x [n, k]`` with each of ``FP8_CONFIGS`` forced
    (no autotuning): which tiles suit a shape, and how far the autotuner's pick is."""
    from qcompile.backends.triton import fp8_gemm

    dev = torch.device("cuda")
    a, a_scale = _rows_fp8(torch.randn(m, k, device=dev))
    b, b_scale = _rows_fp8(torch.randn(n, k, device=dev))
    c = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
    rows = []
    for cfg in fp8_gemm.FP8_CONFIGS:
        meta = dict(cfg.kwargs)
        grid = (triton_cdiv(m, meta["BLOCK_M"]) * triton_cdiv(n, meta["BLOCK_N"]),)

        def launch(meta=meta, grid=grid, cfg=cfg):
            fp8_gemm._fp8_mm_kernel[grid](
                a, b, c, a_scale.reshape(-1), b_scale.reshape(-1), c, m, n, k,
                fp8_gemm.m_bucket(m), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                c.stride(0), c.stride(1), HAS_BIAS=False, PROMOTE=promote,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)
            return c

        name = (f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} w{cfg.num_warps} "
                f"s{cfg.num_stages}")
        try:
            ms = _bench(launch)
            rows.append({"kernel": f"fp8 config {name} promote={promote}", "m": m, "n": n,
                         "k": k, "ms": ms, "tflops": _tflops(m, n, k, ms), "ratio": None})
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: recorded
            rows.append({"kernel": f"fp8 config {name} promote={promote}", "m": m,
                         "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows


def triton_cdiv(x: int, y: int) -> int:
    return -(-x // y)


def run(mnk: int = 8192, w4a8_ms: tuple[int, ...] = (128, 256, 1024, 4096, 8192),
        fused_ms: tuple[int, ...] = (128,), crossover_ms: tuple[int, ...] = (256, 1024),
        sweep_ms: tuple[int, ...] = (256,),
        swap_ms: tuple[int, ...] = (128, 256, 1024, 4096)) -> list[dict]:
    """Benchmark the FP8 GEMM and the W4A8 kernel against ``torch._scaled_mm``.

    Args:
        mnk: M = N = K of the FP8 GEMM comparison (and N = K of the W4A8 one).
        w4a8_ms: The M values of the W4A8 comparison (default path).
        fused_ms: The M values where the fused kernel is also timed with each decode.
        crossover_ms: M values of the shift-then-GEMM path where the fused kernel (default
            decode) is timed too, to place ``DEQUANT_MIN_M``.
        sweep_ms: M values (N = K = mnk) where every FP8 GEMM config is timed alone
            (:func:`sweep_configs`, fast accumulation: the default).
        swap_ms: M values where the fused kernel with swapped operands (``path="swap"``,
            the decoded weight as the MMA's register operand) is timed too.

    Returns:
        One dict per measurement: ``kernel``, ``m``, ``n``, ``k``, ``ms``, ``tflops`` and
        ``ratio`` (torch._scaled_mm time / kernel time) where there is a baseline.

    Raises:
        RuntimeError: No CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks/kernels_fp8.py needs a CUDA GPU with FP8 tensor cores "
                           "(sm89+); the Triton interpreter's timings would be meaningless")
    from qcompile.backends.triton import path_tuning, w4a8_dequant
    from qcompile.backends.triton import w4a8 as w4a8_mod
    from qcompile.backends.triton.fp8_gemm import fp8_scaled_mm
    from qcompile.backends.triton.runtime import next_pow2
    from qcompile.backends.triton.w4a8 import w4a8_linear, w4a8_split_scales
    from qcompile.formats import pack_codes, parse_format, quantize

    dev = torch.device("cuda")
    torch.manual_seed(0)
    n = k = mnk
    w = torch.randn(n, k, device=dev)
    b, b_scale = _rows_fp8(w)
    q = quantize(w, parse_format("fp4_e2m1/g128/m2"))
    packed = pack_codes(q.codes, 4)
    gexp, row_scale = w4a8_split_scales(q.scale, q.outer)
    results: list[dict] = []

    def record(kernel: str, m: int, ms: float, base: float | None) -> None:
        results.append({"kernel": kernel, "m": m, "n": n, "k": k, "ms": ms,
                        "tflops": _tflops(m, n, k, ms),
                        "ratio": None if base is None else base / ms})

    def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.reshape(1, -1),
                                out_dtype=torch.bfloat16)

    a, a_scale = _rows_fp8(torch.randn(mnk, k, device=dev))
    base = _bench(lambda: scaled_mm(a, a_scale))
    record("torch._scaled_mm", mnk, base, None)
    for persistent in (False, True):
        ms = _bench(lambda p=persistent: fp8_scaled_mm(a, a_scale, b, b_scale.reshape(-1),
                                                       persistent=p))
        record(f"fp8_scaled_mm{'/persistent' if persistent else ''}", mnk, ms, base)
    # Our default keeps sums in the MMA's accumulator: also against cuBLAS's fast mode; and
    # ours with promoted sums (fast_accum=False) against cuBLAS's default.
    fast = _bench(lambda: torch._scaled_mm(a, b.t(), scale_a=a_scale,
                                           scale_b=b_scale.reshape(1, -1),
                                           out_dtype=torch.bfloat16, use_fast_accum=True))
    record("torch._scaled_mm use_fast_accum", mnk, fast, None)
    for persistent in (False, True):
        ms = _bench(lambda p=persistent: fp8_scaled_mm(a, a_scale, b, b_scale.reshape(-1),
                                                       persistent=p))
        record(f"fp8_scaled_mm{'/persistent' if persistent else ''} vs fast cuBLAS", mnk, ms,
               fast)
        ms = _bench(lambda p=persistent: fp8_scaled_mm(a, a_scale, b, b_scale.reshape(-1),
                                                       persistent=p, fast_accum=False))
        record(f"fp8_scaled_mm{'/persistent' if persistent else ''} fast_accum=False", mnk, ms,
               base)

    # The prefill path's weight shift alone, against a copy of the FP8 weight (which moves
    # N*K bytes each way; the shift reads N*K/2 and writes N*K).
    base = _bench(lambda: b.clone())
    record("copy of the fp8 weight", 0, base, None)
    ms = _bench(lambda: w4a8_dequant.w4a8_dequant(packed, gexp, 128, k))
    record("w4a8_dequant (shift to fp8)", 0, ms, base)

    for m in w4a8_ms:
        a, a_scale = _rows_fp8(torch.randn(m, k, device=dev))
        base = _bench(lambda a=a, s=a_scale: scaled_mm(a, s))
        record("torch._scaled_mm", m, base, None)
        # The default path: the fastest of fused / swap / shift-then-GEMM, timed at the first
        # call of the shape (path_tuning); without timing, shift-then-GEMM from
        # DEQUANT_MIN_M rows and the fused kernel below.
        ms = _bench(lambda a=a, s=a_scale: w4a8_linear(a, s, packed, gexp, row_scale, 128))
        path = "dequant" if m >= w4a8_dequant.DEQUANT_MIN_M else "fused"
        tuned = [p for key, p in path_tuning.choices().items()
                 if key[:4] == ("w4a8", next_pow2(m), n, k)]
        record(f"w4a8_linear (default: {'/'.join(tuned) or path})", m, ms, base)
        ms = _bench(lambda a=a, s=a_scale: w4a8_linear(a, s, packed, gexp, row_scale, 128),
                    eager=True)
        record(f"w4a8_linear (default: {'/'.join(tuned) or path}) eager, host work included",
               m, ms, _bench(lambda a=a, s=a_scale: scaled_mm(a, s), eager=True))
        if tuned and tuned[0] != path:  # the threshold's path too, for comparison
            ms = _bench(lambda a=a, s=a_scale, p=path: w4a8_linear(a, s, packed, gexp,
                                                                   row_scale, 128, path=p))
            record(f"w4a8_linear ({path}, forced)", m, ms, base)
        if path == "dequant":  # its GEMM alone, on the shifted weight
            w8 = w4a8_dequant.w4a8_dequant(packed, gexp, 128, k)
            ms = _bench(lambda a=a, s=a_scale, w8=w8: fp8_scaled_mm(a, s, w8, row_scale))
            record("fp8_scaled_mm of the shifted weight", m, ms, base)
        if m in crossover_ms and path == "dequant":
            ms = _bench(lambda a=a, s=a_scale: w4a8_linear(a, s, packed, gexp, row_scale, 128,
                                                           path="fused"))
            record(f"w4a8_linear/fused-{w4a8_mod.DECODE}", m, ms, base)
        if m in swap_ms:
            ms = _bench(lambda a=a, s=a_scale: w4a8_linear(a, s, packed, gexp, row_scale, 128,
                                                           path="swap"))
            record(f"w4a8_linear/swap-{w4a8_mod.DECODE}", m, ms, base)
        if m not in fused_ms:
            continue
        default = w4a8_mod.DECODE
        try:  # the fused kernel with each weight decode (each autotunes its 12 configs)
            for decode in w4a8_mod.DECODES:
                w4a8_mod.DECODE = decode
                ms = _bench(lambda a=a, s=a_scale: w4a8_linear(a, s, packed, gexp, row_scale,
                                                               128, path="fused"))
                record(f"w4a8_linear/fused-{decode}", m, ms, base)
        finally:
            w4a8_mod.DECODE = default
    for m in sweep_ms:
        results += sweep_configs(m, n, k, 0)
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
