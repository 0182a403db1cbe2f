"""Record the input statistics of every linear on calibration text (absmax, optional Hessian).

The statistics live in ``gm.meta["qcompile.calibration"]`` (:data:`CALIBRATION_KEY`)::

    {
      "text": "wikitext2-valid", "samples": 32, "seqlen": 512, "seed": 0, "hessian": False,
      "linears": {
        "model.layers.0.self_attn.q_proj": {          # the linear's name (see below)
          "absmax": Tensor[in_features] fp32,         # max |x_j| over all calibration tokens
          "tensor_absmax": float,                     # max over j of absmax
          "tokens": int,                              # calibration tokens seen
          "hessian": Tensor[in_features, in_features] fp32,   # only with hessian=true:
        },                                            #   H = 2/n sum_t x_t x_t^T
        ...
      },
    }

A linear's name is its weight attribute without ``.weight`` (:func:`qcompile.patterns.linear_name`),
taken when calibrating; it stays valid when later passes replace the weight attribute (the
quantize pass names linears the same way). Linears sharing one weight attribute share one entry
(maximum absmax, summed Hessian). Passes that change what a linear *reads* must keep its entry
true: :func:`rescale_input` when the input becomes ``x / s`` per channel, :func:`drop_stats`
otherwise.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.data import calibration_batches, load_text
from qcompile.errors import PreconditionError
from qcompile.graph import linear_nodes
from qcompile.pass_base import Pass, PassResult
from qcompile.patterns import linear_name
from qcompile.registry import register_pass

__all__ = [
    "CALIBRATION_KEY",
    "CalibratePass",
    "drop_stats",
    "linear_stats",
    "require_calibration",
    "require_text_windows",
    "rescale_input",
]

log = logging.getLogger(__name__)

CALIBRATION_KEY = "qcompile.calibration"
_TEST_TEXTS = ("wikitext2", "wikitext2-test")


@dataclass(frozen=True)
class CalibrateOptions:
    """Options of ``calibrate``.

    Attributes:
        samples: Calibration windows.
        seqlen: Tokens per window.
        text: Calibration text: a bundled data set name or a text file. Test text
            (``wikitext2``, ``wikitext2-test``) is refused.
        seed: Seed of the window positions.
        hessian: Also accumulate each linear's input Hessian ``2/n sum x x^T`` (for GPTQ).
    """

    samples: int = 32
    seqlen: int = 512
    text: str = "wikitext2-valid"
    seed: int = 0
    hessian: bool = False

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 1:
            raise ValueError(f"samples and seqlen must be >= 1, got {self.samples}, {self.seqlen}")
        if self.text.strip().lower() in _TEST_TEXTS:
            raise ValueError(
                f"text={self.text} is evaluation (test) text; calibrating on it would leak the "
                "test set into the model: use text=wikitext2-valid or a file"
            )


def _summarize(x: torch.Tensor, hessian: bool) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """Per-channel absmax, token count and (optionally) ``x^T x`` of one input, in fp32."""
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    am = torch.linalg.vector_norm(x2, ord=float("inf"), dim=0)  # max |x_j|, exactly
    return am, x2.shape[0], (x2.t() @ x2 if hessian else None)


def require_text_windows(p: Pass, gm: fx.GraphModule) -> None:
    """The checks of a pass reading ``text`` in ``seqlen``-token windows: a tokenizer in the
    context and a ``seqlen`` inside the graph's sequence range (``PreconditionError``)."""
    opts = p.options
    if p.context.tokenizer is None:
        p.fail_requires(f"{p.name} needs a tokenizer (PassContext.tokenizer) to read "
                        f"text={opts.text}")
    lo, hi = gm.meta.get("seq_range", (1, opts.seqlen))
    if not lo <= opts.seqlen <= hi:
        p.fail_requires(f"seqlen={opts.seqlen} is outside the graph's sequence range {lo}..{hi}")


class _Stats:
    def __init__(self) -> None:
        self.absmax: torch.Tensor | None = None
        self.hsum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, am: torch.Tensor, tokens: int, xtx: torch.Tensor | None) -> None:
        self.absmax = am if self.absmax is None else torch.maximum(self.absmax, am)
        self.tokens += tokens
        if xtx is not None:
            self.hsum = xtx.clone() if self.hsum is None else self.hsum.add_(xtx)

    def entry(self) -> dict[str, Any]:
        assert self.absmax is not None
        out: dict[str, Any] = {"absmax": self.absmax.cpu(),
                               "tensor_absmax": float(self.absmax.max()), "tokens": self.tokens}
        if self.hsum is not None:
            out["hessian"] = (self.hsum * (2.0 / self.tokens)).cpu()
        return out


class _Recorder(fx.Interpreter):
    """Runs the graph node by node and feeds the input of each watched linear to its stats.

    An input read by several watched linears (q/k/v, gate/up) is summarized once per run and
    forgotten after its last watched reader, so memory stays at one window's activations.
    """

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, _Stats], hessian: bool) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.watch, self.hessian = watch, hessian
        self.readers: dict[fx.Node, int] = {}
        for n in watch:
            self.readers[n.args[0]] = self.readers.get(n.args[0], 0) + 1
        self.pending: dict[fx.Node, list] = {}

    def run_node(self, n: fx.Node) -> Any:
        stats = self.watch.get(n)
        if stats is not None:
            x = n.args[0]
            if x not in self.pending:
                self.pending[x] = [self.readers[x], _summarize(self.env[x], self.hessian)]
            entry = self.pending[x]
            stats.add(*entry[1])
            entry[0] -= 1
            if not entry[0]:
                del self.pending[x]
        return super().run_node(n)


@register_pass
class CalibratePass(Pass):
    """Run calibration windows through the graph and record per-linear input statistics.

    Rules:
        1. Every ``aten.linear`` whose weight is a plain attribute is observed; its input's
           per-channel absmax (and Hessian with ``hessian=true``) over all calibration tokens
           is stored under its name in ``gm.meta["qcompile.calibration"]`` (module docstring).
        2. Linears whose weight is not a plain attribute (already quantized) are not observed.
        3. Windows come from :func:`qcompile.data.calibration_batches` with the context's
           tokenizer; the same options always give the same statistics.
        4. The graph and its attributes are untouched: ``modified`` is False. Earlier
           statistics are replaced.

    Raises:
        PreconditionError: No tokenizer in the pass context, no linear to observe, or a
            ``seqlen`` outside the graph's sequence range.
    """

    name = "calibrate"
    Options = CalibrateOptions
    summary = "record per-linear input absmax (and Hessians) on calibration text"

    def requires(self, gm: fx.GraphModule) -> None:
        require_text_windows(self, gm)
        if not linear_nodes(gm):
            self.fail_requires("graph has no linear with a plain weight attribute to calibrate")

    def call(self, gm: fx.GraphModule) -> PassResult:
        from tqdm.auto import tqdm

        opts = self.options
        batches = calibration_batches(self.context.tokenizer, load_text(opts.text),
                                      opts.samples, opts.seqlen, opts.seed)
        per_name: dict[str, _Stats] = {}
        watch = {}
        for node in linear_nodes(gm):
            watch[node] = per_name.setdefault(linear_name(node), _Stats())
        device = self.context.device or _device_of(gm)
        batch = int(gm.meta.get("batch", 1))
        if batches.shape[0] % batch:
            raise PreconditionError(f"samples={opts.samples} is not a multiple of the graph's "
                                    f"static batch size {batch}")
        start = time.perf_counter()
        recorder = _Recorder(gm, watch, opts.hessian)
        with torch.no_grad():
            for ids in tqdm(batches.split(batch), desc="calibrate", unit="win",
                            disable=not self.context.progress, file=sys.stderr):
                recorder.run(ids.to(device))
        linears = {name: s.entry() for name, s in per_name.items() if s.absmax is not None}
        gm.meta[CALIBRATION_KEY] = {"text": opts.text, "samples": opts.samples,
                                    "seqlen": opts.seqlen, "seed": opts.seed,
                                    "hessian": opts.hessian, "linears": linears}
        top = sorted(linears.items(), key=lambda kv: -kv[1]["tensor_absmax"])[:3]
        log.debug("calibrate: %d linears, %d windows", len(linears), batches.shape[0])
        facts = {
            "linears_observed": len(linears),
            "windows": int(batches.shape[0]),
            "tokens": int(batches.numel()),
            "hessian": opts.hessian,
            "largest_input_absmax": {k: round(v["tensor_absmax"], 4) for k, v in top},
            "seconds_forward": round(time.perf_counter() - start, 3),
        }
        return PassResult(gm, False, facts)


def _device_of(gm: fx.GraphModule) -> torch.device:
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


def linear_stats(gm: fx.GraphModule, name: str) -> dict[str, Any] | None:
    """The calibration entry of linear ``name``, or None (no calibration or no entry)."""
    return gm.meta.get(CALIBRATION_KEY, {}).get("linears", {}).get(name)


def require_calibration(gm: fx.GraphModule, pass_name: str) -> dict[str, Any]:
    """The calibration record of ``gm``.

    Raises:
        PreconditionError: There is none; the message says to run ``calibrate`` first.
    """
    record = gm.meta.get(CALIBRATION_KEY)
    if not record or not record.get("linears"):
        raise PreconditionError(
            f"pass {pass_name!r} needs calibration statistics: run `calibrate` before it "
            f"(e.g. 'calibrate{{samples=32}},{pass_name}')"
        )
    return record


def rescale_input(gm: fx.GraphModule, name: str, s: torch.Tensor) -> bool:
    """Record that linear ``name`` now reads ``x / s`` (per input channel) instead of ``x``.

    Returns:
        Whether there was an entry to update.

    Raises:
        ValueError: ``s`` has a zero or non-finite value, or the wrong length.
    """
    entry = linear_stats(gm, name)
    if entry is None:
        return False
    s = s.detach().float().cpu()
    if s.shape != entry["absmax"].shape or not bool((torch.isfinite(s) & (s != 0)).all()):
        raise ValueError(f"cannot rescale the statistics of {name} by a {tuple(s.shape)} "
                         "factor with zero or non-finite values")
    entry["absmax"] = entry["absmax"] / s.abs()
    entry["tensor_absmax"] = float(entry["absmax"].max())
    if "hessian" in entry:
        entry["hessian"] = entry["hessian"] / torch.outer(s, s)
    return True


def drop_stats(gm: fx.GraphModule, names: list[str]) -> list[str]:
    """Delete the entries of ``names`` (their inputs changed in a way stats cannot follow).

    Returns:
        The names that had an entry.
    """
    linears = gm.meta.get(CALIBRATION_KEY, {}).get("linears", {})
    return [n for n in names if linears.pop(n, None) is not None]
