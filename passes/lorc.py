"""LoRC: low-rank compensation of weight quantization error (ZeroQuant-V2 / ZeroQuant-FP)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.errors import PreconditionError
from qcompile.formats import parse_format, quantize
from qcompile.graph import get_attr_value, set_attr_value
from qcompile.pass_base import Pass, PassResult
from qcompile.passes.quantize import (
    LORC_META,
    _canonical_format,
    _linear_name,
    insert_dequant,
    select_linears,
)
from qcompile.planned import planned_weight, set_plan
from qcompile.registry import register_pass

__all__ = ["LoRCPass", "get_attr_or_dequant", "low_rank_factors"]

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class LoRCOptions:
    """Options of ``lorc``.

    Attributes:
        rank: Rank of the compensation (clamped to ``min(N, K)``, where it is exact).
        bits: Bits of the factors (symmetric INT per row), or 0 to keep them in the
            weight's dtype.
        w: Weight format for linears no earlier pass (``gptq``) decided: they are rounded
            to nearest with it and the result planned for ``quantize``. None: such linears
            are an error.
        include: ``|``-separated globs over linear names.
        exclude: ``|``-separated globs of linears to leave alone.
        lm_head: Also compensate output heads.
    """

    rank: int = 8
    bits: int = 8
    w: str | None = None
    include: str = "*"
    exclude: str = ""
    lm_head: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.bits != 0 and not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be 0 (unquantized factors) or 2..8, got {self.bits}")
        object.__setattr__(self, "w", _canonical_format(self.w, "weight",
                                                        ("tensor", "channel", "group")))


def low_rank_factors(err: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [N, r]``, ``B [r, K]`` with ``A @ B`` the best rank-r approximation of ``err``.

    The singular values are split evenly (``U sqrt(S)``, ``sqrt(S) V^T``) so both factors
    have similar ranges for quantization.
    """
    u, s, vh = torch.linalg.svd(err.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()


@register_pass
class LoRCPass(Pass):
    """Add a low-rank branch ``x -> x B^T -> A^T`` that cancels most of ``W - Q(W)``.

    Rules:
        1. For each selected linear (as ``quantize`` selects them), ``Q(W)`` is the weight
           planned by an earlier pass (``gptq``) or, with ``w`` set, its RTN quantization,
           which is then planned so ``quantize`` inserts exactly it.
        2. ``A B`` is the truncated SVD of ``W - Q(W)``; with ``bits`` the factors are stored
           as packed symmetric INT per row behind ``qcompile::dequantize_weight``.
        3. The linear's result gets ``+ linear(linear(x, B), A)`` (before its readers); the
           two new linears are marked so later weight passes skip them. Bias stays on the
           main linear. The branch reads the linear's input before any activation
           quantization ``quantize`` adds later (it stays in the graph's precision).
        4. The main weight is not changed here; ``quantize`` replaces it by ``Q(W)``.

    Raises:
        PreconditionError: A selected linear has no planned quantization and ``w`` is unset,
            or nothing is selected.
    """

    name = "lorc"
    Options = LoRCOptions
    summary = "low-rank (SVD) compensation of weight quantization error as two small linears"

    def call(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        selected, skipped = select_linears(gm, opts.include, opts.exclude, opts.lm_head)
        if not selected:
            raise PreconditionError("lorc: no linear selected")
        spec = parse_format(opts.w) if opts.w is not None else None
        fspec = parse_format(f"int{opts.bits}/channel") if opts.bits else None
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        done: dict[str, tuple[fx.Node, fx.Node, int]] = {}
        extra = base = 0
        err_before = err_after = 0.0
        rtn = 0
        for node in selected:
            target = node.args[1].target
            if target not in done:
                w = get_attr_value(gm, target).detach()
                plan = planned_weight(gm, target)
                if plan is None:
                    if spec is None:
                        raise PreconditionError(
                            f"lorc: weight {target!r} has no planned quantization; run gptq "
                            "before lorc or give lorc w=<format>")
                    q = quantize(w.float(), spec)
                    set_plan(gm, target, q, self.name)
                    rtn += 1
                else:
                    q = plan.qtensor
                err = w.float() - q.dequantize()
                a, b = low_rank_factors(err, opts.rank)
                done[target] = (self._factor(gm, first, target, "lorc_b", b, fspec, w.dtype),
                                self._factor(gm, first, target, "lorc_a", a, fspec, w.dtype),
                                b.shape[0])
                b_used, a_used = (get_attr_or_dequant(gm, n) for n in done[target][:2])
                err_before += float(err.pow(2).sum())
                err_after += float((err - a_used.float() @ b_used.float()).pow(2).sum())
                extra += a.numel() + b.numel()
                base += w.numel()
            self._branch(gm, node, *done[target])
        gm.graph.lint()
        gm.recompile()
        facts = {
            "linears_compensated": len(selected),
            "weights": len(done),
            "rank": opts.rank,
            "factor_bits": opts.bits or "unquantized",
            "rtn_planned": rtn,
            "skipped": skipped,
            "extra_params_ratio": round(extra / base, 5) if base else 0.0,
            "error_left": round((err_after / err_before) ** 0.5, 4) if err_before else 0.0,
        }
        return PassResult(gm, True, facts)

    @staticmethod
    def _factor(gm, anchor, target, suffix, t, fspec, dtype) -> fx.Node:
        name = f"{_linear_name(target)}.{suffix}.weight"
        if fspec is not None:
            return insert_dequant(gm, anchor, name, quantize(t, fspec), dtype)
        set_attr_value(gm, name, t.to(dtype))
        with gm.graph.inserting_before(anchor):
            return gm.graph.get_attr(name)

    @staticmethod
    def _branch(gm: fx.GraphModule, node: fx.Node, b: fx.Node, a: fx.Node, rank: int) -> None:
        with gm.graph.inserting_after(node):
            low = gm.graph.call_function(aten.linear.default, (node.args[0], b))
        with gm.graph.inserting_after(low):
            back = gm.graph.call_function(aten.linear.default, (low, a))
        with gm.graph.inserting_after(back):
            total = gm.graph.call_function(aten.add.Tensor, (node, back))
        node.replace_all_uses_with(total, delete_user_cb=lambda u: u is not total)
        source = node.meta.get("source_module", "")
        for n in (low, back, total):
            n.meta["source_module"] = source
        low.meta[LORC_META] = back.meta[LORC_META] = True
        _propagate_val(node, low, back, total, rank)


def _propagate_val(node: fx.Node, low: fx.Node, back: fx.Node, total: fx.Node,
                   rank: int) -> None:
    """Give the new nodes fake ``val`` metadata (shape/dtype) like the captured ones have."""
    val, x = node.meta.get("val"), node.args[0]
    x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
    mode = getattr(val, "fake_mode", None)
    if val is None or x_val is None or mode is None:
        return
    with mode:
        low.meta["val"] = aten.linear.default(x_val, torch.empty(rank, x_val.shape[-1],
                                                                dtype=x_val.dtype))
    back.meta["val"] = total.meta["val"] = val


def get_attr_or_dequant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The value a factor node produces (attribute read, or its dequantization)."""
    if node.op == "get_attr":
        return get_attr_value(gm, node.target)
    args = [get_attr_value(gm, a.target) if isinstance(a, fx.Node) else a for a in node.args]
    return node.target(*args)
