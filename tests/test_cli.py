"""The qcompile command line: listings, one-line typed errors, and eval/quantize on SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qcompile.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_recipes_and_passes_listings(capsys):
    code, out, _ = _run(capsys, "recipes")
    recipes = json.loads(out)
    assert code == 0
    for name in ("w4-fp4", "w4-afpq", "w4-int4", "w8a8-int8", "w8a8-fp8", "w4a8-fp4-fp8"):
        assert name in recipes and recipes[name]["pipeline"].startswith("quantize{")
    code, out, _ = _run(capsys, "passes")
    passes = json.loads(out)
    assert passes["quantize"]["options"]["clip"]["default"] == "none"
    assert set(passes["quantize"]["options"]) == {"w", "a", "include", "exclude", "lm_head",
                                                  "clip", "static", "kv"}
    assert "cleanup" in passes


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eval", "--model", "smollm2-135m", "--pipeline", "quantize{w=int4/g-1}"],
         "FormatError: "),
        (["eval", "--model", "smollm2-135m", "--pipeline", "quantise{w=int4}"],
         "PipelineError: unknown pass 'quantise'"),
        (["eval", "--model", "smollm2-135m", "--recipe", "w5-magic"],
         "PipelineError: unknown recipe 'w5-magic'; known recipes: w4-fp4"),
        (["eval", "--model", "no-such-model", "--recipe", "w4-afpq"], "ModelError: "),
    ],
)
def test_errors_are_one_line(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert needle in err and err.count("\n") == 1


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "qcompile.cli", "--version"], check=True,
                         capture_output=True, text=True)
    assert out.stdout.startswith("qcompile ")


@pytest.mark.slow
def test_quantize_save_then_eval_artifact_gives_same_ppl(capsys, tmp_path):
    pipeline = "quantize{w=fp4_e2m1/g128/asym a=fp8_e4m3/token},cleanup"
    small = ["--windows", "3", "--seqlen", "128", "--json"]
    code, out, _ = _run(capsys, "eval", "--model", "smollm2-135m", "--pipeline", pipeline,
                        "--baseline", *small)
    assert code == 0
    direct = json.loads(out)
    assert direct["pipeline"] == pipeline and direct["ppl"] > direct["baseline_ppl"] > 1
    assert direct["report"]["passes"][0]["facts"]["linears_quantized"] == 210
    code, out, _ = _run(capsys, "quantize", "--model", "smollm2-135m", "--pipeline", pipeline,
                        "--out", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["out"] == str(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    code, out, _ = _run(capsys, "eval", "--model", str(tmp_path), *small)
    loaded = json.loads(out)
    assert loaded["ppl"] == direct["ppl"]  # to the last digit
    assert loaded["artifact_pipeline"] == pipeline
