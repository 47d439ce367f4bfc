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
  a chunk at a time, so it never holds the whole history either.

Work happens lazily, when someone asks for the market. The clock is a parameter.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Iterator

from .auction import Market
from .auction.fold import IncrementalMarket
from .events import Event, decode_stored
from .ledger import Ledger, idk
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
                 max_loaded: int = DEFAULT_MAX_LOADED) -> None:
        self.ledger = ledger
        self.policy = policy
        self.skew_ms = skew_ms
        self.clock = clock
        self.max_loaded = max_loaded
        self.refolds = 0
        self._new: list[Event] = []
        self._authors: dict[bytes, bytes] = {}  # one bytes object per author key
        self._build()

    def _build(self) -> None:
        self._forks = self.ledger.forked()
        self._horizon = self.clock() + self.skew_ms
        eng = self.engine = IncrementalMarket(self.policy, source=self._load,
                                              offers=self._offer, max_loaded=self.max_loaded)
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
            if gc_was:
                gc.enable()

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
    since the last call. Give it a view nobody else notes to (or None for a new one)."""

    def __init__(self, ledger: Ledger, view: MarketView | None = None, *,
                 skew_ms: int = DEFAULT_SKEW_MS,
                 clock: Callable[[], int] = wall_ms) -> None:
        self.ledger = ledger
        self._cursor = _last_arrival(ledger)
        if view is None:
            view = MarketView(ledger, skew_ms=skew_ms, clock=clock)
        else:
            view.refold()  # it may have missed events before our cursor
        self.view = view

    def market(self) -> Market:
        while True:
            rows = self.ledger.events(after=self._cursor, limit=4096)
            if not rows:
                break
            self._cursor = rows[-1][0]
            self.view.note(ev for _, ev in rows)
        return self.view.market()


def _last_arrival(ledger: Ledger) -> int:
    row = ledger.db.execute("SELECT MAX(n) FROM events").fetchone()
    return int(row[0] or 0)
