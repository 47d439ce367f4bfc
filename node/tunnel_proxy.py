"""A local SOCKS5 proxy whose connections are tunnels through a bandwidth lease.

`bidmesh client tunnel LEASE --socks 127.0.0.1:1080` runs one (node/cli/tunnel_cmds.py):
every SOCKS CONNECT becomes one tunnel (`LightClient.open_tunnel`), bytes are piped
both ways with half-close, and a refusal is answered with the matching SOCKS reply
code (node/socks.py) and told once, in one line, through `on_error`.

Limits for whoever can reach the listener (loopback by default): at most
`max_connections` connections at once (more are closed at once, counted `busy`); the
greeting and request must arrive within `handshake_timeout` s (slow or malformed
handshakes are closed and counted); every read is bounded in size; the tunnels
themselves are capped by the provider (per member and lease).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import socks
from .dataplane.tunnel_client import Tunnel, TunnelFailed, TunnelRefused
from .errors import BidmeshError, ClientGone, Reason

__all__ = ["ProxyStats", "TunnelProxy", "listen", "parse_listen"]

log = logging.getLogger("bidmesh.tunnel_proxy")
Opener = Callable[[str, int], Awaitable[Tunnel]]
_CHUNK = 64 << 10


def parse_listen(text: str, *, allow_lan: bool = False) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:1080` for IPv6) to listen on; loopback only unless
    `allow_lan` (an open SOCKS port lets anyone who reaches it use the lease)."""
    import ipaddress

    from .errors import UsageError

    host, sep, port_s = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_s)
        ip = ipaddress.ip_address(host or "127.0.0.1")
    except ValueError:
        raise UsageError(f"--socks {text!r}: give HOST:PORT with an IP address, like "
                         "127.0.0.1:1080") from None
    if not sep or not 0 <= port <= 65535:
        raise UsageError(f"--socks {text!r}: give HOST:PORT, like 127.0.0.1:1080")
    if not ip.is_loopback and not allow_lan:
        raise UsageError(f"--socks {text!r} is not a loopback address: anyone who reaches "
                         "it could use your lease (no SOCKS authentication); add --allow-lan "
                         "if that is what you want")
    return str(ip), port


async def listen(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the proxy's listening socket; UsageError (one line) if that fails."""
    from .errors import UsageError

    try:
        return list(await trio.open_tcp_listeners(port, host=host, backlog=128))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} for SOCKS5: {e.strerror or e} "
                         "(pick another --socks port)") from None


@dataclass
class ProxyStats:
    connections: int = 0  # SOCKS connections accepted
    open: int = 0  # connections being served now
    tunnels: int = 0  # tunnels opened
    active: int = 0  # tunnels open now
    bytes_up: int = 0  # client -> destination
    bytes_down: int = 0  # destination -> client
    refused: Counter[str] = field(default_factory=Counter)  # by the provider, by reason
    failed: Counter[str] = field(default_factory=Counter)  # open tunnels that broke
    rejected: Counter[str] = field(default_factory=Counter)  # SOCKS handshakes we refused

    def as_dict(self) -> dict[str, Any]:
        return {"connections": self.connections, "tunnels": self.tunnels,
                "active": self.active, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "refused": dict(self.refused),
                "failed": dict(self.failed), "rejected": dict(self.rejected)}


def _abort(stream: trio.SocketStream) -> None:
    """Close with a TCP reset: the client must not take a cut-off download for a
    complete one (an HTTP/1.0 body without a length ends at the close)."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class TunnelProxy:
    """Serves SOCKS5 CONNECT through `opener(host, port)` (one tunnel each)."""

    def __init__(self, opener: Opener, *, handshake_timeout: float = 10.0,
                 max_connections: int = 64,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.opener = opener
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.on_error = on_error or (lambda line: log.warning("%s", line))
        self.stats = ProxyStats()
        self.started = time.monotonic()

    async def serve(self, host: str, port: int, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Listen on host:port and serve until cancelled; started() gets the bound
        address (port 0 picks a free one)."""
        listeners = await listen(host, port)
        bound = listeners[0].socket.getsockname()
        task_status.started((str(bound[0]), int(bound[1])))
        await self.serve_listeners(listeners)

    async def serve_listeners(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        st = self.stats
        if st.open >= self.max_connections:
            st.rejected[Reason.BUSY] += 1
            _abort(stream)
            await stream.aclose()
            return
        st.open += 1
        st.connections += 1
        try:
            await self._serve(stream)
        except Exception as e:
            # The boundary of one SOCKS connection: py-libp2p's error types are not a
            # closed set, and one connection's surprise must not end the proxy.
            st.failed[Reason.INTERNAL] += 1
            log.error("SOCKS connection failed unexpectedly", exc_info=True)
            self.on_error(f"internal error on a SOCKS connection: {type(e).__name__}: {e}")
            _abort(stream)
        finally:
            st.open -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read(self, stream: trio.SocketStream, buf: bytearray,
                    size: Callable[[bytes], int]) -> None:
        while len(buf) < (need := size(bytes(buf))):
            data = await stream.receive_some(need - len(buf))
            if not data:
                raise socks.SocksError("the client closed during the handshake", Reason.EOF, None)
            buf += data

    async def _handshake(self, stream: trio.SocketStream) -> socks.SocksRequest | None:
        greeting, request = bytearray(), bytearray()
        with trio.move_on_after(self.handshake_timeout) as scope:
            try:
                await self._read(stream, greeting, socks.greeting_size)
                if socks.NO_AUTH not in socks.parse_greeting(bytes(greeting)):
                    self.stats.rejected[Reason.NO_ACCEPTABLE_METHOD] += 1
                    await stream.send_all(bytes([5, socks.NO_ACCEPTABLE]))
                    return None
                await stream.send_all(bytes([5, socks.NO_AUTH]))
                await self._read(stream, request, socks.request_size)
                req = socks.parse_request(bytes(request))
            except socks.SocksError as e:
                self.stats.rejected[e.reason] += 1
                if e.code is not None:
                    await stream.send_all(socks.reply(e.code))
                return None
        if scope.cancelled_caught:
            self.stats.rejected[Reason.HANDSHAKE_TIMEOUT] += 1
            return None
        return req

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            req = await self._handshake(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.stats.rejected[Reason.CLIENT_RESET] += 1
            return
        if req is None:
            return
        dest = f"{req.host}:{req.port}" if ":" not in req.host else f"[{req.host}]:{req.port}"
        try:
            tunnel = await self.opener(req.host, req.port)
        except TunnelRefused as e:
            self.stats.refused[e.reason] += 1
            self.on_error(f"{dest}: {e}")
            await self._reply(stream, socks.reply_code(e.reason))
            return
        except BidmeshError as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            self.stats.refused[Reason.PROVIDER_UNREACHABLE] += 1
            self.on_error(f"{dest}: cannot reach the provider ({reason}): {e}")
            await self._reply(stream, socks.reply_code(Reason.PROVIDER_UNREACHABLE))
            return
        self.stats.tunnels += 1
        self.stats.active += 1
        try:
            if await self._reply(stream, socks.SUCCEEDED):
                await self._pipe(stream, tunnel, dest)
        finally:
            self.stats.active -= 1
            with trio.CancelScope(shield=True):
                await tunnel.aclose()

    async def _reply(self, stream: trio.SocketStream, code: int) -> bool:
        try:
            await stream.send_all(socks.reply(code))
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.stats.failed[Reason.CLIENT_RESET] += 1
            return False

    async def _pipe(self, stream: trio.SocketStream, tunnel: Tunnel, dest: str) -> None:
        st = self.stats
        errors: list[BaseException] = []

        async def up() -> None:
            while True:
                try:
                    data = await stream.receive_some(_CHUNK)
                except (trio.BrokenResourceError, OSError) as e:
                    raise ClientGone(str(e)) from None
                if not data:
                    await tunnel.send_eof()
                    return
                await tunnel.send_all(data)
                st.bytes_up += len(data)

        async def down() -> None:
            while True:
                view = await tunnel.receive_view()
                try:
                    if view is None:
                        await stream.send_eof()
                        return
                    await stream.send_all(view)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    raise ClientGone(str(e)) from None
                st.bytes_down += len(view)

        async with trio.open_nursery() as nursery:
            async def run(fn: Callable[[], Awaitable[None]]) -> None:
                try:
                    await fn()
                except (TunnelFailed, ClientGone, trio.ClosedResourceError) as e:
                    errors.append(e)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(run, up)
            nursery.start_soon(run, down)
        if not errors:
            return
        e = errors[0]
        if isinstance(e, TunnelFailed):
            st.failed[e.reason] += 1
            self.on_error(f"{dest}: {e}")
            _abort(stream)
        else:
            st.failed[Reason.CLIENT_RESET] += 1  # the tunnel is reset by its aclose
