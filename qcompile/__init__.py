"""qcompile: a quantization compiler for PyTorch language models.

Importing this package stays light: it loads neither triton nor onnx. Heavier pieces
(capture, passes, backends) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from qcompile.errors import (
    ArtifactError,
    CaptureError,
    FormatError,
    ModelError,
    PassError,
    PipelineError,
    QCompileError,
    UnsupportedGraphError,
    WeightError,
)

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access. (No lazy name may
# equal a submodule's name: importing the submodule would rebind the package attribute.)
_LAZY = {
    "parse_format": "qcompile.formats",
    "FormatSpec": "qcompile.formats",
    "Pipeline": "qcompile.pipeline",
    "parse_pipeline": "qcompile.pipeline",
    "PassManager": "qcompile.manager",
    "get_recipe": "qcompile.recipes",
    "load_model": "qcompile.models",
    "perplexity": "qcompile.evaluate",
    "save_quantized": "qcompile.serialize",
    "quantize_model": "qcompile.api",
    "quantize_graph": "qcompile.api",
    "load_quantized": "qcompile.serialize",
    "export_onnx": "qcompile.backends.onnx",
    "compile": "qcompile.backends.inductor",
}

__all__ = [
    "ArtifactError",
    "CaptureError",
    "FormatError",
    "ModelError",
    "PassError",
    "PipelineError",
    "QCompileError",
    "UnsupportedGraphError",
    "WeightError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
