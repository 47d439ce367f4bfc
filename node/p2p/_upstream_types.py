"""Typed Protocols for the py-libp2p members node/p2p/ uses beyond the public interfaces.

Upstream's `IHost`, `INetwork` and `IPubsub` lack most of what the package needs
(the swarm's connection table and listeners, the peerstore's maps, pubsub's peer
queues, gossipsub's mesh and back-offs), so each concrete class the package reaches
into is named here as a Protocol listing exactly the members used. `_conforms`
makes mypy check them against the installed classes: an upstream change of one of
them fails the type check, not a handler at run time. The replacements and edits
that use these types are node/p2p/_compat.py and node/p2p/_compat_gossipsub.py.

Importing any module of node/p2p runs the package's `__init__`, which imports
`_compat` first: its version check runs before the libp2p imports below.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio
from libp2p.abc import IHost, IListener, INetConn, INetStream, INotifee, ISubscriptionAPI
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol, ValidatorFn
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.rpc_queue import RpcQueue

# Read-only members are properties (mypy then accepts upstream's narrower types);
# members we assign are plain attributes.


class _TaskRunner(Protocol):
    def run_task(self, async_fn: Callable[..., Awaitable[Any]], *args: Any,
                 daemon: bool = False, name: str | None = None) -> None: ...


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


class SwarmInternals(Protocol):
    """The members of `libp2p.network.swarm.Swarm` the package uses."""

    _inbound_limiter: trio.CapacityLimiter

    @property
    def connections(self) -> dict[ID, list[INetConn]]: ...

    @property
    def listeners(self) -> dict[str, IListener]: ...

    @property
    def manager(self) -> _TaskRunner: ...

    @property
    def auto_connector(self) -> _Stoppable: ...

    def unblock_peer(self, peer_id: ID) -> None: ...

    def register_notifee(self, notifee: INotifee) -> None: ...

    def set_stream_handler(self,
                           stream_handler: Callable[[INetStream], Awaitable[None]]) -> None: ...

    async def close(self) -> None: ...


class PeerStoreInternals(Protocol):
    """The members of `libp2p.peer.peerstore.PeerStore` the package uses."""

    max_peers: int

    @property
    def peer_data_map(self) -> dict[ID, Any]: ...

    @property
    def peer_record_map(self) -> dict[ID, Any]: ...

    @property
    def addr_update_channels(self) -> dict[ID, Any]: ...

    def add_key_pair(self, peer_id: ID, key_pair: KeyPair) -> None: ...

    def get_protocols(self, peer_id: ID) -> list[str]: ...


class HostInternals(Protocol):
    """The private member of `libp2p.host.basic_host.BasicHost` the package reads."""

    @property
    def _identified_peers(self) -> dict[ID, str]: ...


class _SeenCache(Protocol):
    def stop(self) -> None: ...

    def has(self, key: bytes) -> bool: ...


class PubsubInternals(Protocol):
    """The members of `libp2p.pubsub.pubsub.Pubsub` the package uses."""

    @property
    def peer_topics(self) -> dict[str, set[ID]]: ...

    @property
    def peer_queues(self) -> dict[ID, RpcQueue]: ...

    @property
    def peers(self) -> dict[ID, INetStream]: ...

    @property
    def subscribed_topics_send(self) -> dict[str, trio.MemorySendChannel[rpc_pb2.Message]]: ...

    @property
    def manager(self) -> _TaskRunner: ...

    @property
    def seen_messages(self) -> _SeenCache: ...

    async def subscribe(self, topic_id: str) -> ISubscriptionAPI: ...

    def set_topic_validator(self, topic: str, validator: ValidatorFn,
                            is_async_validator: bool) -> None: ...

    async def publish(self, topic_id: str | list[str], data: bytes) -> None: ...

    def get_message_id(self, msg: rpc_pb2.Message) -> bytes: ...

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None: ...

    def _is_subscribed_to_msg(self, msg: rpc_pb2.Message) -> bool: ...

    async def wait_until_ready(self) -> None: ...

    async def _handle_new_peer_with_retry(self, peer_id: ID,
                                          timeout: float | None = None) -> None: ...


class _ScoreThresholds(Protocol):
    publish_threshold: float
    gossip_threshold: float
    graylist_threshold: float


class _MeshScorer(Protocol):
    @property
    def params(self) -> _ScoreThresholds: ...

    def on_join_mesh(self, peer: ID, topic: str) -> None: ...

    def on_leave_mesh(self, peer: ID, topic: str) -> None: ...

    def allow_publish(self, peer: ID, topics: list[str]) -> bool: ...

    def allow_gossip(self, peer: ID, topics: list[str]) -> bool: ...

    def is_graylisted(self, peer: ID, topics: list[str]) -> bool: ...


class GossipSubInternals(Protocol):
    """The members of `libp2p.pubsub.gossipsub.GossipSub` the package uses."""

    protocols: list[TProtocol]

    @property
    def mesh(self) -> dict[str, set[ID]]: ...

    @property
    def recent_message_deliveries(self) -> dict[str, list[float]]: ...

    @property
    def back_off(self) -> dict[str, dict[ID, int]]: ...

    @property
    def graft_flood_tracking(self) -> dict[ID, dict[str, float]]: ...

    @property
    def scorer(self) -> _MeshScorer | None: ...

    async def emit_control_message(self, control_msg: rpc_pb2.ControlMessage,
                                   to_peer: ID) -> None: ...

    async def handle_prune(self, prune_msg: rpc_pb2.ControlPrune, sender_peer_id: ID) -> None: ...

    async def handle_ihave(self, ihave_msg: rpc_pb2.ControlIHave, sender_peer_id: ID) -> None: ...

    async def emit_graft(self, topic: str, id: ID) -> None: ...

    async def emit_iwant(self, msg_ids: Sequence[bytes], to_peer: ID) -> None: ...

    def _add_back_off(self, peer: ID, topic: str, is_unsubscribe: bool,
                      backoff_duration: int = 0) -> None: ...

    def _is_gossipsub_peer(self, peer_id: ID) -> bool: ...

    def _notify_mesh_peer_added(self, peer_id: ID, topic: str) -> None: ...

    def _select_peers_for_pruning(self, topic: str, num_to_prune: int) -> list[ID]: ...

    def _get_peers_to_send(self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID,
                           msg_id: bytes | None = None) -> Iterable[ID]: ...


if TYPE_CHECKING:
    from libp2p.host.basic_host import BasicHost
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.pubsub import Pubsub

    def _conforms(swarm: Swarm, store: PeerStore, host: BasicHost, pubsub: Pubsub,
                  router: GossipSub) -> tuple[SwarmInternals, PeerStoreInternals,
                                              HostInternals, PubsubInternals,
                                              GossipSubInternals]:
        """Never called: mypy checks that the installed classes have these members."""
        return swarm, store, host, pubsub, router


def swarm_of(host: IHost) -> SwarmInternals:
    """The host's network as the concrete `Swarm` (BasicHost.get_network is typed
    as the interface, which lacks the members we need)."""
    network = host.get_network()
    if not isinstance(network, Swarm):
        raise TypeError(f"expected py-libp2p's Swarm, got {type(network).__name__}")
    return network


def peerstore_of(host: IHost) -> PeerStoreInternals:
    """The host's peerstore as the concrete `PeerStore`."""
    store = host.get_peerstore()
    if not isinstance(store, PeerStore):
        raise TypeError(f"expected py-libp2p's PeerStore, got {type(store).__name__}")
    return store
