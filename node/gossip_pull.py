"""Pull anti-entropy of a running node: the `Replicator`'s sync side (node/gossip.py).

`/sync/2` sessions (set reconciliation, node/sync_recon.py; `/sync/1` with peers that
lack it), served and initiated: with every newly connected peer, every
`sync.interval_s` with a random peer, and soon after `ledger.pending_gaps()` appear
(gap pulls planned within the `[limits] gap_*` budgets, node/gaps.py). Sync slots,
tarpit back-off and per-peer history are node/sync_peers.py's; the session logic is
sans-I/O in node/sync_session.py. Also the fault accounting both sides share.

A mixin, not a service of its own: it works on the Replicator's state (declared
below) and is only ever used as `Replicator`'s base.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Callable
from typing import cast

import trio

from . import p2p, sync
from .config import Config
from .errors import BidmeshError, InvalidMessage, OperationError
from .events import Event
from .gaps import GapPlanner
from .ingest import FairIngest
from .ledger import AppendResult, Gap, Ledger, check_records
from .replication import Clock, ReplicationPolicy, Stats
from .resources import subnet_of
from .sync_peers import SlotGate, SyncPeers, SyncRecord, cause_of, lacks_protocol
from .sync_recon import ReconSession
from .sync_session import SyncLimits, SyncSession

log = logging.getLogger("bidmesh.gossip")

PEERS_RECHECK_S = 5.0  # connection table re-read without an event (was polled every 0.2 s)
GAP_SUMMARY_SLICE = 512  # authors' gaps summarized per loop step (~1-3 ms)


def _records_of(resp: sync.SyncResponse | None) -> list[bytes]:
    """The event records a sync response carries (RANGE, FETCH)."""
    if isinstance(resp, sync.RangeResponse):
        return list(resp.records)
    if isinstance(resp, sync.FetchResponse):
        return [w for entry in resp.records for w in entry]
    return []


class _Ahead:
    """A sync request sent ahead of the session (`PullSync._pull`) and its answer."""

    def __init__(self, req: sync.SyncRequest) -> None:
        self.req = req
        self.resp: sync.SyncResponse | None = None
        self.done = trio.Event()
        self.scope = trio.CancelScope()


class PullSync:
    """The sync side of `node.gossip.Replicator` (its base class)."""

    host: p2p.P2PHost
    ledger: Ledger
    cfg: Config
    network: str
    protocol: str
    protocol2: str
    clock: Clock
    policy: ReplicationPolicy[p2p.PeerId]
    stats: Stats
    limits: SyncLimits
    ingest: FairIngest[p2p.PeerId, Event | AppendResult]
    sync_peers: SyncPeers
    sync_record: SyncRecord
    sync_slots: SlotGate
    gap_planner: GapPlanner
    _syncing: set[p2p.PeerId]
    _send_errors: dict[p2p.PeerId, tuple[str, str]]
    _gap_event: trio.Event
    _nursery: trio.Nursery | None
    notify: Callable[[list[Event]], None]
    _wake_sender: Callable[[], None]

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
        async with trio.open_nursery() as nursery:
            ended = await self._pull(peer, s, version, nursery)
            nursery.cancel_scope.cancel()  # a page asked ahead for nothing
            if ended != "v1":
                # Before the nursery's exit waits for that page's task: the session's
                # outcome is counted in the step that stored its last answer.
                self._finish(peer, s, version, ended == "store_error")
        if ended == "v1":
            return await self._session(peer, gaps, live_after_ms, 1)
        return s

    def _finish(self, peer: p2p.PeerId, s: SyncSession, version: int,
                store_failed: bool) -> None:
        """Count a finished session, back off or fault its peer, spread its events."""
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

    async def _pull(self, peer: p2p.PeerId, s: SyncSession, version: int,
                    nursery: trio.Nursery) -> str | None:
        """Run `s` against `peer`: "v1" when the peer lacks /sync/2 (start again on
        /sync/1), "store_error" when our disk failed, else None.

        Pages are pipelined: while an answer's records are checked and stored, the
        request that follows if they all store (`next_if_stored`) is already on its
        way, so the peer serves the next page meanwhile; a catch-up then costs the
        larger of the two sides' work per page rather than their sum plus a round
        trip (under load, each round trip is several waits for a CPU). At most one
        request is asked ahead; an answer the session ends up not asking for is
        dropped unread."""
        now = self.clock.now
        ahead: _Ahead | None = None
        try:
            while (req := s.next_request()) is not None:
                t0 = now()
                if ahead is not None and ahead.req == req:
                    await ahead.done.wait()
                    resp = ahead.resp
                else:
                    if ahead is not None:
                        self._drop_ahead(peer, ahead)
                    resp = await self._send(peer, req, version)
                ahead = None
                t1 = now()
                self.stats.sync_wait_s += t1 - t0
                if (resp is None and version == 2 and s.stats.requests == 1
                        and self._send_errors.get(peer, ("",))[0] == "lacks_protocol"):
                    # An older node: multistream answered "na" to /sync/2.
                    del self._send_errors[peer]
                    self.stats.sync_v1_fallbacks += 1
                    return "v1"
                nxt = s.next_if_stored(resp)
                if nxt is not None:
                    ahead = _Ahead(nxt)
                    self.stats.sync_ahead += 1
                    nursery.start_soon(self._ask_ahead, peer, ahead, version)
                try:
                    # Records stored meanwhile (gossip delivering the same events) need
                    # no check: the store finds them held, byte for byte (`Ledger.holds`).
                    records = [w for w in _records_of(resp) if not self.ledger.holds(w)]
                    if records:
                        # The session stores them inside on_response: check them on the
                        # ingest thread first, so the loop only stores (node/ingest.py).
                        checked = await trio.to_thread.run_sync(
                            check_records, records, self.network, limiter=self.ingest.limiter)
                        t2 = now()
                        self.stats.sync_check_s += t2 - t1
                        t1 = t2
                        with self.ledger.prechecked(records, checked):
                            s.on_response(resp)
                    else:
                        s.on_response(resp)
                    self.stats.sync_store_s += now() - t1
                except sqlite3.Error as e:
                    # Our disk (full, or gone read-only), not the peer: end this session;
                    # the batch was rolled back and a later session fetches it again.
                    log.error("storing synced events failed", extra={"peer": str(peer),
                                                                    "error": str(e)})
                    self.stats.events["store_error"] += 1
                    return "store_error"
            return None
        finally:
            if ahead is not None:
                self._drop_ahead(peer, ahead)

    async def _ask_ahead(self, peer: p2p.PeerId, ahead: _Ahead, version: int) -> None:
        with ahead.scope:
            ahead.resp = await self._send(peer, ahead.req, version)
        ahead.done.set()

    def _drop_ahead(self, peer: p2p.PeerId, ahead: _Ahead) -> None:
        """A page asked ahead that the session did not ask for after all."""
        self.stats.sync_ahead_dropped += 1
        ahead.scope.cancel()
        if ahead.done.is_set() and ahead.resp is None:
            # Its failure is not the session's: `_send` noted it for the peer.
            self._send_errors.pop(peer, None)

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
