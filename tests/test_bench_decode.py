"""The decode benchmark's helpers (benchmarks/decode.py): its greedy loop, the output-head
option and the full-depth extrapolation. Timings themselves are never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qcompile.pipeline import parse_pipeline
from qcompile.recipes import RECIPES

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"


@pytest.fixture(scope="module")
def decode_mod(benchmark_module):
    return benchmark_module("decode")


@pytest.mark.parametrize("loop_name", ["_direct_loop", "_graph_loop"])
def test_loops_give_generates_greedy_tokens(decode_mod, loop_name):
    """Both timed loops (the graph loop's step runs eagerly off CUDA: the same step that is
    captured on a GPU, reading and writing its token and position buffers)."""
    model = decode_mod.build_model("tiny", 1, "cpu", torch.float32)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7),
                           generator=torch.Generator().manual_seed(0))
    loop = getattr(decode_mod, loop_name)(model, prompt, 6, "cpu")
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                              pad_token_id=0)[:, 7:]
        assert torch.equal(loop(6), want)
        assert torch.equal(loop(3), want[:, :3])  # the cache is reset between runs


@pytest.mark.parametrize("recipe", ["w4-afpq", "w4-int4-head8", "w4a8-fp4-fp8"])
def test_lm_head_option_reaches_every_quantize(decode_mod, recipe):
    text = decode_mod.with_lm_head(RECIPES[recipe].pipeline)
    quantizes = [s for s in parse_pipeline(text) if s.name == "quantize"]
    assert quantizes and all(s.options.lm_head for s in quantizes)
    assert len(parse_pipeline(text)) == len(parse_pipeline(RECIPES[recipe].pipeline))


def test_full_depth_extrapolation(decode_mod):
    # 4 layers at 2 ms per token with a 0.4 ms head: 1.6 ms of layers -> 12.8 ms at 32.
    tps = decode_mod.full_depth_tokens_per_s(500.0, 4, 32, 4e-4)
    assert tps == pytest.approx(1.0 / (1.6e-3 * 8 + 4e-4))
    assert decode_mod.full_depth_tokens_per_s(500.0, 32, 32, 4e-4) == pytest.approx(500.0)


def test_extrapolation_takes_all_work_outside_the_layers(decode_mod):
    """The full-depth number keeps the whole per-token outside work (embedding, final norm,
    head, argmax) fixed, not the head alone; the outside work is timed as a greedy step
    runs it."""
    result = {"layers": 4, "full_depth_layers": 32, "lm_head_seconds": 4e-4,
              "outside_layers_seconds": 5e-4,
              "variants": {"bf16": {"decode_tokens_per_s": 500.0, "prefill_tokens_per_s": 1.0}}}
    decode_mod._ratios(result)
    got = result["variants"]["bf16"]["decode_tokens_per_s_at_full_depth"]
    assert got == pytest.approx(decode_mod.full_depth_tokens_per_s(500.0, 4, 32, 5e-4), abs=0.01)
    assert got != pytest.approx(decode_mod.full_depth_tokens_per_s(500.0, 4, 32, 4e-4), abs=0.01)
    whole = decode_mod.head_seconds("tiny", "cpu", torch.float32, repeats=2, whole=True)
    assert 0.0 < whole < 10.0


@pytest.mark.parametrize("loop_name", ["_direct_loop", "_graph_loop"])
def test_loop_through_the_backend_matches_its_reference(decode_mod, loop_name):
    """What the GPU run does (static cache, fixed shapes, the timed loop, fuse-linears), on
    the CPU through Inductor: the same tokens as the backend's eager reference run, and no
    recompiles per step (prefill over a fresh and a used cache, decode)."""
    import qcompile

    torch.manual_seed(0)
    models = [decode_mod.build_model("tiny", 1, "cpu", torch.float32) for _ in range(2)]
    prompt = torch.randint(0, models[0].config.vocab_size, (1, 7),
                           generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    qcompile.compile(models[0], recipe="w4-afpq", dynamic=False)
    qcompile.compile(models[1], recipe="w4-afpq", dynamic=False, inductor=False)
    with torch.no_grad():
        loop = getattr(decode_mod, loop_name)
        got = [loop(models[0], prompt, 6, "cpu")(6) for _ in range(2)]
        want = decode_mod._direct_loop(models[1], prompt, 6, "cpu")(6)
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    stats = models[0].qcompile_backend.stats
    assert stats.graphs <= 3 and stats.pipeline_runs == 1 and stats.linears_fused > 0


def test_step_profile_counts_one_tokens_ops(decode_mod):
    """benchmarks/step_profile.py: the decode steps' ops per token, the prompt's forward taken
    out. One layer: seven linears and the head are eight matmuls per token."""
    import sys

    sys.path.insert(0, str(_PATH.parent))
    from step_profile import profile_tokens

    model = decode_mod.build_model("tiny", 1, "cpu", torch.float32)
    assert model.config.num_hidden_layers == 1
    prompt = torch.randint(0, model.config.vocab_size, (1, 7),
                           generator=torch.Generator().manual_seed(0))
    loop = decode_mod._direct_loop(model, prompt, 6, "cpu")
    with torch.no_grad():
        loop(6)
        got = profile_tokens(loop, 6, "cpu", top=10_000)  # every name: ranks vary by load
    assert got["steps"] == 5 and got["what"] == "cpu ops, self time"
    calls = {r["name"]: r["calls_per_token"] for r in got["rows"]}
    assert calls["aten::mm"] == 8.0
    times = [r["us_per_token"] for r in got["rows"]]
    # The total is the rounded sum of rounded times.
    assert times == sorted(times, reverse=True) and 0 < sum(times) <= got["busy_us_per_token"] + 0.01
    assert got["rows"][0]["share"] == pytest.approx(times[0] / got["busy_us_per_token"], abs=1e-4)
    with pytest.raises(ValueError, match="n >= 2"):
        profile_tokens(loop, 1, "cpu")
    from step_profile import profile_call

    with torch.no_grad():
        one = profile_call(lambda: model(prompt, use_cache=False), "cpu")
    calls = {r["name"]: r["calls"] for r in one["rows"]}
    assert calls["aten::mm"] == 8 and one["busy_us"] >= sum(r["us"] for r in one["rows"])
    assert "host" not in one  # the host table comes with CUDA kernels


def test_autotune_picks_lists_each_tuners_choice_per_key(decode_mod):
    """The JSON's ``autotune_picks``: a live autotuner's cached choice, per kernel and key."""
    triton = pytest.importorskip("triton")

    @triton.jit
    def _picks_probe_kernel(x_ptr, N, BLOCK: triton.language.constexpr):
        pass

    cfgs = [triton.Config({"BLOCK": 16}, num_warps=4), triton.Config({"BLOCK": 32}, num_warps=8)]
    tuner = triton.autotune(cfgs, key=["N"])(_picks_probe_kernel)
    tuner.cache[(4096, "torch.bfloat16")] = cfgs[1]
    picks = decode_mod.autotune_picks()["_picks_probe_kernel"]
    assert picks == {"4096 torch.bfloat16": "BLOCK=32, warps=8, stages=3"}


def test_pdl_variants_extend_recipe_variants_only(decode_mod):
    """``-pdl`` names a recipe variant with the GEMVs launched as programmatic dependents,
    ``-apdl`` with the decode attention too; the bf16 baseline and unknown names have
    none."""
    assert decode_mod.variant_recipe("w4a16-fp4-pdl") == decode_mod.VARIANTS["w4a16-fp4"]
    assert decode_mod.variant_recipe("w4a16-fp4-nodf-pdl") == "w4-afpq"
    assert decode_mod.variant_recipe("w4a16-fp4sym-noattn") == "w4-fp4"
    assert decode_mod.variant_recipe("w4a16-fp4sym-combo-pdl") == "w4-fp4"
    assert decode_mod.variant_recipe("bf16-combo") is None
    assert decode_mod.variant_recipe("bf16") is None
    # -apdl (last): the decode attention too.
    assert decode_mod.variant_recipe("w4a16-fp4sym-pdl-apdl") == "w4-fp4"
    assert decode_mod.variant_recipe("w4a16-fp4-apdl") == "w4-afpq"
    assert decode_mod._split_name("w4a16-fp4sym-combo-pdl-apdl") == ("w4a16-fp4sym", True,
                                                                      True, True)
    assert decode_mod._split_name("w4a16-fp4-pdl") == ("w4a16-fp4", False, True, False)
    for bad in ("bf16-pdl", "w4a16-fp5", "w4a16-fp4-pdl-pdl", "w4a16-fp4-pdl-combo",
                "bf16-combo-pdl", "bf16-apdl", "w4a16-fp4-apdl-pdl"):
        with pytest.raises(KeyError):
            decode_mod.variant_recipe(bad)
    with pytest.raises(SystemExit):
        decode_mod.main(["--variants", "bf16-pdl", "--device", "cpu"])


def test_agreement_compares_variants_of_one_recipe(decode_mod):
    """Each variant's greedy tokens against the first variant of the same recipe and head:
    the run of equal tokens from the start; bf16 and other recipes are left alone."""
    result = {"variants": {
        "bf16": {"recipe": None, "greedy_tokens": [1, 2, 3]},
        "w4a16-fp4": {"recipe": "w4-afpq", "lm_head_quantized": False,
                      "greedy_tokens": [5, 6, 7, 8]},
        "w4a16-fp4-pdl": {"recipe": "w4-afpq", "lm_head_quantized": False,
                          "greedy_tokens": [5, 6, 9, 8]},
        "w4a16-fp4-noattn": {"recipe": "w4-afpq", "lm_head_quantized": False,
                             "greedy_tokens": [5, 6, 7, 8]},
        "w4a8": {"recipe": "w4a8-m2", "lm_head_quantized": False, "greedy_tokens": [5]},
    }}
    decode_mod._agreement(result)
    v = result["variants"]
    assert v["w4a16-fp4-pdl"]["greedy_tokens_agree_with"] == {
        "variant": "w4a16-fp4", "leading_equal": 2, "of": 4}
    assert v["w4a16-fp4-noattn"]["greedy_tokens_agree_with"]["leading_equal"] == 4
    assert all("greedy_tokens_agree_with" not in v[n] for n in ("bf16", "w4a16-fp4", "w4a8"))


def test_timed_reports_host_time_apart(decode_mod):
    """``_timed``'s host time is the best time until the call returned: at least the call's
    own host work (a 10 ms sleep) and at most the best wall time (on a GPU it is less unless
    the host bounds the call). The allocator counters exist only on CUDA."""
    import time

    host: list[float] = []
    wall = decode_mod._timed(lambda: time.sleep(0.01), "cpu", 3, host)
    assert len(host) == 1 and 0.01 <= host[0] <= wall
    assert decode_mod._timed(lambda: None, "cpu", 2) < 0.01
    assert decode_mod._alloc_counts("cpu") == {}


def test_gc_pauses_counts_collections(decode_mod):
    """``GcPauses`` counts the collections inside its block by generation, with their time,
    and stops counting after it."""
    import gc

    with decode_mod.GcPauses() as pauses:
        gc.collect(0)
        gc.collect(2)
    gc.collect(2)
    got = pauses.report()
    assert got["collections_per_generation"][0] >= 1 and got["collections_per_generation"][2] == 1
    assert 0.0 < got["seconds"] < 10.0


def test_device_timeline_finds_idle_gaps_and_the_host_ops_over_them(decode_mod):
    """benchmarks/step_profile.py's device timeline on hand-made spans: overlapping kernels
    merge, each gap is named by the kernels either side, and host ops are charged the idle
    time they overlap (the lead before the first kernel included; the final sync is not a
    cause)."""
    import sys

    sys.path.insert(0, str(_PATH.parent))
    from step_profile import device_timeline

    kernels = [("a", 100.0, 150.0), ("b", 140.0, 200.0), ("c", 260.0, 300.0),
               ("d", 310.0, 400.0)]
    host = [("call", 40.0, 420.0), ("guards", 40.0, 90.0), ("w4a16_linear", 190.0, 255.0),
            ("cudaDeviceSynchronize", 255.0, 420.0)]
    got = device_timeline(kernels, host, top=8)
    assert got["lead_us"] == 60.0 and got["span_us"] == 300.0
    assert got["busy_us"] == 100.0 + 40.0 + 90.0 and got["idle_us"] == 60.0 + 10.0
    assert got["gaps"] == [{"us": 60.0, "at_us": 100.0, "after": "b", "before": "c"},
                           {"us": 10.0, "at_us": 200.0, "after": "c", "before": "d"}]
    assert got["host_during_idle"] == [{"name": "call", "us": 130.0},
                                       {"name": "w4a16_linear", "us": 55.0},
                                       {"name": "guards", "us": 50.0}]
    empty = device_timeline([], host)
    assert empty["gaps"] == [] and empty["idle_us"] == 0.0


def test_each_variant_starts_with_the_previous_model_freed(decode_mod, monkeypatch):
    """A compiled model sits in reference cycles that only Python's cyclic collector frees:
    each variant collects before building its model, so the previous one's weights do not
    stay resident into the next variant's memory numbers."""
    import weakref

    built: list[weakref.ref] = []
    alive_at_build: list[int] = []
    real = decode_mod.build_model

    def build(*args, **kwargs):
        alive_at_build.append(sum(r() is not None for r in built))
        model = real(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(decode_mod, "build_model", build)
    out = decode_mod.main(["--model-shape", "tiny", "--layers", "1", "--device", "cpu",
                           "--variants", "w4a16-fp4sym,w4a16-fp4", "--prompt", "4",
                           "--decode", "3", "--prefill", "8", "--repeats", "1"])
    assert set(out["variants"]) == {"w4a16-fp4sym", "w4a16-fp4"}
    assert all("error" not in v for v in out["variants"].values())
    assert len(built) >= 2 and alive_at_build[1:] == [0] * (len(built) - 1)


def test_a_quantized_head_is_extrapolated_with_its_own_op(decode_mod):
    """``w4a16-fp4sym-head8`` (INT8 head) and ``--lm-head`` name their head's format; the
    extrapolation then swaps the bf16 head's time for that op's, and a head format with no
    lowered op gets no full-depth number."""
    from qcompile.recipes import RECIPES

    assert decode_mod.head_format(RECIPES["w4-fp4-head8"].pipeline) == "int8/channel"
    assert decode_mod.head_format(RECIPES["w4-fp4"].pipeline) is None
    assert decode_mod.head_format(decode_mod.with_lm_head(RECIPES["w4-afpq"].pipeline)) \
        == "fp4_e2m1/g128/asym"
    for fmt in ("int8/channel", "fp4_e2m1/g128"):
        t = decode_mod.quantized_head_seconds(fmt, "tiny", "cpu", torch.float32, repeats=2)
        assert 0.0 < t < 10.0
    assert decode_mod.quantized_head_seconds("int6/channel", "tiny", "cpu", torch.float32) \
        is None
    result = {"layers": 4, "full_depth_layers": 32, "lm_head_seconds": 4e-4,
              "outside_layers_seconds": 5e-4,
              "variants": {"bf16": {"decode_tokens_per_s": 500.0, "prefill_tokens_per_s": 1.0},
                           "head8": {"decode_tokens_per_s": 800.0, "prefill_tokens_per_s": 1.0,
                                     "lm_head_quantized": True, "head_format": "int8/channel",
                                     "outside_layers_seconds": 3e-4},
                           "int6": {"decode_tokens_per_s": 800.0, "prefill_tokens_per_s": 1.0,
                                    "lm_head_quantized": True}}}
    decode_mod._ratios(result)
    got = result["variants"]["head8"]["decode_tokens_per_s_at_full_depth"]
    assert got == pytest.approx(decode_mod.full_depth_tokens_per_s(800.0, 4, 32, 3e-4), abs=0.01)
    assert "decode_tokens_per_s_at_full_depth" not in result["variants"]["int6"]
