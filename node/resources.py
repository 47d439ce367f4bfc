"""Resource manager: who may hold how many connections, streams and requests (sans-I/O).

In the spirit of go-libp2p's rcmgr (p2p/host/resource-manager): every
connection, stream and request in flight is a *lease* charged to scopes
(the whole node, the peer, its IP and subnet, the protocol) and refused at
once when a scope is full. Pure: no trio, no libp2p, no sockets; the clock
is passed in (`clock()`, seconds, monotonic), so tests run on a fake one.
`node/p2p/` (the I/O shell) owns one per host as `host.resources` and
performs what it decides: closing refused or idle connections, resetting
refused or idle streams.

Scopes and what holds them (`Limits` has the numbers; all configurable under
`[limits]`):

* connections — total for the node (`max_connections`), of which
  `outbound_reserved` only our own dials may use (inbound floods never starve
  bootstrap dials) and `trusted_reserved` inbound slots only bootstrap and
  known-good peers may use; per peer, and for inbound connections per IP and
  per subnet (/24 IPv4, `/ipv6_prefix` IPv6; addresses in `ip_exempt` and
  bootstrap peers are not counted there, by default loopback: devnets and local
  clients);
* inbound streams — per peer, per protocol for the node (its last
  `trusted_reserved_streams` slots only for trusted peers) and per protocol
  per peer (fairness: one peer never takes a protocol's whole pool);
* requests in flight — per peer, across request protocols;
* eviction — when a connection would be refused because the stranger slots,
  the inbound slots or the node total are full, the stranger inbound connection
  unused longest is closed to make room, provided it has had no useful traffic
  for `conn_grace_s` (idle holders cannot keep newcomers out; a stranger that
  talks, and every trusted peer and our own dials, are never evicted);
* idleness — an inbound connection of a stranger with no useful traffic
  (`touch`) for `conn_idle_s` while the stranger slots are under pressure
  (`idle_pressure`), and a stream with no completed frame
  (`touch_stream`) for `stream_idle_s` (protocols starting with a `long_lived`
  prefix excepted), are
  reported by `idle()` for the shell to close;
* self-limited protocols (`set_protocol_limits`): a service that bounds its own
  streams (tunnels, which last as long as a download and are capped per lease and
  member) gets its own per-peer and total caps for its protocol instead of the
  stream scopes above, and its streams never expire as idle (it has its own timeout).

"Trusted" means a bootstrap peer (`set_bootstrap`) or a known-good peer
(`mark_good`: it gave us valid events; an LRU of `good_peers_max`).

API for other modules (through `host.resources` on a `P2PHost`)::

    lease = rm.try_open_stream(peer, "/bidmesh/x/1")   # None: refused, reset it
    ...; rm.close_stream(lease)
    req = rm.try_start_request(peer, "/bidmesh/x/1")   # None: answer "busy"
    ...; rm.end_request(req)
    rm.touch(peer); rm.mark_good(peer)                 # useful traffic / valid events
    rm.status()                                        # limits and usage, for status/metrics

`open_connection`, `open_stream` and `start_request` raise `LimitExceeded`
(a `RateLimited`; `.scope` names the full scope) instead of returning None.
Releasing is idempotent. Peers are any hashable (libp2p `ID` in the shell).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Final

from .errors import LimitExceeded, UsageError

__all__ = [
    "ConnLease",
    "Direction",
    "IdleReport",
    "LimitExceeded",
    "Limits",
    "RequestLease",
    "ResourceManager",
    "StreamLease",
    "subnet_of",
]

Peer = Hashable


class Direction(Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True)
class Limits:
    """Every limit of the resource manager; see docs/decisions.md for the defaults."""

    max_connections: int = 64
    outbound_reserved: int = 16
    trusted_reserved: int = 8
    conns_per_peer: int = 2
    conns_per_ip: int = 8
    conns_per_subnet: int = 16
    ipv6_prefix: int = 56
    ip_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    streams_per_peer: int = 64
    streams_per_protocol: int = 64
    streams_per_peer_protocol: int = 8
    trusted_reserved_streams: int = 16
    requests_per_peer: int = 16
    conn_idle_s: float = 120.0
    conn_grace_s: float = 5.0  # a stranger unused this long may be evicted for a newcomer
    idle_pressure: float = 0.5  # close idle connections only above this share of stranger slots
    stream_idle_s: float = 60.0
    long_lived: tuple[str, ...] = ()  # protocol prefixes exempt from stream idle expiry
    good_peers_max: int = 1024
    # Replication budgets, enforced outside the resource manager (node/budget.py users:
    # gossip, SUBMIT, the pending buffer, gap fetching); here so that status and
    # metrics show every limit in one place.
    gossip_peer_events_per_s: int = 1000
    gossip_peer_bytes_per_s: int = 1 << 20
    gossip_burst_s: int = 4
    gossip_first_burst_s: int = 2
    gossip_subnet_events_per_s: int = 4000
    gossip_subnet_bytes_per_s: int = 4 << 20
    gossip_ingest_queue_events: int = 8192
    submit_peer_per_s: int = 50
    submit_peer_burst: int = 200
    submit_ip_per_s: int = 100
    submit_ip_burst: int = 200
    submit_node_per_s: int = 500
    submit_node_burst: int = 1000
    pending_peer_bytes: int = 4 << 20
    pending_peer_events: int = 2048
    pending_total_bytes: int = 32 << 20
    pending_ttl_s: int = 60
    gap_authors_per_round: int = 64
    gap_peer_requests_per_s: int = 16
    gap_tries: int = 2

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UsageError(f"limits: {what}")

        for name in REPLICATION_LIMITS:
            need(getattr(self, name) >= 1, f"{name} must be at least 1")

        for name in ("max_connections", "conns_per_peer", "conns_per_ip", "conns_per_subnet",
                     "streams_per_peer", "streams_per_protocol", "streams_per_peer_protocol",
                     "requests_per_peer", "good_peers_max"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1")
        need(self.outbound_reserved >= 0 and self.trusted_reserved >= 0
             and self.trusted_reserved_streams >= 0, "reserved slots must not be negative")
        need(self.outbound_reserved + self.trusted_reserved < self.max_connections,
             "outbound_reserved + trusted_reserved must leave inbound slots for strangers "
             "(less than max_connections)")
        need(self.trusted_reserved_streams < self.streams_per_protocol,
             "trusted_reserved_streams must be less than streams_per_protocol")
        need(16 <= self.ipv6_prefix <= 128, "ipv6_prefix must be between 16 and 128")
        need(self.conn_idle_s > 0 and self.stream_idle_s > 0 and self.conn_grace_s > 0,
             "idle timeouts must be positive")
        need(0 <= self.idle_pressure <= 1, "idle_pressure must be between 0 and 1")
        try:
            self.exempt_networks()
        except ValueError as exc:
            raise UsageError(f"limits: ip_exempt: {exc}") from exc

    def exempt_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c, strict=False) for c in self.ip_exempt]

    @property
    def inbound_max(self) -> int:
        """Inbound connections for trusted peers (strangers: `trusted_reserved` fewer)."""
        return self.max_connections - self.outbound_reserved


REPLICATION_LIMITS: Final = (
    "gossip_peer_events_per_s", "gossip_peer_bytes_per_s", "gossip_burst_s",
    "gossip_first_burst_s", "gossip_subnet_events_per_s", "gossip_subnet_bytes_per_s",
    "gossip_ingest_queue_events",
    "submit_peer_per_s", "submit_peer_burst", "submit_ip_per_s", "submit_ip_burst",
    "submit_node_per_s", "submit_node_burst", "pending_peer_bytes", "pending_peer_events",
    "pending_total_bytes", "pending_ttl_s", "gap_authors_per_round",
    "gap_peer_requests_per_s", "gap_tries")
"""`Limits` fields that are also `[limits]` keys of the same name (copied by the daemon)."""


def subnet_of(ip: str, ipv6_prefix: int = 56) -> str:
    """The subnet an inbound address is counted in: /24 for IPv4, /ipv6_prefix for IPv6."""
    addr = ipaddress.ip_address(ip)
    prefix = 24 if addr.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


_ids: Final = itertools.count(1)
# Full scopes an idle stranger's eviction frees a slot in (not per peer / IP / subnet).
_EVICTABLE_SCOPES: Final = frozenset({"conns_total", "conns_inbound",
                                      "conns_inbound_strangers"})


@dataclass(eq=False)
class ConnLease:
    peer: Peer
    direction: Direction
    ip: str | None  # counted address (None: not counted per IP: outbound, exempt, unknown)
    subnet: str | None
    trusted: bool
    opened_at: float
    last_used: float
    id: int = field(default_factory=lambda: next(_ids))
    released: bool = False


@dataclass(eq=False)
class StreamLease:
    peer: Peer
    protocol: str
    reserved: bool  # holds one of the protocol's trusted-only slots
    opened_at: float
    last_used: float
    id: int = field(default_factory=lambda: next(_ids))
    released: bool = False
    own: bool = False  # charged to its protocol's own caps (`set_protocol_limits`)


@dataclass(eq=False)
class RequestLease:
    peer: Peer
    protocol: str
    id: int = field(default_factory=lambda: next(_ids))
    released: bool = False


@dataclass(frozen=True)
class IdleReport:
    """What `idle()` found: the shell closes these connections and resets these streams."""

    conns: tuple[ConnLease, ...]
    streams: tuple[StreamLease, ...]


class ResourceManager:
    """Decides whether a connection, stream or request may start; see the module docstring."""

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._clock = clock
        self._exempt = limits.exempt_networks()
        self._bootstrap: set[Peer] = set()
        self._good: OrderedDict[Peer, None] = OrderedDict()
        self._conns: dict[int, ConnLease] = {}
        self._conns_by_peer: dict[Peer, set[int]] = {}
        self._inbound = 0
        self._inbound_strangers = 0
        self._outbound = 0
        self._per_ip: Counter[str] = Counter()
        self._per_subnet: Counter[str] = Counter()
        self._streams: dict[int, StreamLease] = {}
        self._streams_per_peer: Counter[Peer] = Counter()
        self._streams_per_protocol: Counter[str] = Counter()
        self._streams_per_peer_protocol: Counter[tuple[Peer, str]] = Counter()
        self._requests: Counter[Peer] = Counter()
        self._requests_total = 0
        self._own: dict[str, tuple[int, int]] = {}  # protocol -> (per peer, total)
        self.refused: Counter[str] = Counter()
        """Refusals per scope since start (status and metrics)."""
        self.closed_idle = 0
        """Connections and streams reported idle by `idle()` since start."""
        self.evicted = 0
        """Idle stranger connections evicted to admit a newcomer since start."""
        self._to_close: list[ConnLease] = []

    # -- who is trusted

    def set_bootstrap(self, peers: Iterable[Peer]) -> None:
        self._bootstrap = set(peers)

    def mark_good(self, peer: Peer) -> None:
        """The peer gave us valid events: it may use the trusted reserve (bounded LRU)."""
        self._good[peer] = None
        self._good.move_to_end(peer)
        while len(self._good) > self.limits.good_peers_max:
            self._good.popitem(last=False)

    def is_trusted(self, peer: Peer) -> bool:
        return peer in self._bootstrap or peer in self._good

    def _refuse(self, scope: str, message: str) -> LimitExceeded:
        self.refused[scope] += 1
        return LimitExceeded(scope, message)

    # -- connections

    def _counted_ip(self, ip: str | None) -> str | None:
        if ip is None:
            return None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None  # not an IP transport (none today): not counted per IP
        if any(addr in net for net in self._exempt):
            return None
        return str(addr)

    def address_refusal(self, ip: str | None, pending_ip: int = 0,
                        pending_subnet: int = 0) -> LimitExceeded | None:
        """The refusal an inbound connection from `ip` gets from its address limits
        alone, counting `pending_*` more from that IP and subnet already being set
        up; None if they admit it. Asked before the handshake (the peer is not
        known yet): a bootstrap peer, which skips these limits once known, is not
        told apart there. Counted in `refused`."""
        counted = self._counted_ip(ip)
        if counted is None:
            return None
        lim = self.limits
        if self._per_ip[counted] + pending_ip >= lim.conns_per_ip:
            return self._refuse("conns_per_ip", f"{counted} already has {lim.conns_per_ip} "
                                "inbound connections (or handshakes)")
        subnet = subnet_of(counted, lim.ipv6_prefix)
        if self._per_subnet[subnet] + pending_subnet >= lim.conns_per_subnet:
            return self._refuse("conns_per_subnet", f"{subnet} already has "
                                f"{lim.conns_per_subnet} inbound connections (or handshakes)")
        return None

    def open_connection(self, peer: Peer, ip: str | None, direction: Direction) -> ConnLease:
        """Charge a new connection; raise LimitExceeded if a scope is full.

        Outbound connections (our dials) are limited by the node total and per
        peer only. Inbound ones also by IP and subnet, and strangers may not
        take the `outbound_reserved` or `trusted_reserved` slots. When the
        stranger, inbound or total slots are full, an idle stranger may be
        evicted instead of refusing (see the module docstring): its lease is
        released here and the shell closes it (`take_evicted`).
        """
        refusal = self._admit(peer, ip, direction)
        if refusal is not None and refusal.scope in _EVICTABLE_SCOPES and self._evict_one():
            refusal = self._admit(peer, ip, direction)
        if refusal is not None:
            self.refused[refusal.scope] += 1
            raise refusal
        trusted = self.is_trusted(peer)
        counted_ip = subnet = None
        if direction is Direction.INBOUND:
            counted_ip = None if peer in self._bootstrap else self._counted_ip(ip)
            if counted_ip is not None:
                subnet = subnet_of(counted_ip, self.limits.ipv6_prefix)
        now = self._clock()
        lease = ConnLease(peer, direction, counted_ip, subnet, trusted, now, now)
        self._conns[lease.id] = lease
        self._conns_by_peer.setdefault(peer, set()).add(lease.id)
        if direction is Direction.INBOUND:
            self._inbound += 1
            self._inbound_strangers += not trusted
            if counted_ip is not None and subnet is not None:
                self._per_ip[counted_ip] += 1
                self._per_subnet[subnet] += 1
        else:
            self._outbound += 1
        return lease

    def _admit(self, peer: Peer, ip: str | None, direction: Direction) -> LimitExceeded | None:
        """The first full scope for this connection (not counted yet), or None."""
        lim = self.limits
        trusted = self.is_trusted(peer)
        if len(self._conns_by_peer.get(peer, ())) >= lim.conns_per_peer:
            return LimitExceeded("conns_per_peer", f"{peer} already has {lim.conns_per_peer} "
                                 "connections")
        counted_ip = subnet = None
        if direction is Direction.INBOUND:
            # Address limits first: a newcomer they refuse must not evict anyone.
            # Only bootstrap peers skip them: being known-good is easy to earn
            # (forward valid events) and must not lift them.
            counted_ip = None if peer in self._bootstrap else self._counted_ip(ip)
            if counted_ip is not None:
                subnet = subnet_of(counted_ip, lim.ipv6_prefix)
                if self._per_ip[counted_ip] >= lim.conns_per_ip:
                    return LimitExceeded("conns_per_ip", f"{counted_ip} already has "
                                         f"{lim.conns_per_ip} inbound connections")
                if self._per_subnet[subnet] >= lim.conns_per_subnet:
                    return LimitExceeded("conns_per_subnet", f"{subnet} already has "
                                         f"{lim.conns_per_subnet} inbound connections")
        total = self._inbound + self._outbound
        if total >= lim.max_connections:
            return LimitExceeded("conns_total", f"{total} connections: the node is full")
        if direction is Direction.INBOUND:
            if self._inbound >= lim.inbound_max:
                return LimitExceeded("conns_inbound", "inbound connections full (the rest is "
                                     "reserved for our own dials)")
            if not trusted and self._inbound_strangers >= lim.inbound_max - lim.trusted_reserved:
                return LimitExceeded("conns_inbound_strangers", "inbound connections for "
                                     "unknown peers full (the rest is reserved for trusted peers)")
        return None

    def _evict_one(self) -> bool:
        """Release the stranger inbound connection unused longest, if it has been
        unused for `conn_grace_s`; the shell closes it (`take_evicted`)."""
        cutoff = self._clock() - self.limits.conn_grace_s
        candidates = [c for c in self._conns.values()
                      if c.direction is Direction.INBOUND and not self.is_trusted(c.peer)
                      and c.last_used <= cutoff]
        if not candidates:
            return False
        victim = min(candidates, key=lambda c: c.last_used)
        self.close_connection(victim)
        self._to_close.append(victim)
        self.evicted += 1
        return True

    def take_evicted(self) -> list[ConnLease]:
        """Connections evicted (already released) since the last call: close them."""
        out, self._to_close = self._to_close, []
        return out

    def close_connection(self, lease: ConnLease) -> None:
        if lease.released:
            return
        lease.released = True
        del self._conns[lease.id]
        ids = self._conns_by_peer[lease.peer]
        ids.discard(lease.id)
        if not ids:
            del self._conns_by_peer[lease.peer]
        if lease.direction is Direction.INBOUND:
            self._inbound -= 1
            self._inbound_strangers -= not lease.trusted
            if lease.ip is not None and lease.subnet is not None:
                _decrement(self._per_ip, lease.ip)
                _decrement(self._per_subnet, lease.subnet)
        else:
            self._outbound -= 1

    def connections_of(self, peer: Peer) -> int:
        return len(self._conns_by_peer.get(peer, ()))

    def touch(self, peer: Peer) -> None:
        """Useful traffic with `peer` (a served request, a valid message): not idle."""
        now = self._clock()
        for cid in self._conns_by_peer.get(peer, ()):
            self._conns[cid].last_used = now

    # -- streams

    def set_protocol_limits(self, protocol: str, per_peer: int, total: int) -> None:
        """Streams of `protocol` are bounded by the service serving it: at most
        `per_peer` per peer and `total` for the node, not counted in the stream scopes
        of `Limits` (a member's 16 downloads must not use up its 8 streams per protocol
        or its 64 per peer and starve its sync), and never reported idle."""
        if per_peer < 1 or total < 1:
            raise UsageError(f"{protocol}: protocol stream limits must be at least 1")
        self._own[protocol] = (per_peer, total)

    def _open_own(self, peer: Peer, protocol: str, per_peer: int, total: int) -> StreamLease:
        if self._streams_per_peer_protocol[(peer, protocol)] >= per_peer:
            raise self._refuse("streams_per_peer_protocol", f"{peer} already has "
                               f"{per_peer} {protocol} streams")
        if self._streams_per_protocol[protocol] >= total:
            raise self._refuse("streams_per_protocol", f"{protocol}: all {total} stream "
                               "slots in use")
        now = self._clock()
        lease = StreamLease(peer, protocol, False, now, now, own=True)
        self._streams[lease.id] = lease
        self._streams_per_protocol[protocol] += 1
        self._streams_per_peer_protocol[(peer, protocol)] += 1
        return lease

    def open_stream(self, peer: Peer, protocol: str) -> StreamLease:
        """Charge an inbound stream; raise LimitExceeded if a scope is full."""
        own = self._own.get(protocol)
        if own is not None:
            return self._open_own(peer, protocol, *own)
        lim = self.limits
        if self._streams_per_peer_protocol[(peer, protocol)] >= lim.streams_per_peer_protocol:
            raise self._refuse("streams_per_peer_protocol", f"{peer} already has "
                               f"{lim.streams_per_peer_protocol} {protocol} streams")
        if self._streams_per_peer[peer] >= lim.streams_per_peer:
            raise self._refuse("streams_per_peer", f"{peer} already has "
                               f"{lim.streams_per_peer} streams")
        used = self._streams_per_protocol[protocol]
        if used >= lim.streams_per_protocol:
            raise self._refuse("streams_per_protocol", f"{protocol}: all "
                               f"{lim.streams_per_protocol} stream slots in use")
        reserved = used >= lim.streams_per_protocol - lim.trusted_reserved_streams
        if reserved and not self.is_trusted(peer):
            raise self._refuse("streams_per_protocol_strangers", f"{protocol}: stream slots "
                               "for unknown peers in use (the rest is reserved for trusted peers)")
        now = self._clock()
        lease = StreamLease(peer, protocol, reserved, now, now)
        self._streams[lease.id] = lease
        self._streams_per_peer[peer] += 1
        self._streams_per_protocol[protocol] += 1
        self._streams_per_peer_protocol[(peer, protocol)] += 1
        return lease

    def try_open_stream(self, peer: Peer, protocol: str) -> StreamLease | None:
        """`open_stream`, returning None (counted in `refused`) instead of raising."""
        try:
            return self.open_stream(peer, protocol)
        except LimitExceeded:
            return None

    def close_stream(self, lease: StreamLease) -> None:
        if lease.released:
            return
        lease.released = True
        del self._streams[lease.id]
        if not lease.own:
            _decrement(self._streams_per_peer, lease.peer)
        _decrement(self._streams_per_protocol, lease.protocol)
        _decrement(self._streams_per_peer_protocol, (lease.peer, lease.protocol))

    def touch_stream(self, lease: StreamLease) -> None:
        """A complete message arrived on the stream: not idle (also touches the peer)."""
        lease.last_used = self._clock()
        self.touch(lease.peer)

    # -- requests in flight

    def start_request(self, peer: Peer, protocol: str) -> RequestLease:
        if self._requests[peer] >= self.limits.requests_per_peer:
            raise self._refuse("requests_per_peer", f"{peer} already has "
                               f"{self.limits.requests_per_peer} requests in flight")
        self._requests[peer] += 1
        self._requests_total += 1
        return RequestLease(peer, protocol)

    def try_start_request(self, peer: Peer, protocol: str) -> RequestLease | None:
        try:
            return self.start_request(peer, protocol)
        except LimitExceeded:
            return None

    def end_request(self, lease: RequestLease) -> None:
        if lease.released:
            return
        lease.released = True
        _decrement(self._requests, lease.peer)
        self._requests_total -= 1

    # -- idleness

    def idle(self) -> IdleReport:
        """Connections and streams to close now for lack of useful traffic.

        Connections: inbound ones of peers that are not trusted, unused for
        `conn_idle_s`, and only while strangers hold at least `idle_pressure`
        of their inbound slots (like go-libp2p's connection manager, which trims
        above a watermark: a quiet network must not churn its links; our own
        dials and trusted peers are kept, the connection caps bound them).
        Streams: any not in `long_lived` with no
        `touch_stream` for `stream_idle_s`. Each is reported once (counted in
        `closed_idle`); the shell closes it and then releases the lease.
        """
        now = self._clock()
        lim = self.limits
        stranger_slots = lim.inbound_max - lim.trusted_reserved
        pressed = self._inbound_strangers >= lim.idle_pressure * stranger_slots
        conns = tuple(
            c for c in self._conns.values()
            if pressed and c.direction is Direction.INBOUND and not self.is_trusted(c.peer)
            and now - c.last_used >= lim.conn_idle_s
        )
        streams = tuple(
            s for s in self._streams.values()
            if not s.own and not s.protocol.startswith(lim.long_lived)
            and now - s.last_used >= lim.stream_idle_s
        )
        # Not reported again until another full timeout.
        for conn in conns:
            conn.last_used = now
        for stream in streams:
            stream.last_used = now
        self.closed_idle += len(conns) + len(streams)
        return IdleReport(conns, streams)

    # -- status

    def status(self) -> dict[str, Any]:
        """Limits, current usage and refusals per scope (JSON-ready)."""
        limits = asdict(self.limits)
        limits["ip_exempt"] = list(self.limits.ip_exempt)
        limits["long_lived"] = list(self.limits.long_lived)
        return {
            "limits": limits,
            "connections": {"inbound": self._inbound, "outbound": self._outbound,
                            "inbound_strangers": self._inbound_strangers,
                            "peers": len(self._conns_by_peer)},
            "streams": len(self._streams),
            "streams_per_protocol": dict(self._streams_per_protocol),
            "protocol_limits": {p: {"per_peer": a, "total": b} for p, (a, b) in self._own.items()},
            "requests_in_flight": self._requests_total,
            "trusted_peers": len(self._bootstrap | set(self._good)),
            "refused": dict(self.refused),
            "refused_total": sum(self.refused.values()),
            "closed_idle": self.closed_idle,
            "evicted": self.evicted,
        }


def _decrement(counter: Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
