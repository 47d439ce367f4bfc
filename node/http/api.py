"""Routing, views and metrics of the HTTP API: `HttpApi.handle(method, target)` is
pure (no sockets); `HttpSettings` is the `[http]` section as the server uses it."""

from __future__ import annotations

import collections
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..auction.views import auction_json, auctions_json, leases_json, reputation_json
from ..errors import UsageError
from ..events import KINDS, event_to_json
from ..ledger import Ledger
from ..marketview import LiveMarket
from ..output import parse_hex

if TYPE_CHECKING:
    from .conns import ConnTable


log = logging.getLogger("bidmesh.http")


JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
     b"connect-src 'self'; frame-ancestors 'none'"),
]


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = False
    listen: str = "127.0.0.1"
    port: int = 8080
    max_connections: int = 64
    max_connections_per_ip: int = 16
    request_timeout_s: float = 10.0  # a request, from its first byte; also each response
    keep_alive_s: float = 5.0  # an idle connection between requests
    max_request_bytes: int = 16 * 1024  # request line + headers (GET has no body)
    growth_interval_s: float = 5.0
    accept_per_s: float = 50.0  # new connections served a second, after a burst of
    accept_burst: int = 16  # ... this many (conns.AcceptPacer)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError("http.port must be 0..65535")
        if self.max_connections < 1 or self.max_connections_per_ip < 1:
            raise UsageError("http.max_connections and max_connections_per_ip must be >= 1")
        if self.request_timeout_s <= 0 or self.keep_alive_s <= 0:
            raise UsageError("http.request_timeout_s and http.keep_alive_s must be > 0")
        if not 1024 <= self.max_request_bytes <= 1 << 20:
            raise UsageError("http.max_request_bytes must be 1024..1048576")
        if self.accept_per_s <= 0 or self.accept_burst < 1:
            raise UsageError("http.accept_per_s must be > 0 and http.accept_burst >= 1")

    @classmethod
    def from_config(cls, section: Any) -> HttpSettings:
        """From a config object/section with the same attribute names (or None)."""
        if section is None:
            return cls()
        kw = {k: getattr(section, k) for k in cls.__dataclass_fields__ if hasattr(section, k)}
        return cls(**kw)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":"), default=str).encode())


def _error(status: int, message: str) -> Response:
    return _json({"error": message, "status": status}, status)


class HttpApi:
    """Routing and rendering over a node's state (no I/O)."""

    def __init__(self, ledger: Ledger, live: LiveMarket, status: Callable[[], dict[str, Any]],
                 *, growth_size: int = 720) -> None:
        self.ledger = ledger
        self.live = live
        self.status = status
        self.requests: collections.Counter[str] = collections.Counter()
        self.conn_stats: collections.Counter[str] = collections.Counter()
        """Connections evicted, refused (full), timed out, too large, malformed."""
        self.conns: ConnTable | None = None  # set by serve()
        self.growth: collections.deque[tuple[float, int]] = collections.deque(maxlen=growth_size)
        self._static: dict[str, bytes] = {}

    def sample_growth(self) -> None:
        self.growth.append((round(time.time(), 3), self.ledger.count()))

    def handle(self, method: str, target: str) -> Response:
        parsed = urllib.parse.urlsplit(target)
        path = parsed.path
        if method != "GET":
            self.requests["405"] += 1
            return _error(405, f"{method} not allowed: this API is read-only (GET, HEAD)")
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        try:
            resp = self._route(path, q)
        except UsageError as e:
            resp = _error(400, str(e))
        self.requests[str(resp.status)] += 1
        return resp

    def _route(self, path: str, q: dict[str, str]) -> Response:
        if path in STATIC:
            name, ctype = STATIC[path]
            return Response(200, self._asset(name), ctype)
        if path == "/metrics":
            return Response(200, self.metrics().encode(), METRICS_TYPE)
        if path == "/api/health":
            st = self.status()
            return _json({"ok": st.get("state") == "running", "state": st.get("state"),
                          "events": self.ledger.count(), "peers": len(st.get("peers", [])),
                          "digest": self.ledger.digest().hex(), "time": time.time()})
        if path == "/api/digest":
            led = self.ledger
            return _json({"network": led.network, "digest": led.digest().hex(),
                          "events": led.count(), "authors": len(led.heads()),
                          "forked_authors": len(led.forked()), "kinds": led.count_by_kind()})
        if path == "/api/events":
            return self._events(q)
        if path == "/api/auctions":
            m = self.live.market()
            now = int(time.time() * 1000)
            items = sorted(auctions_json(m, now), key=lambda a: -a["ts_ms"])
            limit = _int(q, "limit", 200, 1, 5000)
            return _json(items[:limit])
        if path.startswith("/api/auctions/"):
            return self._auction(path.removeprefix("/api/auctions/"))
        if path == "/api/leases":
            return self._leases()
        if path == "/api/reputation":
            m = self.live.market()
            key = _hex(q["key"], "key") if "key" in q else None
            return _json(reputation_json(m, key, int(time.time() * 1000)))
        if path == "/api/peers":
            st = self.status()
            return _json({"peer_id": st.get("peer_id"), "listen_addrs": st.get("listen_addrs"),
                          "peers": st.get("peers", []), "blocked": st.get("blocked", {}),
                          "sync": st.get("sync", {}), "outbox": st.get("outbox"),
                          "pending": st.get("pending"), "gaps": st.get("gaps")})
        if path == "/api/growth":
            return _json([{"time": t, "events": n} for t, n in self.growth])
        return _error(404, f"no such resource {path}")

    def _asset(self, name: str) -> bytes:
        data = self._static.get(name)
        if data is None:
            data = resources.files("node").joinpath("web", name).read_bytes()
            self._static[name] = data
        return data

    def _events(self, q: dict[str, str]) -> Response:
        kind = q.get("kind")
        if kind is not None and kind not in KINDS:
            raise UsageError(f"unknown kind {kind!r}; known: {', '.join(sorted(KINDS))}")
        rows = self.ledger.events(
            kind=kind,
            author=_hex(q["author"], "author") if "author" in q else None,
            ref=_hex(q["ref"], "ref") if "ref" in q else None,
            after=_int(q, "after", 0, 0, 1 << 62),
            limit=_int(q, "limit", 100, 1, 1000))
        return _json({"events": [{"cursor": n, **event_to_json(ev)} for n, ev in rows],
                      "cursor": rows[-1][0] if rows else _int(q, "after", 0, 0, 1 << 62)})

    def _auction(self, ident: str) -> Response:
        rid = _hex(ident, "auction id")
        m = self.live.market()
        a = m.auctions.get(rid)
        if a is None:
            return _error(404, f"no auction {ident}")
        return _json(auction_json(m, a, int(time.time() * 1000)))

    def _leases(self) -> Response:
        m = self.live.market()
        now = int(time.time() * 1000)
        live = _live_usage(self.status().get("services", {}))
        out = []
        for d in sorted(leases_json(m), key=lambda d: -d["start_ms"]):
            d["active"] = d["start_ms"] <= now < d["end_ms"]
            d["live"] = live.get(d["id"])
            out.append(d)
        return _json(out)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> str:
        st = self.status()
        w = _Metrics()
        gossip = st.get("gossip", {}) or {}
        w.gauge("bidmesh_up", "1 while the node is running", 1 if st.get("state") == "running"
                else 0)
        w.gauge("bidmesh_ledger_events", "events stored", self.ledger.count())
        w.gauge("bidmesh_ledger_authors", "authors with at least one event",
                len(self.ledger.heads()))
        w.gauge("bidmesh_ledger_forked_authors", "authors with a fork proof",
                len(self.ledger.forked()))
        w.gauge("bidmesh_ledger_pending", "events waiting for a predecessor",
                st.get("pending", 0))
        w.gauge("bidmesh_peers", "connected peers", len(st.get("peers", [])))
        w.gauge("bidmesh_peers_blocked", "peers cut off for invalid input",
                len(st.get("blocked", {})))
        led = self.ledger.counters
        w.counter("bidmesh_events_total", "append outcomes (all sources)",
                  [({"outcome": k}, v) for k, v in sorted(led.items())
                   if not k.startswith("rejected:")])
        w.counter("bidmesh_events_rejected_total", "rejected events by reason",
                  [({"reason": k.removeprefix("rejected:")}, v) for k, v in sorted(led.items())
                   if k.startswith("rejected:")])
        sync = st.get("sync", {}) or {}
        w.counter("bidmesh_sync_rounds_total", "anti-entropy sessions", sync.get("rounds", 0))
        w.counter("bidmesh_sync_failed_total", "failed anti-entropy sessions",
                  sync.get("failed", 0))
        w.counter("bidmesh_sync_events_total", "events fetched by sync", sync.get("events", 0))
        w.counter("bidmesh_sync_stalled_total", "sync sessions a peer stalled (then backed off)",
                  sync.get("stalled", 0))
        w.gauge("bidmesh_sync_backed_off_peers", "peers not synced with after stalling",
                sync.get("backed_off_peers", 0))
        w.gauge("bidmesh_sync_slots_held", "sync sessions running",
                (sync.get("slots") or {}).get("held", 0))
        for k in ("batches_sent", "batches_received", "bytes_sent", "bytes_received",
                  "gossip_errors", "cut_off", "mesh_lost", "mesh_regrafts"):
            if isinstance(gossip.get(k), int):
                w.counter(f"bidmesh_gossip_{k}_total", f"gossip {k.replace('_', ' ')}",
                          gossip[k])
        if isinstance(gossip.get("mesh_peers"), int):
            w.gauge("bidmesh_gossip_mesh_peers", "peers in our gossipsub mesh",
                    gossip["mesh_peers"])
        if isinstance(gossip.get("faults"), dict):
            w.counter("bidmesh_peer_faults_total", "invalid input from peers by reason",
                      [({"reason": k}, v) for k, v in sorted(gossip["faults"].items())])
        _resource_metrics(w, st.get("resources") or {})
        services = st.get("services", {}) or {}
        q = services.get("query") or {}
        if q:
            w.counter("bidmesh_query_requests_total", "query protocol requests by kind",
                      [({"kind": k}, v) for k, v in sorted(q.get("requests", {}).items())])
            w.counter("bidmesh_query_submitted_total", "client-submitted events by outcome",
                      [({"outcome": k}, v) for k, v in sorted(q.get("submitted", {}).items())])
        dp = _dataplane_totals(services)
        w.counter("bidmesh_stream_bytes_total", "dataplane bytes by direction",
                  [({"direction": "in"}, dp["bytes_in"]), ({"direction": "out"},
                                                            dp["bytes_out"])])
        w.counter("bidmesh_segments_total", "segments processed", dp["segments"])
        w.counter("bidmesh_subcontracts_total", "segments subcontracted", dp["subcontracts"])
        w.counter("bidmesh_rate_limit_hits_total",
                  "times a peer hit a rate limit (dataplane and query submits)",
                  [({"where": "dataplane"}, dp["rate_limited"]),
                   ({"where": "query"}, int(q.get("rate_limited", 0) or 0))])
        w.gauge("bidmesh_streams_active", "open dataplane streams", dp["active_streams"])
        w.counter("bidmesh_http_requests_total", "HTTP requests by status",
                  [({"status": k}, v) for k, v in sorted(self.requests.items())])
        w.counter("bidmesh_http_connections_total", "HTTP connections closed early, by "
                  "cause (evicted, refused_full, timeout_idle, timeout_request, too_large, "
                  "bad_request)", [({"cause": k}, v) for k, v in sorted(self.conn_stats.items())])
        return w.text()


def _resource_metrics(w: _Metrics, res: dict[str, Any]) -> None:
    """The libp2p resource manager (status "resources", node/resources.py)."""
    if not res:
        return
    limits = res.get("limits", {})
    w._series("bidmesh_limit", "gauge", "resource manager limits ([limits], "
              "p2p.max_connections) by name", [({"name": k}, v) for k, v in sorted(limits.items())
               if isinstance(v, int) and not isinstance(v, bool)])
    for k in ("conn_idle_s", "conn_grace_s", "stream_idle_s"):
        if isinstance(limits.get(k), (int, float)):
            w.gauge(f"bidmesh_limit_{k.removesuffix('_s')}_seconds", f"limits.{k}", limits[k])
    conns = res.get("connections", {})
    w._series("bidmesh_connections", "gauge", "live libp2p connections by direction",
              [({"direction": d}, int(conns.get(d, 0))) for d in ("inbound", "outbound")])
    w.gauge("bidmesh_p2p_streams", "inbound libp2p streams held", res.get("streams", 0))
    w.gauge("bidmesh_requests_in_flight", "inbound requests being served",
            res.get("requests_in_flight", 0))
    w.counter("bidmesh_limit_refused_total", "connections, streams and requests refused by "
              "scope", [({"scope": k}, v) for k, v in sorted(res.get("refused", {}).items())])
    w.counter("bidmesh_idle_closed_total", "idle connections and streams closed",
              res.get("closed_idle", 0))
    w.counter("bidmesh_conns_evicted_total", "idle stranger connections closed to admit a "
              "newcomer", res.get("evicted", 0))
    w.counter("bidmesh_stream_faults_total", "inbound stream handler failures by reason",
              [({"reason": k}, v) for k, v in sorted(res.get("stream_faults", {}).items())])
    w.gauge("bidmesh_peerstore_peers", "peers in the libp2p peerstore",
            res.get("peerstore", {}).get("size", 0))


def _live_usage(services: dict[str, Any]) -> dict[str, Any]:
    """Per lease id (hex): live dataplane counters, from any service status shaped like
    the dataplane's (`leases: {id: {members: {key: {bytes_in, ...}}}}`)."""
    out: dict[str, Any] = {}
    for st in services.values():
        leases = st.get("leases") if isinstance(st, dict) else None
        if not isinstance(leases, dict):
            continue
        for lid, ls in leases.items():
            if not isinstance(ls, dict):
                continue
            raw = ls.get("members")
            members: dict[str, Any] = raw if isinstance(raw, dict) else {}
            tot = {"bytes_in": 0, "bytes_out": 0, "segments": 0}
            for m in members.values():
                for k in tot:
                    v = m.get(k) if isinstance(m, dict) else None
                    tot[k] += v if isinstance(v, int) else 0
            out[lid] = {**tot, "streams": ls.get("streams", 0), "members": len(members),
                        "rate_limited": ls.get("rate_limited", 0),
                        "subcontracts": ls.get("subcontracts", 0), "closed": ls.get("closed")}
    return out


def _dataplane_totals(services: dict[str, Any]) -> dict[str, int]:
    tot = {"bytes_in": 0, "bytes_out": 0, "segments": 0, "subcontracts": 0, "rate_limited": 0,
           "active_streams": 0}
    for u in _live_usage(services).values():
        for k in ("bytes_in", "bytes_out", "segments", "subcontracts", "rate_limited"):
            tot[k] += int(u.get(k) or 0)
    for st in services.values():
        if isinstance(st, dict) and isinstance(st.get("active_streams"), int):
            tot["active_streams"] += st["active_streams"]
    return tot


class _Metrics:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def _series(self, name: str, kind: str, help: str,
                value: int | float | list[tuple[dict[str, str], int]]) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")
        if isinstance(value, list):
            for labels, v in value:
                lab = ",".join(f'{k}="{_esc(str(x))}"' for k, x in labels.items())
                self.lines.append(f"{name}{{{lab}}} {v}")
        else:
            self.lines.append(f"{name} {value}")

    def gauge(self, name: str, help: str, value: int | float) -> None:
        self._series(name, "gauge", help, value)

    def counter(self, name: str, help: str,
                value: int | list[tuple[dict[str, str], int]]) -> None:
        self._series(name, "counter", help, value)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _hex(text: str, what: str) -> bytes:
    return parse_hex(text, what, exact=32)


def _int(q: dict[str, str], k: str, default: int, lo: int, hi: int) -> int:
    if k not in q:
        return default
    try:
        v = int(q[k])
    except ValueError:
        raise UsageError(f"{k} must be an integer") from None
    if not lo <= v <= hi:
        raise UsageError(f"{k} must be within {lo}..{hi}")
    return v
