"""Decompositions that let Inductor generate code for qcompile ops instead of calling Python.

``qcompile::dequantize_weight`` is decomposed into its reference implementation (unpack
nibbles, look up element values, multiply by expanded group scales), which traces to plain
ATen ops, so Inductor fuses the decode into one kernel per weight instead of running the
Python reference every forward. The values are the reference's up to float rounding order.
Dynamic activation quantization stays an opaque call: its reference reads the tensor's
maximum on the host to validate the input, which cannot be traced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.formats import unpack_codes
from qcompile.formats.elements import element_info
from qcompile.formats.scales import expand_groups
from qcompile.ops import spec_of

__all__ = ["dequantize_weight_decomposition", "inductor_decompositions"]


def dequantize_weight_decomposition(
    packed: torch.Tensor,
    scale: torch.Tensor,
    scale_neg: torch.Tensor | None,
    zero: torch.Tensor | None,
    outer: torch.Tensor | None,
    fmt: str,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``qcompile::dequantize_weight`` as traceable ATen ops.

    Mirrors :func:`qcompile.formats.dequantize` (same arithmetic in the same order, fp32,
    cast at the end); the element lookup table is created inside the trace so that it becomes
    a graph constant.
    """
    spec = spec_of(fmt)
    codes = unpack_codes(packed, spec.bits, k)
    eff = scale if outer is None else scale * outer
    eff_neg = scale_neg if (scale_neg is None or outer is None) else scale_neg * outer
    grouped = spec.granularity == "group" and k % spec.group_size == 0

    def per_element(s: torch.Tensor) -> torch.Tensor:
        # Full groups: broadcast [..., G, 1] against [..., G, size] (no gather); ragged rows
        # fall back to the reference's index_select.
        return s.unsqueeze(-1) if grouped else expand_groups(s, spec, k)

    if grouped:
        codes = codes.unflatten(-1, (k // spec.group_size, spec.group_size))
    e = per_element(eff)
    info = spec.element
    if info.kind == "int":
        c = codes.to(torch.float32)
        v = c + info.min if zero is None else c - per_element(zero)
        out = v * e
    else:
        lut = torch.tensor(_table(spec.elem), dtype=torch.float32, device=packed.device)
        v = lut[codes.to(torch.int64)]
        out = v * e if eff_neg is None else torch.where(v < 0, v * per_element(eff_neg), v * e)
    return (out.flatten(-2) if grouped else out).to(dtype)


@functools.cache
def _table(elem: str) -> tuple[float, ...]:
    """Decoded value of every code of ``elem`` (filled before tracing, see below)."""
    return tuple(element_info(elem).table().tolist())


def inductor_decompositions(gm: torch.fx.GraphModule) -> dict[Any, Callable[..., Any]]:
    """Inductor's default decomposition table plus the qcompile decompositions for ``gm``.

    Also computes, outside any trace, the lookup tables the decompositions of ``gm``'s
    ``dequantize_weight`` nodes read (under a fake-tensor trace they could not be read).
    """
    from torch._inductor.decomposition import select_decomp_table

    for node in gm.graph.nodes:
        if node.target is torch.ops.qcompile.dequantize_weight.default:
            _table(spec_of(node.args[5]).elem)

    table = dict(select_decomp_table())
    table[torch.ops.qcompile.dequantize_weight.default] = dequantize_weight_decomposition
    return table
