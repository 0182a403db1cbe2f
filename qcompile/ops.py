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
    ``qcompile::quantize_activation_static(x, scale, fmt)``
        Static quantize-dequantize with a fixed (calibrated) per-tensor ``scale`` (fp32, one
        element): ``round_to_elem(x / scale) * scale``, saturating at the element's range.
        ``fmt`` must be a symmetric per-tensor format (``int8/tensor``, ``fp8_e4m3/tensor``).
    ``qcompile::hadamard(x, size)``
        Online Hadamard rotation ``x @ H_size / sqrt(size)`` of each trailing block of ``size``
        of the last dim (reference: :func:`qcompile.hadamard.hadamard_transform`, a fast
        Walsh-Hadamard butterfly times a small Paley base, never a dense ``size^2`` matmul).
"""

from __future__ import annotations

import functools

import torch

from qcompile.errors import FormatError
from qcompile.formats import FormatSpec, QTensor, dequantize, fake_quantize, parse_format
from qcompile.formats import unpack_codes as _unpack
from qcompile.formats.elements import _round_f32
from qcompile.hadamard import hadamard_transform
from qcompile.oplib import define_op

__all__ = [
    "dequantize_weight", "hadamard", "quantize_activation", "quantize_activation_static",
    "spec_of",
]


@functools.lru_cache(maxsize=256)
def spec_of(fmt: str) -> FormatSpec:
    """Parsed format spec, cached (ops receive the format as text)."""
    return parse_format(fmt)


def _dequantize_weight_fake(packed, scale, scale_neg, zero, outer, fmt, k, dtype):
    return packed.new_empty((*packed.shape[:-1], k), dtype=dtype)


@define_op(
    "dequantize_weight(Tensor packed, Tensor scale, Tensor? scale_neg, Tensor? zero, "
    "Tensor? outer, str fmt, SymInt k, ScalarType dtype) -> Tensor",
    _dequantize_weight_fake)
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


def _quantize_activation_fake(x, fmt):
    return torch.empty_like(x)


@define_op("quantize_activation(Tensor x, str fmt) -> Tensor", _quantize_activation_fake)
def quantize_activation(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Reference: dynamic quantize then dequantize along the last dim, in ``x``'s dtype."""
    return fake_quantize(x, spec_of(fmt)).to(x.dtype)


def _static_spec(fmt: str) -> FormatSpec:
    spec = spec_of(fmt)
    if spec.granularity != "tensor" or spec.asym:
        raise FormatError(f"static activation format {fmt!r} must be symmetric per-tensor, "
                          "e.g. int8/tensor or fp8_e4m3/tensor")
    return spec


def _quantize_activation_static_fake(x, scale, fmt):
    _static_spec(fmt)
    return torch.empty_like(x)


@define_op(
    "quantize_activation_static(Tensor x, Tensor scale, str fmt) -> Tensor",
    _quantize_activation_static_fake)
def quantize_activation_static(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Reference: ``round(x / scale)`` onto the element grid (saturating), times ``scale``."""
    spec = _static_spec(fmt)
    s = scale.to(device=x.device, dtype=torch.float32).reshape(())
    return (_round_f32(x.float() / s, spec.elem) * s).to(x.dtype)


def _hadamard_fake(x, size):
    last = x.shape[-1]
    if isinstance(last, int) and last % size:
        raise ValueError(f"Hadamard size {size} does not divide the last dim {last}")
    return x.new_empty(x.shape)  # the reference returns a contiguous tensor


@define_op("hadamard(Tensor x, SymInt size) -> Tensor", _hadamard_fake)
def hadamard(x: torch.Tensor, size: int) -> torch.Tensor:
    """Reference: normalized Hadamard transform of each trailing block of ``size`` elements."""
    return hadamard_transform(x, size)
