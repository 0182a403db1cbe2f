"""The ``qcompile`` dynamo backend: quantize once per model, compile every graph with Inductor.

For each graph dynamo hands over, the backend

1. lifts it to the capture's aten form (:mod:`qcompile.backends.inductor.lift`),
2. replays the quantization already decided for the weights it reads
   (:mod:`qcompile.backends.inductor.plan`), from a saved artifact or from earlier graphs,
3. runs the pipeline only if the graph reads linear weights nothing has decided on yet (the
   first graph of a model, or a graph break that reaches new layers), recording the result
   for later graphs,
4. optionally frees the full-precision weights no graph reads any more, and
5. compiles the result with Inductor, which generates the weight decode itself
   (:mod:`qcompile.backends.inductor.decomp`; single-row linears of decode steps become a
   fusable multiply-reduce, :mod:`qcompile.backends.inductor.gemv`), or runs it eagerly with
   ``inductor=False``.

Backends are shared by option set (:func:`backend_for`), so recompiles, graph breaks and even
``torch._dynamo.reset()`` reuse quantized weights; :class:`CompileStats` counts what ran.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.backends.inductor.artifact import ArtifactPlan, check_against, load_artifact_plan
from qcompile.backends.inductor.lift import LiftedGraph, lift_graph
from qcompile.backends.inductor.options import BackendOptions, parse_options
from qcompile.backends.inductor.plan import QuantPlan, apply_plan, harvest
from qcompile.errors import PassError, PipelineError, QCompileError, UnsupportedGraphError
from qcompile.graph import get_attr_value, is_linear

__all__ = ["CompileStats", "QCompileBackend", "backend_for", "qcompile_backend"]

log = logging.getLogger(__name__)

# Passes whose rewrite needs the whole model (residual stream, every norm): they cannot run on
# the partial graphs dynamo produces. Use them offline and pass the artifact instead.
_WHOLE_MODEL_PASSES = ("fuse-norms", "rotate", "smooth", "calibrate")


@dataclass
class CompileStats:
    """What the backend did, for reports and tests.

    Attributes:
        graphs: Graphs compiled (first compiles, recompiles and graph-break pieces).
        pipeline_runs: Times the pipeline ran (once per model unless a later graph reaches
            weights no earlier graph read).
        weights_quantized: Weights quantized in total; each at most once.
        per_weight: Weight FQN -> times it was quantized (1 each).
        weights_replayed: Weight reads rewritten from cached quantized tensors.
        fp_weight_bytes: Bytes of the full-precision weights that were quantized.
        quantized_bytes: Bytes of the packed weights (codes and scales).
        freed_bytes: Bytes of full-precision weights released (``free_weights=True``).
        graph_breaks: Graph breaks dynamo reported while this backend was in use.
        break_reasons: Their reasons, as dynamo words them.
        compile_seconds: Wall time spent in the backend (lift, quantize, Inductor).
        reports: The pipeline's reports, one per run.
        linears_fused: Linears merged into wider ones by ``fuse-linears`` (all graphs).
    """

    graphs: int = 0
    pipeline_runs: int = 0
    weights_quantized: int = 0
    per_weight: dict[str, int] = field(default_factory=dict)
    weights_replayed: int = 0
    fp_weight_bytes: int = 0
    quantized_bytes: int = 0
    freed_bytes: int = 0
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    reports: list[dict[str, Any]] = field(default_factory=list)
    linears_fused: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return asdict(self)


def _graph_break_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


class QCompileBackend:
    """A dynamo backend bound to one option set; callable as ``backend(gm, example_inputs)``.

    Args:
        options: Parsed options.
        names: Optional tensor -> FQN map of a registered model (authoritative names).
    """

    def __init__(self, options: BackendOptions,
                 names: WeakIdKeyDictionary | None = None) -> None:
        self.options = options
        self.stats = CompileStats()
        self._names = names if names is not None else WeakIdKeyDictionary()
        self._plans: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight tensor -> (fqn, lp)
        self._skipped: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> reason
        self._freed: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> fqn
        self._artifact: ArtifactPlan | None = None
        self._breaks_at_start = _graph_break_counts()
        self._pipeline = self._resolve_pipeline()

    # -------------------------------------------------------------------- configuration

    def _resolve_pipeline(self) -> str | None:
        from qcompile.api import resolve_pipeline

        opts = self.options
        if opts.artifact is not None:
            self._artifact = load_artifact_plan(opts.artifact)
            return None
        pipeline = resolve_pipeline(opts.recipe, opts.pipeline)
        whole = [s.name for s in pipeline if s.name in _WHOLE_MODEL_PASSES]
        if whole:
            raise PipelineError(
                f"pass(es) {', '.join(whole)} need the whole model (and calibration data) and "
                "cannot run on the graphs torch.compile produces; run them offline with "
                "`qcompile quantize ... --out DIR` and pass options={'artifact': DIR}"
            )
        return str(pipeline)

    def register_model(self, model: torch.nn.Module) -> None:
        """Name ``model``'s tensors by their FQNs in it (used over dynamo's relative names)."""
        for fqn, t in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(t, fqn)
        for fqn, t in model.named_buffers(remove_duplicate=False):
            self._names.setdefault(t, fqn)

    def check_model(self, model: torch.nn.Module) -> None:
        """Check an artifact against every parameter of ``model`` now, not at first call.

        Raises:
            ArtifactError: Naming the first mismatching tensor.
        """
        if self._artifact is None:
            return
        state = dict(model.named_parameters(remove_duplicate=False))
        state.update(model.named_buffers(remove_duplicate=False))
        check_against(self._artifact, state, set(self._artifact.plan.linears))

    def _fqn_of(self, tensor: torch.Tensor) -> str | None:
        return self._names.get(tensor)

    # -------------------------------------------------------------------- the backend

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]
                 ) -> Callable[..., Any]:
        start = time.perf_counter()
        try:
            try:
                lifted = lift_graph(gm, example_inputs, self._fqn_of)
                self._quantize(lifted)
                self._lower(lifted)
            except QCompileError:
                raise
            except Exception as exc:  # dynamo turns some types into a silent eager fallback
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise PassError(
                    f"qcompile backend failed on a graph of {len(gm.graph.nodes)} nodes: "
                    f"{type(exc).__name__}: {first}"
                ) from exc
            # Inductor's own exceptions pass through: some ask dynamo to restart the analysis.
            compiled = self._compile(lifted, example_inputs)
            self._free(lifted)
        finally:
            self.stats.compile_seconds += time.perf_counter() - start
            self._update_breaks()
        self.stats.graphs += 1
        index = lifted.runtime_index

        def run(*args: Any) -> Any:
            return compiled(*[args[i] for i in index])

        run._qcompile_graph = lifted.gm  # type: ignore[attr-defined]
        return run

    def _linear_weights(self, lifted: LiftedGraph) -> dict[str, torch.Tensor]:
        out = {}
        for node in lifted.gm.graph.nodes:
            if is_linear(node) and isinstance(node.args[1], fx.Node):
                w = node.args[1]
                if w.op == "get_attr" and str(w.target) in lifted.state:
                    out[str(w.target)] = lifted.state[str(w.target)]
        return out

    def _known_plan(self, lifted: LiftedGraph) -> QuantPlan:
        """The plan for this graph's weights from the cache (by tensor, named as here)."""
        plan = QuantPlan()
        for fqn, t in lifted.state.items():
            if t in self._plans:
                plan.linears[fqn] = self._plans[t]
            elif t in self._skipped:
                plan.skipped[fqn] = self._skipped[t]
        return plan

    def _quantize(self, lifted: LiftedGraph) -> None:
        gm = lifted.gm
        weights = self._linear_weights(lifted)
        for fqn, t in weights.items():
            if t in self._freed and t not in self._plans:
                raise UnsupportedGraphError(
                    f"weight {fqn} was freed (free_weights=True) but a new graph reads it "
                    "in full precision; compile without free_weights"
                )
        if self._artifact is not None:
            check_against(self._artifact, lifted.state, set(weights))
            device = next(iter(lifted.state.values())).device if lifted.state else None
            plan = self._artifact.on(device) if device is not None else self._artifact.plan
            replaced = apply_plan(gm, plan)
            self.stats.weights_replayed += len(replaced)
            for fqn in replaced:
                t = lifted.state[fqn]
                if t not in self._plans:  # first graph reading it: count its bytes once
                    self._plans[t] = plan.linears[fqn]
                    self.stats.fp_weight_bytes += t.numel() * t.element_size()
                    self.stats.quantized_bytes += plan.linears[fqn].weight.nbytes
            return
        known = self._known_plan(lifted)
        replaced = apply_plan(gm, known)
        self.stats.weights_replayed += len(replaced)
        fresh = {fqn: t for fqn, t in weights.items() if not known.decided(fqn)}
        if not fresh:
            return
        self._run_pipeline(lifted, fresh)

    def _run_pipeline(self, lifted: LiftedGraph, fresh: dict[str, torch.Tensor]) -> None:
        from qcompile.api import quantize_graph

        try:
            gm, report = quantize_graph(lifted.gm, self._pipeline, progress=False,
                                        verify=self.options.verify)
        except UnsupportedGraphError:
            raise
        except QCompileError as exc:
            raise type(exc)(f"qcompile backend, pipeline {self._pipeline!r}: {exc}") from exc
        lifted.gm = gm
        self.stats.pipeline_runs += 1
        self.stats.reports.append(report)
        plan = harvest(gm, state=lifted.state)
        skipped: dict[str, str] = {}
        for entry in report["passes"]:
            for name, why in entry["facts"].get("skipped", {}).items():
                skipped[f"{name}.weight"] = why
        quantized = 0
        for fqn, t in fresh.items():
            lp = plan.linears.get(fqn)
            if lp is not None and lp.weight is not None:
                self._plans[t] = lp
                quantized += 1
                self.stats.weights_quantized += 1
                self.stats.per_weight[fqn] = self.stats.per_weight.get(fqn, 0) + 1
                self.stats.fp_weight_bytes += t.numel() * t.element_size()
                self.stats.quantized_bytes += lp.weight.nbytes
            elif lp is not None:
                self._plans[t] = lp
            else:
                self._skipped[t] = skipped.get(fqn, "left in full precision by the pipeline")
        log.info("qcompile: pipeline %s quantized %d of %d new weights", self._pipeline,
                 quantized, len(fresh))

    def _fuse(self, lifted: LiftedGraph) -> None:
        """``fuse-linears`` (and ``cleanup``), then point the cached plans of the fused weights
        at row views of the fused tensors: the members' own tensors are released, and a later
        graph that reads them (views back to back) fuses them without copying."""
        if not self.options.fuse_linears:
            return
        from qcompile.api import quantize_graph

        gm = lifted.gm
        before = {str(n.target): get_attr_value(gm, str(n.target))
                  for n in gm.graph.nodes if n.op == "get_attr"}
        lifted.gm, report = quantize_graph(gm, "fuse-linears,cleanup", progress=False)
        self.stats.reports.append(report)
        groups = report["passes"][0]["facts"]["fused"]
        self.stats.linears_fused += sum(len(g["linears"]) for g in groups)
        by_packed = {id(lp.weight.tensors[0]): lp for lp in self._plans.values()
                     if lp.weight is not None}
        for group in groups:
            fused = [None if a is None else get_attr_value(lifted.gm, a)
                     for a in group["attrs"][:5]]
            total, start = sum(group["rows"]), 0
            for name, rows in zip(group["weights"], group["rows"], strict=True):
                lp = by_packed.get(id(before.get(name)))
                if lp is not None and lp.weight is not None:
                    lp.weight = dataclasses.replace(lp.weight, tensors=tuple(
                        old if f is None or old is None or f.shape[0] != total
                        or old.shape[0] != rows else f[start:start + rows]
                        for old, f in zip(lp.weight.tensors, fused, strict=True)))
                start += rows

    def _lower(self, lifted: LiftedGraph) -> None:
        """``fuse-linears`` (option ``fuse_linears``), then ``lower-triton`` on CUDA graphs
        (``lower=auto``) or on every graph (``always``)."""
        self._fuse(lifted)
        if self.options.lower == "none":
            return
        on_cuda = any(t.is_cuda for t in lifted.state.values())
        if self.options.lower == "auto" and not on_cuda:
            return
        from qcompile.api import quantize_graph

        opts = [o for o, on in (("fp32_accumulate=true", self.options.fp32_accumulate),
                                ("decode_fusion=false", not self.options.decode_fusion),
                                ("attention=false", not self.options.decode_attention)) if on]
        lowering = "lower-triton" + ("{" + " ".join(opts) + "}" if opts else "")
        lifted.gm, report = quantize_graph(lifted.gm, lowering, progress=False)
        self.stats.reports.append(report)

    def _compile(self, lifted: LiftedGraph, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        gm = lifted.gm
        if not self.options.inductor:
            return gm.forward
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        from qcompile.backends.inductor.decomp import inductor_decompositions
        from qcompile.backends.inductor.gemv import rewrite_single_row_linears

        rewrite_single_row_linears(gm)
        patches = list_mode_options(self.options.mode) if self.options.mode else {}
        inputs = [example_inputs[i] for i in lifted.runtime_index]
        return compile_fx(gm, inputs, config_patches=patches,
                          decompositions=inductor_decompositions(gm))

    def _free(self, lifted: LiftedGraph) -> None:
        """Release full-precision weights that were quantized and that this graph no longer reads."""
        if not self.options.free_weights:
            return
        read = {id(v) for _, v in lifted.gm.named_parameters(remove_duplicate=False)}
        read |= {id(v) for _, v in lifted.gm.named_buffers(remove_duplicate=False)}
        for fqn, t in lifted.state.items():
            if t in self._freed or id(t) in read or t not in self._plans:
                continue
            if self._plans[t].weight is None:
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            storage.resize_(0)
            self._freed[t] = fqn
            self.stats.freed_bytes += nbytes
            log.info("qcompile: freed %s (%d bytes)", fqn, nbytes)

    def _update_breaks(self) -> None:
        now = _graph_break_counts()
        total = 0
        reasons = []
        for reason, count in now.items():
            extra = count - self._breaks_at_start.get(reason, 0)
            if extra > 0:
                total += extra
                reasons.append(reason)
        if total > self.stats.graph_breaks:
            log.warning("qcompile: %d graph break(s) so far: %s", total, "; ".join(reasons))
        self.stats.graph_breaks = total
        self.stats.break_reasons = reasons


_BACKENDS: dict[tuple, QCompileBackend] = {}


def backend_for(options: dict[str, Any] | BackendOptions | None = None,
                mode: str | None = None) -> QCompileBackend:
    """The shared backend for an option set (created on first use).

    Raises:
        BackendOptionError: Bad options (see :func:`parse_options`).
        PipelineError: Unknown recipe, malformed pipeline, or a whole-model pass.
    """
    opts = options if isinstance(options, BackendOptions) else parse_options(options, mode)
    key = opts.key()
    if key not in _BACKENDS:
        _BACKENDS[key] = QCompileBackend(opts)
    return _BACKENDS[key]


def qcompile_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                     options: dict[str, Any] | None = None, mode: str | None = None
                     ) -> Callable[..., Any]:
    """The ``torch_dynamo_backends`` entry point: ``torch.compile(m, backend="qcompile")``.

    Args:
        gm: Dynamo's graph.
        example_inputs: Dynamo's example inputs.
        options: ``torch.compile``'s ``options`` dict (see :class:`BackendOptions`).
        mode: ``torch.compile``'s ``mode``.

    Returns:
        The compiled callable dynamo runs in place of the graph.
    """
    return backend_for(options, mode)(gm, example_inputs)
