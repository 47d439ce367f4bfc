"""Rate budgets for input a remote party pushes at us (sans-I/O).

Token buckets keyed by scope (a peer, an IP, the whole node), each bounded in
how many keys it remembers. Pure: no trio, no libp2p; the clock is passed in,
so tests run on a fake one. Used by the gossip validator (`GossipBudget`:
events and bytes per forwarding peer and per subnet) and by SUBMIT (`node/query.py`: records
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
    """One bucket per key, created on first use holding `initial` tokens (default: a
    full burst); the least recently used keys are forgotten beyond `max_keys` (a
    forgotten key starts again with `initial`, which is why `max_keys` must exceed
    the number of keys that can be active at once)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096,
                 initial: float | None = None) -> None:
        if rate <= 0 or burst <= 0 or max_keys < 1 or (initial is not None and initial < 0):
            raise UsageError("a budget needs a positive rate, burst and key count")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.initial = burst if initial is None else min(initial, burst)
        self._buckets: OrderedDict[Hashable, Bucket] = OrderedDict()

    def bucket(self, key: Hashable, now: float) -> Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = Bucket(self.rate, self.burst, self.initial, now)
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
    """What `GossipBudget.charge_*` decided for one received batch."""

    ok: bool
    scope: str | None = None
    """The budget that was exceeded: "events" or "bytes" (the forwarding peer's own),
    "subnet_events" or "subnet_bytes" (all peers of its subnet together)."""
    fault: bool = False  # the peer's own publishes exceeded it: the peer is at fault


@dataclass
class GossipBudget:
    """Gossip input per forwarding peer: events/s and bytes/s token buckets (bursts of
    `burst_s` seconds of each rate), and optionally the same per subnet of the peers'
    addresses (`subnet_*_per_s`, all forwarding peers of a subnet together). A batch
    that does not fit is dropped whole and counted against the peer.

    A peer's own publishes (`own=True`: it signed the pubsub message) are also
    charged to buckets of their own, at the same rates: beyond those the verdict
    says `fault` (the caller faults the peer, eventually cuts it off). An honest
    node relays the whole network's events and publishes its own within its pace
    (`gossip.publish_*`), so its own share never trips them even when its relays
    fill the forwarding budget, or flooders its subnet's, which only drop.

    A peer's (or subnet's) forwarding buckets start with `first_s` seconds of each
    rate, not a whole burst (`None`: a whole burst), at its first batch; they grow
    to `burst_s` while it stays under the rate. A full burst for every new identity
    was what a flood got beyond the rate (bench/hostile.py `gossip_flood`:
    1 500-3 000 events/s stored for 1.5 s against 1 000/s) and what rotating
    identities multiply. `first_s` should hold an honest publisher's paced burst
    (`gossip.publish_burst_s`); the own buckets start full: a newcomer's first paced
    burst is no fault.

    Bytes are charged for the whole batch as received (before any decoding),
    events only for records we do not already hold (duplicates cost a hash and an
    index lookup, not a signature check or a row). A charge is all or nothing
    across the peer's and its subnet's forwarding buckets."""

    events_per_s: float
    bytes_per_s: float
    burst_s: float
    clock: Callable[[], float]
    max_peers: int = 4096
    first_s: float | None = None
    subnet_events_per_s: float | None = None
    subnet_bytes_per_s: float | None = None
    _scopes: dict[str, KeyedBuckets] = field(init=False, default_factory=dict)
    _use: OrderedDict[Hashable, _PeerUse] = field(init=False, default_factory=OrderedDict)
    dropped: Counter[str] = field(init=False, default_factory=Counter)
    """Batches dropped per exceeded budget (`GossipVerdict.scope`)."""
    dropped_events: int = field(init=False, default=0)
    dropped_bytes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.burst_s <= 0 or (self.first_s is not None and self.first_s <= 0):
            raise UsageError("gossip budget bursts must be positive")
        first = self.burst_s if self.first_s is None else min(self.first_s, self.burst_s)
        rates = {"events": self.events_per_s, "bytes": self.bytes_per_s,
                 "subnet_events": self.subnet_events_per_s,
                 "subnet_bytes": self.subnet_bytes_per_s}
        for name, rate in rates.items():
            if rate is not None:
                self._scopes[name] = KeyedBuckets(rate, rate * self.burst_s, self.max_peers,
                                                  initial=rate * first)
        self._scopes["own_events"] = KeyedBuckets(self.events_per_s,
                                                  self.events_per_s * self.burst_s,
                                                  self.max_peers)
        self._scopes["own_bytes"] = KeyedBuckets(self.bytes_per_s,
                                                 self.bytes_per_s * self.burst_s,
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

    def charge_bytes(self, peer: Hashable, n: int, own: bool = False,
                     subnet: Hashable | None = None) -> GossipVerdict:
        """Charge a received batch's size, before decoding it."""
        return self._charge("bytes", peer, n, own, subnet)

    def charge_events(self, peer: Hashable, n: int, own: bool = False,
                      subnet: Hashable | None = None) -> GossipVerdict:
        """Charge the records of a batch we would verify and store."""
        if n <= 0:
            return GossipVerdict(True)
        return self._charge("events", peer, n, own, subnet)

    def _charge(self, kind: str, peer: Hashable, n: int, own: bool,
                subnet: Hashable | None) -> GossipVerdict:
        now = self.clock()
        fault = False
        if own:
            # What the peer tried to publish, dropped or not: its own pace.
            ob = self._scopes["own_" + kind].bucket(peer, now)
            if ob.tokens < n:
                fault = True
            else:
                ob.tokens -= n
        buckets = [(kind, self._scopes[kind].bucket(peer, now))]
        sub = self._scopes.get("subnet_" + kind)
        if sub is not None and subnet is not None:
            buckets.append(("subnet_" + kind, sub.bucket(subnet, now)))
        short = kind if fault else next((s for s, b in buckets if b.tokens < n), None)
        u = self._peer(peer)
        if short is not None:
            u.dropped_batches += 1
            self.dropped[short] += 1
            if kind == "bytes":
                u.dropped_bytes += n
                self.dropped_bytes += n
            else:
                u.dropped_events += n
                self.dropped_events += n
            return GossipVerdict(False, short, fault)
        for _, b in buckets:
            b.tokens -= n
        if kind == "bytes":
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
            "burst_s": self.burst_s, "first_s": self.first_s,
            "subnet_events_per_s": self.subnet_events_per_s,
            "subnet_bytes_per_s": self.subnet_bytes_per_s,
            "dropped_batches": dict(self.dropped),
            "dropped_events": self.dropped_events, "dropped_bytes": self.dropped_bytes,
            "peers_over_budget": {str(p): {"dropped_batches": u.dropped_batches,
                                           "dropped_events": u.dropped_events,
                                           "dropped_bytes": u.dropped_bytes,
                                           "accepted_events": u.events}
                                  for p, u in worst},
        }
