"""W4A8 kernel (``qcompile.backends.triton.w4a8``): FP4 -> FP8 exponent shift, FP8 GEMM.

Runs on CUDA when present, else on CPU tensors in the Triton interpreter (conftest sets
TRITON_INTERPRET=1): a subset of the shape grid there, the full grid on CUDA.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from qcompile.backends.triton.runtime import KernelInputError  # noqa: E402
from qcompile.backends.triton.w4a8 import (  # noqa: E402
    GEMV_MAX_M,
    GEXP_RANGE,
    W4A8ScaleError,
    w4a8_linear,
    w4a8_linear_ref,
    w4a8_split_scales,
    w4a8_weight_fp8,
)
from qcompile.formats import decode, pack_codes, parse_format, quantize  # noqa: E402
from qcompile.ops import dequantize_weight  # noqa: E402
from qcompile.testing import assert_within_ulp, fp8_mma_slack, fp8_rows  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
FP8 = torch.float8_e4m3fn



def fp4_weight(n: int, k: int, group: int, scale: str, gen: torch.Generator):
    """A quantized FP4 weight whose groups span several octaves (so gexp takes many values,
    down to m2's floor of -8 and the E4M3 subnormal path), packed, with its split scales."""
    w = torch.rand(n, k, generator=gen) * 2 - 1
    w[:, ::group] = 1.0  # every group's absmax is exactly its 2^-octave
    # po2: gexp = -octave, so octaves 0..8 fill its allowed range; m2 floors deeper groups
    period = 12 if scale == "m2" else 9
    octave = (torch.arange(k) // group * 5 + torch.arange(n)[:, None]) % period
    w = torch.ldexp(w, -octave.float())
    fmt = f"fp4_e2m1/g{group}/{scale}"
    q = quantize(w, parse_format(fmt))
    gexp, row_scale = w4a8_split_scales(q.scale, q.outer)
    return q, fmt, pack_codes(q.codes, 4), gexp, row_scale


def make_inputs(m, k, n, group, scale="m2", bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, a_scale = fp8_rows(torch.randn(m, k, generator=gen) * 2)
    _, _, packed, gexp, row_scale = fp4_weight(n, k, group, scale, gen)
    c = torch.randn(n, generator=gen) if bias else None
    return tuple(None if t is None else t.to(DEV)
                 for t in (a, a_scale, packed, gexp, row_scale, c))



# --- scale split and the exactness of FP4 -> FP8 ---------------------------------------------

def test_gexp_range_is_the_exact_one():
    assert GEXP_RANGE == (-8, 6)
    vals = decode(torch.arange(16, dtype=torch.uint8), "fp4_e2m1")
    for g in range(-12, 10):
        w = torch.ldexp(vals, torch.tensor(float(g)))
        exact = torch.equal(w.to(FP8).float(), w)
        assert exact == (GEXP_RANGE[0] <= g <= GEXP_RANGE[1]), g


def test_split_m2_scales():
    q, _, _, gexp, row_scale = fp4_weight(40, 1000, 64, "m2", torch.Generator().manual_seed(0))
    assert gexp.dtype == torch.int8 and gexp.shape == (40, 16)  # ragged: ceil(1000 / 64)
    assert int(gexp.min()) == -8 and int(gexp.max()) == 0  # m2 factors lie in [2^-8, 1]
    assert torch.equal(torch.ldexp(torch.ones(40, 16), gexp.float()), q.scale)
    assert torch.equal(row_scale, q.outer.reshape(-1))


def test_split_po2_scales():
    q, _, _, gexp, row_scale = fp4_weight(40, 576, 32, "po2", torch.Generator().manual_seed(1))
    assert q.outer is None and int(gexp.max()) == 0 and int(gexp.min()) == -8
    assert torch.equal(gexp.amax(dim=1), torch.zeros(40, dtype=torch.int8))
    assert torch.equal(torch.ldexp(row_scale[:, None], gexp.float()), q.scale)


@pytest.mark.parametrize("scale,group,k", [("m2", 128, 576), ("m2", 64, 1000), ("m2", 32, 130),
                                           ("po2", 128, 1000), ("po2", 64, 256)])
def test_fp8_weight_is_exact_dequantized_weight(scale, group, k):
    """FP4 -> FP8 is exact under M1/M2: W8 == dequantize_weight / row_scale bit for bit, and
    the reference equals F.linear of the dequantized operands up to fp32 rounding."""
    gen = torch.Generator().manual_seed(2)
    q, fmt, packed, gexp, row_scale = fp4_weight(96, k, group, scale, gen)
    deq = dequantize_weight(packed, q.scale, None, None, q.outer, fmt, k, torch.float32)
    w8 = w4a8_weight_fp8(packed, gexp, group, k)
    assert w8.dtype == FP8
    assert torch.equal(w8.float(), deq / row_scale[:, None])
    assert torch.equal(w8.float() * row_scale[:, None], deq)
    a, a_scale = fp8_rows(torch.randn(7, k, generator=gen))
    bias = torch.randn(96, generator=gen)
    ref = w4a8_linear_ref(a, a_scale, packed, gexp, row_scale, group, bias, torch.float32)
    lin = F.linear(a.float() * a_scale, deq, bias)
    torch.testing.assert_close(ref, lin, rtol=1e-5, atol=1e-5 * float(lin.abs().max()))


def _every_code_at_every_exponent(k: int, group: int):
    """Packed FP4 rows holding all 16 codes, one row per exponent of GEXP_RANGE (shifted by
    one per group), and the exact fp32 weight they stand for."""
    lo, hi = GEXP_RANGE
    n = hi - lo + 1
    codes = torch.arange(16, dtype=torch.uint8).repeat(n, k // 16)
    g = torch.arange(lo, hi + 1)[:, None] + torch.arange(-(-k // group))[None, :]
    gexp = (torch.remainder(g - lo, n) + lo).to(torch.int8)
    expect = torch.ldexp(decode(codes, "fp4_e2m1"),
                         gexp.float().repeat_interleave(group, dim=1)[:, :k])
    return pack_codes(codes, 4), gexp, expect


@pytest.mark.parametrize("path", ["fused", "swap"])
@pytest.mark.parametrize(("group", "how"), [
    (64, "place"), (64, "shift"), (64, "mul"), (32, "place"), (32, "mul"), (24, "shift"),
    (24, "mul")])
def test_kernel_builds_every_code_at_every_exponent(monkeypatch, group, how, path):
    """Identity activations expose W8 itself: all 16 codes x all 15 exponents, bit-exact.

    Under the interpreter's BLOCK_K 64 the group sizes take each decode (``DECODES``) on each
    exponent path: one group per row and block (64; ``place`` rescales the accumulator, the
    swapped kernel multiplies instead), a per-group tile (32), a per-column select (24)."""
    from qcompile.backends.triton import w4a8

    monkeypatch.setattr(w4a8, "DECODE", how)
    k = 64
    packed, gexp, expect = _every_code_at_every_exponent(k, group)
    n = packed.shape[0]
    a = torch.eye(k).to(FP8)
    out = w4a8_linear(a.to(DEV), torch.ones(k, 1, device=DEV), packed.to(DEV), gexp.to(DEV),
                      torch.ones(n, device=DEV), group, out_dtype=torch.float32, path=path)
    w8 = w4a8_weight_fp8(packed, gexp, group, k).float()
    assert torch.equal(w8, expect)
    assert torch.equal(out.T.cpu(), w8)


# --- kernel vs reference -----------------------------------------------------------------------

def _cases() -> list[tuple]:
    """CUDA: every (M, K, N) x group x scale rule. Interpreter: every (M, K, N) once, cycling
    group size, scale rule, dtype and bias (plus a group size that is not a power of two)."""
    f32, bf16 = torch.float32, torch.bfloat16
    shapes = itertools.product([1, 7, 33, 4097] if CUDA else [1, 7, 33], [576, 1000, 130, 256],
                               [96, 200])
    if CUDA:
        grid = itertools.product(shapes, [32, 64, 128], ["m2", "po2"])
        return [(m, k, n, g, s, (f32, bf16)[i % 2], i % 3 == 0)
                for i, ((m, k, n), g, s) in enumerate(grid)]
    return [(m, k, n, (32, 64, 128)[i % 3], ("m2", "po2")[i // 3 % 2], (f32, bf16)[i % 2],
             i % 4 < 2) for i, (m, k, n) in enumerate(shapes)] + [
        (7, 131, 96, 50, "m2", torch.float16, True)]


def check(out, a, a_scale, packed, gexp, row_scale, group, c=None, mma=True):
    """``out`` against the fp32 reference computed on the CPU; with ``mma``, the FP8 MMA's
    accumulation bound on CUDA (the GEMV path multiplies and adds in fp32)."""
    a, a_scale, packed, gexp, row_scale, c = (None if t is None else t.cpu()
                                              for t in (a, a_scale, packed, gexp, row_scale, c))
    ref = w4a8_linear_ref(a, a_scale, packed, gexp, row_scale, group, c, torch.float32)
    w8 = w4a8_weight_fp8(packed, gexp, group, a.shape[1])
    assert_within_ulp(out, ref, fp8_mma_slack(a.to(DEV), a_scale, w8, row_scale) if mma else None)


@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_promoted_accumulation(path):
    """fast_accum=False reaches both FP8 MMA paths: under the interpreter the same bits as the
    default, on CUDA within the promoted bound."""
    a, a_scale, packed, gexp, row_scale, c = make_inputs(40, 600, 48, 64, bias=True, seed=9)
    out = w4a8_linear(a, a_scale, packed, gexp, row_scale, 64, c, torch.float32, path=path,
                      fast_accum=False)
    if not CUDA:
        assert torch.equal(out, w4a8_linear(a, a_scale, packed, gexp, row_scale, 64, c,
                                            torch.float32, path=path))
    ref = w4a8_linear_ref(*(t.cpu() for t in (a, a_scale, packed, gexp, row_scale)), 64,
                          c.cpu(), torch.float32)
    w8 = w4a8_weight_fp8(packed.cpu(), gexp.cpu(), 64, 600)
    assert_within_ulp(out, ref, fp8_mma_slack(a, a_scale, w8, row_scale, fast=False))


@pytest.mark.parametrize("m,k,n,group,scale,out_dtype,bias", _cases())
def test_kernel_matches_reference(m, k, n, group, scale, out_dtype, bias):
    a, a_scale, packed, gexp, row_scale, c = make_inputs(m, k, n, group, scale, bias)
    out = w4a8_linear(a, a_scale, packed, gexp, row_scale, group, c, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.device == a.device
    check(out, a, a_scale, packed, gexp, row_scale, group, c, mma=m > GEMV_MAX_M)


def test_strided_activations():
    a, a_scale, packed, gexp, row_scale, _ = make_inputs(7, 130, 96, 32, seed=3)
    a_t = a.float().T.contiguous().to(FP8).T
    out = w4a8_linear(a_t, a_scale.reshape(-1), packed, gexp, row_scale[:, None], 32,
                      out_dtype=torch.float32)
    check(out, a, a_scale, packed, gexp, row_scale, 32, mma=False)  # M = 7: the GEMV path



# --- prefill path: shift the weight to FP8 once, then the FP8 GEMM ------------------------------

@pytest.mark.parametrize(("k", "n", "group"), [
    (512, 33, 512),   # one group per 256-wide tile (scalar exponent per row)
    (600, 37, 128),   # whole groups per tile, ragged last group and K tail
    (257, 5, 32),     # odd K: the pad nibble is not stored
    (131, 40, 50),    # a group size that does not tile 256: per-element exponents
    (1000, 3, 192),
])
def test_shift_to_fp8_is_bit_exact(k, n, group):
    from qcompile.backends.triton.w4a8_dequant import w4a8_dequant

    gen = torch.Generator().manual_seed(k + n)
    _, _, packed, gexp, _ = fp4_weight(n, k, group, "m2", gen)
    w8 = w4a8_dequant(packed.to(DEV), gexp.to(DEV), group, k)
    assert w8.dtype == FP8 and w8.shape == (n, k)
    expect = w4a8_weight_fp8(packed, gexp, group, k)
    assert torch.equal(w8.cpu().view(torch.uint8), expect.view(torch.uint8))


def _shift_tiles():
    from qcompile.backends.triton import w4a8_dequant as dq

    return [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], 128 if c in dq.SHIFT_CONFIGS else 50)
            for c in dq.SHIFT_CONFIGS + dq.GATHER_CONFIGS]


@pytest.mark.parametrize(("block_n", "block_k", "group"), _shift_tiles())
def test_shift_every_autotune_tile_is_bit_exact(monkeypatch, block_n, block_k, group):
    """Each autotune config's tile (the GPU tunes over them) on ragged N and K, with whole
    groups per tile (128) or per-element exponents (50): the same bytes as the reference."""
    from qcompile.backends.triton import w4a8_dequant as dq

    cfg = [c for c in dq.SHIFT_CONFIGS + dq.GATHER_CONFIGS
           if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) == (block_n, block_k)]
    assert dq._prune(cfg, {}, GROUP_SIZE=group) == cfg  # the tile takes this group size
    monkeypatch.setattr(dq, "_blocks", lambda gs: (block_n, block_k))
    n, k = block_n + 5, block_k + 344
    _, _, packed, gexp, _ = fp4_weight(n, k, group, "m2", torch.Generator().manual_seed(k))
    w8 = dq.w4a8_dequant(packed.to(DEV), gexp.to(DEV), group, k)
    expect = w4a8_weight_fp8(packed, gexp, group, k)
    assert torch.equal(w8.cpu().view(torch.uint8), expect.view(torch.uint8))


@pytest.mark.parametrize("group", [256, 32, 24])
def test_shift_to_fp8_every_code_at_every_exponent(group):
    """All 16 codes (signed zero included) x all 15 exponents of GEXP_RANGE, bit-exact."""
    from qcompile.backends.triton.w4a8_dequant import w4a8_dequant

    k = 768
    packed, gexp, expect = _every_code_at_every_exponent(k, group)
    w8 = w4a8_dequant(packed.to(DEV), gexp.to(DEV), group, k).cpu()
    assert torch.equal(w8.view(torch.uint8), w4a8_weight_fp8(packed, gexp, group, k).view(
        torch.uint8))
    assert torch.equal(w8.float(), expect)
    assert torch.equal(torch.signbit(w8.float()), torch.signbit(expect))


@pytest.mark.parametrize(("m", "k", "n", "group", "bias", "out_dtype"), [
    (1, 200, 48, 64, True, torch.bfloat16), (7, 131, 96, 50, False, torch.float16),
    (33, 576, 200, 32, True, torch.float32), (40, 257, 70, 128, False, torch.bfloat16),
    (70, 1000, 96, 192, True, torch.float32)] + ([
    (4097, 576, 200, 64, True, torch.bfloat16), (200, 8192, 256, 128, False, torch.float32)]
    if CUDA else []))
def test_swapped_kernel_matches_the_reference(m, k, n, group, bias, out_dtype):
    """The fused kernel with the decoded weight as the first MMA operand (``path="swap"``):
    odd M, K and N, ragged groups, every output dtype, with and without bias, both
    accumulation modes."""
    a, a_scale, packed, gexp, row_scale, c = make_inputs(m, k, n, group, bias=bias, seed=m + k)
    for fast in (True, False):
        out = w4a8_linear(a, a_scale, packed, gexp, row_scale, group, c, out_dtype=out_dtype,
                          path="swap", fast_accum=fast)
        assert out.dtype == out_dtype and out.shape == (m, n)
        ref = w4a8_linear_ref(*(t.cpu() for t in (a, a_scale, packed, gexp, row_scale)), group,
                              None if c is None else c.cpu(), torch.float32)
        w8 = w4a8_weight_fp8(packed.cpu(), gexp.cpu(), group, k)
        assert_within_ulp(out, ref, fp8_mma_slack(a, a_scale, w8, row_scale, fast=fast))


@pytest.mark.parametrize(("m", "group", "bias", "out_dtype", "path"), [
    (1, 128, True, torch.bfloat16, "gemv"), (1, 50, False, torch.float32, "gemv"),
    (7, 32, True, torch.float16, "gemv"), (16, 64, False, torch.bfloat16, "gemv"),
    (256, 32, True, torch.bfloat16, "dequant"), (300, 128, False, torch.float32, "dequant"),
    (257, 50, True, torch.float16, "dequant")])
def test_each_path_matches_the_reference(m, group, bias, out_dtype, path):
    """The path M picks (up to GEMV_MAX_M the W4A16 GEMVs; from DEQUANT_MIN_M the weight
    shifted to FP8 once, then the FP8 GEMM) gives what forcing it gives, and it and the fused
    kernel forced at the same size match the reference to fp32 summation order."""
    from qcompile.backends.triton import w4a8, w4a8_dequant

    assert m <= w4a8.GEMV_MAX_M if path == "gemv" else m >= w4a8_dequant.DEQUANT_MIN_M
    a, a_scale, packed, gexp, row_scale, c = make_inputs(m, 131 if m > 16 else 200,
                                                         48, group, bias=bias, seed=m)
    outs = {p: w4a8_linear(a, a_scale, packed, gexp, row_scale, group, c,
                           out_dtype=out_dtype, path=p) for p in (None, path, "fused")}
    assert outs[None].dtype == out_dtype and outs[None].shape == (m, 48)
    assert torch.equal(outs[None], outs[path])
    check(outs[path], a, a_scale, packed, gexp, row_scale, group, c, mma=path != "gemv")
    check(outs["fused"], a, a_scale, packed, gexp, row_scale, group, c)


@pytest.mark.parametrize(("m", "group", "k", "bias", "out_dtype"), [
    (1, 128, 1280, True, torch.bfloat16), (1, 64, 200, False, torch.float16),
    (1, 64, 1100, True, torch.float32), (1, 50, 1100, True, torch.bfloat16),
    (7, 32, 1100, True, torch.float16), (16, 64, 300, False, torch.bfloat16),
    (3, 32, 200, True, torch.bfloat16)])
def test_gemv_applies_the_row_scales_in_its_epilogue(monkeypatch, m, group, k, bias,
                                                     out_dtype):
    """Up to GEMV_MAX_M rows take one GEMV launch (two with a K split). It reads the FP8 codes
    and applies ``a_scale``, the bias and the rounding itself, and gives the bits of the
    composed computation: the same GEMV on the codes as fp32 (through the W4A16 entry point),
    then the scale, the bias and the cast in torch. The cases cover the batch-1 word kernel,
    its table kernel (K % 8 != 0), the general GEMV (group 50, M > 1), with and without a K
    split."""
    from qcompile.backends.triton import w4a8, w4a16
    from qcompile.backends.triton.runtime import element_table

    a, a_scale, packed, gexp, row_scale, c = make_inputs(m, k, 72, group, bias=bias, seed=k)
    y = w4a16.w4a16_linear(a.float(), packed, element_table("fp4_e2m1", a.device),
                           w4a8._pow2_scales(gexp), None, None, row_scale.reshape(-1, 1), group)
    want = y * a_scale.reshape(-1, 1)
    want = (want if c is None else want + c.float()).to(out_dtype)

    def composed(*args, **kwargs):
        raise AssertionError("the W4A8 GEMV went through the W4A16 entry point")

    monkeypatch.setattr(w4a16, "w4a16_linear", composed)
    got = w4a8_linear(a, a_scale, packed, gexp, row_scale, group, c, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, 72)
    assert torch.equal(got, want)
    check(got, a, a_scale, packed, gexp, row_scale, group, c, mma=False)


@pytest.mark.parametrize(("m", "group", "k", "path"), [
    (1, 128, 1280, None), (1, 64, 1100, None), (1, 50, 1100, None), (3, 32, 200, None),
    (1, 128, 1280, "fused")])
def test_residual_is_added_after_the_rounding(m, group, k, path):
    """``residual`` gives the bits of ``residual + w4a8_linear(...)``: in the batch-1 GEMV's
    epilogue (word kernel, table kernel, split K) and as a separate add on every other path;
    a residual of another shape or dtype is refused."""
    a, a_scale, packed, gexp, row_scale, c = make_inputs(m, k, 72, group, bias=True, seed=k)
    res = (torch.randn(m, 72, generator=torch.Generator().manual_seed(m)) * 8).to(
        torch.bfloat16).to(DEV)
    plain = w4a8_linear(a, a_scale, packed, gexp, row_scale, group, c, path=path)
    got = w4a8_linear(a, a_scale, packed, gexp, row_scale, group, c, path=path, residual=res)
    assert torch.equal(got, res + plain)
    with pytest.raises(KernelInputError, match="residual"):
        w4a8_linear(a, a_scale, packed, gexp, row_scale, group, c, residual=res.float())
    with pytest.raises(KernelInputError, match="residual"):
        w4a8_linear(a, a_scale, packed, gexp, row_scale, group, c, residual=res[:, :10])


def test_pow2_scales_are_cached_per_tensor():
    from qcompile.backends.triton import w4a8

    gexp = torch.tensor([[-8, 0, 6], [3, -1, 2]], dtype=torch.int8, device=DEV)
    first = w4a8._pow2_scales(gexp)
    assert torch.equal(first.cpu(), torch.ldexp(torch.ones(2, 3), gexp.cpu().float()))
    assert w4a8._pow2_scales(gexp) is first
    other = gexp.clone()
    assert w4a8._pow2_scales(other) is not first


def test_bad_path_raises():
    a, a_scale, packed, gexp, row_scale, _ = make_inputs(7, 130, 96, 32)
    with pytest.raises(KernelInputError, match="path must be 'fused', 'swap', 'dequant', 'gemv'"):
        w4a8_linear(a, a_scale, packed, gexp, row_scale, 32, path="cublas")


# --- clear errors --------------------------------------------------------------------------

def test_non_power_of_two_scales_raise():
    q = quantize(torch.randn(8, 256), parse_format("fp4_e2m1/g128"))  # fp32 scales
    with pytest.raises(W4A8ScaleError, match="not powers of two"):
        w4a8_split_scales(q.scale, None)
    assert issubclass(W4A8ScaleError, ValueError)


def test_gexp_out_of_range_raises():
    scale = torch.ones(4, 3)
    scale[2, 1] = 2.0**7  # 6 * 2^7 = 768 > 448
    with pytest.raises(W4A8ScaleError, match=r"outside \[-8, 6\].*gexp\[2, 1\] = 7"):
        w4a8_split_scales(scale, torch.ones(4, 1))
    w = torch.randn(4, 384)
    w[1, 128:256] *= 2.0**-12  # po2: a group 12 octaves below its row's largest
    q = quantize(w, parse_format("fp4_e2m1/g128/po2"))
    with pytest.raises(W4A8ScaleError, match="outside"):
        w4a8_split_scales(q.scale, q.outer)
    with pytest.raises(W4A8ScaleError, match="outside"):
        w4a8_weight_fp8(torch.zeros(4, 192, dtype=torch.uint8),
                        torch.full((4, 3), -9, dtype=torch.int8), 128, 384)


def test_malformed_scales_raise():
    with pytest.raises(W4A8ScaleError, match="fp32"):
        w4a8_split_scales(torch.ones(4, 3, dtype=torch.float64), None)
    with pytest.raises(W4A8ScaleError, match="row scale"):
        w4a8_split_scales(torch.ones(4, 3), torch.ones(5, 1))
    with pytest.raises(W4A8ScaleError, match="finite and positive"):
        w4a8_split_scales(torch.ones(4, 3), torch.zeros(4, 1))


_BAD = {
    "a_dtype": ("a", lambda t: t.float(), "a has dtype float32"),
    "packed_dtype": ("packed", lambda t: t.to(torch.int8), "packed has dtype int8"),
    "packed_width": ("packed", lambda t: t[:, :-1], "need 65 bytes"),
    "gexp_dtype": ("gexp", lambda t: t.int(), "gexp has dtype int32"),
    "gexp_groups": ("gexp", lambda t: t[:, :-1], "gexp has shape"),
    "row_scale_shape": ("row_scale", lambda t: t[:-1], "row_scale has shape"),
    "a_scale_dtype": ("a_scale", lambda t: t.half(), "a_scale has dtype float16"),
    "bias_dtype": ("bias", lambda t: t.to(torch.int32), "bias has dtype int32"),
    "group_zero": ("group_size", lambda t: 0, "group_size must be a positive int"),
    "group_bool": ("group_size", lambda t: True, "group_size must be a positive int"),
}


@pytest.mark.parametrize("name", list(_BAD))
def test_bad_inputs_raise(name):
    a, a_scale, packed, gexp, row_scale, c = make_inputs(7, 130, 96, 32, bias=True)
    kw = {"a": a, "a_scale": a_scale, "packed": packed, "gexp": gexp, "row_scale": row_scale,
          "group_size": 32, "bias": c}
    key, change, msg = _BAD[name]
    kw[key] = change(kw[key])
    with pytest.raises(KernelInputError, match=msg):
        w4a8_linear(**kw)


def test_bad_out_dtype_raises():
    a, a_scale, packed, gexp, row_scale, _ = make_inputs(7, 130, 96, 32)
    with pytest.raises(KernelInputError, match="out_dtype"):
        w4a8_linear(a, a_scale, packed, gexp, row_scale, 32, out_dtype=torch.int8)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    a, a_scale, packed, gexp, row_scale, _ = make_inputs(7, 130, 96, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelInputError, match="need CUDA"):
        w4a8_linear(a.cpu(), a_scale.cpu(), packed.cpu(), gexp.cpu(), row_scale.cpu(), 32)
