"""Quantize inside ``torch.compile``: one line, your own model code, ``generate()`` and KV cache.

Usage::

    python examples/torch_compile.py                 # tiny random Llama, runs in seconds
    python examples/torch_compile.py --model smollm2 --recipe w4-afpq --tokens 20

It compiles the model in place with ``qcompile.compile`` (the same backend
``torch.compile(model, backend="qcompile", options={"recipe": ...})`` uses), generates greedily,
and prints the backend's counters: how often the pipeline ran, how many weights it quantized,
how many bytes the packed weights take, and graph breaks.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import qcompile


def _load(name: str):
    if name == "tiny":
        from qcompile.testing import ByteTokenizer, tiny_model

        return tiny_model("llama"), ByteTokenizer()
    from qcompile.models import load_model

    return load_model("smollm2-135m" if name == "smollm2" else name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a qcompile model name")
    parser.add_argument("--recipe", default="w4-afpq", help="qcompile recipe (qcompile recipes)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=12, help="new tokens to generate")
    parser.add_argument("--eager", action="store_true",
                        help="run the quantized graphs eagerly instead of with Inductor")
    args = parser.parse_args()

    model, tok = _load(args.model)
    ids = torch.tensor([tok.encode(args.prompt)])
    qcompile.compile(model, recipe=args.recipe, dynamic=True, inductor=not args.eager)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    seconds = time.perf_counter() - start
    stats = model.qcompile_backend.stats.as_dict()
    stats.pop("reports")
    stats.pop("per_weight")
    print(json.dumps({
        "model": args.model,
        "recipe": args.recipe,
        "text": tok.decode(out[0, ids.shape[1]:].tolist()),
        "seconds_including_compile": round(seconds, 2),
        "backend": stats,
    }, indent=1))


if __name__ == "__main__":
    main()
