"""FP8 W8A8 GEMM kernel (``qcompile.backends.triton.fp8_gemm``) against its reference.

Runs on CUDA when present, else on CPU tensors in the Triton interpreter (conftest sets
TRITON_INTERPRET=1): a subset of the shape grid there, the full grid on CUDA.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from qcompile.backends.triton import fp8_gemm  # noqa: E402
from qcompile.backends.triton.fp8_gemm import (  # noqa: E402
    fp8_scaled_mm,
    fp8_scaled_mm_ref,
    use_persistent,
)
from qcompile.backends.triton.runtime import KernelInputError, interpreting  # noqa: E402
from qcompile.formats import dequantize, parse_format, quantize  # noqa: E402
from qcompile.testing import assert_within_ulp, fp8_mma_slack, fp8_rows  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
FP8 = torch.float8_e4m3fn



def fp8_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 weight through qcompile's formats: codes are E4M3 bit patterns."""
    q = quantize(torch.randn(n, k, generator=gen), parse_format("fp8_e4m3/channel"))
    b = q.codes.view(FP8)
    assert torch.equal(b.float() * q.scale, dequantize(q))  # same bits as torch's float8
    return b.to(DEV), q.scale.reshape(n).to(DEV)


def make_inputs(m: int, k: int, n: int, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a, a_scale = fp8_rows(torch.randn(m, k, generator=gen) * 3)
    b, b_scale = fp8_weight(n, k, gen)
    c = torch.randn(n, generator=gen).to(DEV) if bias else None
    return a.to(DEV), a_scale.to(DEV), b, b_scale, c



def _cases() -> list[tuple]:
    """CUDA: the full grid. Interpreter: every (M, K, N) once, cycling dtype, variant, bias."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    shapes = itertools.product([1, 7, 33, 4097] if CUDA else [1, 7, 33], [576, 1000, 130, 256],
                               [96, 200])
    if CUDA:
        return [(m, k, n, dt, p, (m + k + n) % 2 == 0)
                for (m, k, n), dt, p in itertools.product(shapes, [f32, bf16], [False, True])]
    dtypes, variants = [f32, bf16, f32, bf16, f16], [False, True, None]
    return [(m, k, n, dtypes[i % 5], variants[i % 3], i % 2 == 0)
            for i, (m, k, n) in enumerate(shapes)]


def check(out, a, a_scale, b, b_scale, c=None, fast=True):
    """``out`` against the fp32 reference computed on the CPU, with the FP8 MMA's accumulation
    bound on CUDA (fast or promoted accumulation)."""
    ref = fp8_scaled_mm_ref(*(None if t is None else t.cpu() for t in (a, a_scale, b, b_scale, c)),
                            out_dtype=torch.float32)
    assert_within_ulp(out, ref, fp8_mma_slack(a, a_scale, b, b_scale, fast))


@pytest.mark.parametrize("m,k,n,out_dtype,persistent,bias", _cases())
def test_kernel_matches_reference(m, k, n, out_dtype, persistent, bias):
    a, a_scale, b, b_scale, c = make_inputs(m, k, n, bias)
    out = fp8_scaled_mm(a, a_scale, b, b_scale, c, out_dtype=out_dtype, persistent=persistent)
    assert out.dtype == out_dtype and out.device == a.device
    check(out, a, a_scale, b, b_scale, c)


@pytest.mark.parametrize("m,k", [(7, 130), (33, 1000)])
def test_promoted_accumulation(m, k):
    """fast_accum=False adds every MMA instruction's products into fp32: the same products,
    and under the interpreter (fp32 throughout) the same bits as the default."""
    a, a_scale, b, b_scale, c = make_inputs(m, k, 96, True, seed=5)
    assert fp8_gemm.PROMOTE_K == 32  # the bound below: one interval per instruction
    exact = fp8_scaled_mm(a, a_scale, b, b_scale, c, torch.float32, fast_accum=False)
    if interpreting():
        assert torch.equal(exact, fp8_scaled_mm(a, a_scale, b, b_scale, c, torch.float32))
    check(exact, a, a_scale, b, b_scale, c, fast=False)


def test_persistent_and_tiled_agree():
    """Same tile routine and (under the interpreter) the same config: identical bits."""
    a, a_scale, b, b_scale, c = make_inputs(33, 256, 200, True, seed=1)
    tiled = fp8_scaled_mm(a, a_scale, b, b_scale, c, torch.float32, persistent=False)
    pers = fp8_scaled_mm(a, a_scale, b, b_scale, c, torch.float32, persistent=True)
    if interpreting():
        assert torch.equal(tiled, pers)
    else:
        check(tiled, a, a_scale, b, b_scale, c)
        check(pers, a, a_scale, b, b_scale, c)


def test_reference_is_dequantized_linear():
    a, a_scale, b, b_scale, c = make_inputs(7, 130, 96, True, seed=2)
    ref = fp8_scaled_mm_ref(a, a_scale, b, b_scale, c, out_dtype=torch.float32)
    deq = torch.nn.functional.linear(a.float() * a_scale, b.float() * b_scale[:, None], c)
    torch.testing.assert_close(ref, deq, rtol=1e-5, atol=1e-5 * float(deq.abs().max()))


def test_strided_inputs_and_column_scales():
    """Non-contiguous ``a``, ``[M]`` / ``[N, 1]`` scale shapes and a bf16 bias."""
    a, a_scale, b, b_scale, c = make_inputs(7, 256, 96, True, seed=3)
    a_t = a.float().T.contiguous().to(FP8).T  # [M, K] view with stride (1, M)
    c = c.to(torch.bfloat16)
    out = fp8_scaled_mm(a_t, a_scale.reshape(-1), b, b_scale[:, None], c, torch.float32)
    check(out, a, a_scale, b, b_scale, c)


def test_empty_m_and_default_variant():
    a, a_scale, b, b_scale, _ = make_inputs(7, 130, 96, False, seed=4)
    assert fp8_scaled_mm(a[:0], a_scale[:0], b, b_scale).shape == (0, 96)
    out = fp8_scaled_mm(a, a_scale, b, b_scale, out_dtype=torch.float32)  # persistent=None
    check(out, a, a_scale, b, b_scale)
    assert use_persistent(8192, 8192, 132) and not use_persistent(1, 4096, 132)


def _bad(name: str):
    a, a_scale, b, b_scale, c = make_inputs(7, 130, 96, True, seed=5)
    kw = {"a": a, "a_scale": a_scale, "b": b, "b_scale": b_scale, "bias": c}
    bad = {
        "a_dtype": ("a", a.float(), "a has dtype float32"),
        "b_dtype": ("b", b.to(torch.float8_e5m2), "b has dtype float8_e5m2"),
        "b_k": ("b", b[:, :128], "dim 1 must equal a's K = 130"),
        "a_ndim": ("a", a[None], "a must have 2 dims"),
        "a_scale_shape": ("a_scale", a_scale[:3], "a_scale has shape"),
        "b_scale_dtype": ("b_scale", b_scale.half(), "b_scale has dtype float16"),
        "bias_shape": ("bias", c[:5], "bias has shape"),
        "not_tensor": ("b_scale", 1.0, "b_scale must be a tensor"),
    }[name]
    kw[bad[0]] = bad[1]
    return kw, bad[2]


@pytest.mark.parametrize("name", ["a_dtype", "b_dtype", "b_k", "a_ndim", "a_scale_shape",
                                  "b_scale_dtype", "bias_shape", "not_tensor"])
def test_bad_inputs_raise(name):
    kw, msg = _bad(name)
    with pytest.raises(KernelInputError, match=msg):
        fp8_scaled_mm(**kw)


def test_bad_out_dtype_raises():
    a, a_scale, b, b_scale, _ = make_inputs(7, 130, 96, False)
    with pytest.raises(KernelInputError, match="out_dtype"):
        fp8_scaled_mm(a, a_scale, b, b_scale, out_dtype=torch.int32)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    a, a_scale, b, b_scale, _ = make_inputs(7, 130, 96, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelInputError, match="need CUDA"):
        fp8_scaled_mm(a.cpu(), a_scale.cpu(), b.cpu(), b_scale.cpu())


@pytest.mark.skipif(not CUDA, reason="needs two devices")
def test_mixed_devices_raise():
    a, a_scale, b, b_scale, _ = make_inputs(7, 130, 96, False)
    with pytest.raises(KernelInputError, match="is on cpu"):
        fp8_scaled_mm(a, a_scale, b.cpu(), b_scale)
