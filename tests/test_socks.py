"""The SOCKS5 side of `bidmesh client tunnel`: the pure parser (node/socks.py) and the
proxy (node/tunnel_proxy.py) in front of a real TunnelService on libp2p hosts, with a
small SOCKS5 client speaking bytes on loopback TCP; attacks on the listener."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from node import socks
from node.dataplane.tunnel import TunnelConfig
from node.dataplane.tunnel_client import Tunnel, open_tunnel
from node.errors import UsageError
from node.p2p import P2PHost
from node.tunnel_proxy import TunnelProxy, listen, parse_listen
from tests.tunnel_helpers import (
    NET,
    M,
    Provider,
    X,
    blob,
    echo_then_send,
    make_lease,
    member,
    provider,
    send_forever,
    tcp_server,
)

# ---------------------------------------------------------------- pure


def test_greeting_and_request_parsing() -> None:
    assert socks.greeting_size(b"") == 2 and socks.greeting_size(b"\x05\x02") == 4
    assert socks.parse_greeting(b"\x05\x02\x00\x02") == {0, 2}
    for bad in (b"\x04\x01\x00", b"\x05\x00", b"\x05\x02\x00"):
        with pytest.raises(socks.SocksError) as e:
            socks.parse_greeting(bad)
        assert e.value.code is None
    ipv4 = b"\x05\x01\x00\x01" + bytes([10, 1, 2, 3]) + struct.pack(">H", 443)
    assert socks.request_size(ipv4[:5]) == 10
    assert socks.parse_request(ipv4) == socks.SocksRequest("10.1.2.3", 443, 1)
    name = b"example.ORG"
    dom = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", 80)
    assert socks.request_size(dom[:5]) == len(dom)
    assert socks.parse_request(dom).host == "example.org"
    v6 = b"\x05\x01\x00\x04" + ipaddress.IPv6Address("::1").packed + b"\x00\x50"
    assert socks.parse_request(v6) == socks.SocksRequest("::1", 80, 4)
    cases = [
        (b"\x05\x02\x00\x01" + bytes(4) + b"\x00\x50", socks.COMMAND_NOT_SUPPORTED),  # BIND
        (b"\x05\x01\x00\x07" + bytes(6), socks.ATYP_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03\x03a b\x00\x50", socks.HOST_UNREACHABLE),
        (b"\x05\x01\x00\x03\x02\xc3\xa4\x00\x50", socks.HOST_UNREACHABLE),  # not ASCII
        (b"\x05\x01\x00\x01" + bytes(4) + b"\x00\x00", socks.GENERAL_FAILURE),  # port 0
        (b"\x05\x01\x00\x01" + bytes(3), socks.GENERAL_FAILURE),  # short
    ]
    for raw, code in cases:
        with pytest.raises(socks.SocksError) as e:
            socks.parse_request(raw)
        assert e.value.code == code, raw
    assert socks.reply(0) == b"\x05\x00\x00\x01" + bytes(6)
    assert socks.reply_code("not_member") == socks.NOT_ALLOWED
    assert socks.reply_code("connection_refused") == socks.CONNECTION_REFUSED
    assert socks.reply_code("anything_new") == socks.GENERAL_FAILURE


def test_listen_address_is_loopback_unless_allowed() -> None:
    assert parse_listen("127.0.0.1:1080") == ("127.0.0.1", 1080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("localhost:1080", "127.0.0.1", "127.0.0.1:70000", "0.0.0.0:1080"):
        with pytest.raises(UsageError):
            parse_listen(bad)
    assert parse_listen("0.0.0.0:1080", allow_lan=True) == ("0.0.0.0", 1080)


async def test_a_port_in_use_is_one_line() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(UsageError, match=r"cannot listen on 127\.0\.0\.1:"):
            await listen("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


async def test_an_unexpected_error_ends_one_connection_not_the_proxy() -> None:
    async def opener(host: str, port: int) -> Tunnel:
        raise RuntimeError("upstream surprise")

    lines: list[str] = []
    proxy = TunnelProxy(opener, on_error=lines.append)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(proxy.serve, "127.0.0.1", 0)
        for _ in range(2):
            with trio.fail_after(10):
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.send_all(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await read_all(s) == b"\x05\x00"  # no CONNECT reply: closed
                await s.aclose()
        nursery.cancel_scope.cancel()
    assert proxy.stats.failed == {"internal": 2} and "upstream surprise" in lines[-1]


# ---------------------------------------------------------------- a SOCKS5 client


async def socks_connect(port: int, host: str, dport: int) -> tuple[trio.SocketStream, int]:
    """Connect through the proxy at 127.0.0.1:port (socks5h: names sent as names);
    returns the stream and the reply code."""
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(b"\x05\x01\x00")
    assert await _exact(s, 2) == b"\x05\x00"
    try:
        addr = b"\x01" + ipaddress.IPv4Address(host).packed
    except ValueError:
        addr = b"\x03" + bytes([len(host)]) + host.encode()
    await s.send_all(b"\x05\x01\x00" + addr + struct.pack(">H", dport))
    rep = await _exact(s, 10)
    assert rep[:1] == b"\x05"
    return s, rep[1]


async def _exact(s: trio.SocketStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await s.receive_some(n - len(buf))
        if not data:
            return buf
        buf += data
    return buf


async def read_all(s: trio.SocketStream) -> bytes:
    out = bytearray()
    while data := await s.receive_some(1 << 16):
        out += data
    return bytes(out)


@asynccontextmanager
async def proxy_for(prov: Provider, host: P2PHost, lease_id: bytes, **kw: object,
                    ) -> AsyncIterator[tuple[TunnelProxy, int, list[str]]]:
    lines: list[str] = []

    async def opener(h: str, p: int) -> Tunnel:
        return await open_tunnel(host, prov.host.peer_id, lease_id, h, p, network=NET)

    proxy = TunnelProxy(opener, on_error=lines.append, **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(proxy.serve, "127.0.0.1", 0)
        try:
            yield proxy, port, lines
        finally:
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- through the proxy


async def test_bytes_both_ways_through_socks_byte_exact() -> None:
    lease = make_lease()
    up, down = blob(2 << 20, 3), blob(3 << 20, 4)

    async def dest(s: trio.SocketStream) -> None:
        await echo_then_send(s, down)

    async with provider([lease]) as prov, tcp_server(dest) as port, \
            member(M, prov) as host, proxy_for(prov, host, lease.id) as (proxy, sport, lines):
        with trio.fail_after(60):
            s, code = await socks_connect(sport, "127.0.0.1", port)
            assert code == socks.SUCCEEDED
            await s.send_all(up)
            await s.send_eof()  # half-close: the destination sees the end of the upload
            got = await read_all(s)
            await s.aclose()
        assert got == hashlib.sha256(up).digest() + down
        # A host name is passed on and resolved by the provider (socks5h).
        with trio.fail_after(60):
            s, code = await socks_connect(sport, "localhost", port)
            assert code == socks.SUCCEEDED
            await s.send_eof()
            assert await read_all(s) == hashlib.sha256(b"").digest() + down
            await s.aclose()
        with trio.fail_after(10):
            while proxy.stats.active:
                await trio.sleep(0.01)
        st = proxy.stats.as_dict()
        assert st["tunnels"] == 2 and st["bytes_up"] == len(up)
        assert st["bytes_down"] == 2 * (32 + len(down)) and not lines


async def test_refusals_become_socks_replies_and_one_line() -> None:
    lease = make_lease()

    async def dest(s: trio.SocketStream) -> None:
        await s.aclose()

    async with tcp_server(dest) as port:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()
        async with provider([lease], TunnelConfig()) as prov, member(M, prov) as host, \
                proxy_for(prov, host, lease.id) as (proxy, sport, lines):
            s, code = await socks_connect(sport, "127.0.0.1", port)
            assert code == socks.NOT_ALLOWED  # private destination under the default policy
            await s.aclose()
            assert "private_destination" in lines[-1] and f"127.0.0.1:{port}" in lines[-1]
        cfg = TunnelConfig(allow=("127.0.0.1/32",))
        async with provider([lease], cfg) as prov, member(M, prov) as host, \
                proxy_for(prov, host, lease.id) as (proxy, sport, lines):
            s, code = await socks_connect(sport, "127.0.0.1", dead_port)
            assert code == socks.CONNECTION_REFUSED
            await s.aclose()
            assert "connection_refused" in lines[-1]
        async with provider([lease], cfg) as prov, member(X, prov) as host, \
                proxy_for(prov, host, lease.id) as (proxy, sport, lines):
            s, code = await socks_connect(sport, "127.0.0.1", port)
            assert code == socks.NOT_ALLOWED
            await s.aclose()
            assert "not_member" in lines[-1]
            assert proxy.stats.refused == {"not_member": 1}


async def test_provider_lost_mid_download_resets_the_client_at_once() -> None:
    lease = make_lease()

    async def dest(s: trio.SocketStream) -> None:
        await send_forever(s, bytes(60_000))

    async with provider([lease]) as prov, tcp_server(dest) as port, \
            member(M, prov) as host, proxy_for(prov, host, lease.id) as (proxy, sport, lines):
        s, code = await socks_connect(sport, "127.0.0.1", port)
        assert code == socks.SUCCEEDED
        assert await s.receive_some(1 << 16)
        await prov.host.disconnect(host.peer_id)
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            while await s.receive_some(1 << 16):  # a reset, not a clean end of stream
                pass
        assert "broken" in lines[-1]
        assert proxy.stats.failed == {"broken": 1}
        await s.aclose()


# ---------------------------------------------------------------- attacks on the listener


async def test_malformed_slow_and_too_many_clients_cost_nothing_lasting() -> None:
    lease = make_lease()
    payload = blob(100_000, 9)

    async def dest(s: trio.SocketStream) -> None:
        await s.send_all(payload)
        await s.aclose()

    async with provider([lease]) as prov, tcp_server(dest) as port, member(M, prov) as host, \
            proxy_for(prov, host, lease.id, handshake_timeout=0.5, max_connections=4) as (
                proxy, sport, lines):
        # Not SOCKS5 at all, and a SOCKS5 client without the no-auth method.
        # (The first is closed with its request unread: the client may see a reset.)
        for raw, answer in ((b"GET / HTTP/1.0\r\n\r\n", b""), (b"\x05\x01\x02", b"\x05\xff")):
            with trio.fail_after(10):
                s = await trio.open_tcp_stream("127.0.0.1", sport)
                await s.send_all(raw)
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await read_all(s) == answer
                await s.aclose()
        # Slowloris: a greeting that never completes is dropped after handshake_timeout.
        s = await trio.open_tcp_stream("127.0.0.1", sport)
        await s.send_all(b"\x05")
        with trio.fail_after(10):
            assert await read_all(s) == b""
        await s.aclose()
        # More connections than max_connections: the extra ones are closed at once.
        held = [await trio.open_tcp_stream("127.0.0.1", sport) for _ in range(4)]
        with trio.fail_after(10):
            while proxy.stats.open < 4:
                await trio.sleep(0.01)
        extra = await trio.open_tcp_stream("127.0.0.1", sport)
        with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
            assert await read_all(extra) == b""  # closed (with a reset)
        await extra.aclose()
        for h in held:
            await h.aclose()
        rej = proxy.stats.rejected
        assert rej["bad_version"] == 1 and rej["no_acceptable_method"] == 1
        assert rej["handshake_timeout"] >= 1 and rej["busy"] == 1
        # The proxy still serves a well-behaved client.
        with trio.fail_after(10):
            while proxy.stats.open:
                await trio.sleep(0.01)
        with trio.fail_after(30):
            s, code = await socks_connect(sport, "127.0.0.1", port)
            assert code == socks.SUCCEEDED
            assert await read_all(s) == payload
            await s.aclose()
        assert not lines
