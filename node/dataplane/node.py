"""The dataplane as a node-daemon service, configured by the `[dataplane]` section.

Wires `DataplaneService` to the running node: leases and offers come from the node's
shared derived market, Usage and Subcontract events are published with the node
key, and processing runs in a worker-process pool. The services served locally are
the provider's offered processing services (every installed processor when the
node has no provider agent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..events import Body
from ..processors import load_processors
from ..processors.pool import WorkerPool
from .service import DataplaneConfig, DataplaneService

if TYPE_CHECKING:
    from ..context import NodeContext


class DataplaneNodeService:
    name = "dataplane"

    def __init__(self, node: NodeContext) -> None:
        cfg = node.config
        self.processors = load_processors(cfg.dataplane.exec)
        # Pass-through (`identity`) serves transport leases such as bandwidth.
        offered = ({*cfg.provider.offers, "identity"} if cfg.provider.enabled
                   else set(self.processors))
        dp = cfg.dataplane
        self.config = DataplaneConfig(
            services=frozenset(offered & set(self.processors)),
            max_streams=dp.max_streams,
            window=dp.window,
            process_peer_bytes=dp.process_peer_bytes,
            process_total_bytes=max(dp.process_total_bytes, dp.process_peer_bytes),
            process_sessions_per_peer=dp.process_sessions_per_peer,
            volume_factor=dp.process_volume_factor,
            served_max=dp.served_max,
            served_ttl_s=dp.served_ttl_s,
            contractor_unrated=dp.contractor_unrated,
            contractor_min_score_ppm=int(dp.contractor_min_score * 10_000),
            contractor_addrs_allow=tuple(dp.contractor_addrs_allow),
            contractor_addrs_deny=tuple(dp.contractor_addrs_deny),
            # Offer capacities are KiB/s (PROTOCOL.md, Offer).
            process_rates=tuple((name, max(1, spec["capacity"]) * 1024)
                                for name, spec in cfg.provider.offers.items())
            if cfg.provider.enabled else (),
        )
        self.svc: DataplaneService | None = None

    async def run(self, node: NodeContext) -> None:
        workers = node.config.dataplane.workers or None
        async with WorkerPool(self.processors, workers) as pool:

            def publish(body: Body) -> None:
                node.publish(body)

            self.svc = DataplaneService(
                node.host, node.identity, node.ledger.network,
                lambda lid: node.market().leases.get(lid), node.market, pool, publish,
                config=self.config)
            await self.svc.run()

    def status(self) -> dict[str, Any]:
        return self.svc.stats() if self.svc else {"state": "starting"}


def node_service(node: NodeContext) -> DataplaneNodeService | None:
    return DataplaneNodeService(node) if node.config.dataplane.enabled else None
