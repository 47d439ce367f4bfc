"""Fuzzing the canonical codec and the event decoders (envelope, every body kind).

Contract under test: `codec.unpack`/`unpack_canonical` raise only InvalidMessage;
`events.decode_wire`/`decode_signed` raise only InvalidEvent; whatever is accepted is
the one canonical encoding of what was decoded (so every node stores the same bytes
and derives the same id)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from testkit import NETWORK, Chain, raw_event, sample_bodies, seed, sign_raw

from node import codec
from node.errors import InvalidEvent, InvalidMessage
from node.events import KINDS, MAX_SIGNED, MAX_WIRE, Event, decode_signed, decode_wire

from .mutations import FUZZ, FUZZ_SLOW, TREES, mutated, packb, structurally_mutated

LIMIT = 1 << 16


def _events() -> list[Event]:
    """Every kind at seq 1 and at seq 2 (with prev), from two authors."""
    out = []
    for i, body in enumerate(sample_bodies().values()):
        c = Chain(seed(100 + i))
        out.append(c.next(body))
        out.append(c.next(body))
    return out


EVENTS = _events()
KIND_EVENTS = st.sampled_from(EVENTS)


def _no_floats(v: Any) -> bool:
    if isinstance(v, float):
        return False
    if isinstance(v, list):
        return all(_no_floats(x) for x in v)
    if isinstance(v, dict):
        return all(_no_floats(x) for x in v.values())
    return True


def _check_canonical(data: bytes) -> None:
    try:
        v = codec.unpack_canonical(data, LIMIT)
    except InvalidMessage as e:
        assert e.reason in {"malformed", "non_canonical", "oversized"}, e.reason
        return
    assert codec.pack(v) == data, "accepted bytes must be the canonical encoding"
    assert _no_floats(v)


# ------------------------------------------------------------------ codec


@FUZZ
@given(st.binary(max_size=256))
def test_unpack_raises_only_invalid_message(data: bytes) -> None:
    try:
        codec.unpack(data, LIMIT)
    except InvalidMessage as e:
        assert e.reason in {"malformed", "oversized"}


@FUZZ
@given(st.binary(max_size=256))
def test_unpack_canonical_arbitrary_bytes(data: bytes) -> None:
    _check_canonical(data)


@FUZZ
@given(KIND_EVENTS.flatmap(lambda ev: mutated(ev.signed)))
def test_unpack_canonical_mutated_envelopes(data: bytes) -> None:
    _check_canonical(data)


@FUZZ
@given(TREES)
def test_unpack_canonical_accepts_exactly_the_canonical_form(value: Any) -> None:
    data = packb(value)  # keys in whatever order hypothesis made them
    accepted = True
    try:
        codec.unpack_canonical(data, LIMIT)
    except InvalidMessage:
        accepted = False
    assert accepted == (codec.pack(value) == data)


def test_unpack_size_limit_and_deep_nesting() -> None:
    with pytest.raises(InvalidMessage) as ei:
        codec.unpack(b"\xc0" * 11, 10)
    assert ei.value.reason == "oversized"
    deep = b"\x91" * 5000 + b"\xc0"  # msgpack's own stack limit
    with pytest.raises(InvalidMessage):
        codec.unpack(deep, LIMIT)
    with pytest.raises(InvalidMessage):
        codec.unpack_canonical(b"\x91" * 40 + b"\xc0", LIMIT)


def test_unpack_huge_declared_lengths_fail_fast() -> None:
    # Headers announcing 4 GiB strings/arrays/maps with nothing behind them.
    for head in (b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                 b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01"):
        with pytest.raises(InvalidMessage):
            codec.unpack(head, LIMIT)


# ------------------------------------------------------------------ wire records


def _check_wire(data: bytes, original: Event | None = None) -> None:
    try:
        ev = decode_wire(data, NETWORK)
    except InvalidEvent as e:
        assert e.reason, "every rejection carries a reason code"
        return
    assert ev.wire == data, "an accepted record is its own canonical encoding"
    if original is not None:
        # The signature covers `signed`; damage cannot yield another valid event.
        assert (ev.id, ev.sig) == (original.id, original.sig)


@FUZZ
@given(st.binary(max_size=512))
def test_decode_wire_arbitrary_bytes(data: bytes) -> None:
    _check_wire(data)


@FUZZ
@given(st.data())
def test_decode_wire_mutated_records_of_every_kind(data: st.DataObject) -> None:
    ev = data.draw(KIND_EVENTS)
    _check_wire(data.draw(mutated(ev.wire)), ev)


@FUZZ
@given(st.data())
def test_decode_wire_structurally_mutated_outer_array(data: st.DataObject) -> None:
    ev = data.draw(KIND_EVENTS)
    outer = data.draw(structurally_mutated([ev.signed, ev.sig]))
    _check_wire(packb(outer), ev)


def test_decode_wire_size_limits() -> None:
    ev = EVENTS[0]
    with pytest.raises(InvalidEvent) as ei:
        decode_wire(ev.wire + b"\x00" * MAX_WIRE, NETWORK)
    assert ei.value.reason in {"oversized", "malformed"}
    big = b"\x00" * (MAX_SIGNED + 1)
    _, sig, _ = raw_event(seed(1), [], packed=big)
    with pytest.raises(InvalidEvent) as ei:
        decode_signed(big, sig, NETWORK)
    assert ei.value.reason == "oversized"


# ------------------------------------------------------------------ envelopes, re-signed


def _check_resigned(signed: bytes, author_seed: bytes) -> None:
    """Sign arbitrary envelope bytes with the real key, so decoding gets past the
    signature to the schema; accepted events must round-trip to the same bytes."""
    sig = sign_raw(author_seed, signed)
    try:
        ev = decode_signed(signed, sig, NETWORK)
    except InvalidEvent as e:
        assert e.reason, "every rejection carries a reason code"
        return
    assert ev.kind in KINDS
    rebuilt = codec.pack([1, ev.author, ev.seq, ev.prev, ev.ts_ms, ev.kind, ev.body.to_map()])
    assert rebuilt == signed, "an accepted envelope re-encodes to the same bytes"
    assert decode_wire(ev.wire, NETWORK).id == ev.id


@FUZZ_SLOW
@given(st.data())
def test_resigned_structural_mutations_of_every_kind(data: st.DataObject) -> None:
    ev = data.draw(KIND_EVENTS)
    env = codec.unpack(ev.signed, LIMIT)
    _check_resigned(packb(data.draw(structurally_mutated(env))), _seed_of(ev))


@FUZZ_SLOW
@given(st.data())
def test_resigned_byte_mutations_of_every_kind(data: st.DataObject) -> None:
    ev = data.draw(KIND_EVENTS)
    _check_resigned(data.draw(mutated(ev.signed)), _seed_of(ev))


@FUZZ_SLOW
@given(st.lists(TREES, min_size=7, max_size=7))
def test_resigned_arbitrary_envelopes(fields: list[Any]) -> None:
    ev = EVENTS[0]
    fields[1] = ev.author  # the signature must verify for the schema to be reached
    _check_resigned(packb(fields), _seed_of(ev))


@FUZZ_SLOW
@given(st.sampled_from(sorted(KINDS)), TREES)
def test_resigned_arbitrary_bodies_of_every_kind(kind: str, body: Any) -> None:
    ev = EVENTS[0]
    _check_resigned(packb([1, ev.author, 1, None, 5, kind, body]), _seed_of(ev))


_SEEDS = {Chain(seed(100 + i)).public: seed(100 + i) for i in range(len(KINDS))}


def _seed_of(ev: Event) -> bytes:
    return _SEEDS[ev.author]


def test_signature_is_bound_to_network_and_bytes() -> None:
    ev = EVENTS[0]
    with pytest.raises(InvalidEvent) as ei:
        decode_wire(ev.wire, "othernet")
    assert ei.value.reason == "bad_signature"
    other = EVENTS[2]  # another author's valid signature on different bytes
    with pytest.raises(InvalidEvent) as ei:
        decode_signed(ev.signed, other.sig, NETWORK)
    assert ei.value.reason == "bad_signature"
