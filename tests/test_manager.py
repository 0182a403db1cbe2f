"""PassManager: runs passes in order, reports honestly, verifies graphs, names failures."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from qcompile.errors import PassError, PostconditionError, PreconditionError
from qcompile.manager import PassManager
from qcompile.pass_base import Pass, PassResult
from qcompile.registry import register_pass


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.relu(x @ self.w) + 1


def _gm():
    return torch.fx.symbolic_trace(_Tiny())


@dataclass(frozen=True)
class _AddOpts:
    times: int = 1


@register_pass
class _AddNeg(Pass):
    """Appends ``times`` double negations before the output (function unchanged)."""

    name = "test-add-neg"
    Options = _AddOpts

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        val = out.args[0]
        for _ in range(self.options.times):
            with gm.graph.inserting_before(out):
                a = gm.graph.call_function(torch.neg, (val,))
                val = gm.graph.call_function(torch.neg, (a,))
        out.args = (val,)
        gm.recompile()
        return PassResult(gm, self.options.times > 0, {"pairs": self.options.times})


@register_pass
class _Noop(Pass):
    name = "test-noop"

    def call(self, gm):
        return PassResult(gm, False)


@register_pass
class _Breaks(Pass):
    name = "test-bad-attr"

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.get_attr("does.not.exist")
        return PassResult(gm, True)


@register_pass
class _Raises(Pass):
    name = "test-raises"

    def call(self, gm):
        raise RuntimeError("boom")


@register_pass
class _Needs(Pass):
    name = "test-needs"

    def requires(self, gm):
        self.fail_requires("test-needs needs a node named 'magic'")


def test_report_counts_and_function_kept():
    gm = _gm()
    x = torch.randn(3, 4)
    ref = gm(x)
    gm2, report = PassManager("test-add-neg{times=2},test-noop").run(gm)
    torch.testing.assert_close(gm2(x), ref, rtol=0, atol=0)
    json.dumps(report)  # JSON-able
    assert report["pipeline"] == "test-add-neg{times=2},test-noop"
    first, second = report["passes"]
    assert first["name"] == "test-add-neg" and first["modified"] is True
    assert first["nodes_added"] == 4 and first["nodes_removed"] == 0
    assert first["nodes_after"] == first["nodes_before"] + 4
    assert first["facts"] == {"pairs": 2}
    assert first["options"] == {"times": 2}
    assert second["modified"] is False and second["nodes_added"] == 0
    assert all(e["seconds"] >= 0 for e in report["passes"])


def test_probe_facts_are_recorded():
    gm = _gm()
    x = torch.randn(2, 4)
    ref = gm(x).clone()
    pm = PassManager("test-add-neg", probe=lambda g: {"max_abs_err": (g(x) - ref).abs().max()})
    _, report = pm.run(gm)
    assert report["passes"][0]["facts"]["max_abs_err"] == 0.0


def test_verify_catches_missing_attribute():
    with pytest.raises(PostconditionError, match="does.not.exist"):
        PassManager("test-bad-attr").run(_gm())
    PassManager("test-bad-attr", verify=False).run(_gm())


def test_failures_name_the_pass():
    with pytest.raises(PassError, match=r"pass test-raises \(#1\) failed: RuntimeError: boom"):
        PassManager("test-noop,test-raises").run(_gm())
    with pytest.raises(PreconditionError, match="needs a node named 'magic'"):
        PassManager("test-needs").run(_gm())


def test_empty_pipeline_is_identity():
    gm = _gm()
    out, report = PassManager("").run(gm)
    assert out is gm and report["passes"] == [] and report["pipeline"] == ""
