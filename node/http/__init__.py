"""The node's read-only HTTP API, web dashboard and Prometheus metrics.

Served by the daemon when enabled in its config (see `HttpSettings`; bind
127.0.0.1 by default). GET and HEAD only: any other method gets 405.

    GET /api/health              {"ok": true, "state", "events", "digest", ...}
    GET /api/digest              state digest and counts
    GET /api/events?kind=&author=&ref=&after=&limit=   events in arrival order (paged)
    GET /api/auctions            auction summaries (newest first)
    GET /api/auctions/ID         one auction: bids with reputation, awards, evidence
    GET /api/leases              leases, with live usage from the dataplane when running
    GET /api/reputation[?key=]   reputation of every rated key (or one)
    GET /api/peers               connected peers, blocked peers, sync state
    GET /api/growth              ledger size over time (sampled)
    GET /metrics                 Prometheus text format
    GET /                        the dashboard (node/web/)

The protocol is h11 (sans-I/O) over trio sockets (docs/decisions.md says why not a
server package): keep-alive and pipelined requests are answered in order; a request
head is bounded in bytes (431) and must arrive within `request_timeout_s` of its
first byte (408), an idle keep-alive connection is closed after `keep_alive_s`,
bodies are not wanted (413 beyond the budget); connections are capped in total and
per client address, and a newcomer finding them full evicts the connection that has
waited longest for a request (else 503). `HttpApi.handle(method, target)` is pure
routing (api.py) and `ConnTable` pure admission (conns.py), both testable without
sockets; `serve()` (server.py) is the I/O shell. Every name is importable from here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from .api import (
    JSON_TYPE,
    METRICS_TYPE,
    SECURITY_HEADERS,
    STATIC,
    HttpApi,
    HttpSettings,
    Response,
    _Metrics,
    _resource_metrics,
)
from .conns import EVICT_AFTER_S, AcceptPacer, ConnSlot, ConnTable
from .server import serve

if TYPE_CHECKING:
    from ..context import NodeContext

__all__ = [
    "EVICT_AFTER_S", "JSON_TYPE", "METRICS_TYPE", "SECURITY_HEADERS", "STATIC", "AcceptPacer",
    "ConnSlot", "ConnTable", "HttpApi", "HttpService", "HttpSettings", "Response", "_Metrics",
    "_resource_metrics", "node_service", "serve",
]

log = logging.getLogger("bidmesh.http")


class HttpService:
    """The daemon service: `name`, `run(node)`, `status()`."""

    name = "http"

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self.api: HttpApi | None = None
        self.port: int | None = None

    async def run(self, node: NodeContext) -> None:
        if not self.settings.enabled:
            log.info("http api disabled (http.enabled = false)")
            return
        self.api = HttpApi(node.ledger, node.live, node.status)
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve, self.api, self.settings)
            while True:
                self.api.sample_growth()
                await trio.sleep(self.settings.growth_interval_s)

    def status(self) -> dict[str, Any]:
        api = self.api
        return {"enabled": self.settings.enabled, "port": self.port,
                "listen": self.settings.listen,
                "requests": dict(api.requests) if api else {},
                "accept_per_s": self.settings.accept_per_s,
                "accept_burst": self.settings.accept_burst,
                "connections": {"open": len(api.conns) if api and api.conns else 0,
                                **(api.conn_stats if api else {})}}


def node_service(node: NodeContext) -> HttpService | None:
    """Factory for the daemon: an HTTP API when `[http] enabled = true`."""
    settings = HttpSettings.from_config(node.config.http)
    return HttpService(settings) if settings.enabled else None
