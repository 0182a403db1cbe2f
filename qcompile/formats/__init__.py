"""Number formats: element types, format specs, quantize/dequantize, clip search, packing.

* :mod:`qcompile.formats.elements`: element grids and codes (INT, ExMy FP bit-exact with
  ml_dtypes, NF codebooks, E8M0), ``round_to_format`` / ``encode`` / ``decode``.
* :mod:`qcompile.formats.spec`: :class:`FormatSpec` and the text grammar (``int4/g128/asym``).
* :mod:`qcompile.formats.scales`: groups (ragged last group) and scale rules (fp32, bf16,
  fp16, po2, m2, e8m0, e4m3).
* :mod:`qcompile.formats.quantize`: :class:`QTensor`, ``quantize``, ``dequantize``,
  ``fake_quantize``.
* :mod:`qcompile.formats.clip`: ``search_clip``.
* :mod:`qcompile.formats.packing`: ``pack_codes`` / ``unpack_codes``; its docstring is the
  storage layout reference.
"""

from __future__ import annotations

from qcompile.formats.clip import DEFAULT_CLIP_GRID, search_clip
from qcompile.formats.elements import (
    ELEMENTS,
    ElementInfo,
    decode,
    element_info,
    encode,
    round_to_format,
)
from qcompile.formats.packing import pack_codes, packed_len, unpack_codes
from qcompile.formats.quantize import QTensor, dequantize, fake_quantize, quantize
from qcompile.formats.spec import GRANULARITIES, SCALES, FormatSpec, parse_format

__all__ = [
    "DEFAULT_CLIP_GRID",
    "ELEMENTS",
    "GRANULARITIES",
    "SCALES",
    "ElementInfo",
    "FormatSpec",
    "QTensor",
    "decode",
    "dequantize",
    "element_info",
    "encode",
    "fake_quantize",
    "pack_codes",
    "packed_len",
    "parse_format",
    "quantize",
    "round_to_format",
    "search_clip",
    "unpack_codes",
]
