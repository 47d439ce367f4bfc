"""Dataplane memory (issue 12 item 6) on real libp2p hosts: bytes in flight per peer and
per node across process sessions, responses bounded by the declared expansion of the
services asked for, bounded `served` stats, sessions per peer."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import trio
from test_dataplane import (
    START,
    A,
    B,
    C,
    World,
    ident,
    make_lease,
    packets,
    reference,
    subcontracts,
    world,
)

from node.auction import Market, RankedOffer, rank_offers
from node.dataplane import DataplaneConfig, StreamFailed
from node.dataplane.budget import ByteBudget
from node.dataplane.contractors import choose, dial_target
from node.dataplane.wire import (
    SESSION_ERROR_ID,
    ProcessRequest,
    SessionResponse,
    process_protocol,
    session_protocol,
)
from node.errors import UsageError
from node.events import (
    Award,
    Bid,
    Members,
    Rating,
    Request,
    ServiceOffer,
    considered_digest,
    sign_event,
)
from node.keys import Identity
from node.p2p import P2PHost, RequestRefused, read_frame, request, write_frame
from node.processors import ProcessContext, load_processors, output_bounds
from node.processors.pool import WorkerPool
from node.reputation import Score

NET = "dptest"
U64 = struct.Struct(">Q")


@dataclass(frozen=True)
class JunkAesGcm:
    """An "aes-gcm" answering 64 times its input in zeros. Inline (run in-process by
    the dispatcher), so it needs no pickling into workers."""

    name: str = "aes-gcm"
    inline: ClassVar[bool] = True

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        return bytes(64 * len(data) + 4096)


# ------------------------------------------------------------------------ pure parts


def test_output_bounds_hold_for_builtins_and_cap_the_rest() -> None:
    procs = load_processors()
    ctx = ProcessContext(bytes(32), b"s", 0, bytes(32))
    data = hashlib.sha256(b"x").digest() * 5000  # 160 kB, barely compressible
    for chain in (("zstd",), ("zstd", "aes-gcm"), ("aes-gcm", "sha256"), ("identity",)):
        bounds = output_bounds(procs, chain, len(data), 64 << 20)
        out = data
        for i, name in enumerate(chain):
            out = procs[name].process(out, ctx.at_step(i))
            assert len(out) <= bounds[i], (chain, i)
    assert output_bounds(procs, ("zstd-d",), 10, 1 << 20) == [1 << 20]  # the bomb cap
    assert output_bounds({}, ("plugin",), 10, 5000) == [5000]  # undeclared: the cap


async def test_byte_budget_per_peer_and_total() -> None:
    b = ByteBudget(per_peer=100, total=150)
    p, q, r = b"p", b"q", b"r"
    await b.acquire(p, 60)
    await b.acquire(q, 60)
    got: list[str] = []

    async def take(who: bytes, n: int, tag: str) -> None:
        await b.acquire(who, n)
        got.append(tag)

    async with trio.open_nursery() as n:
        n.start_soon(take, p, 50, "p over its share")  # 110 > 100 for p
        n.start_soon(take, r, 40, "r over the total")  # 160 > 150 in all
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and b.waited == 2
        b.release(q, 60)
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["r over the total"]
        b.release(p, 60)
    assert sorted(got) == ["p over its share", "r over the total"]
    assert b.used == 90 and b.by_peer == {p: 50, r: 40}
    b.release(p, 50)
    b.release(r, 40)
    assert b.used == 0 and b.by_peer == {}
    await b.acquire(p, 500)  # larger than a share: admitted when p holds nothing
    assert b.used == 500
    b.release(p, 500)
    b.charge(q, 0)
    assert b.by_peer == {}
    with pytest.raises(UsageError):
        b.release(q, 1)


# ------------------------------------------------------------------------ real hosts


async def test_junk_answer_is_refused_unread_and_redispatched() -> None:
    """A subcontractor answering far more than the step can produce: the hirer refuses
    the answer after its length, before reading it, and C does the work."""
    lease = make_lease()
    pkts = packets(200, seed=21)
    junk = WorkerPool({"aes-gcm": JunkAesGcm()}, 1)
    async with junk, world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)], "C": [("aes-gcm", 5)]},
                           pools={"B": junk}) as w:
        w.leases[lease.id] = lease
        with trio.fail_after(60):
            res = await w.stream("M", lease, pkts)
        assert res.trailer.ok and res.output == reference(pkts, lease, res.stream_id)
        a = w.nodes["A"].svc
        assert a.counters["contractor_oversized"] >= 1 and res.trailer.redispatched >= 1
        assert a.counters["contractor_garbage"] >= 1
        assert w.nodes["C"].svc.served[w.nodes["A"].host.pubkey]["segments"] > 0


async def open_session(frm: P2PHost, to: P2PHost) -> object:
    await frm.connect(to.addrs[0])
    return await frm.new_stream(to.peer_id, session_protocol(NET))


async def test_requests_wait_for_the_peer_budget_and_never_leak() -> None:
    """Two sessions of one peer send more than its byte budget without reading: the
    contractor holds at most the budget (it stops reading), answers every request,
    and ends with nothing charged."""
    lease = make_lease(chain=("identity",))
    cfg = DataplaneConfig(window=8, process_peer_bytes=150_000, process_total_bytes=300_000)
    async with world({"A": [("zstd", 1)], "B": [("identity", 1)]}, configs={"B": cfg}) as w:
        w.leases[lease.id] = lease
        a, b = w.nodes["A"].host, w.nodes["B"].svc
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, b.budget.by_peer.get(a.pubkey, 0))
                await trio.sleep(0)

        async def session(k: int) -> None:
            s = await open_session(a, w.nodes["B"].host)
            data = bytes([k]) * 60_000

            async def send() -> None:
                for i in range(6):
                    req = ProcessRequest(lease.id, b"s%d" % k, i, 0, ("identity",), None, data)
                    await write_frame(s, data, 20.0, req.encode_head(i))  # type: ignore[arg-type]

            async with trio.open_nursery() as n:
                n.start_soon(send)
                seen = set()
                for _ in range(6):
                    frame = await read_frame(s, 1 << 20, 20.0)  # type: ignore[arg-type]
                    r = SessionResponse.decode(frame, 1)
                    assert r.ok and r.outputs == (data,)
                    seen.add(r.request_id)
                assert seen == set(range(6))

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(watch)
                async with trio.open_nursery() as sessions:
                    sessions.start_soon(session, 1)
                    sessions.start_soon(session, 2)
                n.cancel_scope.cancel()
        # Requests in flight (60 kB each) plus the outputs produced for them.
        assert 0 < peak <= 150_000 + 2 * 60_000
        assert b.budget.waited > 0
        assert b.budget.used == 0 and b.budget.by_peer == {}
        assert b.counters["process_served"] == 12


async def test_sessions_per_peer_and_single_requests_share_the_budget() -> None:
    lease = make_lease(chain=("identity",))
    cfg = DataplaneConfig(window=8, process_sessions_per_peer=2)
    async with world({"A": [("zstd", 1)], "B": [("identity", 1)]}, configs={"B": cfg}) as w:
        w.leases[lease.id] = lease
        a, bh, b = w.nodes["A"].host, w.nodes["B"].host, w.nodes["B"].svc
        held = [await open_session(a, bh) for _ in range(2)]
        with trio.fail_after(20):
            while b.stats()["process_sessions"]["serving"] < 2:
                await trio.sleep(0.02)
        third = await open_session(a, bh)
        resp = SessionResponse.decode(await read_frame(third, 4096, 10.0), None)  # type: ignore[arg-type]
        assert resp.request_id == SESSION_ERROR_ID and resp.reason == "busy"
        assert b.counters["process_refused:busy"] == 1
        # /process/1 goes through the same budget and is answered.
        req = ProcessRequest(lease.id, b"s", 0, 0, ("identity",), None, b"y" * 1000)
        reply = await request(a, bh.peer_id, process_protocol(NET), req.encode(), 1 << 20, 10.0)
        assert reply == bytes([1]) + struct.pack(">I", 1000) + b"y" * 1000
        # An oversized single request is answered without being read.
        big = replace(req, data=bytes(b._max_request))
        with pytest.raises(RequestRefused) as e:
            await request(a, bh.peer_id, process_protocol(NET), big.encode(), 1 << 20, 10.0)
        assert e.value.reason == "oversized"
        assert b.counters["process_refused:oversized"] == 1
        for s in held:
            await s.reset()  # type: ignore[attr-defined]
        assert b.budget.used == 0


async def test_leases_without_a_max_rate_are_capped_per_requester_at_the_offer() -> None:
    """Issue 12: a lease without a max rate has no volume, and anyone can make one; the
    contractor processes at most its offer's capacity per requesting key (bursts of
    process_rate_burst_s), refusing beyond with `over_rate`; a lease with a max rate
    keeps its own volume bound instead."""
    free = make_lease(chain=("identity",))
    rated = make_lease(id=hashlib.sha256(b"lease-rated").digest(), chain=("identity",),
                       max_rate_bps=8_000_000)
    cfg = DataplaneConfig(window=8, process_rates=(("zstd", 1_000),),
                          process_rate_burst_s=20.0)  # identity: our largest offer's rate
    async with world({"A": [("zstd", 1)], "B": [("identity", 1)]}, configs={"B": cfg}) as w:
        w.leases.update({free.id: free, rated.id: rated})
        a, bh, b = w.nodes["A"].host, w.nodes["B"].host, w.nodes["B"].svc
        await a.connect(bh.addrs[0])

        async def ask(lease_id: bytes, n: int) -> str:
            req = ProcessRequest(lease_id, b"s", 0, 0, ("identity",), None, b"r" * n)
            try:
                await request(a, bh.peer_id, process_protocol(NET), req.encode(), 1 << 20, 10)
            except RequestRefused as e:
                return e.reason
            return "ok"

        # A burst of 20 000 bytes, then refused: the rate is 1 000 bytes/s.
        assert [await ask(free.id, 10_000) for _ in range(2)] == ["ok", "ok"]
        got = await ask(free.id, 10_000)
        assert got in ("over_rate", "ok")  # refilled meanwhile on a very slow machine
        refused = [await ask(free.id, 10_000) for _ in range(3)]
        assert "over_rate" in [*refused, got]
        assert b.counters["process_refused:over_rate"] >= 1
        # A lease with a max rate is held by its own volume bound, not by this cap.
        assert await ask(rated.id, 30_000) == "ok"


async def test_served_stats_are_bounded() -> None:
    """`served` keeps the most recently served requesters only (and so does status)."""
    la = make_lease(chain=("identity",))
    lc = make_lease(id=hashlib.sha256(b"lease-c").digest(), provider=C.public,
                    chain=("identity",))
    cfg = DataplaneConfig(window=8, served_max=1)
    async with world({"A": [("zstd", 1)], "B": [("identity", 1)], "C": [("zstd", 1)]},
                     configs={"B": cfg}) as w:
        w.leases.update({la.id: la, lc.id: lc})
        bh, b = w.nodes["B"].host, w.nodes["B"].svc
        for name, lease in (("A", la), ("C", lc)):
            h = w.nodes[name].host
            await h.connect(bh.addrs[0])
            req = ProcessRequest(lease.id, b"s", 0, 0, ("identity",), None, b"z")
            await request(h, bh.peer_id, process_protocol(NET), req.encode(), 1 << 20, 10.0)
        assert list(b.served) == [C.public]
        assert list(b.stats()["served"]) == [C.public.hex()]
        assert b.counters["served_pruned"] == 1
        assert b.stats()["limits"]["served_max"] == 1


# ------------------------------------------------------------------------ whom we hire


def rated_market(w: World, subject: Identity, satisfied: bool, score: int) -> None:
    """A fresh market in which `subject` provided one lease and was rated for it, just
    before the providers' offers (which `world` applied) are applied again."""
    t = START - 100_000
    r = ident("recipient")
    req = sign_event(r.seed, 1, None, t, Request(
        service="aes-gcm", chain=(), start_ms=t + 2000, duration_ms=1000, max_rate_bps=None,
        min_rate_bps=None, members=Members(), reserve=1000, currency="EUR",
        close_ms=t + 1000, reveal_ms=t + 1000, rule="lowest", sealed=False, group=False), NET)
    bid = sign_event(subject.seed, 1, None, t + 10, Bid(request=req.id, price=10), NET)
    aw = sign_event(r.seed, 2, req.id, t + 1100, Award(
        request=req.id, winner=bid.id, price=10, considered=(bid.id,),
        considered_digest=considered_digest([bid.id]), considered_count=1), NET)
    rt = sign_event(r.seed, 3, aw.id, t + 4000, Rating(
        lease=aw.id, subject=subject.public, role="provider", satisfied=satisfied,
        score=score), NET)
    offers = [e for e in w.market.offers.values()]
    w.market = Market()
    for ev in (req, bid, aw, rt):
        w.market.apply(ev)
    assert not w.market.ignored
    for rec in sorted(offers, key=lambda o: o.provider):
        w.offer(next(i for i in (A, B, C) if i.public == rec.provider),
                [(s.name, s.price) for s in rec.offer.services], list(rec.offer.addrs),
                START + 10)


async def test_rated_provider_is_hired_before_an_unrated_stranger() -> None:
    """C is rated (one unsatisfied 3-star rating: ~0.42, below the unrated prior 0.5,
    above the default minimum 0.4); B is an unrated stranger with a cheaper offer."""
    lease = make_lease()
    pkts = packets(60, seed=22)
    async with world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)], "C": [("aes-gcm", 5)]}) as w:
        w.leases[lease.id] = lease
        rated_market(w, C, satisfied=False, score=3)
        ranked = rank_offers(w.market, "aes-gcm", w.clock(), exclude=A.public)
        assert [r.provider for r in ranked] == [B.public, C.public]  # reputation alone
        res = await w.stream("M", lease, pkts)
        assert res.trailer.ok and res.output == reference(pkts, lease, res.stream_id)
        assert [s.contractor for s in subcontracts(w.nodes["A"])] == [C.public]
        assert not w.nodes["B"].svc.served


async def test_rated_provider_below_the_minimum_is_never_hired() -> None:
    lease = make_lease()
    pkts = packets(60, seed=23)
    strict = DataplaneConfig(window=8, contractor_unrated="never")
    async with world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)], "C": [("aes-gcm", 5)]},
                     configs={"A": strict}) as w:
        w.leases[lease.id] = lease
        rated_market(w, C, satisfied=False, score=1)  # 0.33: below 0.4
        with pytest.raises(StreamFailed) as e:  # nobody acceptable: refused up front
            await w.stream("M", lease, pkts)
        assert e.value.reason == "unknown_service"
        assert not w.nodes["B"].svc.served and not w.nodes["C"].svc.served
        assert w.nodes["A"].svc.counters["contractors_passed_over"] >= 2


async def test_offer_addresses_outside_the_policy_are_not_dialed() -> None:
    """B's offer lists only loopback addresses; A's address policy denies them: A never
    dials B and the stream fails cleanly (the default policy refuses every non-global
    address in the same way; the test world allows loopback explicitly)."""
    lease = make_lease()
    deny = DataplaneConfig(window=8, contractor_addrs_deny=("127.0.0.0/8",))
    async with world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)]}, configs={"A": deny}) as w:
        w.leases[lease.id] = lease
        w.offer(B, [("aes-gcm", 1)], ["/ip4/10.1.2.3/tcp/4001", "/dns4/localhost/tcp/1",
                                      "/ip4/127.0.0.1/udp/9", *w.nodes["B"].host.addrs],
                START + 100)
        with pytest.raises(StreamFailed) as e:
            await w.stream("M", lease, packets(20, seed=24))
        assert e.value.reason == "processing_failed"
        assert "address policy" in str(e.value)
        a = w.nodes["A"]
        assert not a.host.is_connected(w.nodes["B"].host.peer_id)
        c = a.svc.counters
        assert c["contractor_addr_refused:private_destination"] >= 1  # 10.1.2.3
        assert c["contractor_addr_refused:egress_denied"] >= 2  # loopback, localhost
        assert c["contractor_addr_refused:unsupported"] >= 1  # udp
        assert not w.nodes["B"].svc.served


def test_choose_and_dial_target() -> None:
    def ro(name: str, ppm: int, ratings: int) -> RankedOffer:
        score = Score(name.encode(), "provider", 0, ppm, ratings, 0, 0, 0, 0)
        return RankedOffer(name.encode(), ServiceOffer(name="x", price=1, capacity=1), "EUR",
                           (), score, bytes(32))

    fresh, good, bad = ro("fresh", 500_000, 0), ro("good", 450_000, 3), ro("bad", 100_000, 9)
    ranked = [fresh, good, bad]
    assert choose(ranked, "fallback", 400_000) == [good]
    assert choose([fresh, bad], "fallback", 400_000) == [fresh]
    assert choose([fresh, bad], "never", 400_000) == []
    assert choose(ranked, "always", 400_000) == [fresh, good]
    with pytest.raises(UsageError):
        choose(ranked, "sometimes", 0)
    assert dial_target("/ip4/1.2.3.4/tcp/4001") == ("ip4", "1.2.3.4", 4001, "")
    assert dial_target("/dns/example.org/tcp/1/p2p/Qm") == ("dns", "example.org", 1, "/p2p/Qm")
    for bad_addr in ("/ip4/1.2.3.4/udp/1", "/ip6/1.2.3.4/tcp/1", "/ip4/x/tcp/1",
                     "/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4/tcp/99999", "/unix/a", ""):
        assert dial_target(bad_addr) is None, bad_addr


async def test_contractor_that_has_not_seen_the_lease_yet_is_asked_again() -> None:
    """The award reaches B a moment after A starts streaming: B answers `no_lease`, A
    asks again (not held against B) and the stream completes through B."""
    lease = make_lease()
    pkts = packets(40, seed=25)
    async with world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)]}) as w:
        w.leases[lease.id] = lease
        b = w.nodes["B"].svc
        known = trio.Event()
        b.lease_lookup = lambda lid: w.leases.get(lid) if known.is_set() else None

        async def gossip_arrives() -> None:
            while not b.counters["process_refused:no_lease"]:
                await trio.sleep(0.01)
            known.set()

        async with trio.open_nursery() as n:
            n.start_soon(gossip_arrives)
            res = await w.stream("M", lease, pkts)
        assert res.trailer.ok and res.output == reference(pkts, lease, res.stream_id)
        a = w.nodes["A"].svc
        assert a.counters["contractor_no_lease"] >= 1
        assert a.counters["contractor_failed"] == 0 and not a.dispatcher.is_bad(B.public)
        assert [s.contractor for s in subcontracts(w.nodes["A"])] == [B.public]
