"""The ledger's append path (a mixin of `ledger.Ledger`, split from it as
`ledger_reads.StoredReads` was): records checked and staged a batch at a time, chain
and fork checks, the pending buffer's drain, one transaction per batch, our own
events (`publish`) and peers' fork proofs. See `ledger`'s docstring."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from .errors import InvalidEvent, UsageError
from .events import Body, Event, decode_wire, peek_chain_position, sign_event
from .keys import Identity
from .ledger_pending import Gap, Source, _Held, _Pending
from .ledger_records import (
    AppendResult,
    ForkProof,
    Head,
    Status,
    _chain_error,
    _decode_all,
    idk,
)
from .recon import Item, ReconIndex

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


class LedgerAppend:
    """Appends to the store (`Ledger`'s state, declared here for the type checker)."""

    db: sqlite3.Connection
    network: str
    readonly: bool
    counters: Counter[str]
    drain_limit: int | None
    on_ready: Callable[[], None] | None
    _prechecked: dict[bytes, Event | AppendResult]
    _pending: _Pending
    _clock: Callable[[], float]
    _count: int | None
    _digest: bytes | None
    _recon: ReconIndex | None
    _gap_of: dict[bytes, Gap]
    _ready: OrderedDict[bytes, None]
    _heads: dict[bytes, Head]
    _forks: dict[bytes, int]
    _decode: Callable[[bytes], Event]
    _recon_items: Callable[[Iterable[bytes]], dict[bytes, Item | None] | None]
    _recon_update: Callable[[dict[bytes, Item | None] | None], None]

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
