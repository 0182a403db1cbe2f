"""Single-row linears over quantized weights as fusable multiply-reduce (batch-1 decode).

``aten.linear(x, qcompile::dequantize_weight(...))`` with one input row is memory bound: its
cost is reading the weight. Written as ``sum(x[..., None, :] * W, -1)``, Inductor fuses the
weight decode into the reduction and reads only the packed codes and scales, instead of
materializing the dequantized weight and calling a matrix multiply. Only graphs where the row
count is statically 1 are rewritten (dynamo specializes size-1 dims, so a decode step's graph
is one); prefill graphs keep the matrix multiply.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.graph import is_linear

__all__ = ["rewrite_single_row_linears"]

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _rows(node: fx.Node) -> int | None:
    """Rows of a linear's input (product of its leading dims) when statically known."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        return None
    rows = 1
    for size in val.shape[:-1]:
        if not isinstance(size, int):
            return None
        rows *= size
    return rows


def rewrite_single_row_linears(gm: fx.GraphModule) -> int:
    """Rewrite linears over dequantized weights whose input is one row; return how many."""
    count = 0
    for lin in list(gm.graph.nodes):
        if not is_linear(lin):
            continue
        x, w = lin.args[0], lin.args[1]
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        if not (isinstance(w, fx.Node) and w.target is torch.ops.qcompile.dequantize_weight.default):
            continue
        if not isinstance(x, fx.Node) or _rows(x) != 1:
            continue
        with gm.graph.inserting_before(lin):
            prod = gm.graph.call_function(aten.mul.Tensor,
                                          (gm.graph.call_function(aten.unsqueeze.default,
                                                                  (x, -2)), w))
            out = gm.graph.call_function(aten.sum.dim_IntList, (prod, [-1]))
            if bias is not None:
                out = gm.graph.call_function(aten.add.Tensor, (out, bias))
        out.meta.update({k: v for k, v in lin.meta.items() if k != "val"})
        lin.replace_all_uses_with(out)
        gm.graph.erase_node(lin)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
        log.debug("rewrote %d single-row quantized linears as multiply-reduce", count)
    return count
