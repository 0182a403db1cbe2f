"""W8A16 Triton kernels (:mod:`qcompile.backends.triton.w8a16`) against their PyTorch reference.

On CPU the kernels run under the Triton interpreter (a subset of shapes); on CUDA the full grid.
Weights are real qcompile quantizations of random matrices.
"""

from __future__ import annotations

import functools
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from qcompile.backends.triton import w8a16 as w8  # noqa: E402
from qcompile.backends.triton.runtime import KernelInputError  # noqa: E402
from qcompile.formats import parse_format, quantize  # noqa: E402
from qcompile.ops import dequantize_weight  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

FORMATS = ["int8/channel", "int8/g128", "int8/g64/asym", "fp8_e4m3/channel", "fp8_e4m3/g32",
           "fp8_e5m2/g128", "int8/channel/asym", "mxfp8_e4m3"]
ROUTES = ["gemv", "gemm", "dequant"]

_CPU_CASES = [(1, 40, 1000, torch.float32), (3, 72, 160, torch.bfloat16),
              (17, 40, 131, torch.float16)]
_GPU_CASES = list(itertools.product((1, 7, 33, 4097), (96, 200), (576, 1000, 131),
                                    (torch.float32, torch.bfloat16, torch.float16)))
CASES = _GPU_CASES if CUDA else _CPU_CASES


@functools.cache
def _weights(fmt: str, n: int, k: int):
    """(codes, scale, zero, outer, group_size, elem) of a random [n, k] weight."""
    spec = parse_format(fmt)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fmt}/{n}/{k}".encode()))
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    q = quantize(w, spec)
    gs = spec.group_size if spec.granularity == "group" else k
    zero = None if q.zero is None else q.zero.to(DEV)
    outer = None if q.outer is None else q.outer.to(DEV)
    return q.codes.to(DEV), q.scale.to(DEV), zero, outer, gs, spec.elem


def _inputs(fmt, m, n, k, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype).to(DEV)
    b = torch.randn(n, generator=gen).to(dtype).to(DEV) if bias else None
    return x, _weights(fmt, n, k), b


def _assert_close(out, ref, x, w, unrounded: bool) -> None:
    """Kernel vs reference: fp32 to summation order; 16-bit outputs to an ulp or two, plus
    (``unrounded``: the GEMV and GEMM multiply the weight before rounding it to x's dtype) the
    reference's rounding of W summed over K."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    wf = w8._dequant_ref(w[0], w[1], w[2], w[3], w[4], x.shape[-1], w[5])
    unit = {torch.float32: 0.0, torch.bfloat16: 2**-9, torch.float16: 2**-12}[ref.dtype]
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[ref.dtype]
    r = ref.float()
    xa = x.float().abs().reshape(-1, x.shape[-1])
    allowed = ((xa @ wf.abs().t()) * (unit if unrounded else 0.0) * 1.01
               + rtol * r.abs() + r.abs().max() * rtol / 4 + 1e-30)
    err = (out.float() - r).abs()
    assert (err <= allowed).all(), f"worst excess {(err - allowed).max().item():.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_decodes_like_dequantize_weight(fmt):
    for n, k in [(40, 1000), (72, 131)]:
        codes, scale, zero, outer, gs, elem = _weights(fmt, n, k)
        want = dequantize_weight(codes, scale, None, zero, outer, fmt, k, torch.float32)
        assert torch.equal(w8._dequant_ref(codes, scale, zero, outer, gs, k, elem), want)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_is_bit_exact(fmt, dtype):
    codes, scale, zero, outer, gs, elem = _weights(fmt, 40, 300)
    got = w8.w8a16_dequant(codes, scale, zero, outer, gs, elem, dtype)
    assert torch.equal(got, dequantize_weight(codes, scale, None, zero, outer, fmt, 300, dtype))


@pytest.mark.parametrize(("m", "n", "k", "dtype"), CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_matches_reference(fmt, m, n, k, dtype):
    x, w, b = _inputs(fmt, m, n, k, dtype, bias=m != 3)
    ref = w8.w8a16_linear_ref(x, *w[:5], w[5], b)
    routes = [r for r in ROUTES if w8.tiled(w[4], k) or r == "dequant"]
    for route in [None, *routes]:
        out = w8.w8a16_linear(x, *w[:5], w[5], b, path=route)
        _assert_close(out, ref, x, w, unrounded=route in ("gemv", "gemm", None))


def test_the_routes_follow_m(monkeypatch):
    """One row and up to GEMV_MAX_M take the GEMV, then the GEMM, then decode + cuBLAS; a
    group size the tiles cannot take always decodes."""
    called = []
    for name in ("_gemv_kernel", "_GEMV", "_gemm_kernel", "_GEMM", "_dequant_kernel"):
        monkeypatch.setattr(w8, name, name)
    monkeypatch.setattr(w8, "launch", lambda fn, *a, **kw: called.append(fn))
    monkeypatch.setattr(w8.F, "linear", lambda x, w, b=None: torch.zeros(x.shape[0], w.shape[0]))
    for m, fmt, k, want in [(1, "int8/g128", 256, "gemv"), (16, "int8/g128", 256, "gemv"),
                            (17, "int8/g128", 256, "gemm"), (255, "int8/g128", 256, "gemm"),
                            (256, "int8/g128", 256, "dequant"), (1, "int8/g24", 96, "dequant"),
                            (1, "int8/channel", 131, "gemv")]:
        called.clear()
        x, w, _ = _inputs(fmt, m, 40, k, torch.float32, bias=False)
        w8.w8a16_linear(x, *w[:5], w[5])
        assert called and want in called[0], (m, fmt, called)


@pytest.mark.parametrize("fmt", ["int8/channel", "fp8_e4m3/channel", "fp8_e5m2/channel"])
@pytest.mark.parametrize("acc2", [0, 1])
def test_gemv_channel_accumulators(monkeypatch, fmt, acc2):
    """Per-channel scales: the GEMV with a [BLOCK_N, BLOCK_K] accumulator summed after the K
    loop (ACC2) and with a sum per K tile both give the reference, split or not; the two
    differ only by fp32 summation order."""
    if CUDA:
        pytest.skip("the interpreter's single config; on a GPU the autotuner times both")
    monkeypatch.setitem(w8._INTERP_GEMV, "ACC2", acc2)
    for m, k in [(1, 1000), (3, 131)]:
        x, w, b = _inputs(fmt, m, 40, k, torch.float32)
        out = w8.w8a16_linear(x, *w[:5], w[5], b, path="gemv")
        _assert_close(out, w8.w8a16_linear_ref(x, *w[:5], w[5], b), x, w, unrounded=True)
    # A per-group weight ignores ACC2 (the scale applies per K tile): the same bits.
    x, w, b = _inputs("int8/g64/asym", 1, 40, 1000, torch.float32)
    out = w8.w8a16_linear(x, *w[:5], w[5], b, path="gemv")
    monkeypatch.setitem(w8._INTERP_GEMV, "ACC2", 1 - acc2)
    assert torch.equal(out, w8.w8a16_linear(x, *w[:5], w[5], b, path="gemv"))


def test_gemv_channel_configs_only_take_acc2_per_channel():
    """The autotuner's list keeps the ACC2 tiles for per-channel scales only."""
    args = {"K": 4096}
    chan = w8._prune_gemv(w8.GEMV_CONFIGS, args, GROUP_SIZE=4096, CHANNEL=True)
    grp = w8._prune_gemv(w8.GEMV_CONFIGS, args, GROUP_SIZE=128, CHANNEL=False)
    assert {c.kwargs["ACC2"] for c in chan} == {0, 1}
    assert grp and all(not c.kwargs["ACC2"] for c in grp)
    assert all(128 % c.kwargs["BLOCK_K"] == 0 for c in grp)


def test_gemv_sums_its_splits_in_its_last_program(monkeypatch):
    """Split over K, the GEMV's last program per column tile sums the partials: the reduce
    kernel's bits, in one launch, and the arrival counts are left at zero."""
    from qcompile.backends.triton import runtime

    x, w, b = _inputs("int8/g64/asym", 3, 40, 1000, torch.bfloat16)
    assert w8._pick_split(40, 1000, x.device) > 1
    launches = []
    real = w8.launch
    monkeypatch.setattr(w8, "launch", lambda fn, *a, **k: (launches.append(fn), real(fn, *a, **k)))
    fused = w8.w8a16_linear(x, *w[:5], w[5], b, path="gemv")
    assert len(launches) == 1
    counts = runtime.arrival_counts(x.device, 1)
    assert counts is not None and not counts.any()
    monkeypatch.setattr(runtime, "FUSED_REDUCE", False)
    launches.clear()
    assert torch.equal(w8.w8a16_linear(x, *w[:5], w[5], b, path="gemv"), fused)
    assert len(launches) == 2  # the GEMV, then the reduce kernel


@pytest.mark.parametrize("what", ["rms", "rms-no-weight", "silu-residual", "residual"])
@pytest.mark.parametrize(("fmt", "k"), [("int8/g64/asym", 1000), ("fp8_e4m3/channel", 256)])
def test_gemv_does_the_decode_fusions(fmt, k, what):
    """One row: the GEMV does the RMSNorm or SiLU gate on x and the residual add itself, as
    the unfused ops compute them (module docstring of gemv_fusion); several rows run them
    as separate ops around the linear, the unfused bits exactly."""
    from qcompile.backends.triton.gemv_fusion import GemvFusion, epilogue_ref, prologue_ref

    gen = torch.Generator().manual_seed(7)
    n = 40
    _, w, b = _inputs(fmt, 1, n, k, torch.bfloat16)
    for m in (1, 3):
        x = torch.randn(1, m, k, generator=gen).bfloat16().to(DEV)
        g = torch.rand(k, generator=gen).bfloat16().to(DEV)
        up = torch.randn(1, m, k, generator=gen).bfloat16().to(DEV)
        res = torch.randn(1, m, n, generator=gen).bfloat16().to(DEV)
        fusion = {"rms": GemvFusion(g, 1e-5), "rms-no-weight": GemvFusion(None, 1e-6),
                  "silu-residual": GemvFusion(up=up, residual=res),
                  "residual": GemvFusion(residual=res)}[what]
        xin = prologue_ref(x, fusion)
        ref = epilogue_ref(w8.w8a16_linear_ref(xin, *w[:5], w[5], b), fusion)
        out = w8.w8a16_linear(x, *w[:5], w[5], b, fusion=fusion)
        if m > 1:  # the composition itself
            assert torch.equal(out, epilogue_ref(w8.w8a16_linear(xin, *w[:5], w[5], b),
                                                 fusion))
            continue
        unfused = w8.w8a16_linear(xin, *w[:5], w[5], b)
        if what == "residual":  # the add is exact: the unfused GEMV's bits
            assert torch.equal(out, epilogue_ref(unfused, fusion))
        # The prologue may put an input element an ulp (2^-8) away (fp32 mean square order,
        # approximate exp on a GPU), and the GEMV does not round W: per output, at most about
        # 2^-7 of sum |x w|, plus rounding of the result (and of the residual add).
        wf = w8._dequant_ref(w[0], w[1], w[2], w[3], w[4], k, w[5])
        bound = (xin.float().abs().reshape(1, k) @ wf.abs().t()) * 2**-7 \
            + ref.float().abs().reshape(1, n) * 2**-7 + 1e-6
        err = (out.float() - ref.float()).abs().reshape(1, n)
        assert (err <= bound).all(), (what, (err - bound).max().item())


def test_gemv_split_is_deterministic():
    x, w, b = _inputs("int8/g64/asym", 1, 40, 1000, torch.float32)
    outs = [w8.w8a16_linear(x, *w[:5], w[5], b, path="gemv") for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_leading_dims_and_empty():
    x, w, b = _inputs("fp8_e4m3/channel", 6, 40, 64, torch.float32)
    out = w8.w8a16_linear(x.reshape(2, 3, 64), *w[:5], w[5], b)
    assert out.shape == (2, 3, 40)
    assert torch.equal(out.reshape(6, 40), w8.w8a16_linear(x, *w[:5], w[5], b))
    empty = w8.w8a16_linear(x[:0], *w[:5], w[5], b)
    assert empty.shape == (0, 40)
    from qcompile.backends.triton.gemv_fusion import GemvFusion

    res = torch.randn(1, 40, generator=torch.Generator().manual_seed(2)).to(DEV)
    codes0 = w[0][:, :0]  # K = 0: the result is the bias, plus the fused residual
    y = w8.w8a16_linear(x[:1, :0], codes0, w[1][:, :0], None, None, 64, w[5], b,
                        fusion=GemvFusion(residual=res))
    assert torch.equal(y, (b + res).reshape(1, 40))


def test_bad_inputs_are_named():
    x, (codes, scale, zero, outer, gs, elem), b = _inputs("int8/g64/asym", 2, 40, 128,
                                                          torch.float32)
    with pytest.raises(KernelInputError, match="elem must be one of"):
        w8.w8a16_linear(x, codes, scale, zero, outer, gs, "int4")
    with pytest.raises(KernelInputError, match="group_size must be a positive integer"):
        w8.w8a16_linear(x, codes, scale, zero, outer, 0, elem)
    with pytest.raises(KernelInputError, match="codes has shape"):
        w8.w8a16_linear(x, codes[:, :64], scale, zero, outer, gs, elem)
    with pytest.raises(KernelInputError, match="scale has shape"):
        w8.w8a16_linear(x, codes, scale[:, :1], zero, outer, gs, elem)
    with pytest.raises(KernelInputError, match="zero points are for int8"):
        w8.w8a16_linear(x, codes, scale, zero, outer, gs, "fp8_e4m3")
    with pytest.raises(KernelInputError, match="codes has dtype int8"):
        w8.w8a16_linear(x, codes.view(torch.int8), scale, zero, outer, gs, elem)
    with pytest.raises(KernelInputError, match="path must be"):
        w8.w8a16_linear(x, codes, scale, zero, outer, gs, elem, path="fast")
    with pytest.raises(KernelInputError, match="multiple of 16"):
        w8.w8a16_linear(x[:, :96], codes[:, :96], scale.new_ones(40, 4), None, outer, 24,
                        elem, path="gemv")


def test_exact_products_in_fp32():
    """Small integer activations and INT8 codes: every product and sum is exact in fp32, so
    each route gives the reference's bits exactly (any wrong code value would show)."""
    n, k = 40, 256
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8).to(DEV)
    scale = torch.exp2(torch.randint(-3, 3, (n, k // 64), generator=gen).float()).to(DEV)
    for m in (1, 20, 260):
        x = torch.randint(-4, 5, (m, k), generator=gen).float().to(DEV)
        ref = w8.w8a16_linear_ref(x, codes, scale, None, None, 64, "int8")
        for route in ROUTES[int(m > 20):]:
            assert torch.equal(w8.w8a16_linear(x, codes, scale, None, None, 64, "int8",
                                               path=route), ref), (m, route)


@pytest.mark.parametrize("elem", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_every_code_decodes(elem):
    """Every finite code decodes to the element's value, through each route."""
    from qcompile.formats.elements import element_info

    table = element_info(elem).table()
    keep = torch.isfinite(table)
    codes = torch.arange(256, dtype=torch.uint8)[keep].reshape(1, -1).to(DEV)
    want = table[keep]
    k = codes.shape[1]
    scale = torch.ones(1, 1, device=DEV)
    got = w8.w8a16_dequant(codes, scale, None, None, k, elem, torch.float32)
    assert torch.equal(got.cpu()[0], want)
    x = torch.eye(k, device=DEV)  # row i picks code i: y = that code's value
    y = w8.w8a16_linear(x, codes, scale, None, None, k, elem, path="gemm")
    assert torch.equal(y.cpu()[:, 0], want)
    y1 = w8.w8a16_linear(x, codes, scale, None, None, k, elem, path="gemv")  # a row each
    assert torch.equal(y1.cpu()[:, 0], want)


def test_reference_is_a_linear():
    x, w, b = _inputs("int8/g128", 5, 40, 300, torch.bfloat16)
    ref = w8.w8a16_linear_ref(x, *w[:5], w[5], b)
    wx = dequantize_weight(w[0], w[1], None, w[2], w[3], "int8/g128", 300, torch.bfloat16)
    assert torch.equal(ref, F.linear(x.float(), wx.float(), b.float()).to(torch.bfloat16))
