"""``lower-triton``: which chains it lowers, what it reports, and that it never changes numerics.

On the CPU the fused ops run the exact composition of the reference ops, so a lowered graph
must give bit-identical logits. Kernel numerics are checked in ``tests/test_triton_*.py``; the
last tests here also run the lowered graph through the kernels under the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch

import qcompile.backends.triton.ops  # noqa: F401  (registers the fused ops)
from qcompile.api import quantize_graph
from qcompile.backends.triton.scales import W4A8ScaleError, w4a8_split_scales
from qcompile.capture import capture
from qcompile.formats import parse_format, quantize
from qcompile.ops import dequantize_weight, hadamard, quantize_activation
from qcompile.pipeline import parse_pipeline
from qcompile.testing import tiny_model

Q = torch.ops.qcompile
ROT = "fuse-norms,rotate"


def _ids(vocab: int = 100, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(3))


def _logits(gm, ids):
    out = gm(ids)
    return out[0] if isinstance(out, (tuple, list)) else out


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


CASES = [
    # (pipeline, expected counts, ops that must be gone)
    ("quantize{w=fp4_e2m1/g32/asym}", {"w4a16": 14}, [Q.dequantize_weight.default]),
    ("quantize{w=int4/g48/asym lm_head=true}", {"w4a16": 15}, [Q.dequantize_weight.default]),
    ("quantize{w=nf4/channel}", {"w4a16": 14}, [Q.dequantize_weight.default]),
    ("quantize{w=fp8_e4m3/channel a=fp8_e4m3/token}", {"fp8": 14, "rmsnorm": 4,
                                                       "silu_gate": 2},
     [Q.dequantize_weight.default, Q.quantize_activation.default, torch.ops.aten.silu.default]),
    ("quantize{w=fp4_e2m1/g32/m2 a=fp8_e4m3/token}", {"w4a8": 14, "rmsnorm": 4, "silu_gate": 2},
     [Q.dequantize_weight.default, Q.quantize_activation.default]),
    ("quantize{w=fp4_e2m1/g32/po2 a=fp8_e4m3/token}", {"w4a8": 14, "rmsnorm": 4,
                                                       "silu_gate": 2},
     [Q.dequantize_weight.default, Q.quantize_activation.default]),
    (f"{ROT},quantize{{w=fp4_e2m1/channel/asym a=fp4_e2m1/token/asym kv=fp4_e2m1/token/asym}}",
     {"w4a16": 14, "act": 12, "rmsnorm": 4}, [Q.dequantize_weight.default, Q.quantize_activation.default]),
    (f"{ROT},quantize{{w=fp4_e2m1/g32/m2 a=fp8_e4m3/token kv=fp8_e4m3/token}}",
     {"w4a8": 14, "act": 4, "rmsnorm": 4}, [Q.dequantize_weight.default, Q.quantize_activation.default]),
    ("quantize{w=fp4_e2m1/g32},quantize{w=int8/g64/asym lm_head=true}", {"w4a16": 14, "w8a16": 1},
     [Q.dequantize_weight.default]),
    ("quantize{w=fp8_e5m2/g32}", {"w8a16": 14}, [Q.dequantize_weight.default]),
    ("quantize{w=int8/channel a=int8/token}", {"w8a16": 14, "act": 8, "rmsnorm": 4},
     [Q.dequantize_weight.default, Q.quantize_activation.default]),
]


@pytest.mark.parametrize("pipeline,counts,gone", CASES, ids=[c[0] for c in CASES])
def test_lowering_counts_and_exact_cpu_numerics(llama, pipeline, counts, gone):
    ids = _ids()
    gm, _ = quantize_graph(capture(llama), pipeline, progress=False)
    ref = _logits(gm, ids)
    gm, report = quantize_graph(gm, "lower-triton,cleanup", progress=False)
    facts = report["passes"][0]["facts"]
    for kind in ("w4a16", "w8a16", "fp8", "w4a8", "act", "rmsnorm", "silu_gate"):
        assert facts[kind] == counts.get(kind, 0), (kind, facts)
    assert facts["not_lowered"] == []
    assert report["passes"][0]["modified"]
    targets = _targets(gm)
    for op in gone:
        assert op not in targets
    assert torch.equal(_logits(gm, ids), ref)


def test_rotated_w4a8_folds_the_online_hadamard(llama):
    gm, _ = quantize_graph(capture(llama), f"{ROT},quantize{{w=fp4_e2m1/g32/m2 a=fp8_e4m3/token}}",
                           progress=False)
    n_had = _targets(gm).count(Q.hadamard.default)
    gm, _ = quantize_graph(gm, "lower-triton", progress=False)
    rows = [n for n in gm.graph.nodes if n.target is Q.quantize_rows.default]
    folded = [n for n in rows if n.args[2] > 0]
    # R4 (down_proj input) folds into its quantize; R3 Hadamards on q/k are not quantized.
    assert len(folded) == 2
    assert _targets(gm).count(Q.hadamard.default) == n_had - 2
    # q/k/v share one activation quantize per layer: 4 distinct inputs per layer.
    assert len(rows) == 2 * 4


def test_unsupported_chains_are_reported_not_lowered(llama):
    ids = _ids()
    gm, _ = quantize_graph(capture(llama), "quantize{w=int6/channel a=int8/token}",
                           progress=False)
    ref = _logits(gm, ids)
    gm, report = quantize_graph(gm, "lower-triton", progress=False)
    facts = report["passes"][0]["facts"]
    assert facts["fp8"] == facts["w4a8"] == facts["w4a16"] == facts["w8a16"] == 0
    assert facts["act"] == 8  # the int8 per-token Q/DQ itself has a fused kernel
    assert facts["rmsnorm"] == 4  # and takes the RMSNorm before it
    assert len(facts["not_lowered"]) == 14
    assert all("fp8_e4m3/token" in e["reason"] for e in facts["not_lowered"])
    assert torch.equal(_logits(gm, ids), ref)


@pytest.mark.parametrize(("pipeline", "reason"), [
    ("quantize{w=fp8_e4m3/g32/asym}", "two scales per group (AFPQ) have no 8-bit kernel"),
    ("quantize{w=int6/g32}", "has no kernel (W4A16 takes 4-bit formats, W8A16 int8"),
])
def test_8bit_weights_without_a_kernel_are_reported(llama, pipeline, reason):
    gm, _ = quantize_graph(capture(llama), pipeline, progress=False)
    gm, report = quantize_graph(gm, "lower-triton", progress=False)
    facts = report["passes"][0]["facts"]
    assert facts["w8a16"] == 0 and len(facts["not_lowered"]) == 14
    assert all(reason in e["reason"] for e in facts["not_lowered"]), facts["not_lowered"][0]


def test_8bit_zero_points_must_be_integers(llama):
    from qcompile.graph import get_attr_value, set_attr_value

    gm, _ = quantize_graph(capture(llama), "quantize{w=int8/g32/asym}", progress=False)
    deq = next(n for n in gm.graph.nodes if n.target is Q.dequantize_weight.default)
    zero = deq.args[3].target
    set_attr_value(gm, zero, get_attr_value(gm, zero) + 0.5)
    gm, report = quantize_graph(gm, "lower-triton", progress=False)
    facts = report["passes"][0]["facts"]
    assert facts["w8a16"] == 13
    assert [e["reason"] for e in facts["not_lowered"]] == [
        "weight int8/g32/asym: zero points that are not integers have no 8-bit kernel"]


def test_w8a16_lowering_can_be_turned_off(llama):
    gm, _ = quantize_graph(capture(llama), "quantize{w=int8/g32}", progress=False)
    gm, report = quantize_graph(gm, "lower-triton{w8a16=false}", progress=False)
    facts = report["passes"][0]["facts"]
    assert facts["w8a16"] == 0 and not report["passes"][0]["modified"]
    assert {e["reason"] for e in facts["not_lowered"]} == {"w8a16 lowering is off"}


def test_unreadable_w4a8_scales_are_reported(llama):
    gm, _ = quantize_graph(capture(llama), "quantize{w=fp4_e2m1/g32 a=fp8_e4m3/token}",
                           progress=False)
    gm, report = quantize_graph(gm, "lower-triton", progress=False)
    facts = report["passes"][0]["facts"]
    assert facts["w4a8"] == 0 and len(facts["not_lowered"]) == 14
    assert "po2/m2" in facts["not_lowered"][0]["reason"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_folds_into_the_quantize_and_the_norm_is_gone(llama, dtype):
    model = __import__("copy").deepcopy(llama).to(dtype)
    ids = _ids()
    gm, _ = quantize_graph(capture(model), "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token}",
                           progress=False)
    ref = _logits(gm, ids)
    n_rsqrt = _targets(gm).count(torch.ops.aten.rsqrt.default)
    gm, report = quantize_graph(gm, "lower-triton,cleanup", progress=False)
    assert report["passes"][0]["facts"]["rmsnorm"] == 4
    rows = [n for n in gm.graph.nodes if n.target is Q.quantize_rows.default]
    assert all(len(n.args) == 5 and n.args[4] > 0 for n in rows[::2])  # input layernorms
    assert _targets(gm).count(torch.ops.aten.rsqrt.default) == n_rsqrt - 4
    assert torch.equal(_logits(gm, ids), ref)


def test_rmsnorm_not_reproduced_is_left_and_reported(llama, monkeypatch):
    import qcompile.passes.lower_triton as lt

    monkeypatch.setattr(lt, "rms_norm", lambda x, w, eps: lt.torch.zeros_like(x))
    ids = _ids()
    gm, _ = quantize_graph(capture(llama), "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token}",
                           progress=False)
    ref = _logits(gm, ids)
    gm, report = quantize_graph(gm, "lower-triton{rmsnorm=true}", progress=False)
    facts = report["passes"][0]["facts"]
    assert facts["rmsnorm"] == 0 and facts["fp8"] == 14
    assert sum("RMSNorm" in e["reason"] for e in facts["not_lowered"]) == 4
    assert torch.equal(_logits(gm, ids), ref)


def test_nothing_to_lower_is_unmodified(llama):
    gm = capture(llama)
    before = [n.format_node() for n in gm.graph.nodes]
    gm, report = quantize_graph(gm, "lower-triton", progress=False)
    assert not report["passes"][0]["modified"]
    assert [n.format_node() for n in gm.graph.nodes] == before


def test_options_round_trip_and_switch_families(llama):
    p = parse_pipeline("lower-triton{w4a8=false act=false}")
    assert str(p) == "lower-triton{w4a8=false act=false}"
    gm, _ = quantize_graph(capture(llama), "quantize{w=fp4_e2m1/g32/m2 a=fp8_e4m3/token}",
                           progress=False)
    gm, report = quantize_graph(gm, p, progress=False)
    facts = report["passes"][0]["facts"]
    assert facts["w4a8"] == 0 and facts["act"] == 0
    assert {e["reason"] for e in facts["not_lowered"]} == {"w4a8 lowering is off"}


@pytest.mark.parametrize(("recipe", "target"), [
    ("quantize{w=fp8_e4m3/channel a=fp8_e4m3/token}", Q.fp8_linear.default),
    ("quantize{w=fp4_e2m1/g32/m2 a=fp8_e4m3/token}", Q.w4a8_linear.default)])
def test_fp32_accumulate_option_reaches_every_fp8_linear(llama, recipe, target):
    """``fp32_accumulate`` round-trips and sets the FP8 ops' ``fast_accum`` argument (the
    kernels' accumulation mode); the CPU reference ops give the same logits either way."""
    p = parse_pipeline("lower-triton{fp32_accumulate=true}")
    assert str(p) == "lower-triton{fp32_accumulate=true}"
    ids = _ids()
    logits = []
    for lowering, fast in ((p, False), ("lower-triton", True)):
        gm, _ = quantize_graph(capture(llama), recipe, progress=False)
        gm, _ = quantize_graph(gm, lowering, progress=False)
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
        assert len(nodes) == 14 and all(n.args[-1] is fast for n in nodes)
        logits.append(_logits(gm, ids))
    assert torch.equal(*logits)


# --- the fused ops' CPU references --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["fp8_e4m3/token", "int8/token"])
@pytest.mark.parametrize("had", [0, 64])
def test_quantize_rows_codes_times_scale_is_the_reference_qdq(dtype, fmt, had):
    x = (torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    x[0, 0] = 0  # an all-zero row keeps scale 1
    q, s = Q.quantize_rows(x, fmt, had)
    ref = quantize_activation(hadamard(x, had) if had else x, fmt)
    assert q.dtype == (torch.float8_e4m3fn if fmt.startswith("fp8") else torch.int8)
    assert s.shape == (3, 5, 1) and s.dtype == torch.float32
    assert torch.equal((q.float() * s).to(dtype), ref)


def test_quantize_rows_refuses_other_formats():
    with pytest.raises(ValueError, match="fp8_e4m3/token or int8/token"):
        Q.quantize_rows(torch.randn(2, 8), "fp4_e2m1/token", 0)


@pytest.mark.parametrize("fmt", ["fp4_e2m1/g64/m2", "fp4_e2m1/g48/po2", "fp4_e2m1/channel/po2"])
def test_w4a8_scale_split_reproduces_the_weight_exactly(fmt):
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(1))
    w[3, :64] *= 1e-2  # a small group next to large ones (po2 stays within 2^-8)
    qt = quantize(w, parse_format(fmt))
    gexp, row = w4a8_split_scales(qt.scale, qt.outer)
    assert gexp.dtype == torch.int8 and row.shape == (24,)
    if qt.outer is None:
        assert int(gexp.max()) == 0  # po2: the row scale is the largest group scale
    packed = __import__("qcompile.formats", fromlist=["pack_codes"]).pack_codes(qt.codes, 4)
    ref = dequantize_weight(packed, qt.scale, None, None, qt.outer, fmt, 200, torch.float32)
    gs = parse_format(fmt).group_size or 200
    got = torch.ops.qcompile.w4a8_linear(
        torch.eye(200).to(torch.float8_e4m3fn), torch.ones(200, 1), packed, gexp, row, None,
        gs, 200, torch.float32)
    assert torch.equal(got.T, ref)
    # Every FP4 value times its group factor is exact in FP8 E4M3 (the exponent shift).
    shifted = ref / row[:, None]
    assert torch.equal(shifted.to(torch.float8_e4m3fn).float(), shifted)


def test_w4a8_scale_split_refuses_inexact_scales():
    with pytest.raises(W4A8ScaleError, match="powers of two"):
        w4a8_split_scales(torch.full((2, 3), 0.3), None)
    tiny = torch.tensor([[1.0, 2.0**-9]])
    with pytest.raises(W4A8ScaleError, match="exact in FP8"):
        w4a8_split_scales(tiny, None)
    w4a8_split_scales(torch.tensor([[1.0, 2.0**-8]]), None)  # the edge is fine


# --- the lowered graph through the kernels ------------------------------------------------

KERNEL_CASES = [
    "quantize{w=fp4_e2m1/g32/asym}",
    "quantize{w=int4/g48/asym}",
    "quantize{w=int4/channel}",
    "quantize{w=nf4/g40/asym}",
    "quantize{w=fp8_e4m3/channel a=fp8_e4m3/token}",
    "quantize{w=fp4_e2m1/g32/m2 a=fp8_e4m3/token}",
    f"{ROT},quantize{{w=fp4_e2m1/channel/asym a=fp4_e2m1/token/asym kv=fp4_e2m1/token/asym}}",
    "quantize{w=int4/g32},quantize{w=int8/channel lm_head=true}",
    "quantize{w=fp8_e4m3/g32}",
]


@pytest.mark.parametrize("pipeline", KERNEL_CASES)
def test_lowered_graph_through_kernels_matches_reference(kernel_device, llama, pipeline):
    """Logits through the kernels (CUDA, or the interpreter on CPU) match the reference ops.

    Tolerance: fp32 accumulation order and, for FP8 activations, a rare code flipping at a
    rounding tie; 2e-3 of the logits' absmax covers both on this tiny model.
    """
    import contextlib

    from qcompile.backends.reference import compile_reference
    from qcompile.backends.triton.ops import kernels_on_cpu

    device = kernel_device
    ids = _ids()
    gm, _ = quantize_graph(capture(llama), pipeline, progress=False)
    ref = compile_reference(gm, device, fold=False)(ids.to(device))
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    gm, _ = quantize_graph(gm, "lower-triton,cleanup", progress=False)
    run = compile_reference(gm, device, fold=False)
    ctx = kernels_on_cpu() if device == "cpu" else contextlib.nullcontext()
    with ctx:
        out = run(ids.to(device))
    out = out[0] if isinstance(out, (tuple, list)) else out
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= 2e-3 * ref.abs().max().item(), err


# --- decode fusions (one-row graphs) -----------------------------------------------------

def _decode_graph(dtype: torch.dtype, pipeline: str):
    """A one-token graph of the tiny Llama (a decode step's row count) quantized by
    ``pipeline``, and its logits on a fixed token."""
    model = __import__("copy").deepcopy(tiny_model("llama")).to(dtype)
    gm, _ = quantize_graph(capture(model, example_seq=1, dynamic_seq=False), pipeline,
                           progress=False)
    ids = _ids(seq=1)
    return gm, ids, _logits(gm, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse", [True, False])
def test_decode_graph_fuses_norms_gates_and_residuals(dtype, fuse):
    """Every RMSNorm, SiLU gate and residual add around a one-row W4A16 linear folds into it
    (2 layers: fused qkv and gate_up behind norms, down behind the gate, o and down before the
    adds); the elementwise ops are gone and the CPU logits keep their bits."""
    pipeline = "quantize{w=fp4_e2m1/g32}" + (",fuse-linears" if fuse else "")
    gm, ids, ref = _decode_graph(dtype, pipeline)
    n_rsqrt = _targets(gm).count(torch.ops.aten.rsqrt.default)
    n_silu = _targets(gm).count(torch.ops.aten.silu.default)
    gm, report = quantize_graph(gm, "lower-triton,cleanup", progress=False)
    facts = report["passes"][0]["facts"]
    # Unfused q/k/v (gate/up) read one norm: it stays for the three siblings.
    want = {"gemv_rmsnorm": 4 if fuse else 0, "gemv_silu_gate": 2}
    assert {k: facts[k] for k in want} == want
    assert facts["gemv_residual"] == 4 and facts["w4a16"] == (8 if fuse else 14)
    targets = _targets(gm)
    assert targets.count(torch.ops.aten.rsqrt.default) == n_rsqrt - want["gemv_rmsnorm"]
    assert targets.count(torch.ops.aten.silu.default) == n_silu - want["gemv_silu_gate"]
    # Arguments are filled up to the last one set: a norm-only linear stops at rms_eps.
    fused = [n for n in gm.graph.nodes if n.target is Q.w4a16_linear.default and len(n.args) > 9]
    assert sum(len(n.args) == 13 and n.args[12] is not None for n in fused) == 4
    assert all(len(n.args) in (11, 12, 13) for n in fused)
    assert torch.equal(_logits(gm, ids), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_decode_graph_fuses_too(dtype):
    """One-row W8A16 linears take the same fusions (norms before the fused qkv and gate_up,
    the gate before down, the adds after o and down) and keep the CPU logits' bits; the
    INT8 head takes the final norm."""
    gm, ids, ref = _decode_graph(dtype, "quantize{w=int8/channel lm_head=true},fuse-linears")
    gm, report = quantize_graph(gm, "lower-triton,cleanup", progress=False)
    facts = report["passes"][0]["facts"]
    assert (facts["w8a16"], facts["gemv_rmsnorm"], facts["gemv_silu_gate"],
            facts["gemv_residual"]) == (9, 5, 2, 4), facts
    assert facts["w4a16"] == 0 and facts["not_lowered"] == []
    fused = [n for n in gm.graph.nodes if n.target is Q.w8a16_linear.default and len(n.args) > 8]
    assert len(fused) == 9
    assert torch.equal(_logits(gm, ids), ref)


def test_decode_fusion_skips_prefill_graphs_and_can_be_turned_off(llama):
    """Graphs of several rows keep the elementwise ops (Inductor fuses them there), and
    ``decode_fusion=false`` keeps them in a decode graph too."""
    gm, _ = quantize_graph(capture(llama), "quantize{w=fp4_e2m1/g32},fuse-linears",
                           progress=False)
    _, report = quantize_graph(gm, "lower-triton", progress=False)
    facts = report["passes"][0]["facts"]
    assert (facts["gemv_rmsnorm"], facts["gemv_silu_gate"], facts["gemv_residual"]) == (0, 0, 0)
    gm, _, _ = _decode_graph(torch.float32, "quantize{w=fp4_e2m1/g32},fuse-linears")
    p = parse_pipeline("lower-triton{decode_fusion=false}")
    assert str(p) == "lower-triton{decode_fusion=false}"
    _, report = quantize_graph(gm, p, progress=False)
    facts = report["passes"][0]["facts"]
    assert "gemv_residual" not in facts and facts["w4a16"] == 8


@pytest.mark.parametrize("pipeline", ["quantize{w=fp4_e2m1/g32/asym},fuse-linears",
                                      "quantize{w=int8/g32/asym lm_head=true},fuse-linears"])
def test_decode_fused_graph_through_kernels_matches_reference(kernel_device, pipeline):
    """The fused one-row graph through the batch-1 GEMV kernels (interpreter on CPU) gives the
    reference logits (tolerance of the kernel cases above)."""
    import contextlib

    from qcompile.backends.reference import compile_reference
    from qcompile.backends.triton.ops import kernels_on_cpu

    device = kernel_device
    gm, ids, _ = _decode_graph(torch.bfloat16, pipeline)
    ref = compile_reference(gm, device, fold=False)(ids.to(device))
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    gm, report = quantize_graph(gm, "lower-triton,cleanup", progress=False)
    assert report["passes"][0]["facts"]["gemv_residual"] == 4
    ctx = kernels_on_cpu() if device == "cpu" else contextlib.nullcontext()
    with ctx:
        out = compile_reference(gm, device, fold=False)(ids.to(device))
    out = out[0] if isinstance(out, (tuple, list)) else out
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= 2e-2 * ref.float().abs().max().item(), err


def test_w4a8_decode_graph_leaves_no_elementwise_kernel_around_its_linears():
    """W4A8, one row: RMSNorms and SiLU gates fold into the activation quantizes, residual
    adds into the GEMVs' epilogues; the CPU logits keep their bits. ``gate=false`` keeps the
    gates (and reaches the options)."""
    gm, ids, ref = _decode_graph(torch.bfloat16,
                                 "quantize{w=fp4_e2m1/g32/m2 a=fp8_e4m3/token},fuse-linears")
    gm2 = __import__("copy").deepcopy(gm)
    gm, report = quantize_graph(gm, "lower-triton,cleanup", progress=False)
    facts = report["passes"][0]["facts"]
    assert (facts["w4a8"], facts["rmsnorm"], facts["silu_gate"], facts["gemv_residual"]) == \
        (8, 4, 2, 4)
    targets = _targets(gm)
    assert torch.ops.aten.silu.default not in targets
    assert torch.ops.aten.rsqrt.default in targets  # the final norm, before the bf16 head
    assert torch.equal(_logits(gm, ids), ref)
    gm2, report = quantize_graph(gm2, "lower-triton{gate=false}", progress=False)
    assert report["passes"][0]["facts"]["silu_gate"] == 0
    assert torch.ops.aten.silu.default in _targets(gm2)
