"""Canonical msgpack: what is accepted, what is rejected and with which reason."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from testkit import any_encoding

from node import codec
from node.errors import InvalidMessage

LIMIT = 1 << 16


def reason_of(data: bytes, limit: int = LIMIT) -> str:
    with pytest.raises(InvalidMessage) as ei:
        codec.unpack_canonical(data, limit)
    return ei.value.reason


def test_pack_sorts_keys_by_utf8_bytes() -> None:
    # "Z" < "a" < "é" (0xc3..) in UTF-8 byte order; nested maps too.
    data = codec.pack({"é": 1, "a": {"b": 2, "a": 1}, "Z": 0})
    assert data == msgpack.packb({"Z": 0, "a": {"a": 1, "b": 2}, "é": 1}, use_bin_type=True)
    assert codec.unpack_canonical(data, LIMIT) == {"Z": 0, "a": {"a": 1, "b": 2}, "é": 1}


def test_pack_uses_bin_for_bytes_and_str_for_text() -> None:
    assert codec.pack(b"ab") == b"\xc4\x02ab"
    assert codec.pack("ab") == b"\xa2ab"
    assert codec.pack((1, 2)) == codec.pack([1, 2]) == b"\x92\x01\x02"


@pytest.mark.parametrize(
    "value",
    [0, -1, 127, 128, -33, 1 << 40, -(1 << 63), (1 << 64) - 1, None, True, False, "",
     "x" * 40, b"", b"y" * 300, [], [1, [2, [3]]], {}, {"k": [b"v", {"n": None}]}],
)
def test_canonical_values_round_trip(value: object) -> None:
    data = codec.pack(value)
    assert codec.unpack_canonical(data, LIMIT) == value


@pytest.mark.parametrize(
    "data",
    [
        b"\x82\xa1b\x01\xa1a\x02",  # {"b":1,"a":2}: keys out of order
        b"\xcc\x05",  # 5 as uint8: not the shortest int
        b"\xd1\x00\x01",  # 1 as int16
        b"\xcd\x00\xff",  # 255 as uint16
        b"\xd9\x01a",  # "a" as str8 instead of fixstr
        b"\xdc\x00\x01\x01",  # [1] as array16
        b"\xde\x00\x01\xa1a\x01",  # {"a":1} as map16
        b"\xc5\x00\x01x",  # b"x" as bin16
        b"\x82\xa1a\x01\xa1a\x02",  # duplicate key
    ],
)
def test_non_canonical_encodings_rejected(data: bytes) -> None:
    assert reason_of(data) == "non_canonical"


def test_str_and_bin_are_different_values() -> None:
    # Both are canonical encodings, of different values: the schema tells them apart.
    assert codec.unpack_canonical(b"\xa1x", LIMIT) == "x"
    assert codec.unpack_canonical(b"\xc4\x01x", LIMIT) == b"x"


@pytest.mark.parametrize(
    "data",
    [
        b"\xca\x3f\x80\x00\x00",  # float32
        b"\xcb" + bytes(8),  # float64
        b"\xd4\x01\x00",  # fixext1
        b"\xc7\x01\x05\x00",  # ext8
        b"\xd6\xff" + bytes(4),  # timestamp ext
        b"\x81\xc4\x01k\x01",  # bin map key
        b"\x91\x81\xc4\x01k\x01",  # nested bin map key
        b"\x81\x01\x01",  # int map key
        b"\x92\x01",  # truncated
        b"\x01\x02",  # trailing data
        b"\xc1",  # never-used byte
        b"\xa2\xff\xfe",  # invalid UTF-8
        b"\x91" * 20 + b"\x00",  # too deep
        b"\x91" * 100_000 + b"\x00",  # far too deep for the C unpacker
        b"",
    ],
)
def test_malformed_rejected(data: bytes) -> None:
    assert reason_of(data, 1 << 20) == "malformed"


def test_oversized_rejected_before_decoding() -> None:
    assert reason_of(codec.pack(b"x" * 100), 50) == "oversized"


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_escape(data: bytes) -> None:
    try:
        value = codec.unpack_canonical(data, LIMIT)
    except InvalidMessage as e:
        assert e.reason in {"malformed", "non_canonical", "oversized"}
    else:
        assert codec.pack(value) == data


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=20,
)


@given(plain)
def test_pack_output_is_canonical(value: object) -> None:
    data = codec.pack(value)
    assert codec.unpack_canonical(data, LIMIT) == value
    assert codec.pack(codec.unpack(data, LIMIT)) == data


def _reference_canonical(data: bytes) -> object:
    """The straightforward definition: decode, refuse floats / non-str keys / depth,
    and require pack(sorted(value)) == data."""
    value = codec.unpack(data, LIMIT)

    def plain(v: object, depth: int) -> None:
        if depth > codec.MAX_DEPTH:
            raise InvalidMessage("deep", "malformed")
        if isinstance(v, float):
            raise InvalidMessage("float", "malformed")
        if isinstance(v, dict):
            for k, x in v.items():
                if type(k) is not str:
                    raise InvalidMessage("key", "malformed")
                plain(x, depth + 1)
        elif isinstance(v, list):
            for x in v:
                plain(x, depth + 1)

    plain(value, 0)
    if codec.pack(value) != data:
        raise InvalidMessage("nc", "non_canonical")
    return value


anyvalue = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=3)
    | st.binary(max_size=3) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=2) | st.binary(max_size=2), inner, max_size=3),
    max_leaves=12,
)


@given(anyvalue, st.data())
def test_fast_canonical_check_equals_definition(value: object, data: st.DataObject) -> None:
    enc = any_encoding(value, lambda opts: data.draw(st.sampled_from(opts)))
    try:
        want: object = _reference_canonical(enc)
    except InvalidMessage as e:
        want = e.reason
    try:
        got: object = codec.unpack_canonical(enc, LIMIT)
    except InvalidMessage as e:
        got = e.reason
    assert got == want


@pytest.mark.parametrize("depth", [15, 16, 17])
def test_depth_limit(depth: int) -> None:
    empty = b"\x91" * depth + b"\x90"  # innermost empty list sits at `depth`
    full = b"\x91" * depth + b"\x91\x00"  # ... and holds a value at depth + 1
    if depth > codec.MAX_DEPTH:
        assert reason_of(empty) == "malformed"
    else:
        assert codec.unpack_canonical(empty, LIMIT) is not None
    if depth + 1 > codec.MAX_DEPTH:
        assert reason_of(full) == "malformed"
    else:
        assert codec.unpack_canonical(full, LIMIT)
