"""GPTQ: decide each linear's quantized weight from calibration Hessians (plans for quantize)."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from qcompile.data import calibration_batches, load_text
from qcompile.errors import PreconditionError
from qcompile.formats import dequantize, fake_quantize, parse_format, quantize, search_clip
from qcompile.formats.quantize import QTensor
from qcompile.formats.scales import Scales
from qcompile.gptq import gptq_quantize, output_error, prepare
from qcompile.graph import get_attr_value
from qcompile.pass_base import Pass, PassResult
from qcompile.passes.calibrate import _TEST_TEXTS, _device_of, require_text_windows
from qcompile.passes.quantize import (
    _ACT_GRANULARITIES,
    _canonical_format,
    _linear_name,
    select_linears,
)
from qcompile.planned import set_plan
from qcompile.refine import refine_scales
from qcompile.registry import register_pass
from qcompile.sequential import run_wavefront

__all__ = ["GPTQPass"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions:
    """Options of ``gptq``.

    Attributes:
        w: Weight format (``qcompile.formats`` text; tensor, channel or group granularity).
        block: Columns per lazy-update block.
        damp: Hessian dampening relative to its mean diagonal (raised automatically when the
            Cholesky factorization fails; the value used is reported).
        act_order: Process columns by decreasing Hessian diagonal (static groups: each
            group's scales are fixed at its first column in that order).
        sequential: Compute each linear's Hessian from inputs that went through the already
            quantized earlier linears (graph order); ``false`` uses the full-precision model.
        samples: Calibration windows.
        seqlen: Tokens per window.
        text: Calibration text (bundled name or file); test text is refused.
        seed: Seed of the window positions.
        include: ``|``-separated globs over linear names to quantize.
        exclude: ``|``-separated globs of linears to leave alone.
        lm_head: Also quantize output heads.
        clip: ``none`` or ``search``: per-group clip ratios searched on the original weight
            (w^2-weighted, as in ``quantize``) bound each group's range when GPTQ fixes it.
        refine: After GPTQ, refit the free (fp32) scales to the calibration Hessian with the
            codes fixed (:func:`qcompile.refine.refine_scales`); never increases the error.
        target: ``quantized``: the usual GPTQ objective, each linear reproducing its own output
            on the inputs it gets from the quantized earlier layers; ``fp``: reproduce the
            full-precision model's output of the linear from those inputs (asymmetric
            calibration, as GPTAQ): the weight is first moved to the least-squares solution
            ``W C H^-1`` (``C = 2/n X_fp^T X_q``), then quantized. Needs ``sequential``; runs
            the full-precision model alongside (twice the calibration compute and memory).
        rounds: GPTQ + refit rounds; each later round reruns GPTQ from the original weight
            with the previous round's refit scales (a few % lower error per round, one more
            GPTQ solve per linear; the calibration forward is not repeated).
        act: The activation format the linears' inputs get at inference (``quantize``'s
            ``a=``), or ``none``. The Hessian (and ``target=fp``'s cross term) is formed from
            the dynamically fake-quantized inputs, so GPTQ fits the weight to the inputs it
            will really see and, with ``target=fp``, also compensates the activations'
            quantization error. The run itself (``sequential``) keeps unquantized activations.
    """

    w: str = "int4/g128/asym"
    block: int = 128
    damp: float = 0.01
    act_order: bool = True
    sequential: bool = True
    samples: int = 32
    seqlen: int = 512
    text: str = "wikitext2-valid"
    seed: int = 0
    include: str = "*"
    exclude: str = ""
    lm_head: bool = False
    clip: Literal["none", "search"] = "none"
    refine: bool = True
    rounds: int = 1
    target: Literal["quantized", "fp"] = "quantized"
    act: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "w", _canonical_format(self.w, "weight",
                                                        ("tensor", "channel", "group")))
        if self.act != "none":
            object.__setattr__(self, "act", _canonical_format(self.act, "activation",
                                                              _ACT_GRANULARITIES))
        if min(self.block, self.samples, self.seqlen, self.rounds) < 1:
            raise ValueError(f"block, samples, seqlen and rounds must be >= 1, got "
                             f"{self.block}, {self.samples}, {self.seqlen}, {self.rounds}")
        if self.target == "fp" and not self.sequential:
            raise ValueError("target=fp needs sequential=true (without it the inputs are the "
                             "full-precision ones already)")
        if not 0.0 <= self.damp <= 1.0:
            raise ValueError(f"damp must lie in [0, 1], got {self.damp}")
        if self.text.strip().lower() in _TEST_TEXTS:
            raise ValueError(f"text={self.text} is evaluation (test) text; calibrate on "
                             "wikitext2-valid or a file")


@register_pass
class GPTQPass(Pass):
    """Quantize selected linears' weights with GPTQ and record the result as plans.

    Rules:
        1. Linears are selected as ``quantize`` selects them (include/exclude, heads skipped
           unless ``lm_head``, lorc factors skipped).
        2. The graph runs on ``samples`` windows of ``text`` node by node
           (:func:`qcompile.sequential.run_wavefront`); at each selected linear the Hessian
           ``2/n X^T X`` of its input is formed (once per input shared by sibling linears),
           GPTQ decides the weight, and with ``sequential`` the rest of the run uses it.
        3. The graph is not rewritten: each weight's codes and scales become a plan
           (:mod:`qcompile.planned`) that ``quantize`` inserts; ``modified`` is False.
        4. A weight read by several selected linears is left to ``quantize`` (RTN) and
           reported: one Hessian per weight is what GPTQ is defined for.
        5. Facts: per-linear output error relative to RTN on the calibration inputs.

    Raises:
        PreconditionError: No tokenizer in the context, no linear to quantize, a ``seqlen``
            outside the graph's sequence range, or samples not a multiple of its batch.
    """

    name = "gptq"
    Options = GPTQOptions
    summary = "GPTQ weight quantization from calibration Hessians (planned for quantize)"

    def requires(self, gm: fx.GraphModule) -> None:
        require_text_windows(self, gm)

    def call(self, gm: fx.GraphModule) -> PassResult:
        from tqdm.auto import tqdm

        opts = self.options
        spec = parse_format(opts.w)
        act = None if opts.act == "none" else parse_format(opts.act)
        selected, skipped = select_linears(gm, opts.include, opts.exclude, opts.lm_head)
        readers: dict[str, list[fx.Node]] = {}
        for node in selected:
            readers.setdefault(node.args[1].target, []).append(node)
        watch = set()
        for target, nodes in readers.items():
            if len(nodes) > 1:
                skipped[_linear_name(target)] = (f"weight read by {len(nodes)} linears: left "
                                                 "to quantize (RTN)")
            else:
                watch.add(nodes[0])
        if not watch:
            raise PreconditionError("gptq: no linear to quantize (all excluded or skipped)")
        batch = int(gm.meta.get("batch", 1))
        ids = calibration_batches(self.context.tokenizer, load_text(opts.text), opts.samples,
                                  opts.seqlen, opts.seed)
        if ids.shape[0] % batch:
            raise PreconditionError(f"samples={opts.samples} is not a multiple of the graph's "
                                    f"static batch size {batch}")
        device = self.context.device or _device_of(gm)
        batches = [b.to(device) for b in ids.split(batch)]

        hessians: dict[fx.Node, list] = {}  # input -> [H, prepared H, readers served]
        remaining = {}
        for node in watch:
            remaining[node.args[0]] = remaining.get(node.args[0], 0) + 1
        per_linear: dict[str, dict] = {}
        planned: dict[str, QTensor] = {}

        def hook(node: fx.Node, xs: list[torch.Tensor],
                 xs_fp: list[torch.Tensor] | None = None) -> torch.Tensor | None:
            x = node.args[0]
            if x not in hessians:
                if act is not None:  # what the linear reads once quantize inserts a=
                    xs = [fake_quantize(t, act) for t in xs]  # keeps each input's dtype
                h = _hessian(xs)
                cross = _hessian(xs_fp, xs) if xs_fp is not None else None
                hessians[x] = [h, prepare(h, opts.damp, opts.act_order), 0, cross]
            entry = hessians[x]
            h, ph, cross = entry[0], entry[1], entry[3]
            entry[2] += 1
            if entry[2] == remaining[x]:
                del hessians[x]  # memory: one input's Hessian at a time
            target = node.args[1].target
            w = get_attr_value(gm, target).detach()
            if cross is not None:
                w = _fp_target(w, h, cross, ph.damp)
            clip = None
            if opts.clip == "search":
                clip = search_clip(w.float(), spec, importance=w.float().square())
            result = gptq_quantize(w, ph, spec, block=opts.block, clip=clip)
            qt, w_hat = result.qtensor, result.weight
            for round_ in range(opts.rounds if opts.refine else 1):
                if round_:
                    result = gptq_quantize(w, ph, spec, block=opts.block,
                                           scales=Scales(qt.scale, qt.scale_neg, qt.zero,
                                                         qt.outer))
                    qt = result.qtensor
                if opts.refine:
                    qt = refine_scales(w, h, qt)
                w_hat = dequantize(qt)
            rtn = dequantize(quantize(w.float(), spec, clip=clip))
            e_rtn = output_error(w, rtn, h)
            e_gptq = output_error(w, w_hat, h)
            per_linear[_linear_name(target)] = {
                "error_vs_rtn": round(e_gptq / e_rtn, 4) if e_rtn > 0 else None,
                "damp": result.damp,
            }
            planned[target] = qt
            return w_hat.to(w.dtype) if opts.sequential else None

        start = time.perf_counter()
        bar = tqdm(total=len(watch), desc="gptq", unit="linear",
                   disable=not self.context.progress, file=sys.stderr)
        try:
            run_wavefront(gm, batches, watch, hook, progress=lambda _n: bar.update(1),
                          twin=opts.target == "fp")
        finally:
            bar.close()
        for target, qt in planned.items():
            set_plan(gm, target, qt, self.name)
        ratios = [v["error_vs_rtn"] for v in per_linear.values() if v["error_vs_rtn"]]
        worst = sorted(per_linear.items(), key=lambda kv: -(kv[1]["error_vs_rtn"] or 0))[:3]
        facts = {
            "weight_format": str(spec),
            "activation_format": opts.act,
            "linears_planned": len(planned),
            "skipped": skipped,
            "windows": len(ids),
            "tokens": int(ids.numel()),
            "mean_error_vs_rtn": round(sum(ratios) / len(ratios), 4) if ratios else None,
            "worst_error_vs_rtn": {k: v["error_vs_rtn"] for k, v in worst},
            "damp_raised": sorted(k for k, v in per_linear.items() if v["damp"] > opts.damp),
            "seconds_run": round(time.perf_counter() - start, 3),
        }
        log.debug("gptq: %d linears planned", len(planned))
        return PassResult(gm, False, facts)


def _hessian(xs: list[torch.Tensor], ys: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``2/n sum x^T y`` (``y = x`` by default) over all windows' tokens, fp32."""
    h = None
    n = 0
    for i, x in enumerate(xs):
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        y2 = x2 if ys is None else ys[i].detach().reshape(-1, x.shape[-1]).float()
        n += x2.shape[0]
        h = x2.t() @ y2 if h is None else h.addmm_(x2.t(), y2)
    assert h is not None
    return h.mul_(2.0 / n)


def _fp_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float
               ) -> torch.Tensor:
    """``W C (H + damp)^-1``: the weight whose output on the quantized-path inputs best matches
    the full-precision output (``C = 2/n X_fp^T X_q``, ``H = 2/n X_q^T X_q``)."""
    hd = h.double().clone()
    diag = torch.diagonal(hd)
    diag += damp * float(diag.mean())
    diag[diag == 0] = 1.0
    sol = torch.linalg.solve(hd, cross.double().t() @ w.double().t())  # (W C H^-1)^T
    return sol.t().to(w.dtype).contiguous()
