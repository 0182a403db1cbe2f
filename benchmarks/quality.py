"""Quality grid: perplexity of many pipelines on one model, as JSON and a markdown table.

Usage::

    python benchmarks/quality.py --model smollm2-135m --grid rtn --out out/quality

Writes ``<out>.json`` (one cell per pipeline: ppl, ratio to fp32, bits per weight, seconds)
and ``<out>.md``. Resumable: cells already in the JSON file are skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

GRIDS: dict[str, list[tuple[str, str]]] = {
    # (family, pipeline text) cells; family groups lines in tables/plots.
    "rtn": [
        ("int4-sym", "quantize{w=int4/g128}"),
        ("int4-asym", "quantize{w=int4/g128/asym}"),
        ("int4-asym", "quantize{w=int4/g64/asym}"),
        ("int4-asym-clip", "quantize{w=int4/g128/asym clip=search}"),
        ("fp4-sym", "quantize{w=fp4_e2m1/g128}"),
        ("fp4-asym", "quantize{w=fp4_e2m1/g128/asym}"),
        ("fp4-asym", "quantize{w=fp4_e2m1/g64/asym}"),
        ("fp4-asym-clip", "quantize{w=fp4_e2m1/g128/asym clip=search}"),
        ("fp4-sym", "quantize{w=fp4_e2m1/g64}"),
        ("fp4-sym", "quantize{w=fp4_e2m1/channel}"),
        ("fp4-asym", "quantize{w=fp4_e2m1/channel/asym}"),
        ("fp4-po2", "quantize{w=fp4_e2m1/g128/po2}"),
        ("fp4-m2", "quantize{w=fp4_e2m1/g128/m2}"),
        ("nf4", "quantize{w=nf4/g64}"),
        ("nf4-asym", "quantize{w=nf4/g64/asym}"),
        ("mxfp4", "quantize{w=mxfp4}"),
        ("nvfp4", "quantize{w=nvfp4}"),
        ("w8a8-int8", "quantize{w=int8/channel a=int8/token}"),
        ("w8a8-fp8", "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token}"),
        ("w4a8", "quantize{w=fp4_e2m1/g128/asym a=fp8_e4m3/token}"),
        ("int3-asym", "quantize{w=int3/g128/asym}"),
        ("nf3-asym", "quantize{w=nf3/g128/asym}"),
    ],
}


def _bits(report: dict) -> float | None:
    for entry in report["passes"]:
        bits = entry["facts"].get("bits_per_weight")
        if bits is not None:
            return bits
    return None


def _markdown(cells: dict, baseline: float) -> str:
    lines = [f"fp32 baseline ppl: {baseline:.3f}", "",
             "| family | pipeline | bits/weight | ppl | ratio to fp32 | seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for c in cells.values():
        bits = "" if c["bits_per_weight"] is None else f"{c['bits_per_weight']:.3f}"
        lines.append(f"| {c['family']} | `{c['pipeline']}` | {bits} | {c['ppl']:.3f} | "
                     f"{c['ratio']:.4f} | {c['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the grid; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--grid", default="rtn", choices=sorted(GRIDS))
    ap.add_argument("--only", default="", help="comma-separated substrings of pipelines to run")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from qcompile.api import quantize_graph
    from qcompile.backends.reference import compile_reference
    from qcompile.capture import capture
    from qcompile.data import load_text
    from qcompile.evaluate import perplexity
    from qcompile.models import load_model

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    state = json.loads(path.read_text()) if path.exists() else {}
    key = f"{args.model}|{args.windows}x{args.seqlen}"
    run = state.setdefault(key, {"cells": {}})
    progress = not args.quiet
    model, tok = load_model(args.model)
    base_gm = capture(model)
    text = load_text("wikitext2-test")

    def ppl(gm) -> float:
        return perplexity(compile_reference(gm), tok, text, seqlen=args.seqlen,
                          windows=args.windows, progress=progress)["ppl"]

    if "baseline_ppl" not in run:
        run["baseline_ppl"] = ppl(base_gm)
        path.write_text(json.dumps(state, indent=1))
    baseline = run["baseline_ppl"]
    only = [s for s in args.only.split(",") if s]
    for family, pipeline in GRIDS[args.grid]:
        if pipeline in run["cells"] or (only and not any(s in pipeline for s in only)):
            continue
        t0 = time.perf_counter()
        gm, report = quantize_graph(copy.deepcopy(base_gm), pipeline, tokenizer=tok,
                                    progress=progress)
        t_quant = time.perf_counter() - t0
        value = ppl(gm)
        run["cells"][pipeline] = {
            "family": family, "pipeline": report["pipeline"], "ppl": value,
            "ratio": value / baseline, "bits_per_weight": _bits(report),
            "seconds": time.perf_counter() - t0, "quantize_seconds": t_quant,
        }
        path.write_text(json.dumps(state, indent=1))
        print(json.dumps(run["cells"][pipeline]), file=sys.stderr)
    out.with_suffix(".md").write_text(_markdown(run["cells"], baseline))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
