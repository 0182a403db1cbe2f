"""Decode fusions of the batch-1 W4A16 GEMVs (:mod:`qcompile.backends.triton.gemv_fusion`).

Under the interpreter (CPU) and on CUDA: the RMSNorm and SiLU-gate prologues feed the products
the values the unfused ops compute, and the residual epilogue gives the bits of
``residual + linear(...)``, in every batch-1 kernel (FP4 words on FMAs and on tensor cores,
the byte kernel), split over K or not, reduced in place or by the reduce kernel.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import w4a16 as w4  # noqa: E402
from qcompile.backends.triton.gemv_fusion import (  # noqa: E402
    GemvFusion,
    epilogue_ref,
    prologue_ref,
)
from qcompile.backends.triton.runtime import KernelInputError  # noqa: E402
from qcompile.formats import pack_codes, parse_format, quantize  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def _weight(fmt: str, n: int, k: int, seed: int = 0):
    """(packed, table, scale, scale_neg, zero, outer, group_size) of a random [n, k] weight;
    FP4 with the runtime's cached table (what routes it to the integer decode)."""
    spec = parse_format(fmt)
    q = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), spec)
    if spec.elem == "fp4_e2m1":
        table = w4.element_table("fp4_e2m1", DEV)
    elif spec.element.kind == "int" and q.zero is not None:
        table = torch.arange(16, dtype=torch.float32, device=DEV)
    else:
        table = spec.element.table().to(DEV)
    gs = spec.group_size if spec.granularity == "group" else k
    rest = [None if t is None else t.to(DEV) for t in (q.scale, q.scale_neg, q.zero, q.outer)]
    return (pack_codes(q.codes, 4).to(DEV), table, *rest, gs)


def _fusions(k: int, n: int, dtype: torch.dtype, seed: int = 1) -> dict[str, GemvFusion]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEV)

    g, up, res = rnd(k), rnd(1, k), rnd(1, n) * 4
    return {
        "rms": GemvFusion(g, 1e-6),
        "rms-nogamma+res": GemvFusion(None, 1e-5, residual=res),
        "gate+res": GemvFusion(up=up, residual=res),
        "res": GemvFusion(residual=res),
    }


def _x(k: int, dtype: torch.dtype, seed: int = 2) -> torch.Tensor:
    return (torch.randn(1, k, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype).to(DEV)


def _same_as_composed(out: torch.Tensor, x: torch.Tensor, w: tuple, fusion: GemvFusion,
                      plain) -> None:
    """``out`` against the unfused ops around the same kernel (``plain(input)``): the residual
    add is exact; a prologue value may sit one ulp away (``exp``, the mean's summation order),
    which moves the result by at most that ulp times the weight row's magnitude."""
    ref = epilogue_ref(plain(prologue_ref(x, fusion)), fusion)
    if fusion.prologue == 0 or (not CUDA and x.dtype != torch.float32):
        # Rounded to 16 bits, the interpreter's exp and mean give PyTorch's CPU values here.
        assert torch.equal(out, ref)
        return
    wf = w4._dequant_ref(*w[:6], w[6], x.shape[-1])
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-21}[x.dtype]
    xin = prologue_ref(x, fusion).float()
    allowed = (xin.abs() * ulp) @ wf.abs().t() + ref.float().abs() * ulp * 2
    assert ((out.float() - ref.float()).abs() <= allowed).all()


@pytest.mark.parametrize("fmt", ["fp4_e2m1/g128", "fp4_e2m1/g128/asym", "int4/g64/asym",
                                 "fp4_e2m1/g64/m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_gemv_is_the_composed_ops(fmt, dtype):
    """Each fusion through ``w4a16_linear``'s batch-1 route (FP4 words, AFPQ, the byte
    kernel with INT asym zero points, M2 outer scales)."""
    k, n = 1024, 72
    w = _weight(fmt, n, k)
    x = _x(k, dtype)
    for name, fusion in _fusions(k, n, dtype).items():
        out = w4.w4a16_linear(x, *w, fusion=fusion)
        assert out.dtype == dtype and out.shape == (1, n), name
        _same_as_composed(out, x, w, fusion, lambda xin: w4.w4a16_linear(xin, *w))


@pytest.mark.parametrize("fmt", ["fp4_e2m1/g128", "fp4_e2m1/g128/asym"])
def test_fused_tensor_core_gemv(fmt):
    """The tensor-core GEMV takes the same fusions (its x tile is the prologue's output)."""
    from qcompile.backends.triton import w4a16_gemv as g1

    k, n = 1024, 72
    w = _weight(fmt, n, k)
    x = _x(k, torch.bfloat16)
    for fusion in _fusions(k, n, torch.bfloat16).values():
        out = g1.w4a16_gemv1(x, *w[:6], w[6], None, True, kernel="mma", fusion=fusion)
        _same_as_composed(out, x, w, fusion, lambda xin: g1.w4a16_gemv1(
            xin, *w[:6], w[6], None, True, kernel="mma"))


@pytest.mark.parametrize("split", [2, 3])
def test_fused_residual_after_split_k(monkeypatch, split):
    """Split over K, the residual is added where the partials are summed: in the column
    tile's last program, or in the reduce kernel (the same bits both ways)."""
    from qcompile.backends.triton import runtime
    from qcompile.backends.triton import w4a16_gemv as g1

    k, n = 2048, 200
    w = _weight("fp4_e2m1/g128/asym", n, k)
    x = _x(k, torch.bfloat16)
    fusion = _fusions(k, n, torch.bfloat16)["rms-nogamma+res"]
    args = (*w[:6], w[6], None, True)
    in_place = g1.w4a16_gemv1(x, *args, split=split, fusion=fusion)
    monkeypatch.setattr(runtime, "FUSED_REDUCE", False)
    separate = g1.w4a16_gemv1(x, *args, split=split, fusion=fusion)
    assert torch.equal(in_place, separate)
    _same_as_composed(in_place, x, w, fusion,
                      lambda xin: g1.w4a16_gemv1(xin, *args, split=split))


def test_rows_other_than_one_run_the_ops_around_the_linear():
    """Several rows (or a forced path) do not take the batch-1 GEMV: the prologue and the
    residual run as the plain ops around the linear, with the same bits as by hand."""
    k, n = 256, 40
    w = _weight("fp4_e2m1/g64", n, k)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, k, generator=gen).bfloat16().to(DEV)
    up = torch.randn(3, k, generator=gen).bfloat16().to(DEV)
    res = torch.randn(3, n, generator=gen).bfloat16().to(DEV)
    fusion = GemvFusion(up=up, residual=res)
    out = w4.w4a16_linear(x, *w, fusion=fusion)
    assert torch.equal(out, res + w4.w4a16_linear(torch.nn.functional.silu(x) * up, *w))


@pytest.mark.parametrize("fusion,match", [
    (lambda k, n: GemvFusion(torch.ones(k), 1e-6, up=torch.ones(1, k)), "not both"),
    (lambda k, n: GemvFusion(torch.ones(k + 1), 1e-6), "rms_weight has shape"),
    (lambda k, n: GemvFusion(rms_weight=torch.ones(k)), "rms_eps < 0"),
    (lambda k, n: GemvFusion(residual=torch.ones(1, n + 2)), "residual has shape"),
    (lambda k, n: GemvFusion(up=torch.ones(1, k, dtype=torch.float16)), "up is torch.float16"),
])
def test_bad_fusions_raise(fusion, match):
    k, n = 128, 16
    w = _weight("fp4_e2m1/g64", n, k)
    x = torch.ones(1, k, device=DEV)
    f = fusion(k, n)
    f = GemvFusion(*[t.to(DEV) if isinstance(t, torch.Tensor) else t
                     for t in (f.rms_weight, f.rms_eps, f.up, f.residual)])
    with pytest.raises(KernelInputError, match=match):
        w4.w4a16_linear(x, *w, fusion=f)


def test_op_on_cpu_is_the_composition():
    """``qcompile::w4a16_linear`` with fusion arguments, on the CPU reference path, computes
    exactly the ops it stands for (what ``lower-triton`` relies on to keep CPU bits)."""
    from qcompile.backends.triton.ops import rms_norm
    from qcompile.ops import dequantize_weight

    spec = parse_format("fp4_e2m1/g64")
    q = quantize(torch.randn(24, 128, generator=torch.Generator().manual_seed(4)), spec)
    packed = pack_codes(q.codes, 4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 128, generator=gen).bfloat16()
    g = torch.randn(128, generator=gen).bfloat16()
    up = torch.randn(2, 1, 128, generator=gen).bfloat16()
    res = torch.randn(2, 1, 24, generator=gen).bfloat16()
    op = torch.ops.qcompile.w4a16_linear
    w = dequantize_weight(packed, q.scale, None, None, None, "fp4_e2m1/g64", 128, x.dtype)
    lin = torch.nn.functional.linear
    got = op(x, packed, q.scale, None, None, None, None, "fp4_e2m1/g64", 128, g, 1e-6, None, res)
    assert torch.equal(got, res + lin(rms_norm(x, g, 1e-6), w))
    got = op(x, packed, q.scale, None, None, None, None, "fp4_e2m1/g64", 128, None, -1.0, up)
    assert torch.equal(got, lin(torch.nn.functional.silu(x) * up, w))
