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

import contextlib
import hashlib
import sqlite3
import time
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

from .errors import InvalidEvent, UsageError
from .events import Body, Event, decode_wire, peek_chain_position, sign_event
from .keys import Identity
from .ledger_pending import HELD_OVERHEAD, Gap, PendingLimits, Source, _Held, _Pending
from .ledger_reads import StoredReads
from .ledger_records import (
    PARALLEL_MIN,
    SCHEMA,
    TRANSIENT_REASONS,
    AppendResult,
    ForkProof,
    Head,
    Status,
    _chain_error,
    _decode_all,
    check_records,
    idk,
    read_stream,
)
from .recon import Item, ReconIndex

# Split out of this module (issue 17) and re-exported: the rest of the node imports them here.
__all__ = [
    "CACHE_KIB", "HELD_OVERHEAD", "PARALLEL_MIN", "SCHEMA", "TRANSIENT_REASONS",
    "WAL_CHECKPOINT_PAGES", "AppendResult", "ForkProof", "Gap", "Head", "Ledger",
    "PendingLimits", "Source", "Status", "check_records", "idk", "read_stream",
]


CACHE_KIB = 8 << 10  # the writer's page cache: in the RSS once full (docs/decisions.md)
WAL_CHECKPOINT_PAGES = 10_000  # ~40 MiB of WAL between automatic checkpoints
TOUCHED_MAX = 1 << 17  # authors awaiting a gap summary before the set is pruned

_Row = tuple[bytes, bytes, int, int, str, bytes | None, bytes, int]  # ..., wire, idk


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
    drained: int = 0  # events stored from the pending buffer
    ready: list[bytes] = field(default_factory=list)  # authors whose drain stopped at the limit


class Ledger(StoredReads):
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
        cache_kib: int | None = None,  # page cache (default CACHE_KIB; node.ledger_cache_mib)
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
            # Batches from many authors dirty one index page per author; fewer, larger
            # checkpoints roughly halve the cost per stored event.
            self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB if cache_kib is None else cache_kib}")
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
        self._gap_of: dict[bytes, Gap] = {}  # pending_gaps(), per author, as last summarized
        self.drain_limit: int | None = None
        """Events one append stores from the pending buffer (the chains its events
        complete); None: all of them. A node on an event loop sets it (node/gossip.py):
        a filled gap can release a 1,024-event chain, ~50-100 ms of work in one step.
        Where it stops, the author is *ready* and `drain_ready` stores the rest."""
        self.on_ready: Callable[[], None] | None = None
        """Called after a commit that left authors ready (to wake whoever drains)."""
        self._ready: OrderedDict[bytes, None] = OrderedDict()
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
        self._commit(b)
        return results

    def _commit(self, b: _Batch) -> None:
        """Store what `b` staged in one transaction, then apply it to memory."""
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
            touched = self._pending.touched
            for author in b.overlay:
                if author in self._gap_of:
                    touched[author] = None  # its gap moved on
            if len(touched) > TOUCHED_MAX:  # nobody asks for gaps: keep only live authors
                for author in [a for a in touched
                               if a not in self._gap_of and a not in self._pending.by_author]:
                    del touched[author]
            self._digest = None
            if self._count is not None:
                self._count += len(b.rows)
        if b.ready:
            for author in b.ready:
                self._ready[author] = None
            if self.on_ready is not None:
                self.on_ready()

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
        if ev.seq in self._pending.by_author.get(ev.author, ()):
            # Candidates for this very seq wait in the buffer (a drain stopped at the
            # limit just before them): one that chains too is a fork proof.
            held = self._pending.pop(ev.author, ev.seq)
            b.popped.extend(held)
            for cand in (self._decode(h.wire) for h in held):
                if cand.id != ev.id and not _chain_error(cand, head):
                    self._add_fork(ForkProof(ev.author, ev.seq, wire, cand.wire), b)
        self._stage(ev, wire, b)
        self._drain(ev.author, b, accepted)
        return AppendResult(Status.ACCEPTED, ev.id, accepted=tuple(accepted))

    def _drain(self, author: bytes, b: _Batch, accepted: list[Event],
               sources: list[Source] | None = None) -> None:
        """Stage the events that were waiting for the author's head, in chain order,
        up to `drain_limit` per batch (then the author is ready: `drain_ready`). Of
        several candidates at one seq the first that chains is stored; others that
        chain are fork proofs."""
        while True:
            base = self._head(author, b)
            if base is None:
                return
            if self.drain_limit is not None and b.drained >= self.drain_limit:
                if base.seq + 1 in self._pending.by_author.get(author, ()):
                    b.ready.append(author)
                return
            held = self._pending.pop(author, base.seq + 1)
            if not held:
                return
            b.popped.extend(held)
            nxt: Event | None = None
            for h in held:
                cand = self._decode(h.wire)
                if _chain_error(cand, base):
                    # Does not chain: discarded; a peer resends the right one in sync.
                    self.counters["pending_discarded"] += 1
                elif nxt is None:
                    nxt = cand
                    self._stage(cand, cand.wire, b)
                    b.drained += 1
                    if sources is not None:
                        sources.append(h.source)
                else:
                    self._add_fork(ForkProof(author, cand.seq, nxt.wire, cand.wire), b)
            if nxt is None:
                return
            accepted.append(nxt)

    @property
    def ready_count(self) -> int:
        """Authors whose next events wait in the buffer only for `drain_ready`."""
        return len(self._ready)

    def drain_ready(self, limit: int) -> list[tuple[Event, Source]]:
        """Store up to about `limit` events that wait only for an earlier drain's limit
        (in one transaction), with the source each was charged to; ready authors
        left over stay ready. Costs what it stores: call until `ready_count` is 0."""
        if self.readonly:
            raise UsageError("this ledger handle is read-only")
        b = _Batch()
        events: list[Event] = []
        sources: list[Source] = []
        taken: list[bytes] = []
        saved, self.drain_limit = self.drain_limit, max(1, limit)
        try:
            while self._ready and b.drained < self.drain_limit:
                author, _ = self._ready.popitem(last=False)
                taken.append(author)
                self._drain(author, b, events, sources)
            try:
                self._commit(b)
            except sqlite3.Error:
                for author in reversed(taken):
                    self._ready[author] = None
                    self._ready.move_to_end(author, last=False)
                raise
        finally:
            self.drain_limit = saved
        return list(zip(events, sources, strict=True))

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
        return [(g.author, g.first, g.last) for g in self.pending_gaps()]

    def pending_gaps(self) -> list[Gap]:
        """Like `gaps()`, with the sources charged for the waiting events (first come
        first) and when the first of them arrived (for budgeted gap fetching). Only
        the authors whose pending events or head changed since the last call are
        summarized again: the gap loop asks every round, and under a gap storm the
        buffer holds tens of thousands of authors that do not change."""
        self.summarize_gaps(None)
        return list(self._gap_of.values())

    def summarize_gaps(self, limit: int | None) -> bool:
        """Bring up to `limit` (None: all) changed authors' gaps up to date for
        `pending_gaps`; True if changed ones remain (a caller on the event loop
        summarizes in slices and yields between them)."""
        p = self._pending
        n = len(p.touched) if limit is None else min(limit, len(p.touched))
        for _ in range(n):
            author, _ = p.touched.popitem(last=False)
            slot = p.by_author.get(author)
            if not slot:
                self._gap_of.pop(author, None)
                continue
            head = self._heads.get(author)
            have = head.seq if head else 0
            first_held = min(slot)
            if first_held <= have + 1:  # ready (drain_ready stores it): nothing missing
                self._gap_of.pop(author, None)
                continue
            self._gap_of[author] = Gap(author, have + 1, first_held - 1,
                                       tuple(p.author_sources[author]), p.since[author])
        return bool(p.touched)

    @property
    def gap_count(self) -> int:
        """Authors with pending events (what `len(gaps())` says, without summarizing)."""
        return len(self._pending.by_author)

    def expire_pending(self, limit: int | None = None) -> Counter[tuple[Source, bool]]:
        """Drop pending events older than the pending TTL (at most `limit`: a caller
        on the event loop sweeps in slices until fewer come back); count them per
        (source, blame) so the caller can fault sources whose events never chained."""
        out: Counter[tuple[Source, bool]] = Counter()
        for h in self._pending.expire(self._clock(), limit):
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
