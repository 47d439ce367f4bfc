"""Dataplane throughput on loopback, side by side in one run:

  (a) raw py-libp2p stream: one-way framed writes, no dataplane
  (b) member → provider (service `identity`, local worker) → member
  (c) member → provider → subcontractor (`identity`, which the provider lacks) → member

    .venv/bin/python bench/dataplane.py [--quick] [--mb N] [--roles same|split]

Figures: MB/s of input, per-segment latency p50/p99 at the provider (segment cut →
result written), peak RSS of the process while streaming, and zstd scaling (2 workers
vs 1, as bench/zstd_scaling.py measures it). The output of every run is checked
against the local reference (hash of the expected frames, computed as we go, so that
1 GB never sits in memory). Last line: JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import trio

from node.auction import Lease, Market
from node.dataplane import DataplaneConfig, DataplaneService, SegmentLimits, stream_through_lease
from node.events import Body, Offer, ServiceOffer, sign_event
from node.keys import Identity
from node.p2p import P2PHost, open_host, read_frame, set_stream_handler, write_frame
from node.processors import load_processors
from node.processors.pool import WorkerPool
from node.segments import Packet, Segmenter, encode_frame, encode_lp

NET = "bench"
PACKET = 64 << 10
CHUNK_PACKETS = 4  # 256 KiB input frames
LIMITS = SegmentLimits(max_packets=64, max_bytes=1 << 20)
RAW_PROTO = "/bidmesh-bench/raw/1"


def ident(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"bench:" + name.encode()).digest())


MEMBER, PROV, PROV2, SUB = (ident(n) for n in ("member", "provider", "provider2", "sub"))
_BLOCKS = [os.urandom(PACKET - 8) for _ in range(16)]


def packets(total: int) -> Iterator[bytes]:
    for i in range(total // PACKET):
        yield i.to_bytes(8, "big") + _BLOCKS[i % len(_BLOCKS)]


def chunks(total: int) -> Iterator[bytes]:
    batch: list[bytes] = []
    for p in packets(total):
        batch.append(p)
        if len(batch) == CHUNK_PACKETS:
            yield encode_lp(batch)
            batch = []
    if batch:
        yield encode_lp(batch)


def expected_digest(total: int) -> bytes:
    """sha256 of the identity chain's output stream (= the local reference)."""
    h = hashlib.sha256()
    seg = Segmenter(LIMITS.max_packets, LIMITS.max_bytes, None)
    for p in packets(total):
        for s in seg.push(Packet(p), 0):
            h.update(encode_frame(s.seq, s.data))
    for s in seg.flush():
        h.update(encode_frame(s.seq, s.data))
    return h.digest()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def raw(a: P2PHost, b: P2PHost, total: int) -> float:
    done = trio.Event()
    got = 0

    async def sink(stream: object) -> None:
        nonlocal got
        while True:
            frame = await read_frame(stream, 1 << 20, 30.0)  # type: ignore[arg-type]
            if not frame:
                break
            got += len(frame)
        done.set()

    set_stream_handler(b, RAW_PROTO, sink)  # type: ignore[arg-type]
    await a.connect(b.addrs[0])
    stream = await a.new_stream(b.peer_id, RAW_PROTO)
    t0 = time.perf_counter()
    for c in chunks(total):
        await write_frame(stream, c, 30.0)
    await write_frame(stream, b"", 30.0)
    with trio.fail_after(120):
        await done.wait()
    secs = time.perf_counter() - t0
    await stream.close()
    return got / secs / 1e6


async def through(member: P2PHost, provider: P2PHost, lease: Lease, total: int,
                  want: bytes) -> tuple[float, bool]:
    h = hashlib.sha256()

    async def sink(frame: bytes) -> None:
        h.update(frame)

    await member.connect(provider.addrs[0])
    t0 = time.perf_counter()
    res = await stream_through_lease(member, provider.peer_id, lease, MEMBER, chunks(total),
                                     "lp", [["identity"]], network=NET, limits=LIMITS,
                                     sink=sink, stream_id=lease.id[:16], timeout=60.0)
    secs = time.perf_counter() - t0
    return res.trailer.bytes_in / secs / 1e6, h.digest() == want


def lease_for(lease_id: bytes, provider: Identity) -> Lease:
    return Lease(id=lease_id, request=bytes(32), bid=bytes(32), provider=provider.public,
                 recipient=MEMBER.public, service="identity", chain=("identity",),
                 start_ms=0, end_ms=1 << 62, max_rate_bps=None, min_rate_bps=None, price=0,
                 currency="EUR", devices=(), phones=(), users=(), max_devices=None,
                 group_members=(), payers=(), sponsorships=())


async def zstd_scaling(quick: bool) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    import zstd_scaling as zs  # the same measurement as bench/zstd_scaling.py

    segs = zs.make_segments(48 if quick else 128, 1 << 20)
    best = {1: 0.0, 2: 0.0}
    for _ in range(2 if quick else 3):
        for workers in (1, 2):
            secs, _ = await zs.through_pool(workers, segs, 3)
            best[workers] = max(best[workers], len(segs) / secs)
    return best[2] / best[1]


async def main(args: argparse.Namespace) -> dict[str, object]:
    total = args.mb << 20
    print(f"streaming {args.mb} MiB per run, {PACKET >> 10} KiB packets, segments of "
          f"<= {LIMITS.max_bytes >> 10} KiB", flush=True)
    want = expected_digest(total)
    market = Market()
    leases: dict[bytes, Lease] = {}
    published: list[Body] = []
    out: dict[str, object] = {}
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(WorkerPool(load_processors(), 2,
                                                          max_in_flight=4))
        await pool.start()
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        member = await stack.enter_async_context(open_host(MEMBER.seed))
        prov = await stack.enter_async_context(open_host(PROV.seed))
        prov2 = await stack.enter_async_context(open_host(PROV2.seed))
        sub = await stack.enter_async_context(open_host(SUB.seed))
        market.apply(sign_event(SUB.seed, 1, None, 1, Offer(
            services=(ServiceOffer(name="identity", price=1, capacity=1 << 20),),
            currency="EUR", addrs=tuple(sub.addrs)), NET))
        cfg = DataplaneConfig(window=8, remote_in_flight=4)
        svc_p = DataplaneService(prov, PROV, NET, leases.get, lambda: market, pool,
                                 published.append, config=cfg)
        # PROV2 offers nothing itself: every segment goes to SUB.
        svc_p2 = DataplaneService(prov2, PROV2, NET, leases.get, lambda: market, pool,
                                  published.append, config=replace(cfg, services=frozenset()))
        svc_s = DataplaneService(sub, SUB, NET, leases.get, lambda: market, pool,
                                 published.append,
                                 config=replace(cfg, allow=frozenset({PROV2.public})))
        for svc in (svc_p, svc_p2, svc_s):
            nursery.start_soon(svc.run)

        raw_mb_s = await raw(member, prov, total)
        print(f"(a) raw libp2p stream        : {raw_mb_s:7.1f} MB/s", flush=True)

        lease_b = lease_for(hashlib.sha256(b"direct").digest(), PROV)
        leases[lease_b.id] = lease_b
        direct_mb_s, ok_b = await through(member, prov, lease_b, total, want)
        lat = svc_p.stats()["segment_latency_ms"]
        print(f"(b) member → provider        : {direct_mb_s:7.1f} MB/s  "
              f"segment p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms  exact={ok_b}",
              flush=True)

        lease_c = lease_for(hashlib.sha256(b"subcontract").digest(), PROV2)
        leases[lease_c.id] = lease_c
        sub_mb_s, ok_c = await through(member, prov2, lease_c, total, want)
        lat_c = svc_p2.stats()["segment_latency_ms"]
        served = svc_s.served.get(PROV2.public, {})
        print(f"(c) member → provider → sub  : {sub_mb_s:7.1f} MB/s  "
              f"segment p50 {lat_c['p50']:.1f} ms p99 {lat_c['p99']:.1f} ms  exact={ok_c}  "
              f"(subcontractor served {served.get('segments', 0)} segments)", flush=True)
        rss = peak_rss_mb()
        print(f"peak RSS of this process (member + provider + subcontractor): {rss:.0f} MB",
              flush=True)
        out.update(raw_mb_s=round(raw_mb_s, 1), direct_mb_s=round(direct_mb_s, 1),
                   subcontract_mb_s=round(sub_mb_s, 1),
                   direct_vs_raw_ratio=round(direct_mb_s / raw_mb_s, 3),
                   subcontract_vs_raw_ratio=round(sub_mb_s / raw_mb_s, 3),
                   seg_p50_ms=lat["p50"], seg_p99_ms=lat["p99"],
                   subcontract_seg_p50_ms=lat_c["p50"], subcontract_seg_p99_ms=lat_c["p99"],
                   peak_rss_mb=round(rss, 1), output_exact=ok_b and ok_c,
                   streamed_mb=args.mb)
    ratio = await zstd_scaling(args.quick)
    print(f"zstd through the pool, 2 workers vs 1: {ratio:.2f}x", flush=True)
    out["zstd_scaling_ratio"] = round(ratio, 3)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (< 60 s on 2 cores)")
    ap.add_argument("--mb", type=int, default=0, help="MiB per run (default 1024, quick 128)")
    a = ap.parse_args()
    a.mb = a.mb or (128 if a.quick else 1024)
    result = trio.run(main, a)
    print(json.dumps(result))
