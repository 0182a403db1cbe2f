"""qcompile custom ops (``torch.ops.qcompile.*``) with plain PyTorch reference implementations.

Every op here has a reference implementation (device-agnostic PyTorch, exact) and a fake
implementation (shapes only) so graphs holding them survive ``torch.export`` and
``torch.compile``. Backends may swap these for fused kernels; numerics are defined here.

Ops:
    ``qcompile::dequantize_weight(packed, scale, scale_neg, zero, outer, fmt, k, dtype)``
        Packed weight codes (layout: ``qcompile.formats`` packing) and per-group parameters
        to a dense ``[..., k]`` weight of ``dtype``.
    ``qcompile::quantize_activation(x, fmt)``
        Dynamic quantize-dequantize of an activation along its last dim (per token, per group
        or per tensor, as ``fmt`` says); returns a tensor like ``x``.
"""

from __future__ import annotations

import functools

import torch

from qcompile.formats import FormatSpec, QTensor, dequantize, fake_quantize, parse_format
from qcompile.formats import unpack_codes as _unpack

__all__ = ["dequantize_weight", "quantize_activation", "spec_of"]


@functools.lru_cache(maxsize=256)
def spec_of(fmt: str) -> FormatSpec:
    """Parsed format spec, cached (ops receive the format as text)."""
    return parse_format(fmt)


@torch.library.custom_op("qcompile::dequantize_weight", mutates_args=())
def dequantize_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    scale_neg: torch.Tensor | None,
    zero: torch.Tensor | None,
    outer: torch.Tensor | None,
    fmt: str,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference: unpack codes, apply group scales (and zero points / AFPQ negative scales)."""
    spec = spec_of(fmt)
    codes = _unpack(packed, spec.bits, k)
    q = QTensor(spec=spec, codes=codes, scale=scale, scale_neg=scale_neg, zero=zero,
                outer=outer, k=k)
    return dequantize(q, dtype=dtype)


@dequantize_weight.register_fake
def _(packed, scale, scale_neg, zero, outer, fmt, k, dtype):
    return packed.new_empty((*packed.shape[:-1], k), dtype=dtype)


@torch.library.custom_op("qcompile::quantize_activation", mutates_args=())
def quantize_activation(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Reference: dynamic quantize then dequantize along the last dim, in ``x``'s dtype."""
    return fake_quantize(x, spec_of(fmt)).to(x.dtype)


@quantize_activation.register_fake
def _(x, fmt):
    return torch.empty_like(x)
