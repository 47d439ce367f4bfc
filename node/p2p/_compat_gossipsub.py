"""The gossipsub router's and pubsub's per-instance workarounds: the mesh and the message path.

Split from node/p2p/_compat.py (which keeps the version check, the process-wide
replacements, and the swarm, peerstore and subscription edits); the same rules
hold: every edit names the upstream behaviour, is bound on one instance, is
marked (`_compat.MARKER`) and is never made twice.

  * the mesh ("Mesh loss" in docs/libp2p-notes.md): PRUNE back-offs kept
    symmetric (`emit_control_message`/`handle_prune` wrapped), random prune
    selection, stale back-off forgotten, GRAFT and PRUNE sent on demand
  * the message path: one copy of a message handled at a time, copies refused
    before upstream's validation, forwards and IWANTs spared to peers holding the
    message, seen copies dropped before a task is spawned
    (`one_copy_at_a_time`), the peer scorer's gates without scores
    (`open_score_gates`)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.utils import safe_bytes_from_hex

from ._compat import _mark, is_ours
from ._upstream_types import GossipSubInternals, PubsubInternals

# ------------------------------------------------------------------ gossipsub mesh
# docs/libp2p-notes.md, "Mesh loss": why a node could stay outside the mesh.

# After a heartbeat PRUNE, on both sides. Longer than upstream's GRAFT-flood window
# (10 s, float) plus the rounding of its int back-off stamps: a GRAFT at 9.x s
# would be refused as a flood, with an explicit 60 s back-off.
PRUNER_BACK_OFF_S: Final = 12
PRUNED_MAX: Final = 4096  # PRUNE records kept before expired ones are dropped

PruneBook = dict[tuple[ID, str], tuple[float, int]]
"""(peer, topic) -> (time.monotonic(), back-off s) of the last PRUNE between us."""


def track_prunes(router: GossipSubInternals, sent: PruneBook, received: PruneBook) -> None:
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
    wrapped on this router instance only (upstream calls them via `self`); a second
    call on the same router does nothing.
    """
    if is_ours(router.handle_prune):
        return
    upstream_emit = router.emit_control_message
    upstream_handle = router.handle_prune

    def remember(book: PruneBook, peer: ID, topic: str, back_off: int) -> None:
        now = time.monotonic()
        book[(peer, topic)] = (now, back_off)
        if len(book) > PRUNED_MAX:
            for key in [k for k, (t, b) in book.items() if t + b < now]:
                del book[key]

    @_mark
    async def emit_control_message(control_msg: rpc_pb2.ControlMessage, to_peer: ID) -> None:
        for prune in control_msg.prune:
            remember(sent, to_peer, prune.topicID, prune.backoff or PRUNER_BACK_OFF_S)
            if not prune.backoff:
                router._add_back_off(to_peer, prune.topicID, False, PRUNER_BACK_OFF_S)
        await upstream_emit(control_msg, to_peer)

    @_mark
    async def handle_prune(prune_msg: rpc_pb2.ControlPrune, sender_peer_id: ID) -> None:
        if not prune_msg.backoff:
            prune_msg = rpc_pb2.ControlPrune(topicID=prune_msg.topicID, peers=prune_msg.peers,
                                             backoff=PRUNER_BACK_OFF_S)
        remember(received, sender_peer_id, prune_msg.topicID, prune_msg.backoff)
        await upstream_handle(prune_msg, sender_peer_id)

    setattr(router, "emit_control_message", emit_control_message)  # noqa: B010
    setattr(router, "handle_prune", handle_prune)  # noqa: B010


# ------------------------------------------------------------------ message path

IWANT_FOLLOWUP_S: Final = 3.0
"""How long an id we asked a peer for (IWANT) is not asked of another."""
ASKED_MAX: Final = 4096  # asked ids kept before expired ones are dropped

Admit = Callable[[ID, rpc_pb2.Message], Callable[[], None] | None]
"""`admit(forwarder, msg)`: None to drop the message, else the release to call once
upstream is done with it."""


def one_copy_at_a_time(pubsub: PubsubInternals,
                       dropped: Callable[[rpc_pb2.Message], None],
                       admit: Admit | None = None, *,
                       router: GossipSubInternals | None = None,
                       held_back: Callable[[int], None] | None = None,
                       spared: Callable[[int], None] | None = None,
                       seen: Callable[[], None] | None = None) -> None:
    """Drop a received message while another copy of it is being handled, and (with
    `admit`) a message our own cheap checks refuse, before upstream handles it; (with
    `router`) do not forward a message to the peers whose copies were dropped so.

    Upstream's `push_msg` checks its seen-cache first but marks a message seen only
    once it is valid, delivered and forwarded; until then every copy from another
    mesh peer takes the whole path again: the origin's signature checked (strict
    signing: an Ed25519 verification per copy), a wait for an async-validator slot,
    and, as our validator refuses such copies (node/p2p/pubsub.py), a rejection
    whose error text formats the whole message (`ValidationError(f"... {msg}")`
    in `validate_msg`: ~1 ms of CPU for a 13 KB gossip batch). Here a copy whose
    message id is in `push_msg` already is dropped at the door, and
    `dropped(msg)` told; the first copy's outcome decides, as the seen-cache
    would.

    The same rejection path is what a message over its forwarder's budget cost
    (~1.1 ms of CPU per 60-event batch, formatting it, on top of the signature
    check): `admit(forwarder, msg)`, asked after the seen-cache (a seen message
    is upstream's cheapest drop, and must not be charged), may refuse it here
    instead. A message dropped this way is neither validated nor marked seen nor
    cached as invalid: not forwarded, and another peer's copy of it is judged on
    its own.

    A peer that sent us a copy holds the message, yet upstream forwards it to every
    mesh peer but the first copy's forwarder and the origin (`GossipSub.publish` ->
    `_get_peers_to_send`): a copy each of them decodes and drops, and whose sending
    cost us as much. So the peers whose copies were dropped while the first was
    handled (validation takes a while: a checking backlog, the ingest queue) are left
    out when it is forwarded, as gossipsub v1.2's IDONTWANT would have them (upstream
    sends those only after validating, too late to spare anything); `held_back(n)`
    is told how many sends that saved. A forged copy (dropped unchecked) only costs
    its sender the real message from us.

    Likewise an IHAVE (heartbeat gossip from a peer outside our mesh) naming a
    message in hand: upstream's `handle_ihave` asks IWANT for every id not in the
    seen-cache, which a message being validated is not yet, and the full copy that
    comes back is decoded and dropped. Such ids are left out of the IHAVE before
    upstream reads it (`spared(n)` told how many); the IHAVE itself still goes
    through upstream, rate limits included. So are ids we asked another peer for
    (IWANT) within the last `IWANT_FOLLOWUP_S`: upstream asks every peer that
    announces a message not yet seen, and each answers with the full message (the
    answers arrive at once, all but the first dropped as copies); if the peer asked
    does not deliver, the next IHAVE after that time asks again (go-libp2p's IWANT
    follow-up time is the same 3 s), and pull sync fetches what gossip missed.

    A copy of a message already seen (validated and forwarded: most of a node's
    copies) went on to a task of its own before upstream's `push_msg` dropped it, and
    upstream's task spawn (`manager.run_task`) walks the whole task tree to find the
    caller's task: a cost per copy that grows with the tasks alive, the backlog.
    The stream reader asks `_is_subscribed_to_msg(msg)` before it spawns; a seen
    message now answers no there (`seen()` told), which drops it where `push_msg`
    would have, without the task. Wrapped on these instances only
    (upstream schedules `self.push_msg` per message and calls
    `self._get_peers_to_send` and `self.handle_ihave`); a second call does
    nothing."""
    upstream_push = pubsub.push_msg
    if is_ours(upstream_push):
        return
    # Message id -> the peers whose copies arrived while the first was handled.
    in_flight: dict[bytes, set[ID]] = {}

    @_mark
    async def push_msg(msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        msg_id = pubsub.get_message_id(msg)
        holders = in_flight.get(msg_id)
        if holders is not None:
            holders.add(msg_forwarder)
            dropped(msg)
            return
        release = None
        if admit is not None:
            if pubsub.seen_messages.has(msg_id):
                return  # what upstream's push_msg does first (after its blacklist)
            release = admit(msg_forwarder, msg)
            if release is None:
                return
        in_flight[msg_id] = set()
        try:
            await upstream_push(msg_forwarder, msg)
        finally:
            del in_flight[msg_id]
            if release is not None:
                release()

    setattr(pubsub, "push_msg", push_msg)  # noqa: B010
    upstream_subscribed = pubsub._is_subscribed_to_msg

    @_mark
    def subscribed_and_unseen(msg: rpc_pb2.Message) -> bool:
        if not upstream_subscribed(msg):
            return False
        if pubsub.seen_messages.has(pubsub.get_message_id(msg)):
            if seen is not None:
                seen()
            return False
        return True

    setattr(pubsub, "_is_subscribed_to_msg", subscribed_and_unseen)  # noqa: B010
    if router is None:
        return
    upstream_peers = router._get_peers_to_send

    @_mark
    def peers_to_send(topic_ids: Iterable[str], msg_forwarder: ID, origin: ID,
                      msg_id: bytes | None = None) -> Iterable[ID]:
        peers = upstream_peers(topic_ids, msg_forwarder, origin, msg_id)
        holders = in_flight.get(msg_id) if msg_id is not None else None
        if not holders:
            return peers
        peers = list(peers)
        out = [p for p in peers if p not in holders]
        if held_back is not None and len(out) < len(peers):
            held_back(len(peers) - len(out))
        return out

    setattr(router, "_get_peers_to_send", peers_to_send)  # noqa: B010
    upstream_ihave = router.handle_ihave
    upstream_iwant = router.emit_iwant
    asked: dict[bytes, float] = {}  # message id -> when we last asked a peer for it

    @_mark
    async def emit_iwant(msg_ids: Sequence[bytes], to_peer: ID) -> None:
        now = time.monotonic()
        for i in msg_ids:
            asked[bytes(i)] = now
        if len(asked) > ASKED_MAX:
            for key in [k for k, t in asked.items() if now - t >= IWANT_FOLLOWUP_S]:
                del asked[key]
        await upstream_iwant(msg_ids, to_peer)

    @_mark
    async def handle_ihave(ihave_msg: rpc_pb2.ControlIHave, sender_peer_id: ID) -> None:
        if in_flight or asked:
            now = time.monotonic()
            ids = ihave_msg.messageIDs
            keep = []
            for i in ids:
                b = safe_bytes_from_hex(i)
                if b is not None and (b in in_flight
                                      or now - asked.get(b, -math.inf) < IWANT_FOLLOWUP_S):
                    continue
                keep.append(i)
            if len(keep) < len(ids):
                if spared is not None:
                    spared(len(ids) - len(keep))
                ihave_msg = rpc_pb2.ControlIHave(topicID=ihave_msg.topicID, messageIDs=keep)
        await upstream_ihave(ihave_msg, sender_peer_id)

    setattr(router, "emit_iwant", emit_iwant)  # noqa: B010
    setattr(router, "handle_ihave", handle_ihave)  # noqa: B010


def open_score_gates(router: GossipSubInternals) -> None:
    """Answer the peer scorer's gates without computing scores while every threshold
    is -inf (upstream's default `ScoreParams`, ours: scoring has no weights here).

    Upstream asks them per message and per peer (`push_msg`: `allow_publish` of the
    forwarder; `_get_peers_to_send`: `allow_gossip` and `is_graylisted` of each mesh
    peer; `GossipSub.publish`: `allow_publish` of each receiver), and each computes
    the peer's topic score, ~1.5% of a loaded node's loop CPU, to compare it with
    -inf. The answers stay the same: allowed for any topic list but an empty one,
    never graylisted. Scores themselves (mesh upkeep in the heartbeat) are left alone.
    Bound on this scorer instance only; a second call does nothing."""
    scorer = router.scorer
    if scorer is None or is_ours(scorer.allow_publish):
        return
    p = scorer.params
    if not p.publish_threshold == p.gossip_threshold == p.graylist_threshold == -math.inf:
        return

    @_mark
    def allowed(peer: ID, topics: list[str]) -> bool:
        return bool(topics)

    @_mark
    def graylisted(peer: ID, topics: list[str]) -> bool:
        return False

    setattr(scorer, "allow_publish", allowed)  # noqa: B010
    setattr(scorer, "allow_gossip", allowed)  # noqa: B010
    setattr(scorer, "is_graylisted", graylisted)  # noqa: B010


def prune_at_random(router: GossipSubInternals, rng: random.Random) -> None:
    """Choose the peers an over-full mesh PRUNEs at random, as the spec says.

    Upstream `_select_peers_for_pruning` sorts by score (all 0 with the default
    zero-weight `ScoreParams`, our configuration) and then, with
    `eclipse_protection_enabled` (the default), `_prune_for_ip_diversity` takes the
    first peers sharing an IP with two others: on one machine (loopback, a test
    net, one NAT) that is set-iteration order, fixed per process for a given mesh,
    so every over-full neighbour prunes the same peer again and again. Bound on
    this router instance only (upstream calls it via `self`); once per router."""
    if is_ours(router._select_peers_for_pruning):
        return

    @_mark
    def select(topic: str, num_to_prune: int) -> list[ID]:
        mesh = sorted(router.mesh.get(topic, ()), key=lambda p: p.to_bytes())
        return rng.sample(mesh, min(max(num_to_prune, 0), len(mesh)))

    setattr(router, "_select_peers_for_pruning", select)  # noqa: B010


def forget_back_off(router: GossipSubInternals, topic: str, peers: set[ID]) -> None:
    """Drop our back-off and GRAFT-flood entries for `peers` on `topic`: upstream
    keeps them past the PRUNE that made them (`handle_graft` re-arms a back-off on
    every refused GRAFT; `_check_graft_flood_protection` refuses a GRAFT within
    10 s of the sender's PRUNE), and `mesh_heartbeat` grafts only peers outside
    back-off."""
    back_off = router.back_off.get(topic, {})
    for peer in peers:
        back_off.pop(peer, None)
        router.graft_flood_tracking.get(peer, {}).pop(topic, None)


async def graft(router: GossipSubInternals, topic: str, peer: ID) -> bool:
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


async def prune(router: GossipSubInternals, topic: str, peer: ID) -> None:
    """Drop `peer` from our mesh for `topic` and send it a PRUNE as upstream's
    heartbeat does (no back-off in the message)."""
    if peer in router.mesh.get(topic, ()):
        router.mesh[topic].discard(peer)
        if router.scorer is not None:
            router.scorer.on_leave_mesh(peer, topic)
    control = rpc_pb2.ControlMessage()
    control.prune.extend([rpc_pb2.ControlPrune(topicID=topic)])
    await router.emit_control_message(control, peer)
