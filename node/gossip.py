"""Replication for a running node: gossipsub push, pull anti-entropy.

The decisions (pacing, live window, gap grace, regossip, fault cut-off, periodic
sync schedule, mesh watchdog) are `node.replication.ReplicationPolicy`'s, sans-I/O
and tested on a fake network; `Replicator` here performs them over libp2p.

* Push: one gossipsub topic per network, `bidmesh/<network>/events/1`. Events are
  batched per pubsub message (`[1, [wire, ...]]`, up to `gossip.batch_events`
  events or `gossip.batch_ms` of waiting) and published with backpressure
  (`Topic.publish` waits while any peer's outbound queue is high), so py-libp2p's
  silent queue drops never trigger. Received batches are stored by the topic
  validator in one `append_many` transaction: the validator sees every message
  that reaches the node, even those upstream later drops from the subscription
  channel. It never raises and never rejects for a temporary reason; it rejects
  batches that are undecodable or carry invalid events (so we do not forward them).
* Pull: `node.sync` sessions over request/response `/bidmesh/<network>/sync/2` (set
  reconciliation, node/sync_recon.py; `/sync/1` with peers that lack it, both served):
  with every newly connected peer, every `sync.interval_s` with a random peer, and
  soon after `ledger.pending_gaps()` appear (asking the peers that sent the orphans first).
  Convergence never depends on gossip delivering everything.
* Mesh watchdog: a node whose gossipsub mesh stays empty while it has topic peers
  GRAFTs some again (`Topic.regraft`; docs/libp2p-notes.md, "Mesh loss"); counted
  in `stats.mesh_lost`, `mesh_empty_s`, `mesh_regrafts`.
* Budgets (`[limits]`, node/budget.py): gossip input per forwarding peer and per
  subnet in events/s and bytes/s, beyond which batches are dropped on arrival,
  before py-libp2p handles them (`_precheck`; a fault only for the peer's own
  publishes over its own budget); pending events charged to their forwarder and expired
  (`_expire_pending`; a fault when the forwarder published them); gap pulls
  planned within per-peer and per-round budgets (node/gaps.py).
* Accounting: invalid input per peer (gossip and sync) within a sliding window;
  at `gossip.fault_threshold` the peer is disconnected and blocked for
  `gossip.block_s`, logged, and counted in `stats.cut_off`.
* Discovery (bootstrap redial, mDNS) is node/discovery.py; the pull side and the
  fault accounting are node/gossip_pull.py (`PullSync`, the Replicator's base).
"""

from __future__ import annotations

import collections
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Hashable
from typing import Any

import trio

from . import codec, p2p, sync
from .budget import GossipBudget, GossipVerdict
from .config import Config
from .errors import BidmeshError, InvalidMessage, Reason, UsageError
from .events import MAX_WIRE, Event
from .gaps import GapPlanner
from .gossip_pull import PullSync
from .ingest import FairIngest
from .ledger import AppendResult, Ledger, Status, check_records
from .replication import (  # noqa: F401  (LIVE_S & co. re-exported for callers)
    CATCH_UP_S,
    GAP_GRACE_S,
    LIVE_S,
    LIVE_WINDOW_MAX_S,
    MESH_CHECK_S,
    REGOSSIP_MIN_AGE_MS,
    Clock,
    ReplicationPolicy,
    Stats,
)
from .sync_peers import SlotGate, SyncPeers, SyncRecord, SyncSlots
from .sync_session import SyncLimits

log = logging.getLogger("bidmesh.gossip")

BATCH_VERSION = 1
BATCH_MAX_EVENTS = 512
BATCH_MAX_BYTES = 1000 * 1024
PUBLISH_WAIT_S = 1.0  # longest wait for a receiver's full gossip queue before publishing
EXPIRE_SLICE = 256  # pending entries expired per loop step (~1-3 ms)
DRAIN_SLICE = 64  # waiting events one store (and one drain step) takes from the pending buffer


def topic_name(network: str) -> str:
    return f"bidmesh/{network}/events/1"


# ------------------------------------------------------------------ batch format


def encode_batch(wires: list[bytes]) -> bytes:
    if not 0 < len(wires) <= BATCH_MAX_EVENTS:
        raise UsageError(f"a gossip batch holds 1..{BATCH_MAX_EVENTS} events")
    return codec.pack([BATCH_VERSION, wires])


def decode_batch(data: bytes) -> list[bytes]:
    """`[1, [wire, ...]]` with 1..512 records of at most MAX_WIRE bytes each."""
    v = codec.unpack(data, BATCH_MAX_BYTES)
    if type(v) is not list or len(v) != 2 or v[0] != BATCH_VERSION or type(v[0]) is not int:
        raise InvalidMessage("gossip batch must be [1, [wire, ...]]", Reason.MALFORMED)
    wires = v[1]
    if type(wires) is not list or not 0 < len(wires) <= BATCH_MAX_EVENTS:
        raise InvalidMessage(f"gossip batch must hold 1..{BATCH_MAX_EVENTS} events",
                             Reason.MALFORMED)
    for w in wires:
        if type(w) is not bytes or not 0 < len(w) <= MAX_WIRE:
            raise InvalidMessage(f"gossip records must be 1..{MAX_WIRE} bytes", Reason.MALFORMED)
    return wires


AcceptedListener = Callable[[list[Event]], None]


class Replicator(PullSync):
    """The replication service of one node: performs what its `ReplicationPolicy`
    (node/replication.py) decides, over libp2p. Run `run()` in a nursery.

    `clock` defaults to trio's clock with `time.time()` for wall time; `rng` (the
    policy's only randomness: sync jitter and peer picks) to a fresh
    `random.Random()`. Tests pass a virtual clock and a seeded one."""

    def __init__(self, host: p2p.P2PHost, pubsub: p2p.PubSub, ledger: Ledger,
                 config: Config, *, clock: Clock | None = None,
                 rng: random.Random | None = None) -> None:
        self.host = host
        self.pubsub = pubsub
        self.ledger = ledger
        self.cfg = config
        self.network = ledger.network
        self.topic = pubsub.topic(topic_name(self.network))
        self.protocol = sync.protocol_id(self.network)
        self.protocol2 = sync.protocol_id(self.network, 2)  # set reconciliation
        self.clock = clock or Clock(trio.current_time, time.time)
        self.policy: ReplicationPolicy[p2p.PeerId] = ReplicationPolicy(
            config, self.clock, rng or random.Random())
        self.stats: Stats = self.policy.stats
        self.limits = SyncLimits(
            heads_page=config.sync.heads_page,
            range_limit=config.sync.range_limit,
            range_bytes=config.sync.range_bytes,
            max_requests=config.sync.session_requests,
            session_s=config.sync.session_s,
            stall_s=config.sync.stall_s,
            idle_pages=config.sync.idle_pages,
            slow_s=config.sync.request_timeout_s / 2,
        )
        lim = config.limits
        self.budget = GossipBudget(float(lim.gossip_peer_events_per_s),
                                   float(lim.gossip_peer_bytes_per_s),
                                   float(lim.gossip_burst_s), self.clock.now,
                                   first_s=float(lim.gossip_first_burst_s),
                                   subnet_events_per_s=float(lim.gossip_subnet_events_per_s),
                                   subnet_bytes_per_s=float(lim.gossip_subnet_bytes_per_s))
        """Gossip input per forwarding peer and per subnet (`[limits] gossip_*`)."""
        self.ingest: FairIngest[p2p.PeerId, Event | AppendResult] = FairIngest(
            lambda wires: check_records(wires, self.network), self._store_slice,
            max_events=lim.gossip_ingest_queue_events)
        """Received gossip, checked and stored in slices fairly between peers."""
        self.listeners: list[AcceptedListener] = []
        """Called with events newly stored: from gossip, sync, or the node itself."""
        self._outbox_event = trio.Event()
        self._idle = trio.Event()  # set while nothing waits to be published
        self._idle.set()
        self._syncing: set[p2p.PeerId] = set()
        self.sync_peers = SyncPeers(host, self.protocol)
        self._send_errors: dict[p2p.PeerId, tuple[str, str]] = {}  # why a request failed
        # Sync slots and per-peer history: tarpits (node/sync_peers.py).
        self.sync_record = SyncRecord(self.clock.now, penalty_s=config.sync.penalty_s,
                                      penalty_max_s=config.sync.penalty_max_s)
        self.sync_slots = SlotGate(SyncSlots(config.sync.slots, config.sync.reserved_slots,
                                             config.sync.stranger_slots_per_subnet))
        # A filled gap may release a chain of up to pending_per_author events: each
        # store takes DRAIN_SLICE of them, `_drain_ready` the rest, a slice per step.
        ledger.drain_limit = DRAIN_SLICE
        ledger.on_ready = self._wake_drain
        self._drain_wake = trio.Event()
        self._gap_event = trio.Event()
        self.gap_planner = GapPlanner(lim.gap_authors_per_round,
                                      float(lim.gap_peer_requests_per_s), lim.gap_tries)
        """Which gaps to pull from whom (`[limits] gap_*`, node/gaps.py)."""
        self._nursery: trio.Nursery | None = None
        self.ready = trio.Event()

    # ---------------------------------------------------------- public API

    def gossip(self, wires: list[bytes]) -> None:
        """Queue stored events for gossip (batched and paced by the sender task)."""
        self.policy.queue(wires)
        self._wake_sender()

    def _wake_sender(self) -> None:
        if self.policy.outbox_len:
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self._outbox_event.set()

    def publish_event(self, ev: Event) -> None:
        self.stats.published += 1
        self.gossip([ev.wire])

    @property
    def outbox_len(self) -> int:
        return self.policy.outbox_len

    def mesh_state(self) -> dict[str, int]:
        """Our view of the gossip topology: a node with peers but an empty mesh
        gets events only by sync (the mesh watchdog, `_watch_mesh`, rejoins it)."""
        return {"mesh_peers": len(self.topic.mesh_peers()),
                "topic_peers": len(self.topic.peers()),
                "pubsub_streams": self.pubsub.stream_count()}

    def live_window_s(self) -> float:
        """See `ReplicationPolicy.live_window_s`."""
        return self.policy.live_window_s()

    async def run(self) -> None:
        """Serve sync, validate/store gossip, send batches, run anti-entropy; `ready` is
        set once the topic is subscribed."""
        # The reconciliation index costs one hash per author to build (~1 s at 100,000
        # authors, blocking): at start, not inside the first /sync/2 request or session.
        self.ledger.recon_index()
        p2p.serve_requests(self.host, self.protocol, self._serve, sync.MAX_REQUEST,
                           timeout=self.cfg.sync.request_timeout_s)
        p2p.serve_requests(self.host, self.protocol2, self._serve2, sync.MAX_REQUEST_V2,
                           timeout=self.cfg.sync.request_timeout_s)
        self.topic.set_async_validator(self._validate, self._precheck)
        messages = await self.topic.subscribe()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._drain, messages)
            nursery.start_soon(self.ingest.run)
            nursery.start_soon(self._sender)
            nursery.start_soon(self._watch_peers)
            nursery.start_soon(self._periodic_sync)
            nursery.start_soon(self._gap_sync)
            nursery.start_soon(self._expire_pending)
            nursery.start_soon(self._drain_ready)
            nursery.start_soon(self._watch_mesh)
            self.ready.set()

    async def flush(self, timeout: float) -> bool:
        """Wait until the outbox is published (graceful stop); False on timeout."""
        with trio.move_on_after(timeout):
            await self._idle.wait()
        return self._idle.is_set()

    # ---------------------------------------------------------- push

    async def _drain(self, messages: Any) -> None:
        # Messages are handled (stored) in the validator; keep the channel empty.
        async for _origin, _data in messages:
            pass

    async def _sender(self) -> None:
        while True:
            await self._outbox_event.wait()
            self._outbox_event = trio.Event()
            await trio.sleep_until(self.policy.round_at())  # pacing (node/replication.py)
            self.policy.start_round()
            while batch := self.policy.next_batch():
                await self._publish(batch)
            if self.policy.outbox_len:
                self._outbox_event.set()  # paced (or queued meanwhile): the next round
            else:
                self._idle.set()

    async def _publish(self, batch: list[bytes]) -> None:
        data = encode_batch(batch)
        t0 = self.clock.now()
        try:
            missed = await self.topic.publish(data, timeout=PUBLISH_WAIT_S)
            waited = self.clock.now() - t0
            self.stats.publish_wait_s += waited
            if missed:
                # A receiver's queue stayed full: it misses this batch, pull
                # sync repairs that; waiting longer would stall every batch.
                self.stats.publish_missed += missed
                log.info("gossip peer queue full; it gets the batch by sync",
                         extra={"waited_s": round(waited, 2), "peers": missed,
                                "outbox": self.policy.outbox_len})
            self.stats.batches_sent += 1
            self.stats.bytes_sent += len(data)
        except BidmeshError as e:
            # A stopping router: the events are stored, pull sync delivers them.
            self.stats.gossip_errors += 1
            log.warning("gossip publish failed; sync will deliver the batch",
                        extra={"error": str(e), "events": len(batch)})

    async def _validate(self, forwarder: p2p.PeerId, origin: p2p.PeerId,
                        fresh: list[bytes] | bool) -> bool:
        """Topic validator: store the batch; never raises, never rejects transiently.
        The cheap checks (`_precheck`: budget, decoding, duplicates) ran when the
        message arrived, before py-libp2p's own handling (node/p2p/pubsub.py
        `set_async_validator`); the rest waits its turn in the fair ingest queue
        (node/ingest.py)."""
        if isinstance(fresh, bool):
            return fresh
        return await self.ingest.submit(forwarder, fresh, origin == forwarder)

    def _precheck(self, forwarder: p2p.PeerId, origin: p2p.PeerId,
                  data: bytes) -> list[bytes] | bool:
        """The records of a batch worth checking and storing, or the verdict (False:
        dropped on arrival, before py-libp2p checks the signature or formats a
        rejection; `origin` is not verified yet, so it only decides faults)."""
        if forwarder == self.host.peer_id:
            return True  # our own publish: the events are already stored
        self.stats.batches_received += 1
        self.stats.bytes_received += len(data)
        own = origin == forwarder
        subnet = self._subnet(forwarder)
        verdict = self.budget.charge_bytes(forwarder, len(data), own, subnet)
        if not verdict.ok:
            return self._over_budget(forwarder, verdict)
        try:
            wires = decode_batch(data)
        except InvalidMessage as e:
            self._fault(forwarder, f"batch_{e.reason}")
            return False
        # Events we already hold (re-gossip, sync overlap) skip the signature check.
        fresh = [w for w in wires if not self.ledger.holds(w)]
        self.stats.events["duplicate"] += len(wires) - len(fresh)
        if not fresh:
            return True
        if not self.ingest.admits(forwarder, len(fresh)):
            # The node-wide ingest queue is full and this peer holds its share of it:
            # dropped (not forwarded; pull sync fetches what is worth having), no fault.
            self.stats.events["ingest_full"] += len(fresh)
            return False
        verdict = self.budget.charge_events(forwarder, len(fresh), own, subnet)
        if not verdict.ok:
            return self._over_budget(forwarder, verdict)
        return fresh

    def _store_slice(self, forwarder: p2p.PeerId, wires: list[bytes],
                     checked: list[Event | AppendResult], blame: bool) -> bool:
        """Store one checked slice of a received batch (node/ingest.py calls it);
        False if it held input the forwarder is at fault for."""
        t0 = time.perf_counter()
        try:
            # Events that go pending are charged to the forwarder (node/ledger.py);
            # if they never chain, that is its fault only if it published them.
            results = self.ledger.append_checked(wires, checked, source=forwarder, blame=blame)
        except sqlite3.Error as e:
            # Our disk, not the peer: accept (others may store it), fetch it by sync later.
            log.error("storing a gossip batch failed", extra={"error": str(e)})
            self.stats.events["store_error"] += len(wires)
            return True
        finally:
            self.stats.validate_s += time.perf_counter() - t0
        accepted: list[Event] = []
        bad = 0
        pending = False
        for res in results:
            if res.status is not Status.ACCEPTED:
                self.stats.events[res.status.value] += 1
            accepted.extend(res.accepted)
            if res.status is Status.REJECTED:
                self.stats.rejected[res.reason or "unknown"] += 1
                if sync.counts_against_peer(res):
                    bad += 1
                    self._fault(forwarder, res.reason or "rejected")
            elif res.status is Status.PENDING:
                pending = True
            elif res.status is Status.FORK:
                self.stats.events["fork_proofs"] += 1
        if accepted:
            self.stats.events["accepted"] += len(accepted)
            self.stats.events["accepted_gossip"] += len(accepted)
            self.policy.gossip_received(max(ev.ts_ms for ev in accepted))
            self.notify(accepted)
        if pending:
            self._gap_event.set()
        return bad == 0

    def _over_budget(self, forwarder: p2p.PeerId, verdict: GossipVerdict) -> bool:
        """Drop a batch beyond the forwarder's budget (on arrival: neither validated
        nor forwarded, since we do not forward what we did not store; another peer's
        copy is judged on its own, and pull sync fetches the events if they are worth
        having). The forwarder is faulted only when its own publishes exceed the
        budget (`verdict.fault`, node/budget.py): an honest relay may be carrying
        someone else's flood, an honest peer may share its subnet with flooders, and
        cutting them off would let a flooder partition honest nodes; nor is an honest
        node whose relays filled its forwarding budget at fault for the own batches
        then dropped."""
        if verdict.fault:
            self._fault(forwarder, f"gossip_over_budget_{verdict.scope}")
        return False

    def notify(self, events: list[Event]) -> None:
        for fn in self.listeners:
            try:
                fn(events)
            except Exception:  # a listener's bug must not stop replication
                log.exception("accepted-events listener failed")

    def _wake_drain(self) -> None:
        self._drain_wake.set()

    async def _drain_ready(self) -> None:
        """Store the rest of chains whose gap filled (beyond what the store that filled
        it took, `Ledger.drain_limit`), DRAIN_SLICE events per loop step. They are
        accepted like any other: listeners hear of them, and those a gossip peer did
        not send us (SUBMIT, local, sync) are gossiped, as `Node.submit` does; the mesh
        already carried the rest."""
        while True:
            await self._drain_wake.wait()
            self._drain_wake = trio.Event()
            while self.ledger.ready_count:
                try:
                    got = self.ledger.drain_ready(DRAIN_SLICE)
                except sqlite3.Error as e:
                    # Our disk: the events stay ready; the next store that leaves an
                    # author ready wakes this again (and sync fetches what expires).
                    log.error("storing drained pending events failed", extra={"error": str(e)})
                    self.stats.events["store_error"] += 1
                    break
                if got:
                    events = [ev for ev, _ in got]
                    self.stats.events["accepted"] += len(events)
                    self.stats.events["accepted_drained"] += len(events)
                    self.notify(events)
                    push = [ev.wire for ev, src in got if not isinstance(src, p2p.PeerId)]
                    if push:
                        self.gossip(push)
                await trio.lowlevel.checkpoint()

    async def _expire_pending(self) -> None:
        """Drop pending events older than `pending_ttl_s`; fault the peers that
        published events that never chained (relayed ones are not the relay's fault).

        One fault per publishing peer per sweep, however many of its events expired:
        an expiry is weak evidence. The gap may be of our own making (a batch we
        dropped on a budget or a full ingest queue, a publish that skipped our full
        queue) and left unfilled because the publisher was too loaded to answer our
        gap pulls in time (then backed off): one stall of an overloaded honest node
        used to cost it a cut-off's worth at once, and both its peers cut it off
        (bench/soak.py at load 20-30). A peer whose events keep expiring sweep after
        sweep still collects faults, and the pending budgets hold what it parks."""
        period = max(0.5, min(5.0, self.cfg.limits.pending_ttl_s / 4))
        while True:
            await trio.sleep(period)
            # In slices: a full buffer (65,536 entries) expiring at once is ~0.2 s of CPU.
            expired: collections.Counter[tuple[Hashable, bool]] = collections.Counter()
            while True:
                part = self.ledger.expire_pending(EXPIRE_SLICE)
                expired.update(part)
                if sum(part.values()) < EXPIRE_SLICE:
                    break
                await trio.lowlevel.checkpoint()
            for (source, blame), n in expired.items():
                self.stats.pending_expired += n
                if blame and isinstance(source, p2p.PeerId):
                    self._fault(source, "pending_expired")
            if expired:
                log.info("pending events expired", extra={
                    "events": sum(expired.values()),
                    "sources": len({src for src, _ in expired})})

    async def _watch_mesh(self) -> None:
        """Mesh watchdog: GRAFT topic peers again when our mesh stays empty while we
        have some (the policy decides when; docs/libp2p-notes.md says why)."""
        while True:
            await trio.sleep(MESH_CHECK_S)
            action = self.policy.mesh_check(self.topic.mesh_peers(), self.topic.peers())
            if action is None:
                continue
            grafted = await self.topic.regraft(action.peers, action.want)
            if action.want:
                log.info("gossip mesh empty; grafting topic peers again", extra={
                    "empty_s": round(action.empty_s, 1), "grafted": grafted,
                    "topic_peers": len(action.peers)})
