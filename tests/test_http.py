"""The read-only HTTP API, /metrics and the dashboard, over real HTTP on loopback; the
dashboard in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from market_helpers import World, award, ident, key, payment, rating, request

from node.events import Bid
from node.http import HttpApi, HttpSettings, serve
from node.marketview import LiveMarket

NOW = int(time.time() * 1000)


def world(tmp_path: Path) -> tuple[World, Any]:
    """An awarded, paid, rated auction and a live (open) one."""
    w = World(tmp_path)
    done = w.pub("alice", request(close_ms=NOW - 50_000, reveal_ms=NOW - 50_000,
                                  start_ms=NOW - 40_000, duration_ms=3_600_000), NOW - 60_000)
    b = w.bid("bob", done, 400, NOW - 55_000)
    a = w.pub("alice", award(done.id, b.id, 400, [b.id]), NOW - 45_000)
    w.pub("alice", payment(a.id, 400), NOW - 30_000)
    w.pub("alice", rating(a.id, "bob", "provider", score=4), NOW - 20_000)
    live = w.pub("carol", request(service="zstd", close_ms=NOW + 600_000,
                                  reveal_ms=NOW + 600_000, start_ms=NOW + 700_000,
                                  duration_ms=60_000), NOW - 10_000)
    w.pub("bob", Bid(request=live.id, price=321), NOW - 5_000)
    return w, live


def status_of(w: World) -> dict[str, Any]:
    return {"state": "running", "peer_id": "12D3Koo-test", "peers": ["12D3KooPeerA"],
            "blocked": {}, "sync": {"rounds": 7, "failed": 1, "events": 3},
            "gossip": {"batches_sent": 2, "faults": {"bad_signature": 1}},
            "services": {
                "query": {"requests": {"AuctionBundle": 3}, "submitted": {"accepted": 2},
                          "rate_limited": 1},
                "dataplane": {"active_streams": 1, "leases": {
                    w.events[2].id.hex(): {"streams": 1, "closed": False, "rate_limited": 2,
                                           "subcontracts": 1, "members": {
                                               "ab" * 32: {"bytes_in": 1000, "bytes_out": 900,
                                                           "segments": 4}}}}}}}


@asynccontextmanager
async def http_server(w: World, **kw: Any) -> AsyncIterator[tuple[str, HttpApi]]:
    api = HttpApi(w.ledger, LiveMarket(w.ledger), lambda: status_of(w))
    api.sample_growth()
    settings = HttpSettings(enabled=True, port=0, **kw)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, api, settings)
        yield f"http://127.0.0.1:{port}", api
        nursery.cancel_scope.cancel()


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


async def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(fetch, url, method)


async def get_json(url: str) -> Any:
    status, headers, body = await get(url)
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    return json.loads(body)


async def test_api_over_http(tmp_path: Path) -> None:
    w, live = world(tmp_path)
    async with http_server(w) as (base, _):
        health = await get_json(base + "/api/health")
        assert health["ok"] is True and health["events"] == 7
        digest = await get_json(base + "/api/digest")
        assert digest["digest"] == w.ledger.digest().hex() and digest["network"] == "test"
        evs = await get_json(base + "/api/events?kind=bid&limit=1")
        assert len(evs["events"]) == 1 and evs["events"][0]["kind"] == "bid"
        more = await get_json(base + f"/api/events?kind=bid&after={evs['cursor']}")
        assert len(more["events"]) == 1
        auctions = await get_json(base + "/api/auctions")
        assert auctions[0]["id"] == live.id.hex()
        assert {a["status"] for a in auctions} == {"open", "awarded"}
        one = await get_json(base + f"/api/auctions/{live.id.hex()}")
        assert one["bid_list"][0]["price"] == 321
        assert one["bid_list"][0]["reputation"]["ratings"] == 1  # bob was rated before
        leases = await get_json(base + "/api/leases")
        assert leases[0]["paid"] == 400 and leases[0]["active"] is True
        assert leases[0]["live"]["bytes_in"] == 1000
        rep = await get_json(base + "/api/reputation?key=" + key("bob").hex())
        assert rep[0]["provider"]["ratings"] == 1
        peers = await get_json(base + "/api/peers")
        assert peers["peers"] == ["12D3KooPeerA"]
        assert len(await get_json(base + "/api/growth")) == 1
        # Errors: unknown path, bad id, non-GET methods.
        assert (await get(base + "/api/nope"))[0] == 404
        assert (await get(base + "/api/auctions/zz"))[0] == 400
        assert (await get(base + "/api/auctions/" + "00" * 32))[0] == 404
        assert (await get(base + "/api/events?limit=0"))[0] == 400
        for method in ("POST", "PUT", "DELETE"):
            status, headers, _ = await get(base + "/api/health", method)
            assert status == 405 and headers["allow"] == "GET"
        # HEAD: GET's status and headers, no body, and the connection stays usable.
        h = raw_connect(base)
        h.sendall(b"HEAD /api/health HTTP/1.1\r\nhost: x\r\n\r\n"
                  b"GET /api/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        both = await trio.to_thread.run_sync(read_all, h)
        h.close()
        head, _, rest = both.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head.lower()
        assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"}"), rest[:200]
        status, headers, page = await get(base + "/")
        assert status == 200 and b"/app.js" in page
        assert "default-src 'self'" in headers["content-security-policy"]


async def test_metrics_over_http(tmp_path: Path) -> None:
    w, _ = world(tmp_path)
    w.ledger.append(b"garbage")
    async with http_server(w) as (base, _):
        status, headers, body = await get(base + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE "))
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples["bidmesh_up"] == 1
    assert samples["bidmesh_ledger_events"] == 7
    assert samples['bidmesh_events_total{outcome="accepted"}'] == 7
    assert samples['bidmesh_events_rejected_total{reason="malformed"}'] == 1
    assert samples["bidmesh_sync_rounds_total"] == 7
    assert samples["bidmesh_peers"] == 1
    assert samples['bidmesh_stream_bytes_total{direction="in"}'] == 1000
    assert samples["bidmesh_segments_total"] == 4
    assert samples["bidmesh_subcontracts_total"] == 1
    assert samples['bidmesh_rate_limit_hits_total{where="dataplane"}'] == 2
    assert samples['bidmesh_rate_limit_hits_total{where="query"}'] == 1
    assert samples['bidmesh_query_requests_total{kind="AuctionBundle"}'] == 3
    assert samples['bidmesh_peer_faults_total{reason="bad_signature"}'] == 1


def raw_connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


async def test_limits_cap_timeout_and_oversized_head(tmp_path: Path) -> None:
    w, _ = world(tmp_path)
    async with http_server(w, max_connections=1, request_timeout_s=0.5,
                           max_request_bytes=2048) as (base, api):
        # A slow client holding the only slot is cut off after the timeout ...
        slow = raw_connect(base)
        slow.sendall(b"GET /api/health HTTP/1.1\r\n")
        with trio.fail_after(5):
            while api.requests["503"] == 0:
                status, _, _ = await get(base + "/api/health")
                if status == 503:
                    break
        # ... after which the slot is free again.
        assert await trio.to_thread.run_sync(read_all, slow) == b""
        slow.close()
        with trio.fail_after(5):
            while (await get(base + "/api/health"))[0] != 200:
                await trio.sleep(0.05)
        # An oversized request head is refused, not buffered.
        big = raw_connect(base)
        big.sendall(b"GET /api/health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 4096 + b"\r\n\r\n")
        answer = await trio.to_thread.run_sync(read_all, big)
        big.close()
        assert answer.startswith(b"HTTP/1.1 431") or answer.startswith(b"HTTP/1.1 400")
        # Keep-alive: two requests on one connection.
        ka = raw_connect(base)
        ka.sendall(b"GET /api/health HTTP/1.1\r\nhost: x\r\n\r\n"
                   b"GET /api/digest HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        both = await trio.to_thread.run_sync(read_all, ka)
        ka.close()
        assert both.count(b"HTTP/1.1 200") == 2


# ------------------------------------------------------------------ headless browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("the dashboard test needs Debian's chromium: run `apt-get install -y "
                    "chromium` (CI: add it to .ci/run)")
    return exe


async def dump_dom(tmp_path: Path, url: str) -> tuple[str, list[str]]:
    """The DOM after scripts ran (virtual time), and the page's console lines."""
    exe = chromium()
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    with trio.fail_after(60):
        proc = await trio.run_process(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=8000",
             "--dump-dom", url], capture_stdout=True, capture_stderr=True, check=False)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err[-2000:]
    console = [line for line in err.splitlines() if ":CONSOLE(" in line or "Uncaught" in line]
    return proc.stdout.decode(errors="replace"), console


async def test_console_errors_are_detected(tmp_path: Path) -> None:
    """The check below would see a broken page (a negative control for the browser test)."""
    _, console = await dump_dom(tmp_path, "data:text/html,<script>no_such_function()</script>")
    assert any("no_such_function" in line for line in console), console


async def test_dashboard_in_headless_browser(tmp_path: Path) -> None:
    w, live = world(tmp_path)
    async with http_server(w) as (base, api):
        dom, console = await dump_dom(tmp_path, base + "/")
        assert console == [], console
        assert live.id.hex()[:12] in dom, dom[:3000]  # the live auction is listed ...
        assert "status-open" in dom and "321" in dom  # ... open, with its bid
        assert "cannot reach the node API" not in dom
        assert ident("bob").public.hex()[:12] in dom  # reputation / bids
        assert api.requests["200"] >= 8  # the page polled the API
