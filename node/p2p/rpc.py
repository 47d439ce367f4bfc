"""Request/response over framed streams (one stream per request on the kept connection).

    serve_requests(host, "/bidmesh/sync/1", handler, max_request=1 << 20)
    reply = await request(host, peer, "/bidmesh/sync/1", b"…", max_response=1 << 20, timeout=10)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from ..errors import (
    BidmeshError,
    InvalidMessage,
    PeerError,
    Reason,
    RequestRefused,
    StreamClosed,
    StreamTimeout,
)
from .frames import close_quietly, read_frame, reset_quietly, write_frame
from .host import P2PHost, set_stream_handler
from .ids import parse_peer_id, pubkey_from_peer_id, remote_peer_id

log = logging.getLogger("node.p2p")

RequestHandler = Callable[[bytes, bytes], Awaitable[bytes]]


# Wire: request = one frame (the payload). Response = one frame whose first
# byte is 0x00 (ok: the rest is the payload) or 0x01 (error: one byte n, n bytes
# of ASCII reason code, then a UTF-8 message). A handler crash resets the stream.

_OK: Final = 0
_ERR: Final = 1


def _error_body(reason: str, message: str) -> bytes:
    code = reason.encode("ascii", "replace")[:255]
    return bytes([_ERR, len(code)]) + code + message.encode("utf-8", "replace")[:1024]


def _parse_response(peer: ID, protocol: str, frame: bytes) -> bytes:
    if not frame:
        raise InvalidMessage(f"{peer} sent an empty {protocol} response", Reason.MALFORMED)
    if frame[0] == _OK:
        return frame[1:]
    if frame[0] == _ERR and len(frame) >= 2 and len(frame) >= 2 + frame[1]:
        reason = frame[2 : 2 + frame[1]].decode("ascii", "replace")
        message = frame[2 + frame[1] :].decode("utf-8", "replace")
        raise RequestRefused(f"{peer} refused the {protocol} request ({reason}): {message}", reason)
    raise InvalidMessage(f"{peer} sent a malformed {protocol} response", Reason.MALFORMED)


async def request(
    host: P2PHost,
    peer_id: ID | str,
    protocol: str,
    payload: bytes,
    max_response: int,
    timeout: float,
) -> bytes:
    """Send one request on a new stream and return the response payload.

    Everything (stream open, write, read) shares one `timeout`. Raises
    StreamTimeout, RequestRefused (the handler answered with an error; has
    `.reason`, e.g. "oversized"), RemoteError (the peer reset the stream: its
    handler crashed or it refused the protocol), InvalidMessage (the response
    is larger than `max_response` or malformed) or OperationError.
    """
    peer = parse_peer_id(peer_id)
    deadline = trio.current_time() + timeout
    try:
        # Cancelling stream opens and reads is safe; writes get the deadline.
        with trio.fail_at(deadline):
            stream = await host.new_stream(peer, protocol, timeout=math.inf)
            try:
                frame = await _exchange(stream, payload, max_response + 1, deadline)
            except BaseException:
                await reset_quietly(stream)
                raise
            await close_quietly(stream)
    except trio.TooSlowError:
        raise StreamTimeout(f"{protocol} request to {peer} took longer than {timeout} s") from None
    response = _parse_response(peer, protocol, frame)
    host.resources.touch(peer)
    return response


async def _exchange(stream: INetStream, payload: bytes, max_frame: int, deadline: float) -> bytes:
    """Write the request while reading the response.

    Concurrent so that a server answering early (e.g. "oversized" after the
    header) is heard even while our write is stalled on yamux flow control;
    the stalled write is then ended by resetting the stream, never by
    cancelling it (see write_frame).
    """
    write_error: list[BidmeshError] = []
    read_error: list[BidmeshError] = []
    frame = b""
    write_done = trio.Event()

    async def writer() -> None:
        try:
            await write_frame(stream, payload, max(0.0, deadline - trio.current_time()))
        except BidmeshError as exc:
            write_error.append(exc)
        finally:
            write_done.set()

    # Errors are captured and raised after the nursery: raising inside it would
    # wrap them in an ExceptionGroup (trio's strict exception groups).
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        try:
            frame = await read_frame(stream, max_frame, math.inf)
        except BidmeshError as exc:
            read_error.append(exc)
        if not write_done.is_set():
            await reset_quietly(stream)
    if read_error:
        # A write failure (e.g. reset while sending) explains a failed read best.
        if write_error and not isinstance(read_error[0], InvalidMessage):
            raise write_error[0] from read_error[0]
        raise read_error[0]
    return frame


def serve_requests(
    host: P2PHost,
    protocol: str,
    handler: RequestHandler,
    max_request: int,
    *,
    timeout: float = 10.0,
    max_concurrent: int = 64,
) -> None:
    """Answer `protocol` requests with `await handler(peer_pubkey, payload) -> bytes`.

    `peer_pubkey` is the authenticated 32-byte Ed25519 key of the requester.
    Requests over `max_request` bytes get an "oversized" error answer without
    being read. A handler raising PeerError answers an error with its reason
    (the requester sees RequestRefused); any other exception resets the
    stream. Reading the request plus running the handler is bounded by
    `timeout`; beyond `max_concurrent` requests in flight for the protocol, or
    `limits.requests_per_peer` for the peer (`host.resources`), the answer is
    "busy". Streams per protocol and per peer are limited before this runs
    (node/p2p/guard.py).
    """
    limiter = trio.Semaphore(max_concurrent)

    async def on_stream(stream: INetStream) -> None:
        peer = remote_peer_id(stream)
        ticket = host.resources.try_start_request(peer, protocol)
        if ticket is None:
            host.guard.fault(peer, "limit_requests_per_peer")
            await write_frame(stream, _error_body("busy", "too many requests in flight "
                                                  "from you"), 5.0)
            return
        try:
            await _serve_one(stream, peer)
        finally:
            host.resources.end_request(ticket)

    async def _serve_one(stream: INetStream, peer: ID) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await write_frame(stream, _error_body("busy", "too many requests in flight"), 5.0)
            return
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_at(deadline):
                try:
                    payload = await read_frame(stream, max_request, math.inf)
                    response = bytes([_OK]) + await handler(pubkey_from_peer_id(peer), payload)
                except (PeerError, StreamClosed) as exc:
                    log.info("%s request from %s refused (%s): %s", protocol, peer, exc.reason, exc)
                    response = _error_body(exc.reason, str(exc))
        except trio.TooSlowError:
            raise StreamTimeout(
                f"{protocol} request from {peer} not served within {timeout} s"
            ) from None
        finally:
            limiter.release()
        await write_frame(stream, response, max(0.0, deadline - trio.current_time()))
        host.resources.touch(peer)

    set_stream_handler(host, protocol, on_stream)

