"""Dataplane end to end on real libp2p hosts over loopback (one trio run per test)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import trio

from node.auction import Lease, Market, make_delegation
from node.dataplane import (
    DataplaneConfig,
    DataplaneService,
    LeaseRefused,
    SegmentLimits,
    StreamFailed,
    member_key,
    split_results,
    stream_protocol,
    stream_through_lease,
)
from node.dataplane.wire import TRAILER_SEQ, ProcessRequest, Trailer, process_protocol
from node.events import Body, Offer, ServiceOffer, Subcontract, Usage, sign_event
from node.keys import Identity
from node.p2p import P2PHost, RequestRefused, open_host, read_frame, request
from node.processors import ProcessContext, load_processors, run_chain
from node.processors.builtin import Identity as IdentityProc
from node.processors.pool import WorkerPool
from node.segments import MpegTs, Packet, decode_packets, encode_lp, local_reference

NET = "dptest"
START = 1_800_000_000_000
LIMITS = SegmentLimits(max_packets=16, max_bytes=64 << 10)
CHAIN = ("zstd", "aes-gcm")


def ident(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"dataplane-test:" + name.encode()).digest())


M, M2, X, D = ident("member"), ident("member2"), ident("outsider"), ident("device")
A, B, C = ident("provider-a"), ident("provider-b"), ident("provider-c")


def make_lease(**kw: Any) -> Lease:
    d: dict[str, Any] = dict(
        id=hashlib.sha256(b"lease-1").digest(), request=bytes(32), bid=bytes(32),
        provider=A.public, recipient=M.public, service="zstd", chain=CHAIN,
        start_ms=START, end_ms=START + 3_600_000, max_rate_bps=None, min_rate_bps=None,
        price=100, currency="EUR", devices=(), phones=(), users=("alice",), max_devices=None,
        group_members=(), payers=(), sponsorships=())
    d.update(kw)
    return Lease(**d)


def packets(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghij klmnop", k=rng.randint(3, 9))) for _ in range(300)]
    return [b" ".join(rng.choices(words, k=rng.randint(10, 600))) for _ in range(n)]


def reference(pkts: list[bytes], lease: Lease, stream_id: bytes, member: Identity = M,
              chains: tuple[tuple[str, ...], ...] = (CHAIN,),
              limits: SegmentLimits = LIMITS) -> bytes:
    return local_reference([Packet(p) for p in pkts], chains, max_packets=limits.max_packets,
                           max_bytes=limits.max_bytes, lease_id=lease.id, stream_id=stream_id,
                           key=member_key(member, lease))


@dataclass
class Node:
    host: P2PHost
    svc: DataplaneService
    published: list[Body]
    scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)

    async def stop(self) -> None:
        # Close our connections while the peers still run: a connection whose remote
        # closes it during our own shutdown has its socket close cancelled upstream
        # (SwarmConn cleanup runs in the swarm's manager), a ResourceWarning.
        for peer in self.host.connected_peers():
            await self.host.disconnect(peer)
        self.scope.cancel()
        await self.done.wait()


@dataclass
class World:
    pool: WorkerPool
    market: Market = field(default_factory=Market)
    leases: dict[bytes, Lease] = field(default_factory=dict)
    now: list[int] = field(default_factory=lambda: [START + 1000])
    nodes: dict[str, Node] = field(default_factory=dict)
    members: dict[str, P2PHost] = field(default_factory=dict)

    def clock(self) -> int:
        return self.now[0]

    def offer(self, who: Identity, services: list[tuple[str, int]], addrs: list[str],
              ts: int) -> None:
        body = Offer(services=tuple(ServiceOffer(name=s, price=p, capacity=1000)
                                    for s, p in services), currency="EUR", addrs=tuple(addrs))
        self.market.apply(sign_event(who.seed, 1, None, ts, body, NET))

    async def stream(self, who: str, lease: Lease, pkts: list[bytes], *,
                     member: Identity = M, provider: str = "A",
                     chains: tuple[tuple[str, ...], ...] = (CHAIN,), **kw: Any) -> Any:
        host = self.members[who]
        prov = self.nodes[provider].host
        await host.connect(prov.addrs[0])
        src = kw.pop("source", None) or [encode_lp(pkts[i : i + 8])
                                           for i in range(0, len(pkts), 8)]
        with trio.fail_after(60):
            return await stream_through_lease(
                host, prov.peer_id, lease, member, src, kw.pop("protocol", "lp"), chains,
                network=NET, limits=kw.pop("limits", LIMITS), timeout=20.0, **kw)


@asynccontextmanager
async def world(offers: dict[str, list[tuple[str, int]]],
                configs: dict[str, DataplaneConfig] | None = None,
                pools: dict[str, WorkerPool] | None = None) -> AsyncIterator[World]:
    """Providers A, B, C (A offers `offers["A"]`...) and member hosts M, M2, X, D."""
    ids = {"A": A, "B": B, "C": C}
    async with AsyncExitStack() as stack:
        pool = WorkerPool(load_processors(), 2)
        await stack.enter_async_context(pool)
        w = World(pool)
        nursery = await stack.enter_async_context(trio.open_nursery())
        for name in ("A", "B", "C"):
            cfg = (configs or {}).get(name) or DataplaneConfig(window=8)
            services = frozenset(s for s, _ in offers.get(name, []))
            # Every host is on loopback: allowed explicitly (the default refuses it).
            cfg = replace(cfg, services=services, subcontract_timeout_s=5.0, bad_for_s=60.0,
                          contractor_addrs_allow=cfg.contractor_addrs_allow or ("127.0.0.0/8",))
            node = await nursery.start(_run_provider, w, ids[name], cfg,
                                       (pools or {}).get(name, pool))
            w.nodes[name] = node
        for name in ("C", "B", "A"):  # LIFO: A (who dials B and C) stops first
            stack.push_async_callback(w.nodes[name].stop)
        for i, name in enumerate(sorted(offers)):
            w.offer(ids[name], offers[name], w.nodes[name].host.addrs, START + i)
        for name, who in (("M", M), ("M2", M2), ("X", X), ("D", D)):
            w.members[name] = await stack.enter_async_context(open_host(who.seed))
        yield w


async def _run_provider(w: World, who: Identity, cfg: DataplaneConfig, pool: WorkerPool,
                        task_status: trio.TaskStatus[Node]) -> None:
    done = trio.Event()
    try:
        with trio.CancelScope() as scope:
            async with open_host(who.seed) as host:
                published: list[Body] = []
                svc = DataplaneService(host, who, NET, w.leases.get, lambda: w.market, pool,
                                       published.append, w.clock, cfg)
                svc.install()
                task_status.started(Node(host, svc, published, scope, done))
                await svc.run()
    finally:
        done.set()


def subcontracts(node: Node) -> list[Subcontract]:
    return [b for b in node.published if isinstance(b, Subcontract)]


# ------------------------------------------------------------------------ end to end


async def test_subcontracts_missing_service_and_output_is_exact() -> None:
    lease = make_lease()
    pkts = packets(300)
    async with world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)], "C": [("aes-gcm", 5)]}) as w:
        w.leases[lease.id] = lease
        with trio.fail_after(60):
            res = await w.stream("M", lease, pkts)
        assert res.trailer.ok and res.frames == res.trailer.segments > 4
        assert res.output == reference(pkts, lease, res.stream_id)
        # The member can undo the chain with its own copy of the per-lease key.
        procs = load_processors()
        back: list[bytes] = []
        for seq, result in split_results(res.output):
            ctx = ProcessContext(lease.id, res.stream_id, seq, res.key)
            plain = run_chain(procs, ("aes-gcm-d",), result, ctx)
            back += decode_packets(run_chain(procs, ("zstd-d",), plain, ctx))
        assert back == pkts
        a = w.nodes["A"]
        (sub,) = subcontracts(a)
        assert sub.contractor == B.public and sub.services == ("aes-gcm",)
        assert sub.segments == res.frames and sub.lease == lease.id
        assert w.nodes["B"].svc.served[A.public]["segments"] == res.frames
        assert w.nodes["C"].svc.served == {}
        usage = await a.svc.close_lease(lease.id)
        assert usage is not None and usage in a.published and usage.subcontracts == 1
        (mu,) = usage.members
        assert mu.member == M.public and mu.segments == res.frames and mu.bytes_in > 0
        assert await a.svc.close_lease(lease.id) is None
        with pytest.raises(LeaseRefused) as e:
            await w.stream("M", lease, pkts[:5])
        assert e.value.reason == "lease_closed"


async def test_contractor_killed_mid_stream_moves_to_next() -> None:
    lease = make_lease()
    pkts = packets(1200, seed=2)
    async with world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)], "C": [("aes-gcm", 5)]}) as w:
        w.leases[lease.id] = lease
        got: list[bytes] = []

        async def sink(frame: bytes) -> None:
            got.append(frame)
            if len(got) == 5:
                w.nodes["B"].scope.cancel()  # B's host closes: its connections drop

        with trio.fail_after(60):
            res = await w.stream("M", lease, pkts, sink=sink)
        assert res.trailer.ok
        assert b"".join(got) == reference(pkts, lease, res.stream_id)
        subs = {s.contractor: s for s in subcontracts(w.nodes["A"])}
        assert C.public in subs and subs[C.public].segments > 0
        assert sum(s.segments for s in subs.values()) == res.frames
        # B went away (reset, closed, or cut off mid-answer: whichever A saw first); it
        # did not lie.
        counters = w.nodes["A"].svc.counters
        assert counters["contractor_failed"] >= 1 and counters["contractor_garbage"] == 0


async def test_garbage_from_contractor_is_redispatched() -> None:
    lease = make_lease()
    pkts = packets(120, seed=3)
    # B's "aes-gcm" returns its input unchanged: well-formed for nothing.
    liar = WorkerPool({"aes-gcm": IdentityProc(name="aes-gcm")}, 1)
    async with liar, world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)], "C": [("aes-gcm", 5)]},
                           pools={"B": liar}) as w:
        w.leases[lease.id] = lease
        with trio.fail_after(60):
            res = await w.stream("M", lease, pkts)
        assert res.trailer.ok and res.output == reference(pkts, lease, res.stream_id)
        a = w.nodes["A"].svc
        assert a.counters["contractor_garbage"] >= 1 and res.trailer.redispatched >= 1
        assert [s.contractor for s in subcontracts(w.nodes["A"])] == [C.public]


async def test_nobody_can_process_fails_cleanly() -> None:
    lease = make_lease()
    liar = WorkerPool({"aes-gcm": IdentityProc(name="aes-gcm")}, 1)
    async with liar, world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)]}, pools={"B": liar}) as w:
        w.leases[lease.id] = lease
        with trio.fail_after(60), pytest.raises(StreamFailed) as e:
            await w.stream("M", lease, packets(40))
        assert e.value.reason == "processing_failed" and "nobody could process" in str(e.value)


async def test_shared_lease_max_rate_holds_for_all_members() -> None:
    rate = 100_000  # bytes/s for the whole lease
    lease = make_lease(max_rate_bps=rate * 8, group_members=(M2.public,), chain=("identity",))
    pkts = packets(400, seed=4)
    half = len(pkts) // 2
    async with world({"A": [("identity", 1)]}) as w:
        w.leases[lease.id] = lease
        results: dict[str, Any] = {}

        async def one(name: str, who: Identity, part: list[bytes]) -> None:
            results[name] = await w.stream(name, lease, part, member=who, chains=(("identity",),))

        t0 = trio.current_time()
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(one, "M", M, pkts[:half])
                n.start_soon(one, "M2", M2, pkts[half:])
        elapsed = trio.current_time() - t0
        total = results["M"].trailer.bytes_in + results["M2"].trailer.bytes_in
        burst = w.nodes["A"].svc._leases[lease.id].bucket.burst_bytes  # type: ignore[union-attr]
        # Loose: at most burst + rate·t bytes may have passed.
        assert total > 2 * burst and total <= burst + rate * elapsed * 1.1, (total, elapsed)
        st = w.nodes["A"].svc.stats()["leases"][lease.id.hex()]
        assert st["rate_limited"] > 0 and set(st["members"]) == {M.public.hex(), M2.public.hex()}
        for name, who, part in (("M", M, pkts[:half]), ("M2", M2, pkts[half:])):
            r = results[name]
            assert r.output == reference(part, lease, r.stream_id, who, (("identity",),))


# ------------------------------------------------------------------------ refusals


async def test_refusals_are_clear_and_counted() -> None:
    lease = make_lease(chain=("identity",))
    async with world({"A": [("identity", 1)]}) as w:
        w.leases[lease.id] = lease
        one = (("identity",),)
        with pytest.raises(LeaseRefused) as e:
            await w.stream("X", lease, packets(3), member=X, chains=one)
        assert e.value.reason == "not_member"
        other = make_lease(id=hashlib.sha256(b"unknown").digest())
        with pytest.raises(LeaseRefused) as e:
            await w.stream("M", other, packets(3), chains=one)
        assert e.value.reason == "no_lease"
        w.now[0] = lease.end_ms
        with pytest.raises(LeaseRefused) as e:
            await w.stream("M", lease, packets(3), chains=one)
        assert e.value.reason == "outside_window"
        w.now[0] = lease.start_ms - 1
        with pytest.raises(LeaseRefused):
            await w.stream("M", lease, packets(3), chains=one)
        w.now[0] = lease.start_ms
        # A delegated device (label names a listed user) is admitted.
        token = make_delegation(M, lease.id, D.public, "alice")
        res = await w.stream("D", lease, packets(3), member=D, chains=one, delegation=token)
        assert res.trailer.ok
        # A chain the lease was not bought for (issue 13 item 2).
        with pytest.raises(LeaseRefused) as e:
            await w.stream("M", lease, packets(3), chains=(("nope",),))
        assert e.value.reason == "wrong_chain"
        nobody = make_lease(id=hashlib.sha256(b"nobody").digest(), chain=("nope",))
        w.leases[nobody.id] = nobody
        with pytest.raises(StreamFailed) as e:
            await w.stream("M", nobody, packets(3), chains=(("nope",),))
        assert e.value.reason == "unknown_service"
        c = w.nodes["A"].svc.counters
        assert c["refused:not_member"] == 1 and c["refused:no_lease"] == 1
        assert c["refused:outside_window"] == 2 and c["refused:unknown_service"] == 1
        assert c["refused:wrong_chain"] == 1


async def test_oversized_packet_fails_stream_cleanly() -> None:
    lease = make_lease(chain=("identity",))
    cfg = DataplaneConfig(window=8, max_packet=4096)
    async with world({"A": [("identity", 1)]}, configs={"A": cfg}) as w:
        w.leases[lease.id] = lease
        pkts = [b"x" * 100, b"y" * 5000, b"z" * 10]
        with trio.fail_after(30), pytest.raises(StreamFailed) as e:
            await w.stream("M", lease, pkts, chains=(("identity",),),
                           source=[encode_lp(pkts[:1]), encode_lp(pkts[1:])])
        assert e.value.reason == "oversized_packet"
        assert w.nodes["A"].svc.counters["streams_failed:oversized_packet"] == 1


async def test_ts_garbage_between_packets_resyncs() -> None:
    lease = make_lease(chain=("sha256",))
    rng = random.Random(5)
    # Payloads without 0x47, so that no random byte pair can fake a sync.
    ts = [bytes([0x47, 0x01, 0x00]) + rng.randbytes(185).replace(b"\x47", b"\x00")
          for _ in range(60)]
    raw = bytearray()
    for i, p in enumerate(ts):
        raw += p
        if i % 7 == 3:
            raw += b"\x00garbage\x47\x13" * (i % 3 + 1)  # junk, with a lone sync byte
    parser = MpegTs(n_chains=1)
    expected_pkts = parser.feed(bytes(raw)) + parser.end()
    assert [p.data for p in expected_pkts] == ts
    async with world({"A": [("sha256", 1)]}) as w:
        w.leases[lease.id] = lease
        with trio.fail_after(30):
            res = await w.stream("M", lease, [], chains=(("sha256",),), protocol="ts",
                                 source=[bytes(raw[i : i + 1000])
                                         for i in range(0, len(raw), 1000)])
        assert res.trailer.ok and res.trailer.garbage_bytes == parser.garbage_bytes > 0
        assert res.output == reference(ts, lease, res.stream_id, chains=(("sha256",),))


async def test_slowloris_header_times_out() -> None:
    lease = make_lease(chain=("identity",))
    cfg = DataplaneConfig(window=8, header_timeout_s=0.5)
    async with world({"A": [("identity", 1)]}, configs={"A": cfg}) as w:
        w.leases[lease.id] = lease
        host = w.members["M"]
        a = w.nodes["A"].host
        await host.connect(a.addrs[0])
        stream = await host.new_stream(a.peer_id, stream_protocol(NET))
        await stream.write(b"\x00\x00\x10")  # three bytes of a header length, then silence
        frame = await read_frame(stream, 4096, 10.0)
        assert int.from_bytes(frame[:8], "big") == TRAILER_SEQ
        trailer = Trailer.decode(frame[8:])
        assert not trailer.ok and trailer.reason == "timeout"
        await stream.reset()
        assert w.nodes["A"].svc.counters["refused:timeout"] == 1


async def test_process_protocol_serves_known_providers_only() -> None:
    lease = make_lease()
    async with world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)]}) as w:
        w.leases[lease.id] = lease
        req = ProcessRequest(lease.id, b"s1", 0, 1, ("aes-gcm",), bytes(range(32)), b"data")
        x = w.members["X"]
        b = w.nodes["B"].host
        await x.connect(b.addrs[0])
        with pytest.raises(RequestRefused) as e:
            await request(x, b.peer_id, process_protocol(NET), req.encode(), 1 << 20, 5.0)
        assert e.value.reason == "unknown_provider"
        a = w.nodes["A"].host
        await a.connect(b.addrs[0])
        bad = replace(req, services=("zstd",))
        with pytest.raises(RequestRefused) as e:
            await request(a, b.peer_id, process_protocol(NET), bad.encode(), 1 << 20, 5.0)
        assert e.value.reason == "unknown_service"
        reply = await request(a, b.peer_id, process_protocol(NET), req.encode(), 1 << 20, 5.0)
        assert len(reply) == 1 + 4 + 12 + 4 + 16
        assert w.nodes["B"].svc.counters["process_refused:unknown_provider"] == 1


async def test_process_requests_need_the_lease_they_serve() -> None:
    """Issue 13 item 1: a request names its lease and is served only for that lease's
    provider, for services of its chain, in its window, within its volume."""
    lease = make_lease()  # A's lease, chain zstd → aes-gcm
    foreign = make_lease(id=hashlib.sha256(b"lease-c").digest(), provider=C.public)
    transport = make_lease(id=hashlib.sha256(b"lease-bw").digest(), service="bandwidth",
                           chain=())
    small = make_lease(id=hashlib.sha256(b"lease-small").digest(), max_rate_bps=8,
                       end_ms=START + 1000)
    cfg = DataplaneConfig(window=8, volume_floor=100, process_grace_ms=0)
    offers = {"A": [("zstd", 1)], "B": [("aes-gcm", 1), ("sha256", 1)], "C": [("zstd", 1)]}
    async with world(offers, configs={"B": cfg}) as w:
        for le in (lease, foreign, transport, small):
            w.leases[le.id] = le
        a, b = w.nodes["A"].host, w.nodes["B"].host
        await a.connect(b.addrs[0])
        req = ProcessRequest(lease.id, b"s1", 0, 1, ("aes-gcm",), bytes(range(32)), b"data")

        async def refused(r: ProcessRequest) -> str:
            with pytest.raises(RequestRefused) as e:
                await request(a, b.peer_id, process_protocol(NET), r.encode(), 1 << 20, 5.0)
            return e.value.reason

        assert await refused(replace(req, lease=hashlib.sha256(b"random").digest())) \
            == "no_lease"
        assert await refused(replace(req, lease=foreign.id)) == "not_lease_provider"
        assert await refused(replace(req, services=("sha256",))) == "not_in_chain"
        assert await refused(replace(req, step=2)) == "not_in_chain"  # past its position
        assert await refused(replace(req, lease=transport.id)) == "not_in_chain"
        w.now[0] = lease.end_ms
        assert await refused(req) == "outside_window"
        w.now[0] = START + 10
        # 8 bit/s for 1 s plus a 100-byte floor: 104 bytes of requests in all.
        ok = replace(req, lease=small.id, data=b"x" * 100)
        await request(a, b.peer_id, process_protocol(NET), ok.encode(), 1 << 20, 5.0)
        assert await refused(ok) == "over_volume"
        reply = await request(a, b.peer_id, process_protocol(NET), req.encode(), 1 << 20, 5.0)
        assert len(reply) == 1 + 4 + 12 + 4 + 16
        c = w.nodes["B"].svc.counters
        assert {k: v for k, v in c.items() if k.startswith("process_refused")} == {
            "process_refused:no_lease": 1, "process_refused:not_lease_provider": 1,
            "process_refused:not_in_chain": 3, "process_refused:outside_window": 1,
            "process_refused:over_volume": 1}
        assert c["process_served"] == 2


async def test_stream_chains_must_match_the_lease() -> None:
    """Issue 13 item 2: a bandwidth lease carries no processing; a processing lease
    allows its chain, a contiguous part of it, or pass-through."""
    bw = make_lease(service="bandwidth", chain=())
    zl = make_lease(id=hashlib.sha256(b"lease-z").digest(), service="zstd", chain=())
    async with world({"A": [("zstd", 1), ("identity", 1), ("aes-gcm", 1)]}) as w:
        w.leases[bw.id] = bw
        w.leases[zl.id] = zl
        pkts = packets(20, seed=9)
        for lease, chains in ((bw, (("zstd",),)), (bw, (("identity",), ("aes-gcm",))),
                              (zl, (("zstd", "aes-gcm"),)), (zl, (("aes-gcm",),))):
            with pytest.raises(LeaseRefused) as e:
                await w.stream("M", lease, pkts, chains=chains)
            assert e.value.reason == "wrong_chain"
        for lease, chains in ((bw, (("identity",),)), (zl, (("zstd",), ("identity",)))):
            res = await w.stream("M", lease, pkts, chains=chains)
            assert res.trailer.ok
        assert w.nodes["A"].svc.counters["refused:wrong_chain"] == 4


async def test_lease_end_stops_streams_and_publishes_usage() -> None:
    lease = make_lease(chain=("identity",), min_rate_bps=8 * 10_000_000)
    cfg = DataplaneConfig(window=8, lease_check_s=0.05)
    async with world({"A": [("identity", 1)]}, configs={"A": cfg}) as w:
        w.leases[lease.id] = lease
        served = trio.Event()

        async def source() -> AsyncIterator[bytes]:
            yield encode_lp(packets(20))
            await trio.sleep_forever()  # the member keeps the stream open

        async def sink(frame: bytes) -> None:
            served.set()

        async def end_lease() -> None:
            await served.wait()
            w.now[0] = lease.end_ms

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(end_lease)
                with pytest.raises(LeaseRefused) as e:
                    await w.stream("M", lease, [], chains=(("identity",),), source=source(),
                                   sink=sink)
        assert e.value.reason == "lease_ended"
        a = w.nodes["A"]
        with trio.fail_after(10):
            while not any(isinstance(b, Usage) for b in a.published):
                await trio.sleep(0.05)
        (usage,) = [b for b in a.published if isinstance(b, Usage)]
        assert usage.members[0].member == M.public and usage.members[0].bytes_in > 0
        assert usage.shortfall_ms > 0  # 10 MB/s minimum, a trickle delivered



async def test_time_cut_flushes_a_quiet_stream() -> None:
    lease = make_lease(chain=("identity",))
    async with world({"A": [("identity", 1)]}) as w:
        w.leases[lease.id] = lease
        first = trio.Event()
        pkts = packets(6, seed=6)

        async def source() -> AsyncIterator[bytes]:
            yield encode_lp(pkts[:3])  # fewer than max_packets: only age can cut it
            await first.wait()
            yield encode_lp(pkts[3:])

        async def sink(frame: bytes) -> None:
            first.set()

        res = await w.stream("M", lease, [], chains=(("identity",),), source=source(),
                             sink=sink, limits=SegmentLimits(16, 64 << 10, 50))
        assert res.trailer.ok and res.trailer.segments == 2 and res.trailer.packets == 6
