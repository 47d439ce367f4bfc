"""What a service sees of the running node: `NodeContext`, and what a service is.

Services (query protocol, HTTP API, provider agent, dataplane, tunnels, plugins) depend
on this narrow Protocol, not on the daemon that composes them (node/daemon.py's `Node`
implements it): a service cannot reach into the replicator, the discovery or the
control socket, and no service module imports the daemon, so the import graph has no
cycle through it (tests/test_imports.py). Only type names are imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .auction import Market
    from .config import Config
    from .events import Body, Event
    from .keys import Identity
    from .ledger import AppendResult, Ledger
    from .marketview import LiveMarket
    from .p2p import P2PHost

EventListener = Callable[["list[Event]"], None]


class NodeContext(Protocol):
    """The running node, as services use it."""

    @property
    def config(self) -> Config: ...

    @property
    def identity(self) -> Identity:
        """The node key: services sign with it through `publish`, or prove who they are."""
        ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def host(self) -> P2PHost:
        """The libp2p host: services register their own protocols on it."""
        ...

    @property
    def live(self) -> LiveMarket:
        """The one derived market every service shares (`market()` is its current state)."""
        ...

    def market(self) -> Market: ...

    def submit(self, wire: bytes, source: Hashable = None) -> AppendResult:
        """Store a client's record, gossip it and tell the listeners (as from the network)."""
        ...

    def submit_many(self, wires: list[bytes], source: Hashable = None) -> list[AppendResult]:
        """`submit` for several records at once (one transaction)."""
        ...

    def publish(self, body: Body) -> Event:
        """Sign `body` with the node key, store it (committed) and gossip it."""
        ...

    def status(self) -> dict[str, Any]:
        """What status.json shows, live."""
        ...

    def add_listener(self, fn: EventListener) -> None:
        """Call `fn(events)` with every batch of newly stored events (from peers, from
        `submit` and from `publish`); `fn` must not block."""
        ...


class Service(Protocol):
    """A service: `name`, `async run(node)` until cancelled; optionally `status() -> dict`
    (shown in status.json under `services.<name>`)."""

    name: str

    async def run(self, node: NodeContext) -> None: ...


# A factory (built-ins, or the `bidmesh.services` entry-point group) gets the node
# before its services start and returns a service, or None when its config is off.
ServiceFactory = Callable[[NodeContext], "Service | None"]
