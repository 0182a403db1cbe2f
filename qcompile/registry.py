"""Name -> pass class registry.

Built-in passes are listed by module so that importing qcompile stays light: a pass module
is imported the first time its name is looked up. Third-party passes call ``register_pass``.
"""

from __future__ import annotations

import importlib

from qcompile.errors import PipelineError
from qcompile.pass_base import Pass

__all__ = ["BUILTIN_PASSES", "available_passes", "get_pass", "register_pass"]

# pass name -> module that defines it (module file named for what the pass does).
BUILTIN_PASSES: dict[str, str] = {
    "quantize": "qcompile.passes.quantize",
    "cleanup": "qcompile.passes.cleanup",
    "fuse-norms": "qcompile.passes.fuse_norms",
    "calibrate": "qcompile.passes.calibrate",
    "smooth": "qcompile.passes.smooth",
    "rotate": "qcompile.passes.rotate",
    "learn-rotation": "qcompile.passes.learn_rotation",
    "gptq": "qcompile.passes.gptq",
    "lorc": "qcompile.passes.lorc",
    "lower-triton": "qcompile.passes.lower_triton",
    "fuse-linears": "qcompile.passes.fuse_linears",
}

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` reachable by ``cls.name`` in pipeline text.

    Raises:
        ValueError: The name is empty, malformed, or taken by another class.
    """
    name = cls.name
    if not name or not name.replace("-", "").isalnum() or not name[0].isalpha():
        raise ValueError(f"pass class {cls.__name__} has an invalid name {name!r}")
    other = _REGISTRY.get(name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name {name!r} is taken by {other.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    """Look up a pass class by name.

    Raises:
        PipelineError: No pass has that name; the message lists the valid names.
    """
    if name not in _REGISTRY and name in BUILTIN_PASSES:
        importlib.import_module(BUILTIN_PASSES[name])
    if name not in _REGISTRY:
        valid = ", ".join(sorted(set(BUILTIN_PASSES) | set(_REGISTRY)))
        raise PipelineError(f"unknown pass {name!r}; valid passes: {valid}")
    return _REGISTRY[name]


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass, built-ins imported, sorted by name."""
    for name in BUILTIN_PASSES:
        get_pass(name)
    return dict(sorted(_REGISTRY.items()))
