"""The cold tier of `fold.IncrementalMarket` (a mixin, split from `fold`): closed
partitions' bookkeeping moves to a `ColdStore` and comes back when something reaches
it. See `IncrementalMarket` and docs/decisions.md ("Market cold tier")."""

from __future__ import annotations

import heapq
import pickle
from bisect import bisect_left, insort
from collections.abc import Callable
from typing import Any

from ..events import Event
from ..reputation import FoldReputation
from .foldstate import (
    LAZY_DICTS,
    SK,
    CKey,
    ColdIdx,
    ColdKey,
    ColdStore,
    ColdValues,
    LazyDict,
    Source,
    _Ordered,
    _Part,
)

_NO_VALUES = ColdValues(None)


class ColdTier:
    """Moves partitions to the engine's cold store and back (`IncrementalMarket`'s
    state, declared here for the type checker)."""

    _cold: ColdStore | None
    rep: FoldReputation
    _cold_values: ColdValues
    _ord: dict[str, _Ordered]
    _cold_after: int
    _cold_top: int
    _cold_parts: int
    _cold_events: int
    _cool_q: list[tuple[int, bytes]]
    _now: int
    _parts: dict[bytes, _Part]
    _part_of: dict[bytes, bytes]
    _rep_reads: dict[tuple[bytes, str], list[tuple[int, CKey, bytes]]]
    _set_reads: dict[bytes, list[tuple[CKey, int, bytes]]]
    _source: Source | None
    _route: Callable[[Event], bytes]
    _movers: dict[bytes, tuple[str, bytes | None]]
    _cool_idx: Callable[[_Part, dict[str, dict[Any, Any]], dict[str, dict[Any, CKey]],
                         tuple[tuple[bytes, str, bytes | None], ...]], ColdIdx]
    _thaw_idx: Callable[[_Part, dict[str, dict[Any, Any]],
                         tuple[tuple[bytes, str, bytes | None], ...]], None]
    thaws: int

    def cold(self) -> int:
        """Partitions in the cold store."""
        return self._cold_parts

    def attach_cold(self, cold: ColdStore | None) -> None:
        """Use `cold` (None: detach it, e.g. to pickle the engine; the store's content
        must be the one the engine left)."""
        self._cold = cold
        self._cold_values = ColdValues(cold) if cold is not None else _NO_VALUES
        self.rep.attach_cold(cold)
        for name in LAZY_DICTS:
            o = self._ord[name]
            if isinstance(o.d, LazyDict):
                o.d.load = self._cold_values if cold is not None else None
                o.d.pos = o.pos

    def _cool(self) -> None:
        """Move evicted, clean partitions whose events are all older than the cold
        horizon to the cold store: a request's partition (an auction) only, so the
        partitions events wait in for an unknown reference never go cold."""
        cold = self._cold
        assert cold is not None
        cut = self._now - self._cold_after
        q = self._cool_q
        while q and q[0][0] < cut:
            top, pk = heapq.heappop(q)
            p = self._parts.get(pk)
            # Loaded again or changed since: it is queued again at its next eviction.
            if p is None or p.ids is None or p.dirty is not None or p.top != top or \
                    p.linked.get("auctions") != [pk]:
                continue
            for sr in p.reads_rep:
                self._unread_drop(self._rep_reads, (sr[0], sr[1]), (sr[2], sr[3], pk))
            for ss in p.reads_set:
                self._unread_drop(self._set_reads, ss[0], (ss[1], ss[2], pk))
            for i in p.ids:
                del self._part_of[i]
            rr, rs = tuple(p.reads_rep), tuple(p.reads_set)
            movers = tuple((i, *t) for i in p.ids if (t := self._movers.pop(i, None)))
            state = (p.ids, p.top, p.applied, p.linked, p.ign, p.evd, rr, rs, p.out_r, p.out_s,
                     movers)
            # Its merged entries leave the dicts: their values (with the canonical key
            # of each, `SK`, for a thaw) to the store, and their keys to its key table
            # (`ColdIdx.keys`), which serves the dicts' reads from then on.
            vals: dict[str, dict[Any, Any]] = {}
            sks: dict[str, dict[Any, CKey]] = {}
            keys: list[ColdKey] = []
            for di, name in enumerate(LAZY_DICTS):
                got = p.linked.get(name)
                if got:
                    o = self._ord[name]
                    d = o.d
                    assert isinstance(d, LazyDict)
                    vals[name] = {k: dict.pop(d, k) for k in got}
                    if o.late:  # (none after `fix()`, where `market()` cools)
                        for k in got:
                            o.late.pop(k, None)
                    sks[name] = {k: o.pos.pop(k) for k in got}
                    keys += [(di, k, sk) for k, sk in sks[name].items()]
                    d.ncold += len(got)
            idx = self._cool_idx(p, vals, sks, movers)._replace(keys=tuple(keys))
            vals[SK] = sks
            cold.put(pk, p.top, pickle.dumps(state, pickle.HIGHEST_PROTOCOL),
                     pickle.dumps(vals, pickle.HIGHEST_PROTOCOL), rr, rs, idx)
            del self._parts[pk]
            self._cold_top = max(self._cold_top, p.top)
            self._cold_parts += 1
            self._cold_events += len(p.ids)

    def _thaw(self, pk: bytes) -> _Part | None:
        """Take a partition back from the cold store (evicted: its events load when
        it folds again); None if it is not there."""
        assert self._cold is not None
        if self._cold.values(pk) is None:
            return None
        vals = self._cold_values(pk)  # before take: the store forgets them
        self._cold_values.forget(pk)
        blob = self._cold.take(pk)
        assert blob is not None
        # Its entries come back to the dicts, at the end of their storage: noted as
        # late, they move to their places at the end of `market()`.
        for name, kv in vals.items():
            if name != SK:
                o = self._ord[name]
                d = o.d
                assert isinstance(d, LazyDict)
                for k, v in kv.items():
                    dict.__setitem__(d, k, v)
                d.ncold -= len(kv)
                o.pos.update(vals[SK][name])
                o.late.update(dict.fromkeys(kv))
        p = _Part(pk)
        (ids, p.top, p.applied, p.linked, p.ign, p.evd, p.reads_rep, p.reads_set, p.out_r,
         p.out_s, movers) = pickle.loads(blob)
        self._thaw_idx(p, vals, movers)
        p.ids = ids
        for i in ids:
            self._part_of[i] = pk
        for sr in p.reads_rep:
            insort(self._rep_reads.setdefault((sr[0], sr[1]), []), (sr[2], sr[3], pk))
        for ss in p.reads_set:
            insort(self._set_reads.setdefault(ss[0], []), (ss[1], ss[2], pk))
        self._parts[pk] = p
        self._cold_parts -= 1
        self._cold_events -= len(ids)
        self.thaws += 1
        heapq.heappush(self._cool_q, (p.top, pk))
        return p

    def _thaw_event(self, event_id: bytes) -> None:
        """Take back the cold partition an event would be in, if any."""
        assert self._source is not None
        for ev in self._source([event_id]):
            if ev.kind != "offer":
                pk = self._route(ev)
                if pk not in self._parts:
                    self._thaw(pk)

    @staticmethod
    def _unread_drop(index: dict[Any, list[Any]], k: Any, ent: tuple[Any, ...]) -> None:
        lst = index[k]
        del lst[bisect_left(lst, ent)]
        if not lst:
            del index[k]
