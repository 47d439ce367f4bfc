"""The market's cold tier: closed partitions' fold bookkeeping in a private SQLite file.

`auction.fold.IncrementalMarket` moves a partition it will likely not touch again (an
auction long ended, its events evicted) out of memory into a `ColdStore` and takes it
back when an event or a changed output reaches it. This is that store: one table of
pickled partition states, two indexed tables of the reads they recorded (who must be
re-derived when a rating or settlement changes), and the cold parts of the engine's
other indexes (`ColdIdx`: deadlines, routing's movers, settlements, leases of a
party, ratings, and the merged market's dicts' keys: `keys`, by key for lookups and
by canonical key for the dicts' ordered reads), in a temporary file of the process
(derived data: a restart rebuilds it, or restores it from the market snapshot, which
carries the file itself).

**Reclaimed**: a partition taken back leaves every table, and the file is created
with incremental auto-vacuum: after a commit, when more than a quarter of its pages
(and at least RECLAIM_PAGES) are free, they are given back to the file system. The
file therefore follows what is cold now, not everything that ever was.

Writes go into one open transaction (committed every WRITE_BATCH puts; the
connection reads its own writes). **Hold** (`hold()` / `release()`): while a forked
child copies the store into a snapshot through its own connection, the parent
commits first and then must not change the file: puts and takes made meanwhile stay
in memory (a few seconds' worth) and are applied on release.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import pickle
import sqlite3
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .auction.foldstate import NO_IDX, CKey, ColdIdx, RepRead, SetRead
from .errors import UsageError

CACHE_KIB = 4096  # page cache of the store: part of the RSS budget
WRITE_BATCH = 1024  # partitions written (or taken) per transaction
RECLAIM_PAGES = 256  # free pages worth an incremental vacuum (with > 1/4 free)

_SCHEMA = """
CREATE TABLE parts(pk BLOB PRIMARY KEY, top INTEGER NOT NULL, state BLOB NOT NULL,
    vals BLOB NOT NULL);
CREATE INDEX parts_top ON parts(top);
CREATE TABLE rep_reads(key BLOB NOT NULL, role TEXT NOT NULL, as_of INTEGER NOT NULL,
    at_ts INTEGER NOT NULL, at_author BLOB NOT NULL, at_seq INTEGER NOT NULL, pk BLOB NOT NULL);
CREATE INDEX rep_reads_key ON rep_reads(key, role, as_of);
CREATE INDEX rep_reads_pk ON rep_reads(pk);
CREATE TABLE set_reads(key BLOB NOT NULL, at_ts INTEGER NOT NULL, at_author BLOB NOT NULL,
    at_seq INTEGER NOT NULL, ended_by INTEGER NOT NULL, pk BLOB NOT NULL);
CREATE INDEX set_reads_key ON set_reads(key, at_ts, at_author, at_seq);
CREATE INDEX set_reads_pk ON set_reads(pk);
CREATE TABLE idx(pk BLOB PRIMARY KEY, idx BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE deadlines(dl INTEGER NOT NULL, pk BLOB NOT NULL, PRIMARY KEY(dl, pk))
    WITHOUT ROWID;
CREATE TABLE movers(id BLOB NOT NULL, pk BLOB NOT NULL, kind TEXT NOT NULL, ref BLOB,
    PRIMARY KEY(id, pk)) WITHOUT ROWID;
CREATE TABLE settles(party BLOB NOT NULL, at_ts INTEGER NOT NULL, at_author BLOB NOT NULL,
    at_seq INTEGER NOT NULL, pk BLOB NOT NULL, end_ms INTEGER NOT NULL, lease BLOB NOT NULL,
    PRIMARY KEY(party, at_ts, at_author, at_seq, pk)) WITHOUT ROWID;
CREATE TABLE leases(party BLOB NOT NULL, lease BLOB NOT NULL, pk BLOB NOT NULL,
    sk_ts INTEGER NOT NULL, sk_author BLOB NOT NULL, sk_seq INTEGER NOT NULL,
    PRIMARY KEY(party, lease, pk)) WITHOUT ROWID;
CREATE TABLE ratings(key BLOB NOT NULL, role TEXT NOT NULL, pk BLOB NOT NULL,
    i INTEGER NOT NULL, ts INTEGER NOT NULL, attrs INTEGER NOT NULL,
    PRIMARY KEY(key, role, pk, i)) WITHOUT ROWID;
CREATE TABLE keys(d INTEGER NOT NULL, key BLOB NOT NULL, ts INTEGER NOT NULL,
    author BLOB NOT NULL, seq INTEGER NOT NULL, pk BLOB NOT NULL, PRIMARY KEY(d, key))
    WITHOUT ROWID;
CREATE INDEX keys_order ON keys(d, ts, author, seq, key, pk);
"""
# The index tables are keyed by what they are read by, one B-tree each (`keys`: two,
# by key and in the dicts' order): a partition's rows are deleted by those keys, which
# its `idx` row (the pickled ColdIdx) gives.
# One partition as the store keeps it: (key, top, pickled state, pickled merged values,
# rep reads, set reads, the cold parts of the engine's indexes).
Row = tuple[bytes, int, bytes, bytes, tuple[RepRead, ...], tuple[SetRead, ...], ColdIdx]


def _unlink(path: str, owner: int) -> None:
    if os.getpid() != owner:  # a forked child exiting: the file is its parent's
        return
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.unlink(path + suffix)


_swept: set[Path] = set()


def _sweep(directory: Path) -> None:
    """Delete the files of stores whose process is gone (killed: no finalizer ran)."""
    for f in directory.glob("bidmesh-cold-*.db"):
        try:
            pid = int(f.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            _unlink(str(f), os.getpid())
        except (ValueError, IndexError, OSError):
            continue  # not ours, or another user's process


def open_beside(ledger_path: Path, image: BinaryIO | None = None) -> SqliteCold:
    """A store in the ledger's directory (the node's data dir, on disk), else in the
    temp dir. Not the temp dir first: it is often a tmpfs, where a large node's cold
    partitions would sit in RAM again, only no longer counted in its RSS. `image`: see
    `SqliteCold` (a stream cannot be read twice: no fallback then)."""
    d = ledger_path.parent
    if str(ledger_path) != ":memory:" and d.is_dir():
        if image is not None:
            return SqliteCold(d, image)
        try:
            return SqliteCold(d)
        except (OSError, sqlite3.Error):
            pass  # a read-only directory (another user's data dir read by the CLI)
    return SqliteCold(None, image)


class SqliteCold:
    """A `ColdStore` in a temporary SQLite file, deleted with the object."""

    def __init__(self, directory: Path | None = None, image: BinaryIO | None = None) -> None:
        """A new, empty store; or, with `image`, one whose file is the copy
        `copy_file` wrote to that stream (read from it)."""
        d = Path(directory or tempfile.gettempdir())
        if d not in _swept:
            _swept.add(d)
            _sweep(d)
        fd, self.path = tempfile.mkstemp(prefix=f"bidmesh-cold-{os.getpid()}-", suffix=".db",
                                         dir=d)
        self._fin = weakref.finalize(self, _unlink, self.path, os.getpid())
        with open(fd, "wb") as out:
            if image is not None:
                _copy(image, out, int.from_bytes(_read(image, 8), "big"))
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self.db.execute("PRAGMA synchronous=OFF")  # derived, rebuilt after a crash
        self.db.execute("PRAGMA journal_mode=OFF")
        if image is None:
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table
            self.db.executescript(_SCHEMA)
        self._held = False
        self._puts: dict[bytes, Row] = {}  # put while held: not in the file yet
        # Put, to be written at the next read or commit: a cooling pass puts many
        # partitions and reads none, so they are written in one executemany per table.
        self._pending: list[Row] = []
        self._writes = 0  # puts in the open transaction
        self._taken: set[bytes] = set()  # taken while held: still in the file
        self.puts = self.takes = self.reads = self.vacuums = 0

    def close(self) -> None:
        self.db.close()
        self._fin()

    # ------------------------------------------------------------ ColdStore

    def put(self, pk: bytes, top: int, state: bytes, vals: bytes,
            reads_rep: tuple[RepRead, ...], reads_set: tuple[SetRead, ...],
            idx: ColdIdx = NO_IDX) -> None:
        self.puts += 1
        row: Row = (pk, top, state, vals, reads_rep, reads_set, idx)
        if self._held:
            self._puts[pk] = row
            return
        self._pending.append(row)
        self._wrote()

    def take(self, pk: bytes) -> bytes | None:
        self._flush()
        got = self._puts.pop(pk, None)
        if got is not None:
            self.takes += 1
            return got[2]
        if pk in self._taken:
            return None
        r = self.db.execute("SELECT state FROM parts WHERE pk = ?", (pk,)).fetchone()
        if r is None:
            return None
        self.takes += 1
        if self._held:
            self._taken.add(pk)
        else:
            self._delete([pk])
            self._wrote()
        return bytes(r[0])

    def values(self, pk: bytes) -> bytes | None:
        self._flush()
        got = self._puts.get(pk)
        if got is not None:
            return got[3]
        if pk in self._taken:
            return None
        self.reads += 1
        r = self.db.execute("SELECT vals FROM parts WHERE pk = ?", (pk,)).fetchone()
        return None if r is None else bytes(r[0])

    def commit(self) -> None:
        """End the open write transaction (this connection reads its own writes before
        that: the commit is for another connection, a forked child's)."""
        self._flush()
        if self.db.in_transaction:
            self.db.execute("COMMIT")
        self._writes = 0
        if not self._held:
            self._reclaim()

    def _reclaim(self) -> None:
        db = self.db
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        if free >= RECLAIM_PAGES and free * 4 > db.execute("PRAGMA page_count").fetchone()[0]:
            # It frees a page per step; execute() steps a statement without result
            # columns once (one page), executescript() to its end.
            db.executescript("PRAGMA incremental_vacuum;")
            self.vacuums += 1

    def pages(self) -> tuple[int, int]:
        """(pages in the file, free ones)."""
        self._flush()
        return (self.db.execute("PRAGMA page_count").fetchone()[0],
                self.db.execute("PRAGMA freelist_count").fetchone()[0])

    def rep_readers(self, key: bytes, role: str, as_of: int) -> list[tuple[CKey, bytes]]:
        """Cold partitions that read `key`'s reputation as `role` as of `as_of` or later."""
        self._flush()
        out = [((t, a, s), pk) for t, a, s, pk in self.db.execute(
            "SELECT at_ts, at_author, at_seq, pk FROM rep_reads "
            "WHERE key = ? AND role = ? AND as_of >= ?", (key, role, as_of))
            if pk not in self._taken]
        out += [(r[3], pk) for pk, row in self._puts.items() for r in row[4]
                if r[0] == key and r[1] == role and r[2] >= as_of]
        return out

    def set_readers(self, key: bytes, after: CKey, ended_by: int) -> list[tuple[CKey, bytes]]:
        """Cold partitions that counted `key`'s settled leases at a key after `after`,
        of leases ended by a time at or after `ended_by`."""
        self._flush()
        out = [((t, a, s), pk) for t, a, s, pk in self.db.execute(
            "SELECT at_ts, at_author, at_seq, pk FROM set_reads "
            "WHERE key = ? AND (at_ts, at_author, at_seq) > (?, ?, ?) AND ended_by >= ?",
            (key, *after, ended_by)) if pk not in self._taken]
        out += [(r[1], pk) for pk, row in self._puts.items() for r in row[5]
                if r[0] == key and r[1] > after and r[2] >= ended_by]
        return out

    def max_top(self) -> int:
        self._flush()
        got = [row[1] for row in self._puts.values()]
        if self._taken:  # rare (a fork while a snapshot is written): a scan
            got += [t for pk, t in self.db.execute("SELECT pk, top FROM parts")
                    if pk not in self._taken]
        else:
            r = self.db.execute("SELECT MAX(top) FROM parts").fetchone()
            got.append(int(r[0] or 0))
        return max(got, default=0)

    # ------------------------------------------------------------ indexes (ColdIdx)
    # Each reads the table, less the partitions taken while held, plus those put
    # while held (a few seconds' worth, in memory).

    def _held_idx(self) -> list[ColdIdx]:
        return [row[6] for row in self._puts.values()]

    def mover(self, event_id: bytes) -> tuple[str, bytes | None] | None:
        self._flush()
        for ix in self._held_idx():
            for i, kind, ref in ix.movers:
                if i == event_id:
                    return kind, ref
        r = self.db.execute("SELECT kind, ref, pk FROM movers WHERE id = ?",
                            (event_id,)).fetchone()
        return None if r is None or r[2] in self._taken else (r[0], r[1])

    def settled(self, party: bytes, before: CKey | None, ended_by: int,
                limit: int | None = None) -> int:
        self._flush()
        q = "SELECT pk FROM settles WHERE party = ? AND end_ms <= ?"
        args: list[object] = [party, ended_by]
        if before is not None:
            q += " AND (at_ts, at_author, at_seq) < (?, ?, ?)"
            args += before
        if limit is not None and not self._taken:
            q += " LIMIT ?"
            args.append(limit)
        n = sum(1 for (pk,) in self.db.execute(q, args) if pk not in self._taken)
        n += sum(1 for ix in self._held_idx() for k, at, end, _ in ix.settles
                 if k == party and end <= ended_by and (before is None or at < before))
        return n if limit is None else min(n, limit)

    def leases(self, party: bytes) -> list[tuple[CKey, bytes]]:
        self._flush()
        out = [((t, a, s), lease) for t, a, s, lease, pk in self.db.execute(
            "SELECT sk_ts, sk_author, sk_seq, lease, pk FROM leases WHERE party = ?",
            (party,)) if pk not in self._taken]
        out += [(sk, lease) for ix in self._held_idx() for k, sk, lease in ix.leases
                if k == party]
        return out

    def open_from(self, now_ms: int) -> list[bytes]:
        self._flush()
        out = [pk for (pk,) in self.db.execute("SELECT pk FROM deadlines WHERE dl >= ?",
                                               (now_ms,)) if pk not in self._taken]
        out += [pk for pk, row in self._puts.items()
                if row[6].deadline is not None and row[6].deadline >= now_ms]
        return out

    def ratings(self, key: bytes, role: str) -> list[tuple[int, int]]:
        self._flush()
        out = [(ts, a) for ts, a, pk in self.db.execute(
            "SELECT ts, attrs, pk FROM ratings WHERE key = ? AND role = ?", (key, role))
            if pk not in self._taken]
        out += [(ts, a) for ix in self._held_idx() for k, r, ts, a in ix.ratings
                if k == key and r == role]
        return out

    def key(self, d: int, key: bytes) -> tuple[CKey, bytes] | None:
        """(canonical key, partition) of `key` in merged dict number `d`, if cold."""
        self._flush()
        for pk, row in self._puts.items():
            for dd, k, sk in row[6].keys:
                if k == key and dd == d:
                    return sk, pk
        r = self.db.execute("SELECT ts, author, seq, pk FROM keys WHERE d = ? AND key = ?",
                            (d, key)).fetchone()
        if r is None or r[3] in self._taken:
            return None
        return (r[0], r[1], r[2]), r[3]

    def ordered(self, d: int) -> list[tuple[CKey, bytes, bytes]]:
        """(canonical key, key, partition) of dict `d`'s cold keys, in that order."""
        self._flush()
        taken = self._taken
        got = [((t, a, s), k, pk) for t, a, s, k, pk in self.db.execute(
            "SELECT ts, author, seq, key, pk FROM keys WHERE d = ? "
            "ORDER BY ts, author, seq, key", (d,)) if pk not in taken]
        if self._puts:
            held = sorted((sk, k, pk) for pk, row in self._puts.items()
                          for dd, k, sk in row[6].keys if dd == d)
            got = list(heapq.merge(got, held))
        return got

    def rating_keys(self) -> set[tuple[bytes, str]]:
        self._flush()
        got = {(k, r) for k, r, pk in self.db.execute("SELECT key, role, pk FROM ratings")
               if pk not in self._taken}
        return got | {(k, r) for ix in self._held_idx() for k, r, _, _ in ix.ratings}

    def max_rating_ts(self) -> int:
        self._flush()
        got = [ts for ix in self._held_idx() for _, _, ts, _ in ix.ratings]
        if self._taken:
            got += [ts for ts, pk in self.db.execute("SELECT ts, pk FROM ratings")
                    if pk not in self._taken]
        else:
            got.append(int(self.db.execute("SELECT MAX(ts) FROM ratings").fetchone()[0] or 0))
        return max(got, default=0)

    # ------------------------------------------------------------ snapshots

    def hold(self) -> None:
        """Leave the file as it is until `release()` (a forked child reads it)."""
        self.commit()
        self._held = True

    def release(self) -> None:
        self._held = False
        if self._taken:
            self._delete(list(self._taken))
            self._taken = set()
        if self._puts:
            self._write(list(self._puts.values()))
            self._puts = {}
        self.commit()

    def rows(self, path: str | None = None) -> Iterator[Row]:
        """Every partition in the store (reading the file at `path` if given: a forked
        child opens its own connection, it must not use the parent's)."""
        if path is None:  # (a child has nothing pending: hold() wrote it)
            self._flush()
        db = self.db if path is None else sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            reps: dict[bytes, list[RepRead]] = {}
            for k, role, as_of, t, a, s, pk in db.execute("SELECT * FROM rep_reads"):
                reps.setdefault(pk, []).append((k, role, as_of, (t, a, s)))
            sets: dict[bytes, list[SetRead]] = {}
            for k, t, a, s, e, pk in db.execute("SELECT * FROM set_reads"):
                sets.setdefault(pk, []).append((k, (t, a, s), e))
            idxs = dict(db.execute("SELECT pk, idx FROM idx"))
            for pk, top, state, vals in db.execute("SELECT pk, top, state, vals FROM parts"):
                if pk not in self._taken:
                    yield (pk, top, bytes(state), bytes(vals), tuple(reps.get(pk, ())),
                           tuple(sets.get(pk, ())), _unidx(idxs[pk]))
            yield from self._puts.values()
        finally:
            if db is not self.db:
                db.close()

    def copy_file(self, out: BinaryIO, path: str | None = None) -> int:
        """Write the store's file to `out`, its size first (8 bytes): for a snapshot,
        restored by `SqliteCold(image=...)` with no B-tree work at either end, unlike
        `rows`/`load`. `path`: as in `rows` (a forked child reads the held file).
        Returns the size."""
        if path is None:
            if self._held:  # its puts and takes since the hold are not in the file
                raise UsageError("the cold store is held for a snapshot's child: copy its "
                                 "file from that child, or after release()")
            self.commit()  # this process's own store: written out first
        src = path or self.path
        size = os.path.getsize(src)
        out.write(size.to_bytes(8, "big"))
        with open(src, "rb") as f:
            _copy(f, out, size)
        return size

    def load(self, rows: list[Row]) -> None:
        """Add partitions (from a snapshot)."""
        self._write(rows)
        self.commit()

    # ------------------------------------------------------------ internals

    def _write(self, rows: list[Row]) -> None:
        db = self.db
        if not db.in_transaction:
            db.execute("BEGIN")
        db.executemany("INSERT INTO parts VALUES (?, ?, ?, ?)", [r[:4] for r in rows])
        db.executemany("INSERT INTO rep_reads VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [(k, role, as_of, *at, r[0]) for r in rows
                        for k, role, as_of, at in r[4]])
        db.executemany("INSERT INTO set_reads VALUES (?, ?, ?, ?, ?, ?)",
                       [(k, *at, e, r[0]) for r in rows for k, at, e in r[5]])
        db.executemany("INSERT INTO idx VALUES (?, ?)",
                       [(r[0], pickle.dumps(tuple(r[6]), pickle.HIGHEST_PROTOCOL))
                        for r in rows])
        for table, n, rws in _idx_rows(rows):
            db.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * n)})", rws)

    def _flush(self) -> None:
        if self._pending:
            rows, self._pending = self._pending, []
            self._write(rows)

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes >= WRITE_BATCH:
            self.commit()

    def _delete(self, pks: list[bytes]) -> None:
        db = self.db
        if not db.in_transaction:
            db.execute("BEGIN")
        got = [(pk, _unidx(blob)) for pk in pks for (blob,) in db.execute(
            "SELECT idx FROM idx WHERE pk = ?", (pk,))]
        for table, _, rws in _idx_rows([(pk, ix) for pk, ix in got]):
            db.executemany(f"DELETE FROM {table} WHERE {_KEYS[table]}",
                           [r[:_KEYS[table].count("?")] for r in rws])
        for t in ("parts", "rep_reads", "set_reads", "idx"):
            db.executemany(f"DELETE FROM {t} WHERE pk = ?", [(pk,) for pk in pks])


# The key columns of each index table, first in its rows as `_idx_rows` makes them.
_KEYS = {"deadlines": "dl = ? AND pk = ?", "movers": "id = ? AND pk = ?",
         "settles": "party = ? AND at_ts = ? AND at_author = ? AND at_seq = ? AND pk = ?",
         "leases": "party = ? AND lease = ? AND pk = ?",
         "ratings": "key = ? AND role = ? AND pk = ? AND i = ?",
         "keys": "d = ? AND key = ?"}


def _idx_rows(rows: list[Any]) -> list[tuple[str, int, list[tuple[Any, ...]]]]:
    """(table, columns, rows) of the index tables for partitions given as sequences
    whose first item is the key and last the `ColdIdx` (`Row`s, or (pk, ColdIdx))."""
    ixs = [(r[0], r[-1]) for r in rows]
    return [
        ("deadlines", 2, [(ix.deadline, pk) for pk, ix in ixs if ix.deadline is not None]),
        ("movers", 4, [(i, pk, kind, ref) for pk, ix in ixs for i, kind, ref in ix.movers]),
        ("settles", 7, [(k, *at, pk, end, lease) for pk, ix in ixs
                        for k, at, end, lease in ix.settles]),
        ("leases", 6, [(k, lease, pk, *sk) for pk, ix in ixs for k, sk, lease in ix.leases]),
        ("ratings", 6, [(k, role, pk, i, ts, a) for pk, ix in ixs
                        for i, (k, role, ts, a) in enumerate(ix.ratings)]),
        ("keys", 6, [(d, k, *sk, pk) for pk, ix in ixs for d, k, sk in ix.keys]),
    ]


def _read(src: BinaryIO, n: int) -> bytes:
    got = src.read(n)
    if len(got) != n:
        raise EOFError("the store's image ends early")
    return got


def _copy(src: BinaryIO, out: BinaryIO, n: int) -> None:
    while n > 0:
        got = _read(src, min(n, 1 << 20))
        out.write(got)
        n -= len(got)


def _unidx(blob: bytes) -> ColdIdx:
    return ColdIdx(*pickle.loads(blob))
