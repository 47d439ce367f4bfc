#!/usr/bin/env python3
"""CPU per event of a fresh node catching up by sync, in one process.

    .venv/bin/python bench/catchup.py [--events N] [--authors A] [--range-limit R]
                                      [--profile [N]] [--daemons]

A server ledger (a real SQLite file) holds N signed events from A authors; a fresh
ledger pulls them with one /sync/2 session (`ReconSession`, node/sync_recon.py) the
way `PullSync._session` (node/gossip_pull.py) drives it: each request is served by
`sync.serve` and both messages go through their encodings; the records of each
answer are checked by `check_records` (the daemon does it on a worker thread), then
stored by `on_response` inside `ledger.prechecked`. The network (py-libp2p's
streams, noise, yamux) is not included.

Puller CPU is thread CPU time (time.thread_time) of everything but the server's
`sync.serve` and the answer's encoding, which are the other node's cost (reported
as `serve_us_per_event`). `--profile N`: cProfile the puller with a thread-CPU
clock and print the top N functions (own time) in microseconds per event; the JSON
figures come from an unprofiled pass.

`cpu_us_per_event` = puller CPU / events stored; `verify_us` = one Ed25519 check of
the same events (PyNaCl, as the node verifies), thread CPU in the same process;
`cpu_vs_verify_ratio` = their ratio (1.0: the signature check alone). The machine's
load average goes in the JSON: every CPU figure grows with it. Last line: JSON.

`--daemons`: the same with two real node processes (tests/daemon_helpers.Cluster):
one publishes N events (its own, in one chain) and has gossiped them (to no one:
its outbox is empty), then the fresh one connects to it and
pulls them by its on-connect session; `cpu_us_per_event` is the puller's process
CPU until the digests match, less its idle CPU per second (measured just before)
over that time, per event; `server_us_per_event` the other node's. This includes
everything a node spends (py-libp2p's streams, noise, yamux; the loop), not only
the session.
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

from testkit import verify_us

from node import sync
from node.events import Event, Offer, sign_event
from node.gossip_pull import _records_of
from node.ledger import Ledger, check_records
from node.sync_recon import ReconSession
from node.sync_session import SyncLimits

NETWORK = "bench"
NOTE = "x" * 40


def make_chains(authors: int, per_author: int) -> list[list[Event]]:
    now = int(time.time() * 1000) - 3_600_000  # old events: nothing is "live"
    chains = []
    for a in range(authors):
        seed = bytes([171, a % 256]) * 16
        prev, chain = None, []
        for s in range(1, per_author + 1):
            body = Offer(services=(), currency="EUR", addrs=(), note=f"{a}-{s}-{NOTE}")
            ev = sign_event(seed, s, prev, now + s, body, NETWORK)
            chain.append(ev)
            prev = ev.id
        chains.append(chain)
    return chains


def pull(server: Ledger, fresh: Ledger, prof: cProfile.Profile | None,
         limits: SyncLimits) -> dict[str, Any]:
    s = ReconSession(fresh, limits, clock=time.monotonic)
    cpu = serve_cpu = check_cpu = 0.0
    t0 = time.thread_time()
    if prof is not None:
        prof.enable()
    while (req := s.next_request()) is not None:
        data = req.encode()
        if prof is not None:
            prof.disable()
        t1 = time.thread_time()
        answer = sync.serve(server, sync.decode_request(data, 2), 2).encode()
        serve_cpu += time.thread_time() - t1
        cpu -= time.thread_time() - t1
        if prof is not None:
            prof.enable()
        resp = sync.decode_response(answer, 2)
        records = _records_of(resp)
        if records:
            t1 = time.thread_time()
            checked = check_records(records, NETWORK)
            check_cpu += time.thread_time() - t1
            with fresh.prechecked(records, checked):
                s.on_response(resp)
        else:
            s.on_response(resp)
    if prof is not None:
        prof.disable()
    cpu += time.thread_time() - t0
    return {"accepted": len(s.accepted), "requests": s.stats.requests, "failed": s.failed,
            "cpu_s": cpu, "serve_s": serve_cpu, "check_s": check_cpu}


def _proc_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def daemons(n: int, range_limit: int, gossip_beside: bool) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from daemon_helpers import Cluster  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory(prefix="bidmesh-catchup-") as tmp:
        c = Cluster(Path(tmp), 2, bootstrap=lambda i, procs: [],
                    overrides={"sync": {"range_limit": range_limit, "interval_s": 5.0}})
        try:
            c.start_all()
            server, fresh = c.procs
            for i in range(0, n, 1000):
                c.publish(server, min(1000, n - i), tag=f"{i}-")
            # The server gossips its own events, paced; connecting before it is done
            # would bring the rest by gossip too (out of order: pending, drained).
            t0 = time.monotonic()
            while (not gossip_beside and c.status(server)["outbox"]
                   and time.monotonic() - t0 < 600):
                time.sleep(0.5)
            want = c.status(server)["digest"]
            assert server.popen is not None and fresh.popen is not None
            time.sleep(2.0)
            c0, w0 = _proc_cpu(fresh.popen.pid), time.monotonic()
            time.sleep(3.0)
            idle = (_proc_cpu(fresh.popen.pid) - c0) / (time.monotonic() - w0)
            c0, s0, t0 = _proc_cpu(fresh.popen.pid), _proc_cpu(server.popen.pid), time.monotonic()
            fresh.call({"op": "connect", "addr": server.addr})
            while c.status(fresh)["digest"] != want:
                if time.monotonic() - t0 > 600:
                    raise SystemExit("the fresh node did not catch up within 600 s")
                time.sleep(0.2)
            wall = time.monotonic() - t0
            used = _proc_cpu(fresh.popen.pid) - c0 - idle * wall
            served = _proc_cpu(server.popen.pid) - s0
            st = c.status(fresh)
        finally:
            c.stop_all()
    return {"mode": "daemons", "events": n, "stored": st["events"], "range_limit": range_limit,
            "wall_s": round(wall, 2), "cpu_us_per_event": round(used / n * 1e6, 1),
            "server_us_per_event": round(served / n * 1e6, 1),
            "idle_cpu_per_s": round(idle, 4), "sync_rounds": st["sync"]["rounds"],
            # What the fresh node's replicator counted: by sync, by gossip, duplicates.
            "puller_events": st["gossip"]["events"]}


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--authors", type=int, default=20)
    ap.add_argument("--range-limit", type=int, default=SyncLimits.range_limit,
                    help="records per answer asked for (node default: [sync] range_limit)")
    ap.add_argument("--profile", type=int, nargs="?", const=30, default=None)
    ap.add_argument("--daemons", action="store_true", help="two real node processes")
    ap.add_argument("--gossip-beside", action="store_true",
                    help="--daemons: connect while the server still gossips its events")
    args = ap.parse_args()
    if args.daemons:
        out = daemons(args.events, args.range_limit, args.gossip_beside)
        v = verify_us(make_chains(1, 200), NETWORK)
        out.update(verify_us=round(v, 1), cpu_vs_verify_ratio=round(out["cpu_us_per_event"] / v, 2),
                   load=os.getloadavg()[0])
        print(json.dumps(out))
        return 0 if out["stored"] >= args.events else 1
    chains = make_chains(args.authors, args.events // args.authors)
    n = sum(len(c) for c in chains)
    with tempfile.TemporaryDirectory(prefix="bidmesh-catchup-") as tmp:
        server = Ledger(Path(tmp) / "server.db", network=NETWORK)
        for c in chains:
            for i in range(0, len(c), 500):
                server.append_signed(c[i:i + 500])
        runs = []
        for k in range(2 if args.profile is not None else 1):
            prof = cProfile.Profile(time.thread_time) if k == 1 else None
            fresh = Ledger(Path(tmp) / f"fresh{k}.db", network=NETWORK)
            try:
                r = pull(server, fresh, prof, SyncLimits(range_limit=args.range_limit))
                r["digests_match"] = fresh.digest() == server.digest()
                r["stored"] = fresh.count()
            finally:
                fresh.close()
            runs.append(r)
            if prof is not None:
                st = pstats.Stats(prof)
                rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
                print(f"top {args.profile} by own thread-CPU time, us per event:")
                for (file, line, fn), (_cc, nc, tt, ct, _) in rows[:args.profile]:
                    print(f"{tt / n * 1e6:8.2f} own {ct / n * 1e6:8.2f} cum {nc:8d} calls  "
                          f"{Path(file).name}:{line} {fn}")
        server.close()
    v = verify_us(chains, NETWORK)
    r = runs[0]
    cpu_us = r["cpu_s"] / max(1, r["stored"]) * 1e6
    out = {"events": n, "authors": args.authors, "range_limit": args.range_limit,
           "stored": r["stored"],
           "digests_match": r["digests_match"], "requests": r["requests"],
           "failed": r["failed"], "cpu_us_per_event": round(cpu_us, 1),
           "check_us_per_event": round(r["check_s"] / max(1, r["stored"]) * 1e6, 1),
           "serve_us_per_event": round(r["serve_s"] / max(1, r["stored"]) * 1e6, 1),
           "verify_us": round(v, 1), "cpu_vs_verify_ratio": round(cpu_us / v, 2),
           "load": os.getloadavg()[0]}
    print(json.dumps(out))
    return 0 if r["digests_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
