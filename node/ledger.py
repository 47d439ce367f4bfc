"""The replicated ledger: an append-only SQLite (WAL) store of verified events.

`append` takes raw wire bytes and answers accepted / duplicate / pending / rejected /
fork. Checks here are self-contained (codec, signature, schema, chain), so every
honest node stores exactly the same events; rules that depend on other events are
applied by the derivations. Per-author chains must be contiguous: an event whose
predecessor is missing waits in an in-memory pending buffer, charged to the peer
that sent it (bounded per peer and in total, in events and bytes; entries expire)
and is accepted when the gap fills. Two valid events at one (author, seq) are a fork proof: stored,
and the author's events from that seq on are excluded from derived state.

Durability: WAL with synchronous=NORMAL. A committed append survives the process
being killed (the OS has the pages); only power loss can drop the last commits.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import sqlite3
import time
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple, cast

from .errors import InvalidEvent, Reason, UsageError
from .events import MAX_WIRE, Body, Event, decode_wire, peek_chain_position, sign_event
from .keys import Identity
from .recon import Item, ReconIndex

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


CACHE_KIB = 32 << 10  # SQLite page cache of the writer (part of the RSS budget)
WAL_CHECKPOINT_PAGES = 10_000  # ~40 MiB of WAL between automatic checkpoints

_Row = tuple[bytes, bytes, int, int, str, bytes | None, bytes, int]  # ..., wire, idk


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


@dataclass
class _Batch:
    """What one append_many call has staged; applied to memory only after commit."""

    rows: list[_Row] = field(default_factory=list)
    staged: dict[tuple[bytes, int], _Row] = field(default_factory=dict)
    overlay: dict[bytes, Head] = field(default_factory=dict)
    forks: list[ForkProof] = field(default_factory=list)
    popped: list[_Held] = field(default_factory=list)
    source: Source = None  # whom events that go pending are charged to
    blame: bool = False


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


Source = Hashable
"""Whom a pending event is charged to: the forwarding peer (None: local / unattributed)."""


@dataclass(slots=True, eq=False)
class _Held:
    """One pending event: its wire only (decoded again, unverified, when it is due), so
    memory is the record's size plus this header, whatever the body decodes into."""

    author: bytes
    seq: int
    id: bytes
    wire: bytes
    source: Source
    blame: bool  # the source published it itself: its expiry is the source's fault
    added: float

    @property
    def size(self) -> int:
        return len(self.wire) + HELD_OVERHEAD


HELD_OVERHEAD = 256  # bytes charged per pending event beyond its wire (header, dict slots)


@dataclass(frozen=True)
class PendingLimits:
    """Bounds of the pending buffer (`[limits] pending_*`)."""

    per_author: int = 1024
    total: int = 65_536
    peer_events: int = 2048
    peer_bytes: int = 4 << 20
    total_bytes: int = 32 << 20
    ttl_s: float = 60.0


@dataclass(frozen=True)
class Gap:
    """Missing seqs `first..last` of `author`, with who sent the events waiting on it."""

    author: bytes
    first: int
    last: int
    sources: tuple[Source, ...]
    added: float  # when the oldest event waiting on it arrived


class _Pending:
    """Events waiting for their predecessor, charged to the source that sent them:
    bounded per author, per source (events, bytes) and in total (events, bytes);
    entries expire `ttl_s` after they arrive.

    When the total is full, an event from a source holding less than the biggest
    holder evicts that holder's oldest entries: one source cannot keep everyone
    else's out-of-order events out. Several candidates may wait at one
    (author, seq): which of them chains is only known when the gap fills, and
    keeping them all lets a fork be detected in whichever order its halves arrive."""

    def __init__(self, limits: PendingLimits) -> None:
        self.limits = limits
        self.by_author: dict[bytes, dict[int, dict[bytes, _Held]]] = {}
        self.counts: dict[bytes, int] = {}
        self.size = 0
        self.bytes = 0
        self.by_source: dict[Source, OrderedDict[int, _Held]] = {}  # in arrival order
        self.source_bytes: Counter[Source] = Counter()
        self.evicted = 0

    def add(self, ev: Event, source: Source, blame: bool, now: float) -> str | None:
        """Hold `ev`; None if held (or already held), else why not: "pending_full"."""
        slot = self.by_author.get(ev.author)
        if slot is not None and ev.id in slot.get(ev.seq, {}):
            return None
        return self.restore(_Held(ev.author, ev.seq, ev.id, ev.wire, source, blame, now))

    def restore(self, h: _Held) -> str | None:
        lim = self.limits
        if self.counts.get(h.author, 0) >= lim.per_author:
            return Reason.PENDING_FULL
        mine = self.by_source.get(h.source)
        if (mine is not None and len(mine) >= lim.peer_events) or \
                self.source_bytes[h.source] + h.size > lim.peer_bytes:
            return Reason.PENDING_FULL
        while self.size >= lim.total or self.bytes + h.size > lim.total_bytes:
            if not self._evict_for(h.source, h.size):
                return Reason.PENDING_FULL
        slot = self.by_author.setdefault(h.author, {})
        slot.setdefault(h.seq, {})[h.id] = h
        self.counts[h.author] = self.counts.get(h.author, 0) + 1
        self.size += 1
        self.bytes += h.size
        self.by_source.setdefault(h.source, OrderedDict())[id(h)] = h
        self.source_bytes[h.source] += h.size
        return None

    def _evict_for(self, source: Source, size: int) -> bool:
        """Make room by dropping the oldest entry of the biggest holder, if that is
        not `source` and holds more than `source` would after adding."""
        if not self.source_bytes:
            return False
        big, held = max(self.source_bytes.items(), key=lambda kv: kv[1])
        if big == source or held <= self.source_bytes[source] + size:
            return False
        oldest = next(iter(self.by_source[big].values()))
        self._remove(oldest)
        self.evicted += 1
        return True

    def _remove(self, h: _Held) -> None:
        slot = self.by_author[h.author]
        cands = slot[h.seq]
        del cands[h.id]
        if not cands:
            del slot[h.seq]
        self._forget(h)
        if not slot:
            del self.by_author[h.author]

    def _forget(self, h: _Held) -> None:
        """Uncount `h`, already gone from `by_author[author][seq]`."""
        self.size -= 1
        self.bytes -= h.size
        self.counts[h.author] -= 1
        if not self.counts[h.author]:
            del self.counts[h.author]
        mine = self.by_source[h.source]
        del mine[id(h)]
        self.source_bytes[h.source] -= h.size
        if not mine:
            del self.by_source[h.source]
            del self.source_bytes[h.source]

    def pop(self, author: bytes, seq: int) -> list[_Held]:
        """Remove and return every candidate at (author, seq), in arrival order."""
        slot = self.by_author.get(author)
        if not slot or seq not in slot:
            return []
        held = list(slot.pop(seq).values())
        for h in held:
            self._forget(h)
        if not slot:
            del self.by_author[author]
        return held

    def drop_upto(self, author: bytes, seq: int) -> None:
        """Forget buffered events at or below a seq we now hold."""
        slot = self.by_author.get(author)
        if not slot:
            return
        for s in [s for s in slot if s <= seq]:
            for h in slot.pop(s).values():
                self._forget(h)
        if not slot:
            del self.by_author[author]

    def expire(self, now: float) -> list[_Held]:
        """Remove and return entries older than `ttl_s`."""
        cutoff = now - self.limits.ttl_s
        out: list[_Held] = []
        for mine in list(self.by_source.values()):
            while mine:
                h = next(iter(mine.values()))
                if h.added > cutoff:
                    break
                out.append(h)
                self._remove(h)  # may delete `mine` from by_source once empty
        return out


class Ledger:
    """One network's ledger in one SQLite file. Use from a single thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        network: str = "main",
        readonly: bool = False,
        pending_per_author: int = 1024,
        pending_total: int = 65_536,
        pending: PendingLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.network = network
        self.readonly = readonly
        self._prechecked: dict[bytes, Event | AppendResult] = {}  # see prechecked()
        if readonly:
            if not self.path.exists():
                raise UsageError(f"no ledger at {self.path}")
            uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            # Batches from many authors dirty one index page per author; a larger cache
            # and fewer, larger checkpoints roughly halve the cost per stored event.
            self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            self.db.execute(f"PRAGMA journal_size_limit={64 << 20}")
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(events)")}
            if cols and "idk" not in cols:
                raise UsageError(f"{self.path} was written by an older bidmesh (no id key "
                                 "column); export it with that version and import it here")
            self.db.executescript(SCHEMA)
        self.db.create_function("idk", 1, idk, deterministic=True)
        self.db.execute("PRAGMA busy_timeout=5000")
        self._check_network()
        self._pending = _Pending(pending or PendingLimits(per_author=pending_per_author,
                                                          total=pending_total))
        self._clock = clock
        # Stored events, kept by the writer once counted (COUNT(*) scans an index:
        # ~30 ms at 1M events, and status, DIGEST answers and metrics ask often).
        self._count: int | None = None
        self.counters: Counter[str] = Counter()  # outcome and rejection-reason counts
        self._digest: bytes | None = None
        self._recon: ReconIndex | None = None  # built on first use, then kept up to date
        self._load_heads()

    # ------------------------------------------------------------ setup

    def _check_network(self) -> None:
        row = self.db.execute("SELECT v FROM meta WHERE k='network'").fetchone()
        if row is None:
            if self.readonly:
                raise UsageError(f"{self.path} is not an initialised bidmesh ledger")
            self.db.execute("INSERT INTO meta VALUES('network', ?)", (self.network,))
        elif row[0] != self.network:
            raise UsageError(
                f"{self.path} holds network {row[0]!r}, not {self.network!r}; "
                f"pass --network {row[0]} or use another data dir"
            )

    def _load_heads(self) -> None:
        self._heads: dict[bytes, Head] = {}
        q = (
            "SELECT e.author, e.seq, e.id, e.ts_ms FROM events e "
            "JOIN (SELECT author, MAX(seq) AS s FROM events GROUP BY author) m "
            "ON e.author = m.author AND e.seq = m.s"
        )
        for author, seq, id_, ts in self.db.execute(q):
            self._heads[author] = Head(seq, id_, ts)
        self._forks: dict[bytes, int] = {}
        for author, seq in self.db.execute("SELECT author, MIN(seq) FROM forks GROUP BY author"):
            self._forks[author] = seq
        self._digest = None
        self._recon = None

    @staticmethod
    def stored_network(path: str | Path) -> str | None:
        """The network id a ledger file was created for; None if there is no ledger."""
        path = Path(path)
        if not path.exists():
            return None
        uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True)
            try:
                row = db.execute("SELECT v FROM meta WHERE k='network'").fetchone()
            finally:
                db.close()
        except sqlite3.Error as e:
            raise UsageError(f"{path} is not a bidmesh ledger ({e})") from e
        return str(row[0]) if row else None

    def refresh(self) -> None:
        """Re-read heads (read-only handles watching a live daemon's ledger)."""
        self._load_heads()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ append

    def append(self, wire: bytes) -> AppendResult:
        return self.append_many([wire])[0]

    def append_many(self, wires: Iterable[bytes], *, source: Source = None,
                    blame: bool = False) -> list[AppendResult]:
        """Check and store a batch in one transaction. Never raises on peer input.

        Events whose predecessor is missing are held, charged to `source` (the peer
        that sent them; None: local); `blame`: `source` published them itself, so
        if they expire unfilled, `expire_pending` reports it as the source's fault.
        A record byte for byte identical to a stored one is a duplicate without
        being decoded or verified again (re-gossip and sync overlap)."""
        batch = list(wires)
        decoded: list[Event | AppendResult | None] = [
            AppendResult(Status.DUPLICATE, hashlib.sha256(held).digest())
            if (held := self._held_signed(w)) is not None else None for w in batch]
        pre = self._prechecked
        # Peer input may be any object (a bytearray is unhashable): only bytes can be
        # pre-checked; everything else goes to the decoder, which rejects it.
        ready = [d is None and isinstance(w, bytes) and w in pre
                 for w, d in zip(batch, decoded, strict=True)]
        todo = [w for w, d, r in zip(batch, decoded, ready, strict=True)
                if d is None and not r]
        fresh = iter(_decode_all(todo, self.network) if todo else ())
        decoded = [d if d is not None else pre[w] if r else next(fresh)
                   for w, d, r in zip(batch, decoded, ready, strict=True)]
        return self._append(batch, cast(list[Event | AppendResult], decoded), source, blame)

    @contextlib.contextmanager
    def prechecked(self, wires: Sequence[bytes],
                   checked: Sequence[Event | AppendResult]) -> Iterator[None]:
        """Within the block, `append_many` takes these records' `check_records` results
        instead of checking them again: a caller that cannot hand the results over
        itself (a sans-I/O session storing a response) checks them on a worker thread
        first (node/gossip.py), so the loop does not."""
        if len(wires) != len(checked):
            raise UsageError("prechecked needs one checked record per wire")
        self._prechecked = dict(zip(wires, checked, strict=True))
        try:
            yield
        finally:
            self._prechecked = {}

    def holds(self, wire: bytes) -> bool:
        """Whether `wire` is, byte for byte, a record this ledger stores: a duplicate
        that needs no signature check. Costs a dictionary lookup unless the record's
        (author, seq) is at or below the author's stored head, then one indexed read."""
        return self._held_signed(wire) is not None

    def _held_signed(self, wire: bytes) -> bytes | None:
        """The envelope of `wire` if `wire` equals the record stored at its (author,
        seq), else None. The (author, seq) read from the raw bytes is only a hint of
        where to look: what decides is the byte comparison with a stored record,
        which was checked in full when it was appended."""
        hint = peek_chain_position(wire)
        if hint is None:
            return None
        author, seq, signed = hint
        head = self._heads.get(author)
        if head is None or seq > head.seq:
            return None
        row = self.db.execute("SELECT wire FROM events WHERE author=? AND seq=?",
                              (author, seq)).fetchone()
        return signed if row is not None and row[0] == wire else None

    def append_checked(self, wires: list[bytes], checked: list[Event | AppendResult], *,
                       source: Source = None, blame: bool = False) -> list[AppendResult]:
        """As `append_many`, for records already put through `check_records` (on a
        worker thread, say: node/ingest.py); `checked[i]` must be that of `wires[i]`."""
        if len(wires) != len(checked):
            raise UsageError("append_checked needs one checked record per wire")
        return self._append(list(wires), list(checked), source, blame)

    def append_signed(self, events: list[Event]) -> list[AppendResult]:
        """Store events this process just made with `sign_event` (our own): the
        chain checks run as for any record, the signature check is skipped (we
        made it; verifying costs as much as signing)."""
        return self._append([ev.wire for ev in events], list(events))

    def _append(self, batch: list[bytes], decoded_all: list[Event | AppendResult],
                source: Source = None, blame: bool = False) -> list[AppendResult]:
        if self.readonly:
            raise UsageError("this ledger handle is read-only")
        results: list[AppendResult] = []
        b = _Batch(source=source, blame=blame)
        for wire, decoded in zip(batch, decoded_all, strict=True):
            res = self._check_one(wire, decoded, b)
            self.counters[res.status.value] += 1
            if res.reason:
                self.counters["rejected:" + res.reason] += 1
            results.append(res)
        if b.rows or b.forks:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany(
                    "INSERT INTO events(id, idk, author, seq, ts_ms, kind, ref, wire) "
                    "VALUES(?1, ?8, ?2, ?3, ?4, ?5, ?6, ?7)",  # idk from Python: no callback
                    b.rows,
                )
                self.db.executemany(
                    "INSERT OR IGNORE INTO forks VALUES(?,?,?,?)",
                    [(p.author, p.seq, p.wire_a, p.wire_b) for p in b.forks],
                )
                self.db.execute("COMMIT")
            except sqlite3.Error:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                # Undo in-memory effects: buffered events popped by this batch go back.
                for h in b.popped:
                    self._pending.restore(h)
                raise
            old = None if self._recon is None else self._recon_items(
                set(b.overlay).union(p.author for p in b.forks))
            self._heads.update(b.overlay)
            for p in b.forks:
                if p.seq < self._forks.get(p.author, 1 << 62):
                    self._forks[p.author] = p.seq
            self._recon_update(old)
            for author, head in b.overlay.items():
                self._pending.drop_upto(author, head.seq)
            self._digest = None
            if self._count is not None:
                self._count += len(b.rows)
        return results

    def _head(self, author: bytes, b: _Batch) -> Head | None:
        return b.overlay.get(author) or self._heads.get(author)

    def _check_one(self, wire: bytes, decoded: Event | AppendResult, b: _Batch) -> AppendResult:
        if isinstance(decoded, AppendResult):
            return decoded
        ev = decoded
        head = self._head(ev.author, b)
        have = head.seq if head else 0
        if ev.seq <= have:
            stored = self._stored_at(ev.author, ev.seq, b)
            if stored is None or stored[0] == ev.id:
                # Same id: the same envelope (possibly with another valid signature).
                return AppendResult(Status.DUPLICATE, ev.id)
            # A different event at a seq we hold: a fork only if it chains like ours,
            # so that what is stored never depends on arrival order.
            err = _chain_error(ev, self._head_at(ev.author, ev.seq - 1, b))
            if err:
                return AppendResult(Status.REJECTED, ev.id, reason=err[0], detail=err[1])
            self._add_fork(ForkProof(ev.author, ev.seq, stored[1], wire), b)
            return AppendResult(Status.FORK, ev.id, detail=f"equivocation at seq {ev.seq}")
        if ev.seq > have + 1:
            why = self._pending.add(ev, b.source, b.blame, self._clock())
            if why is None:
                return AppendResult(Status.PENDING, ev.id,
                                    detail=f"waiting for seq {have + 1}..{ev.seq - 1}")
            return AppendResult(Status.REJECTED, ev.id, reason=why,
                                detail="pending buffer full (for you or in total); "
                                "fetch the gap first")
        err = _chain_error(ev, head)
        if err:
            return AppendResult(Status.REJECTED, ev.id, reason=err[0], detail=err[1])
        accepted = [ev]
        self._stage(ev, wire, b)
        # Drain events that were waiting for this one. Of several candidates at one seq
        # the first that chains is stored; others that chain are fork proofs.
        while True:
            top = accepted[-1]
            held = self._pending.pop(ev.author, top.seq + 1)
            if not held:
                break
            b.popped.extend(held)
            base = b.overlay[ev.author]
            nxt: Event | None = None
            for cand in (self._decode(h.wire) for h in held):
                if _chain_error(cand, base):
                    # Does not chain: discarded; a peer resends the right one in sync.
                    self.counters["pending_discarded"] += 1
                elif nxt is None:
                    nxt = cand
                    self._stage(cand, cand.wire, b)
                else:
                    self._add_fork(ForkProof(ev.author, cand.seq, nxt.wire, cand.wire), b)
            if nxt is None:
                break
            accepted.append(nxt)
        return AppendResult(Status.ACCEPTED, ev.id, accepted=tuple(accepted))

    def _stage(self, ev: Event, wire: bytes, b: _Batch) -> None:
        row = (ev.id, ev.author, ev.seq, ev.ts_ms, ev.kind, ev.ref, wire, idk(ev.id))
        b.rows.append(row)
        b.staged[(ev.author, ev.seq)] = row
        b.overlay[ev.author] = Head(ev.seq, ev.id, ev.ts_ms)

    def _stored_at(self, author: bytes, seq: int, b: _Batch) -> tuple[bytes, bytes] | None:
        """(id, wire) of the event held at (author, seq), staged or stored."""
        r = b.staged.get((author, seq))
        if r is not None:
            return r[0], r[6]
        row = self.db.execute(
            "SELECT id, wire FROM events WHERE author=? AND seq=?", (author, seq)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def _head_at(self, author: bytes, seq: int, b: _Batch) -> Head | None:
        """The held event at (author, seq) as a Head; None for seq 0."""
        if seq < 1:
            return None
        r = b.staged.get((author, seq))
        if r is not None:
            return Head(r[2], r[0], r[3])
        row = self.db.execute(
            "SELECT seq, id, ts_ms FROM events WHERE author=? AND seq=?", (author, seq)
        ).fetchone()
        return Head(*row) if row else None

    def _add_fork(self, proof: ForkProof, b: _Batch) -> None:
        if not self._has_fork(proof.author, proof.seq, b.forks):
            b.forks.append(proof)

    def _has_fork(self, author: bytes, seq: int, staged: list[ForkProof]) -> bool:
        if any(p.author == author and p.seq == seq for p in staged):
            return True
        return self.db.execute(
            "SELECT 1 FROM forks WHERE author=? AND seq=?", (author, seq)
        ).fetchone() is not None

    def publish(self, ident: Identity, body: Body, now_ms: int) -> Event:
        """Sign `body` as the next event of `ident`'s chain and store it.

        The timestamp never goes backwards along a chain (append would reject it)."""
        head = self._heads.get(ident.public)
        seq, prev = (head.seq + 1, head.id) if head else (1, None)
        ts = max(now_ms, head.ts_ms if head else 0)
        ev = sign_event(ident.seed, seq, prev, ts, body, self.network)
        res = self.append_signed([ev])[0]
        if res.status is not Status.ACCEPTED:
            raise UsageError(f"own event not accepted: {res.status} {res.reason} {res.detail}")
        return ev

    def add_fork_proof(self, wire_a: bytes, wire_b: bytes) -> bool:
        """Store a fork proof received from a peer; True if valid and new.

        Valid: both records verify, same author and seq, different ids, same `prev`
        (two successors of one event), and, when we hold the author's event at
        seq - 1, both chain onto it, exactly as a locally detected fork."""
        try:
            a = decode_wire(wire_a, self.network)
            b = decode_wire(wire_b, self.network)
        except InvalidEvent:
            self.counters["rejected:bad_fork_proof"] += 1
            return False
        ok = a.author == b.author and a.seq == b.seq and a.id != b.id and a.prev == b.prev
        if ok and a.seq > 1:
            before = self._head_at(a.author, a.seq - 1, _Batch())
            ok = before is None or not (_chain_error(a, before) or _chain_error(b, before))
        if not ok:
            self.counters["rejected:bad_fork_proof"] += 1
            return False
        if self._has_fork(a.author, a.seq, []):
            return False
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO forks VALUES(?,?,?,?)",
                            (a.author, a.seq, wire_a, wire_b))
        old = self._recon_items([a.author])
        if a.seq < self._forks.get(a.author, 1 << 62):
            self._forks[a.author] = a.seq
        self._recon_update(old)
        self._digest = None
        return True

    # ------------------------------------------------------------ queries

    def heads(self) -> dict[bytes, Head]:
        """Stored head per author (including past a fork)."""
        return dict(self._heads)

    def head(self, author: bytes) -> Head | None:
        return self._heads.get(author)

    def forked(self) -> dict[bytes, int]:
        """Author -> lowest seq with a fork proof; events from there on are excluded."""
        return dict(self._forks)

    def fork_proofs(self, author: bytes | None = None) -> list[ForkProof]:
        q, args = "SELECT author, seq, wire_a, wire_b FROM forks", tuple[bytes, ...]()
        if author is not None:
            q, args = q + " WHERE author=?", (author,)
        return [ForkProof(*r) for r in self.db.execute(q + " ORDER BY author, seq", args)]

    def sync_heads(self) -> dict[bytes, tuple[int, bytes | None]]:
        """What sync compares: per author the last seq that counts (forks truncate)."""
        out: dict[bytes, tuple[int, bytes | None]] = {}
        for author, h in self._heads.items():
            fseq = self._forks.get(author)
            if fseq is None or h.seq < fseq:
                # Not forked, or the fork proof came before our chain reached it
                # (FORKS is fetched before RANGE): what we hold is what counts.
                out[author] = (h.seq, h.id)
            else:
                out[author] = (fseq - 1, self._id_at(author, fseq - 1))
        return out

    def recon_item(self, author: bytes) -> Item | None:
        """The author's reconciliation item: its HEADS entry (sync_heads, and the
        fork seq when the effective head is just before it)."""
        h = self._heads.get(author)
        if h is None:
            return None
        fseq = self._forks.get(author)
        if fseq is None or h.seq < fseq - 1:
            return Item(h.seq, h.id, None)
        if h.seq == fseq - 1:
            return Item(h.seq, h.id, fseq)
        return Item(fseq - 1, self._id_at(author, fseq - 1), fseq)

    def recon_index(self) -> ReconIndex:
        """Fingerprints for set reconciliation (node/recon.py), built once from the
        heads (one hash per author) and then updated on every head or fork change."""
        if self._recon is None:
            items = ((a, self.recon_item(a)) for a in self._heads)
            self._recon = ReconIndex(self.recon_item,
                                     ((a, it) for a, it in items if it is not None))
        return self._recon

    def _recon_items(self, authors: Iterable[bytes]) -> dict[bytes, Item | None] | None:
        """Items before a change (None while no index is built: nothing to update)."""
        if self._recon is None:
            return None
        return {a: self.recon_item(a) for a in authors}

    def _recon_update(self, old: dict[bytes, Item | None] | None) -> None:
        if self._recon is None or old is None:
            return
        for author, item in old.items():
            self._recon.update(author, item, self.recon_item(author))

    def id_at(self, author: bytes, seq: int) -> bytes | None:
        """The id of the stored event at (author, seq), if any."""
        return self._id_at(author, seq)

    def _id_at(self, author: bytes, seq: int) -> bytes | None:
        if seq < 1:
            return None
        row = self.db.execute(
            "SELECT id FROM events WHERE author=? AND seq=?", (author, seq)
        ).fetchone()
        return row[0] if row else None

    def digest(self) -> bytes:
        """Hash over every author's effective head and every fork; equal iff nodes agree."""
        if self._digest is None:
            h = hashlib.sha256(b"bidmesh/digest/v1")
            sh = self.sync_heads()
            for author in sorted(sh):
                seq, id_ = sh[author]
                forked = author in self._forks
                h.update(author + seq.to_bytes(8, "big") + (id_ or bytes(32)) + bytes([forked]))
            self._digest = h.digest()
        return self._digest

    def gaps(self) -> list[tuple[bytes, int, int]]:
        """(author, first missing seq, last missing seq) for authors with pending events."""
        out = []
        for author, slot in self._pending.by_author.items():
            head = self._heads.get(author)
            have = head.seq if head else 0
            out.append((author, have + 1, min(slot) - 1))
        return out

    def pending_gaps(self) -> list[Gap]:
        """Like `gaps()`, with the sources charged for the waiting events and when the
        oldest of them arrived (for budgeted gap fetching)."""
        out = []
        for author, slot in self._pending.by_author.items():
            head = self._heads.get(author)
            have = head.seq if head else 0
            held = [h for cands in slot.values() for h in cands.values()]
            sources = tuple(dict.fromkeys(h.source for h in held))
            out.append(Gap(author, have + 1, min(slot) - 1, sources,
                           min(h.added for h in held)))
        return out

    def expire_pending(self) -> Counter[tuple[Source, bool]]:
        """Drop pending events older than the pending TTL; count them per
        (source, blame) so the caller can fault sources whose events never chained."""
        out: Counter[tuple[Source, bool]] = Counter()
        for h in self._pending.expire(self._clock()):
            out[(h.source, h.blame)] += 1
        self.counters["pending_expired"] += sum(out.values())
        return out

    def pending_status(self) -> dict[str, object]:
        p = self._pending
        return {"events": p.size, "bytes": p.bytes, "sources": len(p.by_source),
                "evicted": p.evicted, "expired": self.counters["pending_expired"],
                "limits": asdict(p.limits)}

    @property
    def pending_count(self) -> int:
        return self._pending.size

    def count(self) -> int:
        """Stored events. A read-only handle asks SQLite each time (another process
        writes); the writer counts once and then keeps the figure."""
        if self._count is None or self.readonly:
            n = int(self.db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
            if self.readonly:
                return n
            self._count = n
        return self._count

    def count_by_kind(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())

    def has(self, event_id: bytes) -> bool:
        row = self.db.execute("SELECT 1 FROM events WHERE idk=idk(?1) AND id=?1",
                              (event_id,)).fetchone()
        return row is not None

    def get_wire(self, event_id: bytes) -> bytes | None:
        row = self.db.execute("SELECT wire FROM events WHERE idk=idk(?1) AND id=?1",
                              (event_id,)).fetchone()
        return row[0] if row else None

    def get(self, event_id: bytes) -> Event | None:
        w = self.get_wire(event_id)
        return self._decode(w) if w is not None else None

    def ids_with_prefix(self, prefix: bytes, limit: int = 2) -> list[bytes]:
        """Stored event ids starting with `prefix` (to resolve abbreviated ids)."""
        if not prefix:
            return [r[0] for r in self.db.execute("SELECT id FROM events ORDER BY id LIMIT ?",
                                                  (limit,))]
        head = prefix[:8]
        lo, hi = idk(head.ljust(8, b"\0")), idk(head.ljust(8, b"\xff"))
        q = ("SELECT id FROM events WHERE idk BETWEEN ? AND ? AND substr(id, 1, ?) = ? "
             "ORDER BY id LIMIT ?")
        return [r[0] for r in self.db.execute(q, (lo, hi, len(prefix), prefix, limit))]

    def range(self, author: bytes, from_seq: int, limit: int = 256) -> list[bytes]:
        """Wire records of one author's chain from `from_seq`, at most `limit`."""
        rows = self.db.execute(
            "SELECT wire FROM events WHERE author=? AND seq>=? ORDER BY seq LIMIT ?",
            (author, from_seq, limit),
        )
        return [r[0] for r in rows]

    def events(
        self,
        *,
        kind: str | None = None,
        author: bytes | None = None,
        ref: bytes | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        after: int = 0,
        limit: int = 1000,
    ) -> list[tuple[int, Event]]:
        """Filtered events in arrival order as (cursor, event); pass the last cursor as
        `after` to page or to watch for new ones."""
        where, args = ["n > ?"], list[object]([after])
        for col, val in (("kind", kind), ("author", author), ("ref", ref)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since_ms is not None:
            where.append("ts_ms >= ?")
            args.append(since_ms)
        if until_ms is not None:
            where.append("ts_ms < ?")
            args.append(until_ms)
        q = f"SELECT n, wire FROM events WHERE {' AND '.join(where)} ORDER BY n LIMIT ?"
        return [(n, self._decode(w)) for n, w in self.db.execute(q, [*args, limit])]

    def wires_since(self, after: int, limit: int = 4096) -> list[tuple[int, bytes]]:
        """(cursor, wire) of the records stored after cursor `after`, in arrival order:
        for readers that decode them themselves (`events.decode_stored`)."""
        q = "SELECT n, wire FROM events WHERE n > ? ORDER BY n LIMIT ?"
        return [(n, w) for n, w in self.db.execute(q, (after, limit))]

    def iter_canonical(self, *, include_forked: bool = False) -> Iterator[Event]:
        """Every event that counts, in canonical order (ts_ms, author, seq): the order
        all derivations fold over, independent of arrival."""
        forks = self._forks
        cur = self.db.execute("SELECT author, seq, wire FROM events ORDER BY ts_ms, author, seq")
        for author, seq, wire in cur:
            if not include_forked and seq >= forks.get(author, 1 << 62):
                continue
            yield self._decode(wire)

    def iter_wires(self) -> Iterator[bytes]:
        """Every stored record in arrival order (export; predecessors come first)."""
        for (w,) in self.db.execute("SELECT wire FROM events ORDER BY n"):
            yield w

    def verify_all(self) -> list[tuple[bytes, str]]:
        """Re-check every signature and chain link; list (event id, problem)."""
        problems: list[tuple[bytes, str]] = []
        prev: dict[bytes, Head] = {}
        cur = self.db.execute(
            "SELECT id, author, seq, ts_ms, wire FROM events ORDER BY author, seq")
        for id_, author, seq, ts_ms, wire in cur:
            try:
                ev = decode_wire(wire, self.network)
            except InvalidEvent as e:
                problems.append((id_, f"{e.reason}: {e}"))
                # Check the successor against what this row claims, so one damaged
                # record is reported once, not again as a break in the chain.
                prev[author] = Head(seq, id_, ts_ms)
                continue
            if ev.id != id_ or ev.author != author or ev.seq != seq:
                problems.append((id_, "row does not match its record"))
            err = _chain_error(ev, prev.get(author))
            if err:
                problems.append((id_, f"{err[0]}: {err[1]}"))
            prev[author] = Head(seq, id_, ts_ms)
        return problems

    def _decode(self, wire: bytes) -> Event:
        # Stored records were verified on append; skip the signature on reads.
        return decode_wire(wire, self.network, verify=False)


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
