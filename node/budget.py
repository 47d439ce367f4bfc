"""Rate budgets for input a remote party pushes at us (sans-I/O).

Token buckets keyed by scope (a peer, an IP, the whole node), each bounded in
how many keys it remembers. Pure: no trio, no libp2p; the clock is passed in,
so tests run on a fake one. Used by the gossip validator (`GossipBudget`:
events and bytes per forwarding peer) and by SUBMIT (`node/query.py`: records
per requesting peer, per IP and per node).

A charge is all or nothing: every scope is checked first and only then
debited, so input refused by one scope costs nothing in the others.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

__all__ = ["Bucket", "GossipBudget", "KeyedBuckets", "MultiBudget"]


@dataclass(slots=True)
class Bucket:
    """A token bucket: `rate` tokens per second, holding at most `burst`."""

    rate: float
    burst: float
    tokens: float
    ts: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> Bucket:
        return cls(rate, burst, burst, now)

    def refill(self, now: float) -> float:
        if now > self.ts:
            self.tokens = min(self.burst, self.tokens + (now - self.ts) * self.rate)
        self.ts = max(self.ts, now)
        return self.tokens


class KeyedBuckets:
    """One bucket per key, created full on first use; the least recently used keys
    are forgotten beyond `max_keys` (a forgotten key starts full again, which is
    why `max_keys` must exceed the number of keys that can be active at once)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        if rate <= 0 or burst <= 0 or max_keys < 1:
            raise UsageError("a budget needs a positive rate, burst and key count")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[Hashable, Bucket] = OrderedDict()

    def bucket(self, key: Hashable, now: float) -> Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = Bucket.full(self.rate, self.burst, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b.refill(now)
        return b

    def __len__(self) -> int:
        return len(self._buckets)


class MultiBudget:
    """Several scopes charged together: `charge({scope: key}, n, now)` debits `n` from
    the bucket of `key` in each named scope, or from none of them. A scope whose key
    is None is skipped (e.g. no IP known). Scopes are checked in insertion order and
    the first one without room is returned."""

    def __init__(self, scopes: dict[str, KeyedBuckets]) -> None:
        self.scopes = scopes
        self.refused: Counter[str] = Counter()

    def charge(self, keys: dict[str, Hashable | None], n: float, now: float) -> str | None:
        """None if charged; else the name of the first scope without `n` tokens
        (counted in `refused`)."""
        picked = []
        for name, kb in self.scopes.items():
            key = keys.get(name)
            if key is None:
                continue
            b = kb.bucket(key, now)
            if b.tokens < n:
                self.refused[name] += 1
                return name
            picked.append(b)
        for b in picked:
            b.tokens -= n
        return None


@dataclass
class _PeerUse:
    events: int = 0
    bytes: int = 0
    dropped_batches: int = 0
    dropped_events: int = 0
    dropped_bytes: int = 0


@dataclass(frozen=True)
class GossipVerdict:
    """What `GossipBudget.charge` decided for one received batch."""

    ok: bool
    scope: str | None = None  # the budget that was exceeded ("events" or "bytes")
    fault: bool = False  # the peer's own publishes exceeded it: the peer is at fault


@dataclass
class GossipBudget:
    """Gossip input per forwarding peer: events/s and bytes/s token buckets (bursts of
    `burst_s` seconds of each rate). A batch that does not fit either is dropped
    whole and counted against the peer.

    A peer's own publishes (`own=True`: it signed the pubsub message) are also
    charged to buckets of their own, at the same rates: beyond those the verdict
    says `fault` (the caller faults the peer, eventually cuts it off). An honest
    node relays the whole network's events and publishes its own within its pace
    (`gossip.publish_*`), so its own share never trips them even when its relays
    fill the forwarding budget, which only drops.

    Bytes are charged for the whole batch as received (before any decoding),
    events only for records we do not already hold (duplicates cost a hash and an
    index lookup, not a signature check or a row)."""

    events_per_s: float
    bytes_per_s: float
    burst_s: float
    clock: Callable[[], float]
    max_peers: int = 4096
    _events: KeyedBuckets = field(init=False)
    _bytes: KeyedBuckets = field(init=False)
    _own_events: KeyedBuckets = field(init=False)
    _own_bytes: KeyedBuckets = field(init=False)
    _use: OrderedDict[Hashable, _PeerUse] = field(init=False, default_factory=OrderedDict)
    dropped: Counter[str] = field(init=False, default_factory=Counter)
    """Batches dropped per exceeded budget ("events", "bytes")."""
    dropped_events: int = field(init=False, default=0)
    dropped_bytes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.burst_s <= 0:
            raise UsageError("gossip budget burst must be positive")
        self._events = KeyedBuckets(self.events_per_s, self.events_per_s * self.burst_s,
                                    self.max_peers)
        self._bytes = KeyedBuckets(self.bytes_per_s, self.bytes_per_s * self.burst_s,
                                   self.max_peers)
        self._own_events = KeyedBuckets(self.events_per_s, self.events_per_s * self.burst_s,
                                        self.max_peers)
        self._own_bytes = KeyedBuckets(self.bytes_per_s, self.bytes_per_s * self.burst_s,
                                       self.max_peers)

    def _peer(self, peer: Hashable) -> _PeerUse:
        u = self._use.get(peer)
        if u is None:
            u = self._use[peer] = _PeerUse()
            while len(self._use) > self.max_peers:
                self._use.popitem(last=False)
        else:
            self._use.move_to_end(peer)
        return u

    def charge_bytes(self, peer: Hashable, n: int, own: bool = False) -> GossipVerdict:
        """Charge a received batch's size, before decoding it."""
        return self._charge("bytes", self._bytes, self._own_bytes if own else None, peer, n)

    def charge_events(self, peer: Hashable, n: int, own: bool = False) -> GossipVerdict:
        """Charge the records of a batch we would verify and store."""
        if n <= 0:
            return GossipVerdict(True)
        return self._charge("events", self._events, self._own_events if own else None,
                            peer, n)

    def _charge(self, scope: str, kb: KeyedBuckets, own: KeyedBuckets | None,
                peer: Hashable, n: int) -> GossipVerdict:
        now = self.clock()
        fault = False
        if own is not None:
            # What the peer tried to publish, dropped or not: its own pace.
            ob = own.bucket(peer, now)
            if ob.tokens < n:
                fault = True
            else:
                ob.tokens -= n
        b = kb.bucket(peer, now)
        u = self._peer(peer)
        if fault or b.tokens < n:
            u.dropped_batches += 1
            self.dropped[scope] += 1
            if scope == "bytes":
                u.dropped_bytes += n
                self.dropped_bytes += n
            else:
                u.dropped_events += n
                self.dropped_events += n
            return GossipVerdict(False, scope, fault)
        b.tokens -= n
        if scope == "bytes":
            u.bytes += n
        else:
            u.events += n
        return GossipVerdict(True)

    def status(self, top: int = 8) -> dict[str, Any]:
        """Totals and the peers with the most dropped input (JSON-ready)."""
        worst = sorted(((p, u) for p, u in self._use.items() if u.dropped_batches),
                       key=lambda pu: -pu[1].dropped_batches)[:top]
        return {
            "events_per_s": self.events_per_s, "bytes_per_s": self.bytes_per_s,
            "burst_s": self.burst_s, "dropped_batches": dict(self.dropped),
            "dropped_events": self.dropped_events, "dropped_bytes": self.dropped_bytes,
            "peers_over_budget": {str(p): {"dropped_batches": u.dropped_batches,
                                           "dropped_events": u.dropped_events,
                                           "dropped_bytes": u.dropped_bytes,
                                           "accepted_events": u.events}
                                  for p, u in worst},
        }
