"""Framed streams: u32 big-endian length prefix, every read bounded, writes cancel-safe.

    stream = await host.new_stream(peer, "/bidmesh/x/1")
    await write_frame(stream, b"…"); data = await read_frame(stream, 1 << 20, 10.0)
"""

from __future__ import annotations

import logging
import math
import struct
import weakref
from typing import Final

import trio
from libp2p.abc import INetStream
from libp2p.io.exceptions import IOException
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from ..errors import (
    InvalidMessage,
    OperationError,
    Reason,
    RemoteError,
    StreamClosed,
    StreamTimeout,
    UsageError,
)
from ..resources import ResourceManager, StreamLease

log = logging.getLogger("node.p2p")

Stream = INetStream
"""A libp2p stream (`libp2p.abc.INetStream`): read/write/close/reset, `muxed_conn`."""

FRAME_HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = (1 << 32) - 1
# How long write_frame waits, after resetting a timed-out stream, for the write
# to give up before cancelling it outright.
WRITE_ABORT_GRACE: Final = 5.0
# Bytes per stream write: noise's largest plaintext (65535 - 16-byte tag) minus yamux's
# 12-byte header. Yamux cuts writes into frames of up to 65524 payload bytes
# (stream_muxer/yamux/yamux.py:245) and noise encrypts at most 65519 per message
# (security/noise/io.py:27), so a full yamux frame left as two noise messages
# (65519 + 17 bytes: two AEAD calls and sends each way); 65507-byte writes make every
# yamux frame exactly one. Measured on a two-process stream: -30 % sender CPU.
WRITE_PIECE: Final = 65535 - 16 - 12


# The resource-manager lease of each inbound stream (node/p2p/guard.py registers it),
# so that read_frame can mark the stream as active.
_STREAM_LEASES: weakref.WeakKeyDictionary[INetStream, tuple[ResourceManager, StreamLease]] = (
    weakref.WeakKeyDictionary()
)


def touch_stream(stream: INetStream) -> None:
    """A complete message arrived on `stream` (read_frame calls this): not idle."""
    entry = _STREAM_LEASES.get(stream)
    if entry is not None:
        entry[0].touch_stream(entry[1])


async def close_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        try:
            await stream.close()
        except (IOException, OSError) as exc:
            log.debug("closing a stream failed (already gone): %r", exc)


async def reset_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        try:
            await stream.reset()
        except (IOException, OSError) as exc:
            log.debug("resetting a stream failed (already gone): %r", exc)


def _was_reset(stream: INetStream) -> bool:
    """Whether an EOF was really a reset.

    Yamux finalizes a stream as soon as RST arrives (stream_muxer/yamux/yamux.py:1349,
    :1571) and a later read of an unknown stream id raises MuxedStreamEOF
    (:1060), so NetStream.read reports a reset as StreamEOF; the YamuxStream
    object still carries `reset_received`.
    """
    return getattr(getattr(stream, "muxed_stream", None), "reset_received", False) is True


async def _read_exactly(stream: INetStream, n: int, what: str) -> bytes:
    parts: list[bytes] = []  # joined once: a bytearray copied out again costs 2 copies
    got = 0
    while got < n:
        try:
            chunk = await stream.read(n - got)
        except StreamEOF:
            if _was_reset(stream):
                raise RemoteError("the peer reset the stream") from None
            if not got and what == "header":
                raise StreamClosed("the peer closed the stream before a frame") from None
            raise InvalidMessage(
                f"stream ended inside a frame {what} ({got} of {n} bytes)", Reason.TRUNCATED
            ) from None
        except StreamReset:
            raise RemoteError("the peer reset the stream") from None
        except (IOException, OSError) as exc:
            raise OperationError(f"reading from the stream failed: {exc!r}") from exc
        if not chunk:  # defensive: 0.8.1 raises StreamEOF instead of returning b""
            raise InvalidMessage(f"stream ended inside a frame {what}", Reason.TRUNCATED)
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_frame(stream: INetStream, max_size: int, timeout: float) -> bytes:
    """Read one u32-BE-length-prefixed frame.

    Raises InvalidMessage("oversized") if the announced length exceeds
    `max_size` (nothing more is read), StreamClosed (reason "eof"; not a peer
    error) if the stream ended cleanly before the frame, InvalidMessage("truncated")
    if it ended inside it, RemoteError if the peer reset the stream, StreamTimeout
    after `timeout` seconds (math.inf for none).
    """
    try:
        with trio.fail_after(timeout):
            (length,) = FRAME_HEADER.unpack(
                await _read_exactly(stream, FRAME_HEADER.size, "header")
            )
            if length > max_size:
                raise InvalidMessage(
                    f"frame of {length} bytes exceeds the limit of {max_size}", Reason.OVERSIZED
                )
            body = await _read_exactly(stream, length, "body") if length else b""
    except trio.TooSlowError:
        raise StreamTimeout(f"no complete frame within {timeout} s") from None
    touch_stream(stream)  # useful traffic: the stream and its connection are not idle
    return body


async def write_frame(stream: INetStream, data: bytes | memoryview, timeout: float = math.inf,
                      head: bytes = b"") -> None:
    """Write one u32-BE-length-prefixed frame `head | data`, in WRITE_PIECE-sized writes.

    Cancellation-safe: the writes are shielded, and when `timeout` passes the
    stream is reset instead, which makes yamux abandon the write between
    frames. Consequently an enclosing cancel scope does *not* interrupt it:
    pass the time you are willing to wait as `timeout`. (Cancelling a write in
    0.8.1 can stop it between noise encryption and the socket write, which
    desynchronises the session and kills the whole connection.) `head` is
    sent before `data` without copying `data` to prepend it.

    Raises UsageError if the frame is 4 GiB or more, StreamTimeout after
    `timeout` (the stream is then reset), RemoteError if the peer reset the
    stream, OperationError if it is closed.
    """
    size = len(head) + len(data)
    if size > MAX_FRAME:
        raise UsageError(f"a frame holds at most {MAX_FRAME} bytes, got {size}")
    view = memoryview(data)
    first = WRITE_PIECE - FRAME_HEADER.size - len(head)
    if first < 0:
        raise UsageError(f"a frame head holds at most {WRITE_PIECE - FRAME_HEADER.size} bytes")
    start = b"".join((FRAME_HEADER.pack(size), head, view[:first]))
    timed_out = False

    async def watchdog() -> None:
        nonlocal timed_out
        await trio.sleep(timeout)
        timed_out = True
        await reset_quietly(stream)

    error: BaseException | None = None
    with trio.CancelScope(shield=True):
        # Last resort if even the reset cannot get through (TCP send stuck):
        # then the connection is unusable anyway.
        with trio.move_on_after(timeout + WRITE_ABORT_GRACE):
            async with trio.open_nursery() as nursery:
                if timeout != math.inf:
                    nursery.start_soon(watchdog)
                try:
                    await stream.write(start)
                    for i in range(first, len(view), WRITE_PIECE):
                        # yamux slices and prepends its header: one copy, as for bytes
                        await stream.write(view[i : i + WRITE_PIECE])  # type: ignore[arg-type]
                except (IOException, OSError) as exc:
                    error = exc
                nursery.cancel_scope.cancel()
    if timed_out:
        raise StreamTimeout(f"writing a frame of {size} bytes took longer than {timeout} s")
    if isinstance(error, StreamReset):
        raise RemoteError("the peer reset the stream") from None
    if error is not None:
        raise OperationError(f"writing to the stream failed: {error!r}") from error
    await trio.lowlevel.checkpoint()  # deliver any cancellation held off by the shield

