"""Typed errors. Every message names the thing that is wrong and what would be accepted."""

from __future__ import annotations

__all__ = [
    "QCompileError",
    "FormatError",
    "PipelineError",
    "PassError",
    "PreconditionError",
    "PostconditionError",
    "CaptureError",
    "UnsupportedGraphError",
    "ModelError",
    "WeightError",
    "ArtifactError",
]


class QCompileError(Exception):
    """Base class of every error qcompile raises on purpose."""


class FormatError(QCompileError, ValueError):
    """A number-format spec is malformed or cannot apply to a tensor."""


class PipelineError(QCompileError, ValueError):
    """Pipeline text is malformed, or names an unknown pass or option."""


class PassError(QCompileError):
    """A pass failed while running."""


class PreconditionError(PassError):
    """A pass's ``requires`` check failed: the graph is not what the pass needs."""


class PostconditionError(PassError):
    """A pass's ``ensures`` check failed: the pass produced a graph it promised not to."""


class CaptureError(QCompileError):
    """A model could not be captured into a graph."""


class UnsupportedGraphError(QCompileError):
    """The graph has structure a pass cannot transform; the message names the node."""


class ModelError(QCompileError, ValueError):
    """A model name or path cannot be resolved or loaded."""


class WeightError(QCompileError, ValueError):
    """Weights hold values that cannot be quantized (NaN or infinity)."""


class ArtifactError(QCompileError, ValueError):
    """A saved qcompile artifact is missing, malformed or does not match."""
