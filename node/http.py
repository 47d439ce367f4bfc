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
routing and `ConnTable` pure admission, both testable without sockets; `serve()`
is the I/O shell.
"""

from __future__ import annotations

import collections
import contextlib
import http
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import h11
import trio

from .auction.views import auction_json, auctions_json, leases_json, reputation_json
from .errors import UsageError
from .events import KINDS, event_to_json
from .ledger import Ledger
from .marketview import LiveMarket
from .output import parse_hex

if TYPE_CHECKING:
    from .context import NodeContext

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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError("http.port must be 0..65535")
        if self.max_connections < 1 or self.max_connections_per_ip < 1:
            raise UsageError("http.max_connections and max_connections_per_ip must be >= 1")
        if self.request_timeout_s <= 0 or self.keep_alive_s <= 0:
            raise UsageError("http.request_timeout_s and http.keep_alive_s must be > 0")
        if not 1024 <= self.max_request_bytes <= 1 << 20:
            raise UsageError("http.max_request_bytes must be 1024..1048576")

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


# ------------------------------------------------------------------ the server
#
# Connection admission is pure (`ConnTable`); `serve()` and `_serve_conn()` are the
# I/O shell. Rules (docs/decisions.md, "HTTP server"):
# * at most `max_connections`, and `max_connections_per_ip` from one address;
# * a connection is *waiting* while it has no complete request head: idle between
#   keep-alive requests (at most `keep_alive_s`) or receiving a head (which must
#   complete within `request_timeout_s` of its first byte: slowloris);
# * when a newcomer finds the node or its address full, the connection waiting
#   longest (at least EVICT_AFTER_S) is closed for it; only if none is waiting
#   that long does the newcomer get a 503. Connections being answered are never
#   evicted.

# A waiting connection younger than this is not evicted for a newcomer: an honest
# client sends its request head within milliseconds of connecting.
EVICT_AFTER_S: Final = 1.0


@dataclass(eq=False)
class ConnSlot:
    ip: str
    waiting_since: float | None
    scope: trio.CancelScope | None = None
    released: bool = False
    evicted: bool = False


class ConnTable:
    """Which HTTP connections may be open (sans-I/O; the clock is passed in)."""

    def __init__(self, max_total: int, max_per_ip: int, evict_after_s: float = EVICT_AFTER_S
                 ) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.evict_after_s = evict_after_s
        self._slots: set[ConnSlot] = set()
        self._per_ip: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._slots)

    def admit(self, ip: str, now: float) -> tuple[ConnSlot | None, list[ConnSlot]]:
        """A slot for a new connection from `ip` (None: refuse it with 503) and the
        connections evicted for it (already released: the shell closes them)."""
        evicted: list[ConnSlot] = []
        if self._per_ip[ip] >= self.max_per_ip and not self._evict(now, evicted, ip):
            return None, []
        if len(self._slots) >= self.max_total and not self._evict(now, evicted, None):
            return None, evicted
        slot = ConnSlot(ip, now)
        self._slots.add(slot)
        self._per_ip[ip] += 1
        return slot, evicted

    def _evict(self, now: float, out: list[ConnSlot], ip: str | None) -> bool:
        cutoff = now - self.evict_after_s
        old = [s for s in self._slots if s.waiting_since is not None
               and s.waiting_since <= cutoff and (ip is None or s.ip == ip)]
        if not old:
            return False
        victim = min(old, key=lambda s: s.waiting_since or 0.0)
        victim.evicted = True
        self.release(victim)
        out.append(victim)
        return True

    def release(self, slot: ConnSlot) -> None:
        if slot.released:
            return
        slot.released = True
        self._slots.discard(slot)
        self._per_ip[slot.ip] -= 1
        if self._per_ip[slot.ip] <= 0:
            del self._per_ip[slot.ip]

    @staticmethod
    def waiting(slot: ConnSlot, now: float) -> None:
        """The connection waits for a request head (idle keep-alive or a head arriving)."""
        slot.waiting_since = now

    @staticmethod
    def busy(slot: ConnSlot) -> None:
        """A complete request head arrived: it is being answered, not evictable."""
        slot.waiting_since = None


async def _send(stream: trio.abc.Stream, conn: h11.Connection, events: list[Any],
                timeout: float) -> None:
    data = b"".join(conn.send(ev) or b"" for ev in events)
    with trio.fail_after(timeout):
        await stream.send_all(data)


def _head(resp: Response, close: bool) -> h11.Response:
    headers = [(b"content-type", resp.content_type.encode()),
               (b"content-length", str(len(resp.body)).encode()),
               (b"cache-control", b"no-store"), *SECURITY_HEADERS]
    if resp.status == 405:
        headers.append((b"allow", b"GET, HEAD"))
    if close:
        headers.append((b"connection", b"close"))
    reason = http.HTTPStatus(resp.status).phrase.encode()
    return h11.Response(status_code=resp.status, headers=headers, reason=reason)


class _Reader:
    """Feeds h11 from the socket, within a deadline per request.

    The deadline starts as `idle_s` from the end of the previous response (how long
    a keep-alive connection may sit idle) and becomes `request_s` from the first
    byte of a request once one arrives (head and any body: slowloris). Memory is
    bounded without a byte count here: it reads only when h11 needs data, and h11
    refuses a head over `max_incomplete_event_size` (431); bodies are counted by
    the caller."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection, idle_s: float,
                 request_s: float) -> None:
        self.stream, self.conn = stream, conn
        self.idle_s, self.request_s = idle_s, request_s
        self.received = 0  # bytes of this request and after it (pipelined) given to h11
        self.got_bytes = False  # of the current request: a timeout then answers 408
        self.deadline = math.inf

    def next_request(self) -> None:
        self.received = len(self.conn.trailing_data[0])  # pipelined bytes already here
        self.got_bytes = bool(self.received)
        now = trio.current_time()
        self.deadline = now + (self.request_s if self.got_bytes else self.idle_s)

    async def event(self) -> Any:
        """The next h11 event (None when h11 pauses, e.g. after an Upgrade request).
        Raises trio.TooSlowError past the deadline."""
        while True:
            ev = self.conn.next_event()
            if ev is h11.PAUSED:
                return None
            if ev is not h11.NEED_DATA:
                return ev
            with trio.fail_at(self.deadline):
                data = await self.stream.receive_some(16 * 1024)
            if data and not self.got_bytes:
                self.got_bytes = True
                self.deadline = trio.current_time() + self.request_s
            self.received += len(data)
            self.conn.receive_data(data)

    def head_size(self) -> int:
        """Right after a Request event: the bytes its head took (h11 itself refuses
        only a head still incomplete beyond its limit, not one that came whole)."""
        return self.received - len(self.conn.trailing_data[0])


def _raw_error(status: int, message: str) -> bytes:
    """A complete error response with `connection: close`, for when h11's state
    machine cannot send one (before any request head, or instead of reading it)."""
    body = _error(status, message).body
    phrase = http.HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\ncache-control: no-store\r\n"
            "connection: close\r\n\r\n").encode() + body


async def _send_raw(stream: trio.abc.Stream, data: bytes) -> None:
    with trio.move_on_after(2), contextlib.suppress(trio.BrokenResourceError,
                                                    trio.ClosedResourceError):
        await stream.send_all(data)  # the client may already be gone


# After an error answer, unread request bytes are drained this long (at most
# LINGER_BYTES) before closing: closing with them unread makes the kernel send a
# reset, and the client may then lose the answer (a "lingering close").
LINGER_S: Final = 1.0
LINGER_BYTES: Final = 64 * 1024


async def _linger(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(LINGER_S), contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        if isinstance(stream, trio.SocketStream):
            await stream.send_eof()
        got = 0
        while got < LINGER_BYTES:
            data = await stream.receive_some(16 * 1024)
            if not data:
                return
            got += len(data)


def _body_length(req: h11.Request) -> int | None:
    """The declared body size (None: chunked, size unknown); h11 has validated it."""
    for name, value in req.headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            return int(value)
    return 0


async def _serve_conn(api: HttpApi, stream: trio.abc.Stream, settings: HttpSettings,
                      slot: ConnSlot) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_request_bytes)
    t = settings.request_timeout_s
    reader = _Reader(stream, conn, settings.keep_alive_s, t)
    max_body = settings.max_request_bytes
    # A new connection gets the request timeout for its first request to arrive.
    reader.deadline = trio.current_time() + t
    stats = api.conn_stats

    async def refuse(status: int, message: str, stat: str) -> None:
        stats[stat] += 1
        api.requests[str(status)] += 1
        await _send_raw(stream, _raw_error(status, message))
        await _linger(stream)

    while True:
        ConnTable.waiting(slot, trio.current_time())
        try:
            ev = await reader.event()
        except trio.TooSlowError:
            if reader.got_bytes:  # slowloris: a head that never completes
                await refuse(408, f"request not complete within {t} s", "timeout_request")
            else:  # an idle keep-alive connection: closing it silently is normal
                stats["timeout_idle"] += 1
            return
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint
            await refuse(status, f"bad request: {e}", "too_large" if status == 431
                         else "bad_request")
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not isinstance(ev, h11.Request):
            return  # ConnectionClosed (or None: h11 paused)
        ConnTable.busy(slot)
        if reader.head_size() > settings.max_request_bytes:
            await refuse(431, f"request head over {settings.max_request_bytes} bytes",
                         "too_large")
            return
        method = ev.method.decode("ascii", "replace")
        target = ev.target.decode("ascii", "replace")
        length = _body_length(ev)
        close = method not in ("GET", "HEAD")
        resp: Response | None = None
        if length is not None and length > max_body:
            resp, close = _error(413, f"request body over {max_body} bytes; this API "
                                 "takes no bodies"), True
            stats["too_large"] += 1
        elif conn.they_are_waiting_for_100_continue and length != 0:
            close = True  # answer without reading the body the client holds back
        else:
            # A GET carries no body; drain (bounded) whatever a client sent anyway.
            got = 0
            try:
                while isinstance(part := await reader.event(), h11.Data):
                    got += len(part.data)
                    if got > max_body:
                        await refuse(413, f"request body over {max_body} bytes; this API "
                                     "takes no bodies", "too_large")
                        return
            except trio.TooSlowError:
                await refuse(408, f"request not complete within {t} s", "timeout_request")
                return
            except h11.RemoteProtocolError as e:
                await refuse(e.error_status_hint, f"bad request: {e}", "bad_request")
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        # HEAD is GET without the body (RFC 9110 §9.3.2): h11 refuses body bytes after
        # a HEAD's headers, and that LocalProtocolError used to end the daemon.
        head_only = method == "HEAD"
        if resp is None:
            try:
                resp = api.handle("GET" if head_only else method, target)
            except Exception:  # a bug must answer 500, not kill the server
                log.exception("HTTP handler failed", extra={"target": target[:200]})
                resp = _error(500, "internal error; see the node log")
                api.requests["500"] += 1
        else:
            api.requests[str(resp.status)] += 1
        body = [] if head_only else [h11.Data(data=resp.body)]
        try:
            await _send(stream, conn, [_head(resp, close), *body, h11.EndOfMessage()], t)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                h11.LocalProtocolError):
            return
        if close or conn.our_state is h11.MUST_CLOSE:
            if conn.their_state is not h11.DONE:  # a body we did not read
                await _linger(stream)
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return
        reader.next_request()


async def serve(api: HttpApi, settings: HttpSettings, *,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; `task_status.started(port)` once listening."""
    listeners = await trio.open_tcp_listeners(settings.port, host=settings.listen)
    port = int(listeners[0].socket.getsockname()[1])
    table = api.conns = ConnTable(settings.max_connections, settings.max_connections_per_ip)

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                ip = str(stream.socket.getpeername()[0])
            except OSError:
                return  # already gone
            slot, evicted = table.admit(ip, trio.current_time())
            for old in evicted:
                api.conn_stats["evicted"] += 1
                if old.scope is not None:
                    old.scope.cancel()
            if slot is None:
                # Answer at once without reading the request; the client sees 503.
                api.conn_stats["refused_full"] += 1
                api.requests["503"] += 1
                await _send_raw(stream, _raw_error(503, "too many connections; retry "
                                                   "shortly"))
                await _linger(stream)
                return
            try:
                with trio.CancelScope() as slot.scope:
                    await _serve_conn(api, stream, settings, slot)
            finally:
                table.release(slot)

    log.info("http api listening", extra={"addr": f"{settings.listen}:{port}"})
    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await nursery.start(trio.serve_listeners, handler, listeners)


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
                "connections": {"open": len(api.conns) if api and api.conns else 0,
                                **(api.conn_stats if api else {})}}


def node_service(node: NodeContext) -> HttpService | None:
    """Factory for the daemon: an HTTP API when `[http] enabled = true`."""
    settings = HttpSettings.from_config(node.config.http)
    return HttpService(settings) if settings.enabled else None
