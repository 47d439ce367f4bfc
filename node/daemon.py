"""The node daemon: composes a node from config and runs it until SIGTERM/SIGINT.

    bidmesh run --config /etc/bidmesh/node.toml

State directory (`node.data_dir`): `node.key` (identity, created on first start),
`ledger.db`, `status.json` (rewritten atomically every `node.status_interval_s`;
what `bidmesh ledger peers|sync` read), `control.sock`, and the log file.

Extension points (for the dataplane, the light-client query protocol, the HTTP
API, ...):

* `Node` holds the config, identity, ledger, libp2p host, pubsub, the replication
  service (`node.replicator`), discovery and the node's nursery.
* Services see the node only as a `node.context.NodeContext` (which `Node`
  implements): a service is any object with `name` and `async def run(self, node)`;
  optionally `status(self) -> dict` (merged into status.json under
  `services.<name>`). The built-ins (query protocol, HTTP API, provider agent,
  dataplane, tunnels) are started from the config in `_start_services`; plugins list
  a factory `f(node) -> service | None` in the `bidmesh.services` entry-point group
  (loaded at start), or call `node.add_service(svc)`. `node.market()` is the derived
  market every service shares, `node.submit(wire)` stores and gossips a client's
  record. Services register their own libp2p protocols on `node.host` (e.g.
  `p2p.serve_requests`) and may watch newly stored events with
  `node.add_listener(fn)`.
* Local control: `control.sock` (mode 0600) speaks u32-length-prefixed msgpack
  maps `{"op": ..., ...}` → `{"ok": true, ...}` / `{"ok": false, "error", "reason"}`.
  Built-in ops: status, publish, connect, block, unblock, sync (node/control_server.py).
  Add one with `node.control_ops["name"] = async fn(node, request) -> dict`.
  `node.control.control_call(data_dir, request)` is the blocking client (CLI, tests,
  bench). Logs: node/logs.py; the status file: node/status_file.py.

Graceful stop: on SIGTERM/SIGINT the control socket stops taking publishes, the
gossip outbox is flushed (bounded), the final status is written, services are
cancelled and the host closed; a watchdog ends the process if that overruns the
stop budget. Every acknowledged publish was committed to SQLite before the
acknowledgement, so nothing acknowledged is lost, even with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Hashable
from importlib.metadata import entry_points
from typing import Any

import trio

from . import config, lifecycle, p2p
from .auction import Market
from .context import EventListener, Service, ServiceFactory
from .control_server import BUILTIN_OPS, ControlOp, serve_control
from .discovery import Discovery
from .errors import BidmeshError, OperationError, UsageError
from .events import Body, Event, sign_event
from .gossip import Replicator
from .keys import Identity, load_or_create_key
from .ledger import AppendResult, Ledger, PendingLimits, Status
from .logs import setup_logging
from .loopstats import LoopSteps
from .marketview import LiveMarket, Snapshotter
from .p2p import LONG_LIVED_PREFIXES
from .resources import REPLICATION_LIMITS, Limits
from .status_file import write_status

log = logging.getLogger("bidmesh.daemon")

# ------------------------------------------------------------------ the node


class Node:
    """A running node; services plug in with `add_service` and see it as a
    `NodeContext`; control ops see it as a `ControlNode`."""

    def __init__(self, cfg: config.Config, identity: Identity, ledger: Ledger,
                 host: p2p.P2PHost, pubsub: p2p.PubSub, replicator: Replicator,
                 discovery: Discovery, nursery: trio.Nursery) -> None:
        self.config = cfg
        self.identity = identity
        self.ledger = ledger
        self.host = host
        self.pubsub = pubsub
        self.replicator = replicator
        self.discovery = discovery
        self.nursery = nursery
        self.services: dict[str, Service] = {}
        self.control_ops: dict[str, ControlOp] = dict(BUILTIN_OPS)
        self.started_at = time.time()
        self.stopping = False
        self.loop_lag_max_s = 0.0
        self.loop_steps = LoopSteps()  # installed when `[node] loop_stats` is on
        self.gc_frozen = 0  # objects of the startup heap out of the GC's sight
        # One derived market for every service (provider agent, query, HTTP, dataplane).
        snap = cfg.node.data_dir / SNAPSHOT_FILE if cfg.node.market_snapshot else None
        self.live = LiveMarket(ledger, skew_ms=int(cfg.node.max_clock_skew_s * 1000),
                               snapshot=snap)
        self.snapshots = Snapshotter(self.live, cfg.node.data_dir / SNAPSHOT_FILE)

    def market(self) -> Market:
        """The market derived from everything stored so far."""
        return self.live.market()

    def submit(self, wire: bytes, source: Hashable = None) -> AppendResult:
        """Store a record that came from a local client, gossip what was stored, and
        tell the replication listeners, exactly as for events from the network.
        `source`: whom the event is charged to if it has to wait for its predecessor
        (the pending buffer's per-source bounds; None: the shared local source)."""
        return self.submit_many([wire], source)[0]

    def submit_many(self, wires: list[bytes], source: Hashable = None) -> list[AppendResult]:
        """`submit` for several records, stored in one transaction (a SUBMIT's 16
        records: one commit instead of 16), gossiped and told to listeners at once."""
        if self.stopping:
            return [AppendResult(Status.REJECTED, reason="stopping",
                                 detail="the node is stopping; submit to another node")
                    for _ in wires]
        results = self.ledger.append_many(wires, source=source)
        events = [ev for res in results for ev in res.accepted]
        if events:
            self.replicator.gossip([ev.wire for ev in events])
            self.replicator.notify(events)
        return results

    def add_listener(self, fn: EventListener) -> None:
        self.replicator.listeners.append(fn)

    def add_service(self, service: Service) -> None:
        if service.name in self.services:
            raise UsageError(f"a service named {service.name!r} is already running")
        self.services[service.name] = service
        self.nursery.start_soon(self._run_service, service)

    async def _run_service(self, service: Service) -> None:
        log.info("service started", extra={"service": service.name})
        await service.run(self)

    def publish(self, body: Body) -> Event:
        """Sign `body` with the node key, store it (committed), and queue it for gossip."""
        return self.publish_many([body])[0]

    def publish_many(self, bodies: list[Body]) -> list[Event]:
        """Sign bodies as the next events of the node's chain and store them in one
        transaction (committed before this returns); then queue them for gossip."""
        if self.stopping:
            raise OperationError("the node is stopping; not taking new events")
        head = self.ledger.head(self.identity.public)
        seq, prev, ts = (head.seq, head.id, head.ts_ms) if head else (0, None, 0)
        ts = max(ts, int(time.time() * 1000))  # never backwards along the chain
        events = []
        for body in bodies:
            seq += 1
            ev = sign_event(self.identity.seed, seq, prev, ts, body, self.ledger.network)
            events.append(ev)
            prev = ev.id
        try:
            results = self.ledger.append_signed(events)
        except sqlite3.Error as e:
            # A full disk or a state dir gone read-only: the batch was rolled back,
            # nothing is acknowledged, and the node keeps serving what it has.
            log.error("storing own events failed", extra={"error": str(e), "events": len(events)})
            raise OperationError(f"could not store the events in {self.ledger.path} ({e}); "
                                 "nothing was stored: free disk space or fix the state "
                                 "directory, then retry") from e
        for res in results:
            if res.status is not Status.ACCEPTED:
                raise UsageError(f"own event not accepted: {res.status} {res.reason} {res.detail}")
        for ev in events:
            self.replicator.publish_event(ev)
        self.replicator.notify(events)  # like submit(): listeners see every stored event
        return events

    def status(self) -> dict[str, Any]:
        led = self.ledger
        rep = self.replicator
        peers = [str(p) for p in self.host.connected_peers()]
        services = {}
        for name, svc in self.services.items():
            fn = getattr(svc, "status", None)
            if callable(fn):
                services[name] = fn()
        return {
            "state": "stopping" if self.stopping else "running",
            "pid": os.getpid(),
            "network": led.network,
            "peer_id": str(self.host.peer_id),
            "public_key": self.identity.public.hex(),
            "listen_addrs": self.host.listen_addrs,
            # What peers are told (identify) and offers carry (node/addrs.py).
            "advertised_addrs": self.host.addrs,
            "peers": peers,
            "blocked": {p: until for p, until in rep.stats.cut_off_peers.items()
                        if until > time.time()},
            "digest": led.digest().hex(),
            "events": led.count(),
            "authors": len(led.heads()),
            "forked_authors": len(led.forked()),
            "pending": led.pending_count,
            "pending_buffer": led.pending_status(),
            "gaps": led.gap_count,
            "outbox": rep.outbox_len,
            "loop_lag_max_ms": round(self.loop_lag_max_s * 1000, 1),
            "gc": {"frozen": self.gc_frozen,
                   "collections": [g["collections"] for g in gc.get_stats()]},
            **({"loop_steps": self.loop_steps.recent(), "loop_waits": self.loop_steps.waits()}
               if self.config.node.loop_stats else {}),
            "tasks": _task_count(),
            "market": {
                "horizon_ms": self.live.view.horizon_ms,
                "held_events": self.live.view.held(),
                "partitions": self.live.view.engine.partitions(),
                "rederived": self.live.view.engine.rederived,
                "snapshot": (self.snapshots.status() if self.config.node.market_snapshot
                             else {"enabled": False}),
            },
            "sync": {
                "rounds": rep.stats.sync_rounds,
                "in_sync_rounds": rep.stats.sync_in_sync,
                "failed": rep.stats.sync_failed,
                "events": rep.stats.sync_events,
                "last_at": rep.stats.last_sync_at,
                "last_peer": rep.stats.last_sync_peer,
                # /sync/2 sessions, and those an older peer sent back to /sync/1.
                "reconciled": rep.stats.sync_reconciled,
                "v1_fallbacks": rep.stats.sync_v1_fallbacks,
                # Tarpit defences (node/sync_peers.py): slots in use, peers backed off.
                "stalled": rep.stats.sync_stalled,
                "timed_out": rep.stats.sync_timed_out,
                "no_slot": rep.stats.sync_no_slot,
                "backed_off_peers": rep.sync_record.backed_off_count(),
                "slots": rep.sync_slots.slots.status(),
                "limits": dataclasses.asdict(self.config.sync),
            },
            "gossip": {**rep.stats.as_dict(), **rep.mesh_state(),
                       "budget": rep.budget.status(), "gap_fetch": rep.gap_planner.status(),
                       "ingest": rep.ingest.status(),
                       "concurrent_copies": rep.topic.concurrent_copies,
                       "late_copies": rep.topic.late_copies,
                       # Batches dropped on arrival, before py-libp2p handled them
                       # (over budget, malformed, ingest full, blocked forwarder).
                       "refused_early": rep.topic.refused_early,
                       "copies_held_back": rep.pubsub.copies_held_back,
                       "iwant_spared": rep.pubsub.iwant_spared,
                       "seen_copies": rep.pubsub.seen_copies},
            "resources": self.host.guard.status(),
            "services": services,
            "started_at": self.started_at,
            "updated_at": time.time(),
        }


def _freeze_startup_heap() -> int:
    """Take what startup built (imports, py-libp2p's tables, the derived market: some
    100,000 objects before any event) out of the cyclic GC's sight: it lives as long
    as the process, and every full collection walked it on the event loop, a 55-80 ms
    step in whichever task allocated last (bench/hostile.py's longest steps). Garbage
    is collected first, so none of it is kept for good. A refold (marketview's
    `_gc_resume`) hands the frozen objects back to the collector; rare."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()  # (walks them all, ~10 ms: once, not per status)


def _task_count() -> int:
    """Live trio tasks in this process (a leak shows up here first)."""
    n, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n



LAG_TICK_S = 0.1


async def _lag_monitor(node: Node) -> None:
    """Measure event-loop stalls (a stalled loop stops reading peers' streams): how
    late a LAG_TICK_S timer fires. A stall of L shows as L - LAG_TICK_S at least, so
    every stall from 0.35 s on is logged; each tick costs a trio timer wake-up
    (~0.1-0.3 ms of CPU on a loaded 2-core machine), so not more often."""
    worst = 0.0
    while True:
        t0 = time.perf_counter()
        await trio.sleep(LAG_TICK_S)
        lag = time.perf_counter() - t0 - LAG_TICK_S
        node.loop_lag_max_s = max(node.loop_lag_max_s, lag)
        if lag > 0.25 and lag > worst / 2:
            worst = max(worst, lag)
            log.warning("event loop stalled", extra={"lag_s": round(lag, 3)})


SNAPSHOT_FILE = "market.snapshot"  # the derived market, for a fast restart
SNAPSHOT_CHECK_S = 60.0
SNAPSHOT_FIRST_S = 5.0  # the first check: a node that had none writes one soon


async def _snapshot_loop(node: Node) -> None:
    """Write the derived market's snapshot now and then (marketview.Snapshotter), from
    a forked child, so a restart loads it instead of folding the whole ledger."""
    snap = node.snapshots
    wait = SNAPSHOT_FIRST_S
    try:
        while True:
            await trio.sleep(wait)
            done = snap.poll()
            if done is not None:
                log.log(logging.INFO if done else logging.WARNING,
                        "market snapshot written" if done else "market snapshot failed",
                        extra={"cursor": snap.saved_cursor})
            if snap.due():
                try:
                    snap.start()
                except OSError as e:  # fork refused (memory, process limits): next time
                    snap.failures += 1
                    log.warning("cannot fork to write the market snapshot",
                                extra={"error": str(e)})
            wait = SNAPSHOT_CHECK_S if snap.pid is None else 1.0
    finally:
        if snap.pid is not None:
            # Stopping: the child finishes on its own (it replaces the file atomically);
            # nobody is left to reap it, and init does.
            log.info("market snapshot still being written at stop")


async def _status_loop(node: Node) -> None:
    while True:
        try:
            # Taken on the loop (a consistent picture), written on a thread: on a busy
            # disk creating and renaming the file held the event loop for 10-30 ms
            # (py-spy, 10 loaded nodes on one machine), every status_interval_s.
            await trio.to_thread.run_sync(write_status, node.config.status_path,
                                          node.status())
        except OSError as e:
            log.error("cannot write status file", extra={"error": str(e)})
        await trio.sleep(node.config.node.status_interval_s)


# ------------------------------------------------------------------ run


def _start_services(node: Node) -> None:
    """The built-in services the config asks for, then `bidmesh.services` plugins."""
    from . import http, provider, query
    from .dataplane import node as dataplane
    from .dataplane import tunnel_node

    factories: list[ServiceFactory] = [
        query.node_service, http.node_service, provider.node_service, dataplane.node_service,
        tunnel_node.node_service,  # bandwidth leases: when the provider offers bandwidth
    ]
    factories += [ep.load() for ep in entry_points(group="bidmesh.services")]
    for factory in factories:
        svc = factory(node)
        if svc is not None:
            node.add_service(svc)


async def run(cfg: config.Config, *, stop: trio.Event | None = None) -> None:
    """Run a node until SIGTERM/SIGINT (or `stop` is set).

    Before anything starts: the data dir's lock (one node per data dir) and a check
    that every listen address can be bound; either failing is one UsageError line."""
    data_dir = cfg.node.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with lifecycle.DataDirLock(data_dir):
        lifecycle.preflight(_binds(cfg))
        await _run_locked(cfg, stop or trio.Event())


def _binds(cfg: config.Config) -> list[lifecycle.Bind]:
    binds = lifecycle.tcp_binds(cfg.p2p.listen)
    if cfg.http.enabled:
        binds.append(lifecycle.Bind("http.listen/http.port", cfg.http.listen, cfg.http.port,
                                    f"{cfg.http.listen}:{cfg.http.port}"))
    return binds


async def _run_locked(cfg: config.Config, stop: trio.Event) -> None:
    data_dir = cfg.node.data_dir
    identity = load_or_create_key(cfg.key_path)
    lim = cfg.limits
    ledger = Ledger(cfg.ledger_path, network=cfg.node.network, pending=PendingLimits(
        peer_events=lim.pending_peer_events, peer_bytes=lim.pending_peer_bytes,
        total_bytes=lim.pending_total_bytes, ttl_s=float(lim.pending_ttl_s)),
        cache_kib=cfg.node.ledger_cache_mib << 10)
    try:
        async with p2p.open_host(identity.seed, cfg.p2p.listen, limits=limits_of(cfg),
                                 bootstrap=cfg.p2p.bootstrap,
                                 announce=cfg.p2p.announce,
                                 announce_append=cfg.p2p.announce_append,
                                 peerstore_max=cfg.limits.peerstore_max) as host, \
                p2p.make_pubsub(host, queue_high_water=cfg.gossip.queue_high_water,
                                # High watermark D+1, not the usual 2D: each mesh peer
                                # costs a copy of every message, and at 10 nodes on 2
                                # cores a node grafted up to 2D peers became the
                                # bottleneck (p99 ~3 s vs ~1.2 s at 1,200 events/s).
                                degree=cfg.gossip.mesh_degree,
                                degree_low=max(1, cfg.gossip.mesh_degree - 1),
                                degree_high=cfg.gossip.mesh_degree + 1) as ps:
            ps.dial_gossipsub_v11_only()
            listening = host.bound_addrs
            if len(listening) < len(cfg.p2p.listen):
                # Upstream logs a failed listen and carries on with the others.
                raise UsageError(f"p2p.listen: listening on {listening} "
                                 f"only, not on all of {cfg.p2p.listen}")
            replicator = Replicator(host, ps, ledger, cfg)
            # Inbound-stream failures and limit refusals count against the peer
            # like invalid events do (cut off past gossip.fault_threshold).
            host.guard.fault_listeners.append(replicator._fault)
            discovery = Discovery(host, cfg)
            async with trio.open_nursery() as nursery:
                node = Node(cfg, identity, ledger, host, ps, replicator, discovery, nursery)
                nursery.start_soon(replicator.run)
                await replicator.ready.wait()
                nursery.start_soon(discovery.run)
                if cfg.node.control_socket:
                    # Started (bound) before READY=1: ready means it answers.
                    await nursery.start(serve_control, node, cfg.control_path)
                if cfg.p2p.mdns:
                    nursery.start_soon(_mdns, node)
                _start_services(node)
                nursery.start_soon(_status_loop, node)
                if cfg.node.market_snapshot:
                    nursery.start_soon(_snapshot_loop, node)
                nursery.start_soon(_lag_monitor, node)
                if cfg.node.loop_stats:
                    trio.lowlevel.add_instrument(node.loop_steps)
                    # What an honest query waits for (bench/hostile.py reads it).
                    host.guard.loop = node.loop_steps
                    from .query import protocol_id as query_protocol
                    host.guard.timed_protocols = frozenset({query_protocol(cfg.node.network)})
                node.gc_frozen = _freeze_startup_heap()
                log.info("node started", extra={
                    "peer_id": str(host.peer_id), "addrs": host.addrs,
                    "network": cfg.node.network, "data_dir": str(data_dir),
                    "events": ledger.count(), "digest": ledger.digest().hex(),
                    "market_from_snapshot": node.live.restored})
                lifecycle.sd_notify(f"READY=1\nSTATUS=peer {host.peer_id}, "
                                    f"{ledger.count()} events")
                ping = lifecycle.watchdog_interval()
                if ping is not None:
                    nursery.start_soon(_systemd_watchdog, ping)
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async with trio.open_nursery() as waiters:
                        async def on_signal() -> None:
                            async for signum in signals:
                                log.info("stopping", extra={"signal": signal.Signals(signum).name})
                                stop.set()
                                return
                        waiters.start_soon(on_signal)
                        await stop.wait()
                        waiters.cancel_scope.cancel()
                lifecycle.sd_notify("STOPPING=1")
                _start_watchdog(cfg.node.stop_timeout_s + 0.8)
                node.stopping = True
                await replicator.flush(min(1.0, cfg.node.stop_timeout_s / 3))
                try:
                    write_status(cfg.status_path, node.status() | {"state": "stopped"})
                except OSError as e:
                    log.error("cannot write status file", extra={"error": str(e)})
                nursery.cancel_scope.cancel()
    finally:
        ledger.close()
    log.info("node stopped", extra={"events": _count(cfg)})


def limits_of(cfg: config.Config) -> Limits:
    """The resource manager's limits from `[limits]` and `p2p.max_connections`."""
    lim = cfg.limits
    return Limits(
        max_connections=cfg.p2p.max_connections, outbound_reserved=lim.outbound_reserved,
        trusted_reserved=lim.trusted_reserved, conns_per_peer=lim.conns_per_peer,
        conns_per_ip=lim.conns_per_ip, conns_per_subnet=lim.conns_per_subnet,
        ipv6_prefix=lim.ipv6_prefix, ip_exempt=tuple(lim.ip_exempt),
        streams_per_peer=lim.streams_per_peer, streams_per_protocol=lim.streams_per_protocol,
        streams_per_peer_protocol=lim.streams_per_peer_protocol,
        trusted_reserved_streams=lim.trusted_reserved_streams,
        requests_per_peer=lim.requests_per_peer, conn_idle_s=lim.conn_idle_s,
        conn_grace_s=lim.conn_grace_s,
        idle_pressure=lim.idle_pressure,
        stream_idle_s=lim.stream_idle_s, good_peers_max=lim.good_peers_max,
        long_lived=LONG_LIVED_PREFIXES,
        **{name: getattr(lim, name) for name in REPLICATION_LIMITS})


def _count(cfg: config.Config) -> int | str:
    try:
        with Ledger(cfg.ledger_path, network=cfg.node.network, readonly=True) as led:
            return led.count()
    except BidmeshError as e:
        return str(e)


async def _systemd_watchdog(interval: float) -> None:
    """WATCHDOG=1 every `interval` s (unit `WatchdogSec=`): sent from the event loop, so
    a loop stuck for the whole timeout gets the node restarted."""
    while True:
        lifecycle.sd_notify("WATCHDOG=1")
        await trio.sleep(interval)


def _start_watchdog(seconds: float) -> None:
    """If the stop overruns (upstream teardown can hang on a dead peer), exit anyway:
    every acknowledged event is already committed. The exit status is non-zero
    (`lifecycle.EXIT_WATCHDOG`) so supervisors see that the stop was not clean."""
    def fire() -> None:
        sys.stderr.write(json.dumps({"ts": round(time.time(), 3), "level": "warning",
                                     "logger": "bidmesh.daemon",
                                     "msg": "stop overran its budget; exiting now",
                                     "exit_status": lifecycle.EXIT_WATCHDOG}) + "\n")
        sys.stderr.flush()
        os._exit(lifecycle.EXIT_WATCHDOG)
    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()


async def _mdns(node: Node) -> None:
    from .discovery import run_mdns

    await run_mdns(node.host, node.discovery, node.config.node.network)


# ------------------------------------------------------------------ `bidmesh run`


def run_foreground(cfg: config.Config) -> None:
    """What `bidmesh run` does: as `run()`, but the lock and the port check come
    before the log file is opened, so a refused start leaves nothing behind and never
    writes into the running node's node.log."""
    cfg.node.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with lifecycle.DataDirLock(cfg.node.data_dir):
            lifecycle.preflight(_binds(cfg))
            setup_logging(cfg)
            trio.run(_run_locked, cfg, trio.Event())
    except BaseExceptionGroup as eg:
        # A start-up step inside a nursery (a listener, a service) raised one of
        # ours: report it as the one line it is, not as a nested traceback.
        one = lifecycle.single_error(eg)
        if one is eg:
            raise
        raise one from None
