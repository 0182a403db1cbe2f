"""Fused per-token activation quantize kernels (``qcompile.backends.triton.act_quant``).

On CUDA the full grid runs (rows 1/7/33/4097 x D 576/960/1536/2048/200 x every format x fp32/
bf16 x every Hadamard size); on CPU the kernels run in the Triton interpreter on a subset that
still covers every format, dtype, row count, D and Hadamard size once (about 30 s).

Tolerances:

* ``had_size=0``: bit-exact against ``qcompile.ops.quantize_activation`` (and the codes against
  ``compute_scales`` + RNE rounding).
* ``had_size>0``: the kernel sums the Hadamard in another order than the reference butterfly,
  so rotated values match ``qcompile.ops.hadamard`` to 1e-6 of the row's largest magnitude in
  fp32 (bf16/fp16: the same values rounded, so equal except rare near-ties, at most 0.2% of
  elements, one ulp apart). Quantizing the kernel's own rotated values with the reference is
  bit-exact with the kernel's output; against the reference's rotation the output is within
  one quantization step everywhere and differs beyond fp32 rounding of the scale (1e-5 of the
  row's range, one ulp of the output dtype) on at most 0.5% of elements.
* RMSNorm: the mean square is summed in another order (rsqrt itself is ``1 / sqrt`` in both),
  so results are within one quantization step, beyond scale rounding on at most 0.5% of
  elements; codes equal the reference's on 99% or more and the scales agree to 1e-6
  relative.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qcompile.backends.triton.jit import round_fp4_e2m1  # noqa: E402
from qcompile.backends.triton.runtime import KernelInputError, interpreting  # noqa: E402
from qcompile.errors import FormatError  # noqa: E402
from qcompile.formats import parse_format  # noqa: E402
from qcompile.formats.scales import compute_scales, group_stats  # noqa: E402
from qcompile.ops import hadamard  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)

from qcompile.backends.triton.act_quant import (  # noqa: E402
    act_quant,
    act_quant_ref,
    fused_fits,
    rmsnorm_quant,
    rmsnorm_quant_ref,
    silu_quant,
    silu_quant_ref,
)

FORMATS = ("fp8_e4m3/token", "int8/token", "int4/token/asym", "fp4_e2m1/token",
           "fp4_e2m1/token/asym")
DTYPES = (torch.float32, torch.bfloat16)
ROWS = (1, 7, 33, 4097) if CUDA else (1, 7, 33)
DIMS = (576, 960, 1536, 2048, 200)
HAD = {576: (64, 576), 960: (64, 960), 1536: (64, 1536), 2048: (64, 2048), 200: ()}


def _cycle(full: list[tuple], cpu: int) -> list[tuple]:
    """All of ``full`` on CUDA; on CPU ``cpu`` cases spread over it (a stride coprime with
    the axis lengths 2, 3 and 5, so every value of every axis comes up)."""
    if CUDA:
        return full
    stride = max(1, len(full) // cpu)
    while math.gcd(stride, 30) != 1:
        stride += 1
    return [full[(i * stride) % len(full)] for i in range(cpu)]


def _ids(v: object) -> str | None:
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


def _x(rows: int | tuple[int, ...], d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (rows,) if isinstance(rows, int) else rows
    # Heavy-tailed rows with outlier channels, like LLM activations.
    x = torch.randn(*shape, d, generator=g) * torch.rand(*shape, 1, generator=g).mul(4)
    x[..., :: max(1, d // 7)] *= 20
    return x.to(dtype).to(DEVICE)


def _step_ok(got: torch.Tensor, want: torch.Tensor, rot: torch.Tensor, fmt: str,
             max_frac: float) -> None:
    """``got`` within one quantization step of ``want`` (scales from ``rot``, the
    reference's input); beyond fp32 scale rounding on at most ``max_frac`` of elements."""
    spec = parse_format(fmt)
    rf = rot.float()
    sc = compute_scales(spec, group_stats(rf, spec), None)
    s = sc.scale if sc.scale_neg is None else torch.maximum(sc.scale, sc.scale_neg)
    a, b = got.float(), want.float()
    info = spec.element
    if info.kind == "int":
        spacing = torch.ones_like(a)
    else:
        mag = torch.maximum(a.abs(), b.abs()) / s
        e = torch.floor(torch.log2(mag)).clamp(min=1 - info.bias) - info.mbits
        spacing = torch.exp2(e)
    eps = torch.finfo(got.dtype).eps
    slack = 1e-5 * rf.abs().amax(-1, keepdim=True) + eps * b.abs()
    diff = (a - b).abs()
    assert bool((diff <= s * spacing * 1.001 + slack).all()), float((diff - s * spacing).max())
    assert float((diff > slack).float().mean()) <= max_frac


# --- bit-exact without Hadamard -------------------------------------------------------------

EXACT = _cycle(list(itertools.product(ROWS, DIMS, FORMATS, DTYPES)), 40)


@pytest.mark.parametrize(("rows", "d", "fmt", "dtype"), EXACT, ids=_ids)
def test_qdq_bit_exact(rows, d, fmt, dtype):
    x = _x(rows, d, dtype, seed=rows * d)
    got = act_quant(x, fmt)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, act_quant_ref(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_qdq_fp16_and_leading_dims(fmt):
    x = _x((2, 3), 200, torch.float16, seed=5)
    got = act_quant(x, fmt)
    assert got.shape == (2, 3, 200) and torch.equal(got, act_quant_ref(x, fmt))


@pytest.mark.parametrize(("fmt", "dtype"), itertools.product(FORMATS[:2], DTYPES), ids=_ids)
def test_codes_round_trip(fmt, dtype):
    x = _x((3, 2), 576, dtype, seed=11)
    q, s = act_quant(x, fmt, out="codes")
    assert q.dtype == (torch.float8_e4m3fn if fmt.startswith("fp8") else torch.int8)
    assert q.shape == x.shape and s.shape == (3, 2, 1) and s.dtype == torch.float32
    rq, rs = act_quant_ref(x, fmt, out="codes")
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs)
    assert torch.equal((q.float() * s).to(dtype), act_quant(x, fmt))


def test_zero_rows_and_zero_values():
    x = torch.zeros(3, 64, device=DEVICE)
    q, s = act_quant(x, "int8/token", out="codes")
    assert torch.equal(s, torch.ones_like(s)) and not q.any()
    assert act_quant(torch.empty(0, 64, device=DEVICE), "fp8_e4m3/token").shape == (0, 64)
    assert not act_quant(x, "int4/token/asym", had_size=64).any()


# --- with the online Hadamard ---------------------------------------------------------------

_HAD_PAIRS = [(d, h) for d in DIMS for h in HAD[d]]
if CUDA:
    HADS = [(r, d, h, f, t) for d, h in _HAD_PAIRS
            for r, f, t in itertools.product(ROWS, FORMATS, DTYPES)]
else:  # every (D, size) pair twice, cycling through row counts, formats and dtypes
    _rows, _kinds = itertools.cycle(ROWS), itertools.cycle(itertools.product(DTYPES, FORMATS))
    HADS = [(next(_rows), d, h, *next(_kinds)[::-1]) for d, h in _HAD_PAIRS * 2]


@pytest.mark.parametrize(("rows", "d", "had", "fmt", "dtype"), HADS, ids=_ids)
def test_hadamard_quantize(rows, d, had, fmt, dtype):
    """Rotation to fp32 rounding; quantization of it exact; one step from the reference."""
    x = _x(rows, d, dtype, seed=d + had)
    rot = act_quant(x, fmt, had, out="rotated")
    want_rot = hadamard(x, had)
    exact = hadamard(x.double(), had)
    rowmax = exact.abs().amax(-1, keepdim=True)
    if dtype == torch.float32:
        assert bool(((rot.double() - exact).abs() <= 1e-6 * rowmax).all())
    else:  # both are the bf16 rounding of values 1e-6 apart: equal but for rare near-ties
        diff = (rot.double() - want_rot.double()).abs()
        assert bool((diff <= exact.abs() * 2.0**-7 + 1e-6 * rowmax).all())
        assert float((diff > 0).float().mean()) <= 0.002
    got = act_quant(x, fmt, had)
    assert torch.equal(got, act_quant_ref(rot, fmt))  # the quantization itself is exact
    _step_ok(got, act_quant_ref(x, fmt, had), want_rot, fmt, max_frac=0.005)


def test_hadamard_fp16():
    x = _x((2, 3), 576, torch.float16, seed=4)
    rot = act_quant(x, "int4/token/asym", 576, out="rotated")
    assert rot.dtype == torch.float16 and rot.shape == x.shape
    assert float((rot != hadamard(x, 576)).float().mean()) <= 0.002
    assert torch.equal(act_quant(x, "int4/token/asym", 576), act_quant_ref(rot, "int4/token/asym"))


@pytest.mark.parametrize(("d", "had"), [(14336, 14336), (16384, 16384), (48, 24), (960, 480),
                                        (152, 152), (96, 8), (64, 1)])
def test_hadamard_other_sizes(d, had):
    """Kronecker sizes with a large 2^k (split in two dots), small 2^k folded into the base,
    a padded 2^k axis (8 x 60, 2 x 76) and tiny sizes."""
    x = _x(1 if d > 4096 else 3, d, torch.float32, seed=had)
    if not fused_fits(had, d, x.dtype, x.device):  # on a GPU: 14336 and fp32 16384
        with pytest.raises(ValueError, match="shared memory"):
            act_quant(x, "fp8_e4m3/token", had, out="rotated")
        return
    rot = act_quant(x, "fp8_e4m3/token", had, out="rotated")
    exact = hadamard(x.double(), had)
    assert bool(((rot.double() - exact).abs() <= 1e-6 * exact.abs().amax(-1, keepdim=True)).all())


@pytest.mark.parametrize(("rows", "d", "had", "dtype"), [
    (5, 8192, 8192, torch.bfloat16), (2, 16384, 16384, torch.bfloat16),
    (4, 4096, 256, torch.float16), (9, 1024, 1024, torch.float32), (6, 8192, 8192, torch.float32),
])
@pytest.mark.parametrize(("parts", "trans"), [(2, False), (2, True), (3, False), (1, False),
                                             (1, True), (0, False)])
def test_hadamard_two_products(monkeypatch, parts, trans, rows, d, had, dtype):
    """Power-of-two sizes run as (I (x) H_R) @ X @ H_C (had_quant): the benchmark shape's
    8192 = 64 x 128, 16384 = 128 x 128, two blocks of 256 per row (R = 2), fp32 rows (and
    fp32 8192, which the general kernel takes); more rows than programs, so the row loop
    repeats; the left operand split in two fp16 or three bf16 parts, products transposed or
    not, or the left factor as fp32 butterflies (parts 0). Rotation to fp32 accuracy,
    quantization of it exact, codes as the reference's."""
    from qcompile.backends.triton import had_quant
    from qcompile.backends.triton.had_quant import had2_plan

    monkeypatch.setattr(had_quant, "DEFAULT_PARTS", parts)  # both splits of the left operand
    monkeypatch.setattr(had_quant, "DEFAULT_TRANS", trans)  # and the transposed products
    plan = had2_plan(had, d, dtype == torch.float32)
    assert (plan is None) == (dtype == torch.float32 and d > 4096)
    if plan is not None:
        assert (plan.r, plan.c) == ((had // 128, 128) if had >= 128 else (1, had))
    x = _x(rows, d, dtype, seed=had + rows)
    rot = act_quant(x, "fp8_e4m3/token", had, out="rotated")
    exact = hadamard(x.double(), had)
    rowmax = exact.abs().amax(-1, keepdim=True)
    if dtype == torch.float32:
        assert bool(((rot.double() - exact).abs() <= 1e-6 * rowmax).all())
    elif parts == 1 and plan.r > 1:  # the speed variant: 11 bits into the left product
        eps = torch.finfo(dtype).eps
        err = (rot.double() - exact).abs()
        assert bool((err <= exact.abs() * eps + had_quant.ONE_PART_ERROR * rowmax).all())
        assert float((rot != hadamard(x, had)).float().mean()) <= 0.5
    else:
        assert float((rot != hadamard(x, had)).float().mean()) <= 0.002
        assert bool(((rot.double() - exact).abs() <= exact.abs() * 2.0**-7 + 1e-6 * rowmax).all())
    if parts == 0 and dtype != torch.float32:
        # fp32 adds from T's exact sums, as the reference's butterfly: its rows to an fp32
        # summation-order error before the rounding to x's dtype (the rounding itself: half an
        # ulp of the value, so no output may sit more than that plus 2^-20 of the row away).
        err = (rot.double() - exact).abs()
        half_ulp = exact.abs() * torch.finfo(dtype).eps / 2
        assert bool((err <= half_ulp + 2.0**-20 * rowmax).all())
    q, s = act_quant(x, "fp8_e4m3/token", had, out="codes")
    rq, rs = act_quant_ref(rot, "fp8_e4m3/token", out="codes")
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs)
    for fmt in ("int4/token/asym", "fp4_e2m1/token/asym"):
        assert torch.equal(act_quant(x, fmt, had), act_quant_ref(rot, fmt))


@pytest.mark.parametrize("parts", [2, 1, 0])
def test_hadamard_two_products_keep_tiny_rows(monkeypatch, parts):
    """bf16 rows far below 1, whose ``X @ H_C`` tiles peak at 2^-109.3, 2^-114.8 and
    2^-117.9 (the last two: where 2^(14 - e), the split's scaling, is no fp32 number), and an
    all-zero row: every output finite and as accurate as the rounding to bf16 allows, the
    codes the reference's on it. The interpreter's fp32 -> bf16 casts turn subnormals into wrong values (2^-128 into
    0), so there only outputs above bf16's normal range are compared."""
    from qcompile.backends.triton import had_quant

    monkeypatch.setattr(had_quant, "DEFAULT_PARTS", parts)
    d = 8192
    x = _x(4, d, torch.float32, seed=5)
    x = x / x.abs().amax(-1, keepdim=True)
    x = torch.where(x < 0, -1.0, 1.0) * x.abs().clamp_min(2.0**-7)
    tiny = torch.tensor([2.0**-110, 2.0**-116, 2.0**-119, 0.0]).to(DEVICE)
    x = (x * tiny[:, None]).to(torch.bfloat16)
    rot = act_quant(x, "fp8_e4m3/token", d, out="rotated")
    exact = hadamard(x.double(), d)
    tol = torch.finfo(torch.bfloat16)
    # The output's own rounding (an ulp at most, of the value or of bf16's subnormal step)
    # and fp32 sums' order (2^-20 of the row's largest value).
    rowmax = exact.abs().amax(-1, keepdim=True)
    step = exact.abs().clamp_min(tol.smallest_normal) * tol.eps + 2.0**-20 * rowmax
    extra = had_quant.ONE_PART_ERROR * rowmax if parts == 1 else 0
    seen = exact.abs() >= 2.0 * tol.smallest_normal if interpreting() else exact == exact
    assert bool(seen[:-1].float().mean(-1).ge(0.5).all())  # most of each row is compared
    assert bool(torch.isfinite(rot).all())
    assert bool(((rot.double() - exact).abs() <= step + extra)[seen].all())
    assert bool((rot[-1] == 0).all())
    q, sc = act_quant(x, "fp8_e4m3/token", d, out="codes")
    rq, rs = act_quant_ref(rot, "fp8_e4m3/token", out="codes")
    assert torch.equal(q.float()[seen], rq.float()[seen]) and torch.equal(sc, rs)


@pytest.mark.parametrize(("rows", "had", "dtype", "layout"), [
    (3, 14336, torch.bfloat16, (16, 32, 32)), (5, 12288, torch.float16, (32, 32, 16)),
    (4, 1536, torch.bfloat16, (128, 1, 16)), (3, 576, torch.float16, (16, 1, 64)),
    (5, 3072, torch.bfloat16, (16, 16, 16)), (2, 13824, torch.bfloat16, (128, 1, 128)),
    (3, 9216, torch.float16, (16, 16, 64)),
])
def test_hadamard_kronecker_products(rows, had, dtype, layout):
    """One Kronecker block per bf16/fp16 row runs as products over the row's axes
    (kron_quant), ``A x B x Q``: three products for 14336 = (16 x 32) x 28 (Llama-3-8B's MLP),
    12288 = (32 x 32) x 12, 3072 = (16 x 16) x 12 and 9216 = (16 x 16) x 36 (a 64-column
    base); two (no middle axis) for SmolLM2's 1536 = 128 x 12 and 576 = 16 x 36, and
    13824 = 128 x 108 (a 128-column base, a tile the general kernel cannot stage on a GPU);
    more rows than programs. Rotation to the reference's bf16/fp16 rounding but for
    near-ties, quantization of it exact."""
    from qcompile.backends.triton.kron_quant import kron_plan

    plan = kron_plan(had, had)
    assert plan is not None and plan.a * plan.b * plan.m == had
    assert (plan.a, plan.b, plan.q) == layout
    x = _x(rows, had, dtype, seed=had)
    rot = act_quant(x, "fp8_e4m3/token", had, out="rotated")
    exact = hadamard(x.double(), had)
    rowmax = exact.abs().amax(-1, keepdim=True)
    assert float((rot != hadamard(x, had)).float().mean()) <= 0.002
    eps = torch.finfo(dtype).eps
    assert bool(((rot.double() - exact).abs() <= exact.abs() * eps + 1e-6 * rowmax).all())
    q, s = act_quant(x, "fp8_e4m3/token", had, out="codes")
    rq, rs = act_quant_ref(rot, "fp8_e4m3/token", out="codes")
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs)
    for fmt in ("int4/token/asym", "fp4_e2m1/token/asym"):
        assert torch.equal(act_quant(x, fmt, had), act_quant_ref(rot, fmt))


def test_tiny_rows_divide_exactly():
    """Rows whose scale is below 2^-64 are scaled by 2^64 before the reciprocal multiply
    (1 / scale would overflow): still bit-exact with the reference's division."""
    x = _x(3, 576, torch.float32, seed=9) * torch.tensor([[1e-30], [1e-36], [2e-38]], device=DEVICE)
    for fmt in FORMATS:
        assert torch.equal(act_quant(x, fmt), act_quant_ref(x, fmt)), fmt
    q, s = act_quant(x, "fp8_e4m3/token", out="codes")
    rq, rs = act_quant_ref(x, "fp8_e4m3/token", out="codes")
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs)


def test_afpq_rows_with_a_tiny_side_divide_exactly():
    """AFPQ rows whose positive values are tiny (scale under 2^-64) and negative values huge,
    and the mirror: only the tiny side is scaled up by 2^64 (the other scale times 2^64
    would overflow fp32), and every code is the reference's."""
    x = _x(4, 576, torch.float32, seed=11).abs()
    x = torch.cat([torch.where(torch.arange(576, device=DEVICE) % 2 == 0, 1e-30, -1e30) * x[:2],
                   torch.where(torch.arange(576, device=DEVICE) % 3 == 0, -1e-33, 1e33) * x[2:]])
    fmt = "fp4_e2m1/token/asym"
    got, ref = act_quant(x, fmt), act_quant_ref(x, fmt)
    assert bool(torch.isfinite(got).all())
    assert torch.equal(got, ref)


def test_fused_fits():
    """Which rows a fused kernel holds: on a GPU the general kernel stages its tile through
    shared memory (at most 8192 padded elements), the two-product kernel takes powers of two
    up to 16384 for bf16/fp16 (4096 for fp32); the interpreter has no such limit."""
    bf16, f32 = torch.bfloat16, torch.float32
    assert fused_fits(8192, 8192, bf16, "cuda") and fused_fits(16384, 16384, bf16, "cuda")
    assert fused_fits(8192, 8192, f32, "cuda")  # general kernel, 8192-element tile
    assert not fused_fits(16384, 16384, f32, "cuda")
    assert fused_fits(14336, 14336, bf16, "cuda")  # kron_quant: 16 x 32 x 32 (28 padded)
    assert fused_fits(13824, 13824, bf16, "cuda")  # kron_quant: 128 x 128 (108 padded)
    assert not fused_fits(13824, 13824, f32, "cuda")  # the general kernel: 16384 elements
    assert not fused_fits(14336, 14336, f32, "cuda")  # fp32: only the general kernel
    assert fused_fits(14336, 14336, f32, "cpu") and fused_fits(1536, 1536, bf16, "cuda")
    assert not fused_fits(2 * 14336, 2 * 14336, bf16, "cuda")  # two blocks: too long
    assert not fused_fits(100, 64, bf16, "cpu")  # 100 does not divide 64
    assert fused_fits(0, 16384, bf16, "cuda", norm=True)  # no permutes: registers only
    assert fused_fits(0, 40000, bf16, "cuda") and not fused_fits(0, 70000, bf16, "cuda")


def test_hadamard_codes():
    x = _x(7, 1536, torch.bfloat16, seed=3)
    q, s = act_quant(x, "fp8_e4m3/token", 1536, out="codes")
    rot = act_quant(x, "fp8_e4m3/token", 1536, out="rotated")
    rq, rs = act_quant_ref(rot, "fp8_e4m3/token", out="codes")
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs)


# --- RMSNorm + quantize ---------------------------------------------------------------------

NORMS = _cycle(list(itertools.product(ROWS, DIMS, FORMATS, DTYPES, (True, False))), 16)


@pytest.mark.parametrize(("rows", "d", "fmt", "dtype", "with_w"), NORMS, ids=_ids)
def test_rmsnorm_quant(rows, d, fmt, dtype, with_w):
    x = _x(rows, d, dtype, seed=d)
    w = (torch.rand(d, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype).to(DEVICE)
    w = w if with_w else None
    got = rmsnorm_quant(x, w, 1e-6, fmt)
    assert got.dtype == dtype and got.shape == x.shape
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 if w is None else w.float())
    _step_ok(got, rmsnorm_quant_ref(x, w, 1e-6, fmt), y, fmt, max_frac=0.005)


@pytest.mark.parametrize("fmt", FORMATS[:2])
def test_rmsnorm_codes(fmt):
    x = _x((2, 5), 960, torch.bfloat16, seed=9)
    w = torch.linspace(0.5, 1.5, 960, device=DEVICE)
    q, s = rmsnorm_quant(x, w, 1e-5, fmt, out="codes")
    rq, rs = rmsnorm_quant_ref(x, w, 1e-5, fmt, out="codes")
    assert q.dtype == rq.dtype and s.shape == (2, 5, 1)
    assert bool(((s - rs).abs() <= 1e-6 * rs).all())
    diff = q.float() - rq.float()
    assert float((diff != 0).float().mean()) <= 0.01
    if fmt.startswith("int"):
        assert bool((diff.abs() <= 1).all())


# --- SiLU gate + quantize -------------------------------------------------------------------

@pytest.mark.parametrize(("rows", "d", "fmt", "dtype"), [
    ((3,), 1000, "fp8_e4m3/token", torch.bfloat16), ((2, 2), 960, "int8/token", torch.float32),
    ((1,), 4096, "fp8_e4m3/token", torch.float16), ((5,), 130, "int8/token", torch.bfloat16)])
def test_silu_quant_is_the_gate_then_the_quantize(rows, d, fmt, dtype):
    """``silu(x) * up`` rounded as the two eager ops round, then quantized: codes and scales of
    the reference (the interpreter's exp gives PyTorch's here; on CUDA exp is approximate, so
    a code may move one step at a rounding tie), and the dequantized rows."""
    x = _x(rows, d, dtype, seed=d)
    up = _x(rows, d, dtype, seed=d + 1)
    q, s = silu_quant(x, up, fmt, out="codes")
    rq, rs = silu_quant_ref(x, up, fmt, out="codes")
    assert q.dtype == rq.dtype and q.shape == x.shape and s.shape == (*rows, 1)
    diff = q.float() - rq.float()
    if DEVICE == "cpu":
        assert torch.equal(diff, torch.zeros_like(diff)) and torch.equal(s, rs)
    else:
        assert float((diff != 0).float().mean()) <= 0.01
        assert bool(((s - rs).abs() <= 2**-6 * rs).all())
    got = silu_quant(x, up, fmt)
    ref = silu_quant_ref(x, up, fmt)
    assert got.dtype == dtype and got.shape == x.shape
    if DEVICE == "cpu":
        assert torch.equal(got, ref)


def test_silu_quant_checks_up():
    x = _x((2,), 64, torch.bfloat16, seed=1)
    with pytest.raises(KernelInputError, match="up must be"):
        silu_quant(x, x.float(), "fp8_e4m3/token")
    with pytest.raises(KernelInputError, match="up must be"):
        silu_quant(x, x[:, :32], "fp8_e4m3/token")


# --- errors ---------------------------------------------------------------------------------

def test_format_errors():
    x = _x(2, 64, torch.float32)
    with pytest.raises(FormatError, match="fp8_e5m2/token.*supported: fp8_e4m3/token"):
        act_quant(x, "fp8_e5m2/token")
    with pytest.raises(FormatError, match="int8/g32"):
        act_quant(x, "int8/g32")
    with pytest.raises(FormatError, match="int8/token/po2"):
        act_quant(x, "int8/token/po2")
    with pytest.raises(FormatError, match="codes"):
        act_quant(x, "fp4_e2m1/token", out="codes")
    with pytest.raises(FormatError, match="codes"):
        rmsnorm_quant(x, None, 1e-6, "int4/token/asym", out="codes")
    with pytest.raises(ValueError, match="out must be"):
        act_quant(x, "int8/token", out="packed")
    with pytest.raises(ValueError, match="out must be"):
        rmsnorm_quant(x, None, 1e-6, "int8/token", out="rotated")


def test_hadamard_size_errors():
    with pytest.raises(ValueError, match="does not divide"):
        act_quant(_x(2, 200, torch.float32), "int8/token", 64)
    with pytest.raises(ValueError, match="no Hadamard construction of order 92"):
        act_quant(_x(2, 184, torch.float32), "int8/token", 92)
    with pytest.raises(ValueError, match="no Hadamard construction of order 6"):
        act_quant(_x(2, 12, torch.float32), "int8/token", 6)
    with pytest.raises(ValueError, match="base orders"):  # 11008 = 32 x 344
        act_quant(torch.zeros(1, 11008, device=DEVICE), "int8/token", 11008)
    with pytest.raises(ValueError, match="had_size"):
        act_quant(_x(2, 64, torch.float32), "int8/token", -1)


def test_input_errors(monkeypatch):
    x = _x(4, 64, torch.float32)
    with pytest.raises(KernelInputError, match="dtype float64"):
        act_quant(x.double(), "int8/token")
    with pytest.raises(KernelInputError, match="dtype int32"):
        act_quant(x.to(torch.int32), "int8/token")
    with pytest.raises(KernelInputError, match="contiguous"):
        act_quant(_x(64, 4, torch.float32).t(), "int8/token")
    with pytest.raises(KernelInputError, match="must be a tensor"):
        act_quant([1.0, 2.0], "int8/token")
    with pytest.raises(KernelInputError, match="weight has shape"):
        rmsnorm_quant(x, torch.ones(32, device=DEVICE), 1e-6, "int8/token")
    with pytest.raises(KernelInputError, match="weight has dtype"):
        rmsnorm_quant(x, torch.ones(64, dtype=torch.int8, device=DEVICE), 1e-6, "int8/token")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelInputError, match="TRITON_INTERPRET"):
        act_quant(torch.randn(4, 64), "int8/token")
    with pytest.raises(KernelInputError, match="TRITON_INTERPRET"):
        rmsnorm_quant(torch.randn(4, 64), None, 1e-6, "int8/token")


@triton.jit
def _round_fp4_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(y_ptr + offs, round_fp4_e2m1(tl.load(x_ptr + offs, mask=ok)), mask=ok)


def test_round_fp4_e2m1_is_the_formats_rounding():
    """The kernels' FP4 E2M1 rounding (magic-number adds per binade) against the format
    reference (bit-exact with ml_dtypes, tests/test_formats_elements.py): every multiple of
    2^-8 in [-8, 8], each grid midpoint (the ties) and the fp32 numbers either side of it,
    values beyond the saturation at 6, tiny and huge magnitudes, and random ones."""
    from qcompile.formats.elements import _round_f32

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    vals = torch.cat([torch.arange(-2048, 2049) / 256.0, near, -near,
                      torch.tensor([6.5, 7.0, 1e9, 3.4e38, 1e-30, 1e-45, 2.0**-126]),
                      torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3])
    x = torch.cat([vals, -vals]).to(DEVICE)
    y = torch.empty_like(x)
    _round_fp4_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.cpu(), _round_f32(x.cpu(), "fp4_e2m1"))
