"""Every run-time replacement of a py-libp2p 0.8.1 function, in one place.

The installed package is never modified: these rebind names the upstream
modules look up, with a comment naming the upstream behaviour each one works
around (docs/libp2p-notes.md has the measurements).
"""

from __future__ import annotations

import random
import time
import weakref
from typing import Any, Final

from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub import gossipsub as _gossipsub_module
from libp2p.pubsub import pubsub as _pubsub_module
from libp2p.pubsub.pb import rpc_pb2
from libp2p.stream_muxer.yamux.yamux import YamuxStream


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




# ------------------------------------------------------------------ gossipsub mesh
# docs/libp2p-notes.md, "Mesh loss": why a node could stay outside the mesh.

PRUNER_BACK_OFF_S: Final = 10  # after a heartbeat PRUNE, both sides (int: upstream's unit)
PRUNED_MAX: Final = 4096  # PRUNE records kept before expired ones are dropped

PruneBook = dict[tuple[ID, str], tuple[float, int]]
"""(peer, topic) -> (time.monotonic(), back-off s) of the last PRUNE between us."""


def track_prunes(router: Any, sent: PruneBook, received: PruneBook) -> None:
    """Keep PRUNE back-offs symmetric on this router, and record both ends.

    Upstream's heartbeat PRUNEs an over-full mesh with no back-off in the message
    and none recorded on its own side (`mesh_heartbeat`, `_emit_control_msgs`),
    while the pruned peer backs off 60 s (`handle_prune`, its default
    `prune_back_off` when the field is 0). So when the pruner's mesh runs low a
    heartbeat or two later it GRAFTs that peer again, which refuses
    (`handle_graft`), answers PRUNE with an explicit 60 s, and both back off for
    a minute; at start-up, when every mesh overshoots at once, these cascades
    leave nodes with an empty mesh. Here a heartbeat PRUNE costs
    `PRUNER_BACK_OFF_S` on both sides: sending one backs us off that long,
    receiving one (field 0) backs off that long instead of 60 s. Explicit
    back-offs (a refused GRAFT, `leave`) stay upstream's. Every PRUNE leaves
    through `emit_control_message` and arrives through `handle_prune`: both are
    wrapped on this router instance only (upstream calls them via `self`).
    """
    upstream_emit = router.emit_control_message
    upstream_handle = router.handle_prune

    def remember(book: PruneBook, peer: ID, topic: str, back_off: int) -> None:
        now = time.monotonic()
        book[(peer, topic)] = (now, back_off)
        if len(book) > PRUNED_MAX:
            for key in [k for k, (t, b) in book.items() if t + b < now]:
                del book[key]

    async def emit_control_message(control_msg: rpc_pb2.ControlMessage, to_peer: ID) -> None:
        for prune in control_msg.prune:
            remember(sent, to_peer, prune.topicID, prune.backoff or PRUNER_BACK_OFF_S)
            if not prune.backoff:
                router._add_back_off(to_peer, prune.topicID, False, PRUNER_BACK_OFF_S)
        await upstream_emit(control_msg, to_peer)

    async def handle_prune(prune_msg: rpc_pb2.ControlPrune, sender_peer_id: ID) -> None:
        if not prune_msg.backoff:
            prune_msg = rpc_pb2.ControlPrune(topicID=prune_msg.topicID, peers=prune_msg.peers,
                                             backoff=PRUNER_BACK_OFF_S)
        remember(received, sender_peer_id, prune_msg.topicID, prune_msg.backoff)
        await upstream_handle(prune_msg, sender_peer_id)

    router.emit_control_message = emit_control_message
    router.handle_prune = handle_prune


def prune_at_random(router: Any, rng: random.Random) -> None:
    """Choose the peers an over-full mesh PRUNEs at random, as the spec says.

    Upstream `_select_peers_for_pruning` sorts by score (all 0 with the default
    zero-weight `ScoreParams`, our configuration) and then, with
    `eclipse_protection_enabled` (the default), `_prune_for_ip_diversity` takes the
    first peers sharing an IP with two others: on one machine (loopback, a test
    net, one NAT) that is set-iteration order, fixed per process for a given mesh,
    so every over-full neighbour prunes the same peer again and again. Bound on
    this router instance only (upstream calls it via `self`)."""

    def select(topic: str, num_to_prune: int) -> list[ID]:
        mesh = sorted(router.mesh.get(topic, ()), key=lambda p: p.to_bytes())
        return rng.sample(mesh, min(max(num_to_prune, 0), len(mesh)))

    router._select_peers_for_pruning = select


def forget_back_off(router: Any, topic: str, peers: set[ID]) -> None:
    """Drop our back-off and GRAFT-flood entries for `peers` on `topic`: upstream
    keeps them past the PRUNE that made them (`handle_graft` re-arms a back-off on
    every refused GRAFT; `_check_graft_flood_protection` refuses a GRAFT within
    10 s of the sender's PRUNE), and `mesh_heartbeat` grafts only peers outside
    back-off."""
    back_off = router.back_off.get(topic, {})
    for peer in peers:
        back_off.pop(peer, None)
        router.graft_flood_tracking.get(peer, {}).pop(topic, None)


async def graft(router: Any, topic: str, peer: ID) -> bool:
    """Add `peer` to our mesh for `topic` and send it GRAFT, as upstream's heartbeat
    does (`mesh_heartbeat`); False if it is not a gossipsub peer or already in."""
    mesh: set[ID] | None = router.mesh.get(topic)
    if mesh is None or peer in mesh or not router._is_gossipsub_peer(peer):
        return False
    mesh.add(peer)
    router._notify_mesh_peer_added(peer, topic)  # wakes upstream's wait_for_mesh
    if router.scorer is not None:
        router.scorer.on_join_mesh(peer, topic)
    await router.emit_graft(topic, peer)
    return True


async def prune(router: Any, topic: str, peer: ID) -> None:
    """Drop `peer` from our mesh for `topic` and send it a PRUNE as upstream's
    heartbeat does (no back-off in the message)."""
    if peer in router.mesh.get(topic, ()):
        router.mesh[topic].discard(peer)
        if router.scorer is not None:
            router.scorer.on_leave_mesh(peer, topic)
    control = rpc_pb2.ControlMessage()
    control.prune.extend([rpc_pb2.ControlPrune(topicID=topic)])
    await router.emit_control_message(control, peer)
