"""/sync/2: the RECON and FETCH messages, the reconciliation session against an honest
peer (few differences, a fresh node, forks, gaps) and against lying, endless, garbage
and slow ones, on trio's virtual clock. The fake network runs are in test_sync.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from node import codec, recon, sync
from node.errors import InvalidMessage
from node.events import Offer, sign_event
from node.keys import Identity
from node.ledger import Ledger
from node.sync import (
    FetchEntry,
    FetchRequest,
    FetchResponse,
    HeadEntry,
    HeadsRequest,
    HeadsResponse,
    ReconAnswer,
    ReconNode,
    ReconRequest,
    ReconResponse,
)
from node.sync_recon import ReconSession
from node.sync_session import SyncLimits, SyncSession, drive

NET = "test"
A32 = bytes(range(32))
SALT = b"\x01" * 8


def body(i: int) -> Offer:
    return Offer(services=(), currency="EUR", addrs=(), note=f"e{i}")


def ledger(tmp_path: Path, name: str) -> Ledger:
    return Ledger(tmp_path / f"{name}.db", network=NET)


# ------------------------------------------------------------------ messages


MESSAGES = [
    ReconRequest(SALT, 4, (ReconNode(0, b""),)),
    ReconRequest(SALT, 2, (ReconNode(3, b"\x20"), ReconNode(3, b"\x40"),
                           ReconNode(9, b"\x80\x80"))),
    ReconResponse((ReconAnswer((3, 0), b"\x00" * recon.FP_BYTES, ()),
                   ReconAnswer((), b"", (HeadEntry(A32, 3, bytes(32), None),)))),
    FetchRequest((FetchEntry(A32, 1, None), FetchEntry(b"\xff" * 32, 7, bytes(16))), 256, 1000),
    FetchResponse(((b"\x92\xc4\x01a\xc4\x01b",), ())),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg: sync.Message) -> None:
    data = msg.encode()
    if isinstance(msg, (ReconRequest, FetchRequest)):
        assert sync.decode_request(data, 2) == msg
        with pytest.raises(InvalidMessage) as e:
            sync.decode_request(data)  # not on /sync/1
        assert e.value.reason == "unknown_request"
    else:
        assert sync.decode_response(data, 2) == msg


@pytest.mark.parametrize(
    "value",
    [
        [5, SALT, 4, []],  # no nodes
        [5, b"short", 4, [[0, b""]]],
        [5, SALT, 5, [[0, b""]]],  # split too wide
        [5, SALT, 0, [[0, b""]]],
        [5, SALT, 4, [[4, b"\x01"]]],  # unused bits set
        [5, SALT, 4, [[4, b"\x10\x00"]]],  # too long for its bits
        [5, SALT, 2, [[1, b"\x80"], [1, b"\x00"]]],  # descending
        [5, SALT, 2, [[1, b"\x00"], [2, b"\x40"]]],  # overlapping
        [5, SALT, 2, [[255, b"\x00" * 32]]],  # split below a full key
        [5, SALT, 2, [[0, b""]] * (recon.NODES_MAX + 1)],
        [6, [], 10, 10],
        [6, [[A32, 1, None], [A32, 2, None]], 10, 10],  # same author twice
        [6, [[A32, 0, None]], 10, 10],
        [6, [[A32, 1, b"x"]], 10, 10],
        [6, [[A32, 1, None]] * (sync.FETCH_ENTRIES_MAX + 1), 10, 10],
        [6, [[A32, 1, None]], sync.RANGE_LIMIT_MAX + 1, 10],
    ],
)
def test_bad_requests_rejected(value: object) -> None:
    with pytest.raises(InvalidMessage):
        sync.decode_request(codec.pack(value), 2)


@pytest.mark.parametrize(
    "value",
    [
        [5, [[[1, 1], b"\x00" * 6, []]]],  # two non-empty children, one print
        [5, [[[], b"", [[A32, 1, bytes(32), None], [b"\xff" * 32, 1, bytes(32), None]]]]],
        [5, [[[1], b"\x00" * 6, [[A32, 1, bytes(32), None]]]]],  # split and items
        [5, [[[1] * 17, b"\x00" * 6 * 17, []]]],
        [6, [], 1, 1],
        [6, [[b"x"] * (sync.RANGE_LIMIT_MAX + 1)]],
        [6, [[b""]]],
    ],
)
def test_bad_responses_rejected(value: object) -> None:
    with pytest.raises(InvalidMessage):
        sync.decode_response(codec.pack(value), 2)


def test_fetch_leaves_out_the_record_we_hold(tmp_path: Path) -> None:
    a = ledger(tmp_path, "a")
    me, other = Identity.from_seed(b"m" * 32), Identity.from_seed(b"o" * 32)
    evs = [a.publish(me, body(i), 1000 + i) for i in range(5)]
    a.publish(other, body(9), 1000)

    def fetch(*entries: FetchEntry, limit: int = 100, max_bytes: int = 10**6) -> FetchResponse:
        req = FetchRequest(tuple(sorted(entries, key=lambda e: e.author)), limit, max_bytes)
        resp = sync.decode_response(sync.handle(a, req.encode(), 2), 2)
        assert isinstance(resp, FetchResponse)
        return resp

    got = fetch(FetchEntry(me.public, 3, evs[2].id[:16]))
    assert got.records == (tuple(e.wire for e in evs[3:]),)
    got = fetch(FetchEntry(me.public, 3, bytes(16)))  # not what the peer holds there
    assert got.records == (tuple(e.wire for e in evs[2:]),)
    # Limits end the answer: the entries after the last list were not reached.
    first_me = me.public < other.public
    got = fetch(FetchEntry(me.public, 1, None), FetchEntry(other.public, 1, None), limit=3)
    assert [len(r) for r in got.records] == ([3] if first_me else [1, 2])
    size = len(evs[0].wire)
    got = fetch(FetchEntry(me.public, 1, None), FetchEntry(other.public, 1, None),
                max_bytes=size + 1)
    # One record may exceed the bytes, none after it: the other entry is not reached
    # (rather than answered with nothing, which would mean "nothing beyond yours").
    assert [len(r) for r in got.records] == [1]
    got = fetch(FetchEntry(me.public, 6, evs[4].id[:16]), FetchEntry(other.public, 2, None))
    assert got.records == ((), ())


# ------------------------------------------------------------------ honest peers


def run(local: Ledger, remote: Ledger, limits: SyncLimits | None = None,
        version: int = 2, **kw: object) -> tuple[SyncSession, int]:
    """A session to the end over the real codecs; (session, bytes both ways)."""
    s: SyncSession
    if version == 2:
        s = ReconSession(local, limits, salt=SALT, **kw)  # type: ignore[arg-type]
    else:
        s = SyncSession(local, limits, **kw)  # type: ignore[arg-type]
    n = 0
    while (req := s.next_request()) is not None:
        data = req.encode()
        resp = sync.handle(remote, sync.decode_request(data, version).encode(), version)
        n += len(data) + len(resp)
        s.on_response(sync.decode_response(resp, version))
    return s, n


def populated(tmp_path: Path, authors: int, seed: int) -> tuple[Ledger, Ledger, list[Identity]]:
    a, b = ledger(tmp_path, f"a{seed}"), ledger(tmp_path, f"b{seed}")
    rnd = random.Random(seed)
    ids = [Identity.from_seed(rnd.randbytes(32)) for _ in range(authors)]
    wires = [a.publish(ident, body(i), 1000).wire for i, ident in enumerate(ids)]
    b.append_many(wires)
    return a, b, ids


def test_few_differences_among_many_authors(tmp_path: Path) -> None:
    a, b, ids = populated(tmp_path, 2000, 1)
    c = ledger(tmp_path, "c")
    c.append_many(a.iter_wires())
    for ident in ids[:20]:
        a.publish(ident, body(1), 1001)
    a.publish(Identity.generate(), body(2), 1000)
    s, n2 = run(b, a)
    assert s.failed is None and s.cut is None and b.digest() == a.digest()
    assert s.stats.accepted == 21 and not s.in_sync
    s1, n1 = run(c, a, version=1)
    assert s1.failed is None and c.digest() == a.digest()
    # HEADS pages all 2,001 authors; reconciliation sends prints around 21 of them.
    assert n2 * 5 < n1 and s.stats.requests * 3 < s1.stats.requests
    s, _n = run(b, a)
    assert s.in_sync and s.stats.requests == 1 and s.progressed


def test_fresh_node_lists_instead_of_descending(tmp_path: Path) -> None:
    a, _, _ = populated(tmp_path, 600, 2)
    fresh = ledger(tmp_path, "fresh")
    s, _ = run(fresh, a, SyncLimits(heads_page=100, range_limit=64))
    assert s.failed is None and fresh.digest() == a.digest() and s.stats.accepted == 600
    assert s.recon.asked == 0  # HEADS pages from the start


def test_peer_behind_us_costs_no_blame(tmp_path: Path) -> None:
    a, b, ids = populated(tmp_path, 500, 3)
    for ident in ids[:40]:
        a.publish(ident, body(1), 1001)
    s, _ = run(a, b)  # a is ahead: nothing to pull, nothing wrong
    assert s.failed is None and s.cut is None and not s.stats.faults and s.stats.accepted == 0


def test_forks_through_probe_and_forks_request(tmp_path: Path) -> None:
    a, b, c = ledger(tmp_path, "a"), ledger(tmp_path, "b"), ledger(tmp_path, "c")
    liar = Identity.generate()
    first = a.publish(liar, body(0), 1000)
    for led in (b, c):
        led.append(first.wire)
    x = sign_event(liar.seed, 2, first.id, 1001, body(-1), NET)
    y = sign_event(liar.seed, 2, first.id, 1001, body(-2), NET)
    a.append(x.wire)
    b.append(y.wire)
    s, _ = run(a, b)  # same height, other id: FETCH sends b's record, the fork shows
    assert s.failed is None and a.forked() == {liar.public: 2}
    run(c, a)  # c learns it by FORKS
    run(b, c)
    assert a.forked() == b.forked() == c.forked() == {liar.public: 2}
    assert a.digest() == b.digest() == c.digest()


def test_gap_session_fetches_in_batches(tmp_path: Path) -> None:
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    ids = [Identity.generate() for _ in range(5)]
    for ident in ids:
        evs = [a.publish(ident, body(i), 1000 + i) for i in range(10)]
        b.append_many([evs[0].wire, evs[9].wire])
    assert len(b.gaps()) == 5
    s, _ = run(b, a, gaps=b.gaps())
    assert s.failed is None and b.gaps() == [] and b.digest() == a.digest()
    assert s.stats.requests == 1  # one FETCH for all five authors


def test_live_authors_left_to_gossip(tmp_path: Path) -> None:
    a, b = ledger(tmp_path, "a"), ledger(tmp_path, "b")
    live, quiet = Identity.generate(), Identity.generate()
    for i in range(6):
        for ident, ts in ((live, 50_000), (quiet, 1_000)):
            ev = b.publish(ident, body(i), ts + i)
            if i < 3:
                a.append(ev.wire)
    s, _ = run(a, b, live_after_ms=40_000)
    assert s.stats.skipped_live == 1
    assert a.head(live.public).seq == 3 and a.head(quiet.public).seq == 6  # type: ignore[union-attr]


def guessing_run(local: Ledger, remote: Ledger, limits: SyncLimits,
                 version: int = 2) -> tuple[SyncSession, list[bool], int]:
    """As `run`, asking `next_if_stored` before each answer is stored (as the shell's
    pipelining does): (session, whether each guess was the next request, pages)."""
    s: SyncSession = (ReconSession(local, limits, salt=SALT) if version == 2
                      else SyncSession(local, limits))
    right: list[bool] = []
    guess: sync.SyncRequest | None = None
    pages = 0
    while (req := s.next_request()) is not None:
        if guess is not None:
            right.append(guess == req)
        pages += isinstance(req, (FetchRequest, sync.RangeRequest))
        resp = sync.decode_response(sync.handle(remote, req.encode(), version), version)
        guess = s.next_if_stored(resp)
        s.on_response(resp)
    if guess is not None:
        right.append(False)  # asked ahead, then the session ended
    return s, right, pages


@pytest.mark.parametrize("version", [1, 2])
def test_next_page_is_known_before_the_answer_is_stored(tmp_path: Path, version: int) -> None:
    """A catch-up's pages are asked for while the previous one is checked and stored
    (node/gossip_pull.py pipelines them): the guess from an answer's last records is
    the request the session then makes, for one long chain (RANGE, FETCH) and for
    many short ones (FETCH: the next authors)."""
    a = ledger(tmp_path, "a")
    long = Identity.generate()
    for i in range(700):
        a.publish(long, body(i), 1000 + i)
    for i in range(300 if version == 2 else 0):
        a.publish(Identity.generate(), body(i), 1000)
    fresh = ledger(tmp_path, "fresh")
    s, right, pages = guessing_run(fresh, a, SyncLimits(heads_page=100, range_limit=64), version)
    assert s.failed is None and fresh.digest() == a.digest()
    assert pages >= 700 // 64
    # Every page but the first is asked ahead; at most the last guess is wasted.
    assert right.count(True) >= pages - 2 and right.count(False) <= 1


def test_a_guess_is_not_taken_for_records_that_do_not_store(tmp_path: Path) -> None:
    """An answer with a record that does not store (here: a bad signature) ends the
    session: the page asked ahead is not the next request (there is none)."""
    a = ledger(tmp_path, "a")
    me = Identity.generate()
    for i in range(100):
        a.publish(me, body(i), 1000 + i)
    fresh = ledger(tmp_path, "fresh")
    s = ReconSession(fresh, SyncLimits(range_limit=32), salt=SALT)
    while not isinstance(req := s.next_request(), FetchRequest):
        assert req is not None
        s.on_response(sync.decode_response(sync.handle(a, req.encode(), 2), 2))
    resp = sync.decode_response(sync.handle(a, req.encode(), 2), 2)
    assert isinstance(resp, FetchResponse)
    recs = list(resp.records[0])
    signed, _sig = codec.unpack(recs[5], 1 << 20)
    recs[5] = codec.pack([signed, bytes(64)])
    bad = FetchResponse((tuple(recs),))
    guess = s.next_if_stored(bad)
    assert isinstance(guess, FetchRequest) and guess.entries[0].from_seq == 32
    s.on_response(bad)
    assert s.failed and s.next_request() is None and fresh.head(me.public).seq == 5  # type: ignore[union-attr]


# ------------------------------------------------------------------ lying peers


class Liar:
    """Answers RECON with made-up fingerprints (a split of big counts, every print
    random, never items) or FETCH with garbage, optionally after `delay` s."""

    def __init__(self, delay: float = 0.0, *, fetch: list[bytes] | None = None,
                 items: bool = False) -> None:
        self.delay = delay
        self.fetch = fetch
        self.items = items
        self.rnd = random.Random(1)
        self.requests = 0

    def _answer(self, node: ReconNode, split: int) -> ReconAnswer:
        if self.items and node.bits >= 8:
            # One made-up author under the node, far ahead of us.
            prefix, bits = node.key
            low, _ = recon.node_bounds(prefix, bits)
            return ReconAnswer((), b"", (HeadEntry(low, 1 << 40, bytes(32), None),))
        n = 1 << split
        return ReconAnswer(tuple([1000] * n),
                           b"".join(self.rnd.randbytes(recon.FP_BYTES) for _ in range(n)), ())

    async def send(self, req: sync.SyncRequest) -> sync.SyncResponse | None:
        self.requests += 1
        await trio.sleep(self.delay)
        if isinstance(req, ReconRequest):
            return ReconResponse(tuple(self._answer(n, req.split) for n in req.nodes))
        if isinstance(req, FetchRequest):
            return FetchResponse((tuple(self.fetch or ()),))
        if isinstance(req, HeadsRequest):
            return HeadsResponse((), False)
        raise AssertionError(req)


async def test_endless_splitting_is_cut_as_idle(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Made-up prints everywhere: the node budget ends it (test_recon.py), or, once
    the descent reaches nodes where we hold nothing, the empty listings (idle)."""
    for authors, base in ((2000, 100), (2000, 4096), (30, 1024)):
        a, _, _ = populated(tmp_path / str(base), authors, 4)
        liar = Liar()
        s = await drive(ReconSession(a, clock=trio.current_time, nodes_base=base),
                        liar.send)
        assert s.cut == "idle" and s.stalled and s.failed and s.stats.accepted == 0
        assert s.recon.asked <= base and liar.requests <= 40


async def test_made_up_items_are_cut_by_idle_fetches(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    a, _, _ = populated(tmp_path, 50, 5)
    liar = Liar(items=True)
    s = await drive(ReconSession(a, SyncLimits(idle_pages=4), clock=trio.current_time),
                    liar.send)
    assert s.cut == "idle" and s.stalled and s.stats.accepted == 0
    assert liar.requests < 100


async def test_slow_liar_is_cut_at_stall_s(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    a, _, _ = populated(tmp_path, 50, 6)
    t0 = trio.current_time()
    liar = Liar(delay=4.5)
    s = await drive(ReconSession(a, SyncLimits(stall_s=30.0), clock=trio.current_time),
                    liar.send)
    assert s.cut == "stalled" and s.stalled and s.stats.accepted == 0
    assert trio.current_time() - t0 < 30.0 + 4.5 + 0.1


async def test_garbage_records_are_a_fault(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    a = ledger(tmp_path, "a")
    bogus = codec.pack([b"\x97" + b"\x00" * 10, bytes(64)])
    s = ReconSession(a, gaps=[(A32, 1, 3)], salt=SALT)
    await drive(s, Liar(fetch=[bogus]).send)
    assert s.failed and sum(s.stats.faults.values()) == 1


def test_malformed_answers_are_faults(tmp_path: Path) -> None:
    a, _, _ = populated(tmp_path, 20, 7)
    s = ReconSession(a, salt=SALT)
    req = s.next_request()
    assert isinstance(req, ReconRequest) and len(req.nodes) == 1
    s.on_response(ReconResponse(()))  # no answer for the root
    assert s.failed and s.stats.faults["bad_recon"] == 1
    s = ReconSession(a, salt=SALT)
    s.next_request()
    one_item = ReconAnswer((1, 0, 0, 0), b"\x00" * recon.FP_BYTES, ())  # should be items
    s.on_response(ReconResponse((one_item,)))
    assert s.stats.faults["bad_recon"] == 1
    s = ReconSession(a, gaps=[(A32, 1, 3)], salt=SALT)
    req = s.next_request()
    assert isinstance(req, FetchRequest)
    s.on_response(FetchResponse(((), ())))  # more lists than entries
    assert s.stats.faults["bad_page"] == 1
