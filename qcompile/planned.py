"""Planned weight quantization: codes decided by one pass, inserted into the graph by another.

``gptq`` (and ``lorc`` when it quantizes by rounding) decide a weight's codes and scales but
leave the full-precision weight in the graph; ``quantize`` later turns it into packed codes +
``qcompile::dequantize_weight`` using exactly the planned :class:`QTensor`, so error
compensation and the activation / KV options of ``quantize`` compose freely.

A plan records a fingerprint of the weight it was made for. A pass that changes the weight in
between (e.g. ``rotate`` or ``smooth`` placed after ``gptq``) makes the plan stale, and
:func:`planned_weight` refuses it rather than inserting codes for a different weight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from qcompile.errors import PassError
from qcompile.formats.quantize import QTensor
from qcompile.graph import get_attr_value

__all__ = ["PLANS_KEY", "Plan", "fingerprint", "planned_weight", "plans", "set_plan"]

PLANS_KEY = "qcompile.planned"


@dataclass
class Plan:
    """A weight's decided quantization.

    Attributes:
        qtensor: Codes and scales.
        by: The pass that decided it.
        fingerprint: :func:`fingerprint` of the weight it was decided for.
    """

    qtensor: QTensor
    by: str
    fingerprint: str


def fingerprint(t: torch.Tensor) -> str:
    """SHA-1 of a tensor's dtype, shape and bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def plans(gm: torch.fx.GraphModule) -> dict[str, Plan]:
    """The graph's plans by weight attribute (empty if none); mutable."""
    return gm.meta.setdefault(PLANS_KEY, {})


def set_plan(gm: torch.fx.GraphModule, target: str, qtensor: QTensor, by: str) -> None:
    """Record ``qtensor`` as the quantization of weight attribute ``target``."""
    plans(gm)[target] = Plan(qtensor, by, fingerprint(get_attr_value(gm, target)))


def planned_weight(gm: torch.fx.GraphModule, target: str) -> Plan | None:
    """The plan of ``target``, or None.

    Raises:
        PassError: The weight changed since the plan was made (a pass between the planning
            pass and ``quantize`` rewrote it).
    """
    plan = gm.meta.get(PLANS_KEY, {}).get(target)
    if plan is None:
        return None
    if fingerprint(get_attr_value(gm, target)) != plan.fingerprint:
        raise PassError(
            f"weight {target!r} changed after `{plan.by}` decided its quantization (a pass "
            f"between them rewrote it); run weight-changing passes (fuse-norms, rotate, smooth) "
            f"before `{plan.by}`"
        )
    return plan
