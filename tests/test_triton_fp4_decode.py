"""The batch-1 GEMVs' FP4 E2M1 pair decode (``fp4_words._fp16_pair``), both ways it can run:
every code of every word against ``ml_dtypes``' float4_e2m1fn, bit for bit, as fp16 in units
of 2^-14 (signed, and the magnitudes AFPQ's second sum takes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qcompile.backends.triton.fp4_words import _fp16_pair  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@triton.jit
def _decode_kernel(w_ptr, out_ptr, n, MAG_ONLY: tl.constexpr, RESTAGE: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    w = tl.load(w_ptr + offs, mask=ok, other=0)
    for nib in tl.static_range(4):
        lo, hi = _fp16_pair(w, nib, MAG_ONLY, RESTAGE)
        tl.store(out_ptr + offs * 8 + nib, lo, mask=ok)
        tl.store(out_ptr + offs * 8 + nib + 4, hi, mask=ok)


def _words() -> torch.Tensor:
    """Random words, every byte value in every byte position, and the extremes."""
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(-2**31, 2**31 - 1, (3000,), dtype=torch.int32, generator=gen)
    byte = torch.arange(256, dtype=torch.int32)
    spread = [byte << (8 * i) for i in range(4)]
    ends = torch.tensor([0, -1, -2**31, 2**31 - 1, 0x77777777, -0x77777778], dtype=torch.int32)
    return torch.cat([rand, *spread, ends])


@pytest.mark.parametrize("restage", [True, False])
@pytest.mark.parametrize("mag_only", [False, True])
def test_pair_decode_is_exact_fp4(restage, mag_only):
    words = _words()
    out = torch.empty(words.numel() * 8, dtype=torch.float16, device=DEV)
    _decode_kernel[(triton.cdiv(words.numel(), 512),)](
        words.to(DEV), out, words.numel(), MAG_ONLY=mag_only, RESTAGE=restage, BLOCK=512)
    w = words.numpy().view(np.uint32)
    codes = ((w[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.uint8)
    values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    if mag_only:
        values = np.abs(values)
    want = (values * np.float32(2.0 ** -14)).astype(np.float16).reshape(-1)
    got = out.cpu().numpy()
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (
        f"{int((got.view(np.uint16) != want.view(np.uint16)).sum())} codes differ")
