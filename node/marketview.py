"""Keeps a derived `Market` current as events land in a ledger.

Derivation is a fold in canonical order (ts_ms, author, seq). New events usually
sort after everything folded so far and are applied incrementally; one that sorts
earlier (a slow peer, a clock behind ours) or a new fork proof forces a re-fold from
the ledger. Re-folds happen lazily, when someone asks for the market, so a burst of
late events costs one re-fold, not one each.
"""

from __future__ import annotations

from collections.abc import Iterable

from .auction import Market, derive
from .events import Event
from .ledger import Ledger
from .reputation import Policy


class MarketView:
    def __init__(self, ledger: Ledger, policy: Policy | None = None) -> None:
        self.ledger = ledger
        self.policy = policy
        self._new: list[Event] = []
        self._forks = len(ledger.forked())
        self._last: tuple[int, bytes, int] | None = None
        self.refolds = 0
        self._market = derive(self._tracked(ledger.iter_canonical()), policy)

    def _tracked(self, events: Iterable[Event]) -> Iterable[Event]:
        for ev in events:
            self._last = (ev.ts_ms, ev.author, ev.seq)
            yield ev

    def note(self, events: Iterable[Event]) -> None:
        """Tell the view about events the ledger just accepted."""
        self._new.extend(events)

    def market(self) -> Market:
        """The market over everything accepted so far."""
        forks = len(self.ledger.forked())
        if forks != self._forks:
            self._forks = forks
            return self.refold()
        if self._new:
            forked = self.ledger.forked()
            new = sorted(
                (e for e in self._new if e.seq < forked.get(e.author, 1 << 62)),
                key=lambda e: (e.ts_ms, e.author, e.seq),
            )
            self._new = []
            first = (new[0].ts_ms, new[0].author, new[0].seq) if new else None
            if first is not None and self._last is not None and first <= self._last:
                return self.refold()
            self._market.apply_all(self._tracked(new))
        return self._market

    def refold(self) -> Market:
        self._new = []
        self._last = None
        self._market = derive(self._tracked(self.ledger.iter_canonical()), self.policy)
        self.refolds += 1
        return self._market


class LiveMarket:
    """A `MarketView` kept current from the ledger's arrival cursor.

    Every event stored by any path (gossip, sync, the node's own publishes, client
    submits) has a higher arrival number, so `market()` first notes whatever arrived
    since the last call. Give it a view nobody else notes to (or None for a new one)."""

    def __init__(self, ledger: Ledger, view: MarketView | None = None) -> None:
        self.ledger = ledger
        self._cursor = _last_arrival(ledger)
        if view is None:
            view = MarketView(ledger)
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
