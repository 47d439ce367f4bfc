#!/usr/bin/env python3
"""Chaos: faults injected into a small network of real node processes while events
are published and streams run; nothing acknowledged may be lost.

    .venv/bin/python bench/chaos.py [--quick] [--nodes N] [--seed S]

N `bidmesh run` daemons (default 4) dial each other only through fault-injecting
loopback links (tests/reliability/netproxy.py: delay, jitter, retransmission-like
loss, resets, blackholes). A background publisher sends batches round-robin to the
live nodes the whole time and records every acknowledged event id; a member streams
256 KiB through node 0 (zstd, a real lease) every second over its own link and
checks the output byte for byte. The fault schedule:

1. slow and lossy links (40 ± 20 ms one way, 5 % chunks held for a retransmission
   timeout; the member's link too);
2. SIGKILL of a node, load continues, restart;
3. a partition into two halves (established connections stranded), then heal;
4. a hostile peer gossiping forged, malformed, oversized and wrong-version messages
   to node 1 until it is cut off (forged events carry the hostile key, so any stored
   one would show up as an event of that author);
5. SIGKILL of another node, restart;
6. heal everything, wait for equal digests; `bidmesh ledger verify` on every node.

`converge_after_heal_s` is the longest time from the end of a fault (restart,
heal, links back to normal) until every node reports the same digest. `--quick`
runs each phase short (about 60-90 s in all on 2 cores). Last line: JSON with
`faults`, `events`, `events_lost`, `converge_after_heal_s`, `hostile_sent`,
`hostile_accepted`, `peers_cut_off`, `streams`, `streams_exact` and more.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import trio  # noqa: E402
from daemon_helpers import NETWORK, Cluster, wait_for  # noqa: E402
from reliability.faultnet import (  # noqa: E402
    NODE_ERRORS,
    Publisher,
    assert_verified,
    lease_events,
    proxied_cluster,
    reconfigure,
    seed_ledger,
)
from reliability.netproxy import Link, Network  # noqa: E402

from node import codec, gossip  # noqa: E402
from node.dataplane import SegmentLimits, member_key, stream_through_lease  # noqa: E402
from node.errors import BidmeshError  # noqa: E402
from node.events import MAX_WIRE, Offer, sign_event  # noqa: E402
from node.keys import Identity  # noqa: E402
from node.ledger import Ledger  # noqa: E402
from node.p2p import make_pubsub, open_host  # noqa: E402
from node.segments import Packet, encode_lp, local_reference  # noqa: E402

MEMBER = Identity.from_seed(b"chaos-member".ljust(32, b"."))
HOSTILE = Identity.from_seed(b"chaos-hostile".ljust(32, b"."))


class Chaos:
    def __init__(self, c: Cluster, net: Network, member_link: Link, lease: Any,
                 quick: bool, seed: int, publisher: Publisher) -> None:
        self.publisher = publisher
        self.c, self.net, self.member_link, self.lease = c, net, member_link, lease
        self.quick = quick
        self.rng = random.Random(seed)
        self.t0 = time.monotonic()
        self.faults: list[str] = []
        self.converge: list[float] = []
        self.streams = self.streams_exact = self.stream_errors = 0
        self.hostile_sent = 0

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def phase(self, quick_s: float, full_s: float) -> float:
        return quick_s if self.quick else full_s

    async def converged(self, what: str, timeout: float = 60.0) -> None:
        """Pause the publisher (equal digests need a moment without new events) and
        time how long until every node has the same digest."""
        t0 = time.monotonic()
        await trio.to_thread.run_sync(self.publisher.pause)

        def same() -> bool:
            try:
                return len(set(self.c.digests())) == 1
            except NODE_ERRORS:
                return False

        await trio.to_thread.run_sync(wait_for, same, timeout, f"convergence after {what}")
        took = time.monotonic() - t0
        self.publisher.resume()
        self.converge.append(took)
        self.say(f"  equal digests {took:.1f} s after {what}")

    async def kill_restart(self, idx: int, down_s: float) -> None:
        p = self.c.procs[idx]
        self.faults.append(f"sigkill n{idx}")
        self.say(f"fault: SIGKILL node {idx}; load continues for {down_s:.0f} s")
        await trio.to_thread.run_sync(self.c.terminate, p, signal.SIGKILL)
        await trio.to_thread.run_sync(assert_verified, p)
        await trio.sleep(down_s)
        await trio.to_thread.run_sync(self.c.start, p)
        await self.converged(f"node {idx} restarted")

    async def streamer(self, stop: trio.Event) -> None:
        a = self.c.procs[0]
        addr = f"/ip4/127.0.0.1/tcp/{self.member_link.port}/p2p/{a.peer_id}"
        pkts = [bytes([i % 251]) * 900 + i.to_bytes(4, "big") for i in range(256)]
        src = [encode_lp(pkts[i : i + 32]) for i in range(0, len(pkts), 32)]
        limits = SegmentLimits(32, 1 << 20)
        async with open_host(MEMBER.seed) as host:
            while not stop.is_set():
                try:
                    with trio.fail_after(30):
                        await host.connect(addr)
                        res = await stream_through_lease(
                            host, a.peer_id, self.lease, MEMBER, src, "lp", [("zstd",)],
                            network=NETWORK, limits=limits, timeout=15)
                    want = local_reference([Packet(p) for p in pkts], [("zstd",)],
                                           max_packets=32, max_bytes=1 << 20,
                                           lease_id=self.lease.id, stream_id=res.stream_id,
                                           key=member_key(MEMBER, self.lease))
                    self.streams += 1
                    self.streams_exact += res.output == want
                except (BidmeshError, trio.TooSlowError) as e:
                    self.stream_errors += 1
                    self.say(f"  stream failed: {type(e).__name__}: {e}")
                with trio.move_on_after(1.0):
                    await stop.wait()

    def hostile_message(self, i: int) -> bytes:
        env = sign_event(HOSTILE.seed, 1, None, 1000 + i, Offer(
            services=(), currency="EUR", addrs=(), note=f"hostile {i}"), NETWORK)
        signed = codec.unpack(env.wire, MAX_WIRE)[0]
        kind = i % 5
        if kind == 0:  # the hostile author's envelope with a forged signature
            return gossip.encode_batch([codec.pack([signed, bytes(64)])])
        if kind == 1:
            return b"\xc1not msgpack" + i.to_bytes(4, "big")
        if kind == 2:
            return codec.pack([1, [i.to_bytes(4, "big") * (MAX_WIRE // 4 + 1)]])
        if kind == 3:
            return codec.pack([1, [i.to_bytes(4, "big") + b"x" * 996] * 1000])
        return codec.pack([2, [env.wire]])  # unknown batch version (the event is valid)

    async def hostile(self, target: int) -> None:
        p = self.c.procs[target]
        self.faults.append(f"hostile peer -> n{target}")
        self.say(f"fault: a hostile peer gossips garbage to node {target}")
        async with open_host(HOSTILE.seed) as eh, make_pubsub(eh) as eps:
            await eh.connect(p.addr)
            topic = eps.topic(gossip.topic_name(NETWORK))
            sub = await topic.subscribe()
            del sub
            with trio.fail_after(20):
                while p.peer_id not in {str(x) for x in topic.peers()}:
                    await trio.sleep(0.05)
            with trio.move_on_after(30):
                while True:
                    st = await trio.to_thread.run_sync(self.c.status, p)
                    if str(eh.peer_id) in st["blocked"]:
                        break
                    with trio.move_on_after(2):
                        await topic.publish(self.hostile_message(self.hostile_sent), timeout=2)
                    self.hostile_sent += 1
                    await trio.sleep(0.05)
        self.say(f"  {self.hostile_sent} hostile messages sent; peer cut off")

    async def run(self) -> None:
        c, net = self.c, self.net
        n = len(c.procs)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.streamer, stop)
            await trio.sleep(self.phase(3, 20))

            self.faults.append("lossy links")
            self.say("fault: slow, lossy links (40±20 ms, 5 % chunks retransmitted)")
            for link in [*net.links.values(), self.member_link]:
                link.set(delay_s=0.04, jitter_s=0.02, loss=0.05)
            await trio.sleep(self.phase(8, 120))
            for link in [*net.links.values(), self.member_link]:
                link.clear()
            await self.converged("links back to normal")

            await self.kill_restart(n - 1, self.phase(4, 60))

            half = n // 2
            self.faults.append("partition")
            self.say(f"fault: partition {list(range(half))} | {list(range(half, n))}")
            net.partition(range(half), range(half, n))
            await trio.sleep(self.phase(6, 120))
            net.heal()
            await self.converged("the partition healed")

            await self.hostile(1 % n)
            await self.kill_restart(max(1, n - 2), self.phase(3, 60))
            await trio.sleep(self.phase(2, 20))
            stop.set()
        self.publisher.stop()
        await self.converged("the end of the load")


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="bidmesh-chaos-"))
    overrides = {"dataplane": {"workers": 1}, "node": {"log_level": "warning"},
                 "sync": {"interval_s": 1.0, "request_timeout_s": 3.0},
                 "gossip": {"fault_threshold": 5, "block_s": 300.0}}
    c, net = proxied_cluster(base, args.nodes, overrides=overrides, seed=args.seed)
    reconfigure(c.procs[0], "provider", enabled=True, currency="EUR", interval_s=5.0,
                offers={"zstd": {"price": 1, "capacity": 100_000}}, rate_recipients=False)
    events, lease = lease_events(MEMBER, c.procs[0].ident, "zstd", ("zstd",))
    seed_ledger(c.procs[0], [e.wire for e in events])
    member_link = Link(c.procs[0].port, seed=args.seed)
    t0 = time.monotonic()
    publisher = Publisher(c.procs, batch=10, interval=0.05, tag="chaos")
    chaos = Chaos(c, net, member_link, lease, args.quick, args.seed, publisher)
    try:
        await trio.to_thread.run_sync(c.start_all)
        await trio.to_thread.run_sync(
            wait_for, lambda: all(len(c.status(p)["peers"]) == args.nodes - 1
                                  for p in c.procs), 30, "a full mesh")
        chaos.say(f"{args.nodes} nodes up behind fault-injecting links; load starts")
        publisher.start()
        await chaos.run()
        acked = publisher.acked
        lost = 0
        hostile_stored = 0
        cut_off = 0
        for p in c.procs:
            with Ledger(p.data_dir / "ledger.db", network=NETWORK, readonly=True) as led:
                lost = max(lost, sum(1 for i in acked if not led.has(i)))
                hostile_stored += led.head(HOSTILE.public) is not None
            st = await trio.to_thread.run_sync(c.status, p)
            cut_off += st["gossip"]["cut_off"]
            await trio.to_thread.run_sync(assert_verified, p)
        stats = net.stats()
    finally:
        publisher.stop()
        c.stop_all()
        net.close()
        member_link.close()
    out = {
        "faults": len(chaos.faults),
        "fault_list": chaos.faults,
        "events": len(acked),
        "events_lost": lost,
        "publish_errors": publisher.errors,
        "converge_after_heal_s": round(max(chaos.converge), 2),
        "hostile_sent": chaos.hostile_sent,
        "hostile_accepted": hostile_stored,
        "peers_cut_off": cut_off,
        "streams": chaos.streams + chaos.stream_errors,
        "streams_exact": chaos.streams_exact,
        "stream_errors": chaos.stream_errors,
        "chunks_lost_and_retransmitted": stats.lost_chunks,
        "connections_reset": stats.resets,
        "ledgers_verified": True,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    chaos.say(f"{out['faults']} faults; {out['events']} events acknowledged, "
              f"{out['events_lost']} lost; equal digests at most "
              f"{out['converge_after_heal_s']} s after a fault ended; hostile messages "
              f"{out['hostile_sent']} sent, {out['hostile_accepted']} accepted; "
              f"{out['peers_cut_off']} peer(s) cut off; streams {out['streams_exact']}/"
              f"{out['streams']} byte-exact ({out['stream_errors']} failed)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short phases (~60-90 s)")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = trio.run(amain, args)
    print(json.dumps(out))
    ok = out["events_lost"] == 0 and out["hostile_accepted"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
