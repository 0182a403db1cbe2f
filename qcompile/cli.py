"""The ``qcompile`` command line: eval, quantize, passes, recipes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from qcompile.errors import QCompileError

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser, need_pipeline: bool) -> None:
    p.add_argument("--model", required=True,
                   help="smollm2-135m, an HF model directory, a .gguf file, or a qcompile "
                        "artifact directory")
    g = p.add_mutually_exclusive_group(required=need_pipeline)
    g.add_argument("--recipe", help="a named pipeline (see `qcompile recipes`)")
    g.add_argument("--pipeline", help="pipeline text, e.g. 'quantize{w=fp4_e2m1/g128/asym}'")
    p.add_argument("--json", action="store_true",
                   help="print only the JSON object (no progress bars)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")


def _parser() -> argparse.ArgumentParser:
    from qcompile import __version__

    ap = argparse.ArgumentParser(prog="qcompile", description=__doc__)
    ap.add_argument("--version", action="version", version=f"qcompile {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="quantize a model and measure perplexity")
    _add_model_args(ev, need_pipeline=False)
    ev.add_argument("--text", default="wikitext2-test",
                    help="evaluation text: wikitext2-test (default), wikitext2-valid, or a file")
    ev.add_argument("--windows", type=int, default=40, help="number of windows (default 40)")
    ev.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    ev.add_argument("--baseline", action="store_true",
                    help="also measure the unquantized model on the same windows")

    qz = sub.add_parser("quantize", help="quantize a model and save an artifact directory")
    _add_model_args(qz, need_pipeline=True)
    qz.add_argument("--out", required=True, help="directory to write the artifact to")

    sub.add_parser("passes", help="list passes with their options and defaults")
    sub.add_parser("recipes", help="list recipes with their pipeline text")
    return ap


def _progress(args: argparse.Namespace) -> bool:
    return not (args.json or args.quiet)


def _pipeline(args: argparse.Namespace) -> Any:
    """The parsed pipeline of --recipe/--pipeline (None if neither), checked before loading."""
    from qcompile.api import resolve_pipeline

    if args.recipe is None and args.pipeline is None:
        return None
    return resolve_pipeline(args.recipe, args.pipeline)


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], dict[str, float]]:
    """(graph, tokenizer, metadata, seconds) for --model, capturing an HF model."""
    from qcompile.serialize import is_artifact, load_quantized

    if not _progress(args):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if is_artifact(args.model):
        gm, tok, meta = load_quantized(args.model)
        seconds["load"] = time.perf_counter() - t0
        return gm, tok, meta, seconds
    from qcompile.capture import capture
    from qcompile.models import load_model

    model, tok = load_model(args.model)
    seconds["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gm = capture(model)
    seconds["capture"] = time.perf_counter() - t0
    return gm, tok, {"source_model": args.model}, seconds


def _run_pipeline(args, pipeline, gm, tok, seconds) -> tuple[Any, str, dict | None]:
    from qcompile.api import quantize_graph

    if pipeline is None:
        return gm, "", None
    t0 = time.perf_counter()
    gm, report = quantize_graph(gm, pipeline, tokenizer=tok, progress=_progress(args))
    seconds["quantize"] = time.perf_counter() - t0
    return gm, str(pipeline), report


def _eval(args: argparse.Namespace) -> dict[str, Any]:
    from qcompile.backends.reference import compile_reference
    from qcompile.data import load_text
    from qcompile.evaluate import perplexity

    t_all = time.perf_counter()
    pipeline = _pipeline(args)
    text = load_text(args.text)
    gm, tok, meta, seconds = _load(args)
    if tok is None:
        raise QCompileError(f"model {args.model!r} has no tokenizer to evaluate with")
    out: dict[str, Any] = {"model": args.model, "text": args.text, "windows": args.windows,
                           "seqlen": args.seqlen}
    if args.baseline:
        # Measured before the pipeline runs: passes rewrite the graph in place.
        t0 = time.perf_counter()
        base = perplexity(compile_reference(gm, args.device), tok, text, seqlen=args.seqlen,
                          windows=args.windows, progress=_progress(args))
        seconds["baseline"] = time.perf_counter() - t0
        out["baseline_ppl"] = base["ppl"]
    gm, text_pipeline, report = _run_pipeline(args, pipeline, gm, tok, seconds)
    t0 = time.perf_counter()
    res = perplexity(compile_reference(gm, args.device), tok, text, seqlen=args.seqlen,
                     windows=args.windows, progress=_progress(args))
    seconds["eval"] = time.perf_counter() - t0
    out["ppl"] = res["ppl"]
    out["tokens"] = res["tokens"]
    if "baseline_ppl" in out:
        out["ratio"] = out["ppl"] / out["baseline_ppl"]
    out["pipeline"] = text_pipeline
    if meta.get("pipeline"):
        out["artifact_pipeline"] = meta["pipeline"]
    out["report"] = report
    seconds["total"] = time.perf_counter() - t_all
    out["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return out


def _quantize(args: argparse.Namespace) -> dict[str, Any]:
    from qcompile.serialize import save_quantized

    t_all = time.perf_counter()
    pipeline = _pipeline(args)
    gm, tok, meta, seconds = _load(args)
    gm, text_pipeline, report = _run_pipeline(args, pipeline, gm, tok, seconds)
    previous = meta.get("pipeline", "")
    meta = {**meta, "pipeline": ",".join(p for p in (previous, text_pipeline) if p),
            "report": report}
    t0 = time.perf_counter()
    save_quantized(gm, args.out, tokenizer=tok, metadata=meta)
    seconds["save"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    return {"model": args.model, "pipeline": text_pipeline, "out": args.out, "report": report,
            "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _passes() -> dict[str, Any]:
    from qcompile.manager import jsonable
    from qcompile.registry import available_passes

    out = {}
    for name, cls in available_passes().items():
        opts = {}
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else None
            opts[f.name] = {"type": str(f.type), "default": jsonable(default)}
        out[name] = {"summary": cls.summary, "options": opts}
    return out


def _recipes() -> dict[str, Any]:
    from qcompile.recipes import list_recipes

    return {r.name: {"pipeline": r.pipeline, "description": r.description}
            for r in list_recipes()}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qcompile`` console script.

    Returns:
        Exit status: 0 on success, 2 on a qcompile error (one line on stderr).
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "eval":
            result = _eval(args)
        elif args.command == "quantize":
            result = _quantize(args)
        elif args.command == "passes":
            result = _passes()
        else:
            result = _recipes()
    except QCompileError as e:
        print(f"qcompile: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=None if getattr(args, "json", False) else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
