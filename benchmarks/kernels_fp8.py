"""FP8 kernel throughput on CUDA: qcompile's Triton kernels vs ``torch._scaled_mm`` rowwise.

* ``fp8_scaled_mm`` (tiled and persistent) vs ``torch._scaled_mm`` with row-wise scales
  (``scale_a [M, 1]``, ``scale_b [1, N]``, bf16 out) at M = N = K = 8192: TFLOP/s and ratio.
* ``w4a8_linear`` (FP4 g128 m2 weights shifted to FP8) vs ``torch._scaled_mm`` on the same
  shape at M = 128, 256, 1024, 4096, 8192 with N = K = 8192: ratio (> 1: faster than cuBLAS
  FP8). The default path at every M (``w4a8_linear (dequant)`` from ``DEQUANT_MIN_M`` rows: the
  weight shifted to FP8 once, then the FP8 GEMM; ``(fused)`` below), and at M = 128, where the
  fused kernel is the default, that kernel with each weight decode
  (``w4a8_linear/fused-<decode>``, ``w4a8.DECODES``; each autotunes its own configs).

Times are ``triton.testing.do_bench`` medians (ms). Needs CUDA with FP8 tensor cores (sm89+).

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


def _bench(fn: Callable[[], torch.Tensor]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=200))


def run(mnk: int = 8192, w4a8_ms: tuple[int, ...] = (128, 256, 1024, 4096, 8192),
        fused_ms: tuple[int, ...] = (128,), crossover_ms: tuple[int, ...] = (256, 1024)
        ) -> list[dict]:
    """Benchmark the FP8 GEMM and the W4A8 kernel against ``torch._scaled_mm``.

    Args:
        mnk: M = N = K of the FP8 GEMM comparison (and N = K of the W4A8 one).
        w4a8_ms: The M values of the W4A8 comparison (default path).
        fused_ms: The M values where the fused kernel is also timed with each decode.
        crossover_ms: M values of the shift-then-GEMM path where the fused kernel (default
            decode) is timed too, to place ``DEQUANT_MIN_M``.

    Returns:
        One dict per measurement: ``kernel``, ``m``, ``n``, ``k``, ``ms``, ``tflops`` and
        ``ratio`` (torch._scaled_mm time / kernel time) where there is a baseline.

    Raises:
        RuntimeError: No CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks/kernels_fp8.py needs a CUDA GPU with FP8 tensor cores "
                           "(sm89+); the Triton interpreter's timings would be meaningless")
    from qcompile.backends.triton import w4a8 as w4a8_mod
    from qcompile.backends.triton import w4a8_dequant
    from qcompile.backends.triton.fp8_gemm import fp8_scaled_mm
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
        # The default path: from DEQUANT_MIN_M rows, the weight shifted to FP8 once and the
        # FP8 GEMM; below, the fused kernel.
        ms = _bench(lambda a=a, s=a_scale: w4a8_linear(a, s, packed, gexp, row_scale, 128))
        path = "dequant" if m >= w4a8_dequant.DEQUANT_MIN_M else "fused"
        record(f"w4a8_linear ({path})", m, ms, base)
        if m in crossover_ms and path == "dequant":
            ms = _bench(lambda a=a, s=a_scale: w4a8_linear(a, s, packed, gexp, row_scale, 128,
                                                           path="fused"))
            record(f"w4a8_linear/fused-{w4a8_mod.DECODE}", m, ms, base)
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
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
