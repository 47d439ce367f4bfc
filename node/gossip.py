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
* Budgets (`[limits]`, node/budget.py): gossip input per forwarding peer in
  events/s and bytes/s, beyond which batches are dropped (a fault only for the
  peer's own publishes); pending events charged to their forwarder and expired
  (`_expire_pending`; a fault when the forwarder published them); gap pulls
  planned within per-peer and per-round budgets (node/gaps.py).
* Accounting: invalid input per peer (gossip and sync) within a sliding window;
  at `gossip.fault_threshold` the peer is disconnected and blocked for
  `gossip.block_s`, logged, and counted in `stats.cut_off`.
* Discovery (bootstrap redial, mDNS) is node/discovery.py.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import sqlite3
import time
from collections.abc import Callable, Hashable
from typing import Any, cast

import trio

from . import codec, p2p, sync
from .budget import GossipBudget, GossipVerdict
from .config import Config
from .errors import BidmeshError, InvalidMessage, OperationError, Reason, UsageError
from .events import MAX_WIRE, Event
from .gaps import GapPlanner
from .ingest import FairIngest
from .ledger import AppendResult, Gap, Ledger, Status, check_records
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
from .resources import subnet_of
from .sync_peers import SlotGate, SyncPeers, SyncRecord, SyncSlots, cause_of, lacks_protocol
from .sync_recon import ReconSession
from .sync_session import SyncLimits, SyncSession

log = logging.getLogger("bidmesh.gossip")

BATCH_VERSION = 1
BATCH_MAX_EVENTS = 512
BATCH_MAX_BYTES = 1000 * 1024
PUBLISH_WAIT_S = 1.0  # longest wait for a receiver's full gossip queue before publishing
PEERS_RECHECK_S = 5.0  # connection table re-read without an event (was polled every 0.2 s)
GAP_SUMMARY_SLICE = 512  # authors' gaps summarized per loop step (~1-3 ms)
EXPIRE_SLICE = 256  # pending entries expired per loop step (~1-3 ms)
DRAIN_SLICE = 64  # waiting events one store (and one drain step) takes from the pending buffer


def _records_of(resp: sync.SyncResponse | None) -> list[bytes]:
    """The event records a sync response carries (RANGE, FETCH)."""
    if isinstance(resp, sync.RangeResponse):
        return list(resp.records)
    if isinstance(resp, sync.FetchResponse):
        return [w for entry in resp.records for w in entry]
    return []


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


class Replicator:
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
                                   float(lim.gossip_burst_s), self.clock.now)
        """Gossip input per forwarding peer (`[limits] gossip_*`)."""
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

    async def sync_with(
        self, peer: p2p.PeerId, gaps: list[tuple[bytes, int, int]] | None = None,
        *, leave_live: bool = False,
    ) -> SyncSession | None:
        """Run one anti-entropy session with `peer` now; None if one is already running.
        `leave_live`: skip authors whose events gossip is delivering (we hold one
        younger than the live window; see `SyncSession`), as the periodic rounds do."""
        if peer in self._syncing or self.host.is_blocked(peer):
            return None
        if self.sync_peers.lacks_sync(peer) or self.sync_record.backed_off(peer):
            self.stats.sync_skipped += 1  # a light client, another network, a tarpit
            return None
        self._syncing.add(peer)
        try:
            if not await self.sync_slots.acquire(peer, lambda: self._known_sync_peer(peer),
                                                 self.cfg.sync.session_s, self._subnet(peer),
                                                 self.sync_record.good(peer)):
                self.stats.sync_no_slot += 1
                return None
            try:
                live_after_ms = self.policy.live_after_ms() if leave_live else None
                return await self._session(peer, gaps, live_after_ms)
            finally:
                self.sync_slots.release(peer)
        finally:
            self._syncing.discard(peer)

    def _subnet(self, peer: p2p.PeerId) -> str | None:
        """The subnet a stranger's sync sessions are counted in (None: unknown)."""
        ip = self.host.remote_ip(peer)
        try:
            return None if ip is None else subnet_of(ip)
        except ValueError:
            return None

    def _known_sync_peer(self, peer: p2p.PeerId) -> bool:
        """May use the reserved sync slots: a peer we dialed (node/sync_peers.py)."""
        return self.sync_peers.dialed(peer)

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
        self.topic.set_async_validator(self._validate)
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
            if not self.policy.outbox_len:
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

    async def _validate(self, forwarder: p2p.PeerId, origin: p2p.PeerId, data: bytes) -> bool:
        """Topic validator: store the batch; never raises, never rejects transiently.
        The cheap checks (budget, decoding, duplicates) run at once; the rest waits
        its turn in the fair ingest queue (node/ingest.py)."""
        if forwarder == self.host.peer_id:
            return True  # our own publish: the events are already stored
        fresh = self._precheck(forwarder, origin, data)
        if isinstance(fresh, bool):
            return fresh
        return await self.ingest.submit(forwarder, fresh, origin == forwarder)

    def _precheck(self, forwarder: p2p.PeerId, origin: p2p.PeerId,
                  data: bytes) -> list[bytes] | bool:
        """The records of a batch worth checking and storing, or the verdict."""
        self.stats.batches_received += 1
        self.stats.bytes_received += len(data)
        verdict = self.budget.charge_bytes(forwarder, len(data))
        if not verdict.ok:
            return self._over_budget(forwarder, origin, verdict)
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
        verdict = self.budget.charge_events(forwarder, len(fresh))
        if not verdict.ok:
            return self._over_budget(forwarder, origin, verdict)
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

    def _over_budget(self, forwarder: p2p.PeerId, origin: p2p.PeerId,
                     verdict: GossipVerdict) -> bool:
        """Drop a batch beyond the forwarder's budget (the validator rejects it: we do
        not forward what we did not store; upstream then refuses that message id from
        anyone for its validation-cache lifetime, and pull sync fetches the events
        if they are worth having). The forwarder is faulted only for batches it
        published itself: an honest relay may be carrying someone else's flood, and
        cutting relays off would let a flooder partition honest nodes."""
        if origin == forwarder:
            self._fault(forwarder, f"gossip_over_budget_{verdict.scope}")
        return False

    def notify(self, events: list[Event]) -> None:
        for fn in self.listeners:
            try:
                fn(events)
            except Exception:  # a listener's bug must not stop replication
                log.exception("accepted-events listener failed")

    # ---------------------------------------------------------- accounting

    def _fault(self, peer: p2p.PeerId, reason: str) -> None:
        """Count invalid input from `peer`; cut it off at the threshold (policy)."""
        cut = self.policy.fault(peer, reason, self.host.is_blocked)
        if cut is not None:
            self.host.block(peer, cut.block_s)
            log.warning("peer cut off for invalid input", extra={
                "peer": str(peer), "faults": cut.faults, "reasons": cut.reasons,
                "blocked_s": cut.block_s})

    # ---------------------------------------------------------- pull

    async def _serve(self, pubkey: bytes, payload: bytes, version: int = 1) -> bytes:
        try:
            req = sync.decode_request(payload, version)
        except InvalidMessage:
            self._fault(p2p.peer_id_from_pubkey(pubkey), "bad_sync_request")
            raise
        self.stats.sync_served += 1
        await trio.lowlevel.checkpoint()
        return sync.serve(self.ledger, req, version).encode()

    async def _serve2(self, pubkey: bytes, payload: bytes) -> bytes:
        return await self._serve(pubkey, payload, 2)

    def _sync_version(self, peer: p2p.PeerId) -> int:
        """/sync/2 unless configured off or identify says the peer lacks it (unknown
        yet: try it; multistream's "na" sends the session back to /sync/1)."""
        if self.cfg.sync.protocol < 2 or self.sync_peers.serves(peer, self.protocol2) is False:
            return 1
        return 2

    async def _send(self, peer: p2p.PeerId, req: sync.SyncRequest,
                    version: int = 1) -> sync.SyncResponse | None:
        protocol = self.protocol2 if version == 2 else self.protocol
        try:
            data = await p2p.request(self.host, peer, protocol, req.encode(),
                                     sync.MAX_RESPONSE, self.cfg.sync.request_timeout_s)
        except InvalidMessage as e:
            self._fault(peer, f"sync_{e.reason}")
            self._send_errors[peer] = (cause_of(e), str(e))
            return None
        except OperationError as e:
            cause = ("lacks_protocol" if lacks_protocol(e) else
                     "timeout" if isinstance(e, p2p.StreamTimeout) else cause_of(e))
            self._send_errors[peer] = (cause, str(e))
            return None
        self.stats.sync_bytes += len(data)
        try:
            return sync.decode_response(data, version)
        except InvalidMessage as e:
            self._fault(peer, f"sync_{e.reason}")
            return None

    async def _session(self, peer: p2p.PeerId, gaps: list[tuple[bytes, int, int]] | None,
                       live_after_ms: int | None, version: int | None = None) -> SyncSession:
        version = self._sync_version(peer) if version is None else version
        s: SyncSession
        if version == 2:
            s = ReconSession(self.ledger, self.limits, gaps=gaps, live_after_ms=live_after_ms,
                             clock=self.clock.now)
        else:
            s = SyncSession(self.ledger, self.limits, gaps=gaps,
                            live_after_ms=live_after_ms, clock=self.clock.now)
        store_failed = False
        while (req := s.next_request()) is not None:
            resp = await self._send(peer, req, version)
            if (resp is None and version == 2 and s.stats.requests == 1
                    and self._send_errors.get(peer, ("",))[0] == "lacks_protocol"):
                # An older node: multistream answered "na" to /sync/2.
                del self._send_errors[peer]
                self.stats.sync_v1_fallbacks += 1
                return await self._session(peer, gaps, live_after_ms, 1)
            try:
                records = _records_of(resp)
                if records:
                    # The session stores them inside on_response: check them on the
                    # ingest thread first, so the loop only stores (node/ingest.py).
                    checked = await trio.to_thread.run_sync(
                        check_records, records, self.network, limiter=self.ingest.limiter)
                    with self.ledger.prechecked(records, checked):
                        s.on_response(resp)
                else:
                    s.on_response(resp)
            except sqlite3.Error as e:
                # Our disk (full, or gone read-only), not the peer: end this session;
                # the batch was rolled back and a later session fetches it again.
                log.error("storing synced events failed", extra={"peer": str(peer),
                                                                "error": str(e)})
                self.stats.events["store_error"] += 1
                store_failed = True
                break
        self.stats.sync_rounds += 1
        self.stats.sync_reconciled += version == 2
        self.stats.last_sync_at = self.clock.wall()
        self.stats.last_sync_peer = str(peer)
        self.stats.sync_in_sync += s.in_sync
        self.stats.sync_events += s.stats.accepted
        self.stats.sync_left_live += s.stats.skipped_live
        send_error = self._send_errors.pop(peer, None)
        if send_error is not None and send_error[0] == "lacks_protocol":
            # Picked before identify finished (over IDENTIFY_WAIT_S on a loaded host):
            # its "na" says what identify would have, a light client. A skip.
            self.stats.sync_skipped += 1
        elif s.failed or store_failed:
            self.stats.sync_failed += 1
            if send_error is None:
                send_error = ((s.failed or "store_error").split(":", 1)[0],
                              s.failed or "storing synced events failed")
            self.sync_peers.failed(peer, *send_error)
        for reason, n in s.stats.faults.items():
            for _ in range(n):
                self._fault(peer, f"sync_{reason}")
        if s.stalled:
            backoff = self.sync_record.stalled(peer)
            self.stats.sync_stalled += 1
            self._fault(peer, f"sync_{s.cut}")
            log.info("sync peer stalled; backing off", extra={
                "peer": str(peer), "cause": s.failed, "backoff_s": backoff})
        elif send_error is not None and send_error[0] == "timeout" and not s.progressed:
            # A peer that lets our requests run out of time holds a slot for the
            # whole timeout each session: backed off like a staller (no fault: a
            # slow link or a loaded host is no misbehaviour).
            backoff = self.sync_record.timed_out(peer)
            self.stats.sync_timed_out += 1
            log.info("sync peer timed out; backing off", extra={
                "peer": str(peer), "backoff_s": backoff})
        elif s.progressed:
            self.sync_record.productive(peer)
        if s.accepted:
            self.stats.events["accepted"] += len(s.accepted)
            self.stats.events["accepted_sync"] += len(s.accepted)
            self.notify(s.accepted)
            self._regossip(s.accepted)
            log.info("synced events", extra={"peer": str(peer), "events": len(s.accepted),
                                             "requests": s.stats.requests})
        return s

    def _regossip(self, events: list[Event]) -> None:
        """Push pulled events gossip clearly failed to deliver (policy), so peers that
        missed them get them without waiting for their own sync."""
        if self.policy.regossip(events):
            self._wake_sender()

    def _spawn_sync(self, peer: p2p.PeerId) -> None:
        if self._nursery is not None and peer not in self._syncing:
            self._nursery.start_soon(self._sync_new_peer, peer)

    async def _sync_new_peer(self, peer: p2p.PeerId) -> None:
        # Identify runs right after the connection opens; with its answer we know
        # whether the peer serves sync at all (light clients do not).
        await self.sync_peers.wait_identified(peer)
        if not self.host.is_connected(peer):
            # Gone before identify told us what it is: most often a light client's
            # short command. Syncing now would dial it back and count a failure.
            return
        await self._sync_quietly(peer, None)

    async def _sync_quietly(self, peer: p2p.PeerId,
                            gaps: list[tuple[bytes, int, int]] | None,
                            leave_live: bool = False) -> SyncSession | None:
        try:
            return await self.sync_with(peer, gaps, leave_live=leave_live)
        except BidmeshError as e:
            self.stats.sync_failed += 1
            self.sync_peers.failed(peer, cause_of(e), str(e))
            return None

    def _sync_candidates(self) -> list[p2p.PeerId]:
        peers = self.host.connected_peers()
        out = [p for p in self.sync_peers.eligible(peers) if not self.sync_record.backed_off(p)]
        self.stats.sync_skipped += len(peers) - len(out)
        return out

    async def _watch_peers(self) -> None:
        """Sync with every newly connected peer (woken by the host's connection
        events; PEERS_RECHECK_S is only a safety net)."""
        while True:
            changed = self.host.connections_event()
            new = self.policy.connected(set(self.host.connected_peers()))
            for peer in new:
                self.sync_record.reconnected(peer)
                if self.cfg.sync.on_connect:
                    self._spawn_sync(peer)
            with trio.move_on_after(PEERS_RECHECK_S):
                await changed.wait()

    async def _periodic_sync(self) -> None:
        while True:
            await trio.sleep(self.policy.periodic_delay())
            peer = self.policy.pick(self._sync_candidates())
            if peer is None:
                continue
            s = await self._sync_quietly(peer, None, leave_live=True)
            self.policy.periodic_done(len(s.accepted) if s is not None else 0)

    async def _gap_sync(self) -> None:
        """Pull the predecessors of pending events, within the gap budgets
        (node/gaps.py): a bounded number of authors per round and of requests per
        peer, each gap asked of at most `gap_tries` peers (those that sent the
        waiting events first); the rest is left to periodic sync or to expire."""
        due: float | None = None
        while True:
            with trio.move_on_at(math.inf if due is None else due):
                await self._gap_event.wait()
            # Gossip often fills its own gaps: pulling at once would fetch what is
            # already in flight (policy).
            await trio.sleep(self.policy.gap_grace_s())
            self._gap_event = trio.Event()
            gaps = await self._pending_gaps()
            now = self.clock.now()
            plan = self.gap_planner.plan(gaps, self._sync_candidates(), now)
            if plan is not None:
                self.stats.gap_syncs += 1
                s = await self._sync_quietly(cast(p2p.PeerId, plan.peer), list(plan.gaps))
                if s is None or s.failed:
                    self.gap_planner.failed(plan)
                gaps = await self._pending_gaps()
                now = self.clock.now()
            due = self.gap_planner.next_due(gaps, now)

    async def _pending_gaps(self) -> list[Gap]:
        """The ledger's gaps, summarized in slices (a gap storm brings thousands of
        new authors at once; each costs a few microseconds): the loop is never held
        for more than one slice."""
        while self.ledger.summarize_gaps(GAP_SUMMARY_SLICE):
            await trio.lowlevel.checkpoint()
        return self.ledger.pending_gaps()

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
        published events that never chained (relayed ones are not the relay's fault)."""
        g = self.cfg.gossip
        period = max(0.5, min(5.0, self.cfg.limits.pending_ttl_s / 4))
        while True:
            await trio.sleep(period)
            # In slices: a full buffer (65,536 entries) expiring at once is ~0.2 s of
            # CPU; faults are counted per slice, at most a cut-off's worth each.
            expired: collections.Counter[tuple[Hashable, bool]] = collections.Counter()
            while True:
                part = self.ledger.expire_pending(EXPIRE_SLICE)
                expired.update(part)
                for (source, blame), n in part.items():
                    self.stats.pending_expired += n
                    if blame and isinstance(source, p2p.PeerId):
                        # One fault per event, up to a cut-off's worth.
                        for _ in range(min(n, g.fault_threshold)):
                            self._fault(source, "pending_expired")
                if sum(part.values()) < EXPIRE_SLICE:
                    break
                await trio.lowlevel.checkpoint()
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
