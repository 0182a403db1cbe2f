"""Accuracy of the Hadamard + quantize kernel's left-product variants (``had_quant``).

For each ``had_quant.DEFAULT_PARTS`` (0: fp32 butterflies, 1: one fp16 part, 2: two fp16
parts, the default, 3: three bf16 parts) and each row dtype, the rotated rows of
``act_quant(x, "fp8_e4m3/token", size, out="rotated")`` are compared with the unfused
``qcompile.ops.hadamard`` op (fp32 butterflies, rounded to the dtype) and with the exact
rotation in fp64, and the FP8 codes with those of the reference rows. ``x`` is heavy-tailed
like LLM activations (row scales, every seventh of the columns times 20), seeded.

On CUDA this measures the tensor cores' numerics; on the CPU (``TRITON_INTERPRET=1`` is set
when no GPU is found) the interpreter's, where products are plain fp32.

Usage::

    python benchmarks/had_accuracy.py [--rows 16] [--size 8192] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported


def run(rows: int, size: int, seed: int = 1) -> list[dict[str, Any]]:
    """One dict per (dtype, parts): percentages of outputs and codes that differ from the
    reference's, and the largest error against the exact rotation relative to the row's
    largest value."""
    from qcompile.backends.triton import had_quant
    from qcompile.backends.triton.act_quant import act_quant
    from qcompile.ops import hadamard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, size, generator=g) * torch.rand(rows, 1, generator=g).mul(4)
    x[..., :: max(1, size // 7)] *= 20
    out = []
    default = had_quant.DEFAULT_PARTS
    try:
        for dtype in (torch.bfloat16, torch.float16):
            xd = x.to(dtype).to(device)
            exact = hadamard(xd.double(), size)
            ref = hadamard(xd, size)
            ref_q, _ = act_quant(ref, "fp8_e4m3/token", 0, out="codes")
            rowmax = exact.abs().amax(-1, keepdim=True)
            for parts in (0, 1, 2, 3):
                had_quant.DEFAULT_PARTS = parts
                rot = act_quant(xd, "fp8_e4m3/token", size, out="rotated")
                q, _ = act_quant(xd, "fp8_e4m3/token", size, out="codes")
                out.append({
                    "dtype": str(dtype).removeprefix("torch."), "parts": parts,
                    "device": device, "rows": rows, "size": size,
                    "outputs_off_reference_pct": 100 * float((rot != ref).float().mean()),
                    "codes_off_reference_pct":
                        100 * float((q.float() != ref_q.float()).float().mean()),
                    "max_error_over_row_max":
                        float(((rot.double() - exact).abs() / rowmax).max()),
                })
    finally:
        had_quant.DEFAULT_PARTS = default
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: print one line per variant (and write the JSON with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = run(args.rows, args.size)
    for r in rows:
        print(f"{r['dtype']:9s} parts {r['parts']}  outputs off {r['outputs_off_reference_pct']:8.4f} %"
              f"  codes off {r['codes_off_reference_pct']:7.4f} %"
              f"  max error / row max {r['max_error_over_row_max']:.3g}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
