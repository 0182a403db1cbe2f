"""W4A16 Triton kernel micro-benchmark: batch-1 (decode) GEMV against bf16 ``F.linear``.

For FP4 E2M1 g128 (symmetric) and FP4 AFPQ g128 weights on the Llama-3-8B shapes
8192 x 8192 and 28672 x 8192 (N x K), times ``w4a16_linear`` at M = 1 with
``triton.testing.do_bench`` next to bf16 ``torch.nn.functional.linear`` on the same shape in the
same run, and reports microseconds, the speedup over bf16, and the weight-read bandwidth
(packed codes + fp32 scales, over the kernel time). CUDA only.

Times are CUDA-graph replays (``do_bench_cudagraph``): the GPU time of the call. Plain
``do_bench`` also counts the host's launch path (input checks, autotuner lookup, up to two
launches), which at M = 1 is comparable to the kernel itself; those numbers are kept as
``*_eager_us``. Decoding under ``torch.compile(mode="reduce-overhead")`` replays CUDA graphs
the same way.

Prefill rows: at M = 2048, ``w4a16_linear`` (the weight decoded once to bf16, then cuBLAS) and
the decode alone, against bf16 ``F.linear`` (``do_bench``; ``weight_gbps`` there is the
decode's bytes moved per second).

Usage::

    python benchmarks/kernels_w4a16.py [--out w4a16.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from unittest import mock

import torch

SHAPES: list[tuple[int, int]] = [(8192, 8192), (28672, 8192)]  # (N, K)
FORMATS: list[str] = ["fp4_e2m1/g128", "fp4_e2m1/g128/asym"]


def run(device: str | torch.device = "cuda") -> list[dict[str, Any]]:
    """Time the kernels; one row per (format, shape).

    Raises:
        RuntimeError: ``device`` is not an available CUDA device (timings need a GPU).
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"the W4A16 kernel benchmark needs a CUDA device (got {dev}, "
                           f"CUDA available: {torch.cuda.is_available()})")
    from triton.testing import do_bench, do_bench_cudagraph

    from qcompile.backends.triton import runtime, w4a16_gemv
    from qcompile.backends.triton.runtime import element_table
    from qcompile.backends.triton.w4a16 import w4a16_linear, w4a16_linear_ref
    from qcompile.formats import pack_codes, parse_format, quantize

    torch.manual_seed(0)
    rows = []
    for n, k in SHAPES:
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev) * 0.02
        dense = w.to(torch.bfloat16)
        bf16_ms = do_bench(lambda x=x, d=dense: torch.nn.functional.linear(x, d))
        bf16_graph_ms = do_bench_cudagraph(lambda x=x, d=dense: torch.nn.functional.linear(x, d))
        for fmt in FORMATS:
            spec = parse_format(fmt)
            q = quantize(w, spec)
            args = (pack_codes(q.codes, 4), element_table(spec.elem, dev), q.scale, q.scale_neg,
                    q.zero, q.outer, spec.group_size)
            ref = w4a16_linear_ref(x, *args)
            read = (args[0], q.scale, q.scale_neg, q.zero, q.outer)  # what the kernel streams
            nbytes = sum(t.numel() * t.element_size() for t in read if t is not None)
            # "gemv1": what w4a16_linear runs at M = 1 (hoisted group scales, split-K partials
            # summed by each column tile's last program); "gemv1-reduce-kernel": the same with
            # the partials summed by a second launch; "gemv": the general split-K GEMV it uses
            # for 2..16 rows, timed here at M = 1 for comparison.
            for kernel, general, fused in (("gemv1", False, True),
                                           ("gemv1-reduce-kernel", False, False),
                                           ("gemv", True, True)):
                with mock.patch.object(w4a16_gemv, "gemv1_eligible",
                                       (lambda m, g: False) if general
                                       else w4a16_gemv.gemv1_eligible), \
                        mock.patch.object(runtime, "FUSED_REDUCE", fused):
                    out = w4a16_linear(x, *args)  # also runs the autotuner once
                    ms = do_bench(lambda x=x, a=args: w4a16_linear(x, *a))
                    graph_ms = do_bench_cudagraph(lambda x=x, a=args: w4a16_linear(x, *a))
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                rows.append({
                    "format": fmt, "kernel": kernel, "M": 1, "N": n, "K": k,
                    "device": torch.cuda.get_device_name(dev),
                    "w4a16_us": graph_ms * 1e3, "bf16_us": bf16_graph_ms * 1e3,
                    "speedup_vs_bf16": bf16_graph_ms / graph_ms, "weight_bytes": nbytes,
                    "weight_gbps": nbytes / (graph_ms * 1e-3) / 1e9,
                    "w4a16_eager_us": ms * 1e3, "bf16_eager_us": bf16_ms * 1e3,
                    "max_rel_err_vs_ref": err,
                })
        rows += _prefill_rows(w, dense, dev)
        del w, dense
    return rows


def _prefill_rows(w: torch.Tensor, dense: torch.Tensor, dev: torch.device,
                  m: int = 2048) -> list[dict[str, Any]]:
    """The prefill path at ``m`` rows (AFPQ g128): ``w4a16_linear`` (decode W once into bf16,
    then cuBLAS) against bf16 ``F.linear``, the decode alone (``w4a16_dequant``) with its
    bytes (packed codes and scales read, bf16 weight written), and the fused GEMMs that decode
    in registers: the tiled one (``path="gemm"``) and the one with swapped operands
    (``path="swap"``, the decoded weight as the MMA's register operand), at ``m`` and 128."""
    from triton.testing import do_bench

    from qcompile.backends.triton.runtime import element_table
    from qcompile.backends.triton.w4a16 import w4a16_linear
    from qcompile.backends.triton.w4a16_dequant import w4a16_dequant
    from qcompile.formats import pack_codes, parse_format, quantize

    n, k = w.shape
    fmt = "fp4_e2m1/g128/asym"
    spec = parse_format(fmt)
    q = quantize(w, spec)
    args = (pack_codes(q.codes, 4), element_table(spec.elem, dev), q.scale, q.scale_neg,
            q.zero, q.outer, spec.group_size)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    bf16_ms = do_bench(lambda: torch.nn.functional.linear(x, dense))
    ms = do_bench(lambda: w4a16_linear(x, *args))
    deq_ms = do_bench(lambda: w4a16_dequant(*args[:6], spec.group_size, k, torch.bfloat16))
    moved = sum(t.numel() * t.element_size() for t in (args[0], q.scale, q.scale_neg))
    moved += n * k * 2
    common = {"format": fmt, "M": m, "N": n, "K": k, "bf16_us": bf16_ms * 1e3,
              "device": torch.cuda.get_device_name(dev)}
    fused = []
    for rows in (m, 128):
        xr = x[:rows]
        base = do_bench(lambda xr=xr: torch.nn.functional.linear(xr, dense))
        for path in ("gemm", "swap"):
            t = do_bench(lambda xr=xr, p=path: w4a16_linear(xr, *args, path=p))
            fused.append(dict(common, M=rows, bf16_us=base * 1e3,
                              kernel=f"fused in-register decode ({path})", w4a16_us=t * 1e3,
                              speedup_vs_bf16=base / t, w4a16_eager_us=t * 1e3))
    return fused + [
        dict(common, kernel="prefill (dequant + cuBLAS)", w4a16_us=ms * 1e3,
             speedup_vs_bf16=bf16_ms / ms, weight_gbps=moved / (deq_ms * 1e-3) / 1e9,
             w4a16_eager_us=ms * 1e3),
        dict(common, kernel="dequant alone", w4a16_us=deq_ms * 1e3,
             speedup_vs_bf16=bf16_ms / deq_ms, weight_gbps=moved / (deq_ms * 1e-3) / 1e9,
             w4a16_eager_us=deq_ms * 1e3),
    ]


def sweep(device: str | torch.device = "cuda", splits: tuple[int, ...] = (1, 4, 8)
          ) -> list[dict[str, Any]]:
    """Batch-1 FP4 g128 GEMV time (CUDA-graph replays) for every config of the FP4 word kernel
    (``w4a16_gemv.FP4W_CONFIGS``) x K split, next to a
    read of the same packed bytes (``torch.sum`` over them as int32: what the memory system
    gives a plain streaming read) and bf16 ``F.linear``; one row per measurement."""
    from triton.testing import do_bench_cudagraph

    from qcompile.backends.triton import w4a16_gemv
    from qcompile.backends.triton.runtime import element_table
    from qcompile.formats import pack_codes, parse_format, quantize

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"the W4A16 sweep needs a CUDA device (got {dev})")
    torch.manual_seed(0)
    spec = parse_format("fp4_e2m1/g128")
    rows: list[dict[str, Any]] = []
    for n, k in SHAPES:
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev) * 0.02
        q = quantize(w, spec)
        packed = pack_codes(q.codes, 4)
        table = element_table(spec.elem, dev)
        words = packed.view(torch.int32)
        base = {"N": n, "K": k, "weight_bytes": packed.numel() + q.scale.numel() * 4}
        dense = w.to(torch.bfloat16)
        rows.append(dict(base, kernel="bf16_linear", us=1e3 * do_bench_cudagraph(
            lambda x=x, d=dense: torch.nn.functional.linear(x, d))))
        rows.append(dict(base, kernel="read_packed_sum", us=1e3 * do_bench_cudagraph(
            lambda t=words: t.sum(dtype=torch.int32))))
        for cfg in w4a16_gemv.FP4W_CONFIGS:
            for split in splits:
                def call(cfg=cfg, split=split, a=(x, packed, table, q.scale)):
                    return w4a16_gemv.w4a16_gemv1(*a, None, None, None, 128, None, True,
                                                  split=split, config=cfg)
                try:
                    call()
                    us = 1e3 * do_bench_cudagraph(call)
                except Exception as e:  # a config that does not launch is a result too
                    rows.append(dict(base, kernel="gemv1", split=split, config=str(cfg),
                                     error=f"{type(e).__name__}: {e}"[:300]))
                    continue
                rows.append(dict(base, kernel="gemv1", split=split, config=str(cfg), us=us))
        del w, dense, words
    for r in rows:
        if "us" in r:
            r["weight_gbps"] = r["weight_bytes"] / (r["us"] * 1e-6) / 1e9
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI: print (or write) the rows as JSON; exit 2 with a message without CUDA."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", help="write the JSON here as well")
    ap.add_argument("--sweep", action="store_true",
                    help="time every GEMV1 config x K split (FP4 g128) instead")
    args = ap.parse_args(argv)
    try:
        rows = sweep(args.device) if args.sweep else run(args.device)
    except RuntimeError as e:
        print(f"kernels_w4a16: {e}", file=sys.stderr)
        return 2
    text = json.dumps(rows, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
