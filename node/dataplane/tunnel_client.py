"""The member side of `/bidmesh/<network>/tunnel/1`: open a tunnel through the provider
of a bandwidth lease and use it as a trio stream (docs/dataplane.md §14).

    tunnel = await open_tunnel(host, provider_peer, lease_id, "example.org", 80,
                               network="main")
    await tunnel.send_all(b"GET / HTTP/1.0\\r\\n\\r\\n"); await tunnel.send_eof()
    while data := await tunnel.receive_some(): ...
    await tunnel.aclose()          # tunnel.end: the provider's summary (bytes both ways)
"""

from __future__ import annotations

import math

import trio

from ..errors import (
    BidmeshError,
    InvalidMessage,
    Reason,
    StreamClosed,
    TunnelFailed,
    TunnelRefused,
    TunnelUnauthorized,
)
from ..p2p import (
    FRAME_HEADER,
    WRITE_PIECE,
    P2PHost,
    PeerId,
    Stream,
    close_quietly,
    read_frame,
    reset_quietly,
    write_frame,
)
from .tunnel_wire import (
    AUTH_REASONS,
    DATA,
    END,
    EOF,
    MAX_DATA,
    MAX_OPEN,
    TunnelEnd,
    TunnelOpen,
    TunnelReply,
    tunnel_protocol,
)

__all__ = ["Tunnel", "TunnelFailed", "TunnelRefused", "TunnelUnauthorized", "open_tunnel"]

_PIECE = WRITE_PIECE - FRAME_HEADER.size - 1  # one DATA frame = one yamux frame


class Tunnel(trio.abc.HalfCloseableStream):
    """One open tunnel as a trio stream. `reply` holds the provider's answer (the
    address it connected to, the lease's limits); `end` its summary once received."""

    def __init__(self, stream: Stream, reply: TunnelReply, dest: str,
                 timeout: float) -> None:
        self._stream = stream
        self.reply = reply
        self.dest = dest
        self.timeout = timeout
        self.end: TunnelEnd | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self._eof_in = False
        self._eof_out = False
        self._closed = False
        self._pending: memoryview | None = None

    def _failed(self, e: BaseException) -> TunnelFailed:
        if self.end is not None and not self.end.ok:
            return TunnelFailed(self.end.reason, self.end.error)
        return TunnelFailed(Reason.BROKEN, f"the tunnel to {self.dest} broke: the connection to "
                                      f"the provider was lost ({e})")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._eof_out:
            raise trio.ClosedResourceError("the tunnel is closed for sending")
        if self.end is not None and not self.end.ok:
            raise TunnelFailed(self.end.reason, self.end.error)
        view = memoryview(data)
        try:
            for i in range(0, len(view), _PIECE):
                await write_frame(self._stream, view[i : i + _PIECE], self.timeout, DATA)
        except BidmeshError as e:
            raise self._failed(e) from None
        self.bytes_up += len(view)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Half-close: the destination sees end of stream; receiving goes on."""
        if self._eof_out or self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._eof_out = True
        try:
            await write_frame(self._stream, EOF, self.timeout)
        except BidmeshError as e:
            raise self._failed(e) from None

    async def receive_view(self) -> memoryview | None:
        """Next bytes from the destination without a copy; None at end of stream.
        Raises TunnelFailed when the tunnel ended in error or the provider was lost."""
        if self._pending is not None:
            view, self._pending = self._pending, None
            return view
        if self._closed:
            raise trio.ClosedResourceError("the tunnel is closed")
        while True:
            if self.end is not None:
                if not self.end.ok:
                    raise TunnelFailed(self.end.reason, self.end.error)
                return None
            try:
                frame = await read_frame(self._stream, 1 + MAX_DATA, math.inf)
            except BidmeshError as e:
                raise self._failed(e) from None
            kind = frame[:1]
            if kind == DATA and len(frame) > 1:
                self.bytes_down += len(frame) - 1
                return memoryview(frame)[1:]
            if kind == EOF and len(frame) == 1:
                self._eof_in = True
                return None
            if kind == END:
                self.end = TunnelEnd.decode(memoryview(frame)[1:])
                continue
            raise self._failed(InvalidMessage("unknown tunnel frame type", Reason.BAD_FRAME))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._eof_in and self._pending is None and self.end is None:
            return b""  # after EOF only the END summary follows, read by aclose
        view = await self.receive_view()
        if view is None:
            return b""
        if max_bytes is not None and len(view) > max_bytes:
            self._pending = view[max_bytes:]
            view = view[:max_bytes]
        return bytes(view)

    async def wait_end(self, timeout: float = 5.0) -> TunnelEnd | None:
        """After both sides' EOF: wait (bounded) for the provider's summary."""
        with trio.move_on_after(timeout):
            while self.end is None:
                try:
                    await self.receive_view()
                except (TunnelFailed, trio.ClosedResourceError):
                    break
        return self.end

    async def aclose(self) -> None:
        """Close. After both EOFs the provider's summary is collected first (bounded);
        a tunnel still carrying data is reset (the destination connection is dropped)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        clean = self.end is not None or (self._eof_in and self._eof_out)
        if clean and self.end is None:
            await self.wait_end()
        self._closed = True
        if clean:
            await close_quietly(self._stream)
        else:
            await reset_quietly(self._stream)


async def open_tunnel(host: P2PHost, provider: PeerId | str, lease_id: bytes, dest_host: str,
                      dest_port: int, *, network: str, delegation: bytes | None = None,
                      timeout: float = 30.0) -> Tunnel:
    """Open a tunnel to `dest_host:dest_port` through `provider` under `lease_id`.

    The provider resolves `dest_host` (socks5h semantics). Raises TunnelUnauthorized
    (an Unauthorized) for lease refusals, TunnelRefused (with `.reason`) otherwise,
    StreamTimeout/OperationError when the provider cannot be reached."""
    req = TunnelOpen(lease_id, dest_host, dest_port, delegation)
    stream = await host.new_stream(provider, tunnel_protocol(network), timeout=timeout)
    try:
        await write_frame(stream, req.encode(), timeout)
        reply = TunnelReply.decode(await read_frame(stream, MAX_OPEN, timeout))
    except (InvalidMessage, StreamClosed) as e:
        await reset_quietly(stream)
        if e.reason in (Reason.EOF, Reason.TRUNCATED):
            raise TunnelRefused(Reason.CLOSED, "the provider closed the tunnel without an "
                                          "answer") from None
        raise
    except BaseException:
        await reset_quietly(stream)
        raise
    if not reply.ok:
        await close_quietly(stream)
        cls = TunnelUnauthorized if reply.reason in AUTH_REASONS else TunnelRefused
        raise cls(reply.reason, reply.error)
    return Tunnel(stream, reply, f"{dest_host}:{dest_port}", timeout)
