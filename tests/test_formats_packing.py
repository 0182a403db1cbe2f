"""Packed storage: little-endian bit stream per row, checked against a big-integer reference."""

from __future__ import annotations

import pytest
import torch

from qcompile.errors import FormatError
from qcompile.formats import (
    dequantize,
    pack_codes,
    packed_len,
    parse_format,
    quantize,
    unpack_codes,
)


def reference_pack_row(codes: list[int], bits: int) -> list[int]:
    """Code i occupies stream bits [i*bits, (i+1)*bits), LSB first; bytes little-endian."""
    stream = 0
    for i, code in enumerate(codes):
        stream |= code << (i * bits)
    return list(stream.to_bytes(-(-len(codes) * bits // 8), "little"))


def random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 3, 7, 13, 577, 1001])
def test_pack_matches_reference_and_round_trips(bits: int, k: int) -> None:
    codes = random_codes((3, k), bits, seed=bits * 1000 + k)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_len(k, bits))
    for row, prow in zip(codes.tolist(), packed.tolist(), strict=True):
        assert prow == reference_pack_row(row, bits)
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_leading_dims_pack_rows_independently() -> None:
    codes = random_codes((2, 3, 5), 3, seed=1)
    packed = pack_codes(codes, 3)
    assert packed.shape == (2, 3, 2)  # ceil(15 / 8): rows never share a byte
    assert torch.equal(packed.reshape(6, 2), pack_codes(codes.reshape(6, 5), 3))
    assert torch.equal(unpack_codes(packed, 3, 5), codes)


def test_documented_layout_examples() -> None:
    # 4 bits: two codes per byte, low nibble first; odd K leaves the last high nibble zero.
    assert pack_codes(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x03]]
    # 3 bits: code 2 straddles bytes 0 and 1; 8 codes fill exactly 3 bytes.
    codes = torch.tensor([[0, 0, 0b111, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    assert pack_codes(codes, 3).tolist() == [[0b11000000, 0b00000001, 0]]
    # 2 bits: element 4i in bits 0-1.
    assert pack_codes(torch.tensor([[3, 0, 1, 2, 1]], dtype=torch.uint8), 2).tolist() == [
        [0b10010011, 0b01]
    ]
    # 8 bits: identity.
    assert pack_codes(torch.tensor([[200, 7]], dtype=torch.uint8), 8).tolist() == [[200, 7]]


@pytest.mark.parametrize(
    "text",
    [
        "int4/g128/asym",
        "int3/g128/asym",
        "fp4_e2m1/g128/asym",
        "nf3/g64",
        "fp8_e4m3/token",
        "int2/g64",
        "mxfp4",
    ],
)
def test_quantized_tensor_survives_packing(text: str) -> None:
    spec = parse_format(text)
    x = torch.randn(5, 577, generator=torch.Generator().manual_seed(2))
    q = quantize(x, spec)
    packed = pack_codes(q.codes, spec.bits)
    assert packed.shape[-1] == packed_len(577, spec.bits)
    q.codes = unpack_codes(packed, spec.bits, 577)
    assert torch.equal(dequantize(q), dequantize(quantize(x, spec)))


@pytest.mark.parametrize(
    "call",
    [
        lambda: pack_codes(torch.tensor([[16]], dtype=torch.uint8), 4),
        lambda: pack_codes(torch.tensor([[1]], dtype=torch.int32), 4),
        lambda: pack_codes(torch.tensor(1, dtype=torch.uint8), 4),
        lambda: pack_codes(torch.tensor([[1]], dtype=torch.uint8), 0),
        lambda: pack_codes(torch.tensor([[1]], dtype=torch.uint8), 9),
        lambda: unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 7),
        lambda: unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 4, 6),
        lambda: unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, -1),
    ],
    ids=["code-too-wide", "dtype", "0d", "bits0", "bits9", "length", "unpack-dtype", "negative-k"],
)
def test_packing_errors(call) -> None:
    with pytest.raises(FormatError):
        call()
