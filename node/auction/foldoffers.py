"""The offers of `fold.IncrementalMarket` (a mixin, split from `fold` as
`foldidx.FoldIndexes` was): no partition, each provider's earliest and latest offer
kept (all of them without an offer source), and the merged market's entry for it.
See `IncrementalMarket` and the `fold` docstring."""

from __future__ import annotations

from bisect import bisect_left

from ..errors import UsageError
from ..events import Event, Offer
from .foldstate import CKey, Kept, OfferSource, _ent, _Offers, _Ordered, ckey, kept
from .records import OfferRecord


class FoldOffers:
    """Offers as the engine keeps them (`IncrementalMarket`'s state, declared here for
    the type checker)."""

    _offers: dict[bytes, _Offers]
    _offer_of: dict[bytes, bytes]
    _offer_source: OfferSource | None
    _ord: dict[str, _Ordered]
    _now: int
    _now_stale: bool

    # ------------------------------------------------------------ offers

    def _add_offer(self, ev: Event) -> int:
        ck = ckey(ev)
        o = self._offers.get(ev.author)
        if o is None:
            o = self._offers[ev.author] = _Offers((ck, ev), self._offer_source is None)
            self._offer_of[ev.id] = ev.author
            self._offers_changed(ev.author, o)
            return 1
        if o.all is not None:
            i = bisect_left(o.all, ck, key=lambda e: e[0])
            if i < len(o.all) and o.all[i][0] == ck:
                return 0
            o.all.insert(i, (ck, ev))
            self._offer_of[ev.id] = ev.author
            o.first, o.last = o.all[0], o.all[-1]
        elif ck < o.first[0]:
            self._keep_offers(o, (ck, ev), o.last)
        elif ck > o.last[0]:
            self._keep_offers(o, o.first, (ck, ev))
        else:
            return int(ck != o.first[0] and ck != o.last[0])  # between: changes nothing
        self._offers_changed(ev.author, o)
        return 1

    def _remove_offer(self, event_id: bytes) -> None:
        author = self._offer_of.pop(event_id)
        o = self._offers[author]
        if o.last[1].id == event_id and o.last[0][0] == self._now:
            self._now_stale = True
        left = True
        if o.all is not None:
            o.all = [e for e in o.all if e[1].id != event_id]
            if o.all:
                o.first, o.last = o.all[0], o.all[-1]
            left = bool(o.all)
        else:
            src = self._offer_source
            assert src is not None
            first = o.first if o.first[1].id != event_id else _ent(src(author, False))
            last = o.last if o.last[1].id != event_id else _ent(src(author, True))
            if first is None or last is None:
                # The other one we keep is going too (later in this removal): the
                # source, which no longer has either, decides.
                first, last = _ent(src(author, False)), _ent(src(author, True))
            if first is not None and last is not None:
                self._keep_offers(o, first, last)
            elif first is None and last is None:
                for e in (o.first, o.last):
                    self._offer_of.pop(e[1].id, None)
                left = False
            else:
                raise UsageError("the offer source found an earliest but no latest offer")
        if not left:
            del self._offers[author]
            self._ord["offers"].remove(author)
            return
        self._offers_changed(author, o)

    def _keep_offers(self, o: _Offers, first: tuple[CKey, Event | Kept],
                     last: tuple[CKey, Event | Kept]) -> None:
        for e in (o.first, o.last):
            if e[1].id not in (first[1].id, last[1].id):
                self._offer_of.pop(e[1].id, None)
        same = first[1].id == last[1].id
        o.last = (last[0], kept(last[1]))
        o.first = o.last if same else (first[0], kept(first[1], body=False))
        self._offer_of[first[1].id] = first[1].author
        self._offer_of[last[1].id] = last[1].author

    def _offers_changed(self, author: bytes, o: _Offers) -> None:
        """The merged market's entry, as `Market._offer` leaves it after a full fold."""
        ev = o.last[1]
        body = ev.body
        assert isinstance(body, Offer)
        self._ord["offers"].put(author, o.first[0], OfferRecord(ev.id, author, ev.ts_ms, body))
