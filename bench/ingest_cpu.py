#!/usr/bin/env python3
"""CPU per received event on a node's gossip ingest path, in one process.

    .venv/bin/python bench/ingest_cpu.py [--quick] [--authors A] [--events N]
                                         [--batch B] [--market] [--profile [N]]

Real signed events (offers like bench/convergence.py's, ~210 bytes on the wire)
from A authors are packed into gossip batches the way a daemon sends them (one
author's consecutive events per batch, B per batch: 1,200 events/s from 10 nodes,
paced every 500 ms, is 60) and handed, batch after batch, to the topic validator
of a real `Replicator` (real libp2p host and gossipsub, real SQLite ledger, no
peers), one after the other: decode the batch, drop known events, queue it for
the fair-ingest worker (node/ingest.py), verify on its thread, store, notify. What
py-libp2p spends per message before the validator (stream read, noise, yamux,
protobuf, seen-cache) is not included; bench/convergence.py's `cpu_us_per_event`
counts everything.

`--market`: a provider node's market is brought up to date after every batch (its
agent wakes on every stored batch), so the derived-market cost per event shows.
`--profile N`: cProfile the ingest and print the top N functions (own time) in
microseconds per event; profiling inflates every figure, so the JSON's figures
come from the unprofiled pass.

`ingest_us_per_event` = process CPU (all threads) / events stored; `verify_us` =
one Ed25519 check of the same events (PyNaCl, as the node verifies), CPU time in
the same run; `ingest_vs_verify_ratio` = their ratio (1.0 would be the signature
check alone). Last line: JSON figures.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # testkit

import trio
from testkit import verify_us

from node import config, gossip
from node.events import Event, Offer, sign_event
from node.keys import Identity
from node.ledger import Ledger
from node.marketview import LiveMarket
from node.p2p import make_pubsub, open_host, peer_id_from_pubkey

NETWORK = "bench"
NOTE = "x" * 40


def make_events(authors: int, per_author: int) -> list[list[Event]]:
    now = int(time.time() * 1000)
    chains = []
    for a in range(authors):
        seed = bytes([171, a]) * 16
        prev, chain = None, []
        for s in range(1, per_author + 1):
            body = Offer(services=(), currency="EUR", addrs=(), note=f"{a}-{s}-0-{NOTE}")
            ev = sign_event(seed, s, prev, now + s, body, NETWORK)
            chain.append(ev)
            prev = ev.id
        chains.append(chain)
    return chains


def make_batches(chains: list[list[Event]], batch: int) -> list[bytes]:
    """Round-robin over authors, `batch` consecutive events of one author each."""
    out = []
    longest = max(len(c) for c in chains)
    for start in range(0, longest, batch):
        for chain in chains:
            part = chain[start:start + batch]
            if part:
                out.append(gossip.encode_batch([ev.wire for ev in part]))
    return out


async def ingest(tmp: Path, batches: list[bytes], market: bool,
                 prof: cProfile.Profile | None) -> dict[str, Any]:
    cfg = config.from_dict({
        "node": {"network": NETWORK},
        # One forwarder sends everything here, far faster than any real peer.
        "limits": {"gossip_peer_events_per_s": 1_000_000, "gossip_peer_bytes_per_s": 1 << 30},
    })
    me = Identity.from_seed(bytes([172]) * 32)
    fwd = peer_id_from_pubkey(Identity.from_seed(bytes([173]) * 32).public)
    led = Ledger(tmp / "ledger.db", network=NETWORK)
    try:
        async with open_host(me.seed) as host, make_pubsub(host) as ps:
            rep = gossip.Replicator(host, ps, led, cfg)
            live = LiveMarket(led) if market else None
            ok = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rep.ingest.run)  # the fair-ingest worker (node/ingest.py)
                c0, w0 = time.process_time(), time.perf_counter()
                if prof is not None:
                    prof.enable()
                for data in batches:
                    # As if the forwarder published it: the topic's precheck (on
                    # arrival), then its async validator.
                    ok = await rep._validate(fwd, fwd, rep._precheck(fwd, fwd, data)) and ok
                    if live is not None:
                        live.market()
                if prof is not None:
                    prof.disable()
                nursery.cancel_scope.cancel()
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            stored = led.count()
            return {"ok": ok, "stored": stored, "cpu_s": cpu, "wall_s": wall,
                    "accepted": rep.stats.events["accepted"]}
    finally:
        led.close()


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="6,000 events")
    ap.add_argument("--authors", type=int, default=10)
    ap.add_argument("--events", type=int, help="events in all (default 24,000)")
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--market", action="store_true", help="update the market after each batch")
    ap.add_argument("--profile", type=int, nargs="?", const=30, metavar="N",
                    help="also run under cProfile and print the top N functions")
    a = ap.parse_args()
    total = a.events or (6000 if a.quick else 24_000)
    per_author = max(1, total // a.authors)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; signing "
          f"{a.authors} x {per_author} events ...", flush=True)
    chains = make_events(a.authors, per_author)
    n = sum(len(c) for c in chains)
    batches = make_batches(chains, a.batch)
    base = Path(tempfile.mkdtemp(prefix="bm-ingest-"))
    r = trio.run(ingest, base / "a", batches, a.market, None)
    v = verify_us(chains, NETWORK)
    us = r["cpu_s"] / max(1, r["stored"]) * 1e6
    print(f"  {r['stored']}/{n} stored in {len(batches)} batches: {us:.1f} us CPU per event "
          f"({r['wall_s']:.2f} s wall), one verify {v:.1f} us: ratio {us / v:.2f}", flush=True)
    if a.profile:
        prof = cProfile.Profile(time.thread_time)
        trio.run(ingest, base / "p", batches, a.market, prof)
        st = pstats.Stats(prof)
        rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
        print(f"  profile (own time, us per event, under cProfile), top {a.profile}:")
        for (file, line, fn), (_cc, ncalls, tt, ct, _callers) in rows[:a.profile]:
            where = f"{Path(file).name}:{line}" if line else file
            print(f"    {tt / n * 1e6:8.2f} own {ct / n * 1e6:8.2f} cum {ncalls / n:6.2f}/ev  "
                  f"{fn} ({where})")
    for sub in ("a", "p"):
        for f in (base / sub).glob("ledger.db*"):
            f.unlink()
    out = {
        "events": n,
        "stored": r["stored"],
        "batch": a.batch,
        "market": a.market,
        "all_valid": r["ok"],
        "ingest_us_per_event": round(us, 2),
        "verify_us": round(v, 2),
        "ingest_vs_verify_ratio": round(us / v, 3),
        "loadavg": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
