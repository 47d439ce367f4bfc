"""The ledger's reads of stored events by id, author range, arrival and canonical
order (a mixin of `ledger.Ledger`, split from it; no state of its own)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from .errors import InvalidEvent
from .events import Event, decode_wire
from .ledger_records import Head, _chain_error, idk


class StoredReads:
    """Reads of the stored events (`Ledger`'s connection, network and fork table)."""

    db: sqlite3.Connection
    network: str
    _forks: dict[bytes, int]

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
