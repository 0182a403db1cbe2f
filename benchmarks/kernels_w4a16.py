"""W4A16 Triton kernel micro-benchmark: batch-1 (decode) GEMV against bf16 ``F.linear``.

For FP4 E2M1 g128 (symmetric) and FP4 AFPQ g128 weights, times ``w4a16_linear`` at M = 1 (what
the autotuner picks, tile and K split) next to bf16 ``torch.nn.functional.linear`` on the same
shape in the same run, on the Llama-3-8B projections a decode step runs (q/k/v and gate/up
fused: 6144 x 4096, 4096 x 4096, 28672 x 4096, 4096 x 14336, N x K) and the issue's 8192 x
8192 and 28672 x 8192. Reports microseconds, the speedup over bf16 and the weight-read
bandwidth (packed codes + fp32 scales over the kernel time), one ``layer`` row per format and
kernel summing the four projections (the GEMV time of one decoder layer's step), and
``layer-chain`` rows: the four back to back in one graph with the decode fusions, launched
ordinarily and as programmatic dependents (``pdl``), next to bf16's four. Three
kernels: ``gemv1`` (FMA products; what ``w4a16_linear`` runs), ``gemv1-mma`` (products on
tensor cores, ``qcompile.backends.triton.w4a16_gemv_mma``) and ``gemv1-tma`` (the FMA
products, persistent, weight tiles by TMA copies, ``w4a16_gemv_tma``; each config's cold time
in ``config_cold_us``), each with its own tuned pick.

Two timings, both CUDA-graph replays (the GPU time of the call, without the host's launch
path, as a decode step captured in a graph runs it):

- ``cold``: with L2 emptied before each call (``qcompile.backends.triton.cold_bench``), as a
  decode step reads each weight once per token. The speedups that matter for decode.
- ``hot``: the same call replayed back to back (``triton.testing.do_bench_cudagraph``): a
  weight smaller than L2 (50 MB on an H100; an FP4 8192 x 8192 weight is 34 MB, its bf16 one
  134 MB) is then read from L2 after the first replay, so this flatters small FP4 weights.

``--prefill``: rows at M = 2048 instead: ``w4a16_linear`` (the weight decoded once to bf16,
then cuBLAS) and the decode alone, against bf16 ``F.linear`` (``do_bench``; ``weight_gbps`` there
is the decode's bytes moved per second), and the GEMMs that decode in registers.

Usage::

    python benchmarks/kernels_w4a16.py [--out w4a16.json] [--prefill | --sweep]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

#: Llama-3-8B's projections at decode, N x K (q/k/v and gate/up fused by fuse-linears).
LAYER_SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
#: The issue's shapes (N, K).
SHAPES: list[tuple[int, int]] = [(8192, 8192), (28672, 8192)]
FORMATS: list[str] = ["fp4_e2m1/g128", "fp4_e2m1/g128/asym"]


def _timings(fn: Callable[[], object]) -> dict[str, float]:
    """``{"cold_us", "hot_us"}`` of ``fn`` (CUDA-graph replays; module docstring)."""
    from triton.testing import do_bench_cudagraph

    from qcompile.backends.triton.cold_bench import cold_times

    fn()
    return {"cold_us": 1e3 * statistics.median(cold_times(fn)),
            "hot_us": 1e3 * do_bench_cudagraph(fn)}


def _picked(tuned: Any) -> str:
    """The tile and split an autotuner picked in its last call (a config's name as is)."""
    if isinstance(tuned, str):
        return tuned
    cfg = getattr(tuned, "best_config", None)
    return "" if cfg is None else ", ".join(
        [f"{k}={v}" for k, v in cfg.kwargs.items()] + [f"warps={cfg.num_warps}"])


def _tma_keys(path_tuning: Any, n: int, k: int, g: int) -> list[tuple]:
    return [key for key in path_tuning.timings() if key[:4] == ("w4a16-gemv1-tma", n, k, g)]


def _tma_pick(path_tuning: Any, n: int, k: int, g: int) -> str:
    """The TMA GEMV config kept for this shape (its path-tuning choice)."""
    keys = _tma_keys(path_tuning, n, k, g)
    return path_tuning.choice(keys[-1]) or "" if keys else ""


def _tma_timings(path_tuning: Any, n: int, k: int, g: int) -> dict[str, float | str]:
    """Each TMA GEMV config's cold time for this shape (or why it was not timed)."""
    keys = _tma_keys(path_tuning, n, k, g)
    return path_tuning.timings()[keys[-1]] if keys else {}


def run(device: str | torch.device = "cuda",
        write: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Time the batch-1 GEMVs; one row per (format, shape), a ``layer`` row per format and
    the ``layer-chain`` rows (``write``, if given, gets the rows before the chains too: a run
    cut off by a time limit keeps them).

    Raises:
        RuntimeError: ``device`` is not an available CUDA device (timings need a GPU).
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"the W4A16 kernel benchmark needs a CUDA device (got {dev}, "
                           f"CUDA available: {torch.cuda.is_available()})")
    from qcompile.backends.triton import path_tuning, w4a16_gemv, w4a16_gemv_mma, w4a16_gemv_tma
    from qcompile.backends.triton.runtime import element_table
    from qcompile.backends.triton.w4a16 import w4a16_linear, w4a16_linear_ref
    from qcompile.formats import pack_codes, parse_format, quantize

    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    layer_args: dict[tuple[str, str], tuple] = {}  # (format, projection) -> kernel arguments
    bf16_layer: dict[str, torch.Tensor] = {}
    shapes = list(LAYER_SHAPES.items()) + [(f"{n}x{k}", (n, k)) for n, k in SHAPES]
    for name, (n, k) in shapes:
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev) * 0.02
        dense = w.to(torch.bfloat16)
        bf16 = _timings(lambda x=x, d=dense: torch.nn.functional.linear(x, d))
        for fmt in FORMATS:
            spec = parse_format(fmt)
            q = quantize(w, spec)
            args = (pack_codes(q.codes, 4), element_table(spec.elem, dev), q.scale, q.scale_neg,
                    q.zero, q.outer, spec.group_size)
            ref = w4a16_linear_ref(x, *args)
            if name in LAYER_SHAPES:
                layer_args[fmt, name] = args
            read = (args[0], q.scale, q.scale_neg, q.zero, q.outer)  # what the kernel streams
            nbytes = sum(t.numel() * t.element_size() for t in read if t is not None)
            words = w4a16_gemv._words(args[0], k)
            # "gemv1": what w4a16_linear runs at M = 1 (FMA products); "gemv1-mma": the
            # tensor-core kernel (w4a16_gemv_mma), benchmarked next to it before it is used.
            kernels = {
                "gemv1": (lambda x=x, a=args: w4a16_linear(x, *a),
                          lambda g=spec.group_size: w4a16_gemv._tuned_fp4w(g, None)),
                "gemv1-mma": (lambda x=x, wd=words, q=q, g=spec.group_size:
                              w4a16_gemv_mma.w4a16_gemv1_mma(x, wd, q.scale, q.scale_neg,
                                                             q.outer, g, None),
                              lambda g=spec.group_size: w4a16_gemv_mma._tuned(g, None)),
                # The persistent TMA-fed kernel (w4a16_gemv_tma): its configs are timed by
                # path_tuning (cold L2), each one's time listed in the row.
                "gemv1-tma": (lambda x=x, wd=words, q=q, g=spec.group_size:
                              w4a16_gemv_tma.w4a16_gemv1_tma(x, wd, q.scale, q.scale_neg,
                                                             q.outer, g, None),
                              lambda n=n, k=k, g=spec.group_size: _tma_pick(path_tuning, n, k,
                                                                            g))}
            for kernel, (call, tuner) in kernels.items():
                if kernel == "gemv1-tma" and not w4a16_gemv_tma.tma_eligible(
                        x, words, spec.group_size):
                    continue
                out = call()  # also runs the autotuner once
                w4 = _timings(call)
                err = ((out.float() - ref.float()).abs().max()
                       / ref.float().abs().max()).item()
                rows.append({
                    "format": fmt, "shape": name, "kernel": kernel, "M": 1, "N": n, "K": k,
                    "device": torch.cuda.get_device_name(dev), "picked": _picked(tuner()),
                    "w4a16_us": w4["cold_us"], "bf16_us": bf16["cold_us"],
                    "speedup_vs_bf16": bf16["cold_us"] / w4["cold_us"],
                    "w4a16_hot_us": w4["hot_us"], "bf16_hot_us": bf16["hot_us"],
                    "speedup_vs_bf16_hot": bf16["hot_us"] / w4["hot_us"],
                    "weight_bytes": nbytes,
                    "weight_gbps": nbytes / (w4["cold_us"] * 1e-6) / 1e9,
                    "max_rel_err_vs_ref": err,
                })
                if kernel == "gemv1-tma":
                    rows[-1]["config_cold_us"] = _tma_timings(path_tuning, n, k,
                                                              spec.group_size)
        if name in LAYER_SHAPES:
            bf16_layer[name] = dense
        del w, dense
    for fmt, kernel in [(f, kn) for f in FORMATS for kn in ("gemv1", "gemv1-mma", "gemv1-tma")]:
        layer = [r for r in rows if r["format"] == fmt and r["kernel"] == kernel
                 and r["shape"] in LAYER_SHAPES]
        if len(layer) == len(LAYER_SHAPES):
            w4_us = sum(r["w4a16_us"] for r in layer)
            bf_us = sum(r["bf16_us"] for r in layer)
            nbytes = sum(r["weight_bytes"] for r in layer)
            rows.append({"format": fmt, "shape": "layer", "kernel": f"{kernel} x 4 (one layer)",
                         "M": 1, "w4a16_us": w4_us, "bf16_us": bf_us,
                         "speedup_vs_bf16": bf_us / w4_us, "weight_bytes": nbytes,
                         "weight_gbps": nbytes / (w4_us * 1e-6) / 1e9,
                         "device": layer[0]["device"]})
    if write is not None:
        write(rows)
    rows += layer_chain(layer_args, bf16_layer, dev)
    return rows


def layer_chain(layer_args: dict[tuple[str, str], tuple], bf16_layer: dict[str, torch.Tensor],
                dev: torch.device) -> list[dict[str, Any]]:
    """One decoder layer's four GEMVs back to back in one CUDA graph on a cold L2, as a
    decode step runs them with the decode fusions (RMSNorm into ``qkv`` and ``gate_up``, the
    SiLU gate into ``down``, residual adds into ``o`` and ``down``), per format and kernel,
    launched ordinarily and as programmatic dependents (``runtime.GEMV_PDL``: each GEMV
    prefetches its first weight lines while the one before it finishes). bf16: the four
    ``F.linear`` alone. Same autotuned tiles in both launch modes (tuned at the first call)."""
    from qcompile.backends.triton import pdl, runtime
    from qcompile.backends.triton.cold_bench import cold_times
    from qcompile.backends.triton.gemv_fusion import GemvFusion
    from qcompile.backends.triton.w4a16 import w4a16_linear

    hidden, inter = LAYER_SHAPES["o"][1], LAYER_SHAPES["down"][1]
    gen = torch.Generator(device=dev).manual_seed(1)
    h = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    attn = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    gate = torch.randn(1, inter, device=dev, dtype=torch.bfloat16, generator=gen)
    up = torch.randn(1, inter, device=dev, dtype=torch.bfloat16, generator=gen)
    gamma = torch.ones(hidden, device=dev, dtype=torch.bfloat16)
    norm = GemvFusion(rms_weight=gamma, rms_eps=1e-5)

    def fused(fmt: str) -> Callable[[], object]:
        a = {name: layer_args[fmt, name] for name in LAYER_SHAPES}

        def step() -> object:
            w4a16_linear(h, *a["qkv"], fusion=norm)
            h2 = w4a16_linear(attn, *a["o"], fusion=GemvFusion(residual=h))
            w4a16_linear(h2, *a["gate_up"], fusion=norm)
            return w4a16_linear(gate, *a["down"], fusion=GemvFusion(up=up, residual=h2))
        return step

    def dense() -> object:
        d = bf16_layer
        torch.nn.functional.linear(h, d["qkv"])
        h2 = torch.nn.functional.linear(attn, d["o"])
        torch.nn.functional.linear(h2, d["gate_up"])
        return torch.nn.functional.linear(gate, d["down"])

    dense()
    bf16_us = 1e3 * statistics.median(cold_times(dense))
    rows: list[dict[str, Any]] = []
    old_mma, old_pdl = runtime.GEMV1_MMA, runtime.GEMV_PDL
    try:
        for fmt in FORMATS:
            for kernel in ("gemv1", "gemv1-mma", "gemv1-tma"):
                runtime.GEMV1_MMA = {"gemv1": False, "gemv1-mma": True, "gemv1-tma": "tma"}[kernel]
                for use_pdl in (False, True):
                    runtime.GEMV_PDL = use_pdl
                    step = fused(fmt)
                    step()  # tunes each shape at its first call (both modes share the pick)
                    us = 1e3 * statistics.median(cold_times(step))
                    rows.append({
                        "format": fmt, "shape": "layer-chain", "kernel": kernel,
                        "pdl": use_pdl and pdl.available(dev), "M": 1, "w4a16_us": us,
                        "bf16_us": bf16_us, "speedup_vs_bf16": bf16_us / us,
                        "device": torch.cuda.get_device_name(dev)})
    finally:
        runtime.GEMV1_MMA, runtime.GEMV_PDL = old_mma, old_pdl
    return rows


def prefill(device: str | torch.device = "cuda") -> list[dict[str, Any]]:
    """The prefill rows (:func:`_prefill_rows`) on the issue's shapes."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"the W4A16 prefill benchmark needs a CUDA device (got {dev})")
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device=dev) * 0.02
        rows += _prefill_rows(w, w.to(torch.bfloat16), dev)
        del w
    return rows


def _prefill_rows(w: torch.Tensor, dense: torch.Tensor, dev: torch.device,
                  m: int = 2048) -> list[dict[str, Any]]:
    """The prefill paths at ``m`` rows (AFPQ g128) against bf16 ``F.linear``: ``w4a16_linear``
    as it runs by default (the path timed fastest, ``path_tuning``), decode W once into bf16
    then cuBLAS (``path="dequant"``), the decode alone (``w4a16_dequant``, as tuned and with
    each FP4 kernel) with its bytes (packed codes and scales read, bf16 weight written), and the fused GEMMs that decode
    in registers: the tiled one (``path="gemm"``) and the one with swapped operands
    (``path="swap"``, the decoded weight as the MMA's register operand), at ``m`` and 128."""
    from triton.testing import do_bench

    from qcompile.backends.triton import path_tuning
    from qcompile.backends.triton.runtime import element_table
    from qcompile.backends.triton.w4a16 import w4a16_linear
    from qcompile.backends.triton.w4a16_dequant import FP4_KERNELS, w4a16_dequant
    from qcompile.formats import pack_codes, parse_format, quantize

    n, k = w.shape
    fmt = "fp4_e2m1/g128/asym"
    spec = parse_format(fmt)
    q = quantize(w, spec)
    args = (pack_codes(q.codes, 4), element_table(spec.elem, dev), q.scale, q.scale_neg,
            q.zero, q.outer, spec.group_size)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    bf16_ms = do_bench(lambda: torch.nn.functional.linear(x, dense))
    ms = do_bench(lambda: w4a16_linear(x, *args, path="dequant"))
    tuned_ms = do_bench(lambda: w4a16_linear(x, *args))  # the path timed fastest for it
    deq_ms = do_bench(lambda: w4a16_dequant(*args[:6], spec.group_size, k, torch.bfloat16))
    # Each FP4 decode kernel alone (w4a16_dequant times both per shape and keeps the faster).
    deq_kernels = {kn: do_bench(lambda kn=kn: w4a16_dequant(*args[:6], spec.group_size, k,
                                                            torch.bfloat16, kernel=kn))
                   for kn in FP4_KERNELS}
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
    chosen = [p for key, p in path_tuning.choices().items() if key[:4] == ("w4a16", m, n, k)]
    return fused + [
        dict(common, kernel=f"w4a16_linear, path tuned ({'/'.join(chosen) or 'default'})",
             w4a16_us=tuned_ms * 1e3, speedup_vs_bf16=bf16_ms / tuned_ms,
             w4a16_eager_us=tuned_ms * 1e3),
        dict(common, kernel="prefill (dequant + cuBLAS)", w4a16_us=ms * 1e3,
             speedup_vs_bf16=bf16_ms / ms, weight_gbps=moved / (deq_ms * 1e-3) / 1e9,
             w4a16_eager_us=ms * 1e3),
        dict(common, kernel="dequant alone", w4a16_us=deq_ms * 1e3,
             speedup_vs_bf16=bf16_ms / deq_ms, weight_gbps=moved / (deq_ms * 1e-3) / 1e9,
             w4a16_eager_us=deq_ms * 1e3),
    ] + [dict(common, kernel=f"dequant alone ({kn} kernel)", w4a16_us=t * 1e3,
              speedup_vs_bf16=bf16_ms / t, weight_gbps=moved / (t * 1e-3) / 1e9,
              w4a16_eager_us=t * 1e3) for kn, t in deq_kernels.items()]


def sweep(device: str | torch.device = "cuda", splits: tuple[int, ...] | None = None
          ) -> list[dict[str, Any]]:
    """Batch-1 FP4 g128 GEMV time on a cold L2 for every config of the FP4 word kernel
    (``w4a16_gemv.FP4W_CONFIGS``) x K split (default ``w4a16_gemv.SPLITS``), next to a read of
    the same packed bytes (``torch.sum`` over them as int32: what the memory system gives a
    plain streaming read) and bf16 ``F.linear``, on the layer shapes and the issue's; one row
    per measurement."""
    from qcompile.backends.triton import w4a16_gemv
    from qcompile.backends.triton.cold_bench import cold_times
    from qcompile.backends.triton.runtime import element_table
    from qcompile.formats import pack_codes, parse_format, quantize

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"the W4A16 sweep needs a CUDA device (got {dev})")
    torch.manual_seed(0)
    spec = parse_format("fp4_e2m1/g128")
    rows: list[dict[str, Any]] = []

    def cold_us(fn: Callable[[], object]) -> float:
        fn()
        return 1e3 * statistics.median(cold_times(fn))

    for n, k in list(LAYER_SHAPES.values()) + SHAPES:
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev) * 0.02
        q = quantize(w, spec)
        packed = pack_codes(q.codes, 4)
        table = element_table(spec.elem, dev)
        words = packed.view(torch.int32)
        base = {"N": n, "K": k, "weight_bytes": packed.numel() + q.scale.numel() * 4}
        dense = w.to(torch.bfloat16)
        rows.append(dict(base, kernel="bf16_linear", us=cold_us(
            lambda x=x, d=dense: torch.nn.functional.linear(x, d))))
        rows.append(dict(base, kernel="read_packed_sum", us=cold_us(
            lambda t=words: t.sum(dtype=torch.int32))))
        for cfg in w4a16_gemv.FP4W_CONFIGS:
            for split in splits or w4a16_gemv.SPLITS:
                def call(cfg=cfg, split=split, a=(x, packed, table, q.scale)):
                    return w4a16_gemv.w4a16_gemv1(*a, None, None, None, 128, None, True,
                                                  split=split, config=cfg)
                try:
                    us = cold_us(call)
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
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true",
                      help="time every GEMV1 config x K split (FP4 g128) instead")
    mode.add_argument("--prefill", action="store_true", help="the M = 2048 rows instead")
    args = ap.parse_args(argv)
    def write(rows: list[dict[str, Any]]) -> str:
        text = json.dumps(rows, indent=2)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return text

    try:
        rows = (sweep(args.device) if args.sweep else prefill(args.device) if args.prefill
                else run(args.device, write))
    except RuntimeError as e:
        print(f"kernels_w4a16: {e}", file=sys.stderr)
        return 2
    print(write(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
