"""Named pipelines. Each recipe is plain pipeline text a user can print, copy and edit."""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.errors import PipelineError
from qcompile.pipeline import Pipeline, parse_pipeline

__all__ = ["RECIPES", "Recipe", "get_recipe", "list_recipes"]


@dataclass(frozen=True)
class Recipe:
    """A named pipeline and what it is for."""

    name: str
    pipeline: str
    description: str

    def parse(self) -> Pipeline:
        """The recipe's pipeline, parsed."""
        return parse_pipeline(self.pipeline)


_G = "g128"
_QUAROT = "rotate{ro=hadamard}"
_SMOOTH_ROT = "calibrate{samples=16},smooth{alpha=0.35}"
# Weight-only rotation: no q/k Hadamard (attention inputs stay 16-bit).
_ROT16 = "rotate{r3=none}"

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("w4-fp4", f"quantize{{w=fp4_e2m1/{_G}}},cleanup",
               "W4A16, FP4 E2M1 weights, symmetric fp32 scale per 128, RTN"),
        Recipe("w4-afpq", f"quantize{{w=fp4_e2m1/{_G}/asym}},cleanup",
               "W4A16, FP4 E2M1 weights, AFPQ asymmetric (two scales) per 128, RTN"),
        Recipe("w4-afpq-clip", f"quantize{{w=fp4_e2m1/{_G}/asym clip=search}},cleanup",
               "W4A16 AFPQ with per-group MSE clip search"),
        Recipe("w4-int4", f"quantize{{w=int4/{_G}/asym}},cleanup",
               "W4A16, INT4 asymmetric (scale + zero point) per 128, RTN"),
        Recipe("w4-int4-head8", f"quantize{{w=int4/{_G}/asym}},"
               "quantize{w=int8/channel lm_head=true},cleanup",
               "W4A16 INT4 asymmetric per 128, and the output head INT8 per channel (in a "
               "small model the head is a large share of a decode step's weight reads; "
               "ONNX: 4- and 8-bit MatMulNBits)"),
        Recipe("w4-fp4-head8", f"quantize{{w=fp4_e2m1/{_G}}},"
               "quantize{w=int8/channel lm_head=true},cleanup",
               "W4A16 FP4 E2M1 per 128, and the output head INT8 per channel (W8A16): at "
               "batch-1 decode the head reads half a bf16 head's bytes; SmolLM2 ppl 34.21 "
               "against 34.18 with a bf16 head (an FP4 head: 43.45)"),
        Recipe("w4-int4-sym", f"quantize{{w=int4/{_G}}},cleanup",
               "W4A16, INT4 symmetric per 128, RTN"),
        Recipe("w4-nf4", "quantize{w=nf4/g64},cleanup",
               "W4A16, NF4 (QLoRA normal float) per 64, RTN"),
        Recipe("w4-mxfp4", "quantize{w=mxfp4},cleanup",
               "W4A16, OCP MXFP4 (E8M0 scale per 32), RTN"),
        Recipe("w4-nvfp4", "quantize{w=nvfp4},cleanup",
               "W4A16, NVFP4 (E4M3 scale per 16 + fp32 tensor scale), RTN"),
        Recipe("w8a16-int8", "quantize{w=int8/channel},cleanup",
               "W8A16, INT8 per-channel weights, 16-bit activations (weight-only)"),
        Recipe("w8a16-fp8", "quantize{w=fp8_e4m3/channel},cleanup",
               "W8A16, FP8 E4M3 per-channel weights, 16-bit activations (weight-only)"),
        Recipe("w8a8-int8", "quantize{w=int8/channel a=int8/token},cleanup",
               "W8A8, INT8 per-channel weights, dynamic INT8 per-token activations"),
        Recipe("w8a8-fp8", "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token},cleanup",
               "W8A8, FP8 E4M3 per-channel weights, dynamic FP8 E4M3 per-token activations"),
        Recipe("fp8-dynamic", "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token},cleanup",
               "Alias of w8a8-fp8: the common FP8 dynamic deployment"),
        Recipe("w4a8-fp4-fp8",
               f"quantize{{w=fp4_e2m1/{_G}/asym a=fp8_e4m3/token}},cleanup",
               "W4A8, AFPQ FP4 weights per 128, dynamic FP8 E4M3 per-token activations"),
        Recipe("w4a8-m2",
               f"quantize{{w=fp4_e2m1/{_G}/m2 a=fp8_e4m3/token}},cleanup",
               "W4A8 ZeroQuant-FP M2, RTN: FP4 weights, fp32 row scale x power-of-2 factor per "
               "128, dynamic FP8 E4M3 per-token activations (the Triton W4A8 kernel's format; "
               "AFPQ's real-valued scales cannot be shifted into FP8). SmolLM2: 1.47x fp32 "
               "ppl; zqfp-w4a8-m2 (GPTQ, through an artifact) 1.17x"),
        Recipe("smoothquant-w8a8",
               "calibrate{samples=16},smooth,"
               "quantize{w=int8/channel a=int8/tensor static=true},cleanup",
               "SmoothQuant W8A8: calibrate on wikitext2-valid, smooth (alpha 0.5), INT8 "
               "per-channel weights, static per-tensor INT8 activations"),
        # QuaRot: fold norms, rotate (R1-R4 plus the online o_proj Hadamard), then RTN with
        # per-channel weights (MSE clip search), per-token activations, per-head-token KV.
        # Rotation is what makes 4-bit activations work; with 8/16-bit activations it can
        # cost RTN weight quality instead (SmolLM2: quarot-w4a16 56.6 vs w4-afpq 35.1). R1
        # alone does it (56.9): FP grids keep small columns precise, and SmolLM2's few huge
        # normalized-stream channels read small folded columns; rotation spreads those
        # channels over every column (q/k/v/gate/up output error x1.5-3). GPTQ sees the
        # rotated Hessian (W4A4 rotated: RTN 4.76x -> GPTQ 2.28x fp32 ppl).
        Recipe("quarot-w4a4",
               f"fuse-norms,{_QUAROT},quantize{{w=fp4_e2m1/channel/asym "
               "a=fp4_e2m1/token/asym clip=search kv=fp4_e2m1/token/asym},cleanup",
               "QuaRot W4A4KV4, FP4 E2M1 AFPQ (asymmetric) weights per channel, activations "
               "per token, K/V per head and token"),
        Recipe("quarot-w4a4-int4",
               f"fuse-norms,{_QUAROT},quantize{{w=int4/channel/asym a=int4/token/asym "
               "clip=search kv=int4/token/asym},cleanup",
               "QuaRot W4A4KV4, INT4 asymmetric weights per channel, activations per token, "
               "K/V per head and token"),
        Recipe("quarot-w4a8",
               f"fuse-norms,{_QUAROT},quantize{{w=fp4_e2m1/{_G}/asym a=fp8_e4m3/token "
               "kv=fp8_e4m3/token},cleanup",
               "QuaRot W4A8KV8, AFPQ FP4 weights per 128, FP8 E4M3 per-token activations and "
               "K/V"),
        Recipe("quarot-w4a16",
               f"fuse-norms,rotate{{r3=none}},quantize{{w=fp4_e2m1/{_G}/asym}},cleanup",
               "QuaRot-rotated W4A16 (no q/k Hadamard: activations stay 16-bit), AFPQ FP4 "
               "weights per 128"),
        # Error compensation (GPTQ on 32 x 512 wikitext2-valid windows, act-order, static
        # groups, scales refit to the Hessian; w^2-weighted clip search where it measured
        # better (AFPQ g128: 28.71 vs 29.06); LoRC rank 8 with INT8 factors). quantize inserts
        # exactly the weights GPTQ decided. W4A16/W3A16 rotate first (QuaRot R1/R2 folded into
        # the weights, R4 online before down_proj): RTN loses with rotation, GPTQ wins with it
        # (SmolLM2 AFPQ g128: 1.071x fp32 rotated vs 1.122x; INT4: 1.079x vs 1.148x; NF3
        # AFPQ: 1.313x vs 1.427x; more calibration or refit rounds moved it < 0.005).
        Recipe("w4-int4-gptq",
               f"fuse-norms,{_ROT16},gptq{{w=int4/{_G}/asym clip=search}},"
               f"quantize{{w=int4/{_G}/asym}},cleanup",
               "W4A16 INT4 asymmetric per 128 with rotation and GPTQ"),
        Recipe("afpq-w4-gptq",
               f"fuse-norms,{_ROT16},gptq{{w=fp4_e2m1/{_G}/asym clip=search}},"
               f"quantize{{w=fp4_e2m1/{_G}/asym}},cleanup",
               "W4A16 AFPQ FP4 (two scales per 128) with rotation and GPTQ"),
        # W3: AFPQ on the NF3 grid (SmolLM2, rotation + GPTQ: NF3 AFPQ 1.31x fp32, INT3 asym
        # 1.39x, FP3 sym 1.60x; without rotation 1.43x, 1.66x, 1.88x, FP3 E1M1 AFPQ 1.80x).
        Recipe("afpq-w3-gptq",
               f"fuse-norms,{_ROT16},gptq{{w=nf3/{_G}/asym clip=search}},"
               f"quantize{{w=nf3/{_G}/asym}},cleanup",
               "W3A16 AFPQ NF3 (two scales per 128) with rotation and GPTQ"),
        # ZeroQuant-FP W4A8 (SmolLM2, GPTQ with clip search): M1 1.180x, M2 1.169x, M2 + LoRC
        # 1.106x, with 128 calibration windows 1.0998x (rank 16: 1.084x). Rotation helps M2
        # alone (1.141x) but not with LoRC (1.140x).
        Recipe("zqfp-w4a8-m1",
               f"gptq{{w=fp4_e2m1/{_G}/po2 clip=search}},quantize{{w=fp4_e2m1/{_G}/po2 "
               "a=fp8_e4m3/token},cleanup",
               "ZeroQuant-FP W4A8 M1: FP4 weights with power-of-2 scales per 128 (GPTQ), FP8 "
               "E4M3 per-token activations"),
        Recipe("zqfp-w4a8-m2",
               f"gptq{{w=fp4_e2m1/{_G}/m2 clip=search}},quantize{{w=fp4_e2m1/{_G}/m2 "
               "a=fp8_e4m3/token},cleanup",
               "ZeroQuant-FP W4A8 M2: FP4 weights, fp32 row scale x power-of-2 factor per 128 "
               "(GPTQ), FP8 E4M3 per-token activations"),
        Recipe("zqfp-w4a8-m2-lorc",
               f"gptq{{w=fp4_e2m1/{_G}/m2 clip=search samples=128}},lorc{{rank=8 bits=8}},"
               f"quantize{{w=fp4_e2m1/{_G}/m2 a=fp8_e4m3/token}},cleanup",
               "ZeroQuant-FP W4A8 M2 with GPTQ and LoRC (rank 8, INT8 factors)"),
        # SmoothQuant after the rotation: the rotated normalized stream still has uneven
        # channels; alpha 0.35 moves part of them into the weights, which GPTQ then absorbs
        # (SmolLM2 W4A4KV4 per token: 2.279 -> 2.036 fp32 ppl; with NVFP4 activations/KV and
        # g128 weights 1.729; alpha 0.15-0.65 all help, measured in the notes of issue 8).
        Recipe("quarot-w4a4-gptq",
               f"fuse-norms,{_QUAROT},{_SMOOTH_ROT},gptq{{w=fp4_e2m1/channel/asym}},"
               "quantize{w=fp4_e2m1/channel/asym a=fp4_e2m1/token/asym "
               "kv=fp4_e2m1/token/asym},cleanup",
               "QuaRot W4A4KV4 FP4 (smoothing after rotation; AFPQ weights per channel with "
               "GPTQ, activations and K/V per token)"),
        Recipe("quarot-w4a4-nvfp4-gptq",
               f"fuse-norms,{_QUAROT},{_SMOOTH_ROT},"
               f"gptq{{w=fp4_e2m1/{_G}/asym clip=search}},"
               f"quantize{{w=fp4_e2m1/{_G}/asym a=nvfp4 kv=nvfp4}},cleanup",
               "QuaRot W4A4KV4 with NVFP4 activations and K/V (FP4 per 16 with E4M3 scales) "
               "and AFPQ g128 GPTQ weights, smoothing after rotation"),
        # SpinQuant-style: the Hadamard R1 refined by training through the activation
        # quantizers (learn-rotation; full-precision weights in the loop, since GPTQ follows).
        # Smoothing is left out: after a learned R1 it hurts (2.177 vs 1.746 per token).
        Recipe("spinquant-w4a4-gptq",
               f"fuse-norms,{_QUAROT},learn-rotation{{steps=60}},gptq{{w=fp4_e2m1/channel/asym}},"
               "quantize{w=fp4_e2m1/channel/asym a=fp4_e2m1/token/asym "
               "kv=fp4_e2m1/token/asym},cleanup",
               "W4A4KV4 FP4 with a learned R1 (trained 60 steps through FP4 per-token "
               "activation quantizers), AFPQ weights per channel with GPTQ"),
        # NVFP4 activations and K/V take each block's scale by MSE among the E4M3 neighbours
        # of absmax/6 and absmax/4 (mse4, "Four Over Six"): SmolLM2 with only activations
        # quantized 1.162 -> 1.143 fp32 ppl, this recipe 1.5135 -> 1.4621 (/mse -> /mse4;
        # 1.4750 with learn-rotation seed=1).
        Recipe("spinquant-w4a4-nvfp4-gptq",
               f"fuse-norms,{_QUAROT},learn-rotation{{a=nvfp4 steps=60}},"
               f"gptq{{w=fp4_e2m1/{_G}/asym clip=search samples=128}},"
               f"quantize{{w=fp4_e2m1/{_G}/asym a=nvfp4/mse4 kv=nvfp4/mse4}},cleanup",
               "W4A4KV4 with NVFP4 activations and K/V (block scales chosen by MSE, max on 6 "
               "or 4), a learned R1 (60 steps through the NVFP4 quantizers) and AFPQ g128 "
               "GPTQ weights (128 calibration windows)"),
        Recipe("quarot-w4a4-int4-gptq",
               f"fuse-norms,{_QUAROT},gptq{{w=int4/channel/asym}},"
               "quantize{w=int4/channel/asym a=int4/token/asym kv=int4/token/asym},cleanup",
               "QuaRot W4A4KV4 INT4 (asymmetric weights per channel with GPTQ)"),
    ]
}


def list_recipes() -> list[Recipe]:
    """Every recipe, in definition order."""
    return list(RECIPES.values())


def get_recipe(name: str) -> Recipe:
    """Look up a recipe.

    Raises:
        PipelineError: Unknown name; the message lists the known recipes.
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise PipelineError(
            f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}"
        ) from None
