"""Pipeline text: parse into pass options and print back.

Grammar (whitespace allowed around ``,``, ``{``, ``}``)::

    pipeline := ""  |  step ("," step)*
    step     := NAME [ "{" [ option (WS option)* ] "}" ]
    option   := KEY "=" VALUE
    NAME     := [a-z][a-z0-9-]*          KEY := [a-z_][a-z0-9_]*
    VALUE    := any run of characters but whitespace , { } "   |   "double-quoted"  (\\" \\\\ escapes)

Values may hold ``/ _ . - * ? | :`` unquoted, so formats (``fp4_e2m1/g128/asym``) and globs
need no quotes. Printing emits options that differ from their defaults, in the order the
options dataclass declares them, so ``str(parse_pipeline(text)) == text`` for canonical text
and ``parse_pipeline(str(p)) == p`` always.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from qcompile.errors import FormatError, PipelineError
from qcompile.pass_base import Pass, PassContext, format_option_value, parse_option_value
from qcompile.registry import get_pass

__all__ = ["Pipeline", "PipelineStep", "parse_pipeline"]

_NAME = re.compile(r"[a-z][a-z0-9-]*")
_KEY = re.compile(r"[a-z_][a-z0-9_]*")
_SAFE = re.compile(r'[^\s,{}"]+')


@dataclass(frozen=True)
class PipelineStep:
    """One pass in a pipeline: its name and its options dataclass instance."""

    name: str
    options: Any

    @property
    def pass_class(self) -> type[Pass]:
        """The pass class this step runs."""
        return get_pass(self.name)

    def instantiate(self, context: PassContext | None = None) -> Pass:
        """A ready-to-run pass object."""
        return self.pass_class(self.options, context)

    def option_dict(self) -> dict[str, Any]:
        """All options (defaults included) as a JSON-able dict."""
        return {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}

    def __str__(self) -> str:
        parts = []
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            default = f.default
            if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if default is not dataclasses.MISSING and value == default:
                continue
            parts.append(f"{f.name}={_quote(format_option_value(value))}")
        return f"{self.name}{{{' '.join(parts)}}}" if parts else self.name


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of pass steps; ``str()`` gives canonical pipeline text."""

    steps: tuple[PipelineStep, ...] = ()

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __add__(self, other: Pipeline) -> Pipeline:
        return Pipeline(self.steps + tuple(other.steps))


def _quote(value: str) -> str:
    if value and _SAFE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> PipelineError:
        pos = self.pos if pos is None else pos
        return PipelineError(f"{message} at column {pos + 1} of pipeline {self.text!r}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {ch!r}, found {found}")
        self.pos += 1

    def match(self, pattern: re.Pattern, what: str) -> str:
        m = pattern.match(self.text, self.pos)
        if not m:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {what}, found {found}")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        if self.peek() != '"':
            m = _SAFE.match(self.text, self.pos)
            if not m:
                raise self.error("expected an option value")
            self.pos = m.end()
            return m.group(0)
        self.pos += 1
        out = []
        while True:
            ch = self.peek()
            if not ch:
                raise self.error("unterminated quoted value")
            self.pos += 1
            if ch == '"':
                return "".join(out)
            if ch == "\\":
                nxt = self.peek()
                if nxt not in ('"', "\\"):
                    raise self.error("only \\\" and \\\\ escapes are allowed")
                self.pos += 1
                ch = nxt
            out.append(ch)


def _parse_step(sc: _Scanner) -> PipelineStep:
    start = sc.pos
    name = sc.match(_NAME, "a pass name")
    try:
        cls = get_pass(name)
    except PipelineError as e:
        raise sc.error(str(e), start) from None
    values: dict[str, Any] = {}
    sc.skip_ws()
    if sc.peek() == "{":
        sc.pos += 1
        sc.skip_ws()
        while sc.peek() != "}":
            key_pos = sc.pos
            key = sc.match(_KEY, f"an option name or '}}' in pass {name!r}")
            sc.expect("=")
            text = sc.value()
            if key in values:
                raise sc.error(f"option {key!r} given twice in pass {name!r}", key_pos)
            try:
                values[key] = parse_option_value(name, cls.Options, key, text)
            except PipelineError as e:
                raise sc.error(str(e), key_pos) from None
            after = sc.pos
            sc.skip_ws()
            if sc.peek() not in ("}", "") and sc.pos == after:
                raise sc.error("options must be separated by whitespace")
        sc.expect("}")
    try:
        options = cls.Options(**values)
    except FormatError as e:
        # keep the type: a bad format is a format error wherever it is written
        raise FormatError(str(sc.error(f"in pass {name!r}: {e}", start))) from None
    except (ValueError, TypeError) as e:
        raise sc.error(f"invalid options for pass {name!r}: {e}", start) from None
    return PipelineStep(name, options)


def parse_pipeline(text: str | Pipeline) -> Pipeline:
    """Parse pipeline text (see the module docstring for the grammar).

    Raises:
        PipelineError: Malformed text, an unknown pass or option, or a bad option value;
            the message names it, gives the column, and lists what is valid.
    """
    if isinstance(text, Pipeline):
        return text
    if not isinstance(text, str):
        raise PipelineError(f"pipeline must be text, got {type(text).__name__}")
    sc = _Scanner(text)
    sc.skip_ws()
    steps: list[PipelineStep] = []
    if not sc.peek():
        return Pipeline(())
    while True:
        steps.append(_parse_step(sc))
        sc.skip_ws()
        if not sc.peek():
            break
        sc.expect(",")
        sc.skip_ws()
        if not sc.peek():
            raise sc.error("expected a pass name after ','")
    return Pipeline(tuple(steps))
