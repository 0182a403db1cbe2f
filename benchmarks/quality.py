"""Quality grid: perplexity of many pipelines on one model, as JSON, markdown and a plot.

Usage::

    python benchmarks/quality.py --model smollm2-135m --grid rtn --out out/quality
    python benchmarks/quality.py --grid gptq --out out/quality     # same files, more cells

Writes ``<out>.json`` (one cell per pipeline: ppl, ratio to fp32, bits per weight including
scale and LoRC-factor overhead, seconds), ``<out>.md`` and ``<out>.png`` (ppl vs bits per
weight, one line per format family; needs matplotlib, ``pip install -e .[bench]``).
Resumable: cells already in the JSON file are skipped. Calibration (gptq) reads
wikitext2-valid; evaluation reads wikitext2-test.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


def _gptq(fmt: str, act: str = "", lorc: bool = False) -> str:
    """``gptq{w=F [clip=search]}[,lorc],quantize{w=F [act]}`` for ``fmt = "F [clip=search]"``."""
    middle = ",lorc{rank=8 bits=8}" if lorc else ""
    w = fmt.split()[0]
    quant = f"w={w} {act}".strip()
    return f"gptq{{w={fmt}}}{middle},quantize{{{quant}}}"


# QuaRot rotation without the q/k Hadamard (W4A16/W4A8 keep 16/8-bit attention inputs).
_ROT = "fuse-norms,rotate{r3=none},"

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
        ("fp3-asym", "quantize{w=fp3_e1m1/g128/asym}"),
        ("fp3-sym", "quantize{w=fp3_e1m1/g128}"),
        ("a8-int8", "quantize{a=int8/token}"),
        ("a8-fp8", "quantize{a=fp8_e4m3/token}"),
        ("w4a8-m1", "quantize{w=fp4_e2m1/g128/po2 a=fp8_e4m3/token}"),
        ("w4a8-m2", "quantize{w=fp4_e2m1/g128/m2 a=fp8_e4m3/token}"),
        # What limits W4A4 on a rotated model: each part alone, and finer activation groups.
        ("rot-a4-token", "fuse-norms,rotate{ro=hadamard},quantize{a=fp4_e2m1/token/asym}"),
        ("rot-a4-g16", "fuse-norms,rotate{ro=hadamard},quantize{a=fp4_e2m1/g16/asym}"),
        ("rot-kv4", "fuse-norms,rotate{ro=hadamard},quantize{kv=fp4_e2m1/token/asym}"),
        ("rot-w4-channel", "fuse-norms,rotate{ro=hadamard},"
                           "quantize{w=fp4_e2m1/channel/asym clip=search}"),
        ("rot-w4a4-nvfp4", "fuse-norms,rotate{ro=hadamard},quantize{w=nvfp4 a=nvfp4 kv=nvfp4}"),
    ],
    "gptq": [
        ("fp4-asym-gptq", "recipe:afpq-w4-gptq"),
        ("int4-asym-gptq", "recipe:w4-int4-gptq"),
        ("w4a8-m2-gptq", "recipe:zqfp-w4a8-m2"),
        ("w4a8-m2-gptq-lorc", "recipe:zqfp-w4a8-m2-lorc"),
        ("w4a8-m1-gptq", "recipe:zqfp-w4a8-m1"),
        ("w4a4kv4-fp4-rot-gptq", "recipe:quarot-w4a4-gptq"),
        ("w4a4kv4-nvfp4-rot-gptq", "recipe:quarot-w4a4-nvfp4-gptq"),
        ("w4a4kv4-fp4-spin-gptq", "recipe:spinquant-w4a4-gptq"),
        ("w4a4kv4-nvfp4-spin-gptq", "recipe:spinquant-w4a4-nvfp4-gptq"),
        ("fp3-asym-gptq", "recipe:afpq-w3-gptq"),
        ("int3-asym-gptq", _gptq("int3/g128/asym clip=search")),
        ("fp3-sym-gptq", _gptq("fp3_e1m1/g128 clip=search")),
        ("fp4-sym-gptq", _gptq("fp4_e2m1/g128 clip=search")),
        ("w4a8-m1-gptq-lorc", _gptq("fp4_e2m1/g128/po2", "a=fp8_e4m3/token", lorc=True)),
        ("w4a4kv4-int4-rot-gptq", "recipe:quarot-w4a4-int4-gptq"),
        ("w4a4kv4-fp4-rot", "recipe:quarot-w4a4"),
        ("w4a4kv4-int4-rot", "recipe:quarot-w4a4-int4"),
        ("w4a8-m2-lorc", "lorc{w=fp4_e2m1/g128/m2 rank=8 bits=8},"
                         "quantize{w=fp4_e2m1/g128/m2 a=fp8_e4m3/token}"),
        ("fp4-asym-gptq", _gptq("fp4_e2m1/g64/asym clip=search")),
        ("fp4-sym-gptq", _gptq("fp4_e2m1/g64 clip=search")),
        ("fp4-asym-gptq", _gptq("fp4_e2m1/channel/asym clip=search")),
        ("fp4-sym-gptq", _gptq("fp4_e2m1/channel clip=search")),
        ("nf3-asym-gptq", _gptq("nf3/g128/asym clip=search")),
        ("fp3-e2m0-asym-gptq", _gptq("fp3_e2m0/g128/asym clip=search")),
        ("fp4-asym-gptq-s128", _gptq("fp4_e2m1/g128/asym clip=search samples=128")),
        ("fp4-asym-gptq-r3", _gptq("fp4_e2m1/g128/asym clip=search rounds=3")),
        ("fp4-asym-gptq-fp", _gptq("fp4_e2m1/g128/asym clip=search target=fp")),
        ("fp4-asym-gptq-s128-fp", _gptq("fp4_e2m1/g128/asym clip=search samples=128 target=fp")),
        ("fp4-asym-gptq-lorc", _gptq("fp4_e2m1/g128/asym clip=search", lorc=True)),
        ("fp4-asym-rot-gptq", _ROT + _gptq("fp4_e2m1/g128/asym clip=search")),
        ("int4-asym-rot-gptq", _ROT + _gptq("int4/g128/asym clip=search")),
        ("w4a8-m2-rot-gptq", _ROT + _gptq("fp4_e2m1/g128/m2", "a=fp8_e4m3/token")),
        ("w4a8-m2-rot-gptq-lorc", _ROT + _gptq("fp4_e2m1/g128/m2", "a=fp8_e4m3/token",
                                               lorc=True)),
        ("nf3-asym-rot-gptq", _ROT + _gptq("nf3/g128/asym clip=search")),
        ("w4a8-m1-rot-gptq", _ROT + _gptq("fp4_e2m1/g128/po2", "a=fp8_e4m3/token")),
        ("w4a8-m1-rot-gptq-lorc", _ROT + _gptq("fp4_e2m1/g128/po2", "a=fp8_e4m3/token",
                                               lorc=True)),
        ("int3-asym-rot-gptq", _ROT + _gptq("int3/g128/asym clip=search")),
        ("w4a4kv4-fp4-rot-gptq-g128", "fuse-norms,rotate{ro=hadamard},"
         "gptq{w=fp4_e2m1/g128/asym clip=search},quantize{w=fp4_e2m1/g128/asym "
         "a=fp4_e2m1/token/asym kv=fp4_e2m1/token/asym}"),
        ("w4a8-m2-gptq-clip-lorc", _gptq("fp4_e2m1/g128/m2 clip=search", "a=fp8_e4m3/token",
                                          lorc=True)),
        ("w4a8-m2-gptq-clip-lorc16", "gptq{w=fp4_e2m1/g128/m2 clip=search},"
         "lorc{rank=16 bits=8},quantize{w=fp4_e2m1/g128/m2 a=fp8_e4m3/token}"),
        ("w4a8-m2-gptq-clip-r3-lorc", "gptq{w=fp4_e2m1/g128/m2 clip=search rounds=3},"
         "lorc{rank=8 bits=8},quantize{w=fp4_e2m1/g128/m2 a=fp8_e4m3/token}"),
        ("w4a8-m2-gptq-clip-s128-lorc16", "gptq{w=fp4_e2m1/g128/m2 clip=search samples=128},"
         "lorc{rank=16 bits=8},quantize{w=fp4_e2m1/g128/m2 a=fp8_e4m3/token}"),
        ("w4a8-m2-gptq-clip-s128-lorc", "gptq{w=fp4_e2m1/g128/m2 clip=search samples=128},"
         "lorc{rank=8 bits=8},quantize{w=fp4_e2m1/g128/m2 a=fp8_e4m3/token}"),
        ("w4a8-m2-gptq-clip-lorc8-fp32", "gptq{w=fp4_e2m1/g128/m2 clip=search},"
         "lorc{rank=8 bits=0},quantize{w=fp4_e2m1/g128/m2 a=fp8_e4m3/token}"),
        ("w4a8-m1-gptq-clip", _gptq("fp4_e2m1/g128/po2 clip=search", "a=fp8_e4m3/token")),
        ("w4a8-m2-gptq-clip", _gptq("fp4_e2m1/g128/m2 clip=search", "a=fp8_e4m3/token")),
        ("w4a8-m2-rot-gptq-clip", _ROT + _gptq("fp4_e2m1/g128/m2 clip=search",
                                               "a=fp8_e4m3/token")),
        ("w4a8-m2-asym-rot-gptq", _ROT + _gptq("fp4_e2m1/g128/asym/m2 clip=search",
                                               "a=fp8_e4m3/token")),
        ("fp3-sym-rot-gptq", _ROT + _gptq("fp3_e1m1/g128 clip=search")),
    ],
}


def _bits(report: dict) -> float | None:
    """Stored bits per weight of the quantized linears, LoRC factors included."""
    bits = extra = None
    for entry in report["passes"]:
        facts = entry["facts"]
        if facts.get("bits_per_weight") is not None:
            bits = facts["bits_per_weight"]
        if entry["name"] == "lorc":
            factor_bits = facts["factor_bits"]
            # INT factors carry one fp32 scale per row; r is small, so count it roughly.
            per = (factor_bits + 32 / 8) if isinstance(factor_bits, int) else 32
            extra = facts["extra_params_ratio"] * per
    if bits is None:
        return None
    return round(bits + (extra or 0.0), 4)


def _plot(cells: dict, baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for c in cells.values():
        if c["bits_per_weight"] is not None:
            lines.setdefault(c["family"], []).append((c["bits_per_weight"], c["ppl"]))
    fig, ax = plt.subplots(figsize=(9, 6))
    for family, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=family)
    ax.axhline(baseline, color="black", linestyle="--", label="fp32")
    ax.set_xlabel("bits per weight (scales and LoRC factors included)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    ap.add_argument("--families", default="", help="comma-separated family names to run")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    args = ap.parse_args(argv)
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("the plot needs matplotlib: pip install -e '.[bench]' (or pass --no-plot)")

    from qcompile.api import quantize_graph
    from qcompile.backends.reference import compile_reference
    from qcompile.capture import capture
    from qcompile.data import load_text
    from qcompile.evaluate import perplexity
    from qcompile.models import load_model
    from qcompile.recipes import get_recipe

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
    families = [s for s in args.families.split(",") if s]
    for family, pipeline in GRIDS[args.grid]:
        if pipeline in run["cells"] or (only and not any(s in pipeline for s in only)):
            continue
        if families and family not in families:
            continue
        text_of = (get_recipe(pipeline.removeprefix("recipe:")).pipeline
                   if pipeline.startswith("recipe:") else pipeline)
        t0 = time.perf_counter()
        gm, report = quantize_graph(copy.deepcopy(base_gm), text_of, tokenizer=tok,
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
    if not args.no_plot:
        _plot(run["cells"], baseline, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
