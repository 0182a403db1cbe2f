"""SmolLM2-135M decode-step latency on ONNX Runtime CPU: fp32 vs INT4 MatMulNBits vs FP4 functions.

Each variant is exported with the KV cache; a 64-token prompt runs once, then single-token
decode steps (M = 1) with a growing cache are timed. Ratios are to the fp32 export (fused
attention/RMSNorm/RoPE, like every variant not marked ``unfused``) measured in the same run.
SmolLM2 ties its 49152 x 576 output head to the embedding: in fp32 the head is a fifth of the
weights a decode step reads, so the ``int8-head`` / ``int4-head`` variants quantize it too
(8- or 4-bit MatMulNBits). ORT folds constant subgraphs when a session starts, so the FP4 function path
(weights dequantized by standard ops) becomes fp32 MatMuls in memory; the ``no-folding``
variant keeps the dequantization in every step, which is what a runtime without constant
folding (or one that keeps weights packed) would pay.

Usage::

    python benchmarks/onnx_cpu.py [--threads 1] [--steps 32] [--rounds 3] [--out result.json]
    (``--out`` also writes a markdown table next to the JSON)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# name -> (pipeline or None for fp32, export options, session options). MatMulNBits runs at
# accuracy_level 4 (int8 activations in the kernel) unless the variant says fp32-compute
# (level 1, the export default: exact against the reference backend). Exports fuse attention,
# RMSNorm and RoPE into opset-23 ops unless the variant says unfused.
_INT4 = "quantize{w=int4/g128/asym}"
_NBITS4 = {"int4": "matmulnbits", "accuracy_level": 4}
VARIANTS = {
    "fp32": (None, {}, {}),
    "fp32-unfused": (None, {"fuse": False}, {}),
    "int4-matmulnbits": (f"{_INT4},cleanup", _NBITS4, {}),
    "int4-matmulnbits-unfused": (f"{_INT4},cleanup", {**_NBITS4, "fuse": False}, {}),
    "int4-matmulnbits-fp32-compute": (f"{_INT4},cleanup",
                                      {"int4": "matmulnbits", "accuracy_level": 1}, {}),
    "int4-matmulnbits+int8-head": (f"{_INT4},quantize{{w=int8/channel lm_head=true}},cleanup",
                                   _NBITS4, {}),
    "int4-matmulnbits+int8-head-fp32-compute": (
        f"{_INT4},quantize{{w=int8/channel lm_head=true}},cleanup",
        {"int4": "matmulnbits", "accuracy_level": 1}, {}),
    "int4-matmulnbits+int8-head-block64": (
        f"{_INT4},quantize{{w=int8/channel lm_head=true}},cleanup",
        {**_NBITS4, "nbits_block": 64}, {}),
    "int4-matmulnbits+int8-head-block32": (
        f"{_INT4},quantize{{w=int8/channel lm_head=true}},cleanup",
        {**_NBITS4, "nbits_block": 32}, {}),
    "int4-matmulnbits+int4-head": ("quantize{w=int4/g128/asym lm_head=true},cleanup",
                                   _NBITS4, {}),
    # fuse-linears: q/k/v and gate/up as one MatMulNBits each (4 instead of 7 per layer).
    "int4-matmulnbits+fuse-linears": (f"{_INT4},fuse-linears,cleanup", _NBITS4, {}),
    "int4-matmulnbits+int4-head+fuse-linears": (
        "quantize{w=int4/g128/asym lm_head=true},fuse-linears,cleanup", _NBITS4, {}),
    "fp4-afpq-matmulnbits": ("quantize{w=fp4_e2m1/g128/asym},cleanup",
                             {"fp4": "matmulnbits", "accuracy_level": 4}, {}),
    "fp4-afpq-functions": ("quantize{w=fp4_e2m1/g128/asym},cleanup", {}, {}),
    "fp4-afpq-functions-no-folding": ("quantize{w=fp4_e2m1/g128/asym},cleanup", {},
                                      {"no_folding": True}),
}


def _session(path: Path, threads: int, no_folding: bool = False):
    from qcompile.backends.onnx import OnnxLM

    lm = OnnxLM(path, threads=threads, disabled_optimizers=["ConstantFolding"] if no_folding
                else None)
    return lm


def _decode_times(lm, prompt: np.ndarray, steps: int, warmup: int = 3) -> list[float]:
    _, cache = lm.run(prompt)
    token = np.array([[int(prompt[0, -1])]], dtype=np.int64)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        logits, cache = lm.run(token, cache)
        elapsed = time.perf_counter() - start
        token = np.array([[int(np.argmax(logits[0, -1]))]], dtype=np.int64)
        if i >= warmup:
            times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    ap.add_argument("--steps", type=int, default=32,
                    help="timed decode steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all variants")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from qcompile.api import quantize_graph
    from qcompile.backends.onnx import export_onnx
    from qcompile.capture import capture
    from qcompile.models import load_model

    model, tok = load_model("smollm2-135m")
    text = "The history of the city begins in the early middle ages, when " * 8
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.prompt]
    prompt = np.array([ids], dtype=np.int64)
    result: dict = {"model": "smollm2-135m", "onnxruntime": ort.__version__,
                    "torch": torch.__version__, "threads": args.threads, "steps": args.steps,
                    "prompt_tokens": len(ids), "rounds": args.rounds, "variants": {}}
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        sessions, times = {}, {}
        for name in names:
            pipeline, export_opts, session_opts = VARIANTS[name]
            gm = capture(model)
            if pipeline:
                gm, _ = quantize_graph(gm, pipeline, progress=False)
            path = Path(tmp) / f"{name}.onnx"
            report = export_onnx(gm, path, kv_cache=True, **export_opts)
            start = time.perf_counter()
            sessions[name] = _session(path, args.threads, **session_opts)
            load = time.perf_counter() - start
            size = path.stat().st_size + sum(p.stat().st_size for p in Path(tmp).glob(
                f"{name}.onnx.data"))
            times[name] = []
            result["variants"][name] = {
                "pipeline": pipeline or "",
                "export_options": export_opts,
                "session_load_s": round(load, 3),
                "file_mb": round(size / 2**20, 1),
                "opset": report["opset"],
                "domains": report["domains"],
                "nodes": report["nodes"],
                "fused": {k: v for k, v in (report["fused"] or {}).items() if k != "skipped"},
            }
        # rounds interleave the variants, so a change of machine load hits all of them alike
        for _ in range(args.rounds):
            for name in names:
                times[name] += _decode_times(sessions[name], prompt, args.steps)
        for name in names:
            t = times[name]
            result["variants"][name].update({
                "decode_ms_median": round(1000 * statistics.median(t), 3),
                "decode_ms_mean": round(1000 * statistics.fmean(t), 3),
                "decode_ms_min": round(1000 * min(t), 3),
            })
            print(f"{name}: {result['variants'][name]['decode_ms_median']} ms/step",
                  file=sys.stderr)
    base = result["variants"].get("fp32", {}).get("decode_ms_median")
    if base:
        for entry in result["variants"].values():
            entry["speedup_vs_fp32"] = round(base / entry["decode_ms_median"], 3)
    text_out = json.dumps(result, indent=1)
    print(text_out)
    if args.out:
        Path(args.out).write_text(text_out)
        Path(args.out).with_suffix(".md").write_text(_markdown(result))
    return result


def _markdown(result: dict) -> str:
    lines = [f"SmolLM2-135M decode step (M = 1, {result['prompt_tokens']}-token prompt), ONNX "
             f"Runtime {result['onnxruntime']} CPU, {result['threads']} thread(s), median of "
             f"{result['steps']} steps x {result.get('rounds', 1)} rounds.", "",
             "| variant | ms/step | x fp32 | nodes | opset | MB |", "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['decode_ms_median']:.2f} | "
                     f"{v.get('speedup_vs_fp32', float('nan')):.2f} | {v['nodes']} | "
                     f"{v['opset']} | {v['file_mb']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
