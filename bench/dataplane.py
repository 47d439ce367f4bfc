"""Dataplane throughput on loopback, side by side in one run:

  (a) raw py-libp2p stream: one-way frames, no dataplane, with the same frame reads and
      writes as the dataplane (node.p2p's read_frame/write_frame); also as a round trip
      through an echo (`raw_roundtrip_mb_s`): the same bytes each way as (b), so
      `direct_vs_roundtrip_ratio` is the dataplane's own cost. (b) moves every byte
      twice, so against the one-way figure it cannot pass 0.5 on any machine.
  (b) member → provider (service `identity`, inline) → member
  (c) member → provider → subcontractor (`identity`, which the provider lacks) → member

    .venv/bin/python bench/dataplane.py [--quick] [--mb N] [--roles split|same] [--rounds N]

Roles (default `split`): every role runs in its own process, as in reality: the raw
sender and receiver, the member, the provider, the subcontractor. On 2 cores, a
CPU-bound raw stream keeps both busy (one encrypts, one decrypts); (b) makes each
process do both, and (c) puts three processes, one of them doing it twice, on the
same two cores. `same`: all roles in this one process (the earlier set-up).

Figures: MB/s of input (best of `--rounds` rounds, each running (a), (b), (c) one
after the other), per-segment latency p50/p99 at the provider (segment cut → result
written), CPU seconds per process, peak RSS (the largest over the processes), and zstd
scaling (2 workers vs 1, as bench/zstd_scaling.py measures it). The output of every
run is checked against the local reference (hash of the expected frames, computed as
we go, so that 1 GB never sits in memory). Last line: JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from node.auction import Lease, Market
from node.dataplane import DataplaneConfig, DataplaneService, SegmentLimits, stream_through_lease
from node.events import Offer, ServiceOffer, sign_event
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
RAW_ECHO_PROTO = "/bidmesh-bench/raw-echo/1"


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


async def raw_send(a: P2PHost, peer: object, total: int) -> float:
    """Send `total` bytes in framed chunks, then an empty frame; time until the receiver
    acknowledges that it read everything (so the figure is end to end)."""
    stream: Any = await a.new_stream(peer, RAW_PROTO)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for c in chunks(total):
        await write_frame(stream, c, 30.0)
    await write_frame(stream, b"", 30.0)
    got = int(await read_frame(stream, 64, 120.0))
    secs = time.perf_counter() - t0
    await stream.close()
    return got / secs / 1e6


async def raw_roundtrip(a: P2PHost, peer: object, total: int) -> float:
    """Send `total` bytes in framed chunks to an echo and read them back, concurrently:
    the same bytes each way as (b), with no dataplane. MB/s of input, end to end."""
    stream: Any = await a.new_stream(peer, RAW_ECHO_PROTO)  # type: ignore[arg-type]
    got = sent = 0
    t0 = time.perf_counter()

    async def send() -> None:
        nonlocal sent
        for c in chunks(total):
            await write_frame(stream, c, 30.0)
            sent += len(c)
        await write_frame(stream, b"", 30.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while frame := await read_frame(stream, 1 << 20, 120.0):
            got += len(frame)
    secs = time.perf_counter() - t0
    await stream.close()
    if got != sent:
        raise RuntimeError(f"echo returned {got} of {sent} bytes")
    return got / secs / 1e6  # framed input bytes, as raw_send counts them


RECV_CPU: list[float] = [0.0]  # the raw receiver's CPU seconds for its last stream


def raw_receiver(b: P2PHost) -> None:
    async def sink(stream: Any) -> None:
        got, cpu0 = 0, time.process_time()
        while frame := await read_frame(stream, 1 << 20, 30.0):
            got += len(frame)
        RECV_CPU[0] = time.process_time() - cpu0
        await write_frame(stream, str(got).encode(), 30.0)

    async def echo(stream: Any) -> None:
        while frame := await read_frame(stream, 1 << 20, 30.0):
            await write_frame(stream, frame, 30.0)
        await write_frame(stream, b"", 30.0)

    set_stream_handler(b, RAW_PROTO, sink)
    set_stream_handler(b, RAW_ECHO_PROTO, echo)


async def through(member: P2PHost, provider: object, lease: Lease, total: int,
                  want: bytes) -> tuple[float, bool]:
    h = hashlib.sha256()

    async def sink(frame: bytes) -> None:
        h.update(frame)

    t0 = time.perf_counter()
    res = await stream_through_lease(member, provider, lease, MEMBER, chunks(total),  # type: ignore[arg-type]
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


LEASES = {lease.id: lease for lease in (lease_for(hashlib.sha256(b"direct").digest(), PROV),
                                        lease_for(hashlib.sha256(b"subcontract").digest(), PROV2))}
LEASE_B, LEASE_C = LEASES.values()
CONFIG = DataplaneConfig(window=8, remote_in_flight=4,
                         contractor_addrs_allow=("127.0.0.0/8",))  # all on loopback


def sub_offer(addrs: list[str]) -> Market:
    market = Market()
    market.apply(sign_event(SUB.seed, 1, None, 1, Offer(
        services=(ServiceOffer(name="identity", price=1, capacity=1 << 20),),
        currency="EUR", addrs=tuple(addrs)), NET))
    return market


def service(role: str, host: P2PHost, pool: WorkerPool, market: Market) -> DataplaneService:
    """`provider` serves `identity` itself; `provider2` offers nothing and subcontracts
    every segment to `sub`, which serves PROV2 (on its allow list)."""
    who = {"provider": PROV, "provider2": PROV2, "sub": SUB}[role]
    cfg = {"provider": CONFIG, "provider2": replace(CONFIG, services=frozenset()),
           "sub": replace(CONFIG, allow=frozenset({PROV2.public}))}[role]
    return DataplaneService(host, who, NET, LEASES.get, lambda: market, pool, lambda _: None,
                            config=cfg)


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


def report(out: dict[str, Any], raw_mb_s: float, direct_mb_s: float, ok_b: bool,
           lat: dict[str, float], sub_mb_s: float, ok_c: bool, lat_c: dict[str, float],
           served: int, rss: float, rt_mb_s: float) -> None:
    print(f"(a) raw libp2p stream        : {raw_mb_s:7.1f} MB/s one way, "
          f"{rt_mb_s:.1f} MB/s round trip (echo)", flush=True)
    print(f"(b) member → provider        : {direct_mb_s:7.1f} MB/s  "
          f"segment p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms  exact={ok_b}", flush=True)
    print(f"(c) member → provider → sub  : {sub_mb_s:7.1f} MB/s  "
          f"segment p50 {lat_c['p50']:.1f} ms p99 {lat_c['p99']:.1f} ms  exact={ok_c}  "
          f"(subcontractor served {served} segments)", flush=True)
    out.update(raw_mb_s=round(raw_mb_s, 1), direct_mb_s=round(direct_mb_s, 1),
               subcontract_mb_s=round(sub_mb_s, 1),
               direct_vs_raw_ratio=round(direct_mb_s / raw_mb_s, 3),
               subcontract_vs_raw_ratio=round(sub_mb_s / raw_mb_s, 3),
               seg_p50_ms=lat["p50"], seg_p99_ms=lat["p99"],
               subcontract_seg_p50_ms=lat_c["p50"], subcontract_seg_p99_ms=lat_c["p99"],
               peak_rss_mb=round(rss, 1), output_exact=ok_b and ok_c,
               raw_roundtrip_mb_s=round(rt_mb_s, 1),
               direct_vs_roundtrip_ratio=round(direct_mb_s / rt_mb_s, 3),
               subcontract_vs_roundtrip_ratio=round(sub_mb_s / rt_mb_s, 3))


# ------------------------------------------------------------------ one process (--roles same)


async def same_process(args: argparse.Namespace, out: dict[str, Any]) -> None:
    total = args.mb << 20
    want = expected_digest(total)
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
        market = sub_offer(sub.addrs)
        svcs = [service(r, h, pool, market)
                for r, h in (("provider", prov), ("provider2", prov2), ("sub", sub))]
        for svc in svcs:
            nursery.start_soon(svc.run)
        raw_receiver(prov)
        await member.connect(prov.addrs[0])
        raw_mb_s = await raw_send(member, prov.peer_id, total)
        rt_mb_s = await raw_roundtrip(member, prov.peer_id, total)
        direct_mb_s, ok_b = await through(member, prov.peer_id, LEASE_B, total, want)
        await member.connect(prov2.addrs[0])
        sub_mb_s, ok_c = await through(member, prov2.peer_id, LEASE_C, total, want)
        served = svcs[2].served.get(PROV2.public, {}).get("segments", 0)
        rss = peak_rss_mb()
        report(out, raw_mb_s, direct_mb_s, ok_b, svcs[0].stats()["segment_latency_ms"],
               sub_mb_s, ok_c, svcs[1].stats()["segment_latency_ms"], served, rss, rt_mb_s)
        print(f"peak RSS of this process (member + provider + subcontractor): {rss:.0f} MB",
              flush=True)


# ------------------------------------------------------------------ one process per role


def emit(tag: str, **fields: Any) -> None:
    print(tag, json.dumps(fields), flush=True)


async def child(args: argparse.Namespace) -> None:
    """One role in its own process. Servers print READY {addr, peer} and answer `stats`
    on stdin with STATS {...} until stdin closes; senders print RESULT {...} and exit."""
    role, total = args.child, args.mb << 20
    seed = {"raw-recv": PROV, "raw-send": MEMBER, "member": MEMBER, "provider": PROV,
            "provider2": PROV2, "sub": SUB}[role].seed
    async with AsyncExitStack() as stack:
        if role in ("raw-send", "member"):
            want = expected_digest(total) if role == "member" else b""
            host = await stack.enter_async_context(open_host(seed))
            peer = await host.connect(args.addr)
            cpu0 = time.process_time()
            if role == "raw-send":
                mb_s = await (raw_roundtrip(host, peer, total) if args.echo else
                              raw_send(host, peer, total))
                emit("RESULT", mb_s=mb_s,
                     rss=peak_rss_mb(),
                     cpu=time.process_time() - cpu0)
            else:
                mb_s, ok = await through(host, peer, LEASES[bytes.fromhex(args.lease)], total,
                                         want)
                emit("RESULT", mb_s=mb_s, exact=ok, rss=peak_rss_mb(),
                     cpu=time.process_time() - cpu0)
            return
        svc: DataplaneService | None = None
        if role != "raw-recv":
            pool = await stack.enter_async_context(WorkerPool(load_processors(), 2,
                                                              max_in_flight=4))
            await pool.start()
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        host = await stack.enter_async_context(open_host(seed))
        if role == "raw-recv":
            raw_receiver(host)
        else:
            svc = service(role, host, pool, sub_offer([args.addr] if args.addr else []))
            nursery.start_soon(svc.run)
        emit("READY", addr=host.addrs[0])
        cpu0 = time.process_time()
        while line := await trio.to_thread.run_sync(sys.stdin.readline,
                                                    abandon_on_cancel=True):
            if line.strip() == "stats":
                st = svc.stats() if svc else {}
                emit("STATS", rss=peak_rss_mb(), cpu=time.process_time() - cpu0, recv=RECV_CPU,
                     lat=st.get("segment_latency_ms"),
                     served=st.get("served", {}).get(PROV2.public.hex(), {}))


class Child:
    def __init__(self, args: argparse.Namespace, role: str, *extra: str) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", role, "--mb", str(args.mb), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def expect(self, tag: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])  # type: ignore[no-any-return]
            print(f"  [{self.role}] {line.rstrip()}", flush=True)
        raise RuntimeError(f"the {self.role} process exited ({self.proc.wait()}) "
                           f"before {tag}")

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self.expect("STATS")

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def split_processes(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Servers (raw receiver, provider, subcontractor, provider2) stay up for all rounds;
    each round runs a raw sender and two members, one after the other, so that a change
    in the machine's load hits the three alike. Each figure is its best round."""
    rss: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds each process spent in its last timed run

    def note(role: str, fields: dict[str, Any]) -> dict[str, Any]:
        rss[role] = max(rss.get(role, 0.0), fields["rss"])
        cpu[role] = fields["cpu"]
        return fields

    def run(role: str, label: str, *extra: str) -> dict[str, Any]:
        c = Child(args, role, *extra)
        try:
            return note(label, c.expect("RESULT"))
        finally:
            c.stop()

    servers: list[Child] = []
    try:
        servers += [Child(args, role) for role in ("raw-recv", "provider", "sub")]
        addr = {c.role: c.expect("READY")["addr"] for c in servers}
        servers.append(prov2 := Child(args, "provider2", "--addr", addr["sub"]))
        addr["provider2"] = prov2.expect("READY")["addr"]
        best = {"raw": 0.0, "raw_rt": 0.0, "direct": 0.0, "subcontract": 0.0}
        exact = True
        for i in range(args.rounds):
            raw = run("raw-send", "raw sender", "--addr", addr["raw-recv"])["mb_s"]
            raw_rt = run("raw-send", "raw round trip", "--addr", addr["raw-recv"],
                         "--echo")["mb_s"]
            d = run("member", "member (b)", "--addr", addr["provider"],
                    "--lease", LEASE_B.id.hex())
            c = run("member", "member (c)", "--addr", addr["provider2"],
                    "--lease", LEASE_C.id.hex())
            exact = exact and d["exact"] and c["exact"]
            for k, v in (("raw", raw), ("raw_rt", raw_rt),
                         ("direct", d["mb_s"]),
                         ("subcontract", c["mb_s"])):
                best[k] = max(best[k], v)
            print(f"  round {i + 1}: raw {raw:.1f} (round trip {raw_rt:.1f}), "
                  f"direct {d['mb_s']:.1f}, subcontract {c['mb_s']:.1f} MB/s", flush=True)
        stats = {c.role: note(c.role, c.stats()) for c in servers}
    finally:
        for c in servers:
            c.stop()
    per = {k: v / (args.rounds if k in stats else 1) for k, v in cpu.items()}
    per.pop("raw-recv")
    per["raw receiver"] = stats["raw-recv"]["recv"][0]
    print(f"  CPU s per {args.mb} MiB run (servers: mean of the rounds): "
          + ", ".join(f"{k} {v:.2f}" for k, v in per.items()), flush=True)
    mb = (args.mb << 20) / 1e6
    trio_ = [per["member (c)"], per["provider2"], per["sub"]]
    bound = {"raw": mb / max(per["raw sender"], per["raw receiver"]),
             "direct": mb / max(per["member (b)"], per["provider"]),
             "subcontract": mb / max(*trio_, sum(trio_) / (os.cpu_count() or 1))}
    print("  CPU-bound estimate (each process's CPU time, processes sharing "
          f"{os.cpu_count()} cores; not affected by other load): raw {bound['raw']:.1f}, "
          f"direct {bound['direct']:.1f} ({bound['direct'] / bound['raw']:.2f}), "
          f"subcontract {bound['subcontract']:.1f} ({bound['subcontract'] / bound['raw']:.2f})"
          " MB/s", flush=True)
    report(out, best["raw"], best["direct"], exact, stats["provider"]["lat"],
           best["subcontract"], exact, stats["provider2"]["lat"],
           stats["sub"]["served"].get("segments", 0), max(rss.values()), best["raw_rt"])
    print("peak RSS per process: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()),
          flush=True)


def main(args: argparse.Namespace) -> dict[str, Any]:
    print(f"streaming {args.mb} MiB per run, {PACKET >> 10} KiB packets, segments of "
          f"<= {LIMITS.max_bytes >> 10} KiB, roles in "
          f"{'one process' if args.roles == 'same' else 'one process each'}", flush=True)
    out: dict[str, Any] = {}
    if args.roles == "same":
        trio.run(same_process, args, out)
    else:
        split_processes(args, out)
    out["streamed_mb"] = args.mb
    out["roles"] = args.roles
    ratio = trio.run(zstd_scaling, args.quick)
    print(f"zstd through the pool, 2 workers vs 1: {ratio:.2f}x", flush=True)
    out["zstd_scaling_ratio"] = round(ratio, 3)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (< 60 s on 2 cores)")
    ap.add_argument("--mb", type=int, default=0, help="MiB per run (default 1024, quick 128)")
    ap.add_argument("--roles", choices=("split", "same"), default="split",
                    help="split (default): member, provider, subcontractor (and the raw "
                    "sender and receiver) each in their own process; same: all in this one")
    ap.add_argument("--rounds", type=int, default=2,
                    help="split roles: rounds of the three runs; each figure is its best")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--lease", help=argparse.SUPPRESS)
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.mb = a.mb or (128 if a.quick else 1024)
    if a.child:
        trio.run(child, a)
    else:
        print(json.dumps(main(a)))
