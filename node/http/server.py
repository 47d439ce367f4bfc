"""The HTTP server: h11 over trio sockets, bounded heads, keep-alive, eviction
(`serve()`, the I/O shell around `HttpApi` and `ConnTable`)."""

from __future__ import annotations

import contextlib
import http
import logging
import math
from typing import Any, Final

import h11
import trio

from .api import SECURITY_HEADERS, HttpApi, HttpSettings, Response, _error
from .conns import AcceptPacer, ConnSlot, ConnTable

log = logging.getLogger("bidmesh.http")


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



async def _refuse(api: HttpApi, stream: trio.abc.Stream, stat: str, why: str) -> None:
    """503 before reading the request, counted under `stat`, then a lingering close."""
    api.conn_stats[stat] += 1
    api.requests["503"] += 1
    await _send_raw(stream, _raw_error(503, f"{why}; retry shortly"))
    await _linger(stream)

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
    pacer = AcceptPacer(settings.accept_per_s, settings.accept_burst)

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                ip = str(stream.socket.getpeername()[0])
            except OSError:
                return  # already gone
            wait = pacer.delay(trio.current_time())
            if wait is None:
                await _refuse(api, stream, "refused_paced", "too many new connections")
                return
            if wait > 0:
                api.conn_stats["paced"] += 1
                await trio.sleep(wait)
            slot, evicted = table.admit(ip, trio.current_time())
            for old in evicted:
                api.conn_stats["evicted"] += 1
                if old.scope is not None:
                    old.scope.cancel()
            if slot is None:
                # Answer at once without reading the request; the client sees 503.
                await _refuse(api, stream, "refused_full", "too many connections")
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
