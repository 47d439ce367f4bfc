#!/usr/bin/env python3
"""Soak: a small network of real node processes under steady gossip, sync and stream
load; does memory, file descriptors and task count stay flat?

    .venv/bin/python bench/soak.py [--quick] [--minutes M | --duration S] [--nodes N]
                                   [--rate R] [--auction-every S] [--past-auctions A]
                                   [--cache-mib M] [--keep]

N `bidmesh run` daemons (default 3), full mesh. Load for `--minutes` (or `--duration`
seconds; `--quick`: 60 s, default 30 minutes):

* gossip: `--rate` events/s published in batches round-robin over the control
  sockets (the daemons gossip and store them);
* sync: each node's periodic anti-entropy (every 1 s here) plus an explicit `sync`
  control call to one node every 5 s;
* streams: a member streams 256 KiB through node 0 (zstd) under a real lease every
  2 s (the provider segments, processes in its worker pool and streams back).
* the market: an auction every `--auction-every` s (5) among the nodes, through
  their control sockets: request, bid, the award after the close, a payment and both
  ratings; and the ledgers start with `--past-auctions` (3,000) settled auctions of
  the last 3 hours, so the derived market starts in its steady state (its loaded
  auctions at the cap, older ones in the cold tier: `fold.COLD_AFTER_MS`, 1 h of
  ledger time) rather than growing into it during the run. `market` in the JSON: node
  1's auctions folded on their own afterwards (leases, payments, ratings, ignored).

Sampled every 5 s per daemon process (psutil): RSS, open fds, threads, and trio
tasks (from `status`). `rss_start_mb` is the mean RSS at the end of warm-up (a
third of the run, at most 300 s), `rss_end_mb` the mean at the end; growth figures
are the largest over the nodes. Baseline for the ratio: RSS of an idle node
(`idle_rss_mb`, measured before the load starts) — `rss_end_vs_idle_ratio`.

`rss_kib_per_kevent` is the slope of RSS over stored events after warm-up (least
squares over the samples, worst node; `baseline_kib_per_kevent` the baseline's): what
a shorter run extrapolates with, e.g. to the default run's ~180,000 events.

The nodes' directory (/tmp/bidmesh-soak-*, 100-400 MB) is removed at exit unless
`--keep`.

Last line: JSON with `duration_s`, `rss_start_mb`, `rss_end_mb`, `rss_growth_mb`,
`rss_kib_per_kevent`, `fds_growth`, `tasks_growth`, `threads_growth`, `events`, ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402
import trio  # noqa: E402
from daemon_helpers import Cluster, Proc, wait_for  # noqa: E402
from reliability.faultnet import (  # noqa: E402
    NODE_ERRORS,
    Publisher,
    lease_events,
    reconfigure,
    seed_ledger,
)

from node.auction import derive  # noqa: E402
from node.dataplane import SegmentLimits, stream_through_lease  # noqa: E402
from node.errors import BidmeshError  # noqa: E402
from node.events import (  # noqa: E402
    Award,
    Bid,
    Body,
    Event,
    Members,
    Payment,
    Rating,
    Request,
    considered_digest,
    decode_stored,
    sign_event,
)
from node.keys import Identity  # noqa: E402
from node.ledger import Ledger  # noqa: E402
from node.p2p import open_host  # noqa: E402
from node.segments import encode_lp  # noqa: E402

MEMBER = Identity.from_seed(b"soak-member".ljust(32, b"."))
SERVICE = "soak-relay"  # offered by no node: no agent bids on these auctions
AUCTION_KINDS = ("request", "bid", "award", "payment", "rating")


def request_body(k: int, t: int) -> Request:
    """Auction `k`'s request, opened at `t` (ms): open bids, closing 2 s later, a
    one-minute lease from the close."""
    close = t + 2000
    return Request(service=SERVICE, chain=(), start_ms=close, duration_ms=60_000,
                   max_rate_bps=None, min_rate_bps=None, members=Members(), reserve=1000,
                   currency="EUR", close_ms=close, reveal_ms=close, rule="lowest",
                   sealed=False, group=False, note=f"soak-{k}")


def award_body(req_id: bytes, bid_id: bytes, price: int) -> Award:
    return Award(request=req_id, winner=bid_id, price=price, considered=(bid_id,),
                 considered_digest=considered_digest([bid_id]), considered_count=1)


def settle(award_id: bytes, price: int, k: int, recipient: bytes, provider: bytes,
           ) -> list[tuple[bool, Body]]:
    """A paid lease and both parties' ratings: (by the recipient?, body)."""
    return [(True, Payment(lease=award_id, amount=price, currency="EUR", method="card",
                           reference=f"soak-{k}")),
            (True, Rating(lease=award_id, subject=provider, role="provider",
                          satisfied=k % 7 != 0, score=1 + k % 5)),
            (False, Rating(lease=award_id, subject=recipient, role="recipient",
                           satisfied=True, score=5))]


def history(auctions: int, t_from: int, t_to: int) -> list[Event]:
    """`auctions` settled auctions between t_from and t_to (ms, ledger time), among 40
    recipients and 16 providers: the past of a node that has run for a while, so the
    derived market starts in its steady state (its loaded set full, older auctions in
    the cold tier) instead of growing into it during the run."""
    recips = [Identity.from_seed((b"soak-r%d" % i).ljust(32, b".")) for i in range(40)]
    provs = [Identity.from_seed((b"soak-p%d" % i).ljust(32, b".")) for i in range(16)]
    chain: dict[bytes, tuple[int, bytes | None, int]] = {}
    out: list[Event] = []

    def sign(who: Identity, body: Body, ts: int) -> Event:
        seq, prev, last = chain.get(who.public, (0, None, 0))
        ev = sign_event(who.seed, seq + 1, prev, max(ts, last), body, "proctest")
        chain[who.public] = (ev.seq, ev.id, ev.ts_ms)
        out.append(ev)
        return ev

    step = (t_to - t_from) // max(1, auctions)
    for k in range(auctions):
        t = t_from + k * step
        r, p = recips[k % len(recips)], provs[k % len(provs)]
        price = 10 + k % 50
        rq = sign(r, request_body(k, t), t)
        b = sign(p, Bid(request=rq.id, price=price), t + 500)
        aw = sign(r, award_body(rq.id, b.id, price), t + 2500)
        for by_r, body in settle(aw.id, price, k, r.public, p.public):
            sign(r if by_r else p, body, t + 3000)
    return out


def auctioneer(c: Cluster, every: float, stop_at: float, counts: dict[str, int]) -> None:
    """An auction every `every` s among the nodes (node i requests, node i+1 bids),
    through the control sockets: request, bid, the award after the close, a payment and
    both ratings, so the derived market folds auctions, leases, payments and
    reputation as it would on a live network."""
    def pub(p: Proc, body: Body) -> bytes:
        return bytes(p.call({"op": "publish", "events": [[body.KIND, body.to_map()]]},
                            timeout=20)["ids"][0])

    k = 0
    procs = c.procs
    while time.monotonic() < stop_at:
        t_next = time.monotonic() + every
        a, b = procs[k % len(procs)], procs[(k + 1) % len(procs)]
        try:
            req = request_body(k, int(time.time() * 1000))
            req_id = pub(a, req)
            price = 10 + k % 50
            bid_id = pub(b, Bid(request=req_id, price=price))
            while time.time() * 1000 <= req.close_ms + 50:  # an award must follow the close
                time.sleep(0.1)
            award_id = pub(a, award_body(req_id, bid_id, price))
            for by_a, body in settle(award_id, price, k, a.ident.public, b.ident.public):
                pub(a if by_a else b, body)
            counts["auctions"] += 1
        except NODE_ERRORS as e:
            counts["auction_errors"] += 1
            print(f"auction {k} failed: {e}", flush=True)
        k += 1
        time.sleep(max(0.0, t_next - time.monotonic()))


def market_check(path: Path) -> dict[str, int]:
    """The auctions of a node's ledger folded on their own: leases, paid leases and
    ratings derived, and how many of their events the market ignored (a soak whose
    auctions the market rejects would not exercise it)."""
    with Ledger(path, network="proctest", readonly=True) as led:
        q = (f"SELECT wire FROM events WHERE kind IN ({','.join('?' * len(AUCTION_KINDS))}) "
             "ORDER BY ts_ms, author, seq")
        evs = [decode_stored(w, "proctest", {}) for (w,) in led.db.execute(q, AUCTION_KINDS)]
    m = derive(evs)
    return {"auction_events": len(evs), "leases": len(m.leases), "paid_leases": len(m.paid),
            "ratings": sum(len(v) for v in m.ratings.values()), "ignored": len(m.ignored)}


def sample(c: Cluster, base: subprocess.Popen[bytes]) -> list[dict[str, float]]:
    out = []
    for p in c.procs:
        assert p.popen is not None
        proc = psutil.Process(p.popen.pid)
        try:
            tasks = float(c.status(p).get("tasks", 0))
        except NODE_ERRORS:
            tasks = float("nan")
        out.append({"rss_mb": proc.memory_info().rss / 2**20, "fds": float(proc.num_fds()),
                    "threads": float(proc.num_threads()), "tasks": tasks,
                    "events": float(c.status(p)["events"])})
    bp = psutil.Process(base.pid)
    out.append({"rss_mb": bp.memory_info().rss / 2**20, "fds": float(bp.num_fds()),
                "threads": float(bp.num_threads()), "tasks": 0.0, "events": 0.0})
    return out


def setup(base: Path, n: int, past_auctions: int, cache_mib: int | None,
          ) -> tuple[Cluster, Any]:
    node: dict[str, Any] = {"log_level": "warning"}
    if cache_mib is not None:
        node["ledger_cache_mib"] = cache_mib
    c = Cluster(base, n, overrides={"dataplane": {"workers": 1},
                                    "sync": {"interval_s": 1.0}, "node": node})
    reconfigure(c.procs[0], "provider", enabled=True, currency="EUR", interval_s=5.0,
                offers={"zstd": {"price": 1, "capacity": 100_000}}, rate_recipients=False)
    events, lease = lease_events(MEMBER, c.procs[0].ident, "zstd", ("zstd",),
                                 duration_ms=3 * 3600_000)
    seed_ledger(c.procs[0], [e.wire for e in events])
    if past_auctions:
        # The last three hours, up to a minute ago: the auctions older than an hour
        # and out of the loaded set go cold while the node starts, not all at once
        # when the run's first event moves ledger time on (a history that ended an
        # hour back made that one step take seconds of the event loop).
        now = int(time.time() * 1000)
        past = [e.wire for e in history(past_auctions, now - 3 * 3600_000, now - 60_000)]
        for p in c.procs:
            seed_ledger(p, past)
    return c, lease


async def streamer(c: Cluster, lease: Any, stop: trio.Event, counts: dict[str, int]) -> None:
    a = c.procs[0]
    payload = [encode_lp([bytes([i % 251]) * 1000 + i.to_bytes(4, "big") for i in range(256)])]
    async with open_host(MEMBER.seed) as host:
        await host.connect(a.addr)
        while not stop.is_set():
            try:
                with trio.fail_after(30):
                    res = await stream_through_lease(
                        host, a.peer_id, lease, MEMBER, payload, "lp", [("zstd",)],
                        network="proctest", limits=SegmentLimits(64, 1 << 20), timeout=20)
                counts["streams"] += 1
                counts["stream_bytes"] += res.trailer.bytes_in
            except (BidmeshError, trio.TooSlowError) as e:
                counts["stream_errors"] += 1
                print(f"stream failed: {e}", flush=True)
            with trio.move_on_after(2.0):
                await stop.wait()


def syncer(c: Cluster, procs: list[Proc], stop_at: float) -> None:
    i = 0
    while time.monotonic() < stop_at:
        try:
            procs[i % len(procs)].call({"op": "sync"}, timeout=20)
        except NODE_ERRORS as e:
            print(f"sync call failed: {e}", flush=True)
        i += 1
        time.sleep(5.0)


FOLLOWER = """
import sys, time
sys.path.insert(0, sys.argv[3])
from node.ledger import Ledger
from node.marketview import LiveMarket
src = Ledger(sys.argv[1], network="proctest", readonly=True)
own = Ledger(sys.argv[2], network="proctest",
             cache_kib=int(sys.argv[4]) << 10 if sys.argv[4] else None)
live = LiveMarket(own)
cursor = 0
while True:
    rows = src.events(after=cursor, limit=2048)
    if rows:
        cursor = rows[-1][0]
        own.append_many([ev.wire for _, ev in rows])
        live.market()
    else:
        time.sleep(0.2)
"""


def follower(c: Cluster, base: Path, cache_mib: int | None) -> subprocess.Popen[bytes]:
    """The baseline: a process that stores node 1's events in its own ledger and keeps
    the derived market current, exactly as a node does, without any networking."""
    return subprocess.Popen([sys.executable, "-c", FOLLOWER,
                             str(c.procs[1].data_dir / "ledger.db"), str(base / "baseline.db"),
                             str(ROOT), "" if cache_mib is None else str(cache_mib)])


def mean(rows: list[list[dict[str, float]]], node: int, key: str) -> float:
    return statistics.fmean(r[node][key] for r in rows)


def _fin(x: float) -> float | None:
    """Rounded, or None (JSON null) when there were too few samples."""
    return None if x != x else round(x, 1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="bidmesh-soak-"))
    try:
        return await _run(args, base)
    finally:
        # Ledgers of three nodes and the baseline: 100-400 MB a run.
        if args.keep:
            print(f"kept {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)


async def _run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    c, lease = setup(base, args.nodes, args.past_auctions, args.cache_mib)
    await trio.to_thread.run_sync(c.start_all)
    try:
        await trio.to_thread.run_sync(
            wait_for, lambda: all(len(c.status(p)["peers"]) == args.nodes - 1 for p in c.procs),
            30, "a full mesh")
        base_proc = follower(c, base, args.cache_mib)
        idle = statistics.fmean(s["rss_mb"] for s in sample(c, base_proc)[:-1])
        warm = min(300.0, args.duration / 3)
        load_start = os.getloadavg()[0]
        t0 = time.monotonic()
        stop_at = t0 + args.duration
        print(f"{args.nodes} nodes up (idle RSS {idle:.1f} MB); load for {args.duration:.0f} s, "
              f"warm-up {warm:.0f} s, {args.rate} events/s", flush=True)
        batch = max(1, int(args.rate / 10))
        pub = Publisher(c.procs, batch=batch, interval=0.1, tag="soak")
        pub.start()
        counts = {"streams": 0, "stream_bytes": 0, "stream_errors": 0, "auctions": 0,
                  "auction_errors": 0}
        stop = trio.Event()
        samples: list[tuple[float, list[dict[str, float]]]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(streamer, c, lease, stop, counts)
            nursery.start_soon(trio.to_thread.run_sync, syncer, c, c.procs, stop_at)
            if args.auction_every > 0:
                nursery.start_soon(trio.to_thread.run_sync, auctioneer, c,
                                   args.auction_every, stop_at, counts)
            while time.monotonic() < stop_at:
                await trio.sleep(5.0)
                s = await trio.to_thread.run_sync(sample, c, base_proc)
                t = time.monotonic() - t0
                samples.append((t, s))
                rss = " ".join(f"{x['rss_mb']:.1f}" for x in s[:-1])
                print(f"[{t:6.0f}s] rss {rss} MB (baseline {s[-1]['rss_mb']:.1f})  "
                      f"fds {' '.join(str(int(x['fds'])) for x in s)}  "
                      f"tasks {' '.join(str(int(x['tasks'])) for x in s)}  "
                      f"events {int(s[0]['events'])}  streams {counts['streams']}  "
                      f"auctions {counts['auctions']}", flush=True)
            stop.set()
        pub.stop()
        load_end = os.getloadavg()[0]
        # Did every node keep up? Stored events per node and the peers each has cut
        # off: a node cut off by its peers stores less and so grows less, and its
        # figures would flatter the run.
        ends = [c.status(p) for p in c.procs]
        stored = [int(st["events"]) for st in ends]
        blocked = [len(st.get("blocked", {})) for st in ends]
    finally:
        c.stop_all()
        with contextlib.suppress(NameError):
            base_proc.kill()
            base_proc.wait(10)
    try:
        market: dict[str, Any] = market_check(c.procs[1].data_dir / "ledger.db")
    except (BidmeshError, sqlite3.Error) as e:  # a node that did not stop cleanly
        market = {"error": str(e)}
    warm_rows = [s for t, s in samples if t <= warm][-3:] or [samples[0][1]]
    end_rows = [s for _, s in samples][-3:]
    n = args.nodes

    def growth(key: str) -> float:
        return max(mean(end_rows, i, key) - mean(warm_rows, i, key) for i in range(n))

    def slope(node: int, events_of: int) -> float:
        """KiB of RSS per 1,000 stored events after warm-up (least squares)."""
        pts = [(s[events_of]["events"], s[node]["rss_mb"]) for t, s in samples if t > warm]
        if len(pts) < 3 or pts[-1][0] <= pts[0][0]:
            return float("nan")
        return statistics.linear_regression([e for e, _ in pts],
                                            [r for _, r in pts]).slope * 1024 * 1000

    rss_start = statistics.fmean(mean(warm_rows, i, "rss_mb") for i in range(n))
    rss_end = statistics.fmean(mean(end_rows, i, "rss_mb") for i in range(n))
    b_growth = mean(end_rows, n, "rss_mb") - mean(warm_rows, n, "rss_mb")
    out = {
        "duration_s": round(samples[-1][0], 1),
        "nodes": n,
        "rate_events_per_s": args.rate,
        "events": len(pub.acked),
        "publish_errors": pub.errors,
        "streams": counts["streams"],
        "stream_errors": counts["stream_errors"],
        "stream_mb": round(counts["stream_bytes"] / 1e6, 1),
        "auctions": counts["auctions"],
        "auction_errors": counts["auction_errors"],
        "past_auctions": args.past_auctions,
        "ledger_cache_mib": args.cache_mib,
        "stored_per_node": stored,
        "cut_off_peers_per_node": blocked,
        # Node 1's auctions (past and run) folded on their own: did the market take them?
        "market": market,
        "idle_rss_mb": round(idle, 1),
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(growth("rss_mb"), 1),
        "rss_kib_per_kevent": _fin(max(slope(i, i) for i in range(n))),
        # The baseline follows node 1's ledger.
        "baseline_kib_per_kevent": _fin(slope(n, 1)),
        "baseline_growth_mb": round(b_growth, 1),
        "net_growth_mb": round(growth("rss_mb") - b_growth, 1),
        "fds_growth": round(growth("fds"), 1),
        "tasks_growth": round(growth("tasks"), 1),
        "threads_growth": round(growth("threads"), 1),
        "rss_end_vs_idle_ratio": round(rss_end / idle, 2),
        # The machine's 1-minute load average when the load started and ended.
        "load_start": round(load_start, 1),
        "load_end": round(load_end, 1),
    }
    print(f"RSS after warm-up {out['rss_start_mb']} MB, at the end {out['rss_end_mb']} MB: "
          f"growth {out['rss_growth_mb']} MB (worst node), of which storage and the "
          f"derived market {out['baseline_growth_mb']} MB (baseline: the same events stored "
          f"and folded without networking), the rest {out['net_growth_mb']} MB; slope "
          f"{out['rss_kib_per_kevent']} KiB per 1,000 events (baseline "
          f"{out['baseline_kib_per_kevent']}); "
          f"fds {out['fds_growth']:+}, "
          f"tasks {out['tasks_growth']:+}, threads {out['threads_growth']:+}; "
          f"{out['events']} events, {out['streams']} streams")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 s")
    ap.add_argument("--keep", action="store_true",
                    help="keep the nodes' directory (removed at exit otherwise)")
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    ap.add_argument("--minutes", type=float, default=None,
                    help="minutes of load (instead of --duration)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rate", type=float, default=100.0, help="events/s over all nodes")
    ap.add_argument("--auction-every", type=float, default=5.0,
                    help="seconds between auctions (request, bid, award, payment, two "
                         "ratings) among the nodes; 0: none")
    ap.add_argument("--cache-mib", type=int, default=None,
                    help="the nodes' (and the baseline's) node.ledger_cache_mib "
                         "(default: the node's default)")
    ap.add_argument("--past-auctions", type=int, default=3000,
                    help="settled auctions seeded over the last 3 h (0: none)")
    args = ap.parse_args()
    if args.minutes is not None:
        args.duration = args.minutes * 60
    if args.quick:
        args.duration = 60.0
    out = trio.run(run, args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
