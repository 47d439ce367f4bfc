"""libp2p plumbing for bidmesh: host, framed streams, request/response, gossipsub.

Everything that touches py-libp2p 0.8.1 directly lives here, so that
`node/gossip.py`, `node/dataplane/` and `node/client.py` build on a small API
and the upstream pitfalls are worked around once. `docs/libp2p-notes.md` has the
background (file:line references into the installed libp2p).

Host::

    async with open_host(seed) as host:          # Ed25519 identity from the 32-byte seed
        peer = await host.connect("/ip4/…/tcp/…/p2p/12D3…")
        host.block(peer, 60)                      # close + refuse inbound for 60 s

Streams (u32 big-endian length prefix; every read bounded)::

    set_stream_handler(host, "/bidmesh/x/1", handler)   # exceptions reset the stream
    stream = await host.new_stream(peer, "/bidmesh/x/1")
    await write_frame(stream, b"…"); data = await read_frame(stream, 1 << 20, 10.0)

Request/response (one stream per request over the kept connection)::

    serve_requests(host, "/bidmesh/sync/1", handler, max_request=1 << 20)
    reply = await request(host, peer, "/bidmesh/sync/1", b"…", max_response=1 << 20, timeout=10)

Gossipsub::

    async with make_pubsub(host) as ps:
        topic = ps.topic("bidmesh/net-1")
        topic.set_validator(lambda forwarder, data: True)
        async with await topic.subscribe() as sub:
            async for origin_pubkey, data in sub: ...
        await topic.publish(b"…")                # waits while receivers' queues are full

Errors are those of `node.errors`: bad peer input raises `InvalidMessage`, misuse
raises `UsageError`, failures raise `OperationError` (timeouts: `StreamTimeout`;
the remote refused or reset: `RemoteError`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import struct
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair as ed25519_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.x25519 import create_new_key_pair as x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IOException
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub import gossipsub as _gossipsub_module
from libp2p.pubsub import pubsub as _pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import DefaultMaxMessageSize, OutBoundQueueSize
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.tcp.tcp import TCP

from .errors import BidmeshError, InvalidMessage, OperationError, PeerError, RemoteError, UsageError
from .p2p_addrs import AddrPolicy
from .p2p_guard import LONG_LIVED_PREFIXES, Guard, limit_inbound_handshakes, touch_stream
from .resources import Limits, ResourceManager

__all__ = [
    "DEFAULT_LISTEN",
    "P2PHost",
    "PeerId",
    "PubSub",
    "RequestRefused",
    "StreamTimeout",
    "Subscription",
    "Topic",
    "make_pubsub",
    "open_host",
    "parse_peer_id",
    "peer_id_from_pubkey",
    "pubkey_from_peer_id",
    "read_frame",
    "remote_peer_id",
    "remote_pubkey",
    "request",
    "serve_requests",
    "set_stream_handler",
    "write_frame",
]

log = logging.getLogger(__name__)


async def _window_update_at_half(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """Send a WINDOW_UPDATE only once half the receive window is consumed.

    Upstream's `YamuxStream._auto_tune_and_send_window_update`
    (stream_muxer/yamux/yamux.py:410) sends one after nearly every read that
    returns data (its "partial slack" and release-on-read branches), and
    pubsub reads each RPC in two or three reads: half of all frames on a
    gossip connection were window updates, each encrypted, sent and parsed.
    go-yamux (and the yamux spec) release credit in half-window steps; this
    keeps upstream's window growth and auto-tuning without the per-read
    updates. `open_host` installs it in place of upstream's method.

    Credit is also returned at once while the sender is nearly out of it (under an
    eighth of the window left): upstream's sender gives up a write after 5 s at a
    zero window (`YamuxStream.write`, yamux.py:280, "Timed out waiting for window
    update"), and a reader slower than half a window per 5 s (a provider enforcing a
    lease's max rate below ~200 kbit/s, ~400 kbit/s once auto-tuning doubled the
    window) would otherwise let every write to it fail.
    """
    total = 0
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta > 0 and delta >= self._grow_threshold():
            total = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        elif delta > 0 and self.recv_window < self.target_recv_window // 8:
            total = self._grow_to_delta(buffered)  # a slow reader: no window growth
            self._pending_recv_release = 0
    if total > 0:
        await self.send_window_update(total, skip_lock=True)


PeerId = ID
"""The libp2p peer id type (`libp2p.peer.id.ID`); `str(peer_id)` is its base58 form."""

DEFAULT_LISTEN: Final[tuple[str, ...]] = ("/ip4/127.0.0.1/tcp/0",)
FRAME_HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = (1 << 32) - 1
# Bounded shutdown: closing connections costs ~100 ms each upstream
# (SwarmConn._cleanup sleeps), so a few seconds covers a busy node.
SHUTDOWN_TIMEOUT: Final = 5.0
# How long write_frame waits, after resetting a timed-out stream, for the write
# to give up before cancelling it outright.
WRITE_ABORT_GRACE: Final = 5.0
# Bytes per stream write: noise's largest plaintext (65535 - 16-byte tag) minus yamux's
# 12-byte header. Yamux cuts writes into frames of up to 65524 payload bytes
# (stream_muxer/yamux/yamux.py:245) and noise encrypts at most 65519 per message
# (security/noise/io.py:27), so a full yamux frame left as two noise messages
# (65519 + 17 bytes: two AEAD calls and sends each way); 65507-byte writes make every
# yamux frame exactly one. Measured on a two-process stream: -30 % sender CPU.
WRITE_PIECE: Final = 65535 - 16 - 12

StreamHandler = Callable[[INetStream], Awaitable[None]]
RequestHandler = Callable[[bytes, bytes], Awaitable[bytes]]
Validator = Callable[[ID, bytes], bool]


class StreamTimeout(OperationError):
    """A network operation (dial, stream open, read, write, request) ran out of time."""


class RequestRefused(RemoteError):
    """The remote request handler answered with an error; `reason` is its short code."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- identity


def _keypair_from_seed(seed: bytes) -> KeyPair:
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise UsageError("the node key seed must be exactly 32 bytes (an Ed25519 seed)")
    return ed25519_key_pair(seed)


def peer_id_from_pubkey(pub32: bytes) -> ID:
    """The libp2p peer id of a raw 32-byte Ed25519 public key (identity multihash)."""
    if not isinstance(pub32, bytes) or len(pub32) != 32:
        raise UsageError("an Ed25519 public key is exactly 32 bytes")
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(pub32))


def parse_peer_id(value: ID | str | bytes) -> ID:
    """Accept an `ID`, its base58 string or its raw bytes; raise InvalidMessage if unusable."""
    if isinstance(value, ID):
        return value
    if isinstance(value, bytes):
        return ID(value)
    try:
        return ID.from_base58(value)
    except ValueError as exc:
        raise InvalidMessage(f"not a peer id: {value!r}", "bad_peer_id") from exc


def pubkey_from_peer_id(peer_id: ID | str | bytes) -> bytes:
    """The raw 32-byte Ed25519 public key inside a peer id; InvalidMessage if it has none."""
    pid = parse_peer_id(peer_id)
    key = pid.extract_public_key()
    if key is None or key.get_type() != KeyType.Ed25519:
        raise InvalidMessage(f"peer id {pid} does not embed an Ed25519 key", "bad_peer_id")
    raw = key.to_bytes()
    if len(raw) != 32:
        raise InvalidMessage(f"peer id {pid} embeds a malformed key", "bad_peer_id")
    return raw


def remote_peer_id(stream: INetStream) -> ID:
    """The authenticated (noise handshake) peer id at the other end of a stream."""
    peer: ID = stream.muxed_conn.peer_id
    return peer


def remote_pubkey(stream: INetStream) -> bytes:
    """The remote peer's raw 32-byte Ed25519 public key (authenticated by noise)."""
    return pubkey_from_peer_id(remote_peer_id(stream))


# --------------------------------------------------------------------------- host


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
            await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._owner.guard.on_disconnected(conn)
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
        self._swarm: Any = libp2p_host.get_network()  # the concrete Swarm (private knobs)
        self.resources = ResourceManager(limits, trio.current_time)
        """Connection, stream and request limits (node/resources.py); charge requests
        in flight with `host.resources.try_start_request(peer, protocol)`."""
        self.guard = Guard(self, self.resources, keypair, bootstrap=bootstrap,
                           peerstore_max=peerstore_max)
        """Inbound stream boundary, connection admission, peerstore (node/p2p_guard.py)."""

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
        return [f"{a}{suffix}" for a in self.libp2p.get_transport_addrs()]

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
            try:
                remote = conn.muxed_conn.get_remote_address()
            except (AttributeError, OSError):
                continue
            if remote:
                return str(remote[0])
        return None

    async def connect(self, maddr: str, timeout: float = 10.0) -> ID:
        """Dial a full multiaddr (with /p2p/...) unless already connected; return its peer id.

        Connections are kept: open streams on them instead of dialing per request.
        Raises UsageError for a malformed address, OperationError if the dial fails
        or the peer is blocked or the connection cap refused it, StreamTimeout on timeout.
        """
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
        except Exception as exc:  # multiaddr raises several unrelated types
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
        except Exception as exc:  # SwarmException and friends: map at the edge
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
        self._blocked[peer] = trio.current_time() + seconds
        if self._swarm.connections.get(peer):
            self._swarm.manager.run_task(self.disconnect, peer)

    def unblock(self, peer_id: ID | str) -> None:
        self._blocked.pop(parse_peer_id(peer_id), None)

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
        except Exception as exc:  # StreamFailure, SwarmException: map at the edge
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
    swarm: Any = host.get_network()
    # Upstream bug: the inbound handler holds its `_inbound_limiter` slot until
    # the *swarm* stops, not until the connection closes (network/swarm.py:1982
    # acquires, :2060 waits for manager.wait_finished()), so after
    # max_connections - min_connections inbound connections in the node's
    # lifetime every new inbound connection is refused. Replace the limiter by
    # an unbounded one; the real cap is enforced at registration (add_conn,
    # network/swarm.py:2678) which counts live connections only.
    swarm._inbound_limiter = trio.CapacityLimiter(math.inf)
    limit_inbound_handshakes(swarm)
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
    `announce_append` (node/p2p_addrs.py). Every inbound stream runs inside
    `host.guard`'s boundary: no handler exception ends the host. On exit every
    connection and listener is closed within a bounded time, even when the block
    is cancelled.
    """
    if limits is None:
        limits = default_limits(max_connections)
    if not limits.long_lived:
        limits = dataclasses.replace(limits, long_lived=LONG_LIVED_PREFIXES)
    boot_ids = [parse_peer_id(b.rsplit("/p2p/", 1)[-1]) for b in bootstrap]
    keypair = _keypair_from_seed(seed)
    try:
        maddrs = [multiaddr.Multiaddr(a) for a in listen]
    except Exception as exc:
        raise UsageError(f"bad listen multiaddr in {list(listen)!r}: {exc}") from exc
    if not maddrs:
        raise UsageError("open_host needs at least one listen address")
    setattr(YamuxStream, "_auto_tune_and_send_window_update", _window_update_at_half)  # noqa: B010
    host = _build_libp2p_host(keypair, maddrs, limits.max_connections,
                              AddrPolicy(announce, announce_append))
    node = P2PHost(host, keypair, limits, boot_ids, peerstore_max)
    swarm: Any = host.get_network()
    swarm.register_notifee(_Gate(node))
    # Every inbound stream (upstream's protocols and ours) goes through the
    # guard's boundary instead of BasicHost._swarm_stream_handler, whose
    # handler exceptions end the host (see node/p2p_guard.py).
    swarm.set_stream_handler(node.guard.inbound_stream)
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


# --------------------------------------------------------------------------- frames


async def close_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        try:
            await stream.close()
        except (IOException, OSError) as exc:
            log.debug("closing a stream failed (already gone): %r", exc)


async def reset_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        try:
            await stream.reset()
        except (IOException, OSError) as exc:
            log.debug("resetting a stream failed (already gone): %r", exc)


def _was_reset(stream: INetStream) -> bool:
    """Whether an EOF was really a reset.

    Yamux finalizes a stream as soon as RST arrives (stream_muxer/yamux/yamux.py:1349,
    :1571) and a later read of an unknown stream id raises MuxedStreamEOF
    (:1060), so NetStream.read reports a reset as StreamEOF; the YamuxStream
    object still carries `reset_received`.
    """
    return getattr(getattr(stream, "muxed_stream", None), "reset_received", False) is True


async def _read_exactly(stream: INetStream, n: int, what: str) -> bytes:
    parts: list[bytes] = []  # joined once: a bytearray copied out again costs 2 copies
    got = 0
    while got < n:
        try:
            chunk = await stream.read(n - got)
        except StreamEOF:
            if _was_reset(stream):
                raise RemoteError("the peer reset the stream") from None
            if not got and what == "header":
                raise InvalidMessage("stream ended before a frame", "eof") from None
            raise InvalidMessage(
                f"stream ended inside a frame {what} ({got} of {n} bytes)", "truncated"
            ) from None
        except StreamReset:
            raise RemoteError("the peer reset the stream") from None
        except (IOException, OSError) as exc:
            raise OperationError(f"reading from the stream failed: {exc!r}") from exc
        if not chunk:  # defensive: 0.8.1 raises StreamEOF instead of returning b""
            raise InvalidMessage(f"stream ended inside a frame {what}", "truncated")
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_frame(stream: INetStream, max_size: int, timeout: float) -> bytes:
    """Read one u32-BE-length-prefixed frame.

    Raises InvalidMessage("oversized") if the announced length exceeds
    `max_size` (nothing more is read), InvalidMessage("eof") if the stream ended
    cleanly before the frame, InvalidMessage("truncated") if it ended inside
    it, RemoteError if the peer reset the stream, StreamTimeout after `timeout`
    seconds (math.inf for none).
    """
    try:
        with trio.fail_after(timeout):
            (length,) = FRAME_HEADER.unpack(
                await _read_exactly(stream, FRAME_HEADER.size, "header")
            )
            if length > max_size:
                raise InvalidMessage(
                    f"frame of {length} bytes exceeds the limit of {max_size}", "oversized"
                )
            body = await _read_exactly(stream, length, "body") if length else b""
    except trio.TooSlowError:
        raise StreamTimeout(f"no complete frame within {timeout} s") from None
    touch_stream(stream)  # useful traffic: the stream and its connection are not idle
    return body


async def write_frame(stream: INetStream, data: bytes | memoryview, timeout: float = math.inf,
                      head: bytes = b"") -> None:
    """Write one u32-BE-length-prefixed frame `head | data`, in WRITE_PIECE-sized writes.

    Cancellation-safe: the writes are shielded, and when `timeout` passes the
    stream is reset instead, which makes yamux abandon the write between
    frames. Consequently an enclosing cancel scope does *not* interrupt it:
    pass the time you are willing to wait as `timeout`. (Cancelling a write in
    0.8.1 can stop it between noise encryption and the socket write, which
    desynchronises the session and kills the whole connection.) `head` is
    sent before `data` without copying `data` to prepend it.

    Raises UsageError if the frame is 4 GiB or more, StreamTimeout after
    `timeout` (the stream is then reset), RemoteError if the peer reset the
    stream, OperationError if it is closed.
    """
    size = len(head) + len(data)
    if size > MAX_FRAME:
        raise UsageError(f"a frame holds at most {MAX_FRAME} bytes, got {size}")
    view = memoryview(data)
    first = WRITE_PIECE - FRAME_HEADER.size - len(head)
    if first < 0:
        raise UsageError(f"a frame head holds at most {WRITE_PIECE - FRAME_HEADER.size} bytes")
    start = b"".join((FRAME_HEADER.pack(size), head, view[:first]))
    timed_out = False

    async def watchdog() -> None:
        nonlocal timed_out
        await trio.sleep(timeout)
        timed_out = True
        await reset_quietly(stream)

    error: BaseException | None = None
    with trio.CancelScope(shield=True):
        # Last resort if even the reset cannot get through (TCP send stuck):
        # then the connection is unusable anyway.
        with trio.move_on_after(timeout + WRITE_ABORT_GRACE):
            async with trio.open_nursery() as nursery:
                if timeout != math.inf:
                    nursery.start_soon(watchdog)
                try:
                    await stream.write(start)
                    for i in range(first, len(view), WRITE_PIECE):
                        # yamux slices and prepends its header: one copy, as for bytes
                        await stream.write(view[i : i + WRITE_PIECE])  # type: ignore[arg-type]
                except (IOException, OSError) as exc:
                    error = exc
                nursery.cancel_scope.cancel()
    if timed_out:
        raise StreamTimeout(f"writing a frame of {size} bytes took longer than {timeout} s")
    if isinstance(error, StreamReset):
        raise RemoteError("the peer reset the stream") from None
    if error is not None:
        raise OperationError(f"writing to the stream failed: {error!r}") from error
    await trio.lowlevel.checkpoint()  # deliver any cancellation held off by the shield


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


# --------------------------------------------------------------------------- request/response
#
# Wire: request = one frame (the payload). Response = one frame whose first
# byte is 0x00 (ok: the rest is the payload) or 0x01 (error: one byte n, n bytes
# of ASCII reason code, then a UTF-8 message). A handler crash resets the stream.

_OK: Final = 0
_ERR: Final = 1


def _error_body(reason: str, message: str) -> bytes:
    code = reason.encode("ascii", "replace")[:255]
    return bytes([_ERR, len(code)]) + code + message.encode("utf-8", "replace")[:1024]


def _parse_response(peer: ID, protocol: str, frame: bytes) -> bytes:
    if not frame:
        raise InvalidMessage(f"{peer} sent an empty {protocol} response", "malformed")
    if frame[0] == _OK:
        return frame[1:]
    if frame[0] == _ERR and len(frame) >= 2 and len(frame) >= 2 + frame[1]:
        reason = frame[2 : 2 + frame[1]].decode("ascii", "replace")
        message = frame[2 + frame[1] :].decode("utf-8", "replace")
        raise RequestRefused(f"{peer} refused the {protocol} request ({reason}): {message}", reason)
    raise InvalidMessage(f"{peer} sent a malformed {protocol} response", "malformed")


async def request(
    host: P2PHost,
    peer_id: ID | str,
    protocol: str,
    payload: bytes,
    max_response: int,
    timeout: float,
) -> bytes:
    """Send one request on a new stream and return the response payload.

    Everything (stream open, write, read) shares one `timeout`. Raises
    StreamTimeout, RequestRefused (the handler answered with an error; has
    `.reason`, e.g. "oversized"), RemoteError (the peer reset the stream: its
    handler crashed or it refused the protocol), InvalidMessage (the response
    is larger than `max_response` or malformed) or OperationError.
    """
    peer = parse_peer_id(peer_id)
    deadline = trio.current_time() + timeout
    try:
        # Cancelling stream opens and reads is safe; writes get the deadline.
        with trio.fail_at(deadline):
            stream = await host.new_stream(peer, protocol, timeout=math.inf)
            try:
                frame = await _exchange(stream, payload, max_response + 1, deadline)
            except BaseException:
                await reset_quietly(stream)
                raise
            await close_quietly(stream)
    except trio.TooSlowError:
        raise StreamTimeout(f"{protocol} request to {peer} took longer than {timeout} s") from None
    response = _parse_response(peer, protocol, frame)
    host.resources.touch(peer)
    return response


async def _exchange(stream: INetStream, payload: bytes, max_frame: int, deadline: float) -> bytes:
    """Write the request while reading the response.

    Concurrent so that a server answering early (e.g. "oversized" after the
    header) is heard even while our write is stalled on yamux flow control;
    the stalled write is then ended by resetting the stream, never by
    cancelling it (see write_frame).
    """
    write_error: list[BidmeshError] = []
    read_error: list[BidmeshError] = []
    frame = b""
    write_done = trio.Event()

    async def writer() -> None:
        try:
            await write_frame(stream, payload, max(0.0, deadline - trio.current_time()))
        except BidmeshError as exc:
            write_error.append(exc)
        finally:
            write_done.set()

    # Errors are captured and raised after the nursery: raising inside it would
    # wrap them in an ExceptionGroup (trio's strict exception groups).
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        try:
            frame = await read_frame(stream, max_frame, math.inf)
        except BidmeshError as exc:
            read_error.append(exc)
        if not write_done.is_set():
            await reset_quietly(stream)
    if read_error:
        # A write failure (e.g. reset while sending) explains a failed read best.
        if write_error and not isinstance(read_error[0], InvalidMessage):
            raise write_error[0] from read_error[0]
        raise read_error[0]
    return frame


def serve_requests(
    host: P2PHost,
    protocol: str,
    handler: RequestHandler,
    max_request: int,
    *,
    timeout: float = 10.0,
    max_concurrent: int = 64,
) -> None:
    """Answer `protocol` requests with `await handler(peer_pubkey, payload) -> bytes`.

    `peer_pubkey` is the authenticated 32-byte Ed25519 key of the requester.
    Requests over `max_request` bytes get an "oversized" error answer without
    being read. A handler raising PeerError answers an error with its reason
    (the requester sees RequestRefused); any other exception resets the
    stream. Reading the request plus running the handler is bounded by
    `timeout`; beyond `max_concurrent` requests in flight for the protocol, or
    `limits.requests_per_peer` for the peer (`host.resources`), the answer is
    "busy". Streams per protocol and per peer are limited before this runs
    (node/p2p_guard.py).
    """
    limiter = trio.Semaphore(max_concurrent)

    async def on_stream(stream: INetStream) -> None:
        peer = remote_peer_id(stream)
        ticket = host.resources.try_start_request(peer, protocol)
        if ticket is None:
            host.guard.fault(peer, "limit_requests_per_peer")
            await write_frame(stream, _error_body("busy", "too many requests in flight "
                                                  "from you"), 5.0)
            return
        try:
            await _serve_one(stream, peer)
        finally:
            host.resources.end_request(ticket)

    async def _serve_one(stream: INetStream, peer: ID) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await write_frame(stream, _error_body("busy", "too many requests in flight"), 5.0)
            return
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_at(deadline):
                try:
                    payload = await read_frame(stream, max_request, math.inf)
                    response = bytes([_OK]) + await handler(pubkey_from_peer_id(peer), payload)
                except PeerError as exc:
                    log.info("%s request from %s refused (%s): %s", protocol, peer, exc.reason, exc)
                    response = _error_body(exc.reason, str(exc))
        except trio.TooSlowError:
            raise StreamTimeout(
                f"{protocol} request from {peer} not served within {timeout} s"
            ) from None
        finally:
            limiter.release()
        await write_frame(stream, response, max(0.0, deadline - trio.current_time()))
        host.resources.touch(peer)

    set_stream_handler(host, protocol, on_stream)


# --------------------------------------------------------------------------- gossipsub


class _SendChannel(Protocol):
    def send_nowait(self, value: rpc_pb2.Message) -> None: ...

    async def aclose(self) -> None: ...


class _CountingSend:
    """Stands in for a subscription's send channel to count what upstream drops.

    `Pubsub.notify_subscriptions` drops a message with only a log line when the
    subscription channel is full (pubsub/pubsub.py:1371); we count it so the
    owner can trigger a pull sync.
    """

    def __init__(self, inner: _SendChannel, topic: Topic) -> None:
        self._inner = inner
        self._topic = topic

    def send_nowait(self, value: rpc_pb2.Message) -> None:
        try:
            self._inner.send_nowait(value)
        except trio.WouldBlock:
            self._topic.dropped += 1
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


class Subscription:
    """Async iterator of `(origin_pubkey, data)` for one topic; `aclose()` unsubscribes."""

    def __init__(self, topic: Topic, upstream: Any) -> None:
        self._topic = topic
        self._upstream = upstream  # libp2p TrioSubscriptionAPI
        self._closed = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[bytes, bytes]:
        while not self._closed:
            try:
                msg = await self._upstream.get()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                await self.aclose()
                break
            try:
                origin = pubkey_from_peer_id(ID(msg.from_id))
            except InvalidMessage:
                continue  # unreachable with strict signing; never yield unattributed data
            return origin, bytes(msg.data)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._topic._subscription = None
        if not self._topic._owner.closing:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await self._upstream.unsubscribe()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class Topic:
    """One gossipsub topic: publish with backpressure, subscribe, validate."""

    def __init__(self, owner: PubSub, name: str) -> None:
        self._owner = owner
        self.name = name
        self.dropped = 0
        """Messages accepted by the validator but dropped because `subscribe()` lagged."""
        self.rejected = 0
        """Messages the validator rejected (or that made it raise)."""
        self._validator: Validator | None = None
        self._subscription: Subscription | None = None
        self.current_origin: ID | None = None
        """While the validator runs: the peer that published the message (its signed
        `from`), which differs from the forwarder when the message was relayed."""

    def peers(self) -> set[ID]:
        """Connected peers known to be subscribed to this topic."""
        return set(self._owner.pubsub.peer_topics.get(self.name, set()))

    def mesh_peers(self) -> set[ID]:
        """Peers in our gossipsub mesh for this topic (empty until we subscribe)."""
        return set(self._owner.router.mesh.get(self.name, set()))

    async def publish(self, data: bytes, timeout: float = 1.0) -> int:
        """Publish `data`, first waiting (at most `timeout` s) while a receiving peer's
        queue is high; return how many receivers still had a full queue (they miss it).

        Upstream `Pubsub.publish` never yields and each peer's outbound queue
        (pubsub/rpc_queue.py, 32 RPCs) drops silently when full, so we wait
        until the queues of the peers that get the message (our mesh for the
        topic; all topic peers before the mesh forms) are below the high-water
        mark. Only those peers matter: waiting on any other (a stuck one, say)
        would stall every publish. After `timeout` we publish anyway: a peer
        that stays full misses the message, which is the caller's to repair
        (bidmesh: pull sync). Raises UsageError if `data` is too large.
        """
        if len(data) > self._owner.max_message_size:
            raise UsageError(
                f"gossip message of {len(data)} bytes exceeds {self._owner.max_message_size}; "
                "split it (upstream drops oversized RPCs silently)"
            )
        # GossipSub.publish sends our own message to the topic mesh
        # (pubsub/gossipsub.py `_get_peers_to_send`), to nobody while it is empty.
        receivers = self.mesh_peers() or self.peers()
        await self._owner.wait_for_queues(timeout, receivers)
        queues = self._owner.pubsub.peer_queues
        missed = sum(1 for p in receivers if p in queues and len(queues[p]) >= OutBoundQueueSize)
        await self._owner.pubsub.publish(self.name, data)
        return missed

    async def subscribe(self) -> Subscription:
        """Subscribe; the returned `Subscription` yields `(origin_pubkey, data)`.

        `origin_pubkey` is the 32-byte Ed25519 key of the publisher (the
        message signature was checked against it). Our own publishes are
        delivered too. One subscription per topic at a time; `aclose()` it (or
        use `async with`) to unsubscribe. Iteration ends when `make_pubsub` exits.
        """
        if self._subscription is not None:
            raise UsageError(f"topic {self.name!r} already has a subscriber")
        pubsub = self._owner.pubsub
        # SUBSCRIPTION_CHANNEL_SIZE is read when Pubsub.subscribe() creates the
        # channel, before its first await (pubsub/pubsub.py:1405).
        saved = _pubsub_module.SUBSCRIPTION_CHANNEL_SIZE
        _pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = self._owner.subscription_channel_size
        try:
            upstream = await pubsub.subscribe(self.name)
        finally:
            _pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = saved
        inner = pubsub.subscribed_topics_send[self.name]
        pubsub.subscribed_topics_send[self.name] = _CountingSend(inner, self)
        self._subscription = Subscription(self, upstream)
        return self._subscription

    def set_validator(self, fn: Validator) -> None:
        """Check each incoming message with `fn(forwarder_peer_id, data) -> bool`.

        `forwarder_peer_id` is the peer that sent it to us (ourselves for our own
        publishes) — the one to account for invalid input. `fn` must be fast and
        synchronous, and must not reject for a temporary reason: upstream caches
        verdicts per message id for 300 s. If `fn` raises, the message is
        rejected and the error logged (upstream would kill the Pubsub service).
        Messages forwarded by blocked peers are rejected without calling `fn`.
        """
        self._validator = fn
        self._owner.pubsub.set_topic_validator(self.name, self._validate, False)

    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        try:
            if forwarder != self._owner.host.peer_id and self._owner.host.is_blocked(forwarder):
                ok = False
            else:
                self.current_origin = ID(msg.from_id)
                try:
                    ok = (self._validator is None
                          or self._validator(forwarder, bytes(msg.data)) is True)
                finally:
                    self.current_origin = None
                if ok and forwarder != self._owner.host.peer_id:
                    # A valid message: useful traffic, and the forwarder is known-good
                    # (it may use the trusted reserve of node/resources.py).
                    self._owner.host.resources.touch(forwarder)
                    self._owner.host.resources.mark_good(forwarder)
        except Exception:  # a raising validator would kill py-libp2p's Pubsub service
            log.exception("validator for topic %r raised; rejecting the message", self.name)
            ok = False
        if not ok:
            self.rejected += 1
        return ok


@dataclass(frozen=True)
class _PubSubConfig:
    queue_high_water: int
    subscription_channel_size: int
    prune_interval: float
    delivery_window: float


class PubSub:
    """A running gossipsub router; get topics with `ps.topic(name)`."""

    def __init__(
        self, host: P2PHost, pubsub: Pubsub, router: GossipSub, config: _PubSubConfig
    ) -> None:
        self.host = host
        self.pubsub: Any = pubsub
        """The upstream `libp2p.pubsub.pubsub.Pubsub`."""
        self.router: Any = router
        """The upstream `libp2p.pubsub.gossipsub.GossipSub`."""
        self.queue_high_water = config.queue_high_water
        self.subscription_channel_size = config.subscription_channel_size
        self.max_message_size = DefaultMaxMessageSize - 16 * 1024  # room for signature, ids, record
        self._config = config
        self._topics: dict[str, Topic] = {}
        self.closing = False

    async def _end_subscriptions(self) -> None:
        """Close every subscription channel so `subscribe()` loops end with the router."""
        self.closing = True
        for channel in list(self.pubsub.subscribed_topics_send.values()):
            await channel.aclose()

    def topic(self, name: str) -> Topic:
        """The `Topic` object for `name` (one per name)."""
        if not name:
            raise UsageError("topic names must be non-empty")
        if name not in self._topics:
            self._topics[name] = Topic(self, name)
        return self._topics[name]

    def max_queue_len(self, peers: set[ID] | None = None) -> int:
        """Longest outbound queue (pubsub.peer_queues) among `peers` (default: all)."""
        queues = self.pubsub.peer_queues
        return max(
            (len(q) for p, q in list(queues.items()) if peers is None or p in peers), default=0
        )

    async def wait_for_queues(self, timeout: float, peers: set[ID] | None = None) -> bool:
        """Wait at most `timeout` s until the outbound queues of `peers` (default all)
        are below the high-water mark; False if one stayed at or above it."""
        await trio.lowlevel.checkpoint()
        with trio.move_on_after(timeout) as scope:
            # RpcQueue has no "drained" event; poll at a short interval.
            while self.max_queue_len(peers) >= self.queue_high_water:
                await trio.sleep(0.002)
        return not scope.cancelled_caught

    def prune(self) -> None:
        """Drop state upstream never prunes when adaptive gossip is off.

        `GossipSub.publish` appends a timestamp per message to
        `recent_message_deliveries[topic]` (pubsub/gossipsub.py:1089); only
        `_calculate_message_delivery_health` trims it (:2659), and that runs
        only with adaptive gossip on. Nothing else reads it.
        """
        deliveries: dict[str, list[float]] = self.router.recent_message_deliveries
        cutoff = time.time() - self._config.delivery_window  # upstream stamps use time.time()
        for topic in list(deliveries):
            kept = [t for t in deliveries[topic] if t > cutoff]
            if kept:
                deliveries[topic] = kept
            else:
                del deliveries[topic]

    async def _prune_forever(self) -> None:
        while True:
            await trio.sleep(self._config.prune_interval)
            self.prune()


# Verdicts are only consulted for message ids that left the seen-cache; the
# upstream LRU costs O(size) per message (`ValidationCache.put`, pubsub.py:287).
_VALIDATION_CACHE: Final = 128
_RECORD_TTL_S: Final = 600.0
_RECORD_CACHE_MAX: Final = 4096
_OWN_RECORD_TTL_S: Final = 1.0


def _cache_signed_records() -> None:
    """Handle signed peer records once per peer, not once per pubsub RPC.

    Upstream attaches the sender's signed peer record to every RPC: building
    it (`env_to_send_in_RPC`) re-reads the host's listen addresses from its
    sockets each time, and the receiver checks it (`maybe_consume_signed_record`:
    an Ed25519 verification and a peerstore update), twice for an RPC with
    control parts (pubsub/pubsub.py:565, pubsub/gossipsub.py:932). After the
    transport these are the largest per-message costs. So our own record is
    reused for `_OWN_RECORD_TTL_S`, and a verified (peer, record bytes) pair
    is remembered for `_RECORD_TTL_S` (the same bytes from the same peer check
    the same way; the peerstore keeps records 2 h). We rebind the names the
    pubsub modules look up; the installed package is unchanged. Idempotent.
    """
    upstream_consume = getattr(_pubsub_module, "maybe_consume_signed_record")  # noqa: B009
    if getattr(upstream_consume, "_bidmesh_cached", False):
        return
    upstream_env = getattr(_pubsub_module, "env_to_send_in_RPC")  # noqa: B009
    seen: dict[tuple[bytes, bytes], float] = {}
    own: weakref.WeakKeyDictionary[IHost, tuple[float, tuple[bytes, bool]]] = (
        weakref.WeakKeyDictionary()
    )

    def consume(msg: rpc_pb2.RPC, host: IHost, peer_id: ID) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (peer_id.to_bytes(), msg.senderRecord)
        now = time.monotonic()
        if seen.get(key, 0.0) > now:
            return True
        ok: bool = upstream_consume(msg, host, peer_id)
        if ok:
            if len(seen) >= _RECORD_CACHE_MAX:
                seen.clear()  # a flood of distinct records only costs re-checks
            seen[key] = now + _RECORD_TTL_S
        return ok

    def env_to_send(host: IHost) -> tuple[bytes, bool]:
        now = time.monotonic()
        cached = own.get(host)
        if cached is not None and cached[0] > now:
            return cached[1][0], False
        result: tuple[bytes, bool] = upstream_env(host)
        own[host] = (now + _OWN_RECORD_TTL_S, result)
        return result

    consume._bidmesh_cached = True  # type: ignore[attr-defined]
    for module in (_pubsub_module, _gossipsub_module):
        setattr(module, "maybe_consume_signed_record", consume)  # noqa: B010
        setattr(module, "env_to_send_in_RPC", env_to_send)  # noqa: B010


@asynccontextmanager
async def make_pubsub(
    host: P2PHost,
    *,
    degree: int = 6,
    degree_low: int = 4,
    degree_high: int = 12,
    queue_high_water: int = OutBoundQueueSize // 2,
    subscription_channel_size: int = 4096,
    prune_interval: float = 10.0,
    delivery_window: float = 60.0,
) -> AsyncIterator[PubSub]:
    """Run gossipsub on `host` for the duration of the block.

    Configured against the 0.8.1 defaults that lose messages: adaptive gossip
    off (it stretches the heartbeat to 30–60 s), heartbeat 1 s, the per-peer
    per-topic rate limit off (it also counts our own publishes, drops
    silently, and costs O(messages in the last second) per message), a
    validation-verdict cache of `_VALIDATION_CACHE` (upstream's LRU does O(size)
    list work per message), subscription channels of
    `subscription_channel_size`, strict signing on. A trio task
    prunes `recent_message_deliveries` every `prune_interval` s. Peers already
    connected when this starts are added too.
    """
    if not 0 < queue_high_water <= OutBoundQueueSize:
        raise UsageError(f"queue_high_water must be in 1..{OutBoundQueueSize}")
    _cache_signed_records()
    router = GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        degree=degree,
        degree_low=degree_low,
        degree_high=degree_high,
        heartbeat_interval=1,
        adaptive_gossip_enabled=False,
        spam_protection_enabled=False,
    )
    pubsub = Pubsub(host.libp2p, router, strict_signing=True,
                    validation_cache_size=_VALIDATION_CACHE)
    config = _PubSubConfig(
        queue_high_water, subscription_channel_size, prune_interval, delivery_window
    )
    ps = PubSub(host, pubsub, router, config)
    try:
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            # The PubsubNotifee only hears about connections made after it was
            # registered (pubsub/pubsub.py:432); register existing peers ourselves.
            for peer in host.connected_peers():
                pubsub.manager.run_task(pubsub._handle_new_peer_with_retry, peer)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ps._prune_forever)
                try:
                    yield ps
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True):
                        await ps._end_subscriptions()
    finally:
        # LastSeenCache starts a sweeper *thread* per Pubsub and nothing stops
        # it (tools/timed_cache/base_timed_cache.py:26).
        pubsub.seen_messages.stop()
