"""Anti-entropy sync: message codecs, the session state machine, and convergence on a
seeded fake network (drops, duplicates, delays) on trio's virtual clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import FakeNetRunner
from fakenet import NET, body

from node import codec, sync
from node.errors import InvalidMessage
from node.events import decode_wire, sign_event
from node.keys import Identity
from node.ledger import Ledger
from node.sync import (
    DigestRequest,
    DigestResponse,
    ErrorResponse,
    ForksRequest,
    ForksResponse,
    HeadEntry,
    HeadsRequest,
    HeadsResponse,
    RangeRequest,
    RangeResponse,
)
from node.sync_session import SyncLimits, SyncSession, drive

A32 = bytes(range(32))


# ------------------------------------------------------------------ codecs


MESSAGES = [
    DigestRequest(),
    DigestResponse(bytes(32), 3, 1),
    HeadsRequest(None, 10),
    HeadsRequest(A32, 1024),
    HeadsResponse((HeadEntry(A32, 3, bytes(32), None), HeadEntry(bytes([99] * 32), 0, None, 1)),
                  True),
    RangeRequest(A32, 1, 256, 1000),
    RangeResponse((b"\x92\xc4\x01a\xc4\x01b",), False),
    ForksRequest(A32),
    ForksResponse(((b"x", b"y"),)),
    ErrorResponse("malformed", "what was wrong"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg: sync.Message) -> None:
    data = msg.encode()
    if isinstance(msg, (DigestRequest, HeadsRequest, RangeRequest, ForksRequest)):
        assert sync.decode_request(data) == msg
    else:
        assert sync.decode_response(data) == msg


@pytest.mark.parametrize(
    "value",
    [
        [],
        "x",
        [9],
        [1, 2],
        [2, b"short", 10],
        [2, None, 0],
        [2, None, sync.HEADS_PAGE_MAX + 1],
        [3, A32, 0, 1, 1],
        [3, A32, 1, sync.RANGE_LIMIT_MAX + 1, 1],
        [3, A32, 1, 1, sync.RANGE_BYTES_MAX + 1],
        [3, A32, 1, 1],
        [4, b"x"],
        [3, A32, True, 1, 1],
    ],
)
def test_bad_requests_rejected(value: object) -> None:
    with pytest.raises(InvalidMessage):
        sync.decode_request(codec.pack(value))


def test_oversized_and_garbage_rejected() -> None:
    with pytest.raises(InvalidMessage) as e:
        sync.decode_request(b"\x91\x01" + b"\x00" * sync.MAX_REQUEST)
    assert e.value.reason == "oversized"
    with pytest.raises(InvalidMessage):
        sync.decode_request(b"\xc1\xff\xfe")
    with pytest.raises(InvalidMessage):
        sync.decode_response(b"\x92\x02" + b"\x00" * sync.MAX_RESPONSE)
    # Unsorted heads, a non-nil id at seq 0, a fork seq that disagrees with the head.
    for heads in (
        [[bytes([2] * 32), 1, A32, None], [bytes([1] * 32), 1, A32, None]],
        [[A32, 0, A32, None]],
        [[A32, 5, A32, 3]],
    ):
        with pytest.raises(InvalidMessage):
            sync.decode_response(codec.pack([2, heads, False]))
    with pytest.raises(InvalidMessage):
        sync.decode_response(codec.pack([3, [b""], False]))
    with pytest.raises(InvalidMessage):
        sync.decode_response(codec.pack([4, [[b"a"]] * 2]))


def test_errors_name_the_field() -> None:
    """A rejection says which field of which message was wrong (the declared schema)."""
    with pytest.raises(InvalidMessage, match=r"sync\.HeadsRequest\.limit") as e:
        sync.decode_request(codec.pack([2, None, 0]))
    assert e.value.reason == "malformed"
    bad_entry = [[A32, 1, b"short", None]]
    with pytest.raises(InvalidMessage, match=r"HeadsResponse\.heads\[0\]\.id"):
        sync.decode_response(codec.pack([2, bad_entry, False]))
    with pytest.raises(InvalidMessage, match=r"ForksResponse\.proofs\[0\]"):
        sync.decode_response(codec.pack([4, [[b"a", b"b", b"c"]]]))
    with pytest.raises(InvalidMessage, match="takes 2 fields, got 3"):
        sync.decode_request(codec.pack([2, None, 1, 1]))
    with pytest.raises(InvalidMessage, match=r"HeadEntry\.id"):  # built in Python, same rules
        HeadEntry(A32, 0, A32, None)


def test_handle_answers_errors(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.db", network=NET)
    resp = sync.decode_response(sync.handle(led, b"\x91\x07"))
    assert isinstance(resp, ErrorResponse) and resp.code == "unknown_request"


# ------------------------------------------------------------------ sessions


def ledger(tmp_path: Path, name: str) -> Ledger:
    return Ledger(tmp_path / f"{name}.db", network=NET)


def run_session(local: Ledger, remote: Ledger, limits: SyncLimits | None = None,
                **kw: object) -> SyncSession:
    s = SyncSession(local, limits, **kw)  # type: ignore[arg-type]
    while (req := s.next_request()) is not None:
        s.on_response(sync.decode_response(sync.handle(remote, req.encode())))
    return s


def test_periodic_session_leaves_live_authors_to_gossip(tmp_path: Path) -> None:
    """An author whose newest event we hold is young is left to gossip; one we have
    heard nothing recent from (a lost tail) and one we lack entirely are fetched."""
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    live, quiet, unknown = Identity.generate(), Identity.generate(), Identity.generate()
    for i in range(10):
        ev = b.publish(live, body(i), 50_000 + i)
        if i < 5:
            a.append(ev.wire)
        ev = b.publish(quiet, body(i), 1_000 + i)
        if i < 5:
            a.append(ev.wire)
        b.publish(unknown, body(i), 1_000 + i)
    s = run_session(a, b, live_after_ms=40_000)
    assert s.stats.skipped_live == 1
    assert a.head(live.public).seq == 5  # type: ignore[union-attr]
    assert a.head(quiet.public).seq == 10  # type: ignore[union-attr]
    assert a.head(unknown.public).seq == 10  # type: ignore[union-attr]
    s = run_session(a, b)  # without it (on connect, gaps): everything
    assert s.stats.skipped_live == 0 and a.digest() == b.digest()


def test_session_pages_heads_and_ranges(tmp_path: Path) -> None:
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    for i in range(300):
        a.publish(Identity.generate(), body(i), 1000)
    long = Identity.generate()
    for i in range(700):
        a.publish(long, body(i), 1000 + i)
    s = run_session(b, a, SyncLimits(heads_page=64, range_limit=50, range_bytes=4000))
    assert s.failed is None
    assert b.digest() == a.digest() and b.count() == 1000
    assert s.stats.accepted == 1000 and len(s.accepted) == 1000
    # Already in sync: one DIGEST request and done.
    s2 = run_session(b, a)
    assert s2.in_sync and s2.stats.requests == 1


def test_gap_session_fetches_only_the_gap(tmp_path: Path) -> None:
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    me = Identity.generate()
    evs = [a.publish(me, body(i), 1000 + i) for i in range(20)]
    b.append_many([evs[0].wire, evs[19].wire])  # 19 waits for 2..18
    assert b.gaps() == [(me.public, 2, 19)]
    s = run_session(b, a, gaps=b.gaps())
    assert s.failed is None and b.gaps() == [] and b.head(me.public).seq == 20  # type: ignore[union-attr]
    assert b.digest() == a.digest()


def fork_pair(ident: Identity, seq_prev: tuple[int, bytes | None], ts: int) -> tuple[bytes, bytes]:
    seq, prev = seq_prev
    x = sign_event(ident.seed, seq, prev, ts, body(-1), NET)
    y = sign_event(ident.seed, seq, prev, ts, body(-2), NET)
    return x.wire, y.wire


def test_session_detects_and_spreads_forks(tmp_path: Path) -> None:
    a, b, c = ledger(tmp_path, "a"), ledger(tmp_path, "b"), ledger(tmp_path, "c")
    liar = Identity.generate()
    first = a.publish(liar, body(0), 1000)
    b.append(first.wire)
    c.append(first.wire)
    x, y = fork_pair(liar, (2, first.id), 1001)
    a.append(x)
    b.append(y)
    # Same height, different ids: the probe fetch records the fork proof.
    s = run_session(a, b)
    assert s.failed is None and a.forked() == {liar.public: 2}
    # c learns the fork from a via FORKS, b from c.
    run_session(c, a)
    run_session(b, c)
    assert a.forked() == b.forked() == c.forked() == {liar.public: 2}
    assert a.digest() == b.digest() == c.digest()


def test_branch_longer_than_ours_is_a_fork_not_a_fault(tmp_path: Path) -> None:
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    liar = Identity.generate()
    first = a.publish(liar, body(0), 1000)
    b.append(first.wire)
    x, y = fork_pair(liar, (2, first.id), 1001)
    a.append(x)
    b.append(y)
    ey = decode_wire(y, NET)
    for i in range(5):  # b's branch continues
        ev = sign_event(liar.seed, 3 + i, ey.id, 1002 + i, body(i), NET)
        b.append(ev.wire)
        ey = ev
    s = run_session(a, b)
    assert s.failed is None and not s.stats.faults and a.forked() == {liar.public: 2}
    run_session(b, a)
    assert a.digest() == b.digest()


def test_garbage_from_peer_is_a_fault(tmp_path: Path) -> None:
    a = ledger(tmp_path, "a")
    s = SyncSession(a)
    assert isinstance(s.next_request(), DigestRequest)
    s.on_response(DigestResponse(bytes(32), 1, 0))
    req = s.next_request()
    assert isinstance(req, HeadsRequest)
    s.on_response(HeadsResponse((HeadEntry(A32, 5, bytes(32), None),), False))
    req = s.next_request()
    assert isinstance(req, RangeRequest) and req.author == A32 and req.from_seq == 1
    bogus = codec.pack([b"\x97" + b"\x00" * 10, bytes(64)])
    s.on_response(RangeResponse((bogus,), False))
    assert s.failed and sum(s.stats.faults.values()) == 1
    assert s.next_request() is None
    # A response of the wrong type is a fault too.
    s2 = SyncSession(a)
    s2.next_request()
    s2.on_response(RangeResponse((), False))
    assert s2.stats.faults["wrong_response"] == 1


# ------------------------------------------------------------------ fake network


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fake_network_converges_despite_losses(
    fake_net: FakeNetRunner, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    net = await fake_net(seed)
    counts = {led.count() for led in net.ledgers}
    assert counts == {net.published}
    assert net.faults == 0


async def test_fake_network_converges_without_gossip(
    fake_net: FakeNetRunner, autojump_clock: trio.testing.MockClock
) -> None:
    net = await fake_net(7, drop=1.0, req_drop=0.3, per_node=30)
    assert {led.count() for led in net.ledgers} == {net.published}


async def test_fake_network_converges_on_forks(
    fake_net: FakeNetRunner, autojump_clock: trio.testing.MockClock
) -> None:
    net = await fake_net(11, fork=True, drop=0.5)
    forks = [led.forked() for led in net.ledgers]
    assert all(f == {net.idents[0].public: 21} for f in forks), forks
    assert net.faults == 0


@pytest.mark.parametrize("seed,versions,preload", [(1, [2] * 5, 200), (2, [2] * 5, 200),
                                                   (3, [2, 1, 2, 1, 2], 40)])
async def test_fake_network_converges_with_reconciliation(
        fake_net: FakeNetRunner, seed: int, versions: list[int], preload: int,
        autojump_clock: trio.testing.MockClock) -> None:
    """/sync/2 sessions (and /sync/1 where a node only speaks that) over preloaded
    authors that every node holds a different part of, with losses and delays. (Few
    in the mixed run: /sync/1 pages 4 authors per request here, and one lost request
    ends a session.)"""
    net = await fake_net(seed, versions=versions, preload=preload)
    assert {led.count() for led in net.ledgers} == {net.published}
    assert net.faults == 0


async def test_fake_network_reconciles_without_gossip_and_with_forks(
        fake_net: FakeNetRunner, autojump_clock: trio.testing.MockClock) -> None:
    # Fewer lost requests than the /sync/1 run above (0.3): a node behind by one event
    # among 300 authors needs ~5 requests in a row (/sync/1 with 5 authors: 4).
    net = await fake_net(7, drop=1.0, req_drop=0.15, per_node=30, versions=[2] * 5,
                         preload=100)
    assert {led.count() for led in net.ledgers} == {net.published}
    net = await fake_net(11, fork=True, drop=0.5, versions=[2] * 5,
                         preload=100)
    forks = [led.forked() for led in net.ledgers]
    assert all(f == {net.idents[0].public: 21} for f in forks), forks
    assert net.faults == 0


# ------------------------------------------------------------------ tarpits (issue 12 item 5)


class FakeTarpit:
    """Answers like tests/reliability/attackers.py's Tarpit, on the virtual clock:
    a random DIGEST at once, then endless HEADS pages of made-up authors far ahead of
    us and empty RANGE answers, each after `delay` s (just under our timeout)."""

    def __init__(self, delay: float, repeat: Ledger | None = None) -> None:
        self.delay = delay
        self.repeat = repeat  # answer RANGE with records we already hold, from seq 1
        self.requests = 0
        self.next_author = 0

    async def send(self, req: sync.SyncRequest) -> sync.SyncResponse | None:
        self.requests += 1
        if isinstance(req, DigestRequest):
            return DigestResponse(bytes([self.requests % 256]) * 32, 1 << 20, 0)
        await trio.sleep(self.delay)
        if isinstance(req, HeadsRequest):
            heads = []
            for _ in range(req.limit):
                self.next_author += 1
                heads.append(HeadEntry(b"\xfe" + self.next_author.to_bytes(31, "big"),
                                       1 << 40, bytes(32), None))
            return HeadsResponse(tuple(heads), True)
        if isinstance(req, RangeRequest) and self.repeat is not None:
            return RangeResponse(tuple(self.repeat.range(req.author, 1, 4)), True)
        return RangeResponse((), True)


async def test_tarpit_answering_under_the_timeout_is_cut_when_nothing_new_comes(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    led = ledger(tmp_path, "a")
    pit = FakeTarpit(delay=4.5)
    t0 = trio.current_time()
    s = await drive(SyncSession(led, SyncLimits(stall_s=30.0), clock=trio.current_time),
                    pit.send)
    assert s.stalled and s.cut == "stalled" and s.failed and led.count() == 0
    # Cut at the first request after stall_s: one slow answer past it at most.
    assert trio.current_time() - t0 < 30.0 + 4.5 + 0.1
    assert pit.requests < 10


async def test_fast_tarpit_is_cut_by_its_idle_answers(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Endless pages answered at once never reach stall_s: the answers that bring
    nothing new end the session (and without a clock too)."""
    led = ledger(tmp_path, "a")
    for clock in (trio.current_time, None):
        pit = FakeTarpit(delay=0.0)
        s = await drive(SyncSession(led, SyncLimits(idle_pages=16), clock=clock), pit.send)
        assert s.stalled and s.cut == "idle"
        assert pit.requests <= 2 + 17  # DIGEST, one HEADS page, 17 empty RANGEs


async def test_peer_repeating_what_we_hold_is_cut(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    ident = Identity.generate()
    for i in range(5):
        ev = b.publish(ident, body(i), 1000 + i)
        a.append(ev.wire)
    pit = FakeTarpit(delay=0.0, repeat=b)

    async def send(req: sync.SyncRequest) -> sync.SyncResponse | None:
        if isinstance(req, RangeRequest):
            req = RangeRequest(ident.public, 1, 4, req.max_bytes)
        return await pit.send(req)

    s = await drive(SyncSession(a, SyncLimits(idle_pages=4), clock=trio.current_time),
                    send)
    assert s.cut == "idle" and s.stalled and s.stats.accepted == 0 and a.count() == 5


async def test_slow_honest_peer_is_not_cut_while_it_brings_events(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Every answer 4.5 s late, 60 requests: far past stall_s in total, but each RANGE
    stores something new, so the session completes."""
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    for i in range(20):
        ident = Identity.generate()
        for j in range(3):
            b.publish(ident, body(i * 10 + j), 1000 + j)

    async def send(req: sync.SyncRequest) -> sync.SyncResponse | None:
        await trio.sleep(4.5)
        return sync.decode_response(sync.handle(b, req.encode()))

    lim = SyncLimits(heads_page=8, range_limit=2, stall_s=10.0)
    s = await drive(SyncSession(a, lim, clock=trio.current_time), send)
    assert s.failed is None and s.cut is None and a.digest() == b.digest()


async def test_trickle_of_real_events_under_the_timeout_is_cut(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """A tarpit relaying real events one per answer, each just under the timeout,
    stores something every time, but no slow answer with less than half a page
    counts as news: stalled after stall_s, like an empty one. The same peer answering
    at once is not blamed."""
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    ident = Identity.generate()
    for i in range(200):
        b.publish(ident, body(i), 1000 + i)

    def trickle(delay: float) -> Callable[[sync.SyncRequest], Awaitable[sync.SyncResponse]]:
        async def send(req: sync.SyncRequest) -> sync.SyncResponse:
            if isinstance(req, RangeRequest):
                # Two records: the session's one of overlap, and one new event.
                req = RangeRequest(req.author, req.from_seq, 2, req.max_bytes)
                await trio.sleep(delay)
            return sync.decode_response(sync.handle(b, req.encode()))
        return send

    lim = SyncLimits(range_limit=64, stall_s=30.0, slow_s=2.5)
    t0 = trio.current_time()
    s = await drive(SyncSession(a, lim, clock=trio.current_time), trickle(4.5))
    assert s.stalled and s.cut == "stalled" and trio.current_time() - t0 < 30.0 + 4.5 + 0.1
    # Every RANGE answer (all but DIGEST and HEADS) stored two events and was thin.
    assert s.stats.thin == s.stats.requests - 2 > 0 and a.count() == 2 * s.stats.thin
    s = await drive(SyncSession(a, lim, clock=trio.current_time), trickle(0.1))
    assert s.cut is None and s.failed is None and a.digest() == b.digest()


def test_heads_pages_over_authors_we_share_are_free(tmp_path: Path) -> None:
    """An honest peer walking its authors pages over the many we already hold at the
    same head: those pages are not idle (up to our author count / page size)."""
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    for i in range(200):
        ev = b.publish(Identity.generate(), body(i), 1000)
        a.append(ev.wire)
    b.publish(Identity.from_seed(b"\xff" * 32), body(0), 1000)  # the one we lack
    s = run_session(a, b, SyncLimits(heads_page=8, idle_pages=0))
    assert s.failed is None and s.stats.idle == 0 and a.digest() == b.digest()


async def test_session_time_and_request_bounds_end_without_blame(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """A long honest catch-up cut by session_s or max_requests is not the peer's
    fault: not stalled, not failed; the next session continues where it ended."""
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    ident = Identity.generate()
    for i in range(100):
        b.publish(ident, body(i), 1000 + i)

    async def send(req: sync.SyncRequest) -> sync.SyncResponse | None:
        await trio.sleep(1.0)
        return sync.decode_response(sync.handle(b, req.encode()))

    lim = SyncLimits(range_limit=10, session_s=5.0)
    s = await drive(SyncSession(a, lim, clock=trio.current_time), send)
    assert s.cut == "time" and not s.stalled and s.failed is None and 0 < a.count() < 100
    s = run_session(a, b, SyncLimits(range_limit=10, max_requests=3))
    assert s.cut == "requests" and not s.stalled and s.failed is None
    run_session(a, b)
    assert a.digest() == b.digest()


def test_fork_proof_above_our_chain_still_serves_heads(tmp_path: Path) -> None:
    """FORKS is fetched before RANGE, so a node can hold an author's fork proof while
    its chain of that author ends below the fork (a session cut in between). Its HEADS
    must still be valid: the stored head counts, the fork is named once the chain
    reaches it (seen on the fake network: 'head id must be nil exactly when seq is 0'
    from serve())."""
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    liar = Identity.generate()
    evs = [b.publish(liar, body(i), 1000 + i) for i in range(5)]
    x, y = fork_pair(liar, (6, evs[-1].id), 2000)
    b.append(x)
    b.append(y)
    assert b.forked() == {liar.public: 6}
    a.append_many([e.wire for e in evs[:3]])
    assert a.add_fork_proof(x, y)
    assert a.sync_heads()[liar.public] == (3, evs[2].id)
    resp = sync.decode_response(sync.handle(a, HeadsRequest(None, 10).encode()))
    assert isinstance(resp, HeadsResponse)
    assert resp.heads == (HeadEntry(liar.public, 3, evs[2].id, None),)
    s = run_session(a, b)
    assert s.failed is None and a.digest() == b.digest()
    resp = sync.decode_response(sync.handle(a, HeadsRequest(None, 10).encode()))
    assert resp == HeadsResponse((HeadEntry(liar.public, 5, evs[4].id, 6),), False)


def test_heads_snapshot_follows_the_ledger(tmp_path: Path) -> None:
    """HEADS is served from a snapshot keyed by the digest: every change shows."""
    a = ledger(tmp_path, "a")
    ids = [Identity.generate() for _ in range(5)]
    for i, ident in enumerate(ids[:3]):
        a.publish(ident, body(i), 1000)

    def page(after: bytes | None = None, limit: int = 10) -> HeadsResponse:
        resp = sync.decode_response(sync.handle(a, HeadsRequest(after, limit).encode()))
        assert isinstance(resp, HeadsResponse)
        return resp

    assert len(page().heads) == 3
    a.publish(ids[3], body(3), 1000)
    ev = a.publish(ids[0], body(4), 1001)
    heads = {h.author: h for h in page().heads}
    assert len(heads) == 4 and heads[ids[0].public].id == ev.id
    first = page(limit=2)
    assert first.more and len(first.heads) == 2
    rest = page(first.heads[-1].author, 10)
    assert not rest.more and [h.author for h in first.heads + rest.heads] == sorted(heads)
    d = sync.decode_response(sync.handle(a, DigestRequest().encode()))
    assert d == DigestResponse(a.digest(), 4, 0)
