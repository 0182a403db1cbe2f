"""The ``qcompile`` command line: eval, quantize, export, generate, passes, recipes."""

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

    ex = sub.add_parser("export", help="quantize a model and export it to ONNX")
    _add_model_args(ex, need_pipeline=False)
    ex.add_argument("--out", required=True, help="the .onnx file to write")
    ex.add_argument("--kv-cache", action="store_true",
                    help="decoder with past_key_values inputs and present outputs")
    ex.add_argument("--int4", choices=("matmulnbits", "dq"), default="matmulnbits",
                    help="INT4 weights: com.microsoft MatMulNBits (default) or blocked "
                         "DequantizeLinear + MatMul")
    ex.add_argument("--fp4", choices=("function", "matmulnbits", "dq"), default="function",
                    help="FP4 weights: qcompile function (default), two exact 4-bit "
                         "MatMulNBits, or opset-23 FLOAT4E2M1 DequantizeLinear")
    ex.add_argument("--int8", choices=("matmulnbits", "dq"), default="matmulnbits",
                    help="weight-only INT8: 8-bit MatMulNBits (default) or DequantizeLinear "
                         "(W8A8 linears always get standard QDQ)")
    ex.add_argument("--accuracy-level", type=int, default=1, choices=range(5),
                    help="MatMulNBits accuracy_level (default 1: fp32 compute, exact; "
                         "4: int8 compute on CPU, faster)")
    ex.add_argument("--nbits-block", type=int, default=None,
                    help="largest MatMulNBits block (power of two >= 16; scales repeated): "
                         "finer int8 activation blocks at accuracy level 4")
    ex.add_argument("--no-fuse", action="store_true",
                    help="keep attention, RMSNorm and RoPE as basic ops (opset < 23)")
    ex.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                    help="write weights to <out>.data (auto: when above 64 MiB)")

    gen = sub.add_parser("generate", help="greedy generation from an exported ONNX model")
    gen.add_argument("--onnx", required=True, help="an .onnx file written by `qcompile export`")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    gen.add_argument("--tokenizer", default=None,
                     help="tokenizer directory (default: <out>.tokenizer written by export)")
    gen.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    gen.add_argument("--json", action="store_true", help="print the JSON object compactly")

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


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from qcompile.backends.onnx import export_onnx

    t_all = time.perf_counter()
    pipeline = _pipeline(args)
    gm, tok, meta, seconds = _load(args)
    gm, text_pipeline, report = _run_pipeline(args, pipeline, gm, tok, seconds)
    previous = meta.get("pipeline", "")
    gm.meta["source_model"] = args.model
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    t0 = time.perf_counter()
    onnx_report = export_onnx(gm, args.out, kv_cache=args.kv_cache, int4=args.int4,
                              int8=args.int8, fp4=args.fp4,
                              accuracy_level=args.accuracy_level,
                              nbits_block=args.nbits_block, fuse=not args.no_fuse,
                              external_data=external)
    seconds["export"] = time.perf_counter() - t0
    tokenizer_dir = None
    if tok is not None and hasattr(tok, "save_pretrained"):
        out = Path(args.out)
        tokenizer_dir = str(out.with_name(out.name + ".tokenizer"))
        tok.save_pretrained(tokenizer_dir)
    seconds["total"] = time.perf_counter() - t_all
    return {"model": args.model,
            "pipeline": ",".join(p for p in (previous, text_pipeline) if p),
            "out": args.out, "tokenizer": tokenizer_dir, "onnx": onnx_report,
            "report": report, "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from qcompile.errors import ArtifactError

    model_path = Path(args.onnx)
    if not model_path.is_file():
        raise ArtifactError(f"no ONNX model at {args.onnx}")
    tok_dir = Path(args.tokenizer or model_path.with_name(model_path.name + ".tokenizer"))
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise ArtifactError(f"no tokenizer at {tok_dir}; pass --tokenizer DIR")
    from transformers import AutoTokenizer

    from qcompile.backends.onnx import OnnxLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    t0 = time.perf_counter()
    lm = OnnxLM(model_path, threads=args.threads)
    load = time.perf_counter() - t0
    ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    new = lm.generate(ids, args.max_new_tokens, eos_token_id=tok.eos_token_id)
    wall = time.perf_counter() - t0
    return {"onnx": args.onnx, "prompt": args.prompt, "kv_cache": bool(lm.past),
            "tokens": new, "text": tok.decode(new),
            "seconds": {"load": round(load, 3), "generate": round(wall, 3)},
            "tokens_per_second": round(len(new) / wall, 2) if wall > 0 else None}


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
        elif args.command == "export":
            result = _export(args)
        elif args.command == "generate":
            result = _generate(args)
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
