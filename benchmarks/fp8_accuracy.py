"""Accuracy of FP8 tensor-core accumulation on CUDA: qcompile's GEMMs vs cuBLAS, both modes.

Hopper's FP8 MMA keeps about 14 significant bits in its accumulator. This measures, against a
float64 CPU reference of the same FP8 operands (unit scales, so only accumulation is measured):

* ``fp8_scaled_mm`` with fast accumulation (the default) and with the products promoted to fp32
  every ``PROMOTE_K`` (``fast_accum=False``);
* ``torch._scaled_mm`` (tensor-wise unit scales, fp32 out) with ``use_fast_accum`` off and on;
* ``w4a8_linear``'s fused kernel and its shift-then-GEMM path on FP4 M2 weights, both modes;

on two operand sets: per-row FP8 Gaussian rows, and FP4 weights whose group exponents span
eight binades (the ZeroQuant-FP M2 split). Each row gives ``err_rel_absmax`` (max error over
the output's absmax) and ``err_rel_abs_products`` (max of error over the sum of the absolute
products, the quantity ``qcompile.testing.FP8_MMA_REL`` bounds in the GPU tests).

Usage::

    python benchmarks/fp8_accuracy.py > fp8_accuracy.json
"""

from __future__ import annotations

import json

import torch

FP8 = torch.float8_e4m3fn


def _errors(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor) -> dict:
    err = (out.double().cpu() - ref).abs()
    return {"err_rel_absmax": float(err.max() / ref.abs().max()),
            "err_rel_abs_products": float((err / mag.clamp(min=1e-300)).max())}


def _gemms(a: torch.Tensor, w: torch.Tensor, w4a8: tuple | None) -> dict:
    """The GEMMs of ``a @ w.T`` with unit scales, fp32 out (``w4a8``: the packed weight,
    exponents and group size that ``w`` was shifted from)."""
    from qcompile.backends.triton.fp8_gemm import fp8_scaled_mm
    from qcompile.backends.triton.w4a8 import w4a8_linear

    dev = a.device
    ones_m, ones_n = torch.ones(a.shape[0], device=dev), torch.ones(w.shape[0], device=dev)
    one = torch.ones((), device=dev)
    f32 = torch.float32
    gemms = {
        "fp8_scaled_mm fast_accum=False": lambda: fp8_scaled_mm(
            a, ones_m, w, ones_n, out_dtype=f32, fast_accum=False),
        "fp8_scaled_mm (fast accumulation)": lambda: fp8_scaled_mm(a, ones_m, w, ones_n,
                                                                   out_dtype=f32),
        "torch._scaled_mm": lambda: torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one,
                                                     out_dtype=f32),
        "torch._scaled_mm use_fast_accum": lambda: torch._scaled_mm(
            a, w.t(), scale_a=one, scale_b=one, out_dtype=f32, use_fast_accum=True),
    }
    if w4a8 is not None:
        packed, gexp, group = w4a8
        for path in ("fused", "dequant"):
            for fast in (False, True):
                gemms[f"w4a8_linear {path}{'' if fast else ' fast_accum=False'}"] = (
                    lambda p=path, f=fast: w4a8_linear(a, ones_m, packed, gexp, ones_n, group,
                                                       out_dtype=f32, path=p, fast_accum=f))
    return gemms


def run(m: int = 2048, n: int = 1024, k: int = 4096, group: int = 128,
        device: str = "cuda") -> list[dict]:
    """Measure each GEMM's accumulation error on both operand sets.

    Args:
        m, n, k: The GEMM shape.
        group: FP4 group size of the W4A8 weights.
        device: "cuda"; "cpu" runs the kernels in the Triton interpreter (exact fp32: a check
            of this script, not of any hardware).

    Returns:
        One dict per (operand set, GEMM): ``data``, ``gemm``, and the two error ratios.

    Raises:
        RuntimeError: No CUDA device.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("benchmarks/fp8_accuracy.py measures GPU tensor cores; needs CUDA")
    from qcompile.backends.triton.w4a8 import w4a8_split_scales, w4a8_weight_fp8
    from qcompile.formats import pack_codes, parse_format, quantize

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    a = (x / (x.abs().amax(dim=1, keepdim=True) / 448.0)).to(FP8)
    w = torch.randn(n, k, generator=gen)
    b = (w / (w.abs().amax(dim=1, keepdim=True) / 448.0)).to(FP8)
    q = quantize(w * torch.exp2(torch.randint(-4, 4, (n, 1), generator=gen).float()),
                 parse_format(f"fp4_e2m1/g{group}/m2"))
    packed = pack_codes(q.codes, 4)
    gexp, _ = w4a8_split_scales(q.scale, q.outer)  # unit row scales below: the products alone
    w8 = w4a8_weight_fp8(packed, gexp, group, k)
    rows: list[dict] = []
    for data, wt in (("fp8 gaussian rows", b), (f"fp4 m2 g{group} shifted to fp8", w8)):
        ref = a.double() @ wt.double().T
        mag = a.double().abs() @ wt.double().abs().T
        w4a8 = (packed.to(dev), gexp.to(dev), group) if wt is w8 else None
        for name, fn in _gemms(a.to(dev), wt.to(dev), w4a8).items():
            try:
                rows.append({"data": data, "gemm": name, "m": m, "n": n, "k": k,
                             **_errors(fn(), ref, mag)})
            except Exception as exc:  # noqa: BLE001 - recorded, the others still run
                rows.append({"data": data, "gemm": name, "error": f"{type(exc).__name__}: {exc}"})
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="2048,1024,4096", help="M,N,K")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    m, n, k = (int(v) for v in args.shape.split(","))
    print(json.dumps(run(m, n, k, device=args.device), indent=1))
