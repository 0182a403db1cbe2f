"""Quantized weights from a saved artifact, matched to a model's parameters by name."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcompile.backends.inductor.plan import QuantPlan, harvest, move_plan
from qcompile.errors import ArtifactError

__all__ = ["ArtifactPlan", "check_against", "load_artifact_plan"]

log = logging.getLogger(__name__)

# Passes that rewrite full-precision weights; after them the artifact's fp tensors may differ
# from the model's, so values are not compared (shapes still are).
_REWRITING_PASSES = ("smooth", "fuse-norms", "rotate")
# Passes that change the graph's structure: their artifacts cannot be mapped onto a model.
_STRUCTURAL_PASSES = ("fuse-norms", "rotate")
# Relative error ||deq(Wq) - W|| / ||W|| above which a quantized weight cannot come from W.
# 4-bit RTN of Gaussian weights gives about 0.1; an unrelated weight of like scale about 1.4.
_FOREIGN_REL_ERR = 0.5


@dataclass
class ArtifactPlan:
    """A plan read from an artifact, plus what is needed to check it against a model.

    Attributes:
        plan: The per-weight plan (every quantized weight and every plain tensor).
        path: The artifact directory.
        pipeline: The pipeline text recorded in the artifact ("" if none).
        checked: ids of model tensors already checked.
    """

    plan: QuantPlan
    path: str
    pipeline: str
    checked: set[int] = field(default_factory=set)
    _moved: dict[str, QuantPlan] = field(default_factory=dict)

    def on(self, device: torch.device) -> QuantPlan:
        """The plan with its tensors on ``device`` (moved once per device, then cached)."""
        if device.type == "cpu":
            return self.plan
        key = str(device)
        if key not in self._moved:
            self._moved[key] = move_plan(self.plan, device)
        return self._moved[key]

    @property
    def compares_values(self) -> bool:
        """Whether full-precision tensors must equal the model's (no weight-rewriting pass)."""
        return not any(name in _REWRITING_PASSES for name in _pass_names(self.pipeline))


def _pass_names(pipeline: str) -> list[str]:
    """Pass names of pipeline text (options skipped; braces may hold commas-free text)."""
    names, depth, word = [], 0, ""
    for ch in pipeline + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            names.append(word.strip())
            word = ""
        elif depth == 0:
            word += ch
    return [n for n in names if n]


def load_artifact_plan(path: str | Path) -> ArtifactPlan:
    """Load an artifact and read its plan.

    Raises:
        ArtifactError: The directory is not a readable artifact.
        UnsupportedGraphError: The artifact's graph has quantization the backend cannot
            replay on a dynamo graph (e.g. K/V quantization); the message names the node.
    """
    from qcompile.serialize import load_quantized

    gm, _tok, meta = load_quantized(path, with_tokenizer=False)
    pipeline = str(meta.get("pipeline", "") or "")
    structural = [p for p in _STRUCTURAL_PASSES if p in _pass_names(pipeline)]
    if structural:
        raise ArtifactError(
            f"artifact {path} was made with {', '.join(structural)}, which rewrite the graph "
            "itself (norms folded away, rotations), not only weights; the torch.compile "
            "backend replays weight and linear-input quantization only. Run such artifacts "
            "with the reference backend (qcompile eval --artifact)"
        )
    plan = harvest(gm, state=None)
    log.info("artifact %s: %d quantized weights, %d plain tensors, pipeline %r", path,
             len(plan.linears), len(plan.values), pipeline)
    return ArtifactPlan(plan, str(path), pipeline)


def _rel_err(deq: torch.Tensor, w: torch.Tensor) -> float:
    w = w.detach().float()
    return float((deq.float() - w).norm() / w.norm().clamp_min(1e-30))


def check_against(art: ArtifactPlan, state: dict[str, torch.Tensor],
                  linear_weights: set[str]) -> None:
    """Check that the artifact fits the tensors a graph reads; raise on the first mismatch.

    Every parameter the graph reads must be in the artifact (quantized or plain) with the same
    shape; buffers missing from the artifact keep the model's values. Without a
    weight-rewriting pass in the artifact's pipeline, plain tensors must equal the model's and
    quantized weights must dequantize close to them (catches a same-shaped other model).

    Args:
        art: The artifact plan.
        state: FQN -> model tensor, for the graph being compiled.
        linear_weights: FQNs the graph reads as linear weights.

    Raises:
        ArtifactError: Naming the first mismatching tensor and what differs.
    """
    plan = art.plan
    for fqn, tensor in state.items():
        if id(tensor) in art.checked:
            continue
        shape = tuple(tensor.shape)
        lp = plan.linears.get(fqn)
        if lp is not None and lp.weight is not None:
            if fqn not in linear_weights:
                raise ArtifactError(
                    f"artifact {art.path}: {fqn} is quantized there but this graph reads it "
                    "outside a linear; the artifact does not fit this model"
                )
            if lp.weight.shape != shape:
                raise ArtifactError(
                    f"artifact {art.path}: tensor {fqn} has shape {lp.weight.shape} there but "
                    f"{shape} in the model"
                )
            if art.compares_values and tensor.untyped_storage().nbytes():
                err = _rel_err(_dequant(lp.weight), tensor)
                if err > _FOREIGN_REL_ERR:
                    raise ArtifactError(
                        f"artifact {art.path}: quantized {fqn} is {err:.2f} (relative) away "
                        "from the model's weight; the artifact was made from another model"
                    )
        elif fqn in plan.values:
            value = plan.values[fqn]
            if tuple(value.shape) != shape:
                raise ArtifactError(
                    f"artifact {art.path}: tensor {fqn} has shape {tuple(value.shape)} there "
                    f"but {shape} in the model"
                )
            if art.compares_values and tensor.untyped_storage().nbytes() and not torch.equal(
                value.to(tensor.device, tensor.dtype), tensor.detach()
            ):
                raise ArtifactError(
                    f"artifact {art.path}: tensor {fqn} differs from the model's; the artifact "
                    "was made from another model"
                )
        elif isinstance(tensor, torch.nn.Parameter):
            raise ArtifactError(
                f"artifact {art.path} has no tensor {fqn} (shape {shape}) that the model "
                "reads; it was made from another model, or names differ (compile through "
                "qcompile.compile(model, artifact=...) to use the model's own names)"
            )
        art.checked.add(id(tensor))


def _dequant(wp: Any) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.qcompile.dequantize_weight(*wp.tensors, wp.fmt, wp.k, torch.float32)
