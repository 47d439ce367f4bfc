"""Shared setup for tunnel tests: a provider host running TunnelService, member hosts,
and loopback TCP destinations (trio servers in the test's own run)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from node.auction import Lease
from node.dataplane.service import wall_clock_ms
from node.dataplane.tunnel import TunnelConfig, TunnelService, default_resolve
from node.events import Body
from node.keys import Identity
from node.p2p import P2PHost, open_host
from node.resources import Limits

NET = "tuntest"
LOCAL = TunnelConfig(allow=("127.0.0.1/32",))


def ident(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"tunnel-test:" + name.encode()).digest())


P, M, M2, X, D = (ident(n) for n in ("provider", "member", "member2", "outsider", "device"))


def make_lease(name: str = "lease", **kw: Any) -> Lease:
    now = wall_clock_ms()
    d: dict[str, Any] = dict(
        id=hashlib.sha256(b"tunnel-lease-" + name.encode()).digest(),
        request=bytes(32), bid=bytes(32), provider=P.public, recipient=M.public,
        service="bandwidth", chain=(), start_ms=now - 1000, end_ms=now + 600_000,
        max_rate_bps=None, min_rate_bps=None, price=100, currency="EUR",
        devices=(M2.public,), phones=(), users=("alice",), max_devices=None,
        group_members=(), payers=(), sponsorships=())
    d.update(kw)
    return Lease(**d)


@dataclass
class Provider:
    host: P2PHost
    svc: TunnelService
    published: list[Body]
    leases: dict[bytes, Lease]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@asynccontextmanager
async def provider(leases: list[Lease], cfg: TunnelConfig = LOCAL,
                   resolve: Callable[[str, int], Awaitable[list[str]]] = default_resolve,
                   limits: Limits | None = None) -> AsyncIterator[Provider]:
    table = {lease.id: lease for lease in leases}
    published: list[Body] = []
    async with open_host(P.seed, limits=limits) as host, trio.open_nursery() as nursery:
        svc = TunnelService(host, NET, table.get, published.append, wall_clock_ms, cfg,
                            resolve=resolve)
        prov = Provider(host, svc, published, table)

        async def run() -> None:
            with prov.scope:
                await svc.run()

        nursery.start_soon(run)
        svc.install()
        try:
            yield prov
        finally:
            for peer in host.connected_peers():
                await host.disconnect(peer)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def member(who: Identity, prov: Provider) -> AsyncIterator[P2PHost]:
    async with open_host(who.seed) as host:
        await host.connect(prov.host.addrs[0])
        try:
            yield host
        finally:
            await host.disconnect(prov.host.peer_id)


Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """A loopback TCP server for the test's duration; yields its port."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        try:
            yield int(listeners[0].socket.getsockname()[1])
        finally:
            nursery.cancel_scope.cancel()


def blob(n: int, seed: int = 1) -> bytes:
    """n deterministic, incompressible-looking bytes."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 32
    return bytes(out[:n])


async def echo_then_send(stream: trio.SocketStream, reply: bytes) -> bytes:
    """Read the whole upload (until the client's EOF), answer sha256(upload) + reply, close."""
    h = hashlib.sha256()
    while data := await stream.receive_some(1 << 16):
        h.update(data)
    await stream.send_all(h.digest() + reply)
    await stream.aclose()
    return h.digest()


async def send_forever(stream: trio.SocketStream, chunk: bytes, limit_s: float = 30.0) -> None:
    """Send `chunk` repeatedly until the peer goes away (or `limit_s` passes)."""
    with trio.move_on_after(limit_s):
        try:
            while True:
                await stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await stream.aclose()
