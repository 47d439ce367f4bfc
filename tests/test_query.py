"""Query protocol: message codecs, bounded pages, bundles, and that the reputation
bundle is enough to re-derive the same scores as the node's full market."""

from __future__ import annotations

from pathlib import Path

import pytest
from market_helpers import World, award, key, payment, rating, request
from testkit import Chain

from node import codec, query
from node.auction import derive
from node.client import fold
from node.errors import InvalidMessage, RateLimited
from node.events import Subcontract, decode_wire
from node.ledger import AppendResult, Status

NET = "test"


def roundtrip_request(req: query.QueryRequest) -> None:
    assert query.decode_request(req.encode()) == req


def test_requests_round_trip() -> None:
    p = query.Page(7, 10, 4096)
    for req in [
        query.GetEvents((b"a" * 32, b"b" * 32)),
        query.FindEvents("bid", b"c" * 32, None, p), query.FindEvents(),
        query.AuctionBundle(b"d" * 32, p), query.ReputationBundle((b"e" * 32,), p),
        query.LeasesOf(b"f" * 32, p), query.GetHeads((b"g" * 32,)), query.GetDigest(),
        query.Submit((b"\x92\xc4\x01x",)),
    ]:
        roundtrip_request(req)


def test_responses_round_trip() -> None:
    for resp in [
        query.EventsPage((b"r1", b"r2"), 5, True),
        query.Heads((query.HeadInfo(b"a" * 32, 3, b"i" * 32, 99, None),
                     query.HeadInfo(b"b" * 32, 0, None, 0, 1))),
        query.Digest("test", b"d" * 32, 1, 2, 0),
        query.Submitted((query.SubmitResult("rejected", b"x" * 32, "bad_signature", "no"),)),
    ]:
        assert query.decode_response(resp.encode()) == resp


@pytest.mark.parametrize("payload", [
    codec.pack([99]), codec.pack([1]), codec.pack([1, []]), codec.pack([1, [b"short"]]),
    codec.pack([1, [b"a" * 32, b"a" * 32]]), codec.pack([2, "nokind", None, None, [0, 1, 2048]]),
    codec.pack([2, None, None, None, [0, 0, 2048]]),
    codec.pack([2, None, None, None, [-1, 1, 2048]]),
    codec.pack([3, b"a" * 32, [0, 1, 10]]), codec.pack([4, [], [0, 1, 2048]]),
    codec.pack([4, [b"k" * 32] * 65, [0, 1, 2048]]), codec.pack([8, []]),
    codec.pack([8, [b"x"] * 17]), codec.pack({"a": 1}), b"\xc1", b"",
    codec.pack([7, 1]), codec.pack([1.5]),
])
def test_bad_requests_are_refused(payload: bytes) -> None:
    with pytest.raises(InvalidMessage):
        query.decode_request(payload)


def test_oversized_request_refused() -> None:
    with pytest.raises(InvalidMessage) as e:
        query.decode_request(b"\x00" * (query.MAX_REQUEST + 1))
    assert e.value.reason == "oversized"


def _service(w: World, submit: query.SubmitFn | None = None,
             **kw: float) -> query.QueryService:
    return query.QueryService(w.ledger, None, submit or w.ledger.append, NET, **kw)


def _page(svc: query.QueryService, req: query.QueryRequest) -> query.EventsPage:
    resp = query.decode_response(svc.answer(b"p" * 32, req).encode())
    assert isinstance(resp, query.EventsPage)
    return resp


def _ids(page: query.EventsPage) -> set[bytes]:
    return {decode_wire(r, NET).id for r in page.records}


def test_auction_bundle_and_paging(tmp_path: Path) -> None:
    w = World(tmp_path)
    req = w.pub("alice", request(sealed=True), 10)
    other = w.pub("zed", request(), 11)
    b1, n1 = w.commit("p1", req, 500, 20)
    b2, n2 = w.commit("p2", req, 400, 21)
    w.bid("p3", other, 300, 22)
    r1 = w.reveal("p1", b1, 500, n1, 120)
    r2 = w.reveal("p2", b2, 400, n2, 121)
    a = w.pub("alice", award(req.id, b2.id, 400, [b1.id, b2.id]), 160)
    svc = _service(w)
    full = _page(svc, query.AuctionBundle(req.id))
    assert _ids(full) == {req.id, b1.id, b2.id, r1.id, r2.id, a.id}
    assert not full.more
    # Paging by count: every page bounded, the union complete, cursors increasing.
    got: set[bytes] = set()
    after = 0
    for _ in range(10):
        page = _page(svc, query.AuctionBundle(req.id, query.Page(after, 2, 1024)))
        assert len(page.records) <= 2 and page.cursor >= after
        got |= _ids(page)
        after = page.cursor
        if not page.more:
            break
    assert got == _ids(full)
    # Byte bound: one record at least, never more than max_bytes beyond the first.
    page = _page(svc, query.FindEvents(page=query.Page(0, 100, 1024)))
    assert len(page.records) >= 1 and sum(map(len, page.records)) <= 1024 + 17000
    assert page.more
    # Filters.
    bids = _page(svc, query.FindEvents("commit", None, req.id))
    assert _ids(bids) == {b1.id, b2.id}
    assert _ids(_page(svc, query.GetEvents((a.id, b"\x00" * 32)))) == {a.id}


def test_forked_author_events_left_out(tmp_path: Path) -> None:
    w = World(tmp_path)
    ch = Chain(seed=b"\x07" * 32, network=NET)
    e1 = ch.next()
    e2 = ch.next()
    twin = ch.make(2, e1.id, ts_ms=ch.ts_ms + 50)
    for ev in (e1, e2, twin):
        w.ledger.append(ev.wire)
    assert w.ledger.forked()
    svc = _service(w)
    assert _ids(_page(svc, query.FindEvents(author=ch.public))) == {e1.id}
    heads = svc.answer(b"p" * 32, query.GetHeads((ch.public, b"\x01" * 32)))
    assert isinstance(heads, query.Heads)
    assert heads.heads[0].seq == 1 and heads.heads[0].fork_seq == 2
    assert heads.heads[1].seq == 0 and heads.heads[1].id is None


def test_reputation_bundle_rederives_the_same_scores(tmp_path: Path) -> None:
    """Ratings with rater weights > 1 (settled leases), a device rating for its
    recipient, and a subcontract rating: the bundle alone gives the node's scores."""
    w = World(tmp_path)
    t = 0

    def deal(recipient: str, provider: str, price: int, *, pay: bool = True,
             rate_provider: int | None = 5, rate_recipient: int | None = 5,
             devices: tuple[bytes, ...] = ()) -> bytes:
        nonlocal t
        from node.events import Members
        t += 1000
        req = w.pub(recipient, request(close_ms=t + 100, reveal_ms=t + 100, start_ms=t + 200,
                                       duration_ms=100,
                                       members=Members(devices=devices)), t)
        b = w.bid(provider, req, price, t + 50)
        a = w.pub(recipient, award(req.id, b.id, price, [b.id]), t + 150)
        if pay:
            w.pub(recipient, payment(a.id, price), t + 160)
        if rate_provider is not None:
            w.pub(recipient, rating(a.id, provider, "provider", score=rate_provider), t + 400)
        if rate_recipient is not None:
            w.pub(provider, rating(a.id, recipient, "recipient", score=rate_recipient), t + 401)
        return a.id

    for i in range(3):  # alice settles leases with several providers: her weight grows
        deal("alice", f"helper{i}", 10)
    deal("alice", "bob", 100, rate_provider=2)
    deal("carol", "bob", 50, rate_provider=4)
    dev = key("phone")
    lease = deal("dave", "bob", 70, rate_provider=None, devices=(dev,))
    t += 1000
    w.pub("phone", rating(lease, "bob", "provider", satisfied=False, score=1), t)
    sc = w.pub("bob", Subcontract(lease=lease, contractor=key("erin"), services=("zstd",),
                                  segments=3, bytes_in=10, result_digest=b"\x00" * 32), t + 1)
    w.pub("bob", rating(sc.id, "erin", "provider", score=3), t + 2)
    w.pub("erin", rating(sc.id, "bob", "recipient", score=4), t + 3)
    full = w.market()
    assert any(r.weight > 1 for rs in full.ratings.values() for r in rs)
    svc = _service(w)
    keys = [key("bob"), key("erin"), key("alice")]
    page = _page(svc, query.ReputationBundle(tuple(keys)))
    assert not page.more
    events = [decode_wire(r, NET) for r in page.records]
    assert len(events) < w.ledger.count()  # a bundle, not the ledger
    market, forks = fold(events)
    assert not forks
    at = full.now_ms
    for k in keys:
        for role in ("provider", "recipient"):
            assert market.reputation.score(k, role, at) == full.reputation.score(k, role, at)
    assert full.reputation.score(key("bob"), "provider", at).ratings == 3
    assert derive(w.ledger.iter_canonical()).reputation.keys() == full.reputation.keys()


def test_leases_of_a_key(tmp_path: Path) -> None:
    w = World(tmp_path)
    req = w.pub("alice", request(), 10)
    b = w.bid("bob", req, 300, 20)
    a = w.pub("alice", award(req.id, b.id, 300, [b.id]), 150)
    p = w.pub("alice", payment(a.id, 300), 160)
    req2 = w.pub("carol", request(), 11)
    w.bid("bob", req2, 200, 21)
    svc = _service(w)
    for who in ("alice", "bob"):
        ids = _ids(_page(svc, query.LeasesOf(key(who))))
        assert {req.id, b.id, a.id, p.id} <= ids and req2.id not in ids
    assert _ids(_page(svc, query.LeasesOf(key("carol")))) == set()


def test_submit_statuses_and_rate_limit(tmp_path: Path) -> None:
    w = World(tmp_path)
    seen: list[AppendResult] = []

    def submit(wire: bytes) -> AppendResult:
        res = w.ledger.append(wire)
        seen.append(res)
        return res

    now = [0.0]
    svc = _service(w, submit, submit_rate=1.0, submit_burst=3.0)
    svc._clock = lambda: now[0]
    ch = Chain(seed=b"\x09" * 32, network=NET)
    e1, e2 = ch.next(), ch.next()
    tampered = e2.wire[:-1] + bytes([e2.wire[-1] ^ 1])
    resp = svc.answer(b"p" * 32, query.Submit((e1.wire, e1.wire, tampered)))
    assert isinstance(resp, query.Submitted)
    assert [r.status for r in resp.results] == ["accepted", "duplicate", "rejected"]
    assert resp.results[2].reason == "bad_signature"
    with pytest.raises(RateLimited):
        svc.answer(b"p" * 32, query.Submit((e2.wire,)))
    now[0] += 1.0
    resp = svc.answer(b"p" * 32, query.Submit((e2.wire,)))
    assert isinstance(resp, query.Submitted) and resp.results[0].status == "accepted"
    assert svc.stats.submitted["accepted"] == 2 and len(seen) == 4
    assert Status.ACCEPTED in {r.status for r in seen}


def test_live_market_sees_every_path(tmp_path: Path) -> None:
    """Events stored behind the service's back (the node's own publishes) show up."""
    w = World(tmp_path)
    svc = _service(w)
    assert not svc.live.market().auctions
    req = w.pub("alice", request(), 10)
    assert req.id in svc.live.market().auctions


@pytest.mark.parametrize("status", [[], {}, 3, None])
def test_submit_result_with_a_non_string_status_is_invalid(status: object) -> None:
    """A hostile node must not crash the client's submit path with a TypeError."""
    with pytest.raises(InvalidMessage):
        query.decode_response(codec.pack([query.Submitted.TAG, [[status, None, None, ""]]]))
    if status is not None:  # a nil kind means "any kind"
        with pytest.raises(InvalidMessage):
            query.decode_request(codec.pack([query.FindEvents.TAG, status, None, None,
                                             [0, 1, 2048]]))


def test_submit_budget_per_ip_and_node_holds_rotating_identities(tmp_path: Path) -> None:
    """Issue 12: a budget per key alone let rotating keys submit at 10x the rate."""
    w = World(tmp_path)
    now = [0.0]
    svc = query.QueryService(w.ledger, None, w.ledger.append, NET, submit_rate=50,
                             submit_burst=16, ip_rate=20, ip_burst=32, node_rate=40,
                             node_burst=48, clock=lambda: now[0])
    ips = {b"a" * 32: "10.0.0.1", b"b" * 32: "10.0.0.1", b"x" * 32: "10.0.0.9",
           b"c" * 32: "10.0.1.2"}  # x: another address of the same /24
    svc._ip_of = ips.get

    def chain(seed: int) -> tuple[bytes, ...]:
        ch = Chain(seed=bytes([seed]) * 32, network=NET)
        return tuple(ch.next().wire for _ in range(16))

    assert isinstance(svc.answer(b"a" * 32, query.Submit(chain(1))), query.Submitted)
    assert isinstance(svc.answer(b"b" * 32, query.Submit(chain(2))), query.Submitted)
    with pytest.raises(RateLimited, match="your address"):  # a third key, same subnet
        svc.answer(b"x" * 32, query.Submit(chain(3)))
    assert isinstance(svc.answer(b"c" * 32, query.Submit(chain(4))), query.Submitted)
    with pytest.raises(RateLimited, match="this node"):  # 48 taken: the node's burst
        svc.answer(b"d" * 32, query.Submit(chain(5)))
    assert svc.submit_budget.refused == {"ip": 1, "node": 1}
    now[0] += 1.0  # 40 more for the node, 20 per IP
    assert isinstance(svc.answer(b"d" * 32, query.Submit(chain(5))), query.Submitted)


def test_submitted_orphans_are_charged_to_the_submitter(tmp_path: Path) -> None:
    """One client's orphans fill its own pending room, not every client's."""
    from node.ledger import Ledger, PendingLimits

    led = Ledger(tmp_path / "p.db", network=NET, pending=PendingLimits(peer_events=4))
    svc = query.QueryService(led, None, led.append, NET, submit_rate=1e9, submit_burst=1e9,
                             submit_from=lambda w, src: led.append_many([w], source=src)[0])
    flood, honest = Chain(seed=b"\x0a" * 32, network=NET), Chain(seed=b"\x0b" * 32, network=NET)
    orphans = [flood.next() for _ in range(9)][1:]
    resp = svc.answer(b"f" * 32, query.Submit(tuple(e.wire for e in orphans)))
    assert isinstance(resp, query.Submitted)
    assert [r.status for r in resp.results].count("pending") == 4
    h1, h2 = honest.next(), honest.next()
    resp = svc.answer(b"h" * 32, query.Submit((h2.wire,)))
    assert isinstance(resp, query.Submitted) and resp.results[0].status == "pending"
    resp = svc.answer(b"h" * 32, query.Submit((h1.wire,)))
    assert isinstance(resp, query.Submitted) and resp.results[0].status == "accepted"
    assert led.head(honest.public) is not None and led.head(honest.public).seq == 2
    led.close()


def test_find_with_an_unknown_kind_is_refused_as_unknown_kind() -> None:
    with pytest.raises(InvalidMessage, match=r"FindEvents\.kind") as e:
        query.decode_request(codec.pack([2, "nokind", None, None, [0, 1, 2048]]))
    assert e.value.reason == "unknown_kind"
    with pytest.raises(InvalidMessage) as e:  # not a string at all: malformed
        query.decode_request(codec.pack([2, 7, None, None, [0, 1, 2048]]))
    assert e.value.reason == "malformed"
    with pytest.raises(InvalidMessage, match=r"FindEvents\.page\.limit"):
        query.decode_request(codec.pack([2, None, None, None, [0, 0, 2048]]))


async def test_submit_over_the_protocol_checks_off_the_loop_after_the_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: a SUBMIT served to a peer is charged to its budgets before any CPU is
    spent on it; its signatures are checked on a worker thread, and the ledger then
    stores them without checking again on the loop. Outcomes are those of `answer`."""
    import threading

    import node.ledger_append as ledger_mod

    w = World(tmp_path)
    svc = _service(w, submit_rate=1.0, submit_burst=16.0, clock=lambda: 0.0)
    checked_on: list[int] = []
    real_check = query.check_records

    def spy_check(wires: list[bytes], network: str) -> list[object]:
        checked_on.append(threading.get_ident())
        return real_check(wires, network)  # type: ignore[return-value]

    loop_checks: list[int] = []
    real_decode_all = ledger_mod._decode_all

    def spy_decode_all(wires: list[bytes], network: str) -> list[object]:
        loop_checks.append(len(wires))
        return real_decode_all(wires, network)  # type: ignore[return-value]

    monkeypatch.setattr(query, "check_records", spy_check)
    monkeypatch.setattr(ledger_mod, "_decode_all", spy_decode_all)
    ch = Chain(seed=b"\x21" * 32, network=NET)
    e1, e2 = ch.next(), ch.next()
    tampered = e2.wire[:-1] + bytes([e2.wire[-1] ^ 1])
    data = await svc.handle(b"p" * 32, query.Submit((e2.wire, tampered, e1.wire)).encode())
    resp = query.decode_response(data)
    assert isinstance(resp, query.Submitted)
    assert [r.status for r in resp.results] == ["pending", "rejected", "accepted"]
    assert resp.results[1].reason == "bad_signature"
    assert checked_on and threading.get_ident() not in checked_on and loop_checks == []
    assert w.ledger.head(ch.public).seq == 2  # type: ignore[union-attr]
    # Over budget (16 taken of a burst of 16): refused before anything is checked.
    n = len(checked_on)
    with pytest.raises(RateLimited):
        await svc.handle(b"p" * 32, query.Submit((ch.next().wire,) * 14).encode())
    assert len(checked_on) == n and loop_checks == []


def test_a_submit_is_stored_in_one_call_when_the_node_takes_batches(tmp_path: Path) -> None:
    """With `submit_many` (the daemon's Node.submit_many: one transaction), a SUBMIT's
    records go to the node in one call, charged to the submitter, with the same
    outcomes record by record; a failing store rejects them all, retryable."""
    import sqlite3

    from node.ledger import Ledger

    led = Ledger(tmp_path / "m.db", network=NET)
    calls: list[tuple[int, object]] = []
    broken = [False]

    def many(wires: list[bytes], source: object) -> list[AppendResult]:
        calls.append((len(wires), source))
        if broken[0]:
            raise sqlite3.OperationalError("disk I/O error")
        return led.append_many(wires, source=source)

    svc = query.QueryService(led, None, led.append, NET, submit_rate=1e9, submit_burst=1e9,
                             submit_many=many)
    ch = Chain(seed=b"\x31" * 32, network=NET)
    e1, e2, e3 = ch.next(), ch.next(), ch.next()
    resp = svc.answer(b"s" * 32, query.Submit((e3.wire, e1.wire, e1.wire, e2.wire)))
    assert isinstance(resp, query.Submitted)
    assert [r.status for r in resp.results] == ["pending", "accepted", "duplicate", "accepted"]
    assert calls == [(4, ("submit", b"s" * 32))] and led.count() == 3
    broken[0] = True
    resp = svc.answer(b"s" * 32, query.Submit((ch.next().wire, ch.next().wire)))
    assert isinstance(resp, query.Submitted)
    assert [r.reason for r in resp.results] == ["store_error", "store_error"]
    assert svc.stats.submitted["rejected:store_error"] == 2
    led.close()


async def test_a_peer_submitting_on_after_refusals_is_cut_off(tmp_path: Path) -> None:
    """Issue 12: refusing costs the node a stream and a request, the peer nothing.
    SUBMIT_REFUSALS_MAX refusals in a row (nothing accepted between) cut the peer off;
    a SUBMIT accepted in between starts the count again, and other peers are not
    affected."""
    w = World(tmp_path)
    now = [0.0]
    svc = _service(w, submit_rate=1.0, submit_burst=16.0, clock=lambda: now[0])
    blocked: list[bytes] = []
    svc._block = blocked.append
    ch = Chain(seed=b"\x22" * 32, network=NET)

    def submit() -> bytes:
        return query.Submit((ch.next().wire,)).encode()

    flood = b"f" * 32
    await svc.handle(flood, query.Submit(tuple(ch.next().wire for _ in range(16))).encode())
    for _ in range(query.SUBMIT_REFUSALS_MAX - 1):
        with pytest.raises(RateLimited):
            await svc.handle(flood, submit())
    now[0] += 1.0  # it waited: accepted, and the count starts again
    await svc.handle(flood, submit())
    for _ in range(query.SUBMIT_REFUSALS_MAX - 1):
        with pytest.raises(RateLimited):
            await svc.handle(flood, submit())
    assert blocked == [] and svc.stats.submit_cut_off == 0
    with pytest.raises(RateLimited):
        await svc.handle(flood, submit())
    assert blocked == [flood] and svc.stats.submit_cut_off == 1
    assert svc.status()["submit_cut_off"] == 1
    other = b"o" * 32
    await svc.handle(other, query.Submit(tuple(ch.next().wire for _ in range(16))).encode())
    with pytest.raises(RateLimited):  # another peer: refused once, not cut off
        await svc.handle(other, submit())
    assert blocked == [flood]
