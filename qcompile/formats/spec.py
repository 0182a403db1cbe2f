"""Format specs: what a quantized tensor's elements, groups and scales are, and their text form.

Grammar (case-insensitive, surrounding whitespace ignored)::

    <elem>[/<granularity>][/<modifier>...]

* elem: ``int2`` .. ``int8``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e2m3``, ``fp6_e3m2``,
  ``fp4_e2m1``, ``fp3_e2m0``, ``fp3_e1m1``, ``nf4``, ``nf3``, or an alias:
  ``mxfp4`` = ``fp4_e2m1/g32/e8m0`` (also ``mxfp6_e2m3``, ``mxfp6_e3m2``, ``mxfp8_e4m3``,
  ``mxfp8_e5m2``) and ``nvfp4`` = ``fp4_e2m1/g16/e4m3``.
* granularity: ``tensor``, ``channel`` (default), ``token``, or ``g<N>`` (groups of N
  consecutive elements along the last dim; N need not divide the row).
* modifiers, in any order: ``sym`` (default) or ``asym``; at most one scale modifier,
  ``po2`` | ``m2`` | ``bf16`` | ``fp16`` | ``e8m0`` | ``e4m3`` (default: fp32 scales);
  ``clip<ratio>`` with ratio in (0, 1] (default 1); ``mse`` (e8m0/e4m3 block scales only:
  each group's scale is whichever of the two scale-grid neighbours of its exact scale gives
  the smaller squared error on the group, instead of the rounded one); ``mse<m>`` with
  ``0 < m <`` the element's max (e.g. ``nvfp4/mse4``): the same, also trying the two grid
  neighbours of the scale that puts the group's absmax on ``m`` instead of on the element's
  max (for FP4, max 4 instead of 6 keeps a finer grid for a group's small values: the
  adaptive block scaling of "Four Over Six", 2025).

``str(spec)`` is canonical: ``elem/granularity`` then ``asym``, the scale modifier, ``clip``
and ``mse`` in that order, omitting defaults; specs matching an alias print as the alias.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from qcompile.errors import FormatError
from qcompile.formats.elements import ELEMENTS, ElementInfo, element_info

__all__ = ["GRANULARITIES", "SCALES", "FormatSpec", "parse_format"]

GRANULARITIES = ("tensor", "channel", "token", "group")
SCALES = ("fp32", "bf16", "fp16", "po2", "m2", "e8m0", "e4m3")
_QUANT_ELEMENTS = tuple(e for e in ELEMENTS if e != "fp8_e8m0")
# Storage bits of one scale (po2/m2/e8m0 keep only an 8-bit exponent).
_SCALE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "po2": 8, "m2": 8, "e8m0": 8, "e4m3": 8}
_MX_ALIASES = {
    "mxfp4": "fp4_e2m1",
    "mxfp6_e2m3": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp8_e4m3": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2",
}
_ALIASES = {
    **{name: (elem, 32, "e8m0") for name, elem in _MX_ALIASES.items()},
    "nvfp4": ("fp4_e2m1", 16, "e4m3"),
}
_ACCEPTED_ELEMS = ", ".join((*_QUANT_ELEMENTS, *_ALIASES))
_ACCEPTED_PARTS = (
    "tensor, channel, token, g<N>, sym, asym, po2, m2, bf16, fp16, e8m0, e4m3, clip<r>, mse, "
    "mse<m>"
)
_NUMBER = r"((?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)"
_CLIP_RE = re.compile("clip" + _NUMBER)
_GROUP_RE = re.compile(r"g(\d+)")
_MSE_RE = re.compile("mse" + _NUMBER)


@dataclass(frozen=True)
class FormatSpec:
    """A number format: element type, grouping, symmetry, scale type and clipping.

    Attributes:
        elem: Element type name (see :mod:`qcompile.formats.elements`).
        granularity: ``"tensor"``, ``"channel"``, ``"token"`` or ``"group"``. Channel and
            token both mean one scale per row of the last dim (token marks activations).
        group_size: Group length along the last dim; set only for ``"group"``.
        asym: Asymmetric: a zero point for INT, separate positive/negative scales (AFPQ)
            for FP and NF elements.
        scale: Scale type: ``"fp32"``, ``"bf16"``, ``"fp16"`` (storage dtype), ``"po2"``
            (ZeroQuant-FP M1), ``"m2"`` (M2: fp32 row scale x power-of-two group factor),
            ``"e8m0"`` (MX block scales), ``"e4m3"`` (NVFP4 block scales + fp32 tensor scale).
        clip: Range ratio in (0, 1] applied to each group's range before computing scales.
        mse: e8m0/e4m3 block scales: each group takes the scale-grid neighbour (below or above
            its exact scale) with the smaller squared error on the group's values.
        mse_max: With ``mse``, a second target for each group's absmax (below the element's
            max): the grid neighbours of ``absmax / mse_max`` are candidates too; None: only
            the element's max.

    Raises:
        FormatError: On construction, for any invalid field or combination.
    """

    elem: str
    granularity: str = "channel"
    group_size: int | None = None
    asym: bool = False
    scale: str = "fp32"
    clip: float = 1.0
    mse: bool = False
    mse_max: float | None = None

    def __post_init__(self) -> None:
        if self.elem not in _QUANT_ELEMENTS:
            raise FormatError(f"unknown element {self.elem!r}; accepted: {_ACCEPTED_ELEMS}")
        if self.granularity not in GRANULARITIES:
            raise FormatError(
                f"unknown granularity {self.granularity!r}; accepted: {', '.join(GRANULARITIES)}"
            )
        gs = self.group_size
        if self.granularity == "group":
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                raise FormatError(f"group size must be a positive integer, got {gs!r}")
        elif gs is not None:
            raise FormatError(
                f"group_size is only for granularity 'group', not {self.granularity!r}"
            )
        if not isinstance(self.asym, bool):
            raise FormatError(f"asym must be a bool, got {self.asym!r}")
        if self.scale not in SCALES:
            raise FormatError(f"unknown scale type {self.scale!r}; accepted: {', '.join(SCALES)}")
        clip = self.clip
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1:
            raise FormatError(f"clip ratio must lie in (0, 1], got {clip!r}")
        object.__setattr__(self, "clip", float(clip))
        if self.scale == "m2" and self.granularity != "group":
            raise FormatError(
                "scale 'm2' needs a group granularity g<N> (row scale x group factor)"
            )
        if self.mse and self.scale not in ("e8m0", "e4m3"):
            raise FormatError("mse picks between block-scale neighbours: it needs e8m0 or e4m3 "
                              f"scales (mxfp4, nvfp4, ...), not {self.scale!r}")
        if self.mse_max is not None:
            m = self.mse_max
            if not self.mse:
                raise FormatError("mse_max is a second target of the mse search: set mse too")
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not (
                    0 < m < self.element.max):
                raise FormatError(f"mse<m> needs 0 < m < {self.element.max:g} (the max of "
                                  f"{self.elem}), got {m!r}")
            object.__setattr__(self, "mse_max", float(m))
        if self.scale in ("e8m0", "e4m3"):
            if not self.element.is_float:
                raise FormatError(
                    f"{self.scale} block scales need an fp element, not {self.elem!r}"
                )
            if self.granularity != "group":
                raise FormatError(f"{self.scale} block scales need a group granularity g<N>")
            if self.asym:
                raise FormatError(f"{self.scale} block scales are symmetric only; drop 'asym'")

    @property
    def element(self) -> ElementInfo:
        """The element type's :class:`~qcompile.formats.elements.ElementInfo`."""
        return element_info(self.elem)

    @property
    def bits(self) -> int:
        """Bits per element code."""
        return self.element.bits

    @property
    def kind(self) -> str:
        """Element kind: ``"int"``, ``"fp"`` or ``"nf"``."""
        return self.element.kind

    @property
    def is_float(self) -> bool:
        """True for ExMy floating-point elements (NF codebooks are not)."""
        return self.element.is_float

    @property
    def levels(self) -> int:
        """Number of codes, ``2 ** bits``."""
        return 1 << self.bits

    def num_groups(self, k: int) -> int:
        """Scales per row of length ``k``: ``ceil(k / g)`` for groups, else 1.

        Args:
            k: Row length (last-dim size), at least 1.

        Raises:
            FormatError: ``k`` is not a positive integer.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise FormatError(f"row length must be a positive integer, got {k!r}")
        if self.granularity == "group":
            assert self.group_size is not None
            return -(-k // self.group_size)
        return 1

    def bits_per_element(self, k: int) -> float:
        """Storage bits per element for a row of length ``k``, scales and zero points included.

        Each group (the ragged last one too) carries its scale (fp32 32, bf16/fp16 16,
        po2/m2/e8m0/e4m3 8 bits), a second scale when asymmetric FP/NF, or a zero point
        of element width when asymmetric INT; m2 adds one 32-bit row scale. Per-tensor
        scalars (``tensor`` granularity, the nvfp4 tensor scale) are not counted: they
        vanish per element as the tensor grows.

        Args:
            k: Row length (last-dim size), at least 1.
        """
        groups = self.num_groups(k)
        if self.granularity == "tensor":
            return float(self.bits)
        per_group = _SCALE_BITS[self.scale]
        if self.asym:
            per_group += self.bits if self.kind == "int" else _SCALE_BITS[self.scale]
        per_row = 32 if self.scale == "m2" else 0
        return self.bits + (groups * per_group + per_row) / k

    def __str__(self) -> str:
        parts: list[str]
        alias = self._alias()
        if alias is not None:
            parts = [alias]
        else:
            gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
            parts = [self.elem, gran]
            if self.asym:
                parts.append("asym")
            if self.scale != "fp32":
                parts.append(self.scale)
        if self.clip != 1.0:
            parts.append(f"clip{self.clip!r}")
        if self.mse:
            m = self.mse_max
            parts.append("mse" if m is None else f"mse{m:g}" if float(f"{m:g}") == m
                         else f"mse{m!r}")
        return "/".join(parts)

    def _alias(self) -> str | None:
        for name, (elem, group, scale) in _ALIASES.items():
            if (self.elem, self.group_size, self.scale) == (elem, group, scale):
                return name
        return None


def _bad(text: str, what: str) -> FormatError:
    return FormatError(f"bad format {text!r}: {what}")


def parse_format(text: str) -> FormatSpec:
    """Parse format text such as ``"int4/g128/asym"`` or ``"nvfp4"``.

    Args:
        text: Format text (grammar in the module docstring).

    Returns:
        The equal :class:`FormatSpec`; ``parse_format(str(spec)) == spec``.

    Raises:
        FormatError: One-line message naming the bad part and what is accepted.
    """
    if not isinstance(text, str):
        raise FormatError(f"format must be text, got {type(text).__name__}")
    clean = text.strip().lower()
    if not clean:
        raise FormatError(
            f"empty format text; expected <elem>[/<granularity>][/<modifier>...], elem one of: {_ACCEPTED_ELEMS}"
        )
    head, *rest = clean.split("/")
    if head in _ALIASES:
        elem, alias_group, alias_scale = _ALIASES[head]
    elif head in _QUANT_ELEMENTS:
        elem, alias_group, alias_scale = head, None, None
    else:
        raise _bad(text, f"unknown element {head!r}; accepted: {_ACCEPTED_ELEMS}")

    granularity: str | None = None
    group_size: int | None = None
    sym_mod: str | None = None
    scale: str | None = None
    clip: float | None = None
    mse = False
    mse_max: float | None = None
    for part in rest:
        if not part:
            raise _bad(text, "empty part between '/'; accepted parts: " + _ACCEPTED_PARTS)
        if part in ("tensor", "channel", "token") or part.startswith("g"):
            if granularity is not None:
                raise _bad(
                    text,
                    f"granularity given twice ({part!r}); give one of tensor, channel, token, g<N>",
                )
            granularity, group_size = _parse_granularity(text, part)
        elif part in ("sym", "asym"):
            if sym_mod is not None:
                what = "duplicate" if sym_mod == part else "conflicting"
                raise _bad(
                    text, f"{what} modifiers {sym_mod!r} and {part!r}; give one of sym, asym"
                )
            sym_mod = part
        elif part in SCALES and part != "fp32":
            if scale is not None:
                what = "duplicate" if scale == part else "conflicting"
                raise _bad(
                    text,
                    f"{what} scale modifiers {scale!r} and {part!r}; give at most one of po2, m2, bf16, fp16, e8m0, e4m3",
                )
            scale = part
        elif part.startswith("mse"):
            if mse:
                raise _bad(text, "mse given twice")
            mse = True
            if part != "mse":
                match = _MSE_RE.fullmatch(part)
                if match is None:
                    raise _bad(text, f"bad mse part {part!r}; expected mse or mse<m> with m a "
                                     "number, e.g. mse4")
                mse_max = float(match.group(1))
        elif part.startswith("clip"):
            if clip is not None:
                raise _bad(text, f"clip given twice ({part!r}); give one clip<ratio>")
            clip = _parse_clip(text, part)
        else:
            raise _bad(text, f"unknown part {part!r}; accepted: {_ACCEPTED_PARTS}")

    if alias_group is not None:
        if granularity is not None and (granularity, group_size) != ("group", alias_group):
            raise _bad(
                text,
                f"{head} fixes its groups to g{alias_group}; drop {_gran_text(granularity, group_size)!r}",
            )
        if scale is not None and scale != alias_scale:
            raise _bad(text, f"{head} fixes its scales to {alias_scale}; drop {scale!r}")
        if sym_mod == "asym":
            raise _bad(text, f"{head} is symmetric only; drop 'asym'")
        granularity, group_size, scale = "group", alias_group, alias_scale
    try:
        return FormatSpec(
            elem=elem,
            granularity=granularity or "channel",
            group_size=group_size,
            asym=sym_mod == "asym",
            scale=scale or "fp32",
            clip=1.0 if clip is None else clip,
            mse=mse,
            mse_max=mse_max,
        )
    except FormatError as err:
        raise _bad(text, str(err)) from None


def _gran_text(granularity: str, group_size: int | None) -> str:
    return f"g{group_size}" if granularity == "group" else granularity


def _parse_granularity(text: str, part: str) -> tuple[str, int | None]:
    if part in ("tensor", "channel", "token"):
        return part, None
    match = _GROUP_RE.fullmatch(part)
    if match is None:
        raise _bad(
            text,
            f"malformed group size {part!r}; expected g<N> with N a positive integer, e.g. g128",
        )
    size = int(match.group(1))
    if size < 1:
        raise _bad(text, f"group size must be at least 1, got {part!r}; e.g. g128")
    return "group", size


def _parse_clip(text: str, part: str) -> float:
    match = _CLIP_RE.fullmatch(part)
    if match is None:
        raise _bad(
            text,
            f"malformed clip {part!r}; expected clip<ratio> with ratio in (0, 1], e.g. clip0.9",
        )
    ratio = float(match.group(1))
    if not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise _bad(text, f"clip ratio {match.group(1)} outside (0, 1]; e.g. clip0.9")
    return ratio
