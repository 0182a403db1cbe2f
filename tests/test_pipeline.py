"""Pipeline grammar: parse, print, round-trip, and errors that name what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from qcompile.errors import PipelineError
from qcompile.pass_base import Pass, PassResult
from qcompile.pipeline import parse_pipeline
from qcompile.registry import available_passes, get_pass, register_pass


@dataclass(frozen=True)
class _Opts:
    mode: Literal["hadamard", "random"] = "hadamard"
    seed: int = 0
    alpha: float = 0.5
    fmt: str = "fp4_e2m1/g128/asym"
    flag: bool = False
    maybe: int | None = None


@register_pass
class _DemoPass(Pass):
    name = "demo-pass"
    Options = _Opts

    def call(self, gm):
        return PassResult(gm, False)


@register_pass
class _Plain(Pass):
    name = "plain"

    def call(self, gm):
        return PassResult(gm, False)


CANONICAL = [
    "",
    "plain",
    "plain,plain",
    "demo-pass",
    "demo-pass{mode=random}",
    "demo-pass{mode=random seed=7 alpha=0.25}",
    "demo-pass{fmt=int4/g64/asym flag=true},plain",
    "demo-pass{maybe=3}",
    'demo-pass{fmt="a b,c"}',
    'demo-pass{fmt="q\\"x"}',
    "plain,demo-pass{seed=-1 alpha=1e-05}",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_text_round_trips(text):
    assert str(parse_pipeline(text)) == text
    assert parse_pipeline(str(parse_pipeline(text))) == parse_pipeline(text)


def test_parse_types_and_defaults():
    p = parse_pipeline(" demo-pass { seed=3  alpha=2 flag=yes fmt=nf4/g64 } , plain ")
    step = p.steps[0]
    assert step.options == _Opts(seed=3, alpha=2.0, flag=True, fmt="nf4/g64")
    assert isinstance(step.options.alpha, float)
    assert str(p) == "demo-pass{seed=3 alpha=2.0 fmt=nf4/g64 flag=true},plain"
    assert [s.name for s in p] == ["demo-pass", "plain"]
    # an option equal to its default is not printed
    assert str(parse_pipeline("demo-pass{seed=0}")) == "demo-pass"
    assert parse_pipeline("demo-pass{maybe=none}").steps[0].options.maybe is None


def test_option_dict_has_defaults():
    step = parse_pipeline("demo-pass{seed=5}").steps[0]
    assert step.option_dict() == {"mode": "hadamard", "seed": 5, "alpha": 0.5,
                                  "fmt": "fp4_e2m1/g128/asym", "flag": False, "maybe": None}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("nosuch", "unknown pass 'nosuch'; valid passes:"),
        ("demo-pass{bogus=1}", "has no option 'bogus'; valid options: mode, seed"),
        ("demo-pass{seed=x}", "must be an integer"),
        ("demo-pass{alpha=abc}", "must be a number"),
        ("demo-pass{flag=maybe}", "must be true or false"),
        ("demo-pass{mode=other}", "must be one of: hadamard, random"),
        ("demo-pass{seed=1 seed=2}", "given twice"),
        ("demo-pass{seed=1", "expected an option name or '}'"),
        ("demo-pass{seed}", "expected '='"),
        ("plain,", "expected a pass name after ','"),
        ("plain;plain", "expected ','"),
        ("Plain", "expected a pass name"),
        ('demo-pass{fmt="abc}', "unterminated quoted value"),
        ("plain{x=1}", "has no option 'x'; valid options: (none)"),
    ],
)
def test_errors_name_the_problem(text, needle):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg
    assert "column" in msg


def test_registry_lists_builtins_and_rejects_bad_names():
    names = available_passes()
    assert {"quantize", "cleanup", "demo-pass"} <= set(names)
    assert get_pass("plain") is _Plain
    with pytest.raises(PipelineError, match="valid passes: .*cleanup"):
        get_pass("nope")

    class Bad(Pass):
        name = "Bad Name"

    with pytest.raises(ValueError, match="invalid name"):
        register_pass(Bad)


def test_pass_rejects_wrong_options_type():
    with pytest.raises(TypeError, match="takes options of type _Opts"):
        _DemoPass(options=42)
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    result = _DemoPass()(gm)
    assert result.graph_module is gm and result.modified is False
