"""Helpers for the fault tests and `bench/chaos.py`: node processes behind fault-
injecting links, a background publisher that records what was acknowledged, the
`bidmesh ledger verify` check, and a lease built from real signed market events."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon_helpers import NETWORK, ROOT, Cluster, Proc, wait_for

from node import config
from node.auction import Lease, derive
from node.errors import OperationError, RemoteError
from node.events import Award, Bid, Event, Members, Request, considered_digest, sign_event
from node.keys import Identity
from node.ledger import Ledger

from .netproxy import Network

NODE_ERRORS = (OperationError, RemoteError)


def proxied_cluster(base: Path, n: int, overrides: dict[str, dict[str, Any]] | None = None,
                    seed: int = 0) -> tuple[Cluster, Network]:
    """A cluster whose nodes dial each other only through `Network` links."""
    c = Cluster(base, n, overrides=overrides)
    net = Network([p.port for p in c.procs], seed=seed)
    for p in c.procs:
        cfg = config.load(p.cfg_path)
        boot = [f"/ip4/127.0.0.1/tcp/{net.port(p.index, q.index)}/p2p/{q.peer_id}"
                for q in c.procs if q is not p]
        cfg = dataclasses.replace(cfg, p2p=dataclasses.replace(cfg.p2p, bootstrap=boot))
        p.cfg_path.write_text(config.to_toml(cfg))
    return c, net


def reconfigure(p: Proc, section: str, **values: Any) -> None:
    """Change one section of a node's config file (before it starts)."""
    cfg = config.load(p.cfg_path)
    cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                   **values)})
    p.cfg_path.write_text(config.to_toml(cfg))


@contextmanager
def running(c: Cluster, net: Network | None = None) -> Iterator[Cluster]:
    try:
        yield c
    finally:
        c.stop_all()
        if net is not None:
            net.close()


def ledger_verify(p: Proc) -> dict[str, Any]:
    """`bidmesh ledger --data-dir D verify --json` (read-only; works on a live node)."""
    r = subprocess.run([sys.executable, "-m", "node.cli", "ledger", "--data-dir", str(p.data_dir),
                        "verify", "--json"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out: dict[str, Any] = json.loads(r.stdout) if r.stdout.strip() else {}
    out["exit"] = r.returncode
    out["stderr"] = r.stderr[-500:]
    return out


def assert_verified(p: Proc) -> int:
    v = ledger_verify(p)
    assert v["exit"] == 0 and v.get("ok") is True and v.get("problems") == [], v
    return int(v["events"])


def stored(p: Proc, ids: list[bytes]) -> int:
    """How many of `ids` the node's ledger holds (read-only)."""
    with Ledger(p.data_dir / "ledger.db", network=NETWORK, readonly=True) as led:
        return sum(1 for i in ids if led.has(i))


def wait_converged(c: Cluster, procs: list[Proc] | None = None, timeout: float = 120.0) -> float:
    """Seconds until every node reports the same digest (status over the control socket)."""
    procs = procs or c.procs
    t0 = time.monotonic()

    def same() -> bool:
        try:
            return len(set(c.digests(procs))) == 1
        except NODE_ERRORS:
            return False

    try:
        wait_for(same, timeout, f"digests of nodes {[p.index for p in procs]} equal")
    except AssertionError as e:
        raise AssertionError(f"{e}; {convergence_state(c, procs)}") from None
    return time.monotonic() - t0


def convergence_state(c: Cluster, procs: list[Proc]) -> dict[int, Any]:
    """What each node holds and how its syncs went (for a failure message)."""
    out: dict[int, Any] = {}
    for p in procs:
        try:
            st = c.status(p)
        except NODE_ERRORS as e:
            out[p.index] = f"no status: {e}"
            continue
        out[p.index] = {"events": st["events"], "pending": st["pending"], "gaps": st["gaps"],
                        "peers": len(st["peers"]),
                        "sync": {k: v for k, v in st["sync"].items() if k != "limits"}}
    return out


class Publisher(threading.Thread):
    """Publishes `batch`-event batches round-robin to live nodes until stopped.

    `acked` holds the id of every acknowledged event; a batch whose call fails (the
    node was killed, is stopping, or the disk is full) is not acknowledged and not
    counted. `errors` counts those failures. With `limit` set it idles once that many
    events are acknowledged (raise it to go on): without a bound, the backlog a test
    leaves grows with the time its steps take, i.e. with the machine's load."""

    def __init__(self, procs: list[Proc], batch: int = 20, interval: float = 0.05,
                 tag: str = "p") -> None:
        super().__init__(daemon=True)
        self.procs, self.batch, self.interval, self.tag = procs, batch, interval, tag
        self.acked: list[bytes] = []
        self.errors = 0
        self.limit: int | None = None
        self.stop_event = threading.Event()
        self.paused = threading.Event()
        self._idle = threading.Event()
        self._i = 0

    def pause(self) -> None:
        """Stop publishing (returns once no call is in flight) until `resume()`."""
        self._idle.clear()
        self.paused.set()
        if self.is_alive():
            self._idle.wait(15)

    def resume(self) -> None:
        self.paused.clear()

    def run(self) -> None:
        while not self.stop_event.is_set():
            if self.paused.is_set() or (self.limit is not None
                                        and len(self.acked) >= self.limit):
                self._idle.set()
                self.stop_event.wait(0.02)
                continue
            live = [p for p in self.procs if p.alive()]
            if live:
                p = live[self._i % len(live)]
                self._i += 1
                events = [["offer", {"services": [], "currency": "EUR", "addrs": [],
                                     "note": f"{self.tag}{p.index}-{self._i}-{k}"}]
                          for k in range(self.batch)]
                try:
                    self.acked += p.call({"op": "publish", "events": events}, timeout=10)["ids"]
                except NODE_ERRORS:
                    self.errors += 1
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15)


# ------------------------------------------------------------------ a real lease


def lease_events(recipient: Identity, provider: Identity, service: str, chain: tuple[str, ...],
                 network: str = NETWORK, duration_ms: int = 3_600_000,
                 ) -> tuple[list[Event], Lease]:
    """Request, bid and award (all closed, the lease active now) as signed events, and
    the lease the fold derives from them."""
    now = int(time.time() * 1000)
    req = sign_event(recipient.seed, 1, None, now - 5000, Request(
        service=service, chain=chain, start_ms=now - 1000, duration_ms=duration_ms,
        max_rate_bps=None, min_rate_bps=None, members=Members(), reserve=1000,
        currency="EUR", close_ms=now - 3000, reveal_ms=now - 3000, rule="lowest",
        sealed=False, group=False), network)
    bid = sign_event(provider.seed, 1, None, now - 4000, Bid(request=req.id, price=10), network)
    award = sign_event(recipient.seed, 2, req.id, now - 2000, Award(
        request=req.id, winner=bid.id, price=10, considered=(bid.id,),
        considered_digest=considered_digest([bid.id]), considered_count=1), network)
    events = [req, bid, award]
    market = derive(events)
    assert len(market.leases) == 1, market.ignored
    (lease,) = market.leases.values()
    return events, lease


def seed_ledger(p: Proc, wires: list[bytes]) -> None:
    """Store records in a (stopped) node's ledger before it starts."""
    with Ledger(p.data_dir / "ledger.db", network=NETWORK) as led:
        for res in led.append_many(wires):
            assert res.accepted or res.status.value == "duplicate", res
