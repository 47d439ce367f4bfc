"""Fuzzing the ledger's entry points: `append`, `append_many`, `add_fork_proof` and
`read_stream` (export files).

Contract: `append`/`append_many` never raise on peer input; a REJECTED record changes
nothing (digest, count, heads, forks, pending); everything accepted before is still
there. `add_fork_proof` answers False for anything but a real fork and stores nothing
then. `read_stream` yields records or an InvalidEvent and never raises."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from testkit import NETWORK, Chain, fake_id, sample_bodies, seed, sign_raw, wire_of

from node import codec
from node.errors import InvalidEvent
from node.events import Bid, Event
from node.ledger import Ledger, Status, read_stream

from .mutations import FUZZ, FUZZ_SLOW, mutated, packb, structurally_mutated


def _chains() -> tuple[list[Event], list[Event]]:
    """Stored events (two authors, several kinds) and the valid next ones."""
    stored, nxt = [], []
    bodies = list(sample_bodies().values())
    for a in range(2):
        c = Chain(seed(200 + a))
        for i in range(4):
            stored.append(c.next(bodies[(i + a) % len(bodies)]))
        nxt.append(c.next(bodies[a]))
    return stored, nxt


STORED, NEXT = _chains()
SEEDS = {Chain(seed(200 + a)).public: seed(200 + a) for a in range(2)}


def _snapshot(led: Ledger) -> tuple[Any, ...]:
    return (led.digest(), led.count(), led.heads(), led.forked(), led.pending_count,
            led.sync_heads(), len(led.fork_proofs()))


@contextmanager
def _ledger() -> Iterator[Ledger]:
    with tempfile.TemporaryDirectory() as d:
        led = Ledger(Path(d) / "ledger.db", network=NETWORK)
        try:
            res = led.append_many([e.wire for e in STORED])
            assert all(r.status is Status.ACCEPTED for r in res)
            yield led
        finally:
            led.close()


# One ledger per test function: hypothesis examples share it, and each example checks
# the state before and after its own input (accepted input is then kept: fine, the
# invariants hold from any valid state).
def _check_append(led: Ledger, wires: list[bytes]) -> None:
    before = _snapshot(led)
    results = led.append_many(wires)
    assert len(results) == len(wires)
    if all(r.status in (Status.REJECTED, Status.DUPLICATE) for r in results):
        assert _snapshot(led) == before, [r.reason for r in results]
    for r in results:
        if r.status is Status.REJECTED:
            assert r.reason, "a rejection carries a reason code"
    for e in STORED:
        assert led.has(e.id)


def _run(wires_strategy: st.SearchStrategy[list[bytes]]) -> None:
    with _ledger() as led:
        @FUZZ
        @given(wires_strategy)
        def inner(wires: list[bytes]) -> None:
            _check_append(led, wires)
        inner()
        assert led.verify_all() == []


def test_append_arbitrary_bytes() -> None:
    _run(st.lists(st.binary(max_size=300), min_size=1, max_size=3))


def test_append_byte_mutations_of_stored_and_next_records() -> None:
    pick = st.sampled_from(STORED + NEXT)
    _run(st.lists(pick.flatmap(lambda e: mutated(e.wire)), min_size=1, max_size=3))


def test_append_structural_mutations_resigned() -> None:
    """Envelopes damaged then signed with the author's real key: they pass the
    signature check, so the schema and chain rules are what must hold."""

    @st.composite
    def resigned(draw: st.DrawFn) -> bytes:
        ev = draw(st.sampled_from(STORED + NEXT))
        env = codec.unpack(ev.signed, 1 << 16)
        signed = packb(draw(structurally_mutated(env)))
        return wire_of(signed, sign_raw(SEEDS[ev.author], signed))

    _run(st.lists(resigned(), min_size=1, max_size=3))


def test_append_non_bytes_input_is_rejected_not_raised() -> None:
    with _ledger() as led:
        before = _snapshot(led)
        res = led.append_many([None, 1, "str", bytearray(b"x"), [b"x"]])  # type: ignore[list-item]
        assert {r.status for r in res} == {Status.REJECTED}
        assert _snapshot(led) == before


def test_batch_with_garbage_between_valid_records() -> None:
    with _ledger() as led:
        n = led.count()
        wires = [NEXT[0].wire, b"\x92\xc4", NEXT[1].wire, NEXT[0].wire[:-1]]
        res = led.append_many(wires)
        assert [r.status for r in res] == [Status.ACCEPTED, Status.REJECTED, Status.ACCEPTED,
                                           Status.REJECTED]
        assert led.count() == n + 2
        assert led.verify_all() == []


@FUZZ_SLOW
@given(st.lists(st.integers(2, 40), min_size=1, max_size=40))
def test_pending_flood_is_bounded_and_changes_no_heads(seqs: list[int]) -> None:
    """Events far ahead of a chain (valid signatures, missing predecessors) wait in a
    bounded buffer; beyond it they are rejected as transient, never stored."""
    led = Ledger(":memory:", network=NETWORK, pending_per_author=8, pending_total=16)
    try:
        c = Chain(seed(300))
        heads = led.heads()
        for s in seqs:
            ev = c.make(s, fake_id(f"p{s}"), Bid(request=fake_id("r"), price=s))
            r = led.append(ev.wire)
            assert r.status in (Status.PENDING, Status.REJECTED)
            if r.status is Status.REJECTED:
                assert r.reason == "pending_full" and not r.peer_fault
        assert led.pending_count <= 8
        assert led.heads() == heads and led.count() == 0
    finally:
        led.close()


# ------------------------------------------------------------------ fork proofs


def test_add_fork_proof_rejects_garbage_without_state_change() -> None:
    with _ledger() as led:
        pick = st.sampled_from(STORED + NEXT)
        rec = st.one_of(st.binary(max_size=200), pick.map(lambda e: e.wire),
                        pick.flatmap(lambda e: mutated(e.wire)))

        @FUZZ
        @given(rec, rec)
        def inner(a: bytes, b: bytes) -> None:
            before = _snapshot(led)
            assert led.add_fork_proof(a, b) is False
            assert _snapshot(led) == before

        inner()


def test_add_fork_proof_accepts_only_a_real_fork() -> None:
    with _ledger() as led:
        ev = STORED[1]  # seq 2 of author 0
        c = Chain(SEEDS[ev.author])
        twin = c.make(2, ev.prev, Bid(request=fake_id("other"), price=1), ts_ms=ev.ts_ms)
        not_chained = c.make(2, fake_id("elsewhere"), Bid(request=fake_id("x"), price=1),
                             ts_ms=ev.ts_ms)
        before = _snapshot(led)
        assert led.add_fork_proof(ev.wire, ev.wire) is False  # same id
        assert led.add_fork_proof(ev.wire, not_chained.wire) is False  # different prev
        assert led.add_fork_proof(ev.wire, STORED[5].wire) is False  # another author
        assert _snapshot(led) == before
        assert led.add_fork_proof(ev.wire, twin.wire) is True
        assert led.forked() == {ev.author: 2}
        assert led.add_fork_proof(twin.wire, ev.wire) is False  # already known
        assert led.verify_all() == []


# ------------------------------------------------------------------ export files


def _check_stream(data: bytes) -> list[bytes]:
    records: list[bytes] = []
    pos = 0
    for item in read_stream(data):
        if isinstance(item, InvalidEvent):
            assert item.reason in {"truncated", "malformed"}
            continue
        assert isinstance(item, bytes) and item
        found = data.find(item, pos)
        assert found >= pos, "records come out in file order, as slices of the file"
        pos = found + len(item)
        records.append(item)
    return records


EXPORT = b"".join(e.wire for e in STORED)


@FUZZ
@given(st.binary(max_size=400))
def test_read_stream_arbitrary_bytes(data: bytes) -> None:
    _check_stream(data)


@FUZZ
@given(mutated(EXPORT, max_ops=3))
def test_read_stream_mutated_export(data: bytes) -> None:
    _check_stream(data)


def test_read_stream_valid_export_round_trips() -> None:
    assert _check_stream(EXPORT) == [e.wire for e in STORED]
    truncated = list(read_stream(EXPORT[:-3]))
    assert truncated[:-1] == [e.wire for e in STORED[:-1]]
    last = truncated[-1]
    assert isinstance(last, InvalidEvent) and last.reason == "truncated"


def test_import_of_mutated_export_changes_nothing_it_rejects() -> None:
    """The import path: read_stream, then append every record read."""
    with _ledger() as led:
        @FUZZ_SLOW
        @given(mutated(b"".join(e.wire for e in STORED + NEXT), max_ops=2))
        def inner(data: bytes) -> None:
            recs = [r for r in read_stream(data) if isinstance(r, bytes)]
            if recs:
                _check_append(led, recs)

        inner()
        assert led.verify_all() == []
