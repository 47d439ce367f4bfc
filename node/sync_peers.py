"""Which connected peers to pull from, and saying once why a pull failed.

A node's connections include light clients and nodes of other networks: they do not
serve `/bidmesh/<network>/sync/1`, so a sync with them fails every time (measured:
`sync failed 16 of 29` on a healthy 2-node network with devnet clients attached).
Identify tells us each peer's protocols; a peer identified without ours is not picked.
A peer not identified yet is given the benefit of the doubt (identify may still be
running, for seconds on a loaded host); if it then refuses the protocol, that is
counted as a skip, not logged as a failure.

A peer can also answer sync badly on purpose: endless HEADS pages, RANGE answers just
under our timeout (a tarpit). `SyncSession` ends such a session (`stalled`); here
`SyncRecord` backs off from the peer (not picked, not synced with, doubling per
repeat; also when our requests to it time out without progress), and `SyncSlots`
shares the session slots: one per peer, and strangers never hold the last
`reserved` slots, which only peers we dialed (bootstrap, mDNS, `connect`) may use,
nor more than `stranger_slots_per_subnet` per subnet of their address (/24, /56),
and strangers whose last session was productive go first. Having brought us events
is no such proof of who a peer is: anyone can mint valid events under keys of their
own; whom we dial is our choice. So a crowd of tarpit identities holds at most
`slots - reserved` slots, each for about `stall_s`, and anti-entropy with the peers
we chose goes on meanwhile.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import trio

from . import p2p

log = logging.getLogger("bidmesh.gossip")

IDENTIFY_WAIT_S = 3.0  # on connect: how long to wait for identify before syncing anyway
MAX_LOGGED = 4096  # (peer, cause) pairs remembered for "log once"
MAX_RECORDS = 4096  # peers remembered by SyncRecord (strikes, back-off), LRU


@dataclass
class _Record:
    strikes: int = 0  # stalled sessions in a row
    until: float = 0.0  # backed off until (clock time)
    good: bool = False  # the last session was productive
    timed_out: bool = False  # the back-off is for a timeout (forgiven on a new connection)


class SyncRecord:
    """Per-peer sync history (pure; `clock` is trio's in the node, virtual in tests).

    A stalled session backs the peer off for `penalty_s` × 2^(strikes - 1), at most
    `penalty_max_s`; a productive session clears the strikes and the back-off.
    Bounded: the least recently touched of more than `max_peers` peers is forgotten."""

    def __init__(self, clock: Callable[[], float], *, penalty_s: float = 60.0,
                 penalty_max_s: float = 3600.0, max_peers: int = MAX_RECORDS) -> None:
        self.clock = clock
        self.penalty_s = penalty_s
        self.penalty_max_s = penalty_max_s
        self.max_peers = max_peers
        self._peers: OrderedDict[Hashable, _Record] = OrderedDict()
        self.stalls = 0  # sessions ended as stalled, ever
        self.timeouts = 0  # sessions ended by a request timeout without progress, ever

    def _get(self, peer: Hashable) -> _Record:
        rec = self._peers.get(peer)
        if rec is None:
            rec = self._peers[peer] = _Record()
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        self._peers.move_to_end(peer)
        return rec

    def stalled(self, peer: Hashable) -> float:
        """Record a stalled session; returns the back-off in seconds."""
        self.stalls += 1
        return self._strike(peer)

    def timed_out(self, peer: Hashable) -> float:
        """Record a session that ended, without progress, on a request timeout (the
        same back-off as a stall: it held a slot as long); returns it in seconds."""
        self.timeouts += 1
        backoff = self._strike(peer)
        self._peers[peer].timed_out = True
        return backoff

    def reconnected(self, peer: Hashable) -> None:
        """A new connection to the peer: a back-off for timeouts ends (the old one may
        have been stranded by a partition that has healed; a peer that keeps letting
        requests time out is backed off again after one session). One for stalls
        stays: a tarpit must not clear it by reconnecting."""
        rec = self._peers.get(peer)
        if rec is not None and rec.timed_out:
            rec.until = 0.0
            rec.timed_out = False

    def good(self, peer: Hashable) -> bool:
        """Its last session with us brought something new or found us in sync."""
        rec = self._peers.get(peer)
        return rec is not None and rec.good

    def _strike(self, peer: Hashable) -> float:
        rec = self._get(peer)
        rec.strikes += 1
        rec.good = False
        rec.timed_out = False
        backoff = min(self.penalty_max_s, self.penalty_s * (1 << min(rec.strikes - 1, 30)))
        rec.until = self.clock() + backoff
        return backoff

    def productive(self, peer: Hashable) -> None:
        rec = self._get(peer)
        rec.strikes = 0
        rec.until = 0.0
        rec.good = True

    def backed_off(self, peer: Hashable) -> bool:
        rec = self._peers.get(peer)
        return rec is not None and rec.until > self.clock()

    def backed_off_count(self) -> int:
        now = self.clock()
        return sum(1 for r in self._peers.values() if r.until > now)


class SyncSlots:
    """Who may start a sync session now (pure bookkeeping; `SlotGate` waits on it).

    `slots` sessions at once, one per peer; strangers hold at most `slots - reserved`
    of them, and at most `per_group` per group (the subnet of their address: fresh
    identities cost nothing to make, addresses do); while a known peer (one we
    dialed) waits, no stranger takes a freed slot before it, and while a stranger
    with a good record (its last session was productive) waits, no other stranger."""

    def __init__(self, slots: int, reserved: int, per_group: int = 1_000_000) -> None:
        if slots < 1 or per_group < 1:
            raise ValueError("sync needs at least one slot, and one per group")
        self.slots = slots
        self.reserved = max(0, min(reserved, slots - 1))
        self.per_group = per_group
        self.holders: dict[Hashable, tuple[bool, Hashable | None]] = {}  # peer -> known, group
        self._waiting: dict[Hashable, tuple[bool, bool]] = {}  # peer -> known, good
        self.refused_group = 0  # takes refused by the per-group bound

    @property
    def strangers(self) -> int:
        return sum(1 for known, _ in self.holders.values() if not known)

    def take(self, peer: Hashable, known: bool, group: Hashable | None = None,
             good: bool = False) -> bool:
        if peer in self.holders or len(self.holders) >= self.slots:
            return False
        if not known:
            if self.strangers >= self.slots - self.reserved:
                return False
            if group is not None and sum(1 for k, g in self.holders.values()
                                         if not k and g == group) >= self.per_group:
                self.refused_group += 1
                return False
            for p, (k, g) in self._waiting.items():
                if p != peer and (k or (g and not good)):
                    return False  # a known peer, or a good stranger, waits for this slot
        self.holders[peer] = (known, group)
        return True

    def wait(self, peer: Hashable, known: bool, good: bool = False) -> None:
        self._waiting[peer] = (known, good)

    def unwait(self, peer: Hashable) -> bool:
        """Stop waiting; True if the peer had precedence (others may go now)."""
        known, good = self._waiting.pop(peer, (False, False))
        return known or good

    def release(self, peer: Hashable) -> None:
        self.holders.pop(peer, None)

    def status(self) -> dict[str, int]:
        return {"slots": self.slots, "reserved": self.reserved, "held": len(self.holders),
                "held_by_strangers": self.strangers, "waiting": len(self._waiting),
                "per_subnet": self.per_group, "refused_per_subnet": self.refused_group}


class SlotGate:
    """`SyncSlots` for trio tasks: `acquire` waits (bounded) for a slot."""

    def __init__(self, slots: SyncSlots) -> None:
        self.slots = slots
        self._changed = trio.Event()

    async def acquire(self, peer: Hashable, known: Callable[[], bool], timeout: float,
                      group: Hashable | None = None, good: bool = False) -> bool:
        """Take a slot for `peer` within `timeout` s; False if none came free.
        `known` is asked again on every try (we may dial the peer meanwhile)."""
        got = False
        with trio.move_on_after(timeout):
            try:
                while not self.slots.take(peer, k := known(), group, good):
                    self.slots.wait(peer, k, good)
                    await self._changed.wait()
                got = True
            finally:
                if self.slots.unwait(peer):
                    self._wake()
        return got

    def release(self, peer: Hashable) -> None:
        self.slots.release(peer)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class SyncPeers:
    def __init__(self, host: p2p.P2PHost, protocol: str) -> None:
        self.host = host
        self.protocol = protocol
        self._logged: set[tuple[str, str]] = set()
        # When eligible() first saw each peer it was given (bounded: those peers only).
        self._first_seen: dict[p2p.PeerId, float] = {}

    def identified(self, peer: p2p.PeerId) -> bool:
        """Identify told us the peer's protocols, on this connection or an earlier one.

        Upstream (host/basic_host.py) records an identify finished on the current
        connection in `_identified_peers`, but skips identify altogether when the
        peerstore still holds the peer's protocols from an earlier connection
        (`_has_cached_protocols`): a light client reconnecting for its next command
        was then never "identified" and was picked for sync, failing each time. In
        0.8.1 only identify writes protocols to the peerstore (identity/update.py),
        so a non-empty list is an earlier identify's answer."""
        if self.host.identified(peer):
            return True
        return bool(self._protocols(peer))

    def _protocols(self, peer: p2p.PeerId) -> list[str]:
        return self.host.peer_protocols(peer)  # []: never seen, or pruned from the peerstore

    def serves(self, peer: p2p.PeerId, protocol: str) -> bool | None:
        """Whether identify listed `protocol` for the peer; None before identify."""
        if not self.identified(peer):
            return None
        return protocol in self._protocols(peer)

    def lacks_sync(self, peer: p2p.PeerId) -> bool:
        """True when identify told us the peer's protocols and ours is not among them."""
        if not self.identified(peer):
            return False
        return self.protocol not in self._protocols(peer)

    def eligible(self, peers: Sequence[p2p.PeerId]) -> list[p2p.PeerId]:
        """Peers a sync round may pick: not known to lack sync, and identified, or
        connected for IDENTIFY_WAIT_S without identify finishing (benefit of the doubt).
        An unidentified newcomer is most often a light client whose identify is still
        in flight (seen on loaded netns hosts: the picks failed "protocol not
        supported"); a new node peer is synced on connect anyway."""
        now = trio.current_time()
        self._first_seen = {p: self._first_seen.get(p, now) for p in peers}
        return [p for p in peers if not self.lacks_sync(p) and (
            self.identified(p) or now - self._first_seen[p] >= IDENTIFY_WAIT_S)]

    def dialed(self, peer: p2p.PeerId) -> bool:
        """We hold a connection we opened to it (bootstrap, mDNS, `connect`): a peer
        we chose, which a crowd of inbound identities cannot impersonate."""
        return self.host.dialed(peer)

    async def wait_identified(self, peer: p2p.PeerId, timeout: float = IDENTIFY_WAIT_S) -> None:
        """Wait (bounded) for identify to finish on a new connection."""
        with trio.move_on_after(timeout):
            while not self.identified(peer) and self.host.is_connected(peer):
                await trio.sleep(0.05)

    def failed(self, peer: p2p.PeerId, cause: str, detail: str) -> None:
        """Log a sync failure once per peer and cause (later ones are counted only)."""
        key = (str(peer), cause)
        if key in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED:
            self._logged.clear()
        self._logged.add(key)
        log.info("sync failed", extra={"peer": str(peer), "cause": cause,
                                       "error": detail[:300],
                                       "note": "logged once per peer and cause"})


def lacks_protocol(error: BaseException) -> bool:
    """True when a request failed because the peer answered multistream's "na" to our
    protocol: it does not serve it (a light client, before identify told us so).
    Upstream (0.8.1, protocol_muxer/multiselect_client.py `select_one_of`) raises a
    plain MultiselectClientError for that, wrapped in StreamFailure; only its message,
    "protocols not supported", tells it from a broken connection."""
    e: BaseException | None = error
    for _ in range(8):
        if e is None:
            return False
        if "protocols not supported" in str(e):
            return True
        e = e.__cause__
    return False


def cause_of(error: BaseException) -> str:
    """A short, stable cause for a failed sync request (the log-once key)."""
    reason = getattr(error, "reason", None)
    name = type(error).__name__
    return f"{name}:{reason}" if isinstance(reason, str) else name
