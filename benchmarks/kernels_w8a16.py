"""W8A16 (8-bit weight-only) linears against bf16 cuBLAS on the same shape (CUDA).

Llama-3 shapes in bf16: the batch-1 GEMV on a square layer (8192 x 8192 weight, a 70B-style
o_proj), the MLP's 28672 x 8192 and the output head (128256 x 4096, the 8-bit head of a W4
recipe such as ``w4-fp4-head8``), then the same square layer at 16 rows (the GEMV's last M),
128 rows (the tiled GEMM) and 2048 rows (a prefill: decode once, then cuBLAS). Formats: INT8
per channel, FP8 E4M3 per channel and INT8 asymmetric per 128. Every call is timed on a cold
L2 (:func:`qcompile.backends.triton.cold_bench.cold_times`, median; hot ``do_bench`` where a
call cannot be captured in a CUDA graph, marked ``cold: false``), as in a decode step where
the other layers' weights have evicted the cache, with bf16 ``F.linear`` timed the same way
in the same run.

Each row has ``w8a16_us``, ``bf16_us``, ``speedup_vs_bf16`` (bf16's time over ours),
``weight_gbps`` (the 8-bit codes and scales over our time: the batch-1 rate against the
memory's), ``route`` (gemv / gemm / dequant: the one the first call timed fastest, from 2
rows; by M for one row), ``route_us`` (each route's cold or hot time at that first call,
or why it was not timed; None for one row), ``config`` (the autotuned tile the route ran:
for the GEMV whether it kept the 2-D accumulator, ``ACC2``) and ``max_rel_err`` against
:func:`qcompile.backends.triton.w8a16.w8a16_linear_ref` (relative to the output's absmax).

Usage::

    python benchmarks/kernels_w8a16.py [--out w8a16.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

#: (M, N, K) timed per format.
SHAPES = ((1, 8192, 8192), (1, 28672, 8192), (1, 128256, 4096), (16, 8192, 8192),
          (128, 8192, 8192), (2048, 8192, 8192))
FORMATS = ("int8/channel", "fp8_e4m3/channel", "int8/g128/asym")


def _time(fn) -> tuple[float, bool]:
    """Median µs of ``fn`` on a cold L2, or hot if it cannot be captured; (µs, cold)."""
    from qcompile.backends.triton.cold_bench import cold_us

    return cold_us(fn)


def _picked(w8, route: str) -> str | None:
    """The tile the autotuner ran last for ``route`` (the GEMV's ``ACC2`` among them), or None
    (the interpreter runs one fixed tile; the dequant route's tile is fixed)."""
    tuner = {"gemv": w8._GEMV, "gemm": w8._GEMM}.get(route)
    best = getattr(tuner, "best_config", None)
    return None if best is None or w8.interpreting() else str(best)


def _weight(fmt: str, n: int, k: int, device: str) -> tuple:
    """``(codes, scale, zero, outer, group_size, elem)`` of a random weight on ``device``."""
    from qcompile.formats import parse_format, quantize

    spec = parse_format(fmt)
    gen = torch.Generator(device=device).manual_seed(n + k)
    q = quantize(torch.randn(n, k, device=device, generator=gen) * 0.02, spec)
    gs = spec.group_size if spec.granularity == "group" else k
    return q.codes, q.scale, q.zero, q.outer, gs, spec.elem


def run(shapes=SHAPES, formats=FORMATS, device: str = "cuda", bench=None,
        log=None) -> list[dict[str, Any]]:
    """Time every format on every shape (module docstring); one dict per (format, shape).

    Args:
        shapes: ``(M, N, K)`` triples.
        formats: Weight formats (``qcompile.formats`` text).
        device: ``"cuda"``, or ``"cpu"`` (tests: the Triton interpreter, with ``bench``).
        bench: ``fn -> (µs, cold)``; default: :func:`_time` (CUDA).
        log: A text stream each row is written to as one JSON line as soon as it is timed
            (a run cut off by a time limit keeps what it measured), or None.

    Raises:
        RuntimeError: No CUDA device and no stand-in timer (the interpreter would time
            Python, not the kernel).
    """
    if bench is None:
        if not torch.cuda.is_available():
            raise RuntimeError("benchmarks/kernels_w8a16.py needs a CUDA GPU: the Triton "
                               "interpreter on CPU measures Python overhead, not the kernel")
        bench = _time
    import torch.nn.functional as F

    from qcompile.backends.triton import path_tuning
    from qcompile.backends.triton import w8a16 as w8

    name = torch.cuda.get_device_name() if device == "cuda" else device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    bf16: dict[tuple[int, int, int], float] = {}
    for fmt in formats:
        for m, n, k in shapes:
            w = _weight(fmt, n, k, device)
            gen = torch.Generator(device=device).manual_seed(m)
            x = torch.randn(m, k, device=device, generator=gen).to(dtype)
            if (m, n, k) not in bf16:
                dense = torch.randn(n, k, device=device, generator=gen).to(dtype) * 0.02
                bf16[(m, n, k)] = bench(lambda x=x, d=dense: F.linear(x, d))[0]
                del dense
            ref = w8.w8a16_linear_ref(x, *w[:5], w[5]).float()
            out = w8.w8a16_linear(x, *w[:5], w[5]).float()
            err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            us, cold = bench(lambda x=x, w=w: w8.w8a16_linear(x, *w[:5], w[5]))
            key = w8.route_key(m, n, k, min(w[4], k), dtype, w[5], w[2] is not None,
                               w[3] is not None, False)
            route = path_tuning.choice(key) or w8.default_route(m, w[4], k)
            nbytes = sum(t.numel() * t.element_size() for t in w[:4] if t is not None)
            rows.append({"op": "w8a16_linear", "format": fmt, "M": m, "N": n, "K": k,
                         "dtype": str(dtype).removeprefix("torch."), "route": route, "w8a16_us": us,
                         "bf16_us": bf16[(m, n, k)], "speedup_vs_bf16": bf16[(m, n, k)] / us,
                         "weight_gbps": nbytes / us / 1e3, "cold": cold,
                         "route_us": path_tuning.timings().get(key),
                         "config": _picked(w8, route),
                         "max_rel_err": err, "device": name})
            if log is not None:
                print(json.dumps(rows[-1]), file=log, flush=True)
            del w, x
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here as well as to stdout")
    args = parser.parse_args(argv)
    rows = run(log=sys.stderr)
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
