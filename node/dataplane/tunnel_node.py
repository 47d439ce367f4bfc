"""Tunnels as a node-daemon service, configured by the `[bandwidth]` section.

Runs `TunnelService` on the node's host when the node serves bandwidth leases: the
provider agent offers `bandwidth` and the dataplane is enabled. Leases come from the
node's shared derived market; the Usage at each lease's end is published with the node
key. The node's own addresses (interfaces and announced) are refused as destinations
unless an allow rule names them.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from ..config import BandwidthConfig
from ..events import Body
from .service import wall_clock_ms
from .tunnel import TunnelConfig, TunnelService, local_addresses

if TYPE_CHECKING:
    from ..context import NodeContext

__all__ = ["TunnelNodeService", "node_service", "tunnel_config"]

log = logging.getLogger(__name__)


def tunnel_config(b: BandwidthConfig) -> TunnelConfig:
    return TunnelConfig(
        egress=b.egress, allow=tuple(b.allow), deny=tuple(b.deny),
        max_tunnels=b.max_tunnels, max_tunnels_per_lease=b.max_tunnels_per_lease,
        max_tunnels_per_member=b.max_tunnels_per_member,
        max_streams_per_peer=b.max_streams_per_peer, open_timeout_s=b.open_timeout_s,
        connect_timeout_s=b.connect_timeout_s, idle_timeout_s=b.idle_timeout_s,
        write_timeout_s=b.write_timeout_s)


def _announced_ips(addrs: list[str]) -> list[str]:
    """The IP parts of multiaddrs like /ip4/203.0.113.7/tcp/4001 (DNS names skipped)."""
    out = []
    for a in addrs:
        parts = a.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            try:
                out.append(str(ipaddress.ip_address(parts[2])))
            except ValueError:
                continue
    return out


class TunnelNodeService:
    name = "tunnel"

    def __init__(self, node: NodeContext) -> None:
        self.config = tunnel_config(node.config.bandwidth)
        self.svc: TunnelService | None = None

    async def run(self, node: NodeContext) -> None:
        def publish(body: Body) -> None:
            node.publish(body)

        own = local_addresses(_announced_ips(list(node.host.addrs)))
        self.svc = TunnelService(node.host, node.ledger.network,
                                 lambda lid: node.market().leases.get(lid), publish,
                                 wall_clock_ms, self.config, own_addrs=own)
        log.info("tunnels served", extra={"egress": self.config.egress,
                                          "allow": list(self.config.allow),
                                          "max_tunnels": self.config.max_tunnels})
        await self.svc.run()

    def status(self) -> dict[str, Any]:
        return self.svc.stats() if self.svc else {"state": "starting"}


def node_service(node: NodeContext) -> TunnelNodeService | None:
    """A tunnel service when this node serves bandwidth leases, else None."""
    cfg = node.config
    offers_bandwidth = cfg.provider.enabled and "bandwidth" in cfg.provider.offers
    if not (cfg.dataplane.enabled and offers_bandwidth):
        return None
    return TunnelNodeService(node)
