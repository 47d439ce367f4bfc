"""Replication for a running node: gossipsub push, pull anti-entropy, discovery.

* Push: one gossipsub topic per network, `bidmesh/<network>/events/1`. Events are
  batched per pubsub message (`[1, [wire, ...]]`, up to `gossip.batch_events`
  events or `gossip.batch_ms` of waiting) and published with backpressure
  (`Topic.publish` waits while any peer's outbound queue is high), so py-libp2p's
  silent queue drops never trigger. Received batches are stored by the topic
  validator in one `append_many` transaction: the validator sees every message
  that reaches the node, even those upstream later drops from the subscription
  channel. It never raises and never rejects for a temporary reason; it rejects
  batches that are undecodable or carry invalid events (so we do not forward them).
* Pull: `node.sync` sessions over request/response `/bidmesh/<network>/sync/1`:
  with every newly connected peer, every `sync.interval_s` with a random peer, and
  soon after `ledger.pending_gaps()` appear (asking the peers that sent the orphans first).
  Convergence never depends on gossip delivering everything.
* Budgets (`[limits]`, node/budget.py): gossip input per forwarding peer in
  events/s and bytes/s, beyond which batches are dropped (a fault only for the
  peer's own publishes); pending events charged to their forwarder and expired
  (`_expire_pending`; a fault when the forwarder published them); gap pulls
  planned within per-peer and per-round budgets (node/gaps.py).
* Accounting: invalid input per peer (gossip and sync) within a sliding window;
  at `gossip.fault_threshold` the peer is disconnected and blocked for
  `gossip.block_s`, logged, and counted in `stats.cut_off`.
* Discovery: bootstrap multiaddrs are dialed and redialed with exponential backoff
  (`p2p.reconnect_min_s` .. `p2p.reconnect_max_s`); the host enforces the
  connection cap; optional mDNS (see `Mdns`).
"""

from __future__ import annotations

import collections
import logging
import math
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import trio

from . import codec, p2p, sync
from .budget import GossipBudget, GossipVerdict
from .config import Config
from .errors import BidmeshError, InvalidMessage, OperationError, UsageError
from .events import MAX_WIRE, Event
from .gaps import GapPlanner
from .ingest import FairIngest
from .ledger import AppendResult, Ledger, Status, check_records
from .resources import subnet_of
from .sync_peers import SlotGate, SyncPeers, SyncRecord, SyncSlots, cause_of, lacks_protocol

log = logging.getLogger("bidmesh.gossip")

BATCH_VERSION = 1
BATCH_MAX_EVENTS = 512
BATCH_MAX_BYTES = 1000 * 1024
REGOSSIP_MIN_AGE_MS = 10_000
GAP_GRACE_S = 0.5  # wait before pulling a gap that gossip may still fill
PUBLISH_WAIT_S = 1.0  # longest wait for a receiver's full gossip queue before publishing
LIVE_S = 3.0  # periodic sync leaves to gossip an author we hold an event this young from
CATCH_UP_S = 1.0  # next periodic round after one that pulled events gossip had not brought
LIVE_WINDOW_MAX_S = 10.0  # ... however late gossip runs: a lost tail is fetched eventually


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
        raise InvalidMessage("gossip batch must be [1, [wire, ...]]", "malformed")
    wires = v[1]
    if type(wires) is not list or not 0 < len(wires) <= BATCH_MAX_EVENTS:
        raise InvalidMessage(f"gossip batch must hold 1..{BATCH_MAX_EVENTS} events", "malformed")
    for w in wires:
        if type(w) is not bytes or not 0 < len(w) <= MAX_WIRE:
            raise InvalidMessage(f"gossip records must be 1..{MAX_WIRE} bytes", "malformed")
    return wires


# ------------------------------------------------------------------ stats


@dataclass
class Stats:
    """Counters of the replication service; `as_dict()` is JSON-safe."""

    started_at: float = field(default_factory=time.time)
    peers: int = 0
    published: int = 0  # own events queued for gossip
    batches_sent: int = 0
    batches_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    # Outcomes of received events: accepted (stored: accepted_gossip + accepted_sync),
    # duplicate, pending, rejected, fork.
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    regossiped: int = 0
    gossip_errors: int = 0
    outbox_max: int = 0  # most events ever waiting to be gossiped
    publish_wait_s: float = 0.0  # total time spent in backpressured publishes
    publish_missed: int = 0  # (batch, peer) pairs skipped because the peer's queue was full
    validate_s: float = 0.0  # total time spent storing received batches
    gossip_delay_s: float = 0.0  # moving average: now - ts of a received batch's newest event
    sync_rounds: int = 0
    sync_in_sync: int = 0
    sync_failed: int = 0
    sync_skipped: int = 0  # sync picks avoided: identify showed no sync protocol
    sync_events: int = 0
    sync_bytes: int = 0
    sync_left_live: int = 0  # (round, author) pairs periodic sync left to gossip
    sync_catch_up: int = 0  # periodic rounds that pulled events, so the next came sooner
    sync_served: int = 0
    sync_stalled: int = 0  # sessions ended because the peer stalled them (then backed off)
    sync_timed_out: int = 0  # sessions without progress ended by a request timeout (ditto)
    sync_no_slot: int = 0  # sessions given up: no sync slot came free in session_s
    gap_syncs: int = 0
    pending_expired: int = 0  # events dropped from the pending buffer unfilled
    last_sync_at: float | None = None
    last_sync_peer: str | None = None
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    cut_off: int = 0
    cut_off_peers: dict[str, float] = field(default_factory=dict)  # peer -> blocked until

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("events", "rejected", "faults"):
            d[k] = dict(getattr(self, k))
        return d


@dataclass
class _PeerFaults:
    times: collections.deque[float] = field(default_factory=collections.deque)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)


AcceptedListener = Callable[[list[Event]], None]


class Replicator:
    """The replication service of one node. Run `run()` in a nursery."""

    def __init__(self, host: p2p.P2PHost, pubsub: p2p.PubSub, ledger: Ledger,
                 config: Config) -> None:
        self.host = host
        self.pubsub = pubsub
        self.ledger = ledger
        self.cfg = config
        self.network = ledger.network
        self.topic = pubsub.topic(topic_name(self.network))
        self.protocol = sync.protocol_id(self.network)
        self.stats = Stats()
        self.limits = sync.SyncLimits(
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
                                   float(lim.gossip_burst_s), trio.current_time)
        """Gossip input per forwarding peer (`[limits] gossip_*`)."""
        self.ingest: FairIngest[p2p.PeerId, Event | AppendResult] = FairIngest(
            lambda wires: check_records(wires, self.network), self._store_slice,
            max_events=lim.gossip_ingest_queue_events)
        """Received gossip, checked and stored in slices fairly between peers."""
        self.listeners: list[AcceptedListener] = []
        """Called with events newly stored: from gossip, sync, or the node itself."""
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_event = trio.Event()
        self._faults: dict[p2p.PeerId, _PeerFaults] = {}
        self._syncing: set[p2p.PeerId] = set()
        self.sync_peers = SyncPeers(host, self.protocol)
        self._send_errors: dict[p2p.PeerId, tuple[str, str]] = {}  # why a request failed
        # Sync slots and per-peer history: tarpits (node/sync_peers.py).
        self.sync_record = SyncRecord(trio.current_time, penalty_s=config.sync.penalty_s,
                                      penalty_max_s=config.sync.penalty_max_s)
        self.sync_slots = SlotGate(SyncSlots(config.sync.slots, config.sync.reserved_slots,
                                             config.sync.stranger_slots_per_subnet))
        self._gap_event = trio.Event()
        self.gap_planner = GapPlanner(lim.gap_authors_per_round,
                                      float(lim.gap_peer_requests_per_s), lim.gap_tries)
        """Which gaps to pull from whom (`[limits] gap_*`, node/gaps.py)."""
        self._rng = random.Random()
        self._nursery: trio.Nursery | None = None
        self.ready = trio.Event()

    # ---------------------------------------------------------- public API

    def gossip(self, wires: list[bytes]) -> None:
        """Queue stored events for gossip (batched and paced by the sender task)."""
        self._outbox.extend(wires)
        self.stats.outbox_max = max(self.stats.outbox_max, len(self._outbox))
        self._outbox_event.set()

    def publish_event(self, ev: Event) -> None:
        self.stats.published += 1
        self.gossip([ev.wire])

    @property
    def outbox_len(self) -> int:
        return len(self._outbox)

    def mesh_state(self) -> dict[str, int]:
        """Our view of the gossip topology: a node with peers but an empty mesh
        gets events only by sync (seen in benchmarks, cause not yet found)."""
        return {"mesh_peers": len(self.topic.mesh_peers()),
                "topic_peers": len(self.topic.peers()),
                "pubsub_streams": len(self.pubsub.pubsub.peers)}

    def live_window_s(self) -> float:
        """How recent an author's newest event we hold must be for periodic sync to
        leave that author to gossip: LIVE_S, widened by how far behind gossip
        currently reaches us. A node that is behind (busy CPU, a backlog in its
        own queues) would otherwise pull everything still on its way to it, and
        the extra work puts it further behind: a sync storm."""
        return min(LIVE_WINDOW_MAX_S, LIVE_S + 2 * self.stats.gossip_delay_s)

    async def sync_with(
        self, peer: p2p.PeerId, gaps: list[tuple[bytes, int, int]] | None = None,
        *, leave_live: bool = False,
    ) -> sync.SyncSession | None:
        """Run one anti-entropy session with `peer` now; None if one is already running.
        `leave_live`: skip authors whose events gossip is delivering (we hold one
        younger than LIVE_S; see `SyncSession`), as the periodic rounds do."""
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
                live_after_ms = (int((time.time() - self.live_window_s()) * 1000)
                                 if leave_live else None)
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
        p2p.serve_requests(self.host, self.protocol, self._serve, sync.MAX_REQUEST,
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
            self.ready.set()

    async def flush(self, timeout: float) -> bool:
        """Wait until the outbox is published (graceful stop); False on timeout."""
        with trio.move_on_after(timeout):
            while self._outbox or self._sending:
                await trio.sleep(0.005)
        return not (self._outbox or self._sending)

    # ---------------------------------------------------------- push

    _sending = False

    async def _drain(self, messages: Any) -> None:
        # Messages are handled (stored) in the validator; keep the channel empty.
        async for _origin, _data in messages:
            pass

    async def _sender(self) -> None:
        g = self.cfg.gossip
        last = -math.inf
        while True:
            await self._outbox_event.wait()
            self._outbox_event = trio.Event()
            # Pacing: one round of messages per batch_ms at most. py-libp2p's cost
            # is per message at every hop, not per byte, so under load events wait
            # here to share a message; an event after a quiet spell goes out at once.
            await trio.sleep_until(last + g.batch_ms / 1000)
            last = trio.current_time()
            while self._outbox:
                batch: list[bytes] = []
                size = 16
                while self._outbox and len(batch) < g.batch_events:
                    w = self._outbox[0]
                    if batch and size + len(w) + 8 > g.max_batch_bytes:
                        break
                    batch.append(self._outbox.popleft())
                    size += len(w) + 8
                data = encode_batch(batch)
                self._sending = True
                t0 = time.perf_counter()
                try:
                    missed = await self.topic.publish(data, timeout=PUBLISH_WAIT_S)
                    waited = time.perf_counter() - t0
                    self.stats.publish_wait_s += waited
                    if missed:
                        # A receiver's queue stayed full: it misses this batch, pull
                        # sync repairs that; waiting longer would stall every batch.
                        self.stats.publish_missed += missed
                        log.info("gossip peer queue full; it gets the batch by sync",
                                 extra={"waited_s": round(waited, 2), "peers": missed,
                                        "outbox": len(self._outbox)})
                    self.stats.batches_sent += 1
                    self.stats.bytes_sent += len(data)
                except BidmeshError as e:
                    # A stopping router: the events are stored, pull sync delivers them.
                    self.stats.gossip_errors += 1
                    log.warning("gossip publish failed; sync will deliver the batch",
                                extra={"error": str(e), "events": len(batch)})
                finally:
                    self._sending = False

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
            # How far behind its authors gossip reaches us (their clocks, ours): the
            # freshest event of the batch bounds transit + batching + our backlog.
            # A batch of old events only (re-gossip after a pull, a restarted peer's
            # backlog) says nothing about that and would hold the window wide open.
            delay = time.time() - max(ev.ts_ms for ev in accepted) / 1000
            if delay < REGOSSIP_MIN_AGE_MS / 1000:
                self.stats.gossip_delay_s += 0.1 * (max(delay, 0.0)
                                                    - self.stats.gossip_delay_s)
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
        g = self.cfg.gossip
        now = trio.current_time()
        pf = self._faults.setdefault(peer, _PeerFaults())
        pf.times.append(now)
        pf.reasons[reason] += 1
        self.stats.faults[reason] += 1
        while pf.times and pf.times[0] < now - g.fault_window_s:
            pf.times.popleft()
        self._prune_accounts(now)
        if len(pf.times) >= g.fault_threshold and not self.host.is_blocked(peer):
            self.host.block(peer, g.block_s)
            self.stats.cut_off += 1
            self.stats.cut_off_peers[str(peer)] = time.time() + g.block_s
            log.warning("peer cut off for invalid input", extra={
                "peer": str(peer), "faults": len(pf.times), "reasons": dict(pf.reasons),
                "blocked_s": g.block_s})
            del self._faults[peer]

    def _prune_accounts(self, now: float) -> None:
        """Keep accounting state bounded on a long-running node."""
        if len(self._faults) > 1024:
            cutoff = now - self.cfg.gossip.fault_window_s
            for peer in [p for p, pf in self._faults.items() if not pf.times or
                         pf.times[-1] < cutoff]:
                del self._faults[peer]
        wall = time.time()
        for name in [p for p, until in self.stats.cut_off_peers.items() if until < wall]:
            del self.stats.cut_off_peers[name]

    # ---------------------------------------------------------- pull

    async def _serve(self, pubkey: bytes, payload: bytes) -> bytes:
        try:
            req = sync.decode_request(payload)
        except InvalidMessage:
            self._fault(p2p.peer_id_from_pubkey(pubkey), "bad_sync_request")
            raise
        self.stats.sync_served += 1
        await trio.lowlevel.checkpoint()
        return sync.serve(self.ledger, req).encode()

    async def _send(self, peer: p2p.PeerId, req: sync.SyncRequest) -> sync.SyncResponse | None:
        try:
            data = await p2p.request(self.host, peer, self.protocol, req.encode(),
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
            return sync.decode_response(data)
        except InvalidMessage as e:
            self._fault(peer, f"sync_{e.reason}")
            return None

    async def _session(self, peer: p2p.PeerId, gaps: list[tuple[bytes, int, int]] | None,
                       live_after_ms: int | None) -> sync.SyncSession:
        s = sync.SyncSession(self.ledger, self.limits, gaps=gaps, live_after_ms=live_after_ms,
                             clock=trio.current_time)
        store_failed = False
        while (req := s.next_request()) is not None:
            resp = await self._send(peer, req)
            try:
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
        self.stats.last_sync_at = time.time()
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
        """Push events we had to pull that gossip clearly failed to deliver (older
        than REGOSSIP_MIN_AGE_MS: a partition, a restart), so peers that missed
        them get them without waiting for their own sync. Younger ones are most
        likely still in flight, and re-sending them under load would only add to it."""
        window_ms = self.cfg.gossip.regossip_window_s * 1000
        if window_ms <= 0 or self._outbox:
            return  # off, or gossip is already behind: pushing more would only add load
        now_ms = time.time() * 1000
        fresh = [ev.wire for ev in events
                 if REGOSSIP_MIN_AGE_MS <= now_ms - ev.ts_ms <= window_ms]
        fresh = fresh[:self.cfg.gossip.batch_events]
        if fresh:
            self.stats.regossiped += len(fresh)
            self.gossip(fresh)

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
                            leave_live: bool = False) -> sync.SyncSession | None:
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
        """Sync with every newly connected peer (polls the host's connection table)."""
        known: set[p2p.PeerId] = set()
        while True:
            now = set(self.host.connected_peers())
            self.stats.peers = len(now)
            if self.cfg.sync.on_connect:
                for peer in now - known:
                    self._spawn_sync(peer)
            known = now
            await trio.sleep(0.2)

    async def _periodic_sync(self) -> None:
        base = self.cfg.sync.interval_s
        interval = base
        while True:
            await trio.sleep(interval * self._rng.uniform(0.5, 1.5))
            interval = base
            peers = self._sync_candidates()
            if not peers:
                continue
            s = await self._sync_quietly(self._rng.choice(peers), None, leave_live=True)
            if s is not None and s.accepted:
                # We pulled events gossip had not brought (authors we had not heard
                # from lately): this node may be out of the gossip mesh for now
                # (pruned, in back-off), or a burst was lost. Look again soon.
                self.stats.sync_catch_up += 1
                interval = min(base, CATCH_UP_S)

    async def _gap_sync(self) -> None:
        """Pull the predecessors of pending events, within the gap budgets
        (node/gaps.py): a bounded number of authors per round and of requests per
        peer, each gap asked of at most `gap_tries` peers (those that sent the
        waiting events first); the rest is left to periodic sync or to expire."""
        due: float | None = None
        while True:
            with trio.move_on_at(math.inf if due is None else due):
                await self._gap_event.wait()
            # Batches of one author take different mesh paths, so gossip often
            # arrives out of order and fills its own gaps within a few hundred ms
            # (longer while gossip runs late); pulling at once would fetch what is
            # already in flight.
            await trio.sleep(max(GAP_GRACE_S, min(self.stats.gossip_delay_s, 5.0)))
            self._gap_event = trio.Event()
            gaps = self.ledger.pending_gaps()
            now = trio.current_time()
            plan = self.gap_planner.plan(gaps, self._sync_candidates(), now)
            if plan is not None:
                self.stats.gap_syncs += 1
                s = await self._sync_quietly(cast(p2p.PeerId, plan.peer), list(plan.gaps))
                if s is None or s.failed:
                    self.gap_planner.failed(plan)
                gaps = self.ledger.pending_gaps()
                now = trio.current_time()
            due = self.gap_planner.next_due(gaps, now)

    async def _expire_pending(self) -> None:
        """Drop pending events older than `pending_ttl_s`; fault the peers that
        published events that never chained (relayed ones are not the relay's fault)."""
        g = self.cfg.gossip
        period = max(0.5, min(5.0, self.cfg.limits.pending_ttl_s / 4))
        while True:
            await trio.sleep(period)
            expired = self.ledger.expire_pending()
            for (source, blame), n in expired.items():
                self.stats.pending_expired += n
                if blame and isinstance(source, p2p.PeerId):
                    # One fault per event, up to a cut-off's worth.
                    for _ in range(min(n, g.fault_threshold)):
                        self._fault(source, "pending_expired")
            if expired:
                log.info("pending events expired", extra={
                    "events": sum(expired.values()),
                    "sources": len({src for src, _ in expired})})


# ------------------------------------------------------------------ discovery


class Discovery:
    """Keeps connections to bootstrap peers (and mDNS finds) with backoff."""

    def __init__(self, host: p2p.P2PHost, config: Config) -> None:
        self.host = host
        self.cfg = config.p2p
        self.addrs: dict[str, float] = {}  # multiaddr -> next attempt (trio time)
        self.failures: collections.Counter[str] = collections.Counter()
        self._wake = trio.Event()
        self._rng = random.Random()
        for a in self.cfg.bootstrap:
            self.add(a)

    def add(self, maddr: str) -> None:
        """Add an address to keep connected (bootstrap, mDNS, or an operator)."""
        if maddr not in self.addrs:
            self.addrs[maddr] = 0.0
        self._wake.set()

    def retry_now(self) -> None:
        for a in self.addrs:
            self.addrs[a] = 0.0
            self.failures[a] = 0
        self._wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for maddr, due in list(self.addrs.items()):
                    if due <= now:
                        self.addrs[maddr] = now + 1e9  # in flight
                        nursery.start_soon(self._dial, maddr)
                with trio.move_on_after(0.5):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _dial(self, maddr: str) -> None:
        peer_str = maddr.rsplit("/p2p/", 1)[-1]
        try:
            connected = self.host.is_connected(peer_str)
        except InvalidMessage:
            log.error("bad bootstrap address", extra={"addr": maddr})
            del self.addrs[maddr]
            return
        if connected or len(self.host.connected_peers()) >= self.cfg.max_connections:
            self.failures[maddr] = 0
            self.addrs[maddr] = trio.current_time() + 1.0  # check again soon
            return
        try:
            await self.host.connect(maddr, timeout=10.0)
        except UsageError as e:
            log.error("bad bootstrap address", extra={"addr": maddr, "error": str(e)})
            del self.addrs[maddr]
            return
        except OperationError as e:
            self.failures[maddr] += 1
            n = self.failures[maddr]
            delay = min(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s * 2 ** (n - 1))
            delay *= self._rng.uniform(0.8, 1.2)
            if n <= 3 or n % 10 == 0:
                log.info("dial failed", extra={"addr": maddr, "error": str(e),
                                               "attempt": n, "retry_s": round(delay, 2)})
            self.addrs[maddr] = trio.current_time() + delay
            return
        if self.failures[maddr]:
            log.info("connected", extra={"addr": maddr, "after_attempts": self.failures[maddr]})
        self.failures[maddr] = 0
        self.addrs[maddr] = trio.current_time() + 1.0


async def run_mdns(host: p2p.P2PHost, discovery: Discovery, network: str) -> None:
    """Advertise this node and dial peers found by mDNS on the LAN (py-libp2p's
    zeroconf-based `MDNSDiscovery`, service `_p2p-<network>._udp.local.`).

    Worked around upstream (0.8.1): `MDNSDiscovery()` and its `start()` block for
    ~1.5 s in zeroconf's service probing, so both run in a worker thread and we
    skip `start()`'s cleanup task; with `host=` given it advertises the listen
    address as-is (`/ip4/0.0.0.0/...`, undialable), so we pass only the TCP port
    and let it advertise the machine's own IPs; discovered peers arrive on a
    zeroconf thread through the module-global `peerDiscovery`, so the handler only
    hands the address over to trio.
    """
    from libp2p.discovery.events.peerDiscovery import peerDiscovery
    from libp2p.discovery.mdns.mdns import create_mdns_discovery

    ports = [a.split("/tcp/")[1].split("/")[0] for a in host.addrs if "/tcp/" in a]
    if not ports:
        log.warning("mDNS needs a TCP listen address; not starting it")
        return
    token = trio.lowlevel.current_trio_token()
    me = str(host.peer_id)

    def on_peer(info: Any) -> None:  # runs on a zeroconf thread
        pid = str(info.peer_id)
        if pid == me:
            return
        for a in info.addrs:
            addr = str(a)
            if "/ip4/0.0.0.0/" in addr or "/ip6/::/" in addr:
                continue
            if "/p2p/" not in addr:
                addr = f"{addr}/p2p/{pid}"
            try:
                token.run_sync_soon(discovery.add, addr)
            except trio.RunFinishedError:
                return

    md = await trio.to_thread.run_sync(lambda: create_mdns_discovery(
        host.libp2p.get_network(), port=int(ports[0]), private_network_fingerprint=network))
    peerDiscovery.register_peer_discovered_handler(on_peer)
    try:
        await trio.to_thread.run_sync(md.broadcaster.register)
        log.info("mDNS discovery started", extra={"service": md.service_type})
        await trio.sleep_forever()
    finally:
        peerDiscovery.unregister_peer_discovered_handler(on_peer)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(md.stop)  # unregisters: ~0.3 s
