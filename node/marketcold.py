"""The market's cold tier: closed partitions' fold bookkeeping in a private SQLite file.

`auction.fold.IncrementalMarket` moves a partition it will likely not touch again (an
auction long ended, its events evicted) out of memory into a `ColdStore` and takes it
back when an event or a changed output reaches it. This is that store: one table of
pickled partition states and two indexed tables of the reads they recorded (who
must be re-derived when a rating or settlement changes), in a temporary file of the
process (derived data: a restart rebuilds it or restores it from the market snapshot).

Writes go into one open transaction (committed every WRITE_BATCH puts; the
connection reads its own writes). **Hold** (`hold()` / `release()`): while a forked
child copies the store into a snapshot through its own connection, the parent
commits first and then must not change the file: puts and takes made meanwhile stay
in memory (a few seconds' worth) and are applied on release.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

from .auction.foldstate import CKey, RepRead, SetRead

CACHE_KIB = 4096  # page cache of the store: part of the RSS budget
WRITE_BATCH = 1024  # partitions written per transaction

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
"""

# One partition as the store keeps it: (key, top, pickled state, pickled merged values,
# rep reads, set reads).
Row = tuple[bytes, int, bytes, bytes, tuple[RepRead, ...], tuple[SetRead, ...]]


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


def open_beside(ledger_path: Path) -> SqliteCold:
    """A store in the ledger's directory (the node's data dir, on disk), else in the
    temp dir. Not the temp dir first: it is often a tmpfs, where a large node's cold
    partitions would sit in RAM again, only no longer counted in its RSS."""
    d = ledger_path.parent
    if str(ledger_path) != ":memory:" and d.is_dir():
        try:
            return SqliteCold(d)
        except (OSError, sqlite3.Error):
            pass  # a read-only directory (another user's data dir read by the CLI)
    return SqliteCold()


class SqliteCold:
    """A `ColdStore` in a temporary SQLite file, deleted with the object."""

    def __init__(self, directory: Path | None = None) -> None:
        d = Path(directory or tempfile.gettempdir())
        if d not in _swept:
            _swept.add(d)
            _sweep(d)
        fd, self.path = tempfile.mkstemp(prefix=f"bidmesh-cold-{os.getpid()}-", suffix=".db",
                                         dir=d)
        os.close(fd)
        self._fin = weakref.finalize(self, _unlink, self.path, os.getpid())
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self.db.execute("PRAGMA synchronous=OFF")  # derived, rebuilt after a crash
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.executescript(_SCHEMA)
        self._held = False
        self._puts: dict[bytes, Row] = {}  # put while held: not in the file yet
        self._writes = 0  # puts in the open transaction
        self._taken: set[bytes] = set()  # taken while held: still in the file
        self.puts = self.takes = self.reads = 0

    def close(self) -> None:
        self.db.close()
        self._fin()

    # ------------------------------------------------------------ ColdStore

    def put(self, pk: bytes, top: int, state: bytes, vals: bytes,
            reads_rep: tuple[RepRead, ...], reads_set: tuple[SetRead, ...]) -> None:
        self.puts += 1
        row: Row = (pk, top, state, vals, reads_rep, reads_set)
        if self._held:
            self._puts[pk] = row
            return
        self._write([row])
        self._writes += 1
        if self._writes >= WRITE_BATCH:
            self.commit()

    def take(self, pk: bytes) -> bytes | None:
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
        return bytes(r[0])

    def values(self, pk: bytes) -> bytes | None:
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
        if self.db.in_transaction:
            self.db.execute("COMMIT")
        self._writes = 0

    def rep_readers(self, key: bytes, role: str, as_of: int) -> list[tuple[CKey, bytes]]:
        """Cold partitions that read `key`'s reputation as `role` as of `as_of` or later."""
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
        out = [((t, a, s), pk) for t, a, s, pk in self.db.execute(
            "SELECT at_ts, at_author, at_seq, pk FROM set_reads "
            "WHERE key = ? AND (at_ts, at_author, at_seq) > (?, ?, ?) AND ended_by >= ?",
            (key, *after, ended_by)) if pk not in self._taken]
        out += [(r[1], pk) for pk, row in self._puts.items() for r in row[5]
                if r[0] == key and r[1] > after and r[2] >= ended_by]
        return out

    def max_top(self) -> int:
        got = [row[1] for row in self._puts.values()]
        if self._taken:  # rare (a fork while a snapshot is written): a scan
            got += [t for pk, t in self.db.execute("SELECT pk, top FROM parts")
                    if pk not in self._taken]
        else:
            r = self.db.execute("SELECT MAX(top) FROM parts").fetchone()
            got.append(int(r[0] or 0))
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
        db = self.db if path is None else sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            reps: dict[bytes, list[RepRead]] = {}
            for k, role, as_of, t, a, s, pk in db.execute("SELECT * FROM rep_reads"):
                reps.setdefault(pk, []).append((k, role, as_of, (t, a, s)))
            sets: dict[bytes, list[SetRead]] = {}
            for k, t, a, s, e, pk in db.execute("SELECT * FROM set_reads"):
                sets.setdefault(pk, []).append((k, (t, a, s), e))
            for pk, top, state, vals in db.execute("SELECT pk, top, state, vals FROM parts"):
                if pk not in self._taken:
                    yield (pk, top, bytes(state), bytes(vals), tuple(reps.get(pk, ())),
                           tuple(sets.get(pk, ())))
            yield from self._puts.values()
        finally:
            if db is not self.db:
                db.close()

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

    def _delete(self, pks: list[bytes]) -> None:
        db = self.db
        if not db.in_transaction:
            db.execute("BEGIN")
        for t in ("parts", "rep_reads", "set_reads"):
            db.executemany(f"DELETE FROM {t} WHERE pk = ?", [(pk,) for pk in pks])
