"""Keeps a derived `Market` current as events land in a ledger.

Two rules make a lookup cost what changed, never the whole history:

* **Allowed clock skew.** An event's `ts_ms` is its author's claim. Events dated
  after `now + skew_ms` are *held*: the ledger stores and replicates them like any
  other (so digests never depend on anyone's clock) but the market leaves them out
  until they are due. Nothing is kept in memory for them: when the horizon
  `now + skew_ms` moves on, the events it passed are read back from the ledger's
  canonical index. One far-future event therefore cannot become the last event of
  the fold and make every later one "back-dated" (docs/PROTOCOL.md, "Time").
* **Incremental derivation** (`auction.fold.IncrementalMarket`): the market is folded
  per auction, so a back-dated event re-derives its auction only (plus the auctions
  its outputs can affect); the result is exactly `derive()` over the due events.
  Only the `max_loaded` most recently touched auctions keep their events and fold in
  memory; the others load their events back from the ledger (by id) when one of
  their events arrives. The first build streams the due events in canonical order,
  a chunk at a time, so it never holds the whole history either. Closed auctions go
  further, to a cold store (`marketcold.SqliteCold`, a private SQLite file beside the
  ledger's): their bookkeeping and merged values leave memory and are read back when
  needed.

Work happens lazily, when someone asks for the market. The clock is a parameter.

**Snapshots** (`save_snapshot` / `load_snapshot`): a restart need not fold the whole
history again. A snapshot is the view's derived state at an arrival cursor, tagged with
a hash of the code that derives it (an upgrade rebuilds once, nothing to bump by hand),
the network, policy and skew, and the set of events up to the cursor (count and a sum
of id keys: the same events in another arrival order fit); a
restart that finds a matching one loads it and folds only what arrived after it. The
file is Python's pickle: it lives in the node's own data dir, written by the node (a
process that can write there owns the node anyway). The daemon writes it from a forked
child (`save_snapshot_forked`), so the node never stops for it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import signal
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .auction import Market
from .auction.fold import IncrementalMarket
from .events import Event, decode_stored
from .ledger import Ledger, idk
from .marketcold import open_beside
from .reputation import Policy

DEFAULT_SKEW_MS = 300_000  # node.max_clock_skew_s default: 5 minutes
DEFAULT_MAX_LOADED = 2048  # partitions (auctions, offer sets) folded in memory
BUILD_CHUNK = 8192  # events decoded at a time by the first build


def wall_ms() -> int:
    return int(time.time() * 1000)


class MarketView:
    """The market over a ledger's due events (ts_ms <= clock() + skew_ms)."""

    def __init__(self, ledger: Ledger, policy: Policy | None = None, *,
                 skew_ms: int = DEFAULT_SKEW_MS,
                 clock: Callable[[], int] = wall_ms,
                 max_loaded: int | None = None) -> None:
        self.ledger = ledger
        self.policy = policy
        self.skew_ms = skew_ms
        self.clock = clock
        self.max_loaded = DEFAULT_MAX_LOADED if max_loaded is None else max_loaded
        self.refolds = 0
        self._new: list[Event] = []
        self._authors: dict[bytes, bytes] = {}  # one bytes object per author key
        self._build()

    def _build(self) -> None:
        self._forks = self.ledger.forked()
        self._horizon = self.clock() + self.skew_ms
        old = getattr(self, "cold", None)
        if old is not None:
            old.close()
        self.cold = open_beside(self.ledger.path)
        eng = self.engine = IncrementalMarket(self.policy, source=self._load,
                                              offers=self._offer, max_loaded=self.max_loaded,
                                              cold=self.cold)
        # The build allocates millions of long-lived objects and no garbage cycles:
        # the cyclic GC would rescan them all, ever more often (~30% of the build).
        gc_was = gc.isenabled()
        gc.disable()
        try:
            chunk: list[Event] = []
            for ev in self._due_iter(None, self._horizon):
                chunk.append(ev)
                if len(chunk) >= BUILD_CHUNK:
                    eng.add(chunk)
                    eng.market()  # folds and evicts: memory stays at the active auctions
                    chunk = []
            eng.add(chunk)
        finally:
            _gc_resume(gc_was)

    def _due(self, after: int | None, upto: int) -> list[Event]:
        return list(self._due_iter(after, upto))

    def _due_iter(self, after: int | None, upto: int) -> Iterator[Event]:
        """Stored, non-forked events with after < ts_ms <= upto, in canonical order
        (the canonical index)."""
        q = "SELECT author, seq, wire FROM events WHERE ts_ms <= ?"
        args: list[object] = [upto]
        if after is not None:
            q += " AND ts_ms > ?"
            args.append(after)
        forks = self._forks
        net = self.ledger.network
        # A cursor of its own: the engine's loads query the ledger while this one runs.
        cur = self.ledger.db.cursor()
        for a, s, w in cur.execute(q + " ORDER BY ts_ms, author, seq", args):
            if s < forks.get(a, 1 << 62):
                yield decode_stored(w, net, self._authors)

    def _load(self, ids: list[bytes]) -> list[Event]:
        """Stored events by id, in the order given (the engine's source)."""
        wires: dict[bytes, bytes] = {}
        db = self.ledger.db
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            q = f"SELECT id, wire FROM events WHERE idk IN ({','.join('?' * len(part))})"
            for id_, w in db.execute(q, [idk(x) for x in part]):
                wires[id_] = w
        net = self.ledger.network
        return [decode_stored(wires[x], net, self._authors) for x in ids if x in wires]

    def _offer(self, author: bytes, latest: bool) -> Event | None:
        """The author's earliest or latest due, non-forked stored offer (the engine's
        offer source: it keeps only those two per provider)."""
        order = "DESC" if latest else "ASC"
        row = self.ledger.db.execute(
            "SELECT wire FROM events WHERE author = ? AND kind = 'offer' AND ts_ms <= ? "
            f"AND seq < ? ORDER BY ts_ms {order}, seq {order} LIMIT 1",
            (author, self._horizon, self._forks.get(author, 1 << 62))).fetchone()
        return None if row is None else decode_stored(row[0], self.ledger.network,
                                                      self._authors)

    @property
    def horizon_ms(self) -> int:
        """Events dated after this are held out of the market."""
        return self._horizon

    def held(self) -> int:
        """How many stored events are dated beyond the horizon (not yet due)."""
        row = self.ledger.db.execute("SELECT COUNT(*) FROM events WHERE ts_ms > ?",
                                     (self._horizon,)).fetchone()
        return int(row[0])

    def note(self, events: Iterable[Event]) -> None:
        """Tell the view about events the ledger just accepted."""
        self._new.extend(events)

    def market(self) -> Market:
        """The market over every due event accepted so far."""
        eng = self.engine
        forks = self.ledger.forked()
        if forks != self._forks:
            gone: list[bytes] = []
            for author, seq in forks.items():  # only authors whose fork is new or earlier
                if seq < self._forks.get(author, 1 << 62):
                    gone += [r[0] for r in self.ledger.db.execute(
                        "SELECT id FROM events WHERE author = ? AND seq >= ?", (author, seq))]
            self._forks = forks
            eng.remove(gone)
        old = self._horizon
        h = max(old, self.clock() + self.skew_ms)  # the horizon never moves back
        new = [e for e in self._new
               if e.ts_ms <= old and e.seq < forks.get(e.author, 1 << 62)]
        self._new = []
        if h > old:
            self._horizon = h
            new += self._due(old, h)  # held events now due (and new ones up to h)
        if new:
            eng.add(new)
        return eng.market()

    def refold(self) -> Market:
        """Derive everything again from the ledger (a view that missed events)."""
        self._new = []
        self._build()
        self.refolds += 1
        return self.market()


class LiveMarket:
    """A `MarketView` kept current from the ledger's arrival cursor.

    Every event stored by any path (gossip, sync, the node's own publishes, client
    submits) has a higher arrival number, so `market()` first notes whatever arrived
    since the last call. Give it a view nobody else notes to (or None for a new one),
    or a `snapshot` file to start from (see `load_snapshot`; `restored` says whether it
    did)."""

    def __init__(self, ledger: Ledger, view: MarketView | None = None, *,
                 skew_ms: int = DEFAULT_SKEW_MS,
                 clock: Callable[[], int] = wall_ms,
                 snapshot: Path | None = None) -> None:
        self.ledger = ledger
        self.restored = False
        if view is None and snapshot is not None:
            got = load_snapshot(ledger, snapshot, skew_ms=skew_ms, clock=clock)
            if got is not None:
                view, self._cursor = got
                self.view = view
                self.restored = True
                return
        self._cursor = _last_arrival(ledger)
        if view is None:
            view = MarketView(ledger, skew_ms=skew_ms, clock=clock)
        else:
            view.refold()  # it may have missed events before our cursor
        self.view = view

    @property
    def cursor(self) -> int:
        """The last arrival number noted."""
        return self._cursor

    def market(self) -> Market:
        net, keys = self.ledger.network, self.view._authors
        while True:
            # Stored records were checked in full on append: decoded without the
            # canonical-form check and with shared author keys (decode_stored).
            rows = self.ledger.wires_since(self._cursor, limit=4096)
            if not rows:
                break
            self._cursor = rows[-1][0]
            self.view.note(decode_stored(w, net, keys) for _, w in rows)
            if len(self.view._new) >= BUILD_CHUNK:
                self.view.market()  # a long catch-up (after a snapshot) folds as it reads
        return self.view.market()


# ------------------------------------------------------------------ snapshots

SNAPSHOT_FORMAT = 3
_MAGIC = b"bidmesh-market-snapshot\n"


def _code_hash() -> str:
    """Hash of the source of everything a snapshot's objects come from."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    files = sorted([*(here / "auction").glob("*.py"),
                    *(here / f"{m}.py" for m in ("codec", "events", "marketcold", "marketview",
                                                 "reputation", "schema"))])
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


CODE_HASH = _code_hash()


def _header(view: MarketView, cursor: int) -> dict[str, Any]:
    led = view.ledger
    # The set of events up to the cursor, whatever their arrival order: the count and a
    # sum of id keys (modulo a prime below 2**32, so a million rows cannot overflow).
    # The idk index covers both columns (n is its rowid): a scan of it, not of every
    # stored record (~20 MiB instead of ~600 MiB at a million events).
    count, ids = led.db.execute("SELECT COUNT(*), SUM(idk % 4294967291) FROM events "
                                "INDEXED BY events_idk WHERE n <= ?", (cursor,)).fetchone()
    return {"format": SNAPSHOT_FORMAT, "code": CODE_HASH, "network": led.network,
            "policy": repr(view.engine.policy), "skew_ms": view.skew_ms, "cursor": cursor,
            "count": int(count),
            "ids": int(ids or 0)}


def _dump(view: MarketView, f: BinaryIO, cold_path: str | None = None) -> None:
    """The view's state: the engine (its hot part) pickled, then the cold store's file
    (`SqliteCold.copy_file`: restoring it costs a file copy, not rebuilding its tables
    row by row), then None."""
    eng = view.engine
    attached = eng._source, eng._offer_source, eng._cold
    # Bound to the ledger and the store's file: re-attached on load.
    eng._source = eng._offer_source = None
    eng.attach_cold(None)
    try:
        pickle.dump((eng, view._forks, view._horizon, view._authors, view.refolds), f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        eng._source, eng._offer_source = attached[:2]
        eng.attach_cold(attached[2])
    view.cold.copy_file(f, cold_path)
    pickle.dump(None, f, protocol=pickle.HIGHEST_PROTOCOL)


def _write(path: Path, header: dict[str, Any], body: Callable[[BinaryIO], None]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + json.dumps(header).encode() + b"\n")
            body(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a half-written copy
        raise


def save_snapshot(live: LiveMarket, path: Path) -> None:
    """Write the live market's derived state to `path` (atomically), in this process."""
    live.market()
    v = live.view
    _write(path, _header(v, live.cursor), lambda f: _dump(v, f))


def save_snapshot_forked(live: LiveMarket, path: Path) -> int:
    """Like `save_snapshot`, but the pickling and writing happen in a forked child
    (copy-on-write: a consistent state at no pause for the caller beyond the fork).
    Returns the child's pid; reap it with `os.waitpid` (exit status 0: written), then
    call `live.view.cold.release()`: the cold store's file stays unchanged meanwhile."""
    live.market()
    header = _header(live.view, live.cursor)
    live.view.cold.hold()
    try:
        pid = os.fork()
    except OSError:
        live.view.cold.release()
        raise
    if pid == 0:  # the child: no locks, no I/O but the file; never returns
        code = 1
        try:
            # The parent's signal handling (trio's wakeup fd) is not ours: a SIGTERM to
            # the process group must end this child, not wake the parent's loop.
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            v = live.view
            _write(path, header, lambda f: _dump(v, f, v.cold.path))
            code = 0
        finally:
            os._exit(code)
    return pid


def load_snapshot(ledger: Ledger, path: Path, *, skew_ms: int = DEFAULT_SKEW_MS,
                  clock: Callable[[], int] = wall_ms,
                  ) -> tuple[MarketView, int] | None:
    """(view, arrival cursor) from a snapshot that fits this ledger and this code, or
    None (missing, other code or settings, a ledger that is not the one it was taken
    from): then build as usual."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the with below; open errors apart)
    except OSError:
        return None
    with f:
        try:
            if f.read(len(_MAGIC)) != _MAGIC:
                return None
            header = json.loads(f.readline())
        except (OSError, ValueError):
            return None
        view = MarketView.__new__(MarketView)
        view.ledger, view.policy, view.skew_ms, view.clock = ledger, None, skew_ms, clock
        view.max_loaded, view._new = DEFAULT_MAX_LOADED, []
        cursor = header.get("cursor") if isinstance(header, dict) else None
        if not isinstance(cursor, int):
            return None
        view.engine = IncrementalMarket()  # for _header: the default policy
        if header != _header(view, cursor):
            return None
        gc_was = gc.isenabled()
        gc.disable()  # millions of long-lived objects, no cycles to find (as in the build)
        cold = None
        try:
            # From the file, not from one bytes object: no second copy in memory.
            eng, forks, horizon, authors, refolds = pickle.load(f)
            cold = open_beside(ledger.path, f)
            if pickle.load(f) is not None or not isinstance(eng, IncrementalMarket) or \
                    cold.db.execute("SELECT COUNT(*) FROM parts").fetchone()[0] != eng.cold():
                raise ValueError("not the store this engine left")
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError,
                IndexError, KeyError, ValueError, TypeError, sqlite3.Error):
            if cold is not None:
                cold.close()
            return None  # a damaged file: build instead
        finally:
            _gc_resume(gc_was)
    eng._source, eng._offer_source = view._load, view._offer
    eng.attach_cold(cold)
    view.cold = cold
    view.engine, view._forks, view._horizon, view._authors = eng, forks, horizon, authors
    view.refolds = refolds
    view.max_loaded = eng._max_loaded
    return view, cursor


def _gc_resume(was_enabled: bool) -> None:
    """Turn the cyclic GC back on after allocating millions of long-lived objects with
    it off: first move them all to the oldest generation (freeze, then unfreeze: a
    list splice), or the next young collection would traverse every one of them (~20%
    of a snapshot load)."""
    gc.freeze()
    gc.unfreeze()
    if was_enabled:
        gc.enable()


def _last_arrival(ledger: Ledger) -> int:
    row = ledger.db.execute("SELECT MAX(n) FROM events").fetchone()
    return int(row[0] or 0)


class Snapshotter:
    """When the daemon writes a snapshot, and the forked child doing it.

    A snapshot is due when events arrived since the last one (or since the start)
    and either none fits yet (none was loaded or written), or `min_events` arrived, or
    `max_age_s` passed: a restart then folds at most about
    `min_events` (or an hour of trickle) after loading. Each write costs the child
    roughly the CPU of pickling the state (~4.5 s per 100,000 events measured), and
    the parent a fork (page tables only)."""

    def __init__(self, live: LiveMarket, path: Path, *, min_events: int = 20_000,
                 max_age_s: float = 3600.0) -> None:
        self.live, self.path = live, path
        self.min_events, self.max_age_s = min_events, max_age_s
        self.saved_cursor = live.cursor
        self.fits = live.restored  # a snapshot that fits is on disk
        self.saved_at = time.monotonic()
        self.saves = self.failures = 0
        self.pid: int | None = None
        self._pending_cursor = 0
        # A writer killed with its node (SIGKILL, power loss) leaves its temporary file.
        for old in path.parent.glob(path.name + ".tmp*"):
            old.unlink(missing_ok=True)

    def due(self) -> bool:
        if self.pid is not None:
            return False
        new = _last_arrival(self.live.ledger) - self.saved_cursor
        return new > 0 and (not self.fits or new >= self.min_events
                            or time.monotonic() - self.saved_at >= self.max_age_s)

    def start(self) -> None:
        """Fork a child that writes the snapshot (check `due()` first)."""
        self.pid = save_snapshot_forked(self.live, self.path)
        self._pending_cursor = self.live.cursor

    def poll(self) -> bool | None:
        """Reap the child if it ended: True (written), False (failed), None (running
        or none)."""
        if self.pid is None:
            return None
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.pid = None
        self.live.view.cold.release()
        self.saved_at = time.monotonic()  # a failure waits as long as a success
        if os.waitstatus_to_exitcode(status) == 0:
            self.saved_cursor = self._pending_cursor
            self.fits = True
            self.saves += 1
            return True
        self.failures += 1
        return False

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "restored": self.live.restored,
                "saved_cursor": self.saved_cursor,
                "saves": self.saves, "failures": self.failures,
                "writing": self.pid is not None}
