"""Kernel benchmarks (CUDA): every Triton kernel against its baseline, measured in one run.

Usage (on a GPU machine)::

    python benchmarks/kernels.py --out out/kernels            # kernels only
    python benchmarks/kernels.py --out out/kernels --ppl      # + SmolLM2 lowered vs reference

Writes ``<out>.json`` (one row per measurement: kernel, shape, µs, baseline µs, ratio, and
TFLOP/s or GB/s where meaningful) and ``<out>.md``. Baselines are timed in the same process
with ``triton.testing.do_bench``: cuBLAS bf16 (``F.linear``), cuBLAS FP8
(``torch._scaled_mm`` rowwise), a plain copy of the same bytes and, for decode attention, the
unlowered graph's repeat + SDPA. The per-family modules (``kernels_w4a16.py``,
``kernels_w8a16.py``, ``kernels_fp8.py``, ``kernels_act.py``, ``kernels_attention.py``) hold the measurements; this
script runs them all and adds the perplexity check of the lowering: SmolLM2 through the
reference ops vs through ``lower-triton`` kernels, same pipeline, on the GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

FAMILIES = ("kernels_w4a16", "kernels_w8a16", "kernels_fp8", "kernels_act", "kernels_attention")
PPL_PIPELINES = (
    "quantize{w=fp4_e2m1/g128/asym},cleanup",
    "quantize{w=int4/g128/asym},cleanup",
    "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token},cleanup",
    "quantize{w=fp4_e2m1/g128/m2 a=fp8_e4m3/token},cleanup",
    "recipe:quarot-w4a4",
    "recipe:w4-fp4-head8",
)


def kernel_rows(families: tuple[str, ...] = FAMILIES,
                on_family: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run each family's ``run()`` (each needs CUDA and refuses clearly without it).

    ``on_family`` gets the rows so far after each family: the caller writes them, so a run cut
    off by its time limit keeps the families it finished.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    rows: list[dict] = []
    for name in families:
        start = time.perf_counter()
        try:
            got = importlib.import_module(name).run()
        except Exception as exc:  # one family's failure must not lose the others' rows
            got = [{"error": f"{type(exc).__name__}: {str(exc)[:300]}"}]
        for r in got:
            r.setdefault("family", name.removeprefix("kernels_"))
        rows += got
        print(f"{name}: {len(got)} rows in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if on_family is not None:
            on_family(rows)
    return rows


def ppl_rows(windows: int = 40, seqlen: int = 512, dtype: str = "bfloat16") -> list[dict]:
    """SmolLM2 perplexity per pipeline: reference ops vs ``lower-triton`` kernels (CUDA)."""
    import torch

    from qcompile.data import load_text
    from qcompile.models import load_model

    if not torch.cuda.is_available():
        raise SystemExit("the perplexity check of the lowering needs CUDA")
    model, tok = load_model("smollm2-135m", dtype=getattr(torch, dtype))
    model = model.cuda()
    text = load_text("wikitext2-test")
    rows = []
    for pipe in PPL_PIPELINES:
        try:
            rows.append(_ppl_row(model, tok, text, pipe, windows, seqlen, dtype))
        except Exception as exc:  # one pipeline's failure must not lose the others' rows
            rows.append({"family": "smollm2-ppl", "pipeline": pipe, "dtype": dtype,
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(f"{pipe}: " + (f"ref {rows[-1]['ppl_reference']:.4f} lowered "
                             f"{rows[-1]['ppl_lowered']:.4f}" if "error" not in rows[-1]
                             else rows[-1]["error"]), file=sys.stderr)
    return rows


def _ppl_row(model, tok, text: str, pipe: str, windows: int, seqlen: int, dtype: str) -> dict:
    """One pipeline: quantize, perplexity through the reference ops, lower, perplexity again."""
    from qcompile.api import quantize_graph
    from qcompile.backends.reference import compile_reference
    from qcompile.capture import capture
    from qcompile.evaluate import perplexity
    from qcompile.recipes import get_recipe

    text_pipe = get_recipe(pipe.removeprefix("recipe:")).pipeline if pipe.startswith(
        "recipe:") else pipe
    try:
        graph = capture(model)
    except Exception as exc:  # a torch/transformers pair that keeps no dynamic length
        print(f"dynamic capture failed ({str(exc)[:120]}); static {seqlen}", file=sys.stderr)
        graph = capture(model, example_seq=seqlen, dynamic_seq=False)
    gm, _ = quantize_graph(graph, text_pipe, tokenizer=tok, progress=False)
    ref = perplexity(compile_reference(gm, fold=False), tok, text, seqlen=seqlen, device="cuda",
                     windows=windows, progress=False)
    gm, report = quantize_graph(gm, "lower-triton,cleanup", progress=False)
    low = perplexity(compile_reference(gm, fold=False), tok, text, seqlen=seqlen, device="cuda",
                     windows=windows, progress=False)
    facts = report["passes"][0]["facts"]
    return {
        "family": "smollm2-ppl", "pipeline": pipe, "dtype": dtype,
        "ppl_reference": ref["ppl"], "ppl_lowered": low["ppl"],
        "rel_diff": low["ppl"] / ref["ppl"] - 1,
        "lowered": {k: facts[k] for k in ("w4a16", "fp8", "w4a8", "act")},
        "not_lowered": len(facts["not_lowered"]),
        "seconds_reference": ref["seconds"], "seconds_lowered": low["seconds"],
    }


def _markdown(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/kernels")
    ap.add_argument("--ppl", action="store_true", help="also SmolLM2 reference vs lowered")
    ap.add_argument("--only-ppl", action="store_true")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--families", default=",".join(f.removeprefix("kernels_") for f in FAMILIES),
                    help="comma-separated subset of w4a16, fp8, act")
    args = ap.parse_args(argv)
    families = tuple(f"kernels_{f.strip()}" for f in args.families.split(",") if f.strip())
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from w4a16, fp8, act")
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the kernels are CUDA Triton kernels)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass

    def write(rows: list[dict]) -> None:
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(f"{meta}\n\n" + _markdown(rows))

    rows = [] if args.only_ppl else kernel_rows(families, on_family=write)
    if args.ppl or args.only_ppl:
        rows += ppl_rows(args.windows)
    write(rows)
    print(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
