"""Bytes in flight on the serving side of the process protocols, per peer and per node,
across all of a peer's sessions and single requests (issue 12 item 6), and frame reads
that can wait for that budget between a frame's length and its body.

Why between: the length says what the body will cost before we hold it. Waiting there
stops reading, so yamux flow control holds the sender; the wait does not count against
the read's timeout (an honest peer queued behind others is not idle).
"""

from __future__ import annotations

import trio

from ..errors import InvalidMessage, Reason, UsageError
from ..p2p import FRAME_HEADER, Stream, StreamTimeout, touch_stream
from ..p2p.frames import _read_exactly as _p2p_read_exactly  # as read_frame maps EOF/reset

__all__ = ["ByteBudget", "read_exactly", "read_frame_length"]


class ByteBudget:
    """At most `per_peer` bytes charged to one peer and `total` to everyone at once.

    A charge larger than `per_peer` is admitted when the peer has nothing else in
    flight (it is still capped by the frame limit of the protocol), so a legitimate
    large request is slow, never refused. Waiters re-check on every release."""

    def __init__(self, per_peer: int, total: int) -> None:
        if per_peer < 1 or total < per_peer:
            raise UsageError("ByteBudget needs 1 <= per_peer <= total")
        self.per_peer, self.total = per_peer, total
        self.used = 0
        self.by_peer: dict[bytes, int] = {}
        self.waited = 0  # charges that had to wait
        self._released = trio.Event()

    def _fits(self, peer: bytes, n: int) -> bool:
        mine = self.by_peer.get(peer, 0)
        if mine == 0:  # one charge per peer always gets through the per-peer cap
            return self.used == 0 or self.used + min(n, self.per_peer) <= self.total
        return mine + n <= self.per_peer and self.used + n <= self.total

    async def acquire(self, peer: bytes, n: int) -> None:
        """Charge `n` bytes to `peer`, waiting until they fit."""
        if n < 0:
            raise UsageError("ByteBudget.acquire: negative size")
        if not self._fits(peer, n):
            self.waited += 1
            while not self._fits(peer, n):
                await self._released.wait()
        else:
            await trio.lowlevel.checkpoint()
        self.used += n
        self.by_peer[peer] = self.by_peer.get(peer, 0) + n

    def charge(self, peer: bytes, n: int) -> None:
        """Charge `n` bytes already held (e.g. outputs just produced) without waiting:
        the budget may go over for a while, and further reads wait until it is back."""
        if n <= 0:
            return
        self.used += n
        self.by_peer[peer] = self.by_peer.get(peer, 0) + n

    def release(self, peer: bytes, n: int) -> None:
        if n == 0:
            return
        left = self.by_peer.get(peer, 0) - n
        if left < 0 or n < 0:
            raise UsageError("ByteBudget.release: more than was charged")
        if left:
            self.by_peer[peer] = left
        else:
            del self.by_peer[peer]
        self.used -= n
        self._released.set()
        self._released = trio.Event()

    def stats(self) -> dict[str, int]:
        return {"bytes_in_flight": self.used, "peers_in_flight": len(self.by_peer),
                "max_peer_bytes": self.per_peer, "max_total_bytes": self.total,
                "waited": self.waited}


async def read_frame_length(stream: Stream, max_size: int, timeout: float) -> int:
    """The u32 BE length of the next frame (`node.p2p.read_frame` without the body).
    StreamClosed when the stream ended before it, InvalidMessage "oversized" above
    `max_size`; StreamTimeout after `timeout`."""
    try:
        with trio.fail_after(timeout):
            (length,) = FRAME_HEADER.unpack(
                await _p2p_read_exactly(stream, FRAME_HEADER.size, "header"))
    except trio.TooSlowError:
        raise StreamTimeout(f"no frame within {timeout} s") from None
    if length > max_size:
        raise InvalidMessage(f"frame of {length} bytes exceeds the limit of {max_size}",
                             Reason.OVERSIZED)
    return int(length)


async def read_exactly(stream: Stream, n: int, timeout: float) -> bytes:
    """`n` bytes of the frame body being read (InvalidMessage "truncated" at EOF)."""
    if n == 0:
        return b""
    try:
        with trio.fail_after(timeout):
            body = await _p2p_read_exactly(stream, n, "body")
    except trio.TooSlowError:
        raise StreamTimeout(f"frame body not complete within {timeout} s") from None
    touch_stream(stream)
    return body
