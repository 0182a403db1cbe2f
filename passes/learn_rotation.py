"""Learn the residual-stream rotation R1 with the quantizers in the loop (SpinQuant-style)."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from qcompile.data import calibration_batches, load_text
from qcompile.formats.spec import FormatSpec, parse_format
from qcompile.hadamard import Rotation
from qcompile.pass_base import Pass, PassResult
from qcompile.passes.calibrate import _device_of, require_text_windows
from qcompile.passes.fuse_norms import probe_ids, run_probe
from qcompile.passes.quantize import head_linears
from qcompile.passes.rotate import ROTATE_KEY, finish_rewrite
from qcompile.passes.smooth import smooth_norm
from qcompile.patterns import Norm, find_norms, find_residual_stream
from qcompile.registry import register_pass
from qcompile.rotation_training import RotatedQuantInterpreter, skew_rotation
from qcompile.stream_rotation import fold_r1, plan_r1, require_weightless_stream

__all__ = ["LearnRotationPass"]

log = logging.getLogger(__name__)
_TEST_TEXTS = ("wikitext2", "wikitext2-test")


@dataclass(frozen=True)
class LearnRotationOptions:
    """Options of ``learn-rotation``.

    Attributes:
        a: Activation format fake-quantized in the loop at the input of every quantized
            linear (a format string of the formats module, e.g. ``fp4_e2m1/token/asym`` or
            ``nvfp4``).
        w: Weight format fake-quantized (round to nearest) in the loop, or ``none``: train
            against full-precision weights, SpinQuant's choice when GPTQ quantizes the
            weights afterwards.
        loss: ``kl``: the mean KL divergence of the quantized model's next-token distribution
            from the full-precision model's (distillation, needs one extra forward per
            step); ``ce``: the next-token cross entropy of the text (SpinQuant's loss).
        scales: Also learn per-channel smoothing scales for the readers of each stream norm
            (OSTQuant-style, one scale per channel shared by the norm's readers, starting at
            1), folded like ``smooth``'s norm rule: the norm's gamma divided, the readers'
            input columns multiplied.
        lr_scales: Adam learning rate of the log scales (decays linearly to 0).
        steps: Optimizer steps, one calibration window each.
        lr: Adam learning rate of the skew-symmetric generator (decays linearly to 0).
        samples: Training windows (cycled through when ``steps > samples``).
        seqlen: Tokens per window.
        holdout: Further windows scored before and after training; the learned rotation is
            kept only when it lowers their loss (else the graph is left untouched).
        text: Calibration text: a bundled data set name or a text file; test text refused.
        seed: Seed of the window positions.
        lm_head: Also quantize output heads in the loop (they are not quantized by default).
        tol: Largest allowed max |delta logits| / max |logits| on the probe after folding;
            none: 1e-3 for fp32 graphs, 3e-2 for fp16 and 1e-1 for bf16 ones.
    """

    a: str = "fp4_e2m1/token/asym"
    w: str = "none"
    loss: Literal["kl", "ce"] = "kl"
    scales: bool = False
    lr_scales: float = 0.02
    steps: int = 100
    lr: float = 2e-3
    samples: int = 64
    seqlen: int = 256
    holdout: int = 4
    text: str = "wikitext2-valid"
    seed: int = 0
    lm_head: bool = False
    tol: float | None = None

    def __post_init__(self) -> None:
        parse_format(self.a)  # FormatError naming the text
        if self.w != "none":
            parse_format(self.w)
        for key in ("steps", "samples", "seqlen", "holdout"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("lr", "lr_scales"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive number, got {value}")
        if self.text.strip().lower() in _TEST_TEXTS:
            raise ValueError(f"text={self.text} is evaluation (test) text; training on it "
                             "would leak the test set into the model: use text=wikitext2-valid")


@register_pass
class LearnRotationPass(Pass):
    """Train an orthogonal R1 for the quantized model and fold it into the weights.

    A random Hadamard R1 (``rotate``) spreads outliers but knows nothing of the quantizer;
    SpinQuant showed a rotation trained through the quantizers does better. Here R1 is
    ``exp(A)`` with A skew-symmetric (so R is orthogonal at every step), A starts at 0 (the
    identity on top of whatever rotation the graph already has) and is trained with Adam on
    the next-token loss of the graph with fake quantization in the loop (straight-through
    gradients): readers see ``Q_a(x R)`` and ``Q_w(W R)``, writers ``Q_w(R^T W)`` with their
    output rotated back, every other non-head linear ``Q_a(x)`` and ``Q_w(W)``. No weight
    changes during training; the graph is evaluated with :class:`fx.Interpreter`.

    Rules:
        1. Needs weightless RMSNorms on the stream (``fuse-norms`` first) and R1's structure
           (same rules and errors as ``rotate``'s R1); runs before ``calibrate``/``smooth``/
           ``gptq``/``quantize`` (statistics of readers are dropped).
        2. Training windows and ``holdout`` windows are drawn together from ``text``
           (:func:`qcompile.data.calibration_batches`); the held-out loss is measured with
           the identity and with the learned R. Not lower: nothing changes, ``modified`` is
           False and the report says so.
        3. Otherwise R (float64, from the same generator) is folded like ``rotate``'s R1 and
           recorded under ``r1_learned`` in ``gm.meta["qcompile.rotate"]``; the probe logits
           must be unchanged (``PostconditionError`` above ``tol``).
        4. Deterministic: the same options and graph give the same bits on one machine.
        5. K/V quantization is not in the loop: R1 does not change the K/V basis.
    """

    name = "learn-rotation"
    Options = LearnRotationOptions
    summary = "train R1 through fake quantizers (SpinQuant) and fold it into the weights"

    def requires(self, gm: fx.GraphModule) -> None:
        require_text_windows(self, gm)
        batch = int(gm.meta.get("batch", 1))
        if self.options.samples < batch or self.options.holdout < batch:
            self.fail_requires(f"samples={self.options.samples} and holdout="
                               f"{self.options.holdout} must each be at least the graph's "
                               f"static batch size {batch}")
        require_weightless_stream(gm, "learn-rotation", "(e.g. 'fuse-norms,rotate,"
                                  "learn-rotation')")

    def call(self, gm: fx.GraphModule) -> PassResult:
        from tqdm.auto import tqdm

        o = self.options
        plan = plan_r1(gm)
        n = plan.hidden_of(gm)
        quantized = {node for node in gm.graph.nodes
                     if node.op == "call_function" and node.target is torch.ops.aten.linear.default}
        if not o.lm_head:
            quantized -= head_linears(gm)
        norms = _scalable_norms(gm, quantized) if o.scales else []
        a_spec: FormatSpec = parse_format(o.a)
        w_spec = None if o.w == "none" else parse_format(o.w)
        batch = int(gm.meta.get("batch", 1))
        windows = calibration_batches(self.context.tokenizer, load_text(o.text),
                                      o.samples + o.holdout, o.seqlen, o.seed)
        train, held = windows[:o.samples], windows[o.samples:]
        device = self.context.device or _device_of(gm)
        frozen = [p for p in gm.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        start = time.perf_counter()
        try:
            interp = RotatedQuantInterpreter(gm, plan.readers, plan.writers, quantized, a_spec,
                                             w_spec, {c: i for i, norm in enumerate(norms)
                                                      for c in norm.consumers})
            gen = torch.zeros(n, n, device=device, requires_grad=True)
            log_s = torch.zeros(len(norms), n, device=device, requires_grad=bool(norms))
            groups = [{"params": [gen], "lr": o.lr}]
            if norms:
                groups.append({"params": [log_s], "lr": o.lr_scales})
            opt = torch.optim.Adam(groups)
            scales = log_s if norms else None
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / o.steps)
            kl = o.loss == "kl"
            held_ref = [_reference(gm, ids, kl) for ids in _chunks(held, batch, device)]
            held_before = _loss(interp, None, held, batch, device, held_ref)
            losses = []
            for step in tqdm(range(o.steps), desc="learn-rotation", unit="step",
                             disable=not self.context.progress, file=sys.stderr):
                i = (step * batch) % train.shape[0]
                ids = train[i:i + batch]
                if ids.shape[0] < batch:  # wrap around a window count not a batch multiple
                    ids = torch.cat([ids, train[:batch - ids.shape[0]]])
                ids = ids.to(device)
                loss = interp.loss(skew_rotation(gen), ids, _reference(gm, ids, kl), scales)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            rot = skew_rotation(gen.detach().double())
            held_after = _loss(interp, rot.float(), held, batch, device, held_ref,
                               None if scales is None else scales.detach())
        finally:
            for p in frozen:
                p.requires_grad_(True)
        facts: dict[str, Any] = {
            "steps": o.steps, "a": str(a_spec), "w": o.w if w_spec is None else str(w_spec),
            "loss": o.loss, "quantized_linears": len(quantized),
            "heldout_loss_before": round(held_before, 5), "heldout_loss_after": round(held_after, 5),
            "train_loss_first": round(sum(losses[:8]) / len(losses[:8]), 5),
            "train_loss_last": round(sum(losses[-8:]) / len(losses[-8:]), 5),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if not held_after < held_before:
            facts["kept"] = "identity (the learned rotation did not lower the held-out loss)"
            log.info("learn-rotation: kept the identity (%.4f -> %.4f)", held_before, held_after)
            return PassResult(gm, False, facts)
        ids = probe_ids(gm, 16, o.seed)
        before = run_probe(gm, ids)
        desc = f"learned ({o.steps} steps, a={a_spec}, w={facts['w']})"
        changed: list[str] = []
        facts["r1"] = fold_r1(gm, plan, Rotation(n, "learned", desc, dense=rot.cpu()), changed)
        if scales is not None:
            s = scales.detach().double().exp().cpu()
            for norm, row in zip(norms, s, strict=True):
                smooth_norm(gm, norm, row)
            facts["scales"] = {"norms": len(norms), "min": float(s.min()), "max": float(s.max())}
        facts.update(finish_rewrite(gm, before, ids, o.tol, "learn-rotation", changed))
        gm.meta.setdefault(ROTATE_KEY, {})["r1_learned"] = facts["r1"]
        facts["kept"] = "learned"
        return PassResult(gm, True, facts)


def _scalable_norms(gm: fx.GraphModule, quantized: set[fx.Node]) -> list[Norm]:
    """Stream norms with a weight attribute of their own, read only by quantized linears."""
    stream = find_residual_stream(gm, find_norms(gm))
    out = []
    for norm in [*stream.pre_norms, *([stream.final_norm] if stream.final_norm else [])]:
        if norm.weight is None or norm.other_users or not norm.consumers:
            continue
        if not set(norm.consumers) <= quantized:
            continue
        readers = {u for g in gm.graph.find_nodes(op="get_attr", target=norm.weight.target)
                   for u in g.users}
        if readers <= set(norm.nodes):
            out.append(norm)
    return out


def _chunks(windows: torch.Tensor, batch: int, device: torch.device) -> list[torch.Tensor]:
    """Whole batches of ``windows`` on ``device`` (a partial last batch is dropped)."""
    return [windows[i:i + batch].to(device) for i in range(0, windows.shape[0] - batch + 1, batch)]


def _reference(gm: fx.GraphModule, ids: torch.Tensor, kl: bool) -> torch.Tensor | None:
    """Full-precision logits of ``ids`` for the distillation loss (None for ``loss=ce``)."""
    if not kl:
        return None
    with torch.no_grad():
        out = gm(ids)
    return (out if isinstance(out, torch.Tensor) else out[0]).detach()


def _loss(interp: RotatedQuantInterpreter, rot: torch.Tensor | None, windows: torch.Tensor,
          batch: int, device: torch.device, refs: list[torch.Tensor | None],
          log_scales: torch.Tensor | None = None) -> float:
    """Mean loss of ``windows`` through the fake-quantized graph (no grad)."""
    chunks = _chunks(windows, batch, device)
    with torch.no_grad():
        losses = [float(interp.loss(rot, ids, ref, log_scales))
                  for ids, ref in zip(chunks, refs, strict=True)]
    return sum(losses) / len(losses)
