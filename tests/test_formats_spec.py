"""Format spec grammar: parsing, canonical printing, errors, and storage accounting."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from qcompile.errors import FormatError
from qcompile.formats import ELEMENTS, GRANULARITIES, SCALES, FormatSpec, parse_format

EXAMPLES = [
    "int4/g128/asym",
    "int8/channel",
    "int8/token",
    "fp8_e4m3/token",
    "fp8_e5m2/tensor",
    "fp4_e2m1/g128",
    "fp4_e2m1/g128/asym",
    "fp4_e2m1/g128/po2",
    "fp4_e2m1/g128/m2",
    "fp3_e2m0",
    "fp3_e1m1",
    "nf4/g64",
    "nf3/g64/asym",
    "mxfp4",
    "nvfp4",
    "int3/g128/asym",
    "int4/g128/asym/clip0.9",
    "mxfp8_e4m3",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_round_trip(text: str) -> None:
    spec = parse_format(text)
    assert parse_format(str(spec)) == spec
    assert str(parse_format(str(spec))) == str(spec)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("int4/g128/asym", "int4/g128/asym"),
        ("int8", "int8/channel"),
        ("fp3_e2m0", "fp3_e2m0/channel"),
        ("mxfp4", "mxfp4"),
        ("nvfp4", "nvfp4"),
        ("int4/g128/asym/clip0.9", "int4/g128/asym/clip0.9"),
        # Defaults are dropped, modifiers reordered, case folded.
        ("INT4/G128/ASYM", "int4/g128/asym"),
        ("fp4_e2m1/clip0.5/po2/asym/g64", "fp4_e2m1/g64/asym/po2/clip0.5"),
        ("int4/g128/sym", "int4/g128"),
        ("nf4/g64/clip1", "nf4/g64"),
        ("int4/g128/clip1.0", "int4/g128"),
        (" int8/token ", "int8/token"),
        ("mxfp4/g32", "mxfp4"),
        ("mxfp4/clip0.75", "mxfp4/clip0.75"),
        ("fp4_e2m1/g32/e8m0", "mxfp4"),
        ("fp4_e2m1/g16/e4m3", "nvfp4"),
        ("fp8_e4m3/g32/e8m0", "mxfp8_e4m3"),
        ("fp4_e2m1/g64/e8m0", "fp4_e2m1/g64/e8m0"),
        ("int4/g128/bf16", "int4/g128/bf16"),
        ("fp8_e4m3/channel/fp16", "fp8_e4m3/channel/fp16"),
        ("int4/g64/clip1e-3", "int4/g64/clip0.001"),
    ],
)
def test_canonical_text(text: str, canonical: str) -> None:
    assert str(parse_format(text)) == canonical


def test_parsed_fields() -> None:
    assert parse_format("int4/g128/asym") == FormatSpec("int4", "group", 128, True, "fp32", 1.0)
    assert parse_format("int8") == FormatSpec("int8", "channel")
    assert parse_format("fp8_e4m3/token") == FormatSpec("fp8_e4m3", "token")
    assert parse_format("mxfp4") == FormatSpec("fp4_e2m1", "group", 32, False, "e8m0")
    assert parse_format("nvfp4") == FormatSpec("fp4_e2m1", "group", 16, False, "e4m3")
    assert parse_format("mxfp8_e4m3") == FormatSpec("fp8_e4m3", "group", 32, False, "e8m0")
    assert parse_format("fp4_e2m1/g128/m2").scale == "m2"
    assert parse_format("int4/g128/asym/clip0.9").clip == 0.9
    assert parse_format("nf3/g64/asym") == FormatSpec("nf3", "group", 64, True)


def test_properties() -> None:
    assert parse_format("int4/g128").bits == 4
    assert parse_format("fp8_e5m2/tensor").bits == 8
    assert parse_format("nf3/g64").bits == 3
    assert parse_format("fp4_e2m1/g128").is_float
    assert parse_format("mxfp4").is_float
    assert not parse_format("int4/g128").is_float
    assert not parse_format("nf4/g64").is_float
    assert parse_format("int3/g128/asym").levels == 8
    assert parse_format("nf4").kind == "nf"
    assert parse_format("fp3_e1m1").element.max == 1.5


def test_spec_is_frozen_and_hashable() -> None:
    spec = parse_format("int4/g128/asym")
    assert {spec: 1}[parse_format("int4/g128/asym")] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.asym = False  # type: ignore[misc]


@st.composite
def specs(draw: st.DrawFn) -> FormatSpec:
    elem = draw(st.sampled_from([e for e in ELEMENTS if e != "fp8_e8m0"]))
    gran = draw(st.sampled_from(GRANULARITIES))
    group = draw(st.integers(1, 4096)) if gran == "group" else None
    asym = draw(st.booleans())
    scale = draw(st.sampled_from(SCALES))
    clip = draw(
        st.one_of(
            st.just(1.0),
            st.floats(0, 1, exclude_min=True),
            st.sampled_from([0.5, 0.9, 0.975, 1e-7, 5e-324]),
        )
    )
    try:
        return FormatSpec(elem, gran, group, asym, scale, clip)
    except FormatError:
        assume(False)
        raise


@given(specs())
def test_generated_specs_round_trip(spec: FormatSpec) -> None:
    text = str(spec)
    assert parse_format(text) == spec
    assert str(parse_format(text)) == text
    assert "\n" not in text


# (text, a fragment the one-line message must contain: the bad part or the rule broken)
MALFORMED = [
    ("", "empty"),
    ("   ", "empty"),
    ("int9", "'int9'"),
    ("int1", "'int1'"),
    ("fp4", "'fp4'"),
    ("fp8_e8m0", "'fp8_e8m0'"),
    ("float16", "'float16'"),
    ("int4/g0", "'g0'"),
    ("int4/g-3", "'g-3'"),
    ("int4/g1.5", "'g1.5'"),
    ("int4/gabc", "'gabc'"),
    ("int4/g", "'g'"),
    ("int4/g12x", "'g12x'"),
    ("int4/asym/sym", "conflicting"),
    ("int4/sym/asym", "conflicting"),
    ("int4/asym/asym", "duplicate"),
    ("int4/g128/g64", "'g64'"),
    ("int4/channel/token", "'token'"),
    ("fp4_e2m1/g128/po2/m2", "conflicting"),
    ("fp4_e2m1/g128/bf16/fp16", "conflicting"),
    ("fp4_e2m1/g128/bf16/bf16", "duplicate"),
    ("int4/foo", "'foo'"),
    ("int4/fp32", "'fp32'"),
    ("int4//asym", "empty part"),
    ("int4/", "empty part"),
    ("/int4", "''"),
    ("int4/clip0", "clip"),
    ("int4/clip1.5", "clip"),
    ("int4/clip-0.5", "'clip-0.5'"),
    ("int4/clip", "'clip'"),
    ("int4/clipnan", "'clipnan'"),
    ("int4/clipinf", "'clipinf'"),
    ("int4/clip0.9/clip0.8", "'clip0.8'"),
    ("fp4_e2m1/m2", "m2"),
    ("fp4_e2m1/channel/m2", "m2"),
    ("fp4_e2m1/tensor/m2", "m2"),
    ("mxfp4/g64", "'g64'"),
    ("mxfp4/channel", "'channel'"),
    ("mxfp4/asym", "asym"),
    ("nvfp4/po2", "'po2'"),
    ("nvfp4/e8m0", "'e8m0'"),
    ("int4/g128/e8m0", "'int4'"),
    ("nf4/g64/e4m3", "'nf4'"),
    ("fp4_e2m1/channel/e8m0", "group"),
    ("fp4_e2m1/g32/e8m0/asym", "asym"),
]


@pytest.mark.parametrize(("text", "fragment"), MALFORMED)
def test_malformed_specs_raise(text: str, fragment: str) -> None:
    with pytest.raises(FormatError) as info:
        parse_format(text)
    message = str(info.value)
    assert "\n" not in message
    assert fragment in message


@pytest.mark.parametrize(
    "text", ["int9", "int4/foo", "int4/gabc", "int4/asym/sym", "int4/clip2", "fp4_e2m1/po2/m2"]
)
def test_error_lists_what_is_accepted(text: str) -> None:
    with pytest.raises(FormatError) as info:
        parse_format(text)
    message = str(info.value)
    assert any(
        word in message for word in ("accepted", "expected", "give one", "at most one", "e.g.")
    )


def test_non_text_raises() -> None:
    with pytest.raises(FormatError):
        parse_format(4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"elem": "int9"},
        {"elem": "int4", "granularity": "row"},
        {"elem": "int4", "granularity": "group"},
        {"elem": "int4", "granularity": "group", "group_size": 0},
        {"elem": "int4", "granularity": "group", "group_size": True},
        {"elem": "int4", "granularity": "group", "group_size": 1.5},
        {"elem": "int4", "granularity": "channel", "group_size": 128},
        {"elem": "int4", "scale": "fp64"},
        {"elem": "int4", "clip": 0.0},
        {"elem": "int4", "clip": 1.01},
        {"elem": "int4", "clip": float("nan")},
        {"elem": "int4", "asym": 1},
        {"elem": "int4", "granularity": "channel", "scale": "m2"},
        {"elem": "nf4", "granularity": "group", "group_size": 32, "scale": "e8m0"},
    ],
)
def test_direct_construction_validates(kwargs: dict) -> None:
    with pytest.raises(FormatError):
        FormatSpec(**kwargs)


def test_group_size_that_does_not_divide_is_valid() -> None:
    spec = parse_format("int4/g128/asym")
    assert spec.num_groups(576) == 5
    assert spec.num_groups(1000) == 8
    assert spec.num_groups(128) == 1
    assert spec.num_groups(1) == 1
    assert parse_format("int4/g7").num_groups(100) == 15


def test_num_groups_other_granularities() -> None:
    for text in ("int8/channel", "int8/token", "fp8_e5m2/tensor"):
        assert parse_format(text).num_groups(576) == 1
    with pytest.raises(FormatError):
        parse_format("int4/g128").num_groups(0)


@pytest.mark.parametrize(
    ("text", "k", "expected"),
    [
        ("int4/g128/asym", 576, 4 + 5 * (32 + 4) / 576),  # ragged: 5 groups
        ("int4/g128", 4096, 4.25),
        ("int3/g128/asym", 4096, 3 + (32 + 3) / 128),
        ("fp4_e2m1/g128/asym", 4096, 4.5),  # AFPQ: two fp32 scales
        ("fp4_e2m1/g128/po2", 576, 4 + 5 * 8 / 576),
        ("fp4_e2m1/g128/m2", 576, 4 + (5 * 8 + 32) / 576),
        ("fp4_e2m1/g128/asym/m2", 576, 4 + (5 * 16 + 32) / 576),
        ("nf3/g64/asym", 64, 4.0),
        ("int4/g64/bf16", 100, 4 + 2 * 16 / 100),
        ("mxfp4", 4096, 4.25),
        ("mxfp4", 576, 4.25),
        ("nvfp4", 4096, 4.5),
        ("nvfp4", 1000, 4 + 63 * 8 / 1000),
        ("int8/channel", 1000, 8 + 32 / 1000),
        ("int8/token", 576, 8 + 32 / 576),
        ("fp8_e5m2/tensor", 576, 8.0),
    ],
)
def test_bits_per_element(text: str, k: int, expected: float) -> None:
    assert parse_format(text).bits_per_element(k) == pytest.approx(expected, rel=1e-12)
