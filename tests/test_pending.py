"""The pending buffer (issue 12 item 3): events whose predecessor is missing are
charged to the peer that sent them, bounded per peer and in total (events, bytes),
and expire. Pure: a real SQLite ledger in a temp dir, a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from testkit import NETWORK, Chain, seed

from node.ledger import HELD_OVERHEAD, Ledger, PendingLimits, Status


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def orphans(tag: int, n: int) -> tuple[Chain, list[bytes]]:
    """`n` events of one author from seq 2 on: all wait for seq 1."""
    c = Chain(seed(tag))
    evs = [c.next() for _ in range(n + 1)]
    return c, [e.wire for e in evs[1:]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(tmp_path: Path, clock: Clock, **kw: float) -> Ledger:
    lim = PendingLimits(**kw)  # type: ignore[arg-type]
    return Ledger(tmp_path / "l.db", network=NETWORK, pending=lim, clock=clock)


@pytest.fixture
def small(tmp_path: Path, clock: Clock) -> Iterator[Ledger]:
    led = make(tmp_path, clock, peer_events=4, total=8, ttl_s=60.0)
    yield led
    led.close()


def test_charged_per_source_and_other_sources_keep_room(small: Ledger) -> None:
    _, flood = orphans(1, 6)
    got = small.append_many(flood, source="attacker", blame=True)
    assert [r.status for r in got] == [Status.PENDING] * 4 + [Status.REJECTED] * 2
    assert got[-1].reason == "pending_full" and not got[-1].peer_fault
    c, honest = orphans(2, 2)
    assert [r.status for r in small.append_many(honest, source="honest")] == [
        Status.PENDING] * 2
    [gap_a, gap_b] = sorted(small.pending_gaps(), key=lambda g: g.sources)
    assert gap_a.sources == ("attacker",) and gap_b.sources == ("honest",)
    assert (gap_b.author, gap_b.first, gap_b.last) == (c.public, 1, 1)
    # The honest gap fills: both waiting events are stored.
    assert len(small.append(c.events[0].wire).accepted) == 3
    assert small.pending_status()["sources"] == 1


def test_full_buffer_evicts_the_biggest_holder_not_the_newcomer(small: Ledger) -> None:
    for i, src in enumerate(("a", "b")):
        _, w = orphans(10 + i, 4)
        small.append_many(w, source=src)
    assert small.pending_count == 8  # full
    _, w = orphans(20, 1)
    assert small.append_many(w, source="c")[0].status is Status.PENDING
    assert small.pending_count == 8 and small.pending_status()["evicted"] == 1
    # A holder cannot evict others to grow past them: "a" (now biggest at 4, "b" 3)
    # is refused rather than evicting "b".
    _, w = orphans(21, 1)
    assert small.append_many(w, source="a")[0].reason == "pending_full"


def test_bytes_bounded_per_source_and_in_total(tmp_path: Path, clock: Clock) -> None:
    _, w = orphans(30, 40)
    size = len(w[0]) + HELD_OVERHEAD
    led = make(tmp_path, clock, peer_bytes=10 * size + size // 2, total_bytes=25 * size)
    got = led.append_many(w, source="big")
    assert sum(r.status is Status.PENDING for r in got) == 10
    for src in ("x", "y"):
        _, w2 = orphans(31 if src == "x" else 32, 10)
        led.append_many(w2, source=src)
    st = led.pending_status()
    assert isinstance(st["bytes"], int) and st["bytes"] <= 25 * size + size
    led.close()


def test_entries_expire_and_report_their_source(small: Ledger, clock: Clock) -> None:
    _, w = orphans(40, 3)
    small.append_many(w[:2], source="p", blame=True)
    clock.t += 30
    small.append_many(w[2:], source="relay", blame=False)
    clock.t += 31  # the first two are 61 s old, the last 31 s
    expired = small.expire_pending()
    assert expired == {("p", True): 2}
    assert small.pending_count == 1 and small.counters["pending_expired"] == 2
    clock.t += 30
    assert small.expire_pending() == {("relay", False): 1}
    assert small.gaps() == [] and small.pending_status()["sources"] == 0
    # Expired events can come again (another peer, or the gap filled by then).
    assert small.append_many([w[0]], source="q")[0].status is Status.PENDING


def test_rollback_puts_popped_events_back_with_their_source(small: Ledger) -> None:
    c, w = orphans(50, 2)
    small.append_many(w, source="s")
    small.db.execute("CREATE TRIGGER nope BEFORE INSERT ON events BEGIN "
                     "SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(Exception, match="disk says no"):
        small.append(c.events[0].wire)
    small.db.execute("DROP TRIGGER nope")
    assert small.pending_count == 2 and [g.sources for g in small.pending_gaps()] == [("s",)]
    assert len(small.append(c.events[0].wire).accepted) == 3


def summary_from_scratch(led: Ledger) -> dict[bytes, tuple[int, int, set[object]]]:
    """What `pending_gaps` must say, computed from the whole buffer."""
    out = {}
    for author, slot in led._pending.by_author.items():
        head = led.head(author)
        have = head.seq if head else 0
        held = [h for cands in slot.values() for h in cands.values()]
        out[author] = (have + 1, min(slot) - 1, {h.source for h in held})
    return out


def test_gap_summary_follows_every_change_of_the_buffer(tmp_path: Path, clock: Clock) -> None:
    """`pending_gaps` summarizes only the authors that changed (issue 12: under a gap
    storm the whole buffer took 0.3 s of the loop per round): after every kind of
    change (held, filled in part and in full, evicted, expired, rolled back) it
    equals the summary made from scratch, also when summarized in small slices."""
    import random

    led = make(tmp_path, clock, peer_events=12, total=30, ttl_s=60.0)
    rng = random.Random(7)
    chains = [Chain(seed(300 + i)) for i in range(6)]
    for c in chains:
        for _ in range(8):
            c.next()
    stored = [0] * len(chains)
    for step in range(200):
        i = rng.randrange(len(chains))
        c, op = chains[i], rng.random()
        if op < 0.55:  # an out-of-order event from one of three sources
            seq = rng.randrange(stored[i] + 2, 9) if stored[i] + 2 < 9 else 8
            led.append_many([c.events[seq - 1].wire], source=rng.choice("abc"))
        elif op < 0.8 and stored[i] < 8:  # the next event: fills (part of) the gap
            led.append(c.events[stored[i]].wire)
        elif op < 0.9:
            clock.t += rng.choice((1.0, 20.0, 45.0))
            led.expire_pending()
        elif stored[i] < 8:  # a failed store puts what it popped back
            led.db.execute("CREATE TRIGGER nope BEFORE INSERT ON events BEGIN "
                           "SELECT RAISE(ABORT, 'disk says no'); END")
            with pytest.raises(Exception, match="disk says no"):
                led.append(c.events[stored[i]].wire)
            led.db.execute("DROP TRIGGER nope")
        stored = [(led.head(c.public).seq if led.head(c.public) else 0)  # type: ignore[union-attr]
                  for c in chains]
        if step % 3 == 0:
            while led.summarize_gaps(2):
                pass
        got = {g.author: (g.first, g.last, set(g.sources)) for g in led.pending_gaps()}
        assert got == summary_from_scratch(led), f"step {step}"
        assert led.gap_count == len(got)
        assert led.gaps() == [(g.author, g.first, g.last) for g in led.pending_gaps()]
    assert led.counters["pending_expired"] > 0 and led.count() > 0
    led.close()


def test_gap_summary_in_slices_keeps_arrival_order(small: Ledger) -> None:
    authors = []
    for i in range(4):
        c, w = orphans(400 + i, 1)
        small.append_many(w, source="s")
        authors.append(c.public)
    assert small.summarize_gaps(3) is True  # one author left to summarize
    assert [g.author for g in small.pending_gaps()] == authors
    assert small.summarize_gaps(3) is False


def test_expiry_sweeps_in_slices(tmp_path: Path, clock: Clock) -> None:
    """The event loop expires a full buffer in slices (node/gossip.py): `limit` caps
    one call, and calls until fewer come back sweep everything, sources and all."""
    led = make(tmp_path, clock, peer_events=100, total=100)
    for i, src in enumerate("abc"):
        _, w = orphans(500 + i, 7)
        led.append_many(w, source=src, blame=src == "a")
    clock.t += 61
    sizes = []
    while True:
        part = led.expire_pending(5)
        sizes.append(sum(part.values()))
        if sizes[-1] < 5:
            break
    assert sizes == [5, 5, 5, 5, 1] and led.pending_count == 0 and led.gaps() == []
    assert led.counters["pending_expired"] == 21 and led.pending_status()["sources"] == 0
    led.close()


def test_bounded_drain_leaves_the_rest_ready_for_drain_ready(tmp_path: Path,
                                                             clock: Clock) -> None:
    """Issue 12: a filled gap can release a long chain; with `drain_limit` one append
    stores at most that many waiting events, and `drain_ready` stores the rest in
    slices, each event with the source it was charged to. A ready author is no gap."""
    led = make(tmp_path, clock, peer_events=100, total=100)
    woken = []
    led.on_ready = lambda: woken.append(led.ready_count)
    led.drain_limit = 3
    c = Chain(seed(600))
    evs = [c.next() for _ in range(10)]
    led.append_many([e.wire for e in evs[1:5]], source="p")
    led.append_many([e.wire for e in evs[5:]], source=("submit", b"k"))
    res = led.append(evs[0].wire)
    assert [e.seq for e in res.accepted] == [1, 2, 3, 4]
    assert woken == [1] and led.ready_count == 1 and led.gaps() == []
    assert led.head(c.public).seq == 4  # type: ignore[union-attr]
    got = led.drain_ready(2)
    assert [(e.seq, src) for e, src in got] == [(5, "p"), (6, ("submit", b"k"))]
    assert led.ready_count == 1 and woken == [1, 1]
    got = led.drain_ready(100)
    assert [e.seq for e, _ in got] == [7, 8, 9, 10] and led.ready_count == 0
    assert led.count() == 10 and led.pending_count == 0 and led.drain_ready(5) == []
    led.close()


def test_bounded_drain_keeps_gaps_forks_and_rollback_right(tmp_path: Path,
                                                          clock: Clock) -> None:
    led = make(tmp_path, clock, peer_events=100, total=100)
    led.drain_limit = 1
    c = Chain(seed(601))
    evs = [c.next() for _ in range(6)]
    other4 = c.make(4, evs[2].id, ts_ms=evs[2].ts_ms + 7)  # a second event at seq 4
    led.append_many([evs[2].wire, evs[3].wire, evs[5].wire], source="p")  # 3, 4, 6
    assert led.gaps() == [(c.public, 1, 2)]
    # 2 completes the chain to 4: one waiting event (3) is stored, 4 is ready.
    assert [e.seq for e in led.append_many([evs[0].wire, evs[1].wire])[1].accepted] == [2, 3]
    assert led.ready_count == 1 and led.gaps() == []  # 4 waits only for drain_ready
    # Another event at the ready seq arrives: stored, and the held one is a fork proof.
    assert led.append(other4.wire).status is Status.ACCEPTED
    assert led.forked() == {c.public: 4}
    # A failed drain puts everything back, ready included.
    led2 = make(tmp_path / "b", clock, peer_events=100, total=100)
    led2.drain_limit = 1
    led2.append_many([e.wire for e in evs[2:5]], source="p")
    led2.append_many([evs[0].wire, evs[1].wire])
    led2.db.execute("CREATE TRIGGER nope BEFORE INSERT ON events BEGIN "
                    "SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(Exception, match="disk says no"):
        led2.drain_ready(10)
    led2.db.execute("DROP TRIGGER nope")
    assert led2.ready_count == 1 and led2.pending_count == 2
    assert [e.seq for e, _ in led2.drain_ready(10)] == [4, 5] and led2.count() == 5
    led.close()
    led2.close()
