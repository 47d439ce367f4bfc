"""libp2p plumbing for bidmesh: host, framed streams, request/response, gossipsub.

Everything that touches py-libp2p 0.8.1 directly lives in this package, so that
`node/gossip.py`, `node/dataplane/` and `node/client.py` build on a small API
and the upstream pitfalls are worked around once. `docs/libp2p-notes.md` has the
background (file:line references into the installed libp2p).

Modules (the names below are re-exported here; import them from `node.p2p`):

    ids       peer ids <-> 32-byte Ed25519 keys, the authenticated remote end
    frames    u32-BE length-prefixed frames, bounded reads, cancel-safe writes
    host      P2PHost and open_host: TCP + noise + yamux, gating, stream handlers
    guard     the inbound-stream boundary, connection admission, the peerstore
    addrs     the advertised addresses (addrs_factory)
    rpc       request/response on one stream per request
    pubsub    gossipsub topics, subscriptions and validators
    mdns      LAN discovery (zeroconf) feeding dial addresses to a callback
    _compat   every replacement of an upstream function and edit of its private
              state, the version check
    _compat_gossipsub  the gossipsub router's mesh and message-path edits
    _upstream_types  typed Protocols for the upstream members used

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

from ..errors import RequestRefused, StreamTimeout

# First: _compat checks the installed py-libp2p release before anything imports it.
from ._compat import LIBP2P_VERSION
from .frames import (
    FRAME_HEADER,
    MAX_FRAME,
    WRITE_PIECE,
    Stream,
    close_quietly,
    read_frame,
    reset_quietly,
    touch_stream,
    write_frame,
)
from .guard import LONG_LIVED_PREFIXES
from .host import (
    DEFAULT_LISTEN,
    SHUTDOWN_TIMEOUT,
    P2PHost,
    StreamHandler,
    default_limits,
    open_host,
    set_stream_handler,
)
from .ids import (
    PeerId,
    parse_peer_id,
    peer_id_from_pubkey,
    pubkey_from_peer_id,
    remote_peer_id,
    remote_pubkey,
)
from .pubsub import AsyncValidator, PubSub, Subscription, Topic, Validator, make_pubsub
from .rpc import RequestHandler, request, serve_requests

__all__ = [
    "DEFAULT_LISTEN",
    "FRAME_HEADER",
    "LIBP2P_VERSION",
    "LONG_LIVED_PREFIXES",
    "MAX_FRAME",
    "SHUTDOWN_TIMEOUT",
    "WRITE_PIECE",
    "AsyncValidator",
    "P2PHost",
    "PeerId",
    "PubSub",
    "RequestHandler",
    "RequestRefused",
    "Stream",
    "StreamHandler",
    "StreamTimeout",
    "Subscription",
    "Topic",
    "Validator",
    "close_quietly",
    "default_limits",
    "make_pubsub",
    "open_host",
    "parse_peer_id",
    "peer_id_from_pubkey",
    "pubkey_from_peer_id",
    "read_frame",
    "remote_peer_id",
    "remote_pubkey",
    "request",
    "reset_quietly",
    "serve_requests",
    "set_stream_handler",
    "touch_stream",
    "write_frame",
]
