"""Error compensation on the real SmolLM2-135M (WikiText-2 test, 40 windows x 512 tokens).

Calibration reads wikitext2-valid. The CI test uses 16 calibration windows to stay within the
CI budget; the ``heavy`` tests (QCOMPILE_HEAVY=1) run the recipes as shipped (32 windows).
The measured ratios of every recipe are in the closing note and benchmarks/quality.py.
"""

from __future__ import annotations

import pytest

from qcompile.recipes import get_recipe

pytestmark = pytest.mark.slow


def _ratio(ppl_of, pipeline: str) -> float:
    return ppl_of(pipeline)[0] / ppl_of("")[0]


def test_gptq_clearly_beats_rtn(smollm2_ppl):
    fmt = "fp4_e2m1/g128/asym"
    ratio = _ratio(smollm2_ppl, f"gptq{{w={fmt} samples=16}},quantize{{w={fmt}}},cleanup")
    rtn = _ratio(smollm2_ppl, f"quantize{{w={fmt}}},cleanup")  # 1.368 measured
    assert ratio < rtn - 0.15
    report = smollm2_ppl(f"gptq{{w={fmt} samples=16}},quantize{{w={fmt}}},cleanup")[1]
    gptq = report["passes"][0]["facts"]
    assert gptq["linears_planned"] == 210 and gptq["mean_error_vs_rtn"] < 0.8
    assert report["passes"][1]["facts"]["planned_by"] == {"gptq": 210}
    assert report["passes"][0]["seconds"] < 600  # the 10-minute budget on 2 cores


# Bounds sit just above the measured ratios (closing note of the error-compensation issue):
# a regression fails, eval noise (none: the pipeline is deterministic) does not matter.
@pytest.mark.heavy
@pytest.mark.parametrize("recipe, bound", [
    ("afpq-w4-gptq", 1.08),  # measured 1.0708 rotated (unrotated 1.1218; RTN 1.368)
    ("w4-int4-gptq", 1.08),  # measured 1.0786 rotated (unrotated 1.1483; RTN 1.263)
    ("quarot-w4a4-gptq", 2.10),  # measured 2.0361 (W4A4KV4; 2.2786 without smoothing)
    ("quarot-w4a4-nvfp4-gptq", 1.78),  # measured 1.7292 (NVFP4 activations and KV)
    ("spinquant-w4a4-gptq", 1.76),  # measured 1.7461 (learned R1, no smoothing)
    ("spinquant-w4a4-nvfp4-gptq", 1.48),  # measured 1.4621 (learned R1, NVFP4/mse4 acts and
    #  KV, GPTQ on 128 windows; 1.5135 with /mse, 1.5537 with round-to-nearest block scales)
    ("afpq-w3-gptq", 1.32),  # measured 1.3128 rotated (INT3 asym 1.390, FP3 sym 1.599)
])
def test_gptq_recipes(smollm2_ppl, recipe, bound):
    assert _ratio(smollm2_ppl, get_recipe(recipe).pipeline) <= bound


@pytest.mark.heavy
def test_zeroquant_fp_w4a8(smollm2_ppl):
    m1 = _ratio(smollm2_ppl, get_recipe("zqfp-w4a8-m1").pipeline)
    m2 = _ratio(smollm2_ppl, get_recipe("zqfp-w4a8-m2").pipeline)
    m2_lorc = _ratio(smollm2_ppl, get_recipe("zqfp-w4a8-m2-lorc").pipeline)
    assert m2 <= 1.175  # measured 1.1690; M1 1.1802 (both with clip search)
    assert m2_lorc <= 1.10  # measured 1.0998 (128 calibration windows, LoRC rank 8)
    assert m2 < m1
    assert m2_lorc < m2
