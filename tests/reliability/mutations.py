"""Hypothesis strategies that damage valid messages the way a hostile or broken peer
would: byte-level (bit flips, truncation, extension, insertion, deletion, overwrites
with msgpack-significant bytes) and structural (decode, swap a value's type or
content somewhere in the tree, re-encode).

Shared by the test_fuzz_* modules and the atheris harnesses' seed corpora."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import settings
from hypothesis import strategies as st

# Bounded so the whole tier stays fast on 2 cores; deadline off (shared CI machines).
FUZZ = settings(max_examples=300, deadline=None)
FUZZ_SLOW = settings(max_examples=120, deadline=None)

# Bytes that mean something to msgpack: nil, bool, bin/str/array/map headers of every
# width, ext, float, the never-used 0xc1, fix-type boundaries.
INTERESTING = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3,
               0xC4, 0xC5, 0xC6, 0xC7, 0xCA, 0xCB, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4, 0xD9,
               0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF]


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    if not data:
        return data
    i = pos % len(data)
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]


def _set(data: bytes, pos: int, value: int) -> bytes:
    if not data:
        return bytes([value])
    i = pos % len(data)
    return data[:i] + bytes([value]) + data[i + 1:]


def _insert(data: bytes, pos: int, extra: bytes) -> bytes:
    i = pos % (len(data) + 1)
    return data[:i] + extra + data[i:]


def _delete(data: bytes, pos: int, n: int) -> bytes:
    if not data:
        return data
    i = pos % len(data)
    return data[:i] + data[i + n:]


@st.composite
def one_byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    pos = draw(st.integers(0, 1 << 20))
    op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete",
                               "duplicate"]))
    if op == "flip":
        return _flip(data, pos, draw(st.integers(0, 7)))
    if op == "set":
        return _set(data, pos, draw(st.sampled_from(INTERESTING) | st.integers(0, 255)))
    if op == "truncate":
        return data[: pos % (len(data) + 1)]
    if op == "extend":
        return data + draw(st.binary(min_size=1, max_size=64))
    if op == "insert":
        return _insert(data, pos, draw(st.binary(min_size=1, max_size=16)))
    if op == "delete":
        return _delete(data, pos, draw(st.integers(1, 16)))
    return data + data  # a record sent twice in one message


@st.composite
def mutated(draw: st.DrawFn, data: bytes, max_ops: int = 4) -> bytes:
    """`data` damaged by 1..max_ops byte-level mutations."""
    for _ in range(draw(st.integers(1, max_ops))):
        data = draw(one_byte_mutation(data))
    return data


# ------------------------------------------------------------------ structural


def _paths(v: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*path, i))
    elif isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*path, k))
    return out


def _replace(v: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(v, list):
        return [_replace(x, rest, new) if i == head else x for i, x in enumerate(v)]
    return {k: (_replace(x, rest, new) if k == head else x) for k, x in v.items()}


def _get(v: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        v = v[p]
    return v


# Values of every msgpack type, including the ones our formats forbid (floats) and
# boundary integers; plus the 32-byte strings every id/key field expects.
ODD_VALUES = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, -1, 1, 127, 128, 255, 256, 65535, 65536, (1 << 31) - 1, 1 << 31,
                     (1 << 32) - 1, 1 << 32, (1 << 53) - 1, 1 << 53, (1 << 63) - 1,
                     -(1 << 63), (1 << 64) - 1]),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=40),
    st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                          st.integers(0, 3), max_size=3),
    st.just("x" * 300), st.just(b"\x00" * 5000),
)


@st.composite
def structurally_mutated(draw: st.DrawFn, value: Any) -> Any:
    """`value` (a decoded msgpack tree) with one node replaced, one key renamed,
    dropped or added, or one list item dropped or appended."""
    paths = _paths(value)
    path = draw(st.sampled_from(paths))
    node = _get(value, path)
    ops = ["replace"]
    if isinstance(node, dict):
        ops += ["drop_key", "add_key", "rename_key"] if node else ["add_key"]
    if isinstance(node, list):
        ops += ["drop_item", "append_item"] if node else ["append_item"]
    op = draw(st.sampled_from(ops))
    if op == "replace":
        return _replace(value, path, draw(ODD_VALUES))
    if op == "drop_key":
        k = draw(st.sampled_from(sorted(node)))
        return _replace(value, path, {a: b for a, b in node.items() if a != k})
    if op == "add_key":
        k = draw(st.text(max_size=12))
        return _replace(value, path, {**node, k: draw(ODD_VALUES)})
    if op == "rename_key":
        k = draw(st.sampled_from(sorted(node)))
        new = draw(st.text(max_size=12))
        return _replace(value, path, {(new if a == k else a): b for a, b in node.items()})
    if op == "drop_item":
        i = draw(st.integers(0, len(node) - 1))
        return _replace(value, path, node[:i] + node[i + 1:])
    return _replace(value, path, [*node, draw(ODD_VALUES)])


def packb(value: Any) -> bytes:
    """Plain msgpack (keys in the given order: may be non-canonical on purpose)."""
    return bytes(msgpack.packb(value, use_bin_type=True))


# Arbitrary msgpack trees (what a peer can send that decodes at all).
TREES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
