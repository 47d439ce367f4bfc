"""Events: every kind round-trips; bad bodies are rejected with bad_schema."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from testkit import NETWORK, Chain, fake_id, raw_event, sample_bodies, seed

from node import codec
from node.errors import InvalidEvent
from node.events import (
    KINDS,
    MAX_SIGNED,
    Award,
    Bid,
    Body,
    Members,
    Pledge,
    commitment_hash,
    considered_digest,
    decode_signed,
    decode_stored,
    decode_wire,
    domain_tag,
    event_to_json,
    sign_event,
)
from node.schema import Int, Nested, Opt, Spec, _Declared, f

BODIES = sample_bodies()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips(kind: str) -> None:
    body = BODIES[kind]
    ev = sign_event(seed(1), 1, None, 1234, body, NETWORK)
    back = decode_wire(ev.wire, NETWORK)
    assert back == ev and back.body == body and back.kind == kind
    assert KINDS[kind].from_map(codec.unpack(codec.pack(body.to_map()), 1 << 16)) == body
    assert decode_signed(ev.signed, ev.sig, NETWORK) == ev
    js = event_to_json(ev)
    assert js["kind"] == kind and js["id"] == ev.id.hex() and js["prev"] is None
    assert body.ref() == (getattr(body, body.REF) if body.REF else None)


def _wrong_value(spec: Spec) -> Any:
    return 7 if isinstance(spec, Nested) else {"x": 1}


def _fields(kind: str) -> list[tuple[str, Spec]]:
    return list(KINDS[kind]._fields())


CASES = [(k, name) for k in sorted(KINDS) for name, _ in _fields(k)]


def _sign_body(body_map: Any, kind: str) -> bytes:
    c = Chain(seed(2))
    env = [1, c.public, 1, None, 5, kind, body_map]
    return raw_event(c.seed, [], packed=codec.pack(env))[2]


def _reason(wire: bytes) -> str:
    with pytest.raises(InvalidEvent) as ei:
        decode_wire(wire, NETWORK)
    return ei.value.reason


@pytest.mark.parametrize(("kind", "field"), CASES)
def test_wrong_type_in_any_field_is_bad_schema(kind: str, field: str) -> None:
    m = BODIES[kind].to_map()
    spec = dict(_fields(kind))[field]
    m[field] = _wrong_value(spec)
    assert _reason(_sign_body(m, kind)) == "bad_schema"
    if not isinstance(spec, Opt):
        m[field] = None
        assert _reason(_sign_body(m, kind)) == "bad_schema"


@pytest.mark.parametrize(("kind", "field"), CASES)
def test_missing_field_is_bad_schema(kind: str, field: str) -> None:
    m = BODIES[kind].to_map()
    del m[field]
    assert _reason(_sign_body(m, kind)) == "bad_schema"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_extra_field_and_non_map_body_are_bad_schema(kind: str) -> None:
    m = BODIES[kind].to_map()
    m["zzz_extra"] = 1
    assert _reason(_sign_body(m, kind)) == "bad_schema"
    assert _reason(_sign_body([], kind)) == "bad_schema"
    # Another kind's body under this kind's name.
    other = next(k for k in sorted(KINDS) if set(_fields(k)) != set(_fields(kind)))
    assert _reason(_sign_body(BODIES[other].to_map(), kind)) == "bad_schema"


def test_limits_and_cross_field_rules() -> None:
    req = BODIES["request"].to_map()
    for key, value in [
        ("service", "Bandwidth"), ("service", ""), ("currency", "eur"), ("rule", "highest"),
        ("duration_ms", 0), ("reserve", -1), ("reserve", 1 << 53), ("note", "x" * 281),
        ("chain", ["zstd"] * 9), ("min_rate_bps", 10**12), ("reveal_ms", 0),
        ("members", {**req["members"], "phones": ["12345"]}),
        ("members", {**req["members"], "devices": [b"k" * 32, b"k" * 32]}),
    ]:
        assert _reason(_sign_body({**req, key: value}, "request")) == "bad_schema", key
    bid = BODIES["bid"].to_map()
    assert _reason(_sign_body({**bid, "request": b"x" * 31}, "bid")) == "bad_schema"
    assert _reason(_sign_body({**bid, "price": True}, "bid")) == "bad_schema"
    assert _reason(_sign_body({**bid, "price": (1 << 64) - 1}, "bid")) == "bad_schema"


def test_a_declared_class_without_a_wire_shape_is_abstract() -> None:
    # A Struct or Row says how it maps to msgpack; a class that says neither cannot
    # exist (mypy reports "Cannot instantiate abstract class" for it in node/).
    @dataclasses.dataclass(frozen=True)
    class Shapeless(_Declared):
        n: int = f(Int())

    with pytest.raises(TypeError, match="abstract"):
        Shapeless(1)  # type: ignore[abstract]


def test_python_construction_validates() -> None:
    with pytest.raises(InvalidEvent) as ei:
        Bid(request=b"short", price=1)
    assert ei.value.reason == "bad_schema" and "request" in str(ei.value)
    with pytest.raises(InvalidEvent, match="vickrey"):
        dataclasses.replace(BODIES["request"], sealed=False, reveal_ms=BODIES["request"]
                            .close_ms)  # type: ignore[attr-defined]
    with pytest.raises(InvalidEvent, match="unwilling"):
        Pledge(request=fake_id("r"), willing=False, amount=5)
    with pytest.raises(InvalidEvent):
        Members(max_devices=0)
    # Lists given from Python become tuples, so bodies stay hashable and frozen.
    a = Award(request=fake_id("r"), winner=None, price=0, considered=[],  # type: ignore[arg-type]
              considered_digest=considered_digest([]), considered_count=0)
    assert a.considered == ()
    hash(BODIES["bid"])


def test_sign_event_rejects_misuse() -> None:
    body = BODIES["bid"]
    with pytest.raises(ValueError):
        sign_event(seed(1), 2, None, 1, body, NETWORK)
    with pytest.raises(ValueError):
        sign_event(seed(1), 1, fake_id("p"), 1, body, NETWORK)
    with pytest.raises(ValueError):
        sign_event(seed(1), 1, None, -1, body, NETWORK)
    with pytest.raises(ValueError):
        domain_tag("Bad Network")


def test_domain_tag_and_id() -> None:
    assert domain_tag("main") == b"bidmesh/event/v1/main\n"
    ev = sign_event(seed(1), 1, None, 1, BODIES["bid"], NETWORK)
    import hashlib

    assert ev.id == hashlib.sha256(ev.signed).digest()
    assert codec.unpack(ev.wire, 1 << 16) == [ev.signed, ev.sig]
    with pytest.raises(InvalidEvent) as ei:
        decode_wire(ev.wire, "othernet")
    assert ei.value.reason == "bad_signature"
    # A caller may pass the precomputed tag.
    assert decode_wire(ev.wire, "ignored", tag=domain_tag(NETWORK)) == ev


def test_verify_false_skips_only_the_signature() -> None:
    ev = sign_event(seed(1), 1, None, 1, BODIES["bid"], NETWORK)
    assert decode_signed(ev.signed, bytes(64), NETWORK, verify=False).id == ev.id
    with pytest.raises(InvalidEvent):
        decode_signed(ev.signed + b"\x00", bytes(64), NETWORK, verify=False)
    with pytest.raises(InvalidEvent) as ei:
        decode_signed(b"\x90" * (MAX_SIGNED + 1), bytes(64), NETWORK, verify=False)
    assert ei.value.reason == "oversized"


def test_commitment_and_considered_digest() -> None:
    r = fake_id("r")
    assert commitment_hash(r, 5, b"n" * 16) != commitment_hash(r, 6, b"n" * 16)
    assert considered_digest([b"b" * 32, b"a" * 32]) == considered_digest([b"a" * 32, b"b" * 32])


def test_body_registry_is_complete() -> None:
    for kind, cls in KINDS.items():
        assert issubclass(cls, Body) and kind == cls.KIND
        assert dataclasses.is_dataclass(cls)


@given(st.binary(min_size=0, max_size=700), st.binary(min_size=62, max_size=66), st.data())
def test_fast_wire_split_equals_generic_decode(signed: bytes, sig: bytes,
                                               data: st.DataObject) -> None:
    from testkit import any_encoding

    from node.errors import InvalidMessage
    from node.events import MAX_WIRE, _split_canonical_wire

    wire = any_encoding([signed, sig], lambda opts: data.draw(st.sampled_from(opts)))
    if data.draw(st.booleans()):
        wire += data.draw(st.binary(max_size=2))
    try:
        v = codec.unpack_canonical(wire, MAX_WIRE)
        ok = type(v) is list and len(v) == 2 and all(type(x) is bytes for x in v) and len(
            v[1]) == 64
        want = (v[0], v[1]) if ok else None
    except InvalidMessage:
        want = None
    assert _split_canonical_wire(wire) == want


def test_decode_stored_equals_the_full_decode_of_stored_records() -> None:
    """The restart path skips only checks append already made: the same Event for
    every kind."""
    for i, body in enumerate(sample_bodies().values()):
        ev = sign_event(seed(i), 1, None, 1000 + i, body, NETWORK)
        assert decode_stored(ev.wire, NETWORK) == decode_wire(ev.wire, NETWORK)
    keys: dict[bytes, bytes] = {}
    a = decode_stored(ev.wire, NETWORK, keys)
    b = decode_stored(ev.wire, NETWORK, keys)
    assert a == b and a.author is b.author and list(keys) == [a.author]
