"""Which calls of a compiled model run through the host plans, on a machine without a GPU.

A tiny random Llama is compiled with ``torch.compile(backend="qcompile")`` and a recipe, with
the stand-in CUDA driver of ``tests/fake_cuda.py``: the ``qcompile::`` ops take their CUDA
branches on CPU tensors, the kernels compile for sm_90 and the launcher does nothing (the
outputs hold garbage; only the host path runs). The model is called on ``--tokens`` tokens
twice, then twice on ``--tokens + 40``, then it decodes ``--decode`` steps with a dynamic KV
cache after a 16-token prompt (as ``generate()`` does without CUDA graphs). For each plan
module (``w4a16_plan``, ``w4a8_plan``, ``fp8_plan``, ``rows_plan``, and for decoding
``gemv_plan`` and ``attention_plan``) the JSON gives, per call and per decode step, how many
op calls asked it and how many it answered. A plan that follows a timed path choice (W4A16;
W4A8 below 8192 rows on a GPU) has no choice to follow here unless the default applies, which
the counts show.

Usage::

    python benchmarks/plan_coverage.py [--recipe w4a8-m2] [--tokens 260] [--decode 5] [--out F]
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


def run(recipe: str, tokens: int, decode: int = 5) -> dict:
    """Compile, call four times, decode ``decode`` steps; returns the JSON document (module
    docstring)."""
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
    from qcompile.backends.triton import attention_plan, gemv_plan

    for mod in (gemv_plan, attention_plan):  # run() asked, _relaunch() answered
        n = counts[mod.__name__.rsplit(".", 1)[1]] = [0, 0]

        def asked(*args, _real=mod.run, _n=n, **kwargs):
            _n[0] += 1
            return _real(*args, **kwargs)

        def answered(*args, _real=mod._relaunch, _n=n):
            _n[1] += 1
            return _real(*args)

        mod.run, mod._relaunch = asked, answered
    calls, steps = [], []

    def count(into: list, **what) -> None:
        into.append({**what, **{name: {"asked": n[0], "planned": n[1]}
                                for name, n in counts.items()}})
        for n in counts.values():
            n[:] = [0, 0]

    from transformers import DynamicCache

    with torch.no_grad():
        for length in (tokens, tokens, tokens + 40, tokens + 40):
            model(torch.randint(3, 256, (1, length)))
            count(calls, tokens=length)
        cache = DynamicCache()
        ids = torch.randint(3, 256, (1, 16))
        model(ids, past_key_values=cache, use_cache=True)
        for n in counts.values():
            n[:] = [0, 0]
        for step in range(1, decode + 1):
            model(ids[:, -1:], past_key_values=cache, use_cache=True)
            count(steps, step=step)
    return {"recipe": recipe, "model": "tiny llama", "device": "fake-cuda (stand-in driver)",
            "torch": torch.__version__, "calls": calls, "decode_steps": steps}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the JSON (and write it with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w4a8-m2")
    ap.add_argument("--tokens", type=int, default=260)
    ap.add_argument("--decode", type=int, default=5, help="decode steps after the calls")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Real JIT kernels are needed (the interpreter is decided at import): run again.
        os.environ.pop("TRITON_INTERPRET")
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                  *(sys.argv[1:] if argv is None else argv)])
    text = json.dumps(run(args.recipe, args.tokens, args.decode), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.flush()
    os._exit(0)  # Inductor's compile workers need not be joined


if __name__ == "__main__":
    sys.exit(main())
