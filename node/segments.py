"""Dataplane core, sans-I/O: packet parsers (`packets`, re-exported here), segment
encoding, the segmenter, dispatch planning, the reorder buffer, rate control and the
local reference.

Nothing here reads a socket or a clock: bytes and `now_ms` are passed in, decisions
come back. `node/dataplane/` performs the I/O. Formats are specified in
docs/dataplane.md.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .errors import PeerError, Reason, UsageError
from .packets import (
    DEFAULT_MAX_PACKET,
    MAX_CHAINS,
    PROTOCOLS,
    TS_PACKET,
    LengthPrefixed,
    MpegTs,
    Packet,
    PacketParser,
    encode_lp,
    new_parser,
)
from .processors import ProcessContext, Processor, load_processors, run_chain

__all__ = [
    "DEFAULT_MAX_PACKET",
    "MAX_CHAINS",
    "PROTOCOLS",
    "TS_PACKET",
    "FrameReader",
    "LengthPrefixed",
    "MpegTs",
    "Packet",
    "PacketParser",
    "RateMeter",
    "ReorderBuffer",
    "Segment",
    "Segmenter",
    "Shortfall",
    "Step",
    "TokenBucket",
    "decode_packets",
    "encode_frame",
    "encode_lp",
    "encode_packets",
    "local_reference",
    "new_parser",
    "plan",
]

_U32 = struct.Struct(">I")
_FRAME_HEAD = struct.Struct(">IQ")
_EMPTY: Mapping[str, Any] = MappingProxyType({})


# ------------------------------------------------------------------- segment encoding


def encode_packets(packets: Iterable[bytes]) -> bytes:
    """Canonical segment input: `u32 BE length, payload` per packet, whatever the protocol."""
    parts: list[bytes] = []
    for p in packets:
        parts.append(_U32.pack(len(p)))
        parts.append(p)
    return b"".join(parts)


def decode_packets(data: bytes, max_packets: int = 1 << 20) -> list[bytes]:
    """Inverse of `encode_packets`; malformed or over-long input is a PeerError."""
    out: list[bytes] = []
    pos, n = 0, len(data)
    while pos < n:
        if len(out) >= max_packets:
            raise PeerError(
                f"segment holds more than {max_packets} packets", Reason.MALFORMED_SEGMENT
            )
        if n - pos < 4:
            raise PeerError("segment ends inside a packet length", Reason.MALFORMED_SEGMENT)
        (size,) = _U32.unpack_from(data, pos)
        pos += 4
        if size > n - pos:
            raise PeerError(
                f"packet length {size} runs past the segment end", Reason.MALFORMED_SEGMENT
            )
        out.append(data[pos : pos + size])
        pos += size
    return out


@dataclass(frozen=True)
class Segment:
    """A run of packets with one chain. `data` is `encode_packets(...)`; `digest` its sha256."""

    seq: int
    chain: int
    data: bytes
    packets: int

    def __post_init__(self) -> None:
        if not isinstance(self.seq, int) or not 0 <= self.seq < 1 << 64:
            raise UsageError(f"Segment.seq must be a u64, got {self.seq!r}")
        if not isinstance(self.chain, int) or not 0 <= self.chain < MAX_CHAINS:
            raise UsageError(f"Segment.chain must be 0..{MAX_CHAINS - 1}, got {self.chain!r}")
        if not isinstance(self.packets, int) or self.packets < 1:
            raise UsageError("Segment.packets must be >= 1")
        if not isinstance(self.data, bytes) or len(self.data) < 4 * self.packets:
            raise UsageError("Segment.data must be the encoded packets")

    @functools.cached_property
    def digest(self) -> bytes:
        # On demand: hashing every segment as it is cut cost the dataplane ~8 % of a
        # provider's CPU per byte, and nothing on the hot path reads it.
        return hashlib.sha256(self.data).digest()


class Segmenter:
    """Cuts packets into segments at packet boundaries.

    A segment closes when it holds `max_packets`, when the next packet would push its
    encoded size past `max_bytes` (a single larger packet forms its own segment), when
    the chain changes, or, via `tick`/`push`, when it is `max_age_ms` old (None: never).
    Count, bytes and chain cuts are a pure function of the packets; time cuts are not,
    which is why `local_reference` reproduces only the former.
    """

    def __init__(self, max_packets: int, max_bytes: int, max_age_ms: int | None = None) -> None:
        if max_packets < 1 or max_bytes < 5:
            raise UsageError("Segmenter needs max_packets >= 1 and max_bytes >= 5")
        if max_age_ms is not None and max_age_ms < 0:
            raise UsageError("Segmenter max_age_ms must be >= 0 or None")
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms
        self.next_seq = 0
        self._parts: list[bytes] = []
        self._count = 0
        self._size = 0
        self._chain = 0
        self._started_ms = 0

    @property
    def buffered_packets(self) -> int:
        return self._count

    def push(self, packet: Packet, now_ms: int) -> list[Segment]:
        out = self.tick(now_ms)
        size = 4 + len(packet.data)
        if self._count and (packet.chain != self._chain or self._size + size > self.max_bytes):
            out.append(self._close())
        if not self._count:
            self._chain, self._started_ms = packet.chain, now_ms
        self._parts.append(_U32.pack(len(packet.data)))
        self._parts.append(packet.data)
        self._count += 1
        self._size += size
        if self._count >= self.max_packets or self._size >= self.max_bytes:
            out.append(self._close())
        return out

    def tick(self, now_ms: int) -> list[Segment]:
        """Time-based flush; call it when a timer fires (see `deadline_ms`)."""
        due = self.deadline_ms
        return [self._close()] if due is not None and now_ms >= due else []

    @property
    def deadline_ms(self) -> int | None:
        """When the open segment must be flushed by age, or None."""
        if not self._count or self.max_age_ms is None:
            return None
        return self._started_ms + self.max_age_ms

    def flush(self) -> list[Segment]:
        """End of stream: close whatever is open."""
        return [self._close()] if self._count else []

    def _close(self) -> Segment:
        seg = Segment(self.next_seq, self._chain, b"".join(self._parts), self._count)
        self.next_seq += 1
        self._parts, self._count, self._size = [], 0, 0
        return seg


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Step:
    """Consecutive services done in one place. `start` is the chain position of the first
    (pass it as `ProcessContext.step` so nonces match the local reference)."""

    services: tuple[str, ...]
    local: bool
    start: int = 0

    def __post_init__(self) -> None:
        if not self.services or not all(isinstance(s, str) and s for s in self.services):
            raise UsageError("Step.services must be a non-empty tuple of service names")
        if self.start < 0:
            raise UsageError("Step.start must be >= 0")


def plan(chain: Sequence[str], local: Collection[str]) -> list[Step]:
    """Split a chain into maximal runs of services we do (local) or lack (remote).

    Each remote step is one subcontract: its services are done by one other provider
    on the output of the previous step.
    """
    steps: list[Step] = []
    run: list[str] = []
    run_local, start = False, 0
    for i, name in enumerate(chain):
        if not isinstance(name, str) or not name:
            raise PeerError(
                f"service name at position {i} is empty or not a string", Reason.BAD_CHAIN
            )
        here = name in local
        if run and here != run_local:
            steps.append(Step(tuple(run), run_local, start))
            run, start = [], i
        run_local = here
        run.append(name)
    if run:
        steps.append(Step(tuple(run), run_local, start))
    return steps


# ----------------------------------------------------------------------------- reorder


class ReorderBuffer:
    """Releases results in seq order from a window [next_seq, next_seq + window).

    A seq at or beyond the window end is a UsageError: the caller dispatched too far
    ahead and must apply backpressure (check `accepts`). Results for seqs already
    released or already buffered are ignored and counted in `duplicates`.
    """

    def __init__(self, window: int, start: int = 0) -> None:
        if window < 1 or start < 0:
            raise UsageError("ReorderBuffer needs window >= 1 and start >= 0")
        self.window = window
        self.duplicates = 0
        self._next = start
        self._held: dict[int, bytes] = {}

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def pending(self) -> int:
        return len(self._held)

    @property
    def window_end(self) -> int:
        """First seq that may not be dispatched yet."""
        return self._next + self.window

    def accepts(self, seq: int) -> bool:
        return seq < self.window_end

    def put(self, seq: int, result: bytes) -> list[tuple[int, bytes]]:
        if seq < 0:
            raise UsageError(f"seq must be >= 0, got {seq}")
        if seq >= self.window_end:
            raise UsageError(
                f"seq {seq} is beyond the reorder window [{self._next}, {self.window_end}); "
                "wait for earlier results before dispatching more"
            )
        if seq < self._next or seq in self._held:
            self.duplicates += 1
            return []
        self._held[seq] = result
        out: list[tuple[int, bytes]] = []
        while self._next in self._held:
            out.append((self._next, self._held.pop(self._next)))
            self._next += 1
        return out


# ------------------------------------------------------------------------------- rates


class TokenBucket:
    """Max-rate limiter, shared by every member of a lease. Integer math, no clock.

    `rate_bps` is in BYTES per second. The bucket starts full (`burst_bytes`).
    """

    def __init__(self, rate_bps: int, burst_bytes: int) -> None:
        if rate_bps < 1 or burst_bytes < 1:
            raise UsageError("TokenBucket needs rate_bps >= 1 and burst_bytes >= 1")
        self.rate_bps = rate_bps
        self.burst_bytes = burst_bytes
        self._milli = burst_bytes * 1000  # tokens ×1000 so refill (ms × B/s) stays integral
        self._last: int | None = None

    def _refill(self, now_ms: int) -> None:
        if self._last is not None and now_ms > self._last:
            self._milli = min(self.burst_bytes * 1000,
                              self._milli + (now_ms - self._last) * self.rate_bps)
        if self._last is None or now_ms > self._last:
            self._last = now_ms  # a clock going backwards neither refills nor rewinds

    def take(self, n: int, now_ms: int) -> int:
        """0: the n bytes may go now (and are consumed). Else ms to wait, nothing consumed."""
        if n < 0:
            raise UsageError("cannot take a negative number of bytes")
        if n > self.burst_bytes:
            raise UsageError(f"{n} bytes exceed the burst of {self.burst_bytes}; split them")
        self._refill(now_ms)
        need = n * 1000 - self._milli
        if need <= 0:
            self._milli -= n * 1000
            return 0
        return -(-need // self.rate_bps)

    def available(self, now_ms: int) -> int:
        self._refill(now_ms)
        return self._milli // 1000


@dataclass(frozen=True)
class Shortfall:
    """A span where fewer than `expected` bytes were delivered (`bytes` were)."""

    start_ms: int
    end_ms: int
    bytes: int
    expected: int

    @property
    def ms(self) -> int:
        return self.end_ms - self.start_ms


class RateMeter:
    """Min-rate monitor over fixed windows of `window_ms` from `start_ms`.

    Record delivered bytes with their time; `advance` closes finished windows and
    returns the new shortfalls (adjacent short windows merge into one span). The
    caller decides what counts as delivered and when demand existed.
    """

    def __init__(self, min_rate_bps: int, window_ms: int, start_ms: int) -> None:
        if min_rate_bps < 0 or window_ms < 1:
            raise UsageError("RateMeter needs min_rate_bps >= 0 and window_ms >= 1")
        self.min_rate_bps = min_rate_bps
        self.window_ms = window_ms
        self.total_bytes = 0
        self.shortfall_ms = 0
        self.shortfalls: list[Shortfall] = []
        self._win_start = start_ms
        self._win_bytes = 0

    def record(self, n: int, now_ms: int) -> list[Shortfall]:
        new = self.advance(now_ms)
        self._win_bytes += n
        self.total_bytes += n
        return new

    def advance(self, now_ms: int) -> list[Shortfall]:
        new: list[Shortfall] = []
        w = self.window_ms
        if now_ms >= self._win_start + w:
            self._judge(self._win_start, self._win_start + w, self._win_bytes, new)
            self._win_start += w
            self._win_bytes = 0
            empty = (now_ms - self._win_start) // w  # whole windows with nothing delivered
            if empty:
                self._judge(self._win_start, self._win_start + empty * w, 0, new)
                self._win_start += empty * w
        return new

    def close(self, now_ms: int) -> list[Shortfall]:
        """End of lease: judge the last partial window pro rata."""
        new = self.advance(now_ms)
        if now_ms > self._win_start:
            self._judge(self._win_start, now_ms, self._win_bytes, new)
            self._win_start, self._win_bytes = now_ms, 0
        return new

    def _judge(self, start: int, end: int, got: int, new: list[Shortfall]) -> None:
        expected = self.min_rate_bps * (end - start) // 1000
        if got >= expected:
            return
        self.shortfall_ms += end - start
        last = self.shortfalls[-1] if self.shortfalls else None
        if last is not None and last.end_ms == start:  # merge adjacent spans
            merged = Shortfall(last.start_ms, end, last.bytes + got, last.expected + expected)
            self.shortfalls[-1] = merged
            if new and new[-1] is last:
                new[-1] = merged
            else:
                new.append(merged)
            return
        span = Shortfall(start, end, got, expected)
        self.shortfalls.append(span)
        new.append(span)


# ------------------------------------------------------------------------ output stream


def encode_frame(seq: int, result: bytes) -> bytes:
    """One output-stream frame: `u32 BE length of the rest, u64 BE seq, result`."""
    if len(result) > (1 << 32) - 1 - 8:
        raise UsageError("result too large for one output frame")
    return _FRAME_HEAD.pack(8 + len(result), seq) + result


class FrameReader:
    """Incremental reader of the output stream (the member's side)."""

    def __init__(self, max_frame: int = 64 << 20) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        pos, out = 0, []
        while len(buf) - pos >= 12:
            n, seq = _FRAME_HEAD.unpack_from(buf, pos)
            if n < 8 or n > self.max_frame:
                raise PeerError(f"output frame length {n} is out of range", Reason.MALFORMED_FRAME)
            if len(buf) - pos - 4 < n:
                break
            out.append((seq, bytes(buf[pos + 12 : pos + 4 + n])))
            pos += 4 + n
        del buf[:pos]
        return out

    def end(self) -> None:
        if self._buf:
            raise PeerError("output stream ended inside a frame", Reason.TRUNCATED_FRAME)


# --------------------------------------------------------------------- local reference


def local_reference(
    packets: Iterable[Packet],
    chains: Sequence[Sequence[str]],
    *,
    max_packets: int,
    max_bytes: int,
    lease_id: bytes,
    stream_id: bytes,
    key: bytes | None = None,
    params: Mapping[str, Any] = _EMPTY,
    processors: Mapping[str, Processor] | None = None,
) -> bytes:
    """The output stream the dataplane must produce, computed in-process.

    Segments exactly as the live path does without time cuts, applies each segment's
    chain (with `ProcessContext.step` = chain position), and frames the results.
    """
    procs = load_processors() if processors is None else processors
    seg = Segmenter(max_packets, max_bytes, None)
    out: list[bytes] = []

    def emit(segments: list[Segment]) -> None:
        for s in segments:
            if s.chain >= len(chains):
                raise UsageError(f"packet chain {s.chain} but only {len(chains)} chains given")
            ctx = ProcessContext(lease_id, stream_id, s.seq, key, params)
            out.append(encode_frame(s.seq, run_chain(procs, chains[s.chain], s.data, ctx)))

    for p in packets:
        emit(seg.push(p, 0))
    emit(seg.flush())
    return b"".join(out)
