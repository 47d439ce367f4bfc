"""The member side of the ingest protocol: send a packetized stream under a lease, receive
the processed stream. Used by the light client, devnet and the benchmark."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..auction import Lease
from ..errors import (
    BidmeshError,
    InvalidMessage,
    LeaseRefused,
    Reason,
    RemoteError,
    StreamFailed,
    UsageError,
)
from ..keys import Identity
from ..p2p import (
    FRAME_HEADER,
    P2PHost,
    PeerId,
    close_quietly,
    read_frame,
    reset_quietly,
    write_frame,
)
from ..segments import FrameReader, Packet, Segmenter, new_parser
from .wire import (
    TRAILER_SEQ,
    U64,
    SegmentLimits,
    StreamHeader,
    Trailer,
    lease_key,
    stream_protocol,
)

__all__ = ["InputAcks", "StreamResult", "member_key", "split_results",
           "stream_through_lease"]

DEFAULT_CHUNK = 256 << 10
_AUTH_REASONS = frozenset({Reason.NO_LEASE, Reason.NOT_OUR_LEASE, Reason.OUTSIDE_WINDOW,
                           Reason.NOT_MEMBER, Reason.BAD_DELEGATION, Reason.LEASE_CLOSED,
                           Reason.LEASE_ENDED, Reason.UNAUTHORIZED, Reason.WRONG_CHAIN})

Source = Iterable[bytes] | AsyncIterable[bytes]
Sink = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class StreamResult:
    trailer: Trailer
    output: bytes  # the output stream (frames), unless a sink took it
    stream_id: bytes
    key: bytes  # our per-lease aes-gcm key (to decrypt aes-gcm results)
    frames: int


def member_key(member: Identity, lease: Lease) -> bytes:
    """The aes-gcm key `member` shares with the lease's provider (see `lease_key`)."""
    return lease_key(member, lease.provider, lease.id, member.public, lease.provider)


def split_results(output: bytes) -> list[tuple[int, bytes]]:
    """The (seq, result) pairs of an output stream; PeerError if it is malformed."""
    reader = FrameReader(max_frame=max(12, len(output)))
    frames = reader.feed(output)
    reader.end()
    return frames


class InputAcks:
    """How much of our input the provider has acknowledged (pure).

    The ingest protocol has no ack message, but output frame `seq k` is segment k
    processed and returned, so every input byte up to the end of segment k is done.
    The provider cuts segments with a pure parser and count/size rules
    (`Segmenter`, docs/dataplane.md); re-running both over what we send tells where each
    segment ends in our input. Time cuts (`max_age_ms`) are not reproducible, so they
    are refused here. TS garbage between packets is counted with the packets after it
    (conservatively: a little late, never early).
    """

    def __init__(self, protocol: str, limits: SegmentLimits | None = None,
                 n_chains: int = 1) -> None:
        lim = limits or SegmentLimits()
        if lim.max_age_ms is not None:
            raise UsageError("acknowledged bytes cannot be tracked with time cuts "
                             "(max_age_ms)")
        self.protocol = protocol
        self.parser = new_parser(protocol, n_chains=n_chains)
        self.segmenter = Segmenter(lim.max_packets, lim.max_bytes)
        self.fed = 0  # bytes handed to the stream
        self.acked = 0  # bytes the provider processed and returned
        self.segments_acked = 0
        self._pos = 0  # input offset just past the last packet pushed
        self._packet_bytes = 0
        self._ends: deque[int] = deque()  # input offset where each unacked segment ends

    def feed(self, data: bytes) -> None:
        """`data` is about to be sent (in order)."""
        garbage0 = self.parser.garbage_bytes
        self.fed += len(data)
        for pkt in self.parser.feed(data):
            self._push(pkt, garbage0)

    def end(self) -> None:
        """The input is complete: the provider flushes its last segment now."""
        for pkt in self.parser.end():
            self._push(pkt, self.parser.garbage_bytes)
        if self.segmenter.flush():
            self._ends.append(self.fed)
        elif self._ends:
            self._ends[-1] = self.fed  # trailing garbage ends with the last segment

    def ack(self, seq: int) -> int:
        """Output frame `seq` arrived; returns the acknowledged input bytes."""
        while self.segments_acked <= seq and self._ends:
            self.acked = max(self.acked, self._ends.popleft())
            self.segments_acked += 1
        return self.acked

    def _push(self, pkt: Packet, garbage: int) -> None:
        """`garbage`: skipped bytes known to lie before this packet."""
        before = self._pos
        self._packet_bytes += 188 if self.protocol == "ts" else 5 + len(pkt.data)
        self._pos = min(self.fed, max(before, self._packet_bytes + garbage))
        cut = self.segmenter.push(pkt, 0)
        if len(cut) == 2:  # the open segment, then one of just this packet
            self._ends.extend((before, self._pos))
        elif cut:  # closed after taking this packet, or before it
            self._ends.append(self._pos if not self.segmenter.buffered_packets else before)


async def stream_through_lease(
    host: P2PHost,
    provider_peer: PeerId | str,
    lease: Lease,
    member: Identity,
    source: Source,
    protocol: str,
    chains: Sequence[Sequence[str]],
    *,
    network: str,
    options: Mapping[str, Any] | None = None,
    delegation: bytes | None = None,
    limits: SegmentLimits | None = None,
    stream_id: bytes | None = None,
    sink: Sink | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    timeout: float = 60.0,
    max_frame: int = 64 << 20,
) -> StreamResult:
    """Send `source` (raw `protocol` bytes: "lp" or "ts") through the provider under
    `lease` and collect the processed stream.

    Full duplex: input is written while output frames are read. Each output frame
    (`u32 length, u64 seq, result`, seqs 0, 1, 2… in order) is passed to `sink` as it
    arrives, else accumulated in `StreamResult.output` (split it with
    `split_results`). `timeout` bounds each frame read and write. Raises
    `LeaseRefused` (an `Unauthorized`) when the provider refuses us under the lease,
    `StreamFailed` (a `RemoteError`, with `.reason`) for any other error trailer,
    `InvalidMessage` if the provider breaks the format.
    """
    if chunk_size < 1:
        raise UsageError("chunk_size must be positive")
    header = StreamHeader(lease.id, stream_id or os.urandom(16), protocol, dict(options or {}),
                          tuple(tuple(c) for c in chains), limits or SegmentLimits(),
                          delegation)
    stream = await host.new_stream(provider_peer, stream_protocol(network), timeout=timeout)
    out: list[bytes] = []
    trailer: Trailer | None = None
    frames = 0
    errors: list[BidmeshError] = []
    sent = trio.Event()

    async def send(item: bytes) -> None:
        if len(item) <= chunk_size:
            await write_frame(stream, item, timeout)
            return
        view = memoryview(item)
        for i in range(0, len(item), chunk_size):
            await write_frame(stream, view[i : i + chunk_size], timeout)

    async def sender() -> None:
        # No async generators of our own here: one left unfinished when the stream fails
        # is garbage collected with a ResourceWarning (trio's asyncgen finalizer).
        try:
            await write_frame(stream, header.encode(), timeout)
            if isinstance(source, AsyncIterable):
                async for item in source:
                    await send(item)
            else:
                for item in source:
                    await send(item)
            await write_frame(stream, b"", timeout)  # end of input
        except BidmeshError as e:
            errors.append(e)
        finally:
            sent.set()

    async def receiver(cancel: trio.CancelScope) -> None:
        nonlocal trailer, frames
        try:
            while True:
                frame = await read_frame(stream, max_frame + 8, timeout)
                if len(frame) < 8:
                    raise InvalidMessage("output frame shorter than its seq",
                                         Reason.MALFORMED_FRAME)
                (seq,) = U64.unpack_from(frame)
                if seq == TRAILER_SEQ:
                    trailer = Trailer.decode(frame[8:])
                    break
                if seq != frames:
                    raise InvalidMessage(f"output seq {seq} where {frames} was due",
                                         Reason.OUT_OF_ORDER)
                frames += 1
                data = FRAME_HEADER.pack(len(frame)) + frame
                if sink is None:
                    out.append(data)
                else:
                    await sink(data)
        except BidmeshError as e:
            errors.insert(0, e)
        finally:
            if not sent.is_set():
                # The provider is done with us (error trailer) while we still send:
                # resetting ends our write, which is never cancelled (node/p2p/frames.py).
                await reset_quietly(stream)
            cancel.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver, nursery.cancel_scope)
    finally:
        await close_quietly(stream)
    if trailer is not None and not trailer.ok:
        raise (LeaseRefused if trailer.reason in _AUTH_REASONS else StreamFailed)(trailer)
    if trailer is None:
        if errors:
            raise errors[0]
        raise RemoteError("the provider ended the stream without a trailer")
    return StreamResult(trailer, b"".join(out), header.stream_id, member_key(member, lease),
                        frames)

