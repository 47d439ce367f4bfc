"""Hostile peers as code (issue 12): each attack class of the open network, played
from this process with real libp2p hosts (node.p2p, py-libp2p) against real node
processes (`bidmesh run`, started by tests/daemon_helpers.py). Used by
`bench/hostile.py` (full volumes, figures) and tests/reliability/test_hostile_network.py
(small volumes, survival asserts).

Every attack is bounded (counts, bytes and a deadline), talks to loopback only, and
returns its figures plus `failures`: the attack-specific promises that did not hold
(e.g. "honest peer refused"). Whether the victim survived, its memory and the honest
latency are measured by the caller. Attacks never weaken themselves to pass: a
figure that misses its target is reported as such.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
from daemon_helpers import NETWORK, Proc

from node import codec, gossip, p2p, query, sync
from node.auction import Lease, derive
from node.dataplane import process_protocol, stream_protocol
from node.dataplane.tunnel_wire import tunnel_protocol
from node.dataplane.wire import ProcessRequest, SessionResponse, session_protocol
from node.errors import BidmeshError
from node.events import (
    Award,
    Bid,
    Members,
    Offer,
    Request,
    ServiceOffer,
    considered_digest,
    sign_event,
)
from node.keys import Identity

ATTACK_ERRORS = (BidmeshError, OSError, trio.TooSlowError, trio.BrokenResourceError,
                 trio.ClosedResourceError)
# py-libp2p raises many unrelated exception types from dials and streams of a
# victim that is going down (swarm, yamux, multiselect errors); an attacker shrugs
# them all off and counts them. Never used around our own checks.
ANY_UPSTREAM = Exception

LIBP2P_PROTOCOLS = {
    "identify": "/ipfs/id/1.0.0",
    "identify_push": "/ipfs/id/push/1.0.0",
    "ping": "/ipfs/ping/1.0.0",
    "meshsub_1.1": "/meshsub/1.1.0",
    "meshsub_1.2": "/meshsub/1.2.0",
}


def own_protocols(network: str = NETWORK) -> dict[str, str]:
    """Our protocols (and the tunnel's once it exists)."""
    protos = {"sync": sync.protocol_id(network), "sync2": sync.protocol_id(network, 2),
              "query": query.protocol_id(network),
              "stream": stream_protocol(network), "process": process_protocol(network),
              "process_session": session_protocol(network)}
    # Served by nodes that offer bandwidth (bench/hostile.py's victims do).
    protos["tunnel"] = tunnel_protocol(network)
    return protos


def ident(tag: str, i: int = 0) -> Identity:
    return Identity.from_seed((f"{tag}:{i}:").encode().ljust(32, b"~")[:32])


@dataclass
class Target:
    """The victim (and its honest peer) as seen by an attacker."""

    victim: Proc
    honest: Proc
    http_port: int | None = None
    network: str = NETWORK
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, reason: str) -> None:
        if not ok:
            self.failures.append(reason)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


async def run_limited(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> None:
    """`one(0)` .. `one(n - 1)`, at most `concurrency` of them at a time."""
    limiter = trio.CapacityLimiter(concurrency)

    async def limited(i: int) -> None:
        async with limiter:
            await one(i)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(limited, i)


async def call(p: Proc, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any] | None:
    """A control call that returns None instead of raising (the victim may be down)."""
    try:
        out: dict[str, Any] = await in_thread(lambda: p.call(req, timeout))
        return out
    except BidmeshError:
        return None


async def honest_digest(host: p2p.P2PHost, p: Proc, timeout: float = 5.0) -> tuple[bool, str]:
    """One honest DIGEST request: (answered, why not)."""
    try:
        if not host.is_connected(p.peer_id):
            await host.connect(p.addr, timeout=timeout)
        data = await p2p.request(host, p.peer_id, query.protocol_id(NETWORK),
                                 query.GetDigest().encode(), query.MAX_RESPONSE, timeout)
        query.decode_response(data)
        return True, ""
    except p2p.RequestRefused as e:
        return False, f"refused {e.reason}"
    except ATTACK_ERRORS as e:
        return False, f"{type(e).__name__}: {str(e)[:120]}"


def big_offer(i: int) -> Offer:
    """An offer near the envelope limit (~8 KB): the largest body a stranger can sign
    without breaking a schema limit."""
    services = tuple(ServiceOffer(name=f"s{i % 10}-{j:02d}-" + "x" * 56, price=1, capacity=1)
                     for j in range(64))
    addrs = tuple(f"/dns4/{'a' * 200}{j}.example/tcp/{4000 + j}" for j in range(8))
    return Offer(services=services, currency="EUR", addrs=addrs, note="n" * 280)


def small_offer(i: int, note: str = "") -> Offer:
    return Offer(services=(), currency="EUR", addrs=(), note=f"{note}{i}")


# ------------------------------------------------------------------ HTTP

async def _http_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the HTTP API, return whatever comes back before close/timeout."""
    out = b""
    with trio.move_on_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(data)
                while len(out) < 1 << 20:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    out += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    return out


async def http_head(t: Target, scale: dict[str, Any]) -> Outcome:
    o = Outcome()
    if t.http_port is None:
        o.failures.append("HTTP API not running on the victim")
        return o
    answers = []
    for path in ("/", "/api/health", "/api/digest", "/metrics", "/nosuch"):
        # Connection: close, or the answer would be waited for until keep-alive ends.
        answers.append(await _http_exchange(
            t.http_port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            .encode(), 3.0))
    # A HEAD then a GET on one keep-alive connection: the GET must get its own answer.
    both = await _http_exchange(t.http_port, b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
                                b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                3.0)
    o.figures["head_status_lines"] = [a.split(b"\r\n", 1)[0].decode("latin-1") for a in answers]
    o.check(all(a.startswith(b"HTTP/1.1 ") for a in answers), "HEAD not answered")
    o.check(all(b"\r\n\r\n" not in a or a.split(b"\r\n\r\n", 1)[1] == b"" for a in answers),
            "HEAD answered with a body")
    o.check(both.count(b"HTTP/1.1 ") >= 2, "GET after HEAD on one connection not answered")
    return o


MALFORMED_HTTP = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\n",
    b"POST /api/digest HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000,
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n",
    b"GET /api/auctions/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/events?limit=-5&after=zz&kind=%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://evil/api/digest HTTP/1.1\r\nHost: x\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"\r\n" * 1000,
    bytes(range(256)) * 8,
    b"GET / HTTP/1.1\r\nHost: x\r\n",  # never finished: the server's timeout ends it
]


async def http_malformed(t: Target, scale: dict[str, Any]) -> Outcome:
    o = Outcome()
    if t.http_port is None:
        o.failures.append("HTTP API not running on the victim")
        return o
    answered = 0
    wait = float(scale.get("http_wait_s", 12.0))
    async with trio.open_nursery() as n:
        async def one(data: bytes) -> None:
            nonlocal answered
            try:
                if await _http_exchange(t.http_port or 0, data, wait):
                    answered += 1
            except OSError:
                pass
        for data in MALFORMED_HTTP:
            n.start_soon(one, data)
    o.figures["requests"] = len(MALFORMED_HTTP)
    o.figures["answered"] = answered
    ok = await _http_exchange(t.http_port, b"GET /api/health HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: close\r\n\r\n", 5.0)
    o.check(ok.startswith(b"HTTP/1.1 200"), "GET /api/health failed after the malformed requests")
    return o


async def _honest_gets(port: int, n: int, gap_s: float = 0.1,
                       source: str = "127.0.0.2") -> tuple[int, dict[str, int]]:
    """`n` honest GET /api/health, each on a new connection from `source` (another
    loopback address than the attackers'): (answered 200, other outcomes)."""
    ok, other = 0, {}
    for _ in range(n):
        answer = b""
        with trio.move_on_after(10):
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
                async with stream:
                    await stream.send_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
                    while len(answer) < 1 << 16:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        answer += chunk
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        status = answer.split(b"\r\n", 1)[0].decode("latin-1") or "no answer"
        if status.startswith("HTTP/1.1 200"):
            ok += 1
        else:
            other[status] = other.get(status, 0) + 1
        await trio.sleep(gap_s)
    return ok, other


async def http_holders(t: Target, scale: dict[str, Any]) -> Outcome:
    """Many connections held open against the HTTP API while an honest client
    makes requests: `slowloris` heads dripped a byte every 0.2 s and re-opened as
    soon as the server closes them (all from 127.0.0.1), and idle keep-alive
    connections after one request spread over `http_sources` addresses (enough
    to fill max_connections, never re-opened). Every honest request must get 200."""
    o = Outcome()
    if t.http_port is None:
        o.failures.append("HTTP API not running on the victim")
        return o
    port = t.http_port
    n_slow, n_idle = int(scale.get("slowloris", 40)), int(scale.get("idle_keepalive", 64))
    sources = [f"127.0.1.{i + 1}" for i in range(int(scale.get("http_sources", 5)))]
    counts = {"slow_opened": 0, "slow_closed": 0, "idle_held": 0, "idle_refused": 0}
    stop = trio.Event()

    async def slowloris() -> None:
        head = b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 500
        while not stop.is_set():
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                counts["slow_opened"] += 1
                async with stream:
                    for i in range(len(head)):
                        if stop.is_set():
                            return
                        await stream.send_all(head[i:i + 1])
                        await trio.sleep(0.2)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                counts["slow_closed"] += 1
                await trio.sleep(0.05)

    async def idle(source: str) -> None:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            async with stream:
                await stream.send_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                first = await stream.receive_some(65536)
                if not first.startswith(b"HTTP/1.1 200"):
                    counts["idle_refused"] += 1
                    return
                counts["idle_held"] += 1
                while await stream.receive_some(65536):  # hold until the server closes
                    pass
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async with trio.open_nursery() as nursery:
        for _ in range(n_slow):
            nursery.start_soon(slowloris)
        for i in range(n_idle):
            nursery.start_soon(idle, sources[i % len(sources)])
        with trio.move_on_after(10):  # the holders are in place (bounded)
            while counts["slow_opened"] < n_slow or (
                    counts["idle_held"] + counts["idle_refused"] < n_idle):
                await trio.sleep(0.05)
        # Past the eviction grace of the idle holders (node/http.py EVICT_AFTER_S).
        await trio.sleep(float(scale.get("http_hold_s", 1.5)))
        ok, other = await _honest_gets(port, int(scale.get("http_honest", 10)))
        stop.set()
        nursery.cancel_scope.cancel()
    o.figures.update(counts, honest_ok=ok, honest_other=other)
    o.check(not other, f"honest HTTP requests failed while connections were held: {other}")
    return o


# ------------------------------------------------------------------ malformed frames

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame_payloads(name: str) -> list[bytes]:
    """Malformed first frames for a protocol (varint-framed protobuf for py-libp2p's,
    u32-length frames for ours)."""
    if name in LIBP2P_PROTOCOLS:
        return [
            _varint(1 << 62) + b"\xff" * 16,            # a huge length
            _varint(9) + b"\xff" * 9,                      # invalid protobuf
            _varint(5) + b"\x0a\x7f\x01\x02\x03",          # field 1 claims 127 bytes, has 3
            b"\xff" * 11,                                  # a varint that never ends
            _varint(40) + b"\x12",                         # truncated, then EOF
            os.urandom(7),                                 # ping: fewer than 32 bytes
            os.urandom(33),
        ]
    return [
        (0xFFFFFFFF).to_bytes(4, "big") + b"x" * 8,        # a 4 GiB length
        (8).to_bytes(4, "big") + b"\xc1" * 8,               # not msgpack
        (5).to_bytes(4, "big") + codec.pack([1, "x", None]),  # wrong shape
        (12).to_bytes(4, "big") + b"\x00" * 12,             # zero bytes
        codec.pack([7, [[[[[[]]]]]]]).rjust(24, b"\x00"),   # no valid length
        (30).to_bytes(4, "big") + b"\x93\xcf" + b"\xff" * 28,
        (3).to_bytes(4, "big"),                             # truncated, then EOF
    ]


async def malformed_frames(t: Target, scale: dict[str, Any]) -> Outcome:
    """Malformed frames on one protocol (`scale["protocol"]`), each on its own stream,
    from a fresh identity per frame (so a cut-off does not stop the attack)."""
    o = Outcome()
    name: str = scale["protocol"]
    proto = {**LIBP2P_PROTOCOLS, **own_protocols(t.network)}[name]
    sent, negotiated, errors = 0, 0, 0
    payloads = frame_payloads(name)
    for attempt in range(len(payloads)):  # a new identity whenever the victim cuts us off
        if sent + errors >= len(payloads):
            break
        try:
            async with p2p.open_host(ident(f"frame-{name}", attempt).seed) as h:
                with trio.fail_after(5):
                    await h.connect(t.victim.addr, timeout=5)
                for payload in payloads[sent + errors:]:
                    with trio.fail_after(5):
                        s = await h.new_stream(t.victim.peer_id, proto, timeout=5)
                    negotiated += 1
                    try:
                        await s.write(payload)
                        sent += 1
                        with trio.move_on_after(float(scale.get("frame_wait_s", 0.5))):
                            await s.read(65536)
                    finally:
                        await p2p.reset_quietly(s)
        except ANY_UPSTREAM:
            errors += 1
    o.figures.update(protocol=proto, frames_sent=sent, streams=negotiated, attacker_errors=errors)
    return o


async def malformed_frames_all(t: Target, scale: dict[str, Any]) -> Outcome:
    """`malformed_frames` on every protocol at once (py-libp2p's and ours)."""
    o = Outcome()
    names = [*LIBP2P_PROTOCOLS, *own_protocols(t.network)]
    outs: dict[str, Outcome] = {}

    async def one(name: str) -> None:
        outs[name] = await malformed_frames(t, {**scale, "protocol": name})

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    o.figures["frames_sent"] = {n: outs[n].figures["frames_sent"] for n in names}
    o.figures["attacker_errors"] = sum(outs[n].figures["attacker_errors"] for n in names)
    for n in names:
        o.failures += [f"{n}: {f}" for f in outs[n].failures]
    return o


# ------------------------------------------------------------------ many identities

async def many_identities(t: Target, scale: dict[str, Any]) -> Outcome:
    """`n` distinct identities connect one after another (a few at a time), each
    leaving once connected: a busy public node sees this without any attacker."""
    o = Outcome()
    n, conc = int(scale["identities"]), int(scale.get("concurrency", 48))
    ok = fail = 0

    async def one(i: int) -> None:
        nonlocal ok, fail
        try:
            with trio.fail_after(15):
                async with p2p.open_host(ident("crowd", i).seed) as h:
                    await h.connect(t.victim.addr, timeout=10)
                    ok += 1
                    # Stay until the victim has identified us (our listen
                    # addresses in its peerstore), as a real peer would.
                    await trio.sleep(float(scale.get("crowd_hold_s", 1.0)))
        except ANY_UPSTREAM:
            fail += 1

    t0 = time.monotonic()
    await run_limited(n, conc, one)
    o.figures.update(identities=n, connected=ok, failed=fail,
                     seconds=round(time.monotonic() - t0, 1))
    return o


# ------------------------------------------------------------------ control socket

CONTROL_BAD_VALUES: list[Any] = [None, 0, -1, (1 << 64) - 1, -(1 << 63), 1.5, float("nan"),
                                 True, "", "x" * 300, b"\xff", [], [None],
                                 [1, [2]], {}, {"a": None}, [[]]]
CONTROL_FIELDS = ["peers", "peer", "addr", "keep", "events", "seconds", "op"]


def control_requests(ops: list[str]) -> list[dict[str, Any]]:
    """Every op with each field set to every wrongly typed value (never a valid peer
    id or address: the attack must not block or connect anything real)."""
    reqs: list[dict[str, Any]] = [{"op": v} for v in CONTROL_BAD_VALUES if v not in ("",)]
    for op in ops:
        if op in ("stop", "shutdown"):
            continue
        for f in CONTROL_FIELDS[:-1]:
            for v in CONTROL_BAD_VALUES:
                reqs.append({"op": op, f: v})
        reqs.append({"op": op, "peers": ["x", 5], "seconds": 1})
        reqs.append({"op": op, "events": [["offer", {"services": 5}]]})
        reqs.append({"op": op, "events": [["offer", {"services": [{"name": 1}], "currency": 5,
                                                     "addrs": [None]}]]})
        reqs.append({"op": op, "events": [["offer", []], [None, None], ["x"]]})
        reqs.append({"op": op, "events": [["request", {"service": ["a"], "start_ms": "1"}]]})
        reqs.append({"op": op, "peer": "12D3KooW" + "1" * 44, "addr": "/ip4/1.2.3.4/tcp/x"})
    return reqs


def _raw_control(p: Proc, obj: Any, timeout: float = 5.0) -> bool:
    """Send one msgpack request (any value) over the control socket; True if answered."""
    data = msgpack.packb(obj, use_bin_type=True)  # not canonical on purpose
    path = p.data_dir / "control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(len(data).to_bytes(4, "big") + data)
            head = s.recv(4)
            return len(head) == 4
    except OSError:
        return False


def _control_ops(p: Proc) -> list[str]:
    try:
        p.call({"op": "\x00no such op"})
    except BidmeshError as e:
        if "known: " in str(e):
            return [x.strip() for x in str(e).split("known: ", 1)[1].split(",")]
    return ["status", "publish", "connect", "block", "unblock", "sync"]


async def control_bad_types(t: Target, scale: dict[str, Any]) -> Outcome:
    o = Outcome()
    ops = await in_thread(_control_ops, t.victim)
    reqs = control_requests(ops)
    extra: list[Any] = [[1, 2], "status", 5, None, {"op": "status", 1: 2}, {b"op": b"status"}]

    def run_all(part: list[Any]) -> tuple[int, int]:
        answered = unanswered = 0
        for r in part:
            if not t.victim.alive():
                break
            if _raw_control(t.victim, r):
                answered += 1
            else:
                unanswered += 1
        return answered, unanswered

    todo = reqs + extra
    k = int(scale.get("control_clients", 1))  # concurrent control clients
    results = []
    async with trio.open_nursery() as nursery:
        async def part(i: int) -> None:
            results.append(await in_thread(run_all, todo[i::k]))
        for i in range(k):
            nursery.start_soon(part, i)
    answered, unanswered = sum(r[0] for r in results), sum(r[1] for r in results)
    o.figures.update(ops=ops, requests=len(reqs) + len(extra), answered=answered,
                     unanswered=unanswered)
    o.check(unanswered == 0, f"{unanswered} control requests got no answer")
    return o


# ------------------------------------------------------------------ gossip attackers

class Gossiper:
    """A pubsub host on the victim's topic that publishes whatever it is given."""

    def __init__(self, host: p2p.P2PHost, ps: p2p.PubSub, t: Target) -> None:
        self.host, self.ps, self.t = host, ps, t
        self.topic = ps.topic(gossip.topic_name(t.network))
        self.sent = 0
        self.bytes = 0

    async def ready(self, timeout: float = 15.0) -> bool:
        await self.host.connect(self.t.victim.addr)
        sub = await self.topic.subscribe()
        del sub
        # In our mesh, not only subscribed: upstream publishes to the topic mesh only
        # (nobody while it is empty), so batches sent before the first heartbeat's
        # GRAFT never left this process.
        with trio.move_on_after(timeout):
            while self.t.victim.peer_id not in {str(p) for p in self.topic.mesh_peers()}:
                await trio.sleep(0.05)
            return True
        return False

    async def send_batches(self, wires: list[bytes], max_bytes: int = 240_000) -> None:
        batch: list[bytes] = []
        size = 0
        for w in wires:
            if batch and (size + len(w) + 8 > max_bytes or len(batch) >= 256):
                await self._publish(batch)
                batch, size = [], 0
            batch.append(w)
            size += len(w) + 8
        if batch:
            await self._publish(batch)

    async def _publish(self, batch: list[bytes]) -> None:
        data = gossip.encode_batch(batch)
        if not self.host.is_connected(self.t.victim.peer_id):
            raise trio.BrokenResourceError("victim disconnected us")
        await self.topic.publish(data, timeout=2.0)
        self.sent += len(batch)
        self.bytes += len(data)


async def run_gossiper(t: Target, tag: str, body: Callable[[Gossiper], Awaitable[None]]) -> str:
    """Run `body` with a fresh gossiping identity; return how it ended."""
    try:
        async with p2p.open_host(ident(tag).seed) as h, p2p.make_pubsub(h) as ps:
            g = Gossiper(h, ps, t)
            if not await g.ready():
                return "victim never joined our topic"
            await body(g)
            # Publishing only queues (upstream's per-peer RPC queue); leaving at once
            # would close the connection before the batches are written.
            with trio.move_on_after(10):
                while ps.max_queue_len() > 0:
                    await trio.sleep(0.05)
                await trio.sleep(0.5)
            return "done"
    except ANY_UPSTREAM as e:
        return f"ended: {type(e).__name__}: {str(e)[:100]}"


def orphan_chains(tag: str, keys: int, per_key: int, large: bool, ts_ms: int) -> list[bytes]:
    """`keys` authors, each `per_key` events chained from a predecessor nobody has
    (seq 2 onward from a made-up seq 1): every one lands in the pending buffer."""
    wires = []
    for k in range(keys):
        ik = ident(tag, k)
        prev = random.Random(k).randbytes(32)
        for s in range(per_key):
            body = big_offer(s) if large else small_offer(s, tag)
            ev = sign_event(ik.seed, s + 2, prev, ts_ms + s, body, NETWORK)
            wires.append(ev.wire)
            prev = ev.id
    # Interleave authors the way a flood would arrive.
    return [wires[k * per_key + s] for s in range(per_key) for k in range(keys)]


async def pending_flood(t: Target, scale: dict[str, Any]) -> Outcome:
    """Many keys x events with missing predecessors, large bodies, by gossip; then an
    honest author's out-of-order pair by SUBMIT must still be held and completed."""
    o = Outcome()
    keys, per_key = int(scale["pending_keys"]), int(scale["pending_events"])
    wires = await in_thread(orphan_chains, "pending", keys, per_key, True,
                            int(time.time() * 1000) - 60_000)
    before = await call(t.victim, {"op": "status"})
    end = await run_gossiper(t, "pending-flooder", lambda g: g.send_batches(wires))
    after = await call(t.victim, {"op": "status"})
    o.figures.update(events_sent=len(wires), mb_sent=round(sum(map(len, wires)) / 2**20, 1),
                     attacker=end)
    if after is not None:
        o.figures["victim_pending"] = after["pending"]
        o.figures["victim_pending_before"] = before["pending"] if before else None
    # The honest out-of-order pair: seq 2 first (held), then seq 1 (both stored).
    honest = ident("pending-honest", int(time.time()))
    e1 = sign_event(honest.seed, 1, None, int(time.time() * 1000), small_offer(1), NETWORK)
    e2 = sign_event(honest.seed, 2, e1.id, int(time.time() * 1000) + 1, small_offer(2), NETWORK)
    statuses = []
    try:
        async with p2p.open_host(honest.seed) as h:
            await h.connect(t.victim.addr)
            for w in (e2.wire, e1.wire):
                data = await p2p.request(h, t.victim.peer_id, query.protocol_id(NETWORK),
                                         query.Submit((w,)).encode(), query.MAX_RESPONSE, 10)
                resp = query.decode_response(data)
                assert isinstance(resp, query.Submitted)
                statuses.append(resp.results[0].status + (
                    f":{resp.results[0].reason}" if resp.results[0].reason else ""))
    except ANY_UPSTREAM as e:
        statuses.append(f"error {type(e).__name__}: {str(e)[:80]}")
    o.figures["honest_out_of_order"] = statuses
    o.check(len(statuses) == 2 and statuses[0].startswith("pending")
            and statuses[1].startswith("accepted"),
            f"honest out-of-order events not held: {statuses}")
    return o


async def gap_storm(t: Target, scale: dict[str, Any]) -> Outcome:
    """`authors` fresh authors with one event at seq 2 each; the attacker then leaves.
    What matters is the work the victim and its honest peer keep doing afterwards."""
    o = Outcome()
    n = int(scale["gap_authors"])
    now = int(time.time() * 1000)

    def build() -> list[bytes]:
        return [sign_event(ident("gap", i).seed, 2, random.Random(i).randbytes(32), now,
                           small_offer(i, "gap"), NETWORK).wire for i in range(n)]

    wires = await in_thread(build)
    end = await run_gossiper(t, "gap-stormer", lambda g: g.send_batches(wires))
    o.figures.update(authors=n, attacker=end)
    st = await call(t.victim, {"op": "status"})
    if st is not None:
        o.figures["victim_gaps"] = st["gaps"]
        o.figures["victim_pending"] = st["pending"]
    return o


async def gossip_flood(t: Target, scale: dict[str, Any]) -> Outcome:
    """One peer gossips valid, chained events of many keys as fast as it can."""
    o = Outcome()
    seconds = float(scale["flood_s"])
    keys = 64
    chains = [(ident("flood", k), None) for k in range(keys)]
    seqs = [0] * keys
    prevs: list[bytes | None] = [None] * keys
    st0 = await call(t.victim, {"op": "status"})

    async def body(g: Gossiper) -> None:
        deadline = trio.current_time() + seconds
        i = 0
        while trio.current_time() < deadline:
            batch = []
            for _ in range(256):
                k = i % keys
                seqs[k] += 1
                ev = sign_event(chains[k][0].seed, seqs[k], prevs[k], int(time.time() * 1000),
                                small_offer(i, "f" * 200), NETWORK)
                prevs[k] = ev.id
                batch.append(ev.wire)
                i += 1
            await g._publish(batch)
            await trio.sleep(0)

    end = await run_gossiper(t, "gossip-flooder", body)
    st1 = await call(t.victim, {"op": "status"})
    sent = sum(seqs)
    o.figures.update(events_sent=sent, seconds=seconds, attacker=end)
    if st0 and st1:
        stored = st1["events"] - st0["events"]
        o.figures["stored_by_victim"] = stored
        o.figures["stored_per_s"] = round(stored / seconds, 1)
        # Batches the victim dropped on arrival (budget), before py-libp2p's own path.
        o.figures["refused_early"] = (st1["gossip"].get("refused_early", 0)
                                      - st0["gossip"].get("refused_early", 0))
        o.figures["cut_off"] = st1["gossip"]["cut_off"] - st0["gossip"]["cut_off"]
        # The victim's declared budget (status resources.limits, `[limits]`), unless
        # the caller names one: its rate over the flood plus the burst a peer it has
        # not heard from starts with, and a batch.
        lims = st0.get("resources", {}).get("limits", {})
        limit = float(scale.get("gossip_peer_events_per_s",
                                lims.get("gossip_peer_events_per_s", 500.0)))
        burst = limit * float(lims.get("gossip_first_burst_s",
                                       lims.get("gossip_burst_s", 2.0)))
        o.figures["limit_per_s"] = limit
        o.check(stored <= limit * seconds + burst + 256,
                f"one peer's gossip stored at {stored / seconds:.0f} events/s "
                f"(expected <= {limit:.0f}/s plus a burst of {burst:.0f})")
    return o


async def gossip_flood_rotating(t: Target, scale: dict[str, Any]) -> Outcome:
    """Fresh identities from one address, each gossiping valid events as fast as it
    can for a moment (its first burst) and then making way for the next, a few at a
    time: what the per-peer budget alone would multiply. The victim's subnet budget
    (`[limits] gossip_subnet_*`) holds them together."""
    o = Outcome()
    n = int(scale.get("rotating_identities", 8))
    per = int(scale.get("rotating_events", 2048))  # each: about its first burst and more
    st0 = await call(t.victim, {"op": "status"})
    t0 = trio.current_time()
    sent = 0
    ends: list[str] = []

    def chain(i: int) -> list[bytes]:
        idn = ident("rotflood", i)
        wires, prev = [], None
        for s in range(per):
            ev = sign_event(idn.seed, s + 1, prev, int(time.time() * 1000),
                            small_offer(s, "r" * 200), NETWORK)
            wires.append(ev.wire)
            prev = ev.id
        return wires

    async def one(i: int) -> None:
        wires = await in_thread(chain, i)

        async def body(g: Gossiper) -> None:
            nonlocal sent
            for k in range(0, len(wires), 256):
                await g._publish(wires[k:k + 256])
                sent += len(wires[k:k + 256])
                await trio.sleep(0)

        ends.append(await run_gossiper(t, f"rotflood-{i}", body))

    await run_limited(n, int(scale.get("rotating_concurrency", 4)), one)
    took = max(0.1, trio.current_time() - t0)
    st1 = await call(t.victim, {"op": "status"})
    o.figures.update(identities=n, events_sent=sent, seconds=round(took, 1),
                     attackers_done=sum(e == "done" for e in ends))
    if st0 and st1:
        stored = st1["events"] - st0["events"]
        b0, b1 = st0["gossip"]["budget"], st1["gossip"]["budget"]
        o.figures.update(stored_by_victim=stored, stored_per_s=round(stored / took, 1),
                         subnet_drops=(b1["dropped_batches"].get("subnet_events", 0)
                                       - b0["dropped_batches"].get("subnet_events", 0)),
                         refused_early=(st1["gossip"].get("refused_early", 0)
                                        - st0["gossip"].get("refused_early", 0)))
        lims = st0.get("resources", {}).get("limits", {})
        rate = lims.get("gossip_subnet_events_per_s")
        if rate:
            first = float(lims.get("gossip_first_burst_s", lims.get("gossip_burst_s", 4)))
            bound = float(rate) * (took + first) + 256 * n
            o.figures["subnet_limit_per_s"] = rate
            o.check(stored <= bound, f"{n} identities from one address stored "
                    f"{stored / took:.0f} events/s (subnet budget {rate}/s not held)")
    return o


async def submit_flood(t: Target, scale: dict[str, Any]) -> Outcome:
    """SUBMIT bursts of 16 records, each from a new identity (rotating keys)."""
    o = Outcome()
    n = int(scale["submit_identities"])
    now = int(time.time() * 1000)
    accepted = refused = errors = 0
    t0 = trio.current_time()

    async def one(i: int) -> None:
        nonlocal accepted, refused, errors
        idn = ident("submit", i)
        wires, prev = [], None
        for s in range(16):
            ev = sign_event(idn.seed, s + 1, prev, now + s, small_offer(s, "sub"), NETWORK)
            wires.append(ev.wire)
            prev = ev.id
        try:
            async with p2p.open_host(idn.seed) as h:
                await h.connect(t.victim.addr)
                for _ in range(int(scale.get("submit_bursts", 20))):  # bursts per identity
                    try:
                        data = await p2p.request(h, t.victim.peer_id, query.protocol_id(NETWORK),
                                                 query.Submit(tuple(wires)).encode(),
                                                 query.MAX_RESPONSE, 10)
                        resp = query.decode_response(data)
                        assert isinstance(resp, query.Submitted)
                        accepted += sum(r.status == "accepted" for r in resp.results)
                        wires = _next_chain(idn, wires, now)
                    except p2p.RequestRefused:
                        refused += 1
        except ANY_UPSTREAM:
            errors += 1

    await run_limited(n, 8, one)
    took = max(0.1, trio.current_time() - t0)
    rate = float(scale.get("submit_rate", 50.0))
    o.figures.update(identities=n, accepted=accepted, refused=refused, errors=errors,
                     seconds=round(took, 1), accepted_per_s=round(accepted / took, 1))
    o.check(accepted <= 200 + 2 * rate * took,
            f"{accepted / took:.0f} records/s accepted from rotating identities "
            f"(limit {rate:.0f}/s per node not held)")
    return o


def _next_chain(idn: Identity, wires: list[bytes], now: int) -> list[bytes]:
    from node.events import decode_wire
    last = decode_wire(wires[-1], NETWORK)
    out, prev = [], last.id
    for s in range(16):
        ev = sign_event(idn.seed, last.seq + s + 1, prev, now + last.seq + s,
                        small_offer(s, "sub"), NETWORK)
        out.append(ev.wire)
        prev = ev.id
    return out


# ------------------------------------------------------------------ time

async def submit_events(t: Target, idn: Identity, wires: list[bytes]) -> list[str]:
    out = []
    async with p2p.open_host(idn.seed) as h:
        await h.connect(t.victim.addr)
        for i in range(0, len(wires), 16):
            data = await p2p.request(h, t.victim.peer_id, query.protocol_id(NETWORK),
                                     query.Submit(tuple(wires[i:i + 16])).encode(),
                                     query.MAX_RESPONSE, 10)
            resp = query.decode_response(data)
            assert isinstance(resp, query.Submitted)
            out += [r.status for r in resp.results]
    return out


async def market_lookup_ms(host: p2p.P2PHost, p: Proc, rounds: int) -> list[float]:
    """After each new honest event on `p`, time one market lookup (REPUTATION, which
    folds the market) from an honest peer."""
    out = []
    for i in range(rounds):
        await call(p, {"op": "publish", "events": [["offer", {
            "services": [], "currency": "EUR", "addrs": [], "note": f"lookup {i}"}]]})
        t0 = time.perf_counter()
        try:
            await p2p.request(host, p.peer_id, query.protocol_id(NETWORK),
                              query.ReputationBundle((p.ident.public,)).encode(),
                              query.MAX_RESPONSE, 20)
            out.append((time.perf_counter() - t0) * 1000)
        except ATTACK_ERRORS:
            out.append(20_000.0)
    return out


async def far_future(t: Target, scale: dict[str, Any]) -> Outcome:
    """One valid event dated 45 days ahead and one at ts 2^53-1; market lookups after
    new events must stay as fast as before."""
    o = Outcome()
    rounds = int(scale.get("lookup_rounds", 8))
    async with p2p.open_host(ident("lookup-client").seed) as h:
        await h.connect(t.victim.addr)
        before = await market_lookup_ms(h, t.victim, rounds)
        now = int(time.time() * 1000)
        a, b = ident("future", 1), ident("future", 2)
        wires = [sign_event(a.seed, 1, None, now + 45 * 86_400_000, small_offer(1, "fut"),
                            NETWORK).wire,
                 sign_event(b.seed, 1, None, (1 << 53) - 1, small_offer(2, "fut"), NETWORK).wire]
        statuses = await submit_events(t, a, wires)
        after = await market_lookup_ms(h, t.victim, rounds)
    med_b, med_a = sorted(before)[len(before) // 2], sorted(after)[len(after) // 2]
    o.figures.update(submitted=statuses, lookup_ms_before=round(med_b, 1),
                     lookup_ms_after=round(med_a, 1))
    o.check(med_a <= 3 * max(med_b, 5.0),
            f"market lookup {med_b:.0f} ms -> {med_a:.0f} ms after one far-future event")
    return o


async def back_dated(t: Target, scale: dict[str, Any]) -> Outcome:
    """Back-dated events (fresh authors, ts in the distant past) at a steady rate."""
    o = Outcome()
    n = int(scale.get("back_dated", 40))
    wires = [sign_event(ident("past", i).seed, 1, None, 1_000 + i, small_offer(i, "past"),
                        NETWORK).wire for i in range(n)]
    statuses: list[str] = []
    seconds = float(scale.get("back_dated_s", 4.0))
    async with p2p.open_host(ident("past-sender").seed) as h:
        await h.connect(t.victim.addr)
        for i, w in enumerate(wires):
            try:
                data = await p2p.request(h, t.victim.peer_id, query.protocol_id(NETWORK),
                                         query.Submit((w,)).encode(), query.MAX_RESPONSE, 20)
                resp = query.decode_response(data)
                assert isinstance(resp, query.Submitted)
                statuses.append(resp.results[0].status)
            except p2p.RequestRefused as e:
                statuses.append(e.reason)
            await trio.sleep(seconds / n)
            del i
    o.figures.update(sent=n, accepted=statuses.count("accepted"))
    return o


# ------------------------------------------------------------------ sync tarpit

class Tarpit:
    """Serves our sync protocol with endless HEADS pages and RANGE answers just under
    the requester's timeout; counts the requests it held."""

    def __init__(self, request_timeout_s: float) -> None:
        self.delay = request_timeout_s * 0.9
        self.requests = 0
        self.next_author = 0

    async def handler(self, pubkey: bytes, payload: bytes) -> bytes:
        req = sync.decode_request(payload)
        self.requests += 1
        if isinstance(req, sync.DigestRequest):
            return sync.DigestResponse(os.urandom(32), 1 << 20, 0).encode()
        await trio.sleep(self.delay)
        if isinstance(req, sync.HeadsRequest):
            heads = []
            for _ in range(req.limit):
                self.next_author += 1
                author = (b"\xfe" + self.next_author.to_bytes(31, "big"))
                if req.after is not None and author <= req.after:
                    author = req.after[:31] + bytes([min(255, req.after[31] + 1)])
                heads.append(sync.HeadEntry(author, 1 << 40, os.urandom(32), None))
            heads.sort(key=lambda h: h.author)
            uniq = [h for i, h in enumerate(heads) if i == 0 or h.author != heads[i - 1].author]
            return sync.HeadsResponse(tuple(uniq), True).encode()
        if isinstance(req, sync.RangeRequest):
            return sync.RangeResponse((), True).encode()
        return sync.ForksResponse(()).encode()


async def run_tarpits(addr: str, peer_id: str, n: int, timeout_s: float,
                      ready: trio.Event, stop: trio.Event, tarpits: list[Tarpit]) -> None:
    """`n` tarpit identities connected to `addr` until `stop`."""
    async def one(i: int) -> None:
        tp = Tarpit(timeout_s)
        tarpits.append(tp)
        try:
            async with p2p.open_host(ident("tarpit", i).seed) as h:
                p2p.serve_requests(h, sync.protocol_id(NETWORK), tp.handler, sync.MAX_REQUEST,
                                   timeout=math.inf, max_concurrent=1 << 16)
                await h.connect(addr)
                await stop.wait()
        except ANY_UPSTREAM:
            return

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
        # Held sessions: a node with the sync slot policy lets strangers hold at most
        # slots - reserved_slots (3 by default) of them.
        with trio.move_on_after(15):
            while sum(1 for tp in tarpits if tp.requests) < min(n, 3):
                await trio.sleep(0.05)
        ready.set()
        await stop.wait()
        # Each host closes itself on `stop` (cancelling one mid-close leaks its
        # sockets: ResourceWarnings under pytest -W error); bounded all the same.
        nursery.cancel_scope.deadline = trio.current_time() + 30


# ------------------------------------------------------------------ connections and streams

async def fill_connections(t: Target, scale: dict[str, Any]) -> Outcome:
    """64 idle identities take every connection; then the victim's own bootstrap
    dial to its honest peer and a new honest peer must still get in."""
    o = Outcome()
    n = int(scale.get("idle_identities", 64))
    stop = trio.Event()
    held = failed = 0

    async def idle(i: int) -> None:
        nonlocal held, failed
        try:
            async with p2p.open_host(ident("idle", i).seed) as h:
                await h.connect(t.victim.addr)
                held += 1
                await stop.wait()
        except ANY_UPSTREAM:
            failed += 1

    async with trio.open_nursery() as nursery:
        # Drop the honest link first (a short block, then unblock so the victim
        # redials its bootstrap peer while the idle identities hold the slots).
        await call(t.victim, {"op": "block", "peers": [t.honest.peer_id], "seconds": 30})
        for i in range(n):
            nursery.start_soon(idle, i)
        with trio.move_on_after(20):  # every identity connected or failed (bounded)
            while held + failed < n:
                await trio.sleep(0.05)
        await call(t.victim, {"op": "unblock", "peers": [t.honest.peer_id]})
        reconnected = False
        with trio.move_on_after(float(scale.get("reconnect_wait_s", 8))):
            while True:
                st = await call(t.victim, {"op": "status"})
                if st and t.honest.peer_id in st["peers"]:
                    reconnected = True
                    break
                await trio.sleep(0.2)
        # A new honest peer retries for a while, as a real node redials: the
        # victim may first have to find an idle holder to evict (conn_grace_s).
        newcomer_ok, why, tries = False, "", 0
        t_new = trio.current_time()
        async with p2p.open_host(ident("newcomer", int(time.time())).seed) as nh:
            with trio.move_on_after(float(scale.get("newcomer_wait_s", 20))):
                while not newcomer_ok:
                    tries += 1
                    newcomer_ok, why = await honest_digest(nh, t.victim)
                    if not newcomer_ok:
                        await trio.sleep(0.5)
        newcomer_s = trio.current_time() - t_new
        stop.set()
    o.figures.update(idle_held=held, idle_failed=failed, bootstrap_redial_ok=reconnected,
                     newcomer_served=newcomer_ok,
                     newcomer_tries=tries, newcomer_s=round(newcomer_s, 1))
    o.check(reconnected, "the victim's bootstrap dial to its honest peer was starved")
    o.check(newcomer_ok, f"a new honest peer was refused ({why})")
    return o


async def idle_streams(t: Target, scale: dict[str, Any]) -> Outcome:
    """One peer holds 64 idle streams on each request protocol (re-opening what the
    victim closes) while an honest peer makes requests for `idle_streams_s`, and on
    for up to `idle_cut_off_wait_s` more until the victim has cut the hog off (a
    loaded victim takes a while to see enough refusals: the figure then says whether
    it did, not whether it did within a fixed time)."""
    o = Outcome()
    per = int(scale.get("idle_streams", 64))
    seconds = float(scale.get("idle_streams_s", 4.0))
    cut_off_wait = float(scale.get("idle_cut_off_wait_s", 0.0))
    honest_timeout = float(scale.get("idle_honest_timeout_s", 5.0))
    protos = [query.protocol_id(t.network), sync.protocol_id(t.network),
              process_protocol(t.network), session_protocol(t.network),
              stream_protocol(t.network)][:int(scale.get("idle_protocols", 5))]
    opened = attempted = 0
    honest_ok = honest_fail = 0
    reasons: dict[str, int] = {}
    stop = trio.Event()
    async with p2p.open_host(ident("hog").seed) as hog, \
            p2p.open_host(ident("polite").seed) as good:
        await hog.connect(t.victim.addr)
        await good.connect(t.victim.addr)

        async def hold(proto: str) -> None:
            nonlocal opened, attempted
            while not stop.is_set():
                attempted += 1
                try:
                    s = await hog.new_stream(t.victim.peer_id, proto, timeout=5)
                    opened += 1
                except ANY_UPSTREAM:
                    await trio.sleep(0.1)
                    if not hog.is_connected(t.victim.peer_id):
                        return
                    continue
                try:
                    await s.write(b"\x00")  # one byte of a length: then silence
                    with trio.move_on_after(30):
                        await stop.wait()
                except ANY_UPSTREAM:
                    # The victim reset the stream (refused or idle): open another.
                    await trio.sleep(0.1)
                finally:
                    await p2p.reset_quietly(s)

        async with trio.open_nursery() as nursery:
            for proto in protos:
                for _ in range(per):
                    nursery.start_soon(hold, proto)
            with trio.move_on_after(10):  # every stream tried once (bounded)
                while attempted < per * len(protos):
                    await trio.sleep(0.05)
            await trio.sleep(0.5)  # the first refusals and resets land
            deadline = trio.current_time() + seconds
            last = deadline + cut_off_wait
            while trio.current_time() < deadline or (
                    trio.current_time() < last and hog.is_connected(t.victim.peer_id)):
                ok, why = await honest_digest(good, t.victim, honest_timeout)
                try:
                    await p2p.request(good, t.victim.peer_id, sync.protocol_id(t.network),
                                      sync.DigestRequest().encode(), sync.MAX_RESPONSE,
                                      honest_timeout)
                except p2p.RequestRefused as e:
                    ok, why = False, f"sync refused {e.reason}"
                except ATTACK_ERRORS as e:
                    ok, why = False, f"sync {type(e).__name__}"
                if ok:
                    honest_ok += 1
                else:
                    honest_fail += 1
                    reasons[why] = reasons.get(why, 0) + 1
                await trio.sleep(0.1)
            stop.set()
            nursery.cancel_scope.cancel()
        hog_blocked = not hog.is_connected(t.victim.peer_id)
    o.figures.update(streams_attempted=attempted, streams_opened=opened, honest_ok=honest_ok,
                     honest_failed=honest_fail, honest_fail_reasons=reasons,
                     hog_disconnected=hog_blocked)
    o.check(honest_fail == 0, f"honest requests failed while one peer held idle streams: "
            f"{reasons}")
    return o


# ------------------------------------------------------------------ dataplane

def offer_and_lease(provider: Identity, tag: str, chain: tuple[str, ...] = ("identity",)
                    ) -> tuple[list[bytes], Lease]:
    """A real lease anyone can make, with an offer: `provider` offers `chain[0]`, a
    fresh recipient key requests `chain`, `provider` bids, the recipient awards.
    Submitted by SUBMIT, it is a lease in every node's fold with `provider` as its
    provider (issue 13 item 1: such a lease is all the authority a process request
    needs, so the memory limits must hold against it)."""
    now = int(time.time() * 1000)
    recipient = ident(f"{tag}-recipient", now)
    offer = sign_event(provider.seed, 1, None, now - 6000, Offer(
        services=(ServiceOffer(name=chain[0], price=1, capacity=1),), currency="EUR",
        addrs=(), note=tag), NETWORK)
    req = sign_event(recipient.seed, 1, None, now - 5000, Request(
        service=chain[0], chain=chain, start_ms=now - 1000, duration_ms=3_600_000,
        max_rate_bps=None, min_rate_bps=None, members=Members(), reserve=1000,
        currency="EUR", close_ms=now - 3000, reveal_ms=now - 3000, rule="lowest",
        sealed=False, group=False), NETWORK)
    bid = sign_event(provider.seed, 2, offer.id, now - 4000, Bid(request=req.id, price=10),
                     NETWORK)
    award = sign_event(recipient.seed, 2, req.id, now - 2000, Award(
        request=req.id, winner=bid.id, price=10, considered=(bid.id,),
        considered_digest=considered_digest([bid.id]), considered_count=1), NETWORK)
    events = [offer, req, bid, award]
    (lease,) = derive(events).leases.values()
    return [e.wire for e in events], lease


async def _dataplane_status(t: Target) -> dict[str, Any]:
    st = await call(t.victim, {"op": "status"})
    return (st or {}).get("services", {}).get("dataplane", {})


async def process_sessions(t: Target, scale: dict[str, Any]) -> Outcome:
    """`proc_identities` providers, each with an offer and a lease of its own (all
    self-made), open `sessions` process sessions each and send `requests` x `mb` MB
    requests on each under their lease (issue 12 item 6: 16 x 4 x 8 MB took a provider
    from 196 to 961 MB in 5 s). With `proc_read` they drain the answers, so the victim
    keeps processing at full speed; without, they hold them unread (py-libp2p 0.8.1's
    yamux then fails the victim's blocked answer after 5 s, which ends the session)."""
    o = Outcome()
    sessions, reqs, mb = (int(scale["proc_sessions"]), int(scale["proc_requests"]),
                          int(scale["proc_mb"]))
    n_ids = int(scale.get("proc_identities", 1))
    read = bool(scale.get("proc_read", True))
    ids = [ident("proc-hog", int(time.time() * 1000) + k) for k in range(n_ids)]
    leases = []
    statuses: list[str] = []
    for k, idn in enumerate(ids):
        wires, lease = offer_and_lease(idn, f"proc-hog-{k}")
        statuses += await submit_events(t, idn, wires)
        leases.append(lease)
    o.figures["submitted"] = statuses
    data = b"\x00" * (mb << 20)
    sent = answered = 0
    refused: dict[str, int] = {}
    peak_in_flight = 0
    stop = trio.Event()

    def count(e: BaseException) -> None:
        while isinstance(e, BaseExceptionGroup) and e.exceptions:
            e = e.exceptions[0]  # the first cause is what the attacker ran into
        why = f"{type(e).__name__}: {str(e)[:60]}"
        refused[why] = refused.get(why, 0) + 1

    async def sample() -> None:
        nonlocal peak_in_flight
        while not stop.is_set():
            mem = (await _dataplane_status(t)).get("process_memory", {})
            peak_in_flight = max(peak_in_flight, int(mem.get("bytes_in_flight", 0)))
            with trio.move_on_after(0.2):
                await stop.wait()

    async def attacker(idn: Identity, lease: Lease) -> None:
        async with p2p.open_host(idn.seed) as h:
            await h.connect(t.victim.addr)

            async def session(i: int) -> None:
                nonlocal sent, answered
                try:
                    s = await h.new_stream(t.victim.peer_id, session_protocol(t.network),
                                           timeout=5)
                except ANY_UPSTREAM as e:
                    count(e)
                    return

                async def drain() -> None:
                    nonlocal answered
                    for _ in range(reqs):
                        await p2p.read_frame(s, (mb << 20) + 4096, 30.0)
                        answered += 1

                try:
                    async with trio.open_nursery() as n:
                        if read:
                            n.start_soon(drain)
                        for r in range(reqs):
                            req = ProcessRequest(lease.id, b"s%d" % i, r, 0, ("identity",),
                                                 None, b"")
                            await p2p.write_frame(s, data, 20.0, req.encode(request_id=r))
                            sent += 1
                        if not read:
                            with trio.move_on_after(float(scale.get("proc_hold_s", 3.0))):
                                await trio.sleep_forever()
                except ANY_UPSTREAM as e:
                    count(e)
                finally:
                    await p2p.reset_quietly(s)

            async with trio.open_nursery() as flood:
                for i in range(sessions):
                    flood.start_soon(session, i)

    with trio.move_on_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            async with trio.open_nursery() as attackers:
                for idn, lease in zip(ids, leases, strict=True):
                    attackers.start_soon(attacker, idn, lease)
            stop.set()
    dp = await _dataplane_status(t)
    counters = dp.get("counters", {})
    limits = dp.get("limits", {})
    o.figures.update(identities=n_ids, sessions=sessions, requests_sent=sent,
                     answers_read=answered, mb_each=mb, attacker_errors=refused,
                     peak_bytes_in_flight=peak_in_flight,
                     sessions_refused_busy=counters.get("process_refused:busy", 0),
                     served=counters.get("process_served", 0),
                     budget_waits=dp.get("process_memory", {}).get("waited", 0), limits=limits)
    cap = int(limits.get("process_total_bytes", 0)) + 2 * n_ids * (mb << 20) + (1 << 20)
    o.check(bool(limits), "the victim's status shows no dataplane limits")
    o.check(peak_in_flight <= cap, f"{peak_in_flight} bytes in flight, above the total "
            f"budget plus answers ({cap})")
    per_peer = int(limits.get("process_sessions_per_peer", sessions))
    o.check(sessions <= per_peer or counters.get("process_refused:busy", 0) >= 1,
            "sessions beyond the per-peer limit were not refused")
    return o


async def foreign_lease(t: Target, scale: dict[str, Any]) -> Outcome:
    """Process requests without the authority of the lease they name (issue 13 item
    1): a lease id nobody knows, another provider's lease, and the attacker's own lease
    for a service its chain does not name. Each must be refused with its reason and
    counted, and nothing served."""
    o = Outcome()
    idn = ident("foreign", int(time.time()))
    other = ident("foreign-provider", int(time.time()))
    # The attacker's own lease pays for zstd; it asks for identity (which every node
    # serves) under it.
    mine, my_lease = offer_and_lease(idn, "foreign-mine", ("zstd",))
    theirs, their_lease = offer_and_lease(other, "foreign-theirs")
    o.figures["submitted"] = await submit_events(t, idn, [*mine, *theirs])
    before = (await _dataplane_status(t)).get("counters", {})
    cases = {
        "no_lease": ProcessRequest(os.urandom(32), b"f", 0, 0, ("identity",), None, b"x"),
        "not_lease_provider": ProcessRequest(their_lease.id, b"f", 0, 0, ("identity",), None,
                                             b"x"),
        "not_in_chain": ProcessRequest(my_lease.id, b"f", 0, 0, ("identity",), None, b"x"),
    }
    got: dict[str, str] = {}
    async with p2p.open_host(idn.seed) as h:
        await h.connect(t.victim.addr)
        for want, req in cases.items():
            try:
                await p2p.request(h, t.victim.peer_id, process_protocol(t.network),
                                  req.encode(), 1 << 20, 10)
                got[want] = "served"
            except p2p.RequestRefused as e:
                got[want] = e.reason
            except ATTACK_ERRORS as e:
                got[want] = type(e).__name__
        # The same over a session, pipelined: answered by id, the session goes on.
        try:
            s = await h.new_stream(t.victim.peer_id, session_protocol(t.network), timeout=5)
            for rid, req in enumerate(cases.values()):
                await p2p.write_frame(s, req.encode(request_id=rid), 10.0)
            for _ in cases:
                frame = await p2p.read_frame(s, 1 << 16, 10.0)
                r = SessionResponse.decode(frame, None if frame[8] else 1)
                if r.request_id >= len(cases):
                    got["session"] = f"refused whole: {r.reason}: {r.message}"
                    break
                got[f"session:{list(cases)[r.request_id]}"] = r.reason or "served"
            await p2p.reset_quietly(s)
        except ATTACK_ERRORS as e:
            got["session"] = f"{type(e).__name__}: {str(e)[:100]}"
    after = (await _dataplane_status(t)).get("counters", {})
    o.figures.update(answers=got)
    o.check("session" not in got, f"the session failed: {got.get('session')}")
    for want in cases:
        o.check(got.get(want) == want and got.get(f"session:{want}") == want,
                f"a request for {want} was answered {got.get(want)!r} / "
                f"{got.get(f'session:{want}')!r}")
        k = f"process_refused:{want}"
        o.check(after.get(k, 0) - before.get(k, 0) >= 2, f"{k} not counted")
    o.check(after.get("process_served", 0) == before.get("process_served", 0),
            "a request without authority was served")
    return o


# ------------------------------------------------------------------ SOCKS5 listener

async def _socks_exchange(port: int, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send `data` to the SOCKS listener; (what came back, seconds until it closed)."""
    t0 = trio.current_time()
    out = b""
    with trio.move_on_after(wait_s):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(data)
                while len(out) < 4096:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    out += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    return out, trio.current_time() - t0


SOCKS_GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",              # not SOCKS
    b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",                 # SOCKS4
    b"\x05\x00",                                             # no methods
    b"\x05\x01\x02",                                         # user/password only
    b"\x05\x01\x00\x05\x02\x00\x01" + bytes(6),                # BIND
    b"\x05\x01\x00\x05\x01\x00\x09" + bytes(6),                # unknown address type
    b"\x05\x01\x00\x05\x01\x00\x03\xff" + b"\xfe" * 255 + b"\x00\x50",  # bad name
    b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00",       # port 0
    b"\x05\xff" + bytes(255) + b"\x05" * 4096,               # long greeting + junk
]


async def socks_listener(t: Target, scale: dict[str, Any]) -> Outcome:
    """`bidmesh client tunnel`'s SOCKS5 listener (t.extra["socks_port"]): malformed
    greetings and requests, slowloris handshakes, more connections than it serves;
    an honest SOCKS client (t.extra["socks_honest"], async -> bool) must work after."""
    o = Outcome()
    port: int = t.extra["socks_port"]
    honest: Callable[[], Awaitable[bool]] = t.extra["socks_honest"]
    limit_s = float(scale.get("socks_handshake_s", 10.0)) + 5.0
    answered_badly = 0
    slowest = 0.0
    for data in SOCKS_GARBAGE:
        out, took = await _socks_exchange(port, data, limit_s)
        slowest = max(slowest, took)
        # Replies to garbage are a method refusal or a failure code, never success.
        if len(out) >= 2 and out[:2] == b"\x05\x00" and out[2:4] == b"\x05\x00":
            answered_badly += 1
    o.check(answered_badly == 0, f"{answered_badly} malformed requests got a success reply")
    o.check(slowest < limit_s, f"a malformed handshake was held {slowest:.1f} s")
    # Slowloris: many handshakes a byte at a time; each is dropped after the timeout.
    n_slow = int(scale.get("socks_slowloris", 32))
    held: list[float] = []

    async def slow(i: int) -> None:
        t0 = trio.current_time()
        with trio.move_on_after(limit_s + 5):
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            async with s:
                try:
                    for b in b"\x05\x01\x00\x05\x01\x00\x03\x20" + b"a" * 32:
                        await s.send_all(bytes([b]))
                        with trio.move_on_after(1.0):
                            if not await s.receive_some(16):
                                break
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        held.append(trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        for i in range(n_slow):
            nursery.start_soon(slow, i)
    o.check(max(held, default=0.0) < limit_s + 4, f"a slow handshake was held "
            f"{max(held, default=0.0):.1f} s")
    # Many connections at once (beyond the proxy's cap): the extra ones are closed.
    n_many = int(scale.get("socks_connections", 256))
    socks_held: list[trio.SocketStream] = []
    refused = 0
    try:
        for _ in range(n_many):
            try:
                socks_held.append(await trio.open_tcp_stream("127.0.0.1", port))
            except OSError:
                refused += 1
        closed = 0
        for s in socks_held:
            with trio.move_on_after(0.05):
                try:
                    if not await s.receive_some(1):
                        closed += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    closed += 1
    finally:
        for s in socks_held:
            await s.aclose()
    ok = False
    with trio.move_on_after(limit_s + 10):
        while not ok:  # the slots come back once the attacker's connections are gone
            ok = await honest()
            if not ok:
                await trio.sleep(0.2)
    o.figures.update(socks_malformed=len(SOCKS_GARBAGE), socks_slowest_s=round(slowest, 2),
                     socks_slowloris=n_slow, socks_slow_held_max_s=round(max(held, default=0), 2),
                     socks_connections=n_many, socks_closed_at_once=closed,
                     socks_connect_refused=refused, socks_honest_after=ok)
    o.check(closed + refused > 0, "every one of the extra connections was kept open")
    o.check(ok, "an honest SOCKS client failed after the attacks")
    return o
