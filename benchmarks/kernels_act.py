"""Fused per-token FP8 activation quantize kernel vs a plain copy of the same tensor (CUDA).

Times ``act_quant(x, "fp8_e4m3/token", had_size, out="codes")`` on an ``8192 x 8192`` bf16
``x`` with ``had_size`` 8192 (the whole row rotated) and 0, and ``y.copy_(x)`` of the same
bytes in the same run (the memory-bound floor: the kernel reads the same 2 bytes per element
and writes 1 plus a scale per row). Output: one dict per measurement, ``us`` the median of
``triton.testing.do_bench`` and ``ratio_to_copy`` relative to the copy; with the Hadamard,
every variant of the kernel's left product (``variant``; the first row is the default), and
the default variant under each of ``had_quant``'s autotune configs (``config``: warps, stages,
programs per SM, L2 prefetch ``AHEAD`` rows; ``picked``: the autotuner's choice), launched
directly.

``--kronecker``: instead, one Kronecker (Paley) block per row (:data:`KRON_SHAPES`: SmolLM2's
1536, 3072 = 256 x 12, Llama-3-8B's MLP 14336), each against a copy of its own tensor, with the
kernel :mod:`qcompile.backends.triton.kron_quant` picks; next to it, where the general kernel of
:mod:`qcompile.backends.triton.act_quant` can hold the row (1536, 3072), that kernel on the
same call (``kernel``: which ran).

Usage::

    python benchmarks/kernels_act.py [--kronecker]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

ROWS = COLS = 8192
FMT = "fp8_e4m3/token"
HAD_SIZES = (0, 8192)
#: (parts, transposed) of the power-of-two kernel's left product (had_quant), all timed.
VARIANTS = ((2, False), (2, True), (3, False), (1, False), (1, True), (0, False))
#: (rows, Hadamard size = row length) of the ``--kronecker`` rows.
KRON_SHAPES = ((8192, 1536), (8192, 3072), (4096, 14336))


def run_kronecker(shapes=KRON_SHAPES, device: str = "cuda",
                  bench: Callable[[Callable[[], object]], float] | None = None,
                  ) -> list[dict[str, Any]]:
    """Time one Kronecker block per row: the products kernel (``kron_quant``) and, where it
    holds the row, the general kernel, each against a copy of the same tensor.

    Args:
        shapes: ``(rows, size)`` pairs.
        device: Where the tensors live (``"cuda"``; tests run the interpreter on the CPU).
        bench: Milliseconds per call of a function (default: ``do_bench``'s median).

    Raises:
        RuntimeError: A CUDA device asked for and not present.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("benchmarks/kernels_act.py needs a CUDA GPU")
    from unittest import mock

    from qcompile.backends.triton import act_quant as aq

    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, return_mode="median")

    name_of = torch.cuda.get_device_name() if device == "cuda" else device
    results = []
    for rows, d in shapes:
        x = torch.randn(rows, d, device=device, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        copy_us = bench(lambda x=x, y=y: y.copy_(x)) * 1e3
        base = {"fmt": FMT, "had_size": d, "out": "codes", "shape": [rows, d],
                "dtype": "bfloat16", "device": name_of}
        results.append(dict(base, op="copy", us=copy_us, ratio_to_copy=1.0))
        general = aq._plan(d, d)
        kernels = ["kron_quant"]
        if general.nb * general.p1 * general.p2 * general.qp <= aq._MAX_TILE_GPU:
            kernels.append("general")
        for name in kernels:
            # The general kernel: act_quant's dispatch as if kron_quant took no layout.
            with mock.patch.object(aq, "kron_plan", (lambda *a, **k: None)
                                   if name == "general" else aq.kron_plan):
                us = bench(lambda x=x, d=d: aq.act_quant(x, FMT, had_size=d, out="codes")) * 1e3
            results.append(dict(base, op="act_quant", kernel=name, us=us,
                                ratio_to_copy=us / copy_us))
    return results


def run() -> list[dict[str, Any]]:
    """Time the kernel and the copy; one dict per variant.

    Raises:
        RuntimeError: No CUDA device (the interpreter would time Python, not the kernel).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks/kernels_act.py needs a CUDA GPU: the Triton interpreter "
                           "on CPU measures Python overhead, not the kernel")
    from triton.testing import do_bench

    from qcompile.backends.triton import had_quant
    from qcompile.backends.triton.act_quant import act_quant

    x = torch.randn(ROWS, COLS, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_us = do_bench(lambda: y.copy_(x), return_mode="median") * 1e3
    device = torch.cuda.get_device_name()
    shape = [ROWS, COLS]
    results = [{"op": "copy", "shape": shape, "dtype": "bfloat16", "us": copy_us,
                "ratio_to_copy": 1.0, "device": device}]
    for had in HAD_SIZES:
        us = do_bench(lambda had=had: act_quant(x, FMT, had_size=had, out="codes"),
                      return_mode="median") * 1e3
        results.append({"op": "act_quant", "fmt": FMT, "had_size": had, "out": "codes",
                        "shape": shape, "dtype": "bfloat16", "us": us,
                        "ratio_to_copy": us / copy_us, "device": device,
                        "variant": _variant() if had else None})
    # The other splits of the Hadamard's left product (had_quant.DEFAULT_PARTS / _TRANS).
    default = (had_quant.DEFAULT_PARTS, had_quant.DEFAULT_TRANS)
    try:
        for parts, trans in VARIANTS:
            if (parts, trans) == default:
                continue
            had_quant.DEFAULT_PARTS, had_quant.DEFAULT_TRANS = parts, trans
            had = max(HAD_SIZES)
            us = do_bench(lambda had=had: act_quant(x, FMT, had_size=had, out="codes"),
                          return_mode="median") * 1e3
            results.append({"op": "act_quant", "fmt": FMT, "had_size": had, "out": "codes",
                            "shape": shape, "dtype": "bfloat16", "us": us,
                            "ratio_to_copy": us / copy_us, "device": device,
                            "variant": _variant()})
    finally:
        had_quant.DEFAULT_PARTS, had_quant.DEFAULT_TRANS = default
    results += _config_sweep(x, copy_us, device)
    return results


def _config_sweep(x: torch.Tensor, copy_us: float, device: str) -> list[dict[str, Any]]:
    """The default variant with Hadamard 8192 under every autotune config, launched without
    the autotuner (its pick marked), each timed as the rows above."""
    from triton.testing import do_bench

    from qcompile.backends.triton import had_quant
    from qcompile.backends.triton.act_quant import act_quant

    had = max(HAD_SIZES)
    act_quant(x, FMT, had_size=had, out="codes")  # the autotuner's pick for this shape
    plan = had_quant.had2_plan(had, x.shape[1])
    # Its cache entry: the key's values in the autotuner's order, then the argument dtypes.
    key = (x.shape[1], plan.nr, plan.rp, plan.r, plan.c, True, 0, False, 1, 1, True,
           had_quant.DEFAULT_PARTS, had_quant.DEFAULT_TRANS, min(x.shape[0], 4096))
    picked = next((c for k, c in had_quant._had2_tuned.cache.items()
                   if tuple(k[:len(key)]) == key), None)
    y = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    rows = []
    for cfg in had_quant.HAD2_ROW_CONFIGS:
        def call(cfg=cfg):
            had_quant.launch_had2(x, y, scale, plan, had, 0, False, 448.0, 1, 1, config=cfg)
        us = do_bench(call, return_mode="median") * 1e3
        rows.append({"op": "act_quant config", "fmt": FMT, "had_size": had, "out": "codes",
                     "shape": list(x.shape), "dtype": "bfloat16", "us": us,
                     "ratio_to_copy": us / copy_us, "device": device, "variant": _variant(),
                     "config": dict(cfg.kwargs, num_warps=cfg.num_warps,
                                    num_stages=cfg.num_stages),
                     "picked": picked is not None and cfg.all_kwargs() == picked.all_kwargs()})
    return rows


def _variant() -> str:
    from qcompile.backends.triton import had_quant

    return f"parts={had_quant.DEFAULT_PARTS} trans={had_quant.DEFAULT_TRANS}"


if __name__ == "__main__":
    import sys

    print(json.dumps(run_kronecker() if "--kronecker" in sys.argv[1:] else run(), indent=2))
