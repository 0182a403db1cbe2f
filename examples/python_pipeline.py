"""Quantize SmolLM2-135M with a text pipeline from Python and compare perplexity.

Run: python examples/python_pipeline.py [--windows 8]
"""

from __future__ import annotations

import argparse
import copy

from qcompile.api import quantize_graph
from qcompile.backends.reference import compile_reference
from qcompile.capture import capture
from qcompile.data import load_text
from qcompile.evaluate import perplexity
from qcompile.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="quantize{w=fp4_e2m1/g128/asym},cleanup")
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    fp32 = capture(model)
    text = load_text("wikitext2-test")
    gm, report = quantize_graph(copy.deepcopy(fp32), args.pipeline, tokenizer=tok)
    for name, g in (("fp32", fp32), (report["pipeline"], gm)):
        ppl = perplexity(compile_reference(g), tok, text, windows=args.windows)["ppl"]
        print(f"{name}: ppl {ppl:.3f}")
    for entry in report["passes"]:
        print(entry["name"], entry["seconds"], "s", entry["facts"].get("bits_per_weight"))


if __name__ == "__main__":
    main()
