"""Export SmolLM2-135M quantized with a recipe to ONNX (with a KV cache) and generate with ORT.

    python examples/onnx_generate.py --recipe w4-afpq --prompt "The capital of France is"

The same from the command line::

    qcompile export --model smollm2-135m --recipe w4-afpq --kv-cache --out smollm2-afpq.onnx
    qcompile generate --onnx smollm2-afpq.onnx --prompt "The capital of France is"
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from qcompile.backends.onnx import OnnxLM, export_onnx
from qcompile.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w4-afpq", help="a qcompile recipe (default w4-afpq)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default=None, help="where to keep the .onnx (default: a temp dir)")
    args = ap.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.out or Path(tmp) / "model.onnx")
        report = export_onnx(model, path, recipe=args.recipe, kv_cache=True)
        print(f"exported {path} (opset {report['opset']}, domains {report['domains']}, "
              f"{report['initializer_bytes'] / 2**20:.0f} MiB of weights)")
        lm = OnnxLM(path)
        ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        new = lm.generate(ids, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        wall = time.perf_counter() - start
        print(args.prompt + tokenizer.decode(new))
        print(f"{len(new)} tokens in {wall:.2f} s with the KV cache on ONNX Runtime CPU")


if __name__ == "__main__":
    main()
