"""Packed code storage: the one documented place for qcompile's quantized storage layout.

Layout. Codes are ``b``-bit unsigned integers (1 <= b <= 8), one per element, quantized along
the last dim (rows of length K). Each row is packed independently as a little-endian bit
stream: code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first, and
stream bit ``j`` is bit ``j % 8`` (LSB = bit 0) of byte ``j // 8``. The row is zero-padded to a
whole number of bytes, so packed shape is ``[..., ceil(K*b/8)]`` and rows never share a byte.

* b = 8: one code per byte (identity).
* b = 4: two codes per byte, element ``2i`` in the low nibble, ``2i+1`` in the high nibble; an
  odd K leaves the last high nibble zero.
* b = 2: four codes per byte, element ``4i`` in bits 0-1.
* b = 3: eight codes per three bytes; code 2 straddles bytes 0 and 1
  (its bits 0-1 are bits 6-7 of byte 0, its bit 2 is bit 0 of byte 1).

What a code means (offset-binary INT, unsigned INT levels with a zero point, sign-magnitude FP,
NF codebook index) is defined in :mod:`qcompile.formats.elements` and
:mod:`qcompile.formats.quantize`; scales are stored separately as fp32 tensors ``[..., G]``.
"""

from __future__ import annotations

import torch

from qcompile.errors import FormatError

__all__ = ["pack_codes", "packed_len", "unpack_codes"]


def packed_len(k: int, bits: int) -> int:
    """Bytes per packed row of ``k`` codes of ``bits`` bits: ``ceil(k * bits / 8)``."""
    return -(-k * bits // 8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise FormatError(f"code width must be an integer from 1 to 8 bits, got {bits!r}")


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes row by row (layout in the module docstring).

    Args:
        codes: ``uint8`` tensor ``[..., K]``, every code below ``2**bits``.
        bits: Code width, 1 to 8.

    Returns:
        ``uint8`` tensor ``[..., ceil(K*bits/8)]``.

    Raises:
        FormatError: Bad ``bits``, non-``uint8`` codes, no last dim, or a code too wide.
    """
    _check_bits(bits)
    if not torch.is_tensor(codes) or codes.dtype != torch.uint8 or codes.dim() == 0:
        raise FormatError("pack_codes takes a uint8 tensor with at least one dim")
    if codes.numel() and int(codes.max()) >> bits:
        raise FormatError(f"a code does not fit in {bits} bits (max code {int(codes.max())})")
    k = codes.shape[-1]
    lead = codes.shape[:-1]
    if bits == 8:
        return codes.clone()
    if bits == 4:
        pairs = torch.nn.functional.pad(codes, (0, k % 2)).reshape(*lead, -1, 2)
        return pairs[..., 0] | (pairs[..., 1] << 4)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*lead, k * bits)
    stream = torch.nn.functional.pad(stream, (0, packed_len(k, bits) * 8 - k * bits))
    return (stream.reshape(*lead, -1, 8) * _bit_weights(codes.device)).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Invert :func:`pack_codes` exactly.

    Args:
        packed: ``uint8`` tensor ``[..., ceil(k*bits/8)]``.
        bits: Code width, 1 to 8.
        k: Codes per row.

    Returns:
        ``uint8`` codes ``[..., k]``.

    Raises:
        FormatError: Bad ``bits``/``k``, non-``uint8`` input, or a last dim that does not match.
    """
    _check_bits(bits)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FormatError(f"row length must be a non-negative integer, got {k!r}")
    if not torch.is_tensor(packed) or packed.dtype != torch.uint8 or packed.dim() == 0:
        raise FormatError("unpack_codes takes a uint8 tensor with at least one dim")
    if packed.shape[-1] != packed_len(k, bits):
        raise FormatError(
            f"packed rows hold {packed.shape[-1]} bytes; {k} codes of {bits} bits need {packed_len(k, bits)}"
        )
    lead = packed.shape[:-1]
    if bits == 8:
        return packed.clone()
    if bits == 4:
        nib = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*lead, -1)
        return nib[..., :k].contiguous()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*lead, -1)[..., : k * bits]
    weights = _bit_weights(packed.device)[:bits]
    return (stream.reshape(*lead, k, bits) * weights).sum(-1, dtype=torch.uint8)
