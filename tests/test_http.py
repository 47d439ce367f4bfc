"""The read-only HTTP API, /metrics and the dashboard, over real HTTP on loopback; the
dashboard in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import json
import re
import select
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


def world(tmp_path: Path) -> tuple[World, Any]:
    """An awarded, paid, rated auction and a live (open) one."""
    # Now, not at import: a loaded suite reaches these tests more than the live
    # auction's 10 minutes after collection.
    now = int(time.time() * 1000)
    w = World(tmp_path)
    done = w.pub("alice", request(close_ms=now - 50_000, reveal_ms=now - 50_000,
                                  start_ms=now - 40_000, duration_ms=3_600_000), now - 60_000)
    b = w.bid("bob", done, 400, now - 55_000)
    a = w.pub("alice", award(done.id, b.id, 400, [b.id]), now - 45_000)
    w.pub("alice", payment(a.id, 400), now - 30_000)
    w.pub("alice", rating(a.id, "bob", "provider", score=4), now - 20_000)
    live = w.pub("carol", request(service="zstd", close_ms=now + 600_000,
                                  reveal_ms=now + 600_000, start_ms=now + 700_000,
                                  duration_ms=60_000), now - 10_000)
    w.pub("bob", Bid(request=live.id, price=321), now - 5_000)
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
            assert status == 405 and headers["allow"] == "GET, HEAD"
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


async def exchange(base: str, data: bytes, *, drip_s: float = 0.0) -> bytes:
    """Send `data` on a new connection (a byte every `drip_s` if set), then read until
    the server closes; bounded."""
    def run() -> bytes:
        s = raw_connect(base)
        s.settimeout(30)
        try:
            if drip_s:
                for i in range(len(data)):
                    if select.select([s], [], [], drip_s)[0]:
                        break  # the server answered (gave up on us): read it
                    try:
                        s.sendall(data[i:i + 1])
                    except OSError:
                        break
            else:
                s.sendall(data)
            return read_all(s)
        finally:
            s.close()
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(run)


def statuses(answer: bytes) -> list[int]:
    """Status codes of the responses in `answer` (status lines can follow a body)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


async def test_keep_alive_pipelining_and_head(tmp_path: Path) -> None:
    w, _ = world(tmp_path)
    async with http_server(w) as (base, _):
        # Pipelined: answered in order on one connection, HEAD without a body.
        both = await exchange(base, b"GET /api/health HTTP/1.1\r\nhost: x\r\n\r\n"
                              b"HEAD /api/digest HTTP/1.1\r\nhost: x\r\n\r\n"
                              b"GET /api/nope HTTP/1.1\r\nhost: x\r\n\r\n"
                              b"GET /api/digest HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert statuses(both) == [200, 200, 404, 200]
        parts = both.split(b"HTTP/1.1 ")
        assert parts[2].endswith(b"\r\n\r\n")  # the HEAD answer: headers only
        # Keep-alive: request, read the answer, request again on the same socket.
        def sequential() -> list[bytes]:
            s = raw_connect(base)
            out = []
            try:
                for _ in range(3):
                    s.sendall(b"GET /api/health HTTP/1.1\r\nhost: x\r\n\r\n")
                    got = b""
                    while b"}" not in got:
                        chunk = s.recv(65536)
                        if not chunk:  # closed: the assertion below says so
                            break
                        got += chunk
                    out.append(got)
            finally:
                s.close()
            return out
        answers = await trio.to_thread.run_sync(sequential)
        assert [statuses(a) for a in answers] == [[200]] * 3
        # Methods: 405 with Allow, and the connection closes after it.
        status, headers, _ = await get(base + "/api/health", "DELETE")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        answer = await exchange(base, b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n"
                                b"GET /api/health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert statuses(answer) == [405]


async def test_slowloris_idle_keep_alive_and_sizes(tmp_path: Path) -> None:
    w, _ = world(tmp_path)
    async with http_server(w, request_timeout_s=1.0, keep_alive_s=0.5,
                           max_request_bytes=2048) as (base, api):
        # A head dripped a byte at a time never completes in time: 408, then closed,
        # although bytes keep arriving (a per-read timeout would never fire).
        drip = b"GET /api/health HTTP/1.1\r\nhost: x\r\n" + b"x-a: b\r\n" * 40 + b"\r\n"
        assert statuses(await exchange(base, drip, drip_s=0.02)) == [408]
        # A body that never arrives: 408 too.
        assert statuses(await exchange(base, b"GET /api/health HTTP/1.1\r\nhost: x\r\n"
                                       b"content-length: 10\r\n\r\nab")) == [408]
        # An idle keep-alive connection is closed after its answer, silently.
        answer = await exchange(base, b"GET /api/health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert statuses(answer) == [200] and answer.endswith(b"}")
        # A connection that never sends anything is closed without an answer.
        assert await exchange(base, b"") == b""
        # Sizes: an oversized head 431, a declared body over the budget 413 at once
        # (without sending it), a chunked body running over 413.
        big = b"GET /api/health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 4096 + b"\r\n\r\n"
        assert statuses(await exchange(base, big)) == [431]
        assert statuses(await exchange(base, b"GET /api/health HTTP/1.1\r\nhost: x\r\n"
                                       b"content-length: 100000000\r\n\r\n")) == [413]
        chunked = (b"GET /api/health HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                   b"\r\n" + (b"400\r\n" + b"z" * 1024 + b"\r\n") * 4)
        assert statuses(await exchange(base, chunked)) == [413]
        # A small body is drained and the request answered.
        assert statuses(await exchange(base, b"GET /api/health HTTP/1.1\r\nhost: x\r\n"
                                       b"content-length: 3\r\nconnection: close\r\n\r\n"
                                       b"abc")) == [200]
        # Expect: 100-continue with a body: answered without waiting for the body.
        assert statuses(await exchange(base, b"GET /api/health HTTP/1.1\r\nhost: x\r\n"
                                       b"expect: 100-continue\r\ncontent-length: 3\r\n\r\n"
                                       )) == [200]
        # Malformed request lines: 4xx/5xx, never a hang or a crash.
        for bad in (b"GET\r\n\r\n", b"GET / HTTP/1.1 x\r\n\r\n", b"\x16\x03\x01\x02\x00",
                    b"GET / HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n",
                    b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
                    bytes(range(256))):
            got = statuses(await exchange(base, bad))
            assert len(got) == 1 and 400 <= got[0] < 600, (bad, got)
        st = api.conn_stats
        assert st["timeout_request"] == 2 and st["timeout_idle"] >= 1
        assert st["too_large"] == 3 and st["bad_request"] >= 6
        assert (await get(base + "/api/health"))[0] == 200


async def test_connection_caps_and_eviction(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    w, _ = world(tmp_path)
    async with http_server(w, max_connections=3, max_connections_per_ip=2,
                           request_timeout_s=60, keep_alive_s=60) as (base, api):
        # Two silent connections fill this address's share; a newcomer from the same
        # address evicts the one waiting longest once it has waited a second.
        holders = [raw_connect(base) for _ in range(2)]
        with trio.fail_after(30):
            while api.conns is None or len(api.conns) < 2:
                await trio.sleep(0.05)
            while (await get(base + "/api/health"))[0] != 200:
                await trio.sleep(0.2)
        assert api.conn_stats["evicted"] >= 1

        def closed_by_server(s: socket.socket) -> bool:
            s.settimeout(5)
            try:
                return s.recv(1) == b""
            except TimeoutError:
                return False
        # Which holder went depends on the order their handlers started.
        assert any([await trio.to_thread.run_sync(closed_by_server, h) for h in holders])
        for h in holders:
            h.close()
    # Without anyone evictable (every holder younger than the grace), 503 at once.
    import node.http as http_mod
    monkeypatch.setattr(http_mod, "EVICT_AFTER_S", 3600.0)
    async with http_server(w, max_connections=2, request_timeout_s=60,
                           keep_alive_s=60) as (base, api):
        holders = [raw_connect(base) for _ in range(2)]
        with trio.fail_after(30):
            while api.conns is None or len(api.conns) < 2:
                await trio.sleep(0.05)
        status, _, body = await get(base + "/api/health")
        assert status == 503 and b"too many connections" in body
        assert api.conn_stats["refused_full"] == 1
        holders[0].close()
        with trio.fail_after(30):
            while (await get(base + "/api/health"))[0] != 200:
                await trio.sleep(0.05)
        holders[1].close()


def test_conn_table_admission() -> None:
    from node.http import ConnTable

    t = ConnTable(max_total=3, max_per_ip=2, evict_after_s=1.0)
    a1, ev = t.admit("a", 0.0)
    a2, _ = t.admit("a", 0.0)
    assert a1 and a2 and ev == []
    assert t.admit("a", 0.5) == (None, [])  # a's share full, nobody waited 1 s
    t.busy(a1)  # being answered: never evicted
    a3, ev = t.admit("a", 2.0)
    assert a3 and ev == [a2] and a2.released and a2.evicted
    b1, ev = t.admit("b", 2.0)
    assert b1 and ev == [] and len(t) == 3
    assert t.admit("c", 2.5) == (None, [])  # full: a1 busy, a3 and b1 waited < 1 s
    t.busy(a3)
    t.waiting(a1, 2.5)  # a1 answered, now idle keep-alive
    c1, ev = t.admit("c", 4.0)
    assert c1 and ev == [b1] and len(t) == 3  # the one waiting longest
    t.release(b1)  # idempotent
    for slot in (a1, c1, c1):
        t.release(slot)
    assert len(t) == 1


def test_accept_pacer_spreads_a_flood_and_refuses_past_the_wait() -> None:
    from node.http import AcceptPacer

    p = AcceptPacer(rate=10, burst=3, wait_max_s=0.25)
    # A burst of 3 at once, then one every 0.1 s; 0.25 s of waiting at most.
    assert [p.delay(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    waits = [p.delay(0.0) for _ in range(2)]
    assert waits == pytest.approx([0.1, 0.2])
    assert p.delay(0.0) is None  # would wait 0.3 s: refused, takes no place
    assert p.delay(0.05) == pytest.approx(0.25)  # the refused one reserved nothing
    assert p.delay(10.0) == 0.0  # quiet for a while: the burst is back
    assert [p.delay(10.0) for _ in range(2)] == [0.0, 0.0]


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
