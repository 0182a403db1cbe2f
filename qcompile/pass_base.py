"""The pass interface: options as frozen dataclasses, ``requires`` / ``call`` / ``ensures``.

A pass is a class with a ``name`` (its word in pipeline text), an ``Options`` frozen dataclass
(its ``{k=v ...}`` in pipeline text) and ``call(gm) -> PassResult``. ``PassResult.modified``
must be computed from what the pass did, never assumed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx

from qcompile.errors import PipelineError, PostconditionError, PreconditionError

__all__ = [
    "NoOptions",
    "Pass",
    "PassContext",
    "PassResult",
    "format_option_value",
    "parse_option_value",
]


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassResult:
    """What a pass returns.

    Attributes:
        graph_module: The graph after the pass (often the same object, mutated).
        modified: Whether the pass changed the graph or its attributes.
        facts: JSON-able numbers and names the pass wants in the report
            (match counts, errors measured by self-checks, skipped nodes and why).
    """

    graph_module: torch.fx.GraphModule
    modified: bool
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pipeline run shares between passes beyond the graph itself.

    Attributes:
        tokenizer: Tokenizer of the model, for passes that read calibration text.
        progress: Whether long passes show tqdm progress bars (on stderr).
        device: Device passes run their computations on (None: where the weights are).
        state: Free-form store for passes that hand data to later passes (e.g. activation
            statistics from calibration).
    """

    tokenizer: Any = None
    progress: bool = True
    device: Any = None
    state: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass.

    Subclasses set ``name`` and ``Options`` and implement ``call``; they may override
    ``requires`` (raise ``PreconditionError`` when the graph is not what the pass needs) and
    ``ensures`` (raise ``PostconditionError`` when the result breaks a promise).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""

    def __init__(self, options: Any = None, context: PassContext | None = None) -> None:
        if options is None:
            options = self.Options()
        if not isinstance(options, self.Options):
            raise TypeError(
                f"pass {self.name!r} takes options of type {self.Options.__name__}, "
                f"got {type(options).__name__}"
            )
        self.options = options
        self.context = context if context is not None else PassContext()

    def requires(self, gm: torch.fx.GraphModule) -> None:
        """Check preconditions; raise ``PreconditionError`` naming what is missing."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        """Run the pass on ``gm``."""
        raise NotImplementedError(f"pass {type(self).__name__} does not implement call()")

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """Check postconditions; raise ``PostconditionError`` naming what is wrong."""

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        self.ensures(result.graph_module)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    @staticmethod
    def fail_requires(message: str) -> None:
        """Raise a ``PreconditionError`` (helper for subclasses)."""
        raise PreconditionError(message)

    @staticmethod
    def fail_ensures(message: str) -> None:
        """Raise a ``PostconditionError`` (helper for subclasses)."""
        raise PostconditionError(message)


# ----------------------------------------------------------------------------------------
# Option values <-> text. Types come from the dataclass field annotations.


def _resolve_type(options_cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(options_cls)
    return hints[f.name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def parse_option_value(pass_name: str, options_cls: type, key: str, text: str) -> Any:
    """Convert the text of one option to the type its dataclass field declares.

    Raises:
        PipelineError: The key is unknown or the text does not fit the type.
    """
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    if key not in fields:
        valid = ", ".join(fields) or "(none)"
        raise PipelineError(f"pass {pass_name!r} has no option {key!r}; valid options: {valid}")
    tp, optional = _unwrap_optional(_resolve_type(options_cls, fields[key]))
    if optional and text in ("none", "None"):
        return None
    where = f"option {key}={text!r} of pass {pass_name!r}"
    if tp is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise PipelineError(f"{where} must be true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise PipelineError(f"{where} must be an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise PipelineError(f"{where} must be a number") from None
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise PipelineError(f"{where} must be one of: {', '.join(map(str, choices))}")
        return text
    if tp is str:
        return text
    raise PipelineError(f"{where}: options of type {tp!r} cannot be set from text")


def format_option_value(value: Any) -> str:
    """Print an option value so that ``parse_option_value`` reads it back equal."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
