"""Replication policy of one node, sans-I/O: what to send when, what to pull, whom
to cut off, when to rejoin the gossip mesh.

`ReplicationPolicy` reads no socket and no clock of its own: it is given one
`Clock` and one seeded `random.Random`, fed what happened (events queued, batches
received, sync results, peer faults, the mesh as seen) and answers with what to
do (the next batch and when, the peer to sync with, a `CutOff`, a `Regraft`).
The trio shell, `node.gossip.Replicator`, performs those actions over libp2p;
tests drive the same policy on a seeded fake network under trio's virtual clock
(tests/test_replication.py).

Decisions and why (measured on real nodes; see node/gossip.py for the wire side):

* Pacing: at most one round of gossip messages per `gossip.batch_ms`; py-libp2p's
  cost is per message at every hop, not per byte, so under load events wait to
  share a message, while an event after a quiet spell goes out at once. And what we
  publish stays within `gossip.publish_*` (events and bytes per second, token
  buckets): peers fault a node whose own publishes exceed their receive budget, so
  a burst (a client's many SUBMITs, a control-socket publish) waits in the outbox
  rather than getting us cut off.
* Live window: periodic sync leaves to gossip an author we hold an event younger
  than `live_window_s()` from; the window widens with how late gossip currently
  reaches us (a node that is behind would otherwise pull what is still on its way,
  and the extra work puts it further behind: a sync storm).
* Gap grace: a gap (missing predecessor) is pulled only after `gap_grace_s()`,
  since batches of one author take different mesh paths and often fill their own
  gaps within a few hundred ms.
* Regossip: events we had to pull that are old enough that gossip clearly failed
  (a partition, a restart) are pushed again, unless gossip is already behind.
* Faults: invalid input per peer in a sliding window; at `gossip.fault_threshold`
  the peer is cut off for `gossip.block_s`.
* Mesh watchdog: a node whose gossipsub mesh stays empty while it has topic peers
  gets events only by sync (seconds late) and its own gossip reaches nobody.
  py-libp2p 0.8.1 could leave a node there for a minute and more (docs/
  libp2p-notes.md, "Mesh loss"; node/p2p fixes the cause). At first sight the
  policy has the shell forget stale back-off (so peers' GRAFTs are accepted);
  after `MESH_GRACE_S` (upstream's 1 s heartbeat refills an underfull mesh itself
  when it can) it asks for GRAFTs, retrying with backoff while the mesh stays empty.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

from .budget import Bucket
from .config import Config
from .events import Event

REGOSSIP_MIN_AGE_MS = 10_000
GAP_GRACE_S = 0.5  # wait before pulling a gap that gossip may still fill
GAP_GRACE_MAX_S = 5.0  # ... however late gossip runs
LIVE_S = 3.0  # periodic sync leaves to gossip an author we hold an event this young from
CATCH_UP_S = 1.0  # next periodic round after one that pulled events gossip had not brought
LIVE_WINDOW_MAX_S = 10.0  # ... however late gossip runs: a lost tail is fetched eventually
DELAY_EMA = 0.1  # weight of one received batch in the gossip delay average
BATCH_OVERHEAD = 16  # bytes of a batch besides its records (msgpack array headers)
RECORD_OVERHEAD = 8  # per record in a batch (a bin header, rounded up)
FAULT_PEERS_MAX = 1024  # fault accounts kept before idle ones are dropped
MESH_CHECK_S = 1.0  # how often the shell shows the policy the mesh (upstream heartbeat: 1 s)
MESH_GRACE_S = 3.0  # an empty mesh upstream's own heartbeats did not refill in this long
MESH_RETRY_S = 5.0  # first wait between regrafts while the mesh stays empty ...
MESH_RETRY_MAX_S = 60.0  # ... doubling up to upstream's prune back-off

P = TypeVar("P", bound=Hashable)
"""A peer as the shell names it (a libp2p peer id; ints on the fake network)."""


@dataclass(frozen=True)
class Clock:
    """The one clock of the replication service.

    `now()`: monotonic seconds, for every deadline and window. `wall()`: POSIX
    seconds, only where a time is compared with events' `ts_ms` (their authors'
    clocks) or shown to an operator. On trio's virtual clock use `virtual()`, so
    both advance together."""

    now: Callable[[], float]
    wall: Callable[[], float]

    @classmethod
    def virtual(cls, now: Callable[[], float], epoch: float) -> Clock:
        """Wall time that follows `now()` from `epoch` (tests on a virtual clock)."""
        return cls(now, lambda: epoch + now())


@dataclass
class Stats:
    """Counters of the replication service; `as_dict()` is JSON-safe."""

    started_at: float = 0.0
    peers: int = 0
    published: int = 0  # own events queued for gossip
    batches_sent: int = 0
    batches_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    # Outcomes of received events: accepted (stored: accepted_gossip + accepted_sync
    # + accepted_drained, the rest of a long chain a filled gap released), duplicate,
    # pending, rejected, fork.
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    regossiped: int = 0
    gossip_errors: int = 0
    outbox_max: int = 0  # most events ever waiting to be gossiped
    publish_paced: int = 0  # rounds that left events for later: gossip.publish_* pace
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
    sync_reconciled: int = 0  # sessions on /sync/2 (set reconciliation)
    sync_v1_fallbacks: int = 0  # /sync/2 refused ("na"): the session ran on /sync/1
    sync_no_slot: int = 0  # sessions given up: no sync slot came free in session_s
    # Where our sessions' time goes (wall s): waiting for answers, checking records on
    # the ingest thread, storing them (the session's on_response) on the loop.
    sync_wait_s: float = 0.0
    sync_check_s: float = 0.0
    sync_store_s: float = 0.0
    sync_ahead: int = 0  # pages asked ahead while the previous one was stored (pipelining)
    sync_ahead_dropped: int = 0  # of those, pages the session did not ask for after all
    gap_syncs: int = 0
    pending_expired: int = 0  # events dropped from the pending buffer unfilled
    last_sync_at: float | None = None
    last_sync_peer: str | None = None
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    cut_off: int = 0
    cut_off_peers: dict[str, float] = field(default_factory=dict)  # peer -> blocked until
    # Mesh watchdog: times the mesh was seen empty while we had topic peers,
    # seconds spent so, and the GRAFT rounds asked for (after MESH_GRACE_S).
    mesh_lost: int = 0
    mesh_empty_s: float = 0.0
    mesh_regrafts: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("events", "rejected", "faults"):
            d[k] = dict(getattr(self, k))
        return d


@dataclass(frozen=True)
class CutOff(Generic[P]):
    """Disconnect `peer` and refuse it for `block_s` seconds."""

    peer: P
    block_s: float
    faults: int
    reasons: dict[str, int]


@dataclass(frozen=True)
class Regraft(Generic[P]):
    """Our mesh for the topic has been empty `empty_s` seconds: stop refusing
    GRAFTs from its peers, and GRAFT the first `want` of `peers` (all topic peers,
    shuffled) that will accept (`want` 0 at first sight: only stop refusing)."""

    peers: tuple[P, ...]
    want: int
    empty_s: float


@dataclass
class _PeerFaults:
    times: collections.deque[float] = field(default_factory=collections.deque)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)


class ReplicationPolicy(Generic[P]):
    """The decisions of one node's replication service (see the module docstring)."""

    def __init__(self, config: Config, clock: Clock, rng: random.Random) -> None:
        self.cfg = config
        self.clock = clock
        self.rng = rng
        self.stats = Stats(started_at=clock.wall())
        self._outbox: collections.deque[bytes] = collections.deque()
        self._last_round = -math.inf
        self._round_left = 0  # events of the current round not yet batched
        g, now = config.gossip, clock.now()
        self._pace_events = Bucket.full(g.publish_events_per_s,
                                        g.publish_events_per_s * g.publish_burst_s, now)
        self._pace_bytes = Bucket.full(g.publish_bytes_per_s,
                                       g.publish_bytes_per_s * g.publish_burst_s, now)
        self._faults: dict[P, _PeerFaults] = {}
        self._known: set[P] = set()
        self._interval = config.sync.interval_s
        self._mesh_empty_since: float | None = None
        self._mesh_seen_at: float | None = None
        self._mesh_next: float = -math.inf
        self._mesh_retry = MESH_RETRY_S

    # ---------------------------------------------------------- push

    def queue(self, wires: Iterable[bytes]) -> None:
        """Events (stored) to gossip."""
        self._outbox.extend(wires)
        self.stats.outbox_max = max(self.stats.outbox_max, len(self._outbox))

    @property
    def outbox_len(self) -> int:
        return len(self._outbox)

    def round_at(self) -> float:
        """When the next round of batches may start: one round per batch_ms, and not
        before the publish pace has room for the round's first batch."""
        at = self._last_round + self.cfg.gossip.batch_ms / 1000
        if not self._outbox:
            return at
        n, size = self._first_batch()
        now = self.clock.now()
        ev, by = self._pace_events, self._pace_bytes
        wait = max((min(n, ev.burst) - ev.refill(now)) / ev.rate,
                   (min(size, by.burst) - by.refill(now)) / by.rate)
        return max(at, now + wait) if wait > 0 else at

    def _first_batch(self) -> tuple[int, int]:
        """Events and bytes of the batch `next_batch` would take now, unpaced."""
        g = self.cfg.gossip
        n, size = 0, BATCH_OVERHEAD
        for w in self._outbox:
            if n == g.batch_events or (n and size + len(w) + RECORD_OVERHEAD > g.max_batch_bytes):
                break
            n, size = n + 1, size + len(w) + RECORD_OVERHEAD
        return n, size

    def _pace_full(self, ev_left: float, by_left: float) -> bool:
        # A full pace sends one record whatever its size (a burst configured below one
        # record must not stop gossip); the debt delays the next round.
        return ev_left >= self._pace_events.burst and by_left >= self._pace_bytes.burst

    def start_round(self) -> None:
        """A round sends what is queued now; what comes meanwhile waits for the next."""
        self._last_round = self.clock.now()
        self._round_left = len(self._outbox)

    def next_batch(self) -> list[bytes]:
        """The next batch of this round (up to batch_events and max_batch_bytes),
        taken off the outbox; empty when the round is done. Events queued while
        the round's batches were being published (a publish can wait up to 1 s for
        a peer's queue) wait for the next round: one round per batch_ms. So do those
        beyond the publish pace (`round_at` says when it has room again)."""
        g = self.cfg.gossip
        now = self.clock.now()
        ev_left, by_left = self._pace_events.refill(now), self._pace_bytes.refill(now)
        batch: list[bytes] = []
        size = BATCH_OVERHEAD
        while self._round_left and self._outbox and len(batch) < g.batch_events:
            w = self._outbox[0]
            if batch and size + len(w) + RECORD_OVERHEAD > g.max_batch_bytes:
                break
            if ((len(batch) + 1 > ev_left or size + len(w) + RECORD_OVERHEAD > by_left)
                    and not (not batch and self._pace_full(ev_left, by_left))):
                self._round_left = 0  # paced: the rest goes in a later round
                self.stats.publish_paced += 1
                break
            batch.append(self._outbox.popleft())
            self._round_left -= 1
            size += len(w) + RECORD_OVERHEAD
        if batch:
            self._pace_events.tokens -= len(batch)
            self._pace_bytes.tokens -= size
        return batch

    def regossip(self, events: Sequence[Event]) -> list[bytes]:
        """Queue (and return) events we had to pull that gossip clearly failed to
        deliver: older than REGOSSIP_MIN_AGE_MS (a partition, a restart), within
        `gossip.regossip_window_s`. Younger ones are most likely still in flight,
        and re-sending them under load would only add to it; nothing while gossip
        is already behind (a non-empty outbox)."""
        window_ms = self.cfg.gossip.regossip_window_s * 1000
        if window_ms <= 0 or self._outbox:
            return []
        now_ms = self.clock.wall() * 1000
        fresh = [ev.wire for ev in events
                 if REGOSSIP_MIN_AGE_MS <= now_ms - ev.ts_ms <= window_ms]
        fresh = fresh[:self.cfg.gossip.batch_events]
        if fresh:
            self.stats.regossiped += len(fresh)
            self.queue(fresh)
        return fresh

    # ---------------------------------------------------------- receive

    def gossip_received(self, newest_ts_ms: int) -> None:
        """A received batch stored events, the newest signed at `newest_ts_ms`.

        How far behind its authors gossip reaches us (their clocks, ours): the
        freshest event of the batch bounds transit + batching + our backlog. A
        batch of old events only (re-gossip after a pull, a restarted peer's
        backlog) says nothing about that and would hold the window wide open."""
        delay = self.clock.wall() - newest_ts_ms / 1000
        if delay < REGOSSIP_MIN_AGE_MS / 1000:
            self.stats.gossip_delay_s += DELAY_EMA * (max(delay, 0.0)
                                                      - self.stats.gossip_delay_s)

    def live_window_s(self) -> float:
        """How recent an author's newest event we hold must be for periodic sync to
        leave that author to gossip: LIVE_S, widened by twice how far behind
        gossip currently reaches us, at most LIVE_WINDOW_MAX_S."""
        return min(LIVE_WINDOW_MAX_S, LIVE_S + 2 * self.stats.gossip_delay_s)

    def live_after_ms(self) -> int:
        """`SyncSession(live_after_ms=...)` for a periodic round."""
        return int((self.clock.wall() - self.live_window_s()) * 1000)

    def gap_grace_s(self) -> float:
        """How long to leave a new gap to gossip before pulling it: GAP_GRACE_S, or
        longer while gossip runs late (up to GAP_GRACE_MAX_S)."""
        return max(GAP_GRACE_S, min(self.stats.gossip_delay_s, GAP_GRACE_MAX_S))

    # ---------------------------------------------------------- pull

    def connected(self, peers: Collection[P]) -> list[P]:
        """The connected peers now; returns those newly connected (to sync with)."""
        self.stats.peers = len(peers)
        new = [p for p in peers if p not in self._known]
        self._known = set(peers)
        return new

    def periodic_delay(self) -> float:
        """Seconds until the next periodic sync round (jittered ±50 %)."""
        delay = self._interval * self.rng.uniform(0.5, 1.5)
        self._interval = self.cfg.sync.interval_s
        return delay

    def pick(self, peers: Sequence[P]) -> P | None:
        """A random peer for a periodic round (None if there is none)."""
        return self.rng.choice(peers) if peers else None

    def periodic_done(self, pulled: int) -> None:
        """A periodic round stored `pulled` events. Events gossip had not brought
        (authors we had not heard from lately): this node may be out of the gossip
        mesh for now, or a burst was lost. Look again soon."""
        if pulled:
            self.stats.sync_catch_up += 1
            self._interval = min(self.cfg.sync.interval_s, CATCH_UP_S)

    # ---------------------------------------------------------- accounting

    def fault(self, peer: P, reason: str,
              blocked: Callable[[P], bool] | None = None) -> CutOff[P] | None:
        """Count invalid input from `peer`; a `CutOff` once it reaches the threshold
        within the window, unless `blocked(peer)` says it is cut off already."""
        g = self.cfg.gossip
        now = self.clock.now()
        pf = self._faults.setdefault(peer, _PeerFaults())
        pf.times.append(now)
        pf.reasons[reason] += 1
        self.stats.faults[reason] += 1
        while pf.times and pf.times[0] < now - g.fault_window_s:
            pf.times.popleft()
        self._prune_accounts(now)
        if len(pf.times) < g.fault_threshold or (blocked is not None and blocked(peer)):
            return None
        self.stats.cut_off += 1
        self.stats.cut_off_peers[str(peer)] = self.clock.wall() + g.block_s
        del self._faults[peer]
        return CutOff(peer, g.block_s, len(pf.times), dict(pf.reasons))

    def _prune_accounts(self, now: float) -> None:
        """Keep accounting state bounded on a long-running node."""
        if len(self._faults) > FAULT_PEERS_MAX:
            cutoff = now - self.cfg.gossip.fault_window_s
            for peer in [p for p, pf in self._faults.items() if not pf.times or
                         pf.times[-1] < cutoff]:
                del self._faults[peer]
        wall = self.clock.wall()
        for name in [p for p, until in self.stats.cut_off_peers.items() if until < wall]:
            del self.stats.cut_off_peers[name]

    # ---------------------------------------------------------- mesh watchdog

    def mesh_check(self, mesh: Collection[P], topic_peers: Collection[P]) -> Regraft[P] | None:
        """Our mesh and topic peers as seen now (every MESH_CHECK_S). An empty mesh
        while we have topic peers gets a `Regraft` with `want` 0 at once (peers
        whose meshes run low GRAFT us within a heartbeat; refusing them would make
        them back off from us for a minute), then one with `want` mesh_degree when
        it has stayed empty past MESH_GRACE_S, again after MESH_RETRY_S doubling."""
        now = self.clock.now()
        if mesh or not topic_peers:
            self._mesh_empty_since = None
            self._mesh_retry = MESH_RETRY_S
            self._mesh_next = -math.inf
            self._mesh_seen_at = now
            return None
        candidates = sorted(topic_peers, key=str)  # so the seeded order ignores set order
        if self._mesh_empty_since is None:
            self._mesh_empty_since = now
            self._mesh_seen_at = now
            self.stats.mesh_lost += 1
            return Regraft(tuple(candidates), 0, 0.0)
        self.stats.mesh_empty_s += now - (self._mesh_seen_at or now)
        self._mesh_seen_at = now
        empty_s = now - self._mesh_empty_since
        if empty_s < MESH_GRACE_S or now < self._mesh_next:
            return None
        self._mesh_next = now + self._mesh_retry
        self._mesh_retry = min(MESH_RETRY_MAX_S, 2 * self._mesh_retry)
        self.rng.shuffle(candidates)
        self.stats.mesh_regrafts += 1
        return Regraft(tuple(candidates), self.cfg.gossip.mesh_degree, empty_s)
