"""The libp2p host: TCP + noise + yamux, connection gating, stream handlers.

    async with open_host(seed) as host:          # Ed25519 identity from the 32-byte seed
        peer = await host.connect("/ip4/…/tcp/…/p2p/12D3…")
        host.block(peer, 60)                      # close + refuse inbound for 60 s
        set_stream_handler(host, "/bidmesh/x/1", handler)   # exceptions reset the stream
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP

from ..errors import BidmeshError, OperationError, PeerError, StreamTimeout, UsageError
from ..resources import Direction, Limits, ResourceManager
from . import _compat
from ._compat import BAD_ADDRESS, UPSTREAM_FAILURES
from ._upstream_types import swarm_of
from .addrs import AddrPolicy
from .frames import close_quietly, reset_quietly
from .guard import LONG_LIVED_PREFIXES, Guard, conn_direction, conn_remote_ip
from .ids import _keypair_from_seed, parse_peer_id, remote_peer_id

log = logging.getLogger("node.p2p")

DEFAULT_LISTEN: Final[tuple[str, ...]] = ("/ip4/127.0.0.1/tcp/0",)
# Bounded shutdown: closing connections costs ~100 ms each upstream
# (SwarmConn._cleanup sleeps), so a few seconds covers a busy node.
SHUTDOWN_TIMEOUT: Final = 5.0
BLOCKED_MAX: Final = 4096  # blocked peers remembered (`P2PHost.block`)

StreamHandler = Callable[[INetStream], Awaitable[None]]


class _Gate(INotifee):
    """Closes connections of blocked peers as soon as the swarm registers them.

    py-libp2p 0.8.1 has no per-peer connection gater (ConnectionGate is IP-only,
    network/connection_gate.py); `Swarm.add_conn` calls `notify_connected` after
    registering every inbound and outbound connection (network/swarm.py:2702), so
    a notifee is the earliest point that knows the authenticated peer id.
    """

    def __init__(self, owner: P2PHost) -> None:
        self._owner = owner

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer: ID = conn.muxed_conn.peer_id
        if self._owner.is_blocked(peer):
            log.info("refusing connection from blocked peer %s", peer)
            refuse = True
        else:
            # The resource manager's admission (node/resources.py via the guard).
            refuse = not self._owner.guard.on_connected(conn)
        if refuse:
            with trio.move_on_after(SHUTDOWN_TIMEOUT):
                await conn.close()
        else:
            self._owner._connections_changed()
            await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._owner.guard.on_disconnected(conn)
        self._owner._connections_changed()
        await trio.lowlevel.checkpoint()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()


class P2PHost:
    """A running libp2p host (TCP + noise + yamux). Create it with `open_host`."""

    def __init__(self, libp2p_host: IHost, keypair: KeyPair, limits: Limits,
                 bootstrap: Sequence[ID] = (), peerstore_max: int = 512) -> None:
        self.libp2p: IHost = libp2p_host
        """The underlying py-libp2p host, for the few things this class does not wrap."""
        self.pubkey: bytes = keypair.public_key.to_bytes()
        """This node's raw 32-byte Ed25519 public key."""
        self.max_connections = limits.max_connections
        self._blocked: dict[ID, float] = {}
        self._swarm = swarm_of(libp2p_host)
        self.resources = ResourceManager(limits, trio.current_time)
        """Connection, stream and request limits (node/resources.py); charge requests
        in flight with `host.resources.try_start_request(peer, protocol)`."""
        self.guard = Guard(self, self.resources, keypair, bootstrap=bootstrap,
                           peerstore_max=peerstore_max)
        """Inbound stream boundary, connection admission, peerstore (node/p2p/guard.py)."""
        self._connections_event = trio.Event()

    def connections_event(self) -> trio.Event:
        """An event set at the next connection admitted or closed: take it, read
        `connected_peers()`, then wait on it (no change is missed in between)."""
        return self._connections_event

    def _connections_changed(self) -> None:
        event, self._connections_event = self._connections_event, trio.Event()
        event.set()

    # -- identity and addresses

    @property
    def peer_id(self) -> ID:
        """This node's peer id (derived from `pubkey`)."""
        peer: ID = self.libp2p.get_id()
        return peer

    @property
    def addrs(self) -> list[str]:
        """Advertised multiaddrs with the `/p2p/<peer id>` suffix, ready for `connect`:
        unspecified listen addresses expanded to the interface addresses, or
        `p2p.announce` (node/addrs.py)."""
        return [str(a) for a in self.libp2p.get_addrs()]

    @property
    def listen_addrs(self) -> list[str]:
        """The bound listen multiaddrs (0.0.0.0 stays 0.0.0.0) with `/p2p/<peer id>`."""
        suffix = f"/p2p/{self.peer_id}"
        return [f"{a}{suffix}" for a in self.bound_addrs]

    @property
    def bound_addrs(self) -> list[str]:
        """The bound listen multiaddrs, without the `/p2p/<peer id>` suffix (upstream
        carries on when some of its listen addresses fail to bind)."""
        return [str(a) for a in self.libp2p.get_transport_addrs()]

    # -- connections

    def connected_peers(self) -> list[ID]:
        """Peers with at least one open connection (blocked peers excluded)."""
        return [p for p in list(self._swarm.connections) if self.is_connected(p)]

    def is_connected(self, peer_id: ID | str) -> bool:
        """Whether a usable connection exists (closing ones and blocked peers don't count)."""
        peer = parse_peer_id(peer_id)
        # Upstream keeps a connection registered while it closes (~200 ms of
        # sleeps in yamux close and SwarmConn._cleanup), so check is_closed.
        conns = self._swarm.connections.get(peer, [])
        return any(not c.is_closed for c in conns) and not self.is_blocked(peer)

    def remote_ip(self, peer_id: ID | str) -> str | None:
        """The IP address of an open connection to the peer (None: none, or not IP)."""
        for conn in self._swarm.connections.get(parse_peer_id(peer_id), []):
            ip = conn_remote_ip(conn)
            if ip is not None:
                return ip
        return None

    async def connect(self, maddr: str, timeout: float = 10.0) -> ID:
        """Dial a full multiaddr (with /p2p/...) unless already connected; return its peer id.

        Connections are kept: open streams on them instead of dialing per request.
        Raises UsageError for a malformed address, OperationError if the dial fails
        or the peer is blocked or the connection cap refused it, StreamTimeout on timeout.
        """
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
        except BAD_ADDRESS as exc:  # multiaddr raises several unrelated types
            raise UsageError(f"not a dialable multiaddr with /p2p/<peer id>: {maddr!r}") from exc
        peer: ID = info.peer_id
        if peer == self.peer_id:
            raise UsageError(f"refusing to dial ourselves ({maddr})")
        if self.is_blocked(peer):
            raise OperationError(f"peer {peer} is blocked; unblock() it before dialing")
        if self.is_connected(peer):
            return peer
        # Upstream keeps a 60 s negative cache of peers whose dial failed
        # (network/swarm.py:109, checked in dial_peer); an explicit connect should dial.
        self._swarm.unblock_peer(peer)
        try:
            with trio.fail_after(timeout):
                await self.libp2p.connect(info)
        except trio.TooSlowError:
            raise StreamTimeout(f"dialing {maddr} took longer than {timeout} s") from None
        except UPSTREAM_FAILURES as exc:  # SwarmException and friends: map at the edge
            raise OperationError(f"could not connect to {maddr}: {exc}") from exc
        if not self.is_connected(peer):
            raise OperationError(
                f"connection to {peer} was closed right after the dial "
                "(connection cap reached on either side, or the peer refused us)"
            )
        return peer

    async def disconnect(self, peer_id: ID | str) -> None:
        """Close every connection to the peer (no-op if none)."""
        peer = parse_peer_id(peer_id)
        with trio.move_on_after(SHUTDOWN_TIMEOUT):
            await self.libp2p.disconnect(peer)

    def block(self, peer_id: ID | str, seconds: float) -> None:
        """Refuse the peer for `seconds`: close its connections, refuse new ones.

        Synchronous: the connections are closed in the background. Inbound
        connections from the peer are closed as soon as they register, its
        streams are reset by handlers set through `set_stream_handler`, and
        `connect` to it raises OperationError.
        """
        if seconds <= 0:
            raise UsageError("block() needs a positive number of seconds")
        peer = parse_peer_id(peer_id)
        now = trio.current_time()
        self._blocked[peer] = now + seconds
        if len(self._blocked) > BLOCKED_MAX:
            # Rotating identities cut off one after another: expired entries go, then
            # the oldest blocks (an entry is otherwise dropped only when looked up).
            for p in [p for p, until in self._blocked.items() if until <= now]:
                del self._blocked[p]
            for p in list(self._blocked)[:len(self._blocked) - BLOCKED_MAX]:
                del self._blocked[p]
        if self._swarm.connections.get(peer):
            self._swarm.manager.run_task(self.disconnect, peer)

    def unblock(self, peer_id: ID | str) -> None:
        self._blocked.pop(parse_peer_id(peer_id), None)

    def identified(self, peer_id: ID | str) -> bool:
        """Whether identify finished on the peer's current connection (BasicHost's
        `_identified_peers`; it skips identify when the peerstore still holds the
        peer's protocols from an earlier connection: see `peer_protocols`)."""
        return parse_peer_id(peer_id) in _compat.identified_peers(self.libp2p)

    def peer_protocols(self, peer_id: ID | str) -> list[str]:
        """The protocols identify reported for the peer; [] when never identified or
        pruned from the peerstore."""
        try:
            return list(self.libp2p.get_peerstore().get_protocols(parse_peer_id(peer_id)))
        except PeerStoreError:
            return []

    def dialed(self, peer_id: ID | str) -> bool:
        """Whether we hold a connection we opened to the peer (outbound)."""
        conns = self._swarm.connections.get(parse_peer_id(peer_id), [])
        return any(conn_direction(c) is Direction.OUTBOUND for c in conns)

    def is_blocked(self, peer_id: ID | str) -> bool:
        peer = parse_peer_id(peer_id)
        until = self._blocked.get(peer)
        if until is None:
            return False
        if trio.current_time() >= until:
            del self._blocked[peer]
            return False
        return True

    # -- streams

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """See module-level `set_stream_handler`."""
        set_stream_handler(self, protocol, handler)

    async def new_stream(
        self, peer_id: ID | str, protocol: str, timeout: float = 10.0
    ) -> INetStream:
        """Open a stream to a peer (dialing known addresses if not connected).

        The caller owns the stream: close it when done, reset it on error.
        """
        peer = parse_peer_id(peer_id)
        if self.is_blocked(peer):
            raise OperationError(f"peer {peer} is blocked")
        try:
            with trio.fail_after(timeout):
                stream: INetStream = await self.libp2p.new_stream(peer, [TProtocol(protocol)])
        except trio.TooSlowError:
            raise StreamTimeout(
                f"opening {protocol} to {peer} took longer than {timeout} s"
            ) from None
        except UPSTREAM_FAILURES as exc:  # StreamFailure, SwarmException: map at the edge
            raise OperationError(f"could not open {protocol} to {peer}: {_why(exc)}") from exc
        return stream


def _why(exc: BaseException) -> str:
    """`exc`'s message with its innermost cause's first line: upstream's StreamFailure
    says only "failed to open a stream to peer X" (basic_host.py `new_stream`), which
    hides whether the peer lacks the protocol or the connection broke."""
    root, depth = exc, 0
    while root.__cause__ is not None and depth < 8:
        root, depth = root.__cause__, depth + 1
    if root is exc:
        return str(exc)
    detail = (str(root).strip().splitlines() or [type(root).__name__])[0][:200]
    return f"{exc} ({detail})"


def _build_libp2p_host(
    keypair: KeyPair, listen: Sequence[multiaddr.Multiaddr], max_connections: int,
    addr_policy: AddrPolicy | None = None,
) -> IHost:
    # Our resource manager decides admission (at the _Gate notifee); upstream's
    # cap only backstops it, with room for refused connections still closing.
    max_connections = 2 * max_connections + 8
    config = ConnectionConfig(
        max_connections=max_connections,
        # min/low = 0 and high = max: the auto-connector has no floor to defend
        # and the pruner never runs below the hard cap (network/config.py:140).
        min_connections=0,
        low_watermark=0,
        high_watermark=max_connections,
        # One connection per peer. Besides being what we want, this is what
        # makes dial_peer return at once: with a per-peer limit above 1 it waits
        # the 250 ms happy-eyeballs delay after the last address
        # (network/swarm.py:936, cancel at :917).
        max_connections_per_peer=1,
    )
    host: IHost = new_host(
        key_pair=keypair,
        # Noise only (new_host's default also offers TLS, secio and plaintext).
        sec_opt={
            NOISE_PROTOCOL_ID: NoiseTransport(keypair, noise_privkey=x25519_key_pair().private_key)
        },
        # Yamux only (the default adds mplex as a fallback).
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        # Explicit transport list: TCP only, never QUIC/WebSocket.
        transports=[TCP()],
        listen_addrs=list(listen),
        connection_config=config,
        addrs_factory=addr_policy or AddrPolicy(),
    )
    swarm = swarm_of(host)
    _compat.unbound_inbound_limiter(swarm)
    return host


def default_limits(max_connections: int) -> Limits:
    """`Limits` for a host of `max_connections` with reserves scaled to it."""
    if max_connections < 1:
        raise UsageError("max_connections must be at least 1")
    return Limits(max_connections=max_connections,
                  outbound_reserved=min(16, max_connections // 4),
                  trusted_reserved=min(8, max_connections // 8),
                  long_lived=LONG_LIVED_PREFIXES)


@asynccontextmanager
async def open_host(
    seed: bytes,
    listen: Sequence[str] = DEFAULT_LISTEN,
    *,
    max_connections: int = 64,
    limits: Limits | None = None,
    bootstrap: Sequence[str] = (),
    peerstore_max: int = 512,
    announce: Sequence[str] = (),
    announce_append: Sequence[str] = (),
) -> AsyncIterator[P2PHost]:
    """Run a libp2p host whose identity is the Ed25519 key of `seed` (32 bytes).

    Listens on `listen` (default loopback, ephemeral port). Connections,
    streams and requests are admitted by `host.resources` under `limits`
    (default: `default_limits(max_connections)`); a refused connection is
    closed at registration, a refused stream reset. `bootstrap` multiaddrs (or
    peer ids) name the peers that get reserved slots and are never pruned from
    the peerstore, which holds at most about `peerstore_max` peers. Peers are
    told `announce` (else the listen addresses, unspecified ones expanded) plus
    `announce_append` (node/p2p/addrs.py). Every inbound stream runs inside
    `host.guard`'s boundary: no handler exception ends the host. On exit every
    connection and listener is closed within a bounded time, even when the block
    is cancelled.
    """
    if limits is None:
        limits = default_limits(max_connections)
    if not limits.long_lived:
        limits = dataclasses.replace(limits, long_lived=LONG_LIVED_PREFIXES)
    boot_ids = [parse_peer_id(b.rsplit("/p2p/", 1)[-1]) for b in bootstrap]
    boot_ips = {ip for b in bootstrap if (ip := _ip_of(b)) is not None}
    keypair = _keypair_from_seed(seed)
    try:
        maddrs = [multiaddr.Multiaddr(a) for a in listen]
    except BAD_ADDRESS as exc:
        raise UsageError(f"bad listen multiaddr in {list(listen)!r}: {exc}") from exc
    if not maddrs:
        raise UsageError("open_host needs at least one listen address")
    _compat.install()
    host = _build_libp2p_host(keypair, maddrs, limits.max_connections,
                              AddrPolicy(announce, announce_append))
    node = P2PHost(host, keypair, limits, boot_ids, peerstore_max)
    swarm = node._swarm
    # Address limits before any handshake work, then a few set-ups at a time.
    node.guard.bootstrap_ips = boot_ips
    _compat.limit_inbound_handshakes(swarm, admit=node.guard.admit_handshake)
    swarm.register_notifee(_Gate(node))
    _compat.route_inbound_streams(swarm, node.guard.inbound_stream)
    async with host.run(maddrs):
        try:
            # The auto-connector would re-dial any peer in the peerstore
            # (network/auto_connector.py:262), including blocked ones; peer
            # selection belongs to node/gossip.py, so turn it off.
            await swarm.auto_connector.stop()
            if not swarm.listeners:
                # BasicHost.run ignores Swarm.listen()'s False (host/basic_host.py:591).
                raise UsageError(f"could not listen on any of {list(listen)}")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.guard.run)
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_TIMEOUT):
                # Close connections before the service manager is torn down;
                # otherwise sockets leak (ResourceWarning) on the cancel path.
                await swarm.close()


def _ip_of(addr: str) -> str | None:
    """The /ip4 or /ip6 address of a multiaddr string, None without one (a peer id
    alone, /dns...)."""
    parts = addr.split("/")
    for proto in ("ip4", "ip6"):
        if proto in parts and parts.index(proto) + 1 < len(parts):
            return parts[parts.index(proto) + 1]
    return None


def set_stream_handler(host: P2PHost, protocol_id: str, handler: StreamHandler) -> None:
    """Serve `protocol_id` with `handler(stream)`, wrapped so every path ends the stream.

    Upstream (0.8.1) neither closes a stream when the handler returns nor resets
    it when the handler raises (host/basic_host.py:1554 just awaits it), so the
    remote would hang. The wrapper resets the stream if the handler raises
    (PeerError is logged at info with its reason, anything else with a
    traceback) and closes it if the handler returns; handlers may also close or
    reset themselves. Streams from blocked peers are reset before the handler runs.
    """

    async def wrapped(stream: INetStream) -> None:
        peer = remote_peer_id(stream)
        if host.is_blocked(peer):
            await reset_quietly(stream)
            return
        try:
            await handler(stream)
        except PeerError as exc:
            log.info("%s from %s: invalid input (%s): %s", protocol_id, peer, exc.reason, exc)
            await reset_quietly(stream)
        except BidmeshError as exc:
            log.info("%s from %s failed: %s", protocol_id, peer, exc)
            await reset_quietly(stream)
        except Exception:  # a handler bug: logged, and the peer gets a reset, not a hang
            log.exception("%s handler failed on a stream from %s", protocol_id, peer)
            await reset_quietly(stream)
        except BaseException:  # cancellation: still tell the peer, then propagate
            await reset_quietly(stream)
            raise
        else:
            await close_quietly(stream)

    host.libp2p.set_stream_handler(TProtocol(protocol_id), wrapped)

