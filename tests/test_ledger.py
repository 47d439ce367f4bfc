"""The ledger: append outcomes, bad input, pending buffer, forks, queries, convergence,
crash safety and concurrent read-only access."""

from __future__ import annotations

import itertools
import os
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import NETWORK, Chain, fake_id, raw_event, sample_bodies, seed, wire_of

from node import codec, ledger_append
from node import ledger as ledger_mod
from node.errors import UsageError
from node.events import MAX_SEQ, MAX_SIGNED, Bid, Event, Offer, decode_wire, peek_chain_position
from node.keys import Identity
from node.ledger import AppendResult, Ledger, Status, read_stream

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "ledger.db", network=NETWORK)
    yield led
    led.close()


def snapshot(led: Ledger) -> tuple[bytes, list[bytes], list[tuple[bytes, int]]]:
    forks = [(p.author, p.seq) for p in led.fork_proofs()]
    return led.digest(), sorted(led.iter_wires()), forks


def env(c: Chain, seq: int, prev: bytes | None, body: object, *, kind: str = "bid",
        ts: int = 1_700_000_000_100) -> list[object]:
    return [1, c.public, seq, prev, ts, kind, body]


# ---------------------------------------------------------------- basic outcomes


def test_accept_duplicate_and_query(ledger: Ledger) -> None:
    c = Chain(seed(1))
    bodies = sample_bodies()
    evs = [c.next(b) for b in bodies.values()]
    for ev in evs:
        res = ledger.append(ev.wire)
        assert res.status is Status.ACCEPTED and res.event_id == ev.id
        assert res.accepted == (ev,)
    assert ledger.append(evs[0].wire).status is Status.DUPLICATE
    assert ledger.count() == len(evs)
    assert ledger.count_by_kind() == dict.fromkeys(bodies, 1)
    assert ledger.head(c.public) == (len(evs), evs[-1].id, evs[-1].ts_ms)
    assert ledger.get(evs[3].id) == evs[3]
    assert ledger.get(fake_id("nope")) is None
    assert ledger.range(c.public, 3, limit=2) == [evs[2].wire, evs[3].wire]
    assert [e for _, e in ledger.events(kind="bid")] == [evs[1]]
    assert [e.kind for _, e in ledger.events(author=c.public)] == list(bodies)
    refs = [e.kind for _, e in ledger.events(ref=fake_id("lease"))]
    assert refs == ["payment", "rating", "usage", "subcontract"]
    since = [e.seq for _, e in ledger.events(since_ms=evs[8].ts_ms)]
    assert since == [9, 10, 11]
    page = ledger.events(limit=4)
    assert [e.seq for _, e in ledger.events(after=page[-1][0], limit=2)] == [5, 6]
    assert list(ledger.iter_canonical()) == evs
    assert ledger.verify_all() == []


def test_publish_extends_own_chain(ledger: Ledger) -> None:
    me = Identity.from_seed(seed(2))
    a = ledger.publish(me, Bid(request=fake_id("r"), price=1), now_ms=1000)
    b = ledger.publish(me, Bid(request=fake_id("r"), price=2), now_ms=500)  # clock went back
    assert (b.seq, b.prev, b.ts_ms) == (2, a.id, 1000)


def test_page_cache_size(tmp_path: Path) -> None:
    # The writer's page cache is part of the node's RSS: node.ledger_cache_mib sets it,
    # and its default is the library's.
    from node import config

    def cache(led: Ledger) -> int:
        return int(led.db.execute("PRAGMA cache_size").fetchone()[0])

    with Ledger(tmp_path / "a.db", network=NETWORK) as led:
        assert cache(led) == -ledger_mod.CACHE_KIB
    with Ledger(tmp_path / "b.db", network=NETWORK, cache_kib=3 << 10) as led:
        assert cache(led) == -(3 << 10)
    assert config.NodeConfig().ledger_cache_mib << 10 == ledger_mod.CACHE_KIB


def test_digest_depends_on_heads_only(tmp_path: Path) -> None:
    evs = [Chain(seed(i)).next() for i in range(3)]
    digests = []
    for order in ([0, 1, 2], [2, 0, 1]):
        with Ledger(tmp_path / f"{order}.db", network=NETWORK) as led:
            assert led.digest() == Ledger(":memory:", network=NETWORK).digest()
            led.append_many([evs[i].wire for i in order])
            digests.append(led.digest())
    assert digests[0] == digests[1]


# ---------------------------------------------------------------- bad input


def assert_rejected(led: Ledger, wire: bytes, reason: str) -> None:
    before = snapshot(led)
    res = led.append(wire)
    assert (res.status, res.reason) == (Status.REJECTED, reason), res.detail
    assert res.peer_fault
    assert snapshot(led) == before


@pytest.fixture
def seeded_ledger(ledger: Ledger) -> tuple[Ledger, Chain]:
    c = Chain(seed(3))
    for _ in range(3):
        assert ledger.append(c.next().wire).status is Status.ACCEPTED
    return ledger, c


def test_truncated_and_random_bytes(seeded_ledger: tuple[Ledger, Chain]) -> None:
    led, c = seeded_ledger
    wire = c.next().wire
    for n in range(len(wire)):
        res = led.append(wire[:n])
        assert res.status is Status.REJECTED and res.reason == "malformed", n
    rnd = random.Random(7)
    for _ in range(300):
        res = led.append(rnd.randbytes(rnd.randrange(0, 400)))
        assert res.status is Status.REJECTED
    assert led.count() == 3


def test_every_flipped_bit_is_rejected(seeded_ledger: tuple[Ledger, Chain]) -> None:
    led, c = seeded_ledger
    wire = c.next().wire
    before = snapshot(led)
    reasons = set()
    for i in range(len(wire) * 8):
        bad = bytearray(wire)
        bad[i // 8] ^= 1 << (i % 8)
        res = led.append(bytes(bad))
        assert res.status is Status.REJECTED, (i, res)
        reasons.add(res.reason)
    assert snapshot(led) == before
    assert reasons <= {"malformed", "non_canonical", "bad_signature", "bad_version",
                       "unknown_kind", "bad_chain", "bad_schema", "oversized"}
    assert "bad_signature" in reasons


def test_non_canonical_encodings(seeded_ledger: tuple[Ledger, Chain]) -> None:
    led, c = seeded_ledger
    s = c.seed
    head = c.events[-1]
    body = {"note": "", "price": 5, "request": fake_id("r")}
    good = msgpack.packb(env(c, 4, head.id, body), use_bin_type=True)
    assert good == codec.pack(env(c, 4, head.id, body))
    # Unsorted body keys, signed correctly.
    unsorted = {"price": 5, "request": fake_id("r"), "note": ""}
    assert_rejected(led, raw_event(s, env(c, 4, head.id, unsorted))[2], "non_canonical")
    # Non-shortest int for seq (uint16 4), signed correctly.
    packed = good.replace(b"\x04\xc4\x20", b"\xcd\x00\x04\xc4\x20", 1)
    assert packed != good
    assert_rejected(led, raw_event(s, [], packed=packed)[2], "non_canonical")
    # kind as str8 instead of fixstr.
    packed = good.replace(b"\xa3bid", b"\xd9\x03bid", 1)
    assert_rejected(led, raw_event(s, [], packed=packed)[2], "non_canonical")
    # Outer array with a non-shortest bin header for the signature.
    signed, sig, _ = raw_event(s, [], packed=good)
    outer = b"\x92" + msgpack.packb(signed, use_bin_type=True) + b"\xc5\x00\x40" + sig
    assert_rejected(led, outer, "non_canonical")
    # Outer record with trailing bytes.
    assert_rejected(led, wire_of(signed, sig) + b"\x00", "malformed")
    # str where bin is expected (author as text): a different value, not canonical bytes.
    e = env(c, 4, head.id, body)
    e[1] = "x" * 32
    assert_rejected(led, raw_event(s, e)[2], "malformed")
    # request id as str instead of bin: schema catches it.
    e = env(c, 4, head.id, dict(body, request="r" * 32))
    assert_rejected(led, raw_event(s, e)[2], "bad_schema")
    # The correctly encoded event is still accepted afterwards.
    assert led.append(raw_event(s, [], packed=good)[2]).status is Status.ACCEPTED


def test_outer_record_shape(seeded_ledger: tuple[Ledger, Chain]) -> None:
    led, c = seeded_ledger
    ev = c.next()
    pack = codec.pack
    assert_rejected(led, pack([ev.signed]), "malformed")
    assert_rejected(led, pack([ev.signed, ev.sig, b""]), "malformed")
    assert_rejected(led, pack([ev.signed, ev.sig[:63]]), "malformed")
    assert_rejected(led, pack([ev.signed.hex(), ev.sig]), "malformed")
    assert_rejected(led, pack({"signed": ev.signed, "sig": ev.sig}), "malformed")
    assert_rejected(led, pack(ev.signed), "malformed")


def test_oversized(seeded_ledger: tuple[Ledger, Chain]) -> None:
    led, c = seeded_ledger
    head = c.events[-1]
    e = env(c, 4, head.id, {"request": fake_id("r"), "price": 5, "note": "x" * MAX_SIGNED})
    assert_rejected(led, raw_event(c.seed, e)[2], "oversized")
    assert_rejected(led, b"\x00" * 20_000, "oversized")
    # An envelope just over the limit inside a record that fits is rejected too.
    signed = codec.pack(env(c, 4, head.id, {"request": fake_id("r"), "price": 5,
                                            "note": "x" * (MAX_SIGNED - 90)}))
    assert len(signed) > MAX_SIGNED
    assert_rejected(led, raw_event(c.seed, [], packed=signed)[2], "oversized")


def test_unknown_kind_version_and_envelope_shape(seeded_ledger: tuple[Ledger, Chain]) -> None:
    led, c = seeded_ledger
    head = c.events[-1]
    body = {"note": "", "price": 5, "request": fake_id("r")}
    assert_rejected(led, raw_event(c.seed, env(c, 4, head.id, body, kind="bidx"))[2],
                    "unknown_kind")
    e = env(c, 4, head.id, body)
    e[0] = 2
    assert_rejected(led, raw_event(c.seed, e)[2], "bad_version")
    assert_rejected(led, raw_event(c.seed, e[:6])[2], "malformed")
    e = env(c, 4, head.id, body)
    e[2] = 0
    assert_rejected(led, raw_event(c.seed, e)[2], "malformed")
    e[2] = True
    assert_rejected(led, raw_event(c.seed, e)[2], "malformed")
    e = env(c, 4, head.id, body)
    e[4] = -1
    assert_rejected(led, raw_event(c.seed, e)[2], "malformed")
    e = env(c, 4, None, body)
    assert_rejected(led, raw_event(c.seed, e)[2], "bad_chain")
    e = env(c, 1, head.id, body)
    assert_rejected(led, raw_event(c.seed, e)[2], "bad_chain")
    e = env(c, 4, head.id, {"request": fake_id("r"), "price": 5, "note": "", "x": {b"k": 1}})
    assert_rejected(led, raw_event(c.seed, e)[2], "malformed")  # bytes map key


def test_wrong_signature_and_network(seeded_ledger: tuple[Ledger, Chain]) -> None:
    led, c = seeded_ledger
    ev = c.next()
    other = Chain(seed(4))
    assert_rejected(led, wire_of(ev.signed, other.next().sig), "bad_signature")
    assert_rejected(led, wire_of(ev.signed, bytes(64)), "bad_signature")
    # Signed by another key but claiming this author.
    _, sig, _ = raw_event(seed(4), [], packed=ev.signed)
    assert_rejected(led, wire_of(ev.signed, sig), "bad_signature")
    # Right key, another network's domain tag.
    _, sig, _ = raw_event(c.seed, [], NETWORK + "2", packed=ev.signed)
    assert_rejected(led, wire_of(ev.signed, sig), "bad_signature")
    assert led.append(ev.wire).status is Status.ACCEPTED


def test_bad_schema_is_rejected(seeded_ledger: tuple[Ledger, Chain]) -> None:
    led, c = seeded_ledger
    head = c.events[-1]
    e = env(c, 4, head.id, {"note": "", "price": -5, "request": fake_id("r")})
    assert_rejected(led, raw_event(c.seed, e)[2], "bad_schema")


def test_chain_rules(seeded_ledger: tuple[Ledger, Chain]) -> None:
    led, c = seeded_ledger
    head = c.events[-1]
    # prev does not match our seq 3
    assert_rejected(led, c.make(4, fake_id("x")).wire, "prev_mismatch")
    # timestamp earlier than seq 3's
    assert_rejected(led, c.make(4, head.id, ts_ms=head.ts_ms - 1).wire, "ts_regress")
    # equal timestamp is fine
    assert led.append(c.make(4, head.id, ts_ms=head.ts_ms).wire).status is Status.ACCEPTED


def test_replay_is_duplicate_even_with_another_signature(ledger: Ledger) -> None:
    c = Chain(seed(5))
    ev = c.next()
    assert ledger.append(ev.wire).status is Status.ACCEPTED
    before = snapshot(ledger)
    for _ in range(3):
        assert ledger.append(ev.wire).status is Status.DUPLICATE
    # Ed25519 signatures are deterministic here, but a signer may produce another valid
    # one for the same envelope: same id, so a duplicate, never a fork.
    assert ledger.fork_proofs() == []
    assert snapshot(ledger) == before


def test_a_stored_record_is_a_duplicate_without_decoding_again(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Chain(seed(5))
    evs = [c.next() for _ in range(3)]
    assert all(r.status is Status.ACCEPTED for r in ledger.append_many([e.wire for e in evs]))
    checked: list[bytes] = []
    real = ledger_append._decode_all

    def spy(wires: list[bytes], network: str) -> list[Event | AppendResult]:
        checked.extend(wires)
        return real(wires, network)

    monkeypatch.setattr(ledger_append, "_decode_all", spy)
    nxt = c.next()
    res = ledger.append_many([evs[0].wire, nxt.wire, evs[2].wire])
    assert [r.status for r in res] == [Status.DUPLICATE, Status.ACCEPTED, Status.DUPLICATE]
    assert [r.event_id for r in res] == [evs[0].id, nxt.id, evs[2].id]
    assert checked == [nxt.wire]  # only the new record was decoded and verified
    assert ledger.holds(evs[1].wire) and not ledger.holds(c.make(5, nxt.id).wire)


def test_the_writer_keeps_its_count(ledger: Ledger) -> None:
    def sql_count() -> int:
        return int(ledger.db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    a, b = Chain(seed(5)), Chain(seed(6))
    assert ledger.count() == 0
    evs = [a.next() for _ in range(4)]
    ledger.append_many([evs[0].wire, evs[0].wire, evs[2].wire, evs[3].wire])  # 2 pending
    assert ledger.count() == sql_count() == 1
    ledger.append_many([evs[1].wire, b.next().wire])  # fills the gap
    ledger.append(a.make(2, evs[0].id, Bid(request=fake_id("r"), price=99)).wire)  # a fork
    ledger.publish(Identity.from_seed(seed(7)), Offer(services=(), currency="EUR", addrs=()),
                   1_700_000_000_000)
    assert ledger.count() == sql_count() == 6


def test_same_envelope_with_a_bad_signature_is_rejected_not_a_duplicate(
        ledger: Ledger) -> None:
    # Byte-identical records skip the signature check; one that differs in its
    # signature only must still be checked, or we would relay it (and be faulted by
    # every peer that checks it) as a duplicate.
    c = Chain(seed(5))
    ev = c.next()
    assert ledger.append(ev.wire).status is Status.ACCEPTED
    bad = wire_of(ev.signed, bytes(64))
    assert not ledger.holds(bad)
    res = ledger.append(bad)
    assert res.status is Status.REJECTED and res.reason == "bad_signature"


@pytest.mark.parametrize("seq", [1, 127, 128, 255, 256, 65_535, 65_536, 2**32, MAX_SEQ])
def test_peek_chain_position_reads_author_and_seq(seq: int) -> None:
    c = Chain(seed(9))
    ev = c.make(seq, None if seq == 1 else fake_id("prev"), ts_ms=1_700_000_000_000)
    assert peek_chain_position(ev.wire) == (ev.author, seq, ev.signed)
    for junk in (b"", ev.wire[:40], b"\x92" + ev.wire[1:30], ev.signed, 12345):
        assert peek_chain_position(junk) is None  # type: ignore[arg-type]
    # Another shape (bin16 header for a short envelope): no hint, full decode decides.
    odd = b"\x92\xc5" + len(ev.signed).to_bytes(2, "big") + ev.signed + ev.wire[-66:]
    assert peek_chain_position(odd) is None


# ---------------------------------------------------------------- pending and forks


def test_gap_pending_then_accepted(ledger: Ledger) -> None:
    c = Chain(seed(6))
    evs = [c.next() for _ in range(5)]
    for ev in reversed(evs[1:]):
        res = ledger.append(ev.wire)
        assert res.status is Status.PENDING
    assert ledger.count() == 0 and ledger.pending_count == 4
    assert ledger.gaps() == [(c.public, 1, 1)]
    assert ledger.append(evs[3].wire).status is Status.PENDING  # already buffered
    res = ledger.append(evs[0].wire)
    assert res.status is Status.ACCEPTED
    assert res.accepted == tuple(evs)
    assert ledger.count() == 5 and ledger.pending_count == 0 and ledger.gaps() == []
    assert ledger.verify_all() == []


def test_pending_successor_that_does_not_chain_is_discarded(ledger: Ledger) -> None:
    c = Chain(seed(7))
    e1 = c.next()
    bad2 = c.make(2, fake_id("elsewhere"))
    assert ledger.append(bad2.wire).status is Status.PENDING
    res = ledger.append(e1.wire)
    assert res.accepted == (e1,)
    assert ledger.pending_count == 0 and ledger.count() == 1
    assert ledger.counters["pending_discarded"] == 1


def test_pending_bounds(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.db", network=NETWORK, pending_per_author=3, pending_total=5)
    a, b = Chain(seed(8)), Chain(seed(9))
    a_evs = [a.next() for _ in range(6)]
    b_evs = [b.next() for _ in range(6)]
    got = [led.append(e.wire) for e in a_evs[1:]]
    assert [r.status for r in got] == [Status.PENDING] * 3 + [Status.REJECTED] * 2
    assert got[-1].reason == "pending_full" and not got[-1].peer_fault and not got[-1].ok
    got = [led.append(e.wire) for e in b_evs[1:]]
    assert [r.status for r in got] == [Status.PENDING] * 2 + [Status.REJECTED] * 3
    assert led.pending_count == 5
    # Filling a's gap frees its slots; the rejected ones can be fetched again.
    assert len(led.append(a_evs[0].wire).accepted) == 4
    assert led.pending_count == 2
    assert [r.status for r in led.append_many([e.wire for e in a_evs[4:]])] == [
        Status.ACCEPTED, Status.ACCEPTED]
    led.close()


def test_fork_proof_and_exclusion(ledger: Ledger) -> None:
    c = Chain(seed(10))
    other = Chain(seed(11))
    evs = [c.next() for _ in range(4)]
    o = other.next()
    ledger.append_many([e.wire for e in evs] + [o.wire])
    alt = c.make(3, evs[1].id, Bid(request=fake_id("alt"), price=1))
    before_ids = sorted(ledger.iter_wires())
    res = ledger.append(alt.wire)
    assert res.status is Status.FORK and res.event_id == alt.id and not res.peer_fault
    assert sorted(ledger.iter_wires()) == before_ids  # the other branch is not stored
    assert ledger.forked() == {c.public: 3}
    [proof] = ledger.fork_proofs()
    assert (proof.author, proof.seq, proof.wire_a, proof.wire_b) == (c.public, 3, evs[2].wire,
                                                                     alt.wire)
    canon = sorted([evs[0], o, evs[1]], key=lambda e: (e.ts_ms, e.author, e.seq))
    assert list(ledger.iter_canonical()) == canon
    assert len(list(ledger.iter_canonical(include_forked=True))) == 5
    assert ledger.sync_heads()[c.public] == (2, evs[1].id)
    # A second report of the same fork changes nothing.
    d = ledger.digest()
    assert ledger.append(alt.wire).status is Status.FORK
    assert len(ledger.fork_proofs()) == 1 and ledger.digest() == d
    # A different event at an old seq that does not chain is not a fork.
    assert_rejected(ledger, c.make(2, fake_id("nowhere")).wire, "prev_mismatch")
    # The chain continues to be stored (sync needs it) but does not count.
    assert ledger.append(c.next().wire).status is Status.ACCEPTED
    assert len(list(ledger.iter_canonical())) == 3


def test_fork_inside_one_batch_and_in_pending(ledger: Ledger) -> None:
    c = Chain(seed(12))
    e1 = c.next()
    a2, b2 = c.make(2, e1.id), c.make(2, e1.id, Bid(request=fake_id("b"), price=9))
    res = ledger.append_many([a2.wire, b2.wire, e1.wire])
    assert [r.status for r in res] == [Status.PENDING, Status.PENDING, Status.ACCEPTED]
    assert res[2].accepted == (e1, a2)
    assert ledger.forked() == {c.public: 2}
    d = Chain(seed(13))
    f1 = d.next()
    res = ledger.append_many([f1.wire, d.make(2, f1.id).wire,
                              d.make(2, f1.id, Bid(request=fake_id("b"), price=9)).wire])
    assert [r.status for r in res] == [Status.ACCEPTED, Status.ACCEPTED, Status.FORK]
    assert ledger.forked()[d.public] == 2


def test_add_fork_proof(ledger: Ledger, tmp_path: Path) -> None:
    c = Chain(seed(14))
    e1 = c.next()
    a2 = c.make(2, e1.id)
    b2 = c.make(2, e1.id, Bid(request=fake_id("b"), price=9))
    assert not ledger.add_fork_proof(a2.wire, a2.wire)
    assert not ledger.add_fork_proof(a2.wire, c.make(2, fake_id("x")).wire)  # prevs differ
    assert not ledger.add_fork_proof(a2.wire, b"junk")
    assert ledger.add_fork_proof(a2.wire, b2.wire)
    assert not ledger.add_fork_proof(b2.wire, a2.wire)  # not new
    assert ledger.forked() == {c.public: 2}
    # A node that finds the fork itself reaches the same digest.
    with Ledger(tmp_path / "other.db", network=NETWORK) as other:
        other.append_many([e1.wire, b2.wire, a2.wire])
        ledger.append(e1.wire)
        assert other.digest() == ledger.digest()


# ---------------------------------------------------------------- convergence


def _event_pool() -> list[Event]:
    """Three authors' chains; one forks at seq 2 (both branches continue), one at its
    last seq, one has an extra non-chaining event."""
    out: list[Event] = []
    a = Chain(seed(20))
    a_evs = [a.next() for _ in range(4)]
    a2 = a.make(2, a_evs[0].id, Bid(request=fake_id("fork"), price=1))
    a3 = a.make(3, a2.id, Bid(request=fake_id("fork"), price=2))
    out += [*a_evs, a2, a3]
    b = Chain(seed(21))
    b_evs = [b.next() for _ in range(3)]
    b3 = b.make(3, b_evs[1].id, Bid(request=fake_id("fork"), price=3))
    out += [*b_evs, b3]
    c = Chain(seed(22))
    c_evs = [c.next(Offer(services=(), currency="EUR", addrs=())) for _ in range(3)]
    out += [*c_evs, c.make(2, fake_id("garbage")), c.make(3, c_evs[1].id, ts_ms=0)]
    return out


POOL = _event_pool()


def _reference() -> tuple[bytes, list[bytes], dict[bytes, int]]:
    led = Ledger(":memory:", network=NETWORK)
    led.append_many([e.wire for e in POOL])
    return _outcome(led)


def _outcome(led: Ledger) -> tuple[bytes, list[bytes], dict[bytes, int]]:
    return led.digest(), sorted(e.id for e in led.iter_canonical()), led.forked()


REFERENCE = _reference()


def test_reference_outcome() -> None:
    _, ids, forks = REFERENCE
    assert len(ids) == 1 + 2 + 3 and len(forks) == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_order_any_batching_converges(data: st.DataObject) -> None:
    idx = data.draw(st.permutations(range(len(POOL))))
    dups = data.draw(st.lists(st.sampled_from(range(len(POOL))), max_size=8))
    order = list(idx)
    for d in dups:
        order.insert(data.draw(st.integers(0, len(order))), d)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(order) - 1), max_size=6)))
    led = Ledger(":memory:", network=NETWORK)
    bounds = [0, *cuts, len(order)]
    for lo, hi in itertools.pairwise(bounds):
        for res in led.append_many([POOL[i].wire for i in order[lo:hi]]):
            assert res.status is not Status.REJECTED or res.reason in {
                "prev_mismatch", "ts_regress"}
    assert _outcome(led) == REFERENCE
    assert led.verify_all() == []
    led.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    led = Ledger(":memory:", network=NETWORK)
    res = led.append(data)
    assert res.status is Status.REJECTED and res.reason
    assert led.count() == 0
    led.close()


msgvalue = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 64), (1 << 64) - 1) | st.text(max_size=6)
    | st.binary(max_size=40) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=7)
    | st.dictionaries(st.text(max_size=5) | st.binary(max_size=3) | st.integers(0, 3),
                      inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(msgvalue, st.booleans())
def test_arbitrary_signed_envelopes_never_raise(value: object, wrap: bool) -> None:
    """Any msgpack value, correctly signed, as an envelope or in an envelope's body."""
    led = Ledger(":memory:", network=NETWORK)
    c = Chain(seed(30))
    e = [1, c.public, 1, None, 5, "bid", value] if wrap else value
    try:
        packed = msgpack.packb(e, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return
    res = led.append(raw_event(c.seed, [], packed=packed)[2])
    assert res.status is Status.REJECTED and res.reason
    led.close()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_records_never_raise(data: st.DataObject) -> None:
    ev = POOL[data.draw(st.integers(0, len(POOL) - 1))]
    wire = bytearray(ev.wire)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        i = data.draw(st.integers(0, len(wire) - 1))
        if op == "set":
            wire[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            wire.insert(i, data.draw(st.integers(0, 255)))
        elif len(wire) > 1:
            del wire[i]
    led = Ledger(":memory:", network=NETWORK)
    res = led.append(bytes(wire))
    if bytes(wire) != ev.wire:
        assert res.status in (Status.REJECTED, Status.PENDING, Status.ACCEPTED)
        if res.status is not Status.REJECTED:
            # Only possible if the mutation left an equivalent, validly signed record.
            assert decode_wire(bytes(wire), NETWORK).id == ev.id
    led.close()


# ---------------------------------------------------------------- export stream


def test_read_stream(ledger: Ledger) -> None:
    c = Chain(seed(31))
    wires = [c.next().wire for _ in range(3)]
    data = b"".join(wires)
    assert list(read_stream(data)) == wires
    out = list(read_stream(data + b"\x07" + wires[0]))
    assert out[:3] == wires and isinstance(out[3], Exception) and out[4] == wires[0]
    out = list(read_stream(data[:-5]))
    assert out[:2] == wires[:2]
    assert isinstance(out[2], Exception) and out[2].reason == "truncated"
    assert list(read_stream(b"")) == []


# ---------------------------------------------------------------- durability


CHILD = r"""
import sys
from node.ledger import Ledger, Status
from testkit import NETWORK, Chain, seed

led = Ledger(sys.argv[1], network=NETWORK)
c = Chain(seed(40))
i = 0
while True:
    batch = [c.next().wire for _ in range(1 + i % 5)]
    for res in led.append_many(batch):
        assert res.status is Status.ACCEPTED, res
        print(res.event_id.hex(), flush=True)
    i += 1
"""


def test_accepted_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ,  # the child imports testkit
                                           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    assert proc.stdout is not None
    ids: list[str] = []
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    try:
        while len(ids) < 400:
            assert time.monotonic() < deadline, "child too slow"
            assert proc.poll() is None, "child died"
            if sel.select(timeout=1.0):
                chunk = os.read(proc.stdout.fileno(), 65536)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                ids += [ln.decode() for ln in lines]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # Whatever was printed before the kill and is still in the pipe counts too.
        rest = proc.stdout.read()
        ids += [ln.decode() for ln in (buf + rest).split(b"\n")[:-1]]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        sel.close()
    assert proc.returncode == -signal.SIGKILL
    with Ledger(path, network=NETWORK) as led:
        for id_ in ids:
            assert led.has(bytes.fromhex(id_)), id_
        assert led.count() >= len(ids)
        assert led.verify_all() == []
        assert led.head(Chain(seed(40)).public) is not None


def test_readonly_handle_sees_writer(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    c = Chain(seed(41))
    with Ledger(path, network=NETWORK) as w:
        w.append_many([c.next().wire for _ in range(3)])
        ro = Ledger(path, network=NETWORK, readonly=True)
        assert ro.count() == 3 and ro.digest() == w.digest()
        w.append_many([c.next().wire for _ in range(2)])
        assert ro.count() == 5
        ro.refresh()
        assert ro.digest() == w.digest() and ro.head(c.public).seq == 5  # type: ignore[union-attr]
        with pytest.raises(UsageError):
            ro.append(c.next().wire)
        ro.close()
    with pytest.raises(UsageError, match="not 'other'"):
        Ledger(path, network="other", readonly=True)
    with pytest.raises(UsageError, match="no ledger"):
        Ledger(tmp_path / "missing.db", network=NETWORK, readonly=True)


def test_verify_all_reports_a_damaged_record_once(ledger: Ledger) -> None:
    c = Chain(seed(43))
    evs = [c.next() for _ in range(4)]
    ledger.append_many([e.wire for e in evs])
    w = bytearray(evs[1].wire)
    w[-1] ^= 1
    ledger.db.execute("UPDATE events SET wire=? WHERE id=?", (bytes(w), evs[1].id))
    assert [(id_, why.split(":")[0]) for id_, why in ledger.verify_all()] == [
        (evs[1].id, "bad_signature")]
    ledger.db.execute("UPDATE events SET wire=? WHERE id=?", (evs[3].wire, evs[2].id))
    assert {id_ for id_, _ in ledger.verify_all()} == {evs[1].id, evs[2].id}


def test_readonly_path_with_uri_characters(tmp_path: Path) -> None:
    path = tmp_path / "we?ird #dir%20" / "ledger.db"
    with Ledger(path, network=NETWORK) as w:
        w.append(Chain(seed(42)).next().wire)
    with Ledger(path, network=NETWORK, readonly=True) as ro:
        assert ro.count() == 1


def test_ids_with_prefix_and_lookups_use_the_id_key(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db", network=NETWORK) as led:
        ids = [led.publish(Identity.from_seed(seed(i)), sample_bodies()["offer"], 1000 + i).id
               for i in range(40)]
        for i in ids:
            assert led.has(i) and led.get_wire(i) is not None
            for n in (1, 3, 8, 9, 32):
                got = led.ids_with_prefix(i[:n], limit=100)
                assert i in got and all(g.startswith(i[:n]) for g in got)
                assert got == sorted(x for x in ids if x.startswith(i[:n]))
        assert not led.has(bytes(32)) and led.ids_with_prefix(b"\x00" * 9) == []
        assert len(led.ids_with_prefix(b"", limit=5)) == 5


def test_a_ledger_without_the_id_key_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events(n INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE)")
    db.commit()
    db.close()
    with pytest.raises(UsageError, match="older bidmesh"):
        Ledger(path, network=NETWORK)
