"""Every run-time replacement of a py-libp2p function and every edit of its private state.

bidmesh never patches the installed package. Where py-libp2p 0.8.1 misbehaves,
the workaround rebinds a name upstream looks up, or edits an attribute of an
upstream object, and all of those live here, each next to a comment naming the
upstream behaviour (docs/libp2p-notes.md has the measurements):

process-wide, applied once by `install()` (idempotent: a marker on each replacement)
  * `YamuxStream._auto_tune_and_send_window_update` -> `_window_update_at_half`
  * `maybe_consume_signed_record`, `env_to_send_in_RPC` in the pubsub modules ->
    per-peer caches (`_cache_signed_records`)
  * `RpcQueue.pop` -> `_pop_and_signal` (wakes `queue_drained` waiters: publish
    backpressure without polling)

per object (idempotent as well)
  * swarm: the inbound limiter, the inbound upgrade (a handshake queue), the
    stream handler (our guard instead of BasicHost's)
  * peerstore: eviction off, entries dropped by our policy, identify's record of
    identified peers
  * pubsub: the subscription channel size, the subscription send channel (counts
    drops), peers connected before pubsub started, the seen-cache thread
  * gossipsub: `recent_message_deliveries` pruned, the protocols we dial

The gossipsub router's mesh and the message path (one copy at a time, the score
gates) are edited in node/p2p/_compat_gossipsub.py, by the same rules.

Importing this module checks the installed version first (`check_version`): these
edits are right for the version they were read from only, and another version
fails here, naming both, rather than later with an AttributeError in a handler.
The Protocols in node/p2p/_upstream_types.py name every upstream member the
package uses; mypy checks them against the installed classes.
"""

# ruff: noqa: E402
from __future__ import annotations

import importlib.metadata
from typing import Final

from ..errors import IncompatibleDependency

LIBP2P_VERSION: Final = "0.8.1"
"""The py-libp2p release this package was written and measured against."""


def check_version(installed: str | None = None) -> None:
    """Raise IncompatibleDependency unless py-libp2p `LIBP2P_VERSION` is installed."""
    if installed is None:
        try:
            installed = importlib.metadata.version("libp2p")
        except importlib.metadata.PackageNotFoundError:
            raise IncompatibleDependency(
                f"py-libp2p is not installed; bidmesh needs libp2p=={LIBP2P_VERSION}"
            ) from None
    if installed != LIBP2P_VERSION:
        raise IncompatibleDependency(
            f"bidmesh's libp2p layer (node/p2p/) was written for py-libp2p {LIBP2P_VERSION}, "
            f"but {installed} is installed: its workarounds replace upstream functions and "
            f"edit private state of that exact release. Install libp2p=={LIBP2P_VERSION} "
            "(pyproject.toml pins it), or port node/p2p/_compat.py and re-run tests/test_p2p.py "
            "and tests/test_p2p_guard.py."
        )


# Before any upstream import: another release may not even have these modules.
check_version()

# The imports below come after the version check on purpose (E402 for this file).
import math
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import multiaddr.exceptions
import trio
from libp2p.abc import IHost, INetStream, ISubscriptionAPI
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from libp2p.pubsub import gossipsub as _gossipsub_module
from libp2p.pubsub import pubsub as _pubsub_module
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from ..errors import OperationError
from ._upstream_types import (
    GossipSubInternals,
    PeerStoreInternals,
    PubsubInternals,
    SwarmInternals,
)

MARKER: Final = "_bidmesh_compat"
"""Attribute set on every replacement installed here: installing twice is a no-op."""

_T = TypeVar("_T")


BAD_ADDRESS: Final = (multiaddr.exceptions.Error, ValueError, LookupError, TypeError)
"""What `Multiaddr(text)` and `info_from_p2p_addr` raise for a malformed address
(multiaddr's own errors, base58 and multihash ValueErrors, InvalidAddrError)."""

UPSTREAM_FAILURES: Final = (BaseLibp2pError, PeerStoreError, OSError,
                            trio.BrokenResourceError, trio.ClosedResourceError)
"""What upstream's dial and stream-open paths raise when they fail (SwarmException,
StreamFailure, MultiselectClientError, MuxedConnUnavailable and IOException are all
BaseLibp2pError). Anything else (an AttributeError after an upstream change) is a bug
and propagates."""


def _mark(fn: _T) -> _T:
    setattr(fn, MARKER, True)
    return fn


def is_ours(fn: object) -> bool:
    """Whether `fn` is one of our replacements (already installed)."""
    return getattr(fn, MARKER, False) is True


# --------------------------------------------------------------------------- process-wide


def install() -> None:
    """Install the process-wide replacements; later calls do nothing."""
    if not is_ours(getattr(YamuxStream, "_auto_tune_and_send_window_update")):  # noqa: B009
        setattr(YamuxStream, "_auto_tune_and_send_window_update",  # noqa: B010
                _window_update_at_half)
    _cache_signed_records()
    if not is_ours(RpcQueue.pop):
        setattr(RpcQueue, "pop", _pop_and_signal)  # noqa: B010


@_mark
async def _window_update_at_half(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """Send a WINDOW_UPDATE only once half the receive window is consumed.

    Upstream's `YamuxStream._auto_tune_and_send_window_update`
    (stream_muxer/yamux/yamux.py:410) sends one after nearly every read that
    returns data (its "partial slack" and release-on-read branches), and
    pubsub reads each RPC in two or three reads: half of all frames on a
    gossip connection were window updates, each encrypted, sent and parsed.
    go-yamux (and the yamux spec) release credit in half-window steps; this
    keeps upstream's window growth and auto-tuning without the per-read
    updates. `install()` puts it in place of upstream's method.

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


_DRAIN_WAITERS: Final = "_bidmesh_drain_waiters"
_upstream_pop = RpcQueue.pop


@_mark
async def _pop_and_signal(self: RpcQueue) -> rpc_pb2.RPC | None:
    """`RpcQueue.pop`, then wake the waiters (`queue_drained`) whose mark the queue
    is now below.

    Upstream's per-peer outbound queue (pubsub/rpc_queue.py) has no "drained"
    signal, so `PubSub.wait_for_queues` polled every 2 ms while a receiver's queue
    was high; under load the daemon's sender spends much of its time there
    (bench/convergence.py at load ~20: 40-180 s of `publish_wait_s` per node per
    run), ~500 wakeups a second. `install()` puts this in place of upstream's method
    (class attribute; the per-peer sending loop calls `queue.pop()`)."""
    rpc = await _upstream_pop(self)
    waiters: dict[trio.Event, int] | None = self.__dict__.get(_DRAIN_WAITERS)
    if waiters:
        n = len(self)
        for event, mark in list(waiters.items()):
            if n < mark:
                event.set()
                del waiters[event]
    return rpc


@contextmanager
def queue_drained(queues: Iterable[RpcQueue], mark: int) -> Iterator[trio.Event]:
    """An event set once any of `queues` holds fewer than `mark` RPCs after a pop
    (needs `install()`); the waiter is removed on exit, set or not."""
    event = trio.Event()
    queues = list(queues)
    for q in queues:
        q.__dict__.setdefault(_DRAIN_WAITERS, {})[event] = mark
    try:
        yield event
    finally:
        for q in queues:
            q.__dict__.get(_DRAIN_WAITERS, {}).pop(event, None)


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
    if is_ours(upstream_consume):
        return
    upstream_env = getattr(_pubsub_module, "env_to_send_in_RPC")  # noqa: B009
    seen: dict[tuple[bytes, bytes], float] = {}
    own: weakref.WeakKeyDictionary[IHost, tuple[float, tuple[bytes, bool]]] = (
        weakref.WeakKeyDictionary()
    )

    @_mark
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

    @_mark
    def env_to_send(host: IHost) -> tuple[bytes, bool]:
        now = time.monotonic()
        cached = own.get(host)
        if cached is not None and cached[0] > now:
            return cached[1][0], False
        result: tuple[bytes, bool] = upstream_env(host)
        own[host] = (now + _OWN_RECORD_TTL_S, result)
        return result

    for module in (_pubsub_module, _gossipsub_module):
        setattr(module, "maybe_consume_signed_record", consume)  # noqa: B010
        setattr(module, "env_to_send_in_RPC", env_to_send)  # noqa: B010


# --------------------------------------------------------------------------- swarm

INBOUND_HANDSHAKES: Final = 1
HANDSHAKE_QUEUE_S: Final = 10.0
# A slot stays taken this long after its upgrade, while the new connection is set
# up (identify both ways, the pubsub hello, our sync check): at most
# INBOUND_HANDSHAKES / HANDSHAKE_SETTLE_S new inbound connections a second.
HANDSHAKE_SETTLE_S: Final = 0.1
# ... and at most this long in all: a stalled handshake stops holding a slot (it
# goes on, bounded by upstream's inbound_upgrade_timeout, without one).
HANDSHAKE_HOLD_S: Final = 1.0


def unbound_inbound_limiter(swarm: SwarmInternals) -> None:
    """Upstream bug: the inbound handler holds its `_inbound_limiter` slot until
    the *swarm* stops, not until the connection closes (network/swarm.py:1982
    acquires, :2060 waits for manager.wait_finished()), so after
    max_connections - min_connections inbound connections in the node's
    lifetime every new inbound connection is refused. Replace the limiter by
    an unbounded one; the real cap is enforced at registration (add_conn,
    network/swarm.py:2678) which counts live connections only."""
    if swarm._inbound_limiter.total_tokens != math.inf:
        swarm._inbound_limiter = trio.CapacityLimiter(math.inf)


def limit_inbound_handshakes(swarm: Any, limit: int = INBOUND_HANDSHAKES,
                             queue_s: float = HANDSHAKE_QUEUE_S, *,
                             settle_s: float = HANDSHAKE_SETTLE_S,
                             hold_s: float = HANDSHAKE_HOLD_S,
                             admit: Callable[[str | None], Callable[[], None]] | None = None,
                             ) -> None:
    """Set up at most `limit` inbound connections at once (`swarm` needs only
    `upgrade_inbound_raw_conn`; a second call on the same swarm does nothing).

    Upstream starts the security and muxer handshake of every accepted socket at
    once (network/swarm.py `_do_handle_inbound_connection` ->
    `upgrade_inbound_raw_conn`), and each new connection then sets itself up
    (identify both ways, the pubsub hello, our sync check: ~12 ms of CPU in all,
    in many small task steps). An honest request needs dozens of scheduler rounds
    (yamux, multistream, noise), and every round waits for one step of every
    runnable task: a crowd of new identities set up side by side made an honest
    DIGEST wait ~100 ms on an idle machine, ~1 s at load 13. Queued, the crowd costs
    the same CPU, but the loop interleaves at most `limit` set-ups with everyone
    else's work: a slot is held for the upgrade plus `settle_s` (the set-up), at
    most `hold_s` (a stalled handshake does not hold the queue). Waiting more than
    `queue_s` for a slot refuses the connection.

    `admit(remote_ip)` (the guard's address limits, before any handshake work)
    raises to refuse the connection, else returns the release to call when the
    upgrade ends.
    """
    upgrade = swarm.upgrade_inbound_raw_conn
    if is_ours(upgrade):
        return
    limiter = trio.CapacityLimiter(limit)

    async def release_later(token: object, done: trio.Event) -> None:
        with trio.move_on_after(hold_s):
            await done.wait()
            await trio.sleep(settle_s)
        limiter.release_on_behalf_of(token)

    @_mark
    async def limited(raw_conn: Any, maddr: Any) -> Any:
        end = admit(_remote_ip(raw_conn)) if admit is not None else None
        try:
            token = object()
            with trio.move_on_after(queue_s) as waited:
                await limiter.acquire_on_behalf_of(token)
            if waited.cancelled_caught:
                # The caller (swarm.py) catches Exception and closes the connection.
                raise OperationError(f"{limit} inbound handshakes in progress for {queue_s} s")
            done = trio.Event()
            # Released by a system task: after the set-up, or when `hold_s` is up.
            trio.lowlevel.spawn_system_task(release_later, token, done)
            try:
                return await upgrade(raw_conn, maddr)
            finally:
                done.set()
        finally:
            if end is not None:
                end()

    swarm.upgrade_inbound_raw_conn = limited


def _remote_ip(raw_conn: Any) -> str | None:
    try:
        remote = raw_conn.get_remote_address()
    except (AttributeError, OSError):
        return None
    return str(remote[0]) if remote else None


def route_inbound_streams(swarm: SwarmInternals,
                          handler: Callable[[INetStream], Awaitable[None]]) -> None:
    """Every inbound stream (upstream's protocols and ours) goes to `handler`
    instead of BasicHost._swarm_stream_handler, whose handler exceptions end the
    host (see node/p2p/guard.py). `Swarm.set_stream_handler` is the hook
    BasicHost itself uses; setting it again replaces ours."""
    swarm.set_stream_handler(handler)


# --------------------------------------------------------------------------- peerstore


def disable_peerstore_eviction(store: PeerStoreInternals) -> None:
    """Upstream eviction (peer/peerstore.py:201) caps the store at 1,000 peers and
    removes entries without addresses first, our own (our key pair) among them;
    node/p2p/guard.py bounds the store by its own policy instead."""
    store.max_peers = sys.maxsize


def drop_peer(store: PeerStoreInternals, peer: ID) -> None:
    """Forget a peer entirely: PeerStore has no public removal that
    takes everything (`clear_peerdata` leaves the address-update channel behind)."""
    store.peer_data_map.pop(peer, None)
    store.peer_record_map.pop(peer, None)
    store.addr_update_channels.pop(peer, None)


def identified_peers(host: IHost) -> dict[ID, str]:
    """BasicHost's record of peers whose identify finished on their current
    connection (host/basic_host.py `_identified_peers`); upstream pops entries
    only on its own disconnect path. Empty for a host without one."""
    found: dict[ID, str] = getattr(host, "_identified_peers", {})
    return found


# --------------------------------------------------------------------------- pubsub


class _SendChannel(Protocol):
    def send_nowait(self, value: rpc_pb2.Message) -> None: ...

    async def aclose(self) -> None: ...


class _CountingSend:
    """Stands in for a subscription's send channel to count what upstream drops.

    `Pubsub.notify_subscriptions` drops a message with only a log line when the
    subscription channel is full (pubsub/pubsub.py:1371); we count it so the
    owner can trigger a pull sync.
    """

    _bidmesh_compat = True  # MARKER: never wrapped twice

    def __init__(self, inner: _SendChannel, on_drop: Callable[[], None]) -> None:
        self._inner = inner
        self._on_drop = on_drop

    def send_nowait(self, value: rpc_pb2.Message) -> None:
        try:
            self._inner.send_nowait(value)
        except trio.WouldBlock:
            self._on_drop()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


async def subscribe(pubsub: PubsubInternals, topic: str, channel_size: int,
                    on_drop: Callable[[], None]) -> ISubscriptionAPI:
    """`pubsub.subscribe(topic)` with a channel of `channel_size` messages, calling
    `on_drop` for each message upstream drops because the channel is full."""
    # SUBSCRIPTION_CHANNEL_SIZE is read when Pubsub.subscribe() creates the
    # channel, before its first await (pubsub/pubsub.py:1405).
    saved = _pubsub_module.SUBSCRIPTION_CHANNEL_SIZE
    _pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = channel_size
    try:
        upstream = await pubsub.subscribe(topic)
    finally:
        _pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = saved
    inner = pubsub.subscribed_topics_send[topic]
    if not is_ours(inner):
        # Upstream only calls send_nowait and aclose on it.
        pubsub.subscribed_topics_send[topic] = _CountingSend(inner, on_drop)  # type: ignore[assignment]
    return upstream


def add_connected_peers(pubsub: PubsubInternals, peers: list[ID]) -> None:
    """The PubsubNotifee only hears about connections made after it was
    registered (pubsub/pubsub.py:432); register existing peers ourselves."""
    for peer in peers:
        pubsub.manager.run_task(pubsub._handle_new_peer_with_retry, peer)


def stop_seen_cache(pubsub: PubsubInternals) -> None:
    """LastSeenCache starts a sweeper *thread* per Pubsub and nothing stops it
    (tools/timed_cache/base_timed_cache.py:26)."""
    pubsub.seen_messages.stop()


def prune_recent_deliveries(router: GossipSubInternals, window: float) -> None:
    """Drop state upstream never prunes when adaptive gossip is off.

    `GossipSub.publish` appends a timestamp per message to
    `recent_message_deliveries[topic]` (pubsub/gossipsub.py:1089); only
    `_calculate_message_delivery_health` trims it (:2659), and that runs
    only with adaptive gossip on. Nothing else reads it.
    """
    deliveries = router.recent_message_deliveries
    cutoff = time.time() - window  # upstream stamps use time.time()
    for topic in list(deliveries):
        kept = [t for t in deliveries[topic] if t > cutoff]
        if kept:
            deliveries[topic] = kept
        else:
            del deliveries[topic]


def dial_protocols(router: GossipSubInternals, protocols: list[TProtocol]) -> None:
    """The pubsub protocols we offer when *we* open a stream (`GossipSub.protocols`,
    read when a peer is added); inbound streams are still accepted for every
    protocol the router was built with (registered at start)."""
    router.protocols = list(protocols)
