"""Element types: the value grids a single quantized number can take, and their codes.

Every element has ``bits``-wide unsigned codes (stored one per ``uint8``) and a table that maps
each code to its fp32 value.

* ``int2`` .. ``int8``: signed integers ``-2^(b-1) .. 2^(b-1)-1`` in offset binary,
  ``code = q + 2^(b-1)``. (Asymmetric INT tensors store the unsigned level ``0 .. 2^b-1``
  directly; see :mod:`qcompile.formats.quantize`.)
* ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e2m3``, ``fp6_e3m2``, ``fp4_e2m1``: the OCP / ml_dtypes
  types ``float8_e4m3fn``, ``float8_e5m2``, ``float6_e2m3fn``, ``float6_e3m2fn``,
  ``float4_e2m1fn``, bit for bit. Codes are sign-magnitude, the sign in the top bit,
  then exponent, then mantissa; exponent field 0 holds the subnormals.
* ``fp3_e2m0`` and ``fp3_e1m1`` (no ml_dtypes type) follow the same layout with bias 1 and no
  inf/NaN codes: e2m0 magnitudes are {0, 1, 2, 4} (exponent field 0 is zero), e1m1 magnitudes
  are {0, 0.5, 1, 1.5} (field 0 holds the subnormal 0.5).
* ``nf4``, ``nf3``: normal-float codebooks (QLoRA, arXiv 2305.14314), 2^b sorted values in
  [-1, 1] with an exact zero; the code is the index into the sorted codebook. Construction,
  for b bits and delta = (1 - 1/(2(2^b - 1)) + 1 - 1/(2 * 2^b)) / 2: the 2^(b-1) positive
  values are Phi^-1 of the first 2^(b-1) of 2^(b-1)+1 points evenly spaced from delta down to
  0.5; the 2^(b-1)-1 negative values are -Phi^-1 of the first 2^(b-1)-1 of 2^(b-1) such points;
  add 0 and divide by Phi^-1(delta) so both ends are exactly +-1.
* ``fp8_e8m0`` (scale-only, ml_dtypes ``float8_e8m0fnu``): unsigned powers of two
  ``2^(code - 127)``, code 255 is NaN.

Rounding is round-to-nearest with ties to the even code (IEEE round-half-even for the ExMy
types; for e2m0, whose codes carry no mantissa, "even" is the even exponent field), except
``fp8_e8m0``, where ties round up as ml_dtypes does. Values beyond the largest finite value
saturate to +-max (infinities too); ``fp8_e8m0`` saturates into [2^-127, 2^127], so zero and
negative inputs give 2^-127. The sign of zero is kept: ``-0.0`` and negative values
that round to zero get the sign bit set, exactly as ml_dtypes does; both decode to zero.
NaN cannot be encoded (:class:`~qcompile.errors.WeightError`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from qcompile.errors import FormatError, WeightError

__all__ = [
    "ELEMENTS",
    "ElementInfo",
    "decode",
    "element_info",
    "encode",
    "round_to_format",
]

# name -> (exponent bits, mantissa bits, bias, special-code rule, ml_dtypes type name)
_FP_TYPES: dict[str, tuple[int, int, int, str, str | None]] = {
    "fp8_e4m3": (4, 3, 7, "fn", "float8_e4m3fn"),
    "fp8_e5m2": (5, 2, 15, "ieee", "float8_e5m2"),
    "fp6_e2m3": (2, 3, 1, "none", "float6_e2m3fn"),
    "fp6_e3m2": (3, 2, 3, "none", "float6_e3m2fn"),
    "fp4_e2m1": (2, 1, 1, "none", "float4_e2m1fn"),
    "fp3_e2m0": (2, 0, 1, "none", None),
    "fp3_e1m1": (1, 1, 1, "none", None),
}
_INT_TYPES = {f"int{b}": b for b in range(2, 9)}
_NF_TYPES = {"nf4": 4, "nf3": 3}
_SCALE_TYPES = {"fp8_e8m0": "float8_e8m0fnu"}

#: Every element name :func:`element_info` knows, quantizable ones first.
ELEMENTS: tuple[str, ...] = (*_INT_TYPES, *_FP_TYPES, *_NF_TYPES, *_SCALE_TYPES)


@dataclass(frozen=True)
class ElementInfo:
    """Static description of one element type.

    Attributes:
        name: Element name, e.g. ``"fp4_e2m1"``.
        kind: ``"int"``, ``"fp"``, ``"nf"`` or ``"e8m0"``.
        bits: Code width in bits.
        max: Largest finite value.
        min: Most negative finite value (smallest positive value for ``fp8_e8m0``).
        values: Value of every code, indexed by code (NaN/inf where the type has them).
        ebits: Exponent bits (FP kinds only, else 0).
        mbits: Mantissa bits (FP kinds only, else 0).
        bias: Exponent bias (FP kinds only, else 0).
        ml_dtype: Name of the matching ``ml_dtypes`` type, or None.
    """

    name: str
    kind: str
    bits: int
    max: float
    min: float
    values: tuple[float, ...]
    ebits: int = 0
    mbits: int = 0
    bias: int = 0
    ml_dtype: str | None = None

    @property
    def is_float(self) -> bool:
        """True for the ExMy floating-point kinds."""
        return self.kind == "fp"

    @property
    def emax(self) -> int:
        """floor(log2(max)): the exponent of the largest binade (used by MX scaling)."""
        return math.floor(math.log2(self.max))

    def table(self) -> torch.Tensor:
        """Return a fresh fp32 tensor of ``values`` (code -> value)."""
        return torch.tensor(self.values, dtype=torch.float32)

    def grid(self) -> torch.Tensor:
        """Return the sorted distinct finite values as fp32 (``-0.0`` folded into ``0.0``)."""
        finite = sorted({v for v in self.values if math.isfinite(v)})
        return torch.tensor(finite, dtype=torch.float32)


def _fp_value(code: int, ebits: int, mbits: int, bias: int, special: str) -> float:
    bits = 1 + ebits + mbits
    sign = -1.0 if code >> (bits - 1) else 1.0
    mag = code & ((1 << (bits - 1)) - 1)
    exp, mant = mag >> mbits, mag & ((1 << mbits) - 1)
    top = (1 << ebits) - 1
    if special == "fn" and mag == (1 << (bits - 1)) - 1:
        return math.nan
    if special == "ieee" and exp == top:
        return sign * math.inf if mant == 0 else math.nan
    if exp == 0:
        return sign * mant * 2.0 ** (1 - bias - mbits)
    return sign * (1.0 + mant / (1 << mbits)) * 2.0 ** (exp - bias)


def _normal_float_codebook(bits: int) -> list[float]:
    # Quantiles in float64; torch.special.ndtri is the inverse normal CDF.
    half = 1 << (bits - 1)
    delta = 0.5 * ((1 - 1 / (2 * ((1 << bits) - 1))) + (1 - 1 / (2 * (1 << bits))))
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, half, dtype=torch.float64)[:-1])
    top = float(torch.special.ndtri(torch.tensor(delta, dtype=torch.float64)))
    # pos[0] / top and neg[0] / top are exactly +-1 (x / x is exact in IEEE).
    vals = sorted([*(pos / top).tolist(), 0.0, *(neg / top).tolist()])
    return [float(torch.tensor(v, dtype=torch.float32)) for v in vals]


def element_info(elem: str) -> ElementInfo:
    """Describe an element type.

    Args:
        elem: Element name, one of :data:`ELEMENTS`.

    Returns:
        The :class:`ElementInfo` for ``elem``.

    Raises:
        FormatError: ``elem`` is not a known element name.
    """
    if not isinstance(elem, str) or elem not in ELEMENTS:
        raise FormatError(f"unknown element type {elem!r}; accepted: {', '.join(ELEMENTS)}")
    return _element_info(elem)


@functools.cache
def _element_info(elem: str) -> ElementInfo:
    if elem in _INT_TYPES:
        b = _INT_TYPES[elem]
        off = 1 << (b - 1)
        vals = tuple(float(c - off) for c in range(1 << b))
        return ElementInfo(elem, "int", b, float(off - 1), float(-off), vals)
    if elem in _FP_TYPES:
        ebits, mbits, bias, special, mlname = _FP_TYPES[elem]
        bits = 1 + ebits + mbits
        vals = tuple(_fp_value(c, ebits, mbits, bias, special) for c in range(1 << bits))
        fmax = max(v for v in vals if math.isfinite(v))
        return ElementInfo(elem, "fp", bits, fmax, -fmax, vals, ebits, mbits, bias, mlname)
    if elem in _NF_TYPES:
        vals = tuple(_normal_float_codebook(_NF_TYPES[elem]))
        return ElementInfo(elem, "nf", _NF_TYPES[elem], 1.0, -1.0, vals)
    vals = tuple([2.0 ** (c - 127) for c in range(255)] + [math.nan])
    return ElementInfo(elem, "e8m0", 8, 2.0**127, 2.0**-127, vals, 8, 0, 127, _SCALE_TYPES[elem])


@dataclass(frozen=True)
class _Lookup:
    """Sorted grid points, decision midpoints and the code of each point."""

    points: torch.Tensor  # ascending values (magnitudes for sign-magnitude kinds)
    mids: torch.Tensor  # midpoints between consecutive points
    codes: torch.Tensor  # int64 code of each point
    ties_up: bool  # ties go to the larger point, else to the even code
    signed: bool  # sign bit handled separately (FP kinds)
    lo: float  # saturation bounds of the searched values
    hi: float


@functools.cache
def _lookup(elem: str, device: torch.device) -> _Lookup:
    info = element_info(elem)
    table = info.table().to(device)
    if info.kind == "fp":
        # Magnitude codes 0..n-1 are ascending and finite up to max.
        n = 1 + max(c for c in range(1 << (info.bits - 1)) if info.values[c] == info.max)
        codes = torch.arange(n, device=device)
    elif info.kind == "nf":
        codes = torch.arange(1 << info.bits, device=device)
    else:  # e8m0: all but the NaN code
        codes = torch.arange(255, device=device)
    points = table[codes]
    mids = (points[1:] + points[:-1]) * 0.5  # exact for binary-float grids
    lo, hi = float(points[0]), float(points[-1])
    return _Lookup(points, mids, codes, info.kind == "e8m0", info.kind == "fp", lo, hi)


def _check_finite_input(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise FormatError("element helpers take a floating-point tensor")
    xf = x.to(torch.float32)
    if torch.isnan(xf).any():
        raise WeightError("cannot encode NaN into a quantized element")
    return xf


def _pow2_f32(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for int32 ``e`` in [-126, 127], built from the exponent bits (exact, fast)."""
    return ((e + 127) << 23).view(torch.float32)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) for normal fp32 ``a >= 0`` (zero and fp32 subnormals give <= -127)."""
    return (a.view(torch.int32) >> 23) - 127


def _round_fp(x: torch.Tensor, info: ElementInfo) -> torch.Tensor:
    # ExMy with >= 1 mantissa bit: RNE of the significand is RNE of the code (mantissa LSB).
    a = x.abs().clamp_(max=info.max)
    e = _floor_log2(a).clamp_(min=1 - info.bias) - info.mbits  # exponent of one ulp
    return torch.copysign(torch.round(a.mul_(_pow2_f32(-e))).mul_(_pow2_f32(e)), x)


def _table_index(x: torch.Tensor, lut: _Lookup) -> torch.Tensor:
    a = x.abs() if lut.signed else x
    a = a.clamp(lut.lo, lut.hi)
    idx = torch.searchsorted(lut.mids, a, right=lut.ties_up)
    if not lut.ties_up:
        # searchsorted(left) sends an exact tie to the lower point; move odd ones up to even.
        at_mid = a == lut.mids[idx.clamp(max=lut.mids.numel() - 1)]
        idx = idx + (at_mid & (idx % 2 == 1)).to(idx.dtype)
    return idx


def _round_f32(x: torch.Tensor, elem: str) -> torch.Tensor:
    """fp32 ``x`` (no NaN) rounded onto ``elem``'s grid, as fp32."""
    info = element_info(elem)
    if info.kind == "int":
        return torch.round(x).clamp_(info.min, info.max)
    if info.kind == "fp" and info.mbits > 0:
        return _round_fp(x, info)
    lut = _lookup(elem, x.device)
    v = lut.points[_table_index(x, lut)]
    return torch.copysign(v, x) if lut.signed else v


def _encode_f32(x: torch.Tensor, elem: str) -> torch.Tensor:
    """int64 codes of fp32 ``x`` (no NaN) rounded onto ``elem``'s grid."""
    info = element_info(elem)
    if info.kind == "int":
        q = torch.round(x).clamp_(info.min, info.max)
        return (q - info.min).to(torch.int64)
    if info.kind != "fp":
        lut = _lookup(elem, x.device)
        return lut.codes[_table_index(x, lut)]
    # Magnitude code of a grid value v: (e - emin) * 2^m + v / 2^(e - m), e = max(floor(log2 v), emin).
    v = _round_f32(x, elem)
    emin = 1 - info.bias
    e = _floor_log2(v.abs()).clamp_(min=emin)
    sig = (v.abs() * _pow2_f32(info.mbits - e)).to(torch.int64)
    mag = ((e - emin).to(torch.int64) << info.mbits) + sig
    return mag | (torch.signbit(v).to(torch.int64) << (info.bits - 1))


def _decode_f32(codes: torch.Tensor, elem: str) -> torch.Tensor:
    return _lookup_table(elem, codes.device)[codes.to(torch.int64)]


@functools.cache
def _lookup_table(elem: str, device: torch.device) -> torch.Tensor:
    return element_info(elem).table().to(device)


def round_to_format(x: torch.Tensor, elem: str) -> torch.Tensor:
    """Round values onto an element's grid.

    Round-to-nearest, ties to even code (ties up for ``fp8_e8m0``), saturating to the
    largest finite value; the sign of zero is kept.

    Args:
        x: Floating-point tensor (computed in fp32).
        elem: Element name.

    Returns:
        fp32 tensor of grid values, same shape as ``x``.

    Raises:
        FormatError: Unknown element, or ``x`` not floating point.
        WeightError: ``x`` holds NaN.
    """
    element_info(elem)
    return _round_f32(_check_finite_input(x), elem)


def encode(values: torch.Tensor, elem: str) -> torch.Tensor:
    """Encode values as element codes (rounding them first, as :func:`round_to_format`).

    Args:
        values: Floating-point tensor.
        elem: Element name.

    Returns:
        ``uint8`` codes, same shape as ``values``.

    Raises:
        FormatError: Unknown element, or ``values`` not floating point.
        WeightError: ``values`` holds NaN.
    """
    element_info(elem)
    return _encode_f32(_check_finite_input(values), elem).to(torch.uint8)


def decode(codes: torch.Tensor, elem: str) -> torch.Tensor:
    """Decode element codes to fp32 values.

    Args:
        codes: Integer tensor of codes in ``[0, 2^bits)``.
        elem: Element name.

    Returns:
        fp32 values, same shape as ``codes``.

    Raises:
        FormatError: Unknown element, non-integer codes, or a code out of range.
    """
    info = element_info(elem)
    if not torch.is_tensor(codes) or codes.is_floating_point() or codes.is_complex():
        raise FormatError("decode takes an integer tensor of codes")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << info.bits):
        raise FormatError(f"{elem} codes must lie in [0, {1 << info.bits}); got a code outside")
    return _decode_f32(c, elem)
