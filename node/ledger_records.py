"""The ledger's self-contained record checks and result types (split from `ledger`,
which re-exports them): decoding and checking records (size, codec, signature,
schema), chain order against a head, reading export streams."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from .errors import InvalidEvent, Reason
from .events import MAX_WIRE, Event, decode_wire

# The ledger's tables: meta, stored events (indexed for lookups), fork proofs.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events(
    n INTEGER PRIMARY KEY,            -- local arrival order, a cursor for watchers
    id BLOB NOT NULL,                 -- unique: it hashes (author, seq, ...)
    idk INTEGER NOT NULL,             -- first 8 bytes of id: a small index for lookups
    author BLOB NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    ref BLOB,
    wire BLOB NOT NULL,
    UNIQUE(author, seq)
);
CREATE INDEX IF NOT EXISTS events_idk ON events(idk);
CREATE INDEX IF NOT EXISTS events_ref ON events(ref) WHERE ref IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_kind_ts ON events(kind, ts_ms);
CREATE INDEX IF NOT EXISTS events_canon ON events(ts_ms, author, seq);
CREATE TABLE IF NOT EXISTS forks(
    author BLOB NOT NULL,
    seq INTEGER NOT NULL,
    wire_a BLOB NOT NULL,
    wire_b BLOB NOT NULL,
    PRIMARY KEY(author, seq)
);
"""


def idk(event_id: bytes) -> int:
    """The indexed key of an event id: its first 8 bytes as an order-preserving signed
    integer. An 8-byte index is a quarter the size of one over 32-byte ids, which
    keeps ingest fast once the ledger outgrows the page cache; lookups check the
    full id too."""
    return int.from_bytes(event_id[:8], "big") - (1 << 63)


class Status(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    PENDING = "pending"
    REJECTED = "rejected"
    FORK = "fork"


# Reasons that say nothing bad about the sender: a node must not penalise a peer for
# these, and gossip validators must not reject on them (py-libp2p caches verdicts).
TRANSIENT_REASONS = frozenset({Reason.PENDING_FULL})


@dataclass(frozen=True, slots=True)
class AppendResult:
    status: Status
    event_id: bytes | None = None
    reason: str | None = None  # for REJECTED: a stable code; for others: None
    detail: str = ""
    # Events stored by this call: the event itself and any pending ones it unblocked.
    accepted: tuple[Event, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in (Status.ACCEPTED, Status.DUPLICATE, Status.PENDING)

    @property
    def peer_fault(self) -> bool:
        """True when the sender sent something no honest node would."""
        return self.status is Status.REJECTED and self.reason not in TRANSIENT_REASONS


class Head(NamedTuple):
    seq: int
    id: bytes
    ts_ms: int


@dataclass(frozen=True)
class ForkProof:
    author: bytes
    seq: int
    wire_a: bytes
    wire_b: bytes


def _decode_one(wire: bytes, network: str) -> Event | AppendResult:
    """The self-contained checks of one record: an Event, or its rejection."""
    if type(wire) is not bytes:
        return AppendResult(Status.REJECTED, reason=Reason.MALFORMED, detail="not bytes")
    if len(wire) > MAX_WIRE:
        return AppendResult(Status.REJECTED, reason=Reason.OVERSIZED,
                            detail=f"{len(wire)} bytes, limit {MAX_WIRE}")
    try:
        return decode_wire(wire, network)
    except InvalidEvent as e:
        return AppendResult(Status.REJECTED, reason=e.reason, detail=str(e))


def check_records(wires: list[bytes], network: str) -> list[Event | AppendResult]:
    """The self-contained checks (size, codec, signature, schema) of each record, for
    `Ledger.append_checked`: no ledger state, so safe on another thread."""
    return [_decode_one(w, network) for w in wires]


PARALLEL_MIN = 128  # records per batch before a second thread shares the checks
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _decode_all(wires: list[bytes], network: str) -> list[Event | AppendResult]:
    """Check a batch's records; large batches on two threads. Signature verification
    (libsodium through cffi) runs without the GIL, so the second core does real work;
    everything order-dependent happens afterwards, in sequence."""
    global _pool
    if len(wires) < PARALLEL_MIN or (os.cpu_count() or 1) < 2:
        return [_decode_one(w, network) for w in wires]
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bidmesh-verify")
    half = len(wires) // 2
    rest = _pool.submit(lambda: [_decode_one(w, network) for w in wires[half:]])
    first = [_decode_one(w, network) for w in wires[:half]]
    return first + rest.result()


def _chain_error(ev: Event, head: Head | None) -> tuple[str, str] | None:
    have = head.seq if head else 0
    if ev.seq != have + 1:
        return Reason.BAD_CHAIN, f"seq {ev.seq} does not follow {have}"
    if head is not None:
        if ev.prev != head.id:
            return Reason.PREV_MISMATCH, f"prev does not match the stored event at seq {have}"
        if ev.ts_ms < head.ts_ms:
            return Reason.TS_REGRESS, "timestamp is earlier than the author's previous event"
    return None


def read_stream(data: bytes, max_records: int = 10_000_000) -> Iterator[bytes | InvalidEvent]:
    """Split an export file (concatenated wire records) into records.

    Yields each record's bytes, or an InvalidEvent where the stream cannot be read
    (after which reading stops: a broken msgpack stream has no reliable resync).
    Framing only: each record's content is checked by `Ledger.append`."""
    import msgpack

    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=len(data) + 1, max_bin_len=MAX_WIRE,
                                max_str_len=MAX_WIRE, max_array_len=1 << 16,
                                max_map_len=1 << 10, max_ext_len=MAX_WIRE)
    unpacker.feed(data)
    pos = 0
    for _ in range(max_records):
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData:
            if pos < len(data):
                yield InvalidEvent(f"truncated record at byte {pos}", Reason.TRUNCATED)
            return
        except (ValueError, msgpack.UnpackException) as e:
            yield InvalidEvent(f"unreadable record at byte {pos}: {e}", Reason.MALFORMED)
            return
        start, pos = pos, unpacker.tell()
        if type(obj) is not list:
            yield InvalidEvent(f"record at byte {start} is not [signed, sig]", Reason.MALFORMED)
            continue
        yield data[start:pos]
