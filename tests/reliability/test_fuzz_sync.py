"""Fuzzing anti-entropy sync: message decoders, the server's `handle`, and a client
session fed hostile responses.

Contract: `decode_request`/`decode_response` raise only InvalidMessage; `handle`
never raises and always answers a decodable response; a `SyncSession` fed any
well-formed but hostile responses never raises, ends within its request budget,
counts the peer's faults, and leaves only valid events in the ledger."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from testkit import NETWORK, Chain, fake_id, sample_bodies, seed

from node import codec, sync
from node.errors import InvalidMessage
from node.events import Event
from node.ledger import Ledger, Status
from node.sync_session import SyncLimits, SyncSession

from .mutations import FUZZ, FUZZ_SLOW, TREES, mutated, packb, structurally_mutated


def _chain(i: int, n: int) -> list[Event]:
    c = Chain(seed(400 + i))
    bodies = list(sample_bodies().values())
    return [c.next(bodies[k % len(bodies)]) for k in range(n)]


A, B = _chain(0, 6), _chain(1, 3)
AUTHORS = [A[0].author, B[0].author, fake_id("nobody")]
WIRES = [e.wire for e in A + B]

REQUESTS = [
    sync.DigestRequest(), sync.HeadsRequest(None, 512), sync.HeadsRequest(AUTHORS[0], 1),
    sync.RangeRequest(AUTHORS[0], 1, 256, 512 * 1024), sync.ForksRequest(AUTHORS[1]),
]
RESPONSES = [
    sync.DigestResponse(fake_id("d"), 2, 0),
    sync.HeadsResponse((sync.HeadEntry(A[0].author, 6, A[-1].id, None),
                        sync.HeadEntry(B[0].author, 3, B[-1].id, None)), False),
    sync.RangeResponse(tuple(WIRES[:3]), True),
    sync.ForksResponse(((WIRES[0], WIRES[1]),)),
    sync.ErrorResponse("malformed", "bad request"),
]


def _roundtrip(msg: Any, decode: Any) -> None:
    again = decode(msg.encode())
    assert again == msg


@FUZZ
@given(st.binary(max_size=300))
def test_decoders_arbitrary_bytes(data: bytes) -> None:
    for decode in (sync.decode_request, sync.decode_response):
        try:
            msg = decode(data)
        except InvalidMessage:
            continue
        _roundtrip(msg, decode)


@FUZZ
@given(st.sampled_from(REQUESTS).flatmap(lambda m: mutated(m.encode())))
def test_decode_request_mutations(data: bytes) -> None:
    try:
        msg = sync.decode_request(data)
    except InvalidMessage:
        return
    _roundtrip(msg, sync.decode_request)


@FUZZ
@given(st.sampled_from(RESPONSES).flatmap(lambda m: mutated(m.encode())))
def test_decode_response_mutations(data: bytes) -> None:
    try:
        msg = sync.decode_response(data)
    except InvalidMessage:
        return
    _roundtrip(msg, sync.decode_response)


@FUZZ
@given(st.sampled_from(REQUESTS + RESPONSES).flatmap(
    lambda m: structurally_mutated(codec.unpack(m.encode(), 1 << 22))))
def test_decoders_structural_mutations(value: Any) -> None:
    data = packb(value)
    for decode in (sync.decode_request, sync.decode_response):
        try:
            msg = decode(data)
        except InvalidMessage:
            continue
        _roundtrip(msg, decode)


@FUZZ
@given(st.integers(-3, 9), st.lists(TREES, max_size=5))
def test_decoders_any_tag_any_fields(tag: int, fields: list[Any]) -> None:
    data = packb([tag, *fields])
    for decode in (sync.decode_request, sync.decode_response):
        try:
            decode(data)
        except InvalidMessage:
            continue


@contextmanager
def _ledger(events: list[Event]) -> Iterator[Ledger]:
    led = Ledger(":memory:", network=NETWORK)  # one per example: keep it cheap
    try:
        led.append_many([e.wire for e in events])
        yield led
    finally:
        led.close()


def test_handle_never_raises() -> None:
    with _ledger(A + B) as led:
        digest = led.digest()

        @FUZZ
        @given(st.one_of(st.binary(max_size=200),
                         st.sampled_from(REQUESTS).flatmap(lambda m: mutated(m.encode())),
                         st.just(b"\x91\x01" + b"\x00" * 2000)))
        def inner(data: bytes) -> None:
            out = sync.handle(led, data)
            resp = sync.decode_response(out)
            if isinstance(resp, sync.RangeResponse):
                assert len(resp.records) <= sync.RANGE_LIMIT_MAX
            assert led.digest() == digest  # serving never changes the ledger

        inner()


# ------------------------------------------------------------------ hostile server


@st.composite
def head_entry(draw: st.DrawFn) -> sync.HeadEntry:
    author = draw(st.sampled_from(AUTHORS))
    fork = draw(st.none() | st.integers(1, 8))
    seq = fork - 1 if fork is not None else draw(st.integers(0, 10))
    id_ = None if seq == 0 else draw(st.sampled_from([e.id for e in A + B] + [fake_id("x")]))
    return sync.HeadEntry(author, seq, id_, fork)


RECORDS = st.one_of(st.sampled_from(WIRES), st.sampled_from(WIRES).flatmap(mutated).filter(bool),
                    st.binary(min_size=1, max_size=100))


@st.composite
def hostile_response(draw: st.DrawFn, kind: str) -> sync.SyncResponse | None:
    """A well-formed response of `kind` with hostile content."""
    if kind == "digest":
        return sync.DigestResponse(draw(st.binary(min_size=32, max_size=32)), 5, 1)
    if kind == "heads":
        entries = {e.author: e for e in draw(st.lists(head_entry(), max_size=4))}
        heads = tuple(entries[a] for a in sorted(entries))
        return sync.HeadsResponse(heads, draw(st.booleans()))
    if kind == "range":
        return sync.RangeResponse(tuple(draw(st.lists(RECORDS, max_size=5))), draw(st.booleans()))
    if kind == "forks":
        pairs = draw(st.lists(st.tuples(RECORDS, RECORDS), max_size=2))
        return sync.ForksResponse(tuple(pairs))
    if kind == "error":
        return sync.ErrorResponse("x", "y")
    return None


_KIND = {sync.DigestRequest: "digest", sync.HeadsRequest: "heads", sync.RangeRequest: "range",
         sync.ForksRequest: "forks"}
KINDS = ["digest", "heads", "range", "forks", "error", "none"]


@FUZZ_SLOW
@given(st.data(), st.booleans())
def test_session_survives_hostile_responses(data: st.DataObject, gaps: bool) -> None:
    """Mostly answers of the type asked for (so the session goes deep), sometimes the
    wrong type, an error or nothing."""
    with _ledger(A[:2]) as led:
        limits = SyncLimits(max_requests=40)
        session = SyncSession(led, limits, gaps=[(A[0].author, 3, 6)] if gaps else None)
        steps = 0
        while (req := session.next_request()) is not None:
            steps += 1
            assert steps <= limits.max_requests
            kind = data.draw(st.sampled_from([_KIND[type(req)]] * 6 + KINDS))
            session.on_response(data.draw(hostile_response(kind)))
        assert session.done
        assert led.verify_all() == []
        for r in (A[0], A[1]):
            assert led.has(r.id)


def test_session_against_honest_server_still_converges() -> None:
    """Sanity for the hostile-server property: the same session code syncs for real."""
    with _ledger(A + B) as src, _ledger(A[:2]) as dst:
        session = SyncSession(dst)
        while (req := session.next_request()) is not None:
            session.on_response(sync.decode_response(sync.handle(src, req.encode())))
        assert session.failed is None
        assert dst.digest() == src.digest()


def test_range_of_another_authors_records_is_harmless() -> None:
    with _ledger(A[:2]) as led:
        session = SyncSession(led, gaps=[(A[0].author, 3, 6)])
        req = session.next_request()
        assert isinstance(req, sync.RangeRequest)
        session.on_response(sync.RangeResponse(tuple(e.wire for e in B), False))
        # Valid records are stored whoever relays them; nothing invalid is.
        assert all(led.has(e.id) for e in B)
        assert led.verify_all() == []


def test_session_counts_invalid_records_as_faults() -> None:
    with _ledger(A[:2]) as led:
        session = SyncSession(led, gaps=[(A[0].author, 3, 6)])
        session.next_request()
        bad = A[2].wire[:-1] + bytes([A[2].wire[-1] ^ 1])  # broken signature
        session.on_response(sync.RangeResponse((bad,), False))
        assert session.failed and session.stats.faults["bad_signature"] == 1
        assert not led.has(A[2].id)
        assert led.append(A[2].wire).status is Status.ACCEPTED  # the real one still fits
