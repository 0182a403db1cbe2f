"""Which calls of a compiled model run through the host plans, on a machine without a GPU.

A tiny random Llama is compiled with ``torch.compile(backend="qcompile")`` and a recipe, with
the stand-in CUDA driver of ``tests/fake_cuda.py``: the ``qcompile::`` ops take their CUDA
branches on CPU tensors, the kernels compile for sm_90 and the launcher does nothing (the
outputs hold garbage; only the host path runs). The model is called on ``--tokens`` tokens
twice, then twice on ``--tokens + 40``. For each plan module (``w4a16_plan``, ``w4a8_plan``,
``fp8_plan``, ``rows_plan``) the JSON gives, per call, how many op calls asked it and how many
it answered. A plan that follows a timed path choice (W4A16; W4A8 below 8192 rows on a GPU)
has no choice to follow here unless the default applies, which the counts show.

Usage::

    python benchmarks/plan_coverage.py [--recipe w4a8-m2] [--tokens 260] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

_ASKS = {"w4a16_plan": "prefill", "w4a8_plan": "prefill", "fp8_plan": "linear",
         "rows_plan": "quantize"}


def run(recipe: str, tokens: int) -> dict:
    """Compile, call four times; returns the JSON document (module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import fake_cuda

    fake_cuda.wrappers_as_on_gpu()
    fake_cuda.RECORD = False
    import importlib

    import qcompile
    from qcompile.testing import tiny_model

    counts: dict[str, list[int]] = {}
    for name, fn in _ASKS.items():
        mod = importlib.import_module(f"qcompile.backends.triton.{name}")
        real = getattr(mod, fn)
        counts[name] = [0, 0]

        def spy(*args, _real=real, _n=counts[name]):
            y = _real(*args)
            _n[0] += 1
            _n[1] += y is not None
            return y

        setattr(mod, fn, spy)
    torch.manual_seed(0)
    model = tiny_model("llama")
    qcompile.compile(model, recipe=recipe, lower="always")
    calls = []
    with torch.no_grad():
        for length in (tokens, tokens, tokens + 40, tokens + 40):
            for n in counts.values():
                n[:] = [0, 0]
            model(torch.randint(3, 256, (1, length)))
            calls.append({"tokens": length,
                          **{name: {"asked": n[0], "planned": n[1]}
                             for name, n in counts.items()}})
    return {"recipe": recipe, "model": "tiny llama", "device": "fake-cuda (stand-in driver)",
            "torch": torch.__version__, "calls": calls}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the JSON (and write it with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w4a8-m2")
    ap.add_argument("--tokens", type=int, default=260)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Real JIT kernels are needed (the interpreter is decided at import): run again.
        os.environ.pop("TRITON_INTERPRET")
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                  *(sys.argv[1:] if argv is None else argv)])
    text = json.dumps(run(args.recipe, args.tokens), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.flush()
    os._exit(0)  # Inductor's compile workers need not be joined


if __name__ == "__main__":
    sys.exit(main())
