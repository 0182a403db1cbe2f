"""``torch.compile(model, backend="qcompile")``: a quantizing torch.compile backend.

The backend is registered through the ``torch_dynamo_backends`` entry point, so after
installing ``qcompile-llm``::

    model = torch.compile(model, backend="qcompile", options={"recipe": "w4-afpq"})
    model = torch.compile(model, backend="qcompile", options={"artifact": "out/smooth-w8a8"})

or, compiling in place so that ``model.generate()`` uses it::

    qcompile.compile(model, recipe="w4-afpq", dynamic=True)

Each graph dynamo produces is lifted to the offline capture's aten form, the pipeline runs once
per model (later graphs, recompiles and graph breaks replay the quantized weights), and the
result is compiled with Inductor. Options: :class:`BackendOptions`; counters:
:class:`CompileStats` (``backend_for(options).stats``).
"""

from __future__ import annotations

from qcompile.backends.inductor.backend import (
    CompileStats,
    QCompileBackend,
    backend_for,
    qcompile_backend,
)
from qcompile.backends.inductor.frontend import compile
from qcompile.backends.inductor.options import BackendOptionError, BackendOptions, parse_options

__all__ = [
    "BackendOptionError",
    "BackendOptions",
    "CompileStats",
    "QCompileBackend",
    "backend_for",
    "compile",
    "parse_options",
    "qcompile_backend",
]
