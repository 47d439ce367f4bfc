"""The libp2p host boundary: inbound streams, connection admission, the peerstore.

`node/p2p/host.py`'s `open_host` installs one `Guard` per host (`host.guard`); it
applies the pure `node/resources.py` decisions (`host.resources`) to py-libp2p
0.8.1 and works around two upstream behaviours that end the daemon
(docs/libp2p-notes.md, "Host boundary"):

* **Handler exceptions.** Upstream runs every inbound stream handler —
  its own (identify, identify/push, ping, meshsub/floodsub) and ours — inside
  the connection's nursery (network/connection/swarm_connection.py:309 →
  host/basic_host.py:1554), so an exception a handler lets out (e.g.
  protobuf's DecodeError from `Pubsub.continuously_read_stream` on one
  malformed meshsub frame, pubsub/pubsub.py:562) tears down the swarm's
  service manager and with it the host. `Guard.inbound_stream` replaces the
  swarm's stream handler (`Swarm.set_stream_handler`, the hook BasicHost
  itself uses): it negotiates the protocol (multistream-select, bounded),
  charges the stream to the resource manager, and runs the handler inside a
  boundary that logs (rate-limited), counts a fault against the peer and
  resets the stream. Nothing a handler raises reaches upstream.
* **Peerstore eviction.** `PeerStore` caps itself at 1,000 peers and evicts
  entries without addresses first (peer/peerstore.py:201) — our own entry,
  which holds our key pair, has none. Identify (`get_private_key`) and pubsub
  signing then raise `PeerStoreError`. The guard turns upstream's eviction off
  (`max_peers` unbounded), pins our entry (re-adds it if it is ever missing)
  and prunes by its own policy: above `peerstore_max` entries, disconnected
  peers that are not bootstrap peers go, least recently seen first.

Connections are charged in `on_connected` (called by p2p's `_Gate` notifee,
the earliest point that knows the authenticated peer) and closed at once if
the resource manager refuses them. `run()` is the janitor: idle connections
and streams, peerstore pruning.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import INetConn, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.exceptions import BaseLibp2pError
from libp2p.io.exceptions import IOException
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectError
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator

from ..errors import BidmeshError, PeerError
from ..resources import (
    ConnLease,
    Direction,
    LimitExceeded,
    ResourceManager,
    StreamLease,
    subnet_of,
)
from . import _compat
from ._upstream_types import peerstore_of
from .frames import _STREAM_LEASES, reset_quietly

if TYPE_CHECKING:
    from libp2p.abc import IHost

    from ..loopstats import LoopSteps
    from ._upstream_types import SwarmInternals

log = logging.getLogger("node.p2p")


class GuardedHost(Protocol):
    """What the guard uses of its host (host.py's `P2PHost`, which creates the guard):
    declared here so that guard.py does not import host.py back (tests/test_imports.py)."""

    libp2p: IHost
    _swarm: SwarmInternals

    @property
    def peer_id(self) -> ID: ...

    def is_blocked(self, peer_id: ID | str) -> bool: ...

# Multistream-select must finish within this (upstream's default is 5 s too).
NEGOTIATE_TIMEOUT: Final = 5
# The janitor's period: idle expiry is this coarse.
JANITOR_INTERVAL: Final = 1.0
# At most one log line per (kind, protocol, error type) per this many seconds.
LOG_INTERVAL: Final = 10.0
_LOG_KEYS_MAX: Final = 1024
# Errors upstream handlers raise on malformed input (protobuf, varints, multiaddrs,
# peer records): the peer's fault, not a bug of ours.
_MALFORMED: Final = (DecodeError, BaseLibp2pError, ValueError, KeyError, IndexError,
                     TypeError, struct.error, UnicodeDecodeError, OverflowError)
# Pubsub and ping streams stay open without carrying framed messages.
LONG_LIVED_PREFIXES: Final = ("/meshsub/", "/floodsub/", "/ipfs/ping/")

class RateLimitedLog:
    """Log one line per key per `interval` seconds, saying how many were suppressed."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: OrderedDict[tuple[str, ...], tuple[float, int]] = OrderedDict()

    def __call__(self, level: int, key: tuple[str, ...], msg: str, *args: object,
                 exc_info: bool = False) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > _LOG_KEYS_MAX:
            self._last.popitem(last=False)
        if suppressed:
            msg += f" ({suppressed} similar suppressed)"
        log.log(level, msg, *args, exc_info=exc_info)


def conn_remote_ip(conn: INetConn) -> str | None:
    """The remote IP of a connection (None: not an IP transport, or already gone)."""
    try:
        remote = conn.muxed_conn.get_remote_address()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None
    return str(remote[0]) if remote else None


def conn_direction(conn: INetConn) -> Direction:
    # SwarmConn.direction is libp2p.rcmgr.Direction (an IntEnum); unknown counts
    # as inbound, the stricter side.
    name = str(getattr(getattr(conn, "direction", None), "name", "")).lower()
    return Direction.OUTBOUND if name == "outbound" else Direction.INBOUND


class Guard:
    """Applies the resource manager to one host; see the module docstring."""

    def __init__(self, host: GuardedHost, resources: ResourceManager, keypair: KeyPair,
                 *, bootstrap: Iterable[ID] = (), peerstore_max: int = 512) -> None:
        self.host = host
        self.resources = resources
        self.peerstore_max = peerstore_max
        self._keypair = keypair
        self._bootstrap = set(bootstrap)
        resources.set_bootstrap(self._bootstrap)
        self._conns: dict[INetConn, ConnLease] = {}
        self._streams: dict[int, tuple[StreamLease, trio.CancelScope]] = {}
        self._seen: OrderedDict[ID, None] = OrderedDict()  # peerstore LRU, oldest first
        self.faults: Counter[str] = Counter()
        """Inbound-stream failures by reason (status and metrics)."""
        self.fault_listeners: list[Callable[[ID, str], None]] = []
        """Called with (peer, reason) for each fault; the daemon counts them per peer."""
        self.peerstore_pruned = 0
        self.own_entry_restored = 0
        self.handshakes_refused = 0
        """Inbound connections refused by their address limits before the handshake."""
        self.bootstrap_ips: set[str] = set()
        """Addresses of our bootstrap peers: a bootstrap peer skips the address
        limits once known, so its address is not refused before the handshake."""
        self._handshakes_ip: Counter[str] = Counter()  # under way, per remote IP
        self._handshakes_subnet: Counter[str] = Counter()
        self.loop: LoopSteps | None = None
        """Set (with `timed_protocols`) when `[node] loop_stats` is on: inbound
        requests of those protocols record what they waited for (loopstats)."""
        self.timed_protocols: frozenset[str] = frozenset()
        self.leases_reconciled = 0
        self._log = RateLimitedLog()
        # Upstream eviction would remove our own entry first; our
        # prune_peerstore() bounds the store instead.
        _compat.disable_peerstore_eviction(peerstore_of(host.libp2p))

    def set_bootstrap(self, peers: Iterable[ID]) -> None:
        self._bootstrap = set(peers)
        self.resources.set_bootstrap(self._bootstrap)

    # ------------------------------------------------------------- faults

    def fault(self, peer: ID, reason: str) -> None:
        self.faults[reason] += 1
        for fn in self.fault_listeners:
            fn(peer, reason)

    # ------------------------------------------------------------- connections

    def on_connected(self, conn: INetConn) -> bool:
        """Charge a new connection; False if it must be closed (refused)."""
        peer: ID = conn.muxed_conn.peer_id
        self._seen[peer] = None
        self._seen.move_to_end(peer)
        self.ensure_own_entry()
        if len(self._seen) > self.peerstore_max or self._peerstore_size() > self.peerstore_max:
            self.prune_peerstore()
        try:
            self._conns[conn] = self.resources.open_connection(
                peer, conn_remote_ip(conn), conn_direction(conn))
        except LimitExceeded as exc:
            self._log(logging.INFO, ("conn", exc.scope), "refusing a connection from %s: %s",
                      peer, exc)
            return False
        finally:
            self._close_evicted()
        return True

    def _close_evicted(self) -> None:
        """Close the idle strangers the resource manager evicted for a newcomer."""
        evicted = set(map(id, self.resources.take_evicted()))
        if not evicted:
            return
        for conn, held in list(self._conns.items()):
            if id(held) in evicted:
                del self._conns[conn]  # already released by the resource manager
                self._log(logging.INFO, ("evict",), "closing an idle connection from %s to "
                          "admit a newcomer", held.peer)
                self.host._swarm.manager.run_task(_close_conn, conn)

    def admit_handshake(self, ip: str | None) -> Callable[[], None]:
        """Before an inbound handshake (p2p._compat.limit_inbound_handshakes): raise
        LimitExceeded for a connection the address limits would refuse anyway once
        registered, counting the handshakes from its IP and subnet already under way
        (so a crowd from one address costs no noise handshake beyond its share);
        else return the release to call when the handshake ends."""
        subnet = ""
        if ip is not None:
            try:
                subnet = subnet_of(ip, self.resources.limits.ipv6_prefix)
            except ValueError:
                ip = None  # not an IP transport: not counted per address
        key = ip or ""
        refusal = None if ip in self.bootstrap_ips else self.resources.address_refusal(
            ip, self._handshakes_ip[key], self._handshakes_subnet[subnet])
        if refusal is not None:
            self.handshakes_refused += 1
            self._log(logging.INFO, ("handshake", refusal.scope),
                      "refusing a connection from %s before its handshake: %s", ip, refusal)
            raise refusal
        self._handshakes_ip[key] += 1
        self._handshakes_subnet[subnet] += 1

        def release() -> None:
            for counter, k in ((self._handshakes_ip, key), (self._handshakes_subnet, subnet)):
                counter[k] -= 1
                if counter[k] <= 0:
                    del counter[k]

        return release

    def on_disconnected(self, conn: INetConn) -> None:
        self._release(conn)

    def _release(self, conn: INetConn) -> None:
        lease = self._conns.pop(conn, None)
        if lease is not None:
            self.resources.close_connection(lease)
            peer: ID = conn.muxed_conn.peer_id
            self._seen[peer] = None
            self._seen.move_to_end(peer)

    # ------------------------------------------------------------- inbound streams

    async def inbound_stream(self, stream: INetStream) -> None:
        """The swarm's stream handler: negotiate, charge, run the handler in a boundary."""
        if self.loop is None:
            await self._inbound_stream(stream)
            return
        token = self.loop.start_request()
        try:
            await self._inbound_stream(stream)
        finally:
            self.loop.end_request(token, str(stream.get_protocol()) in self.timed_protocols)

    async def _inbound_stream(self, stream: INetStream) -> None:
        peer: ID = stream.muxed_conn.peer_id
        if self.host.is_blocked(peer):
            await reset_quietly(stream)
            return
        try:
            protocol, handler = await self.host.libp2p.get_mux().negotiate(
                MultiselectCommunicator(stream), NEGOTIATE_TIMEOUT)
        except (MultiselectError, IOException, OSError, trio.TooSlowError) as exc:
            # Unsupported protocols and slow or broken negotiations: not a fault.
            log.debug("stream negotiation with %s failed: %r", peer, exc)
            await reset_quietly(stream)
            return
        except _MALFORMED as exc:
            self._log(logging.INFO, ("negotiate", type(exc).__name__),
                      "malformed multistream negotiation from %s: %r", peer, exc)
            self.fault(peer, "malformed_negotiation")
            await reset_quietly(stream)
            return
        if protocol is None or handler is None:
            await reset_quietly(stream)
            return
        try:
            lease = self.resources.open_stream(peer, str(protocol))
        except LimitExceeded as exc:
            self._log(logging.INFO, ("stream", exc.scope, str(protocol)),
                      "refusing a %s stream from %s: %s", protocol, peer, exc)
            self.fault(peer, exc.reason)
            await reset_quietly(stream)
            return
        stream.set_protocol(protocol)
        _STREAM_LEASES[stream] = (self.resources, lease)
        try:
            # The janitor cancels this scope when the stream is idle: resetting
            # alone does not wake a handler blocked in a read.
            with trio.CancelScope() as scope:
                self._streams[lease.id] = (lease, scope)
                await handler(stream)
        except PeerError as exc:
            self._log(logging.INFO, ("peer", str(protocol), exc.reason),
                      "%s from %s: invalid input (%s): %s", protocol, peer, exc.reason, exc)
            self.fault(peer, exc.reason)
            await reset_quietly(stream)
        except BidmeshError as exc:
            self._log(logging.INFO, ("ours", str(protocol), type(exc).__name__),
                      "%s from %s failed: %s", protocol, peer, exc)
            await reset_quietly(stream)
        except (IOException, OSError) as exc:  # the connection went away under the handler
            log.debug("%s stream from %s broke: %r", protocol, peer, exc)
            await reset_quietly(stream)
        except _MALFORMED as exc:
            self._log(logging.WARNING, ("malformed", str(protocol), type(exc).__name__),
                      "%s handler rejected input from %s: %r", protocol, peer, exc)
            self.fault(peer, "malformed")
            await reset_quietly(stream)
        except Exception as exc:
            # The outermost boundary of every inbound stream, upstream's handlers
            # included: whatever else escapes one (their error types are not a
            # closed set) would end the host, so it is logged with its traceback,
            # counted, and the stream reset.
            self._log(logging.ERROR, ("bug", str(protocol), type(exc).__name__),
                      "%s handler failed on a stream from %s", protocol, peer, exc_info=True)
            self.fault(peer, "handler_error")
            await reset_quietly(stream)
        except BaseException:  # cancellation: still tell the peer, then propagate
            await reset_quietly(stream)
            raise
        finally:
            self._streams.pop(lease.id, None)
            _STREAM_LEASES.pop(stream, None)
            self.resources.close_stream(lease)

    # ------------------------------------------------------------- peerstore

    def _peerstore_size(self) -> int:
        return len(peerstore_of(self.host.libp2p).peer_data_map)

    def ensure_own_entry(self) -> None:
        """Our key pair in the peerstore is what identify and pubsub sign with."""
        peerstore = peerstore_of(self.host.libp2p)
        own = self.host.peer_id
        if own not in peerstore.peer_data_map:
            peerstore.add_key_pair(own, self._keypair)
            self.own_entry_restored += 1
            log.warning("our own peerstore entry was missing; restored it")

    def prune_peerstore(self) -> int:
        """Drop disconnected non-bootstrap peers, least recently seen first, down to
        `peerstore_max`; our own entry is never dropped. Returns how many went."""
        peerstore = peerstore_of(self.host.libp2p)
        entries = peerstore.peer_data_map
        own = self.host.peer_id
        connected = set(self.host._swarm.connections)
        keep = {own} | self._bootstrap | connected
        excess = len(entries) - self.peerstore_max
        dropped = 0
        if excess > 0:
            # Unknown to our LRU (added by upstream without a connection) go first.
            order = [p for p in entries if p not in self._seen] + list(self._seen)
            for peer in order:
                if dropped >= excess:
                    break
                if peer in keep or peer not in entries:
                    continue
                _compat.drop_peer(peerstore, peer)
                dropped += 1
        identified = _compat.identified_peers(self.host.libp2p)
        for peer in [p for p in identified if p not in entries]:
            del identified[peer]  # upstream pops these only on its own disconnect path
        for peer in [p for p in self._seen if p not in entries and p not in connected]:
            del self._seen[peer]
        self.peerstore_pruned += dropped
        self.ensure_own_entry()
        return dropped

    # ------------------------------------------------------------- janitor

    def close_idle(self) -> None:
        self._close_evicted()
        report = self.resources.idle()
        for stream_lease in report.streams:
            entry = self._streams.get(stream_lease.id)
            if entry is not None:
                log.debug("resetting an idle %s stream from %s", stream_lease.protocol,
                          stream_lease.peer)
                entry[1].cancel()  # the boundary resets the stream and releases the lease
        for lease in report.conns:
            for conn, held in list(self._conns.items()):
                if held is lease:
                    log.info("closing an idle connection from %s", lease.peer)
                    self.host._swarm.manager.run_task(_close_conn, conn)

    def reconcile(self) -> int:
        """Release leases of connections that closed without a `disconnected`
        notification (a missed one would hold a slot for ever); returns how many."""
        live = {id(c) for conns in self.host._swarm.connections.values() for c in conns}
        stale = [c for c in self._conns if getattr(c, "is_closed", False) and id(c) not in live]
        for conn in stale:
            self._release(conn)
        self.leases_reconciled += len(stale)
        return len(stale)

    async def run(self) -> None:
        while True:
            await trio.sleep(JANITOR_INTERVAL)
            self.reconcile()
            self.close_idle()
            if self._peerstore_size() > self.peerstore_max:
                self.prune_peerstore()
            else:
                self.ensure_own_entry()

    def status(self) -> dict[str, Any]:
        return {
            **self.resources.status(),
            "stream_faults": dict(self.faults),
            "peerstore": {"size": self._peerstore_size(), "max": self.peerstore_max,
                          "pruned": self.peerstore_pruned,
                          "own_entry_restored": self.own_entry_restored},
            "leases_reconciled": self.leases_reconciled,
            "handshakes_refused": self.handshakes_refused,
        }


async def _close_conn(conn: INetConn) -> None:
    with trio.move_on_after(5.0):
        try:
            await conn.close()
        except (IOException, OSError) as exc:
            log.debug("closing a connection failed (already gone): %r", exc)
