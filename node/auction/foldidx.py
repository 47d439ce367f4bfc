"""The reader indexes of `fold.IncrementalMarket` (a mixin, split from `fold` as
`foldcold.ColdTier` was): auctions by deadline, the leases of each party, the party
logs readers follow, routing's (kind, ref) of commits, awards and subcontracts, the
settlement index, and what a partition going cold takes out of them (`ColdIdx`) and
brings back. See `IncrementalMarket`."""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any

from ..reputation import FoldReputation
from .foldstate import CKey, ColdIdx, ColdStore, _Ordered, _Part
from .lease import Lease
from .market import Market
from .records import Auction, PartyLog, SubcontractRecord


class FoldIndexes:
    """The indexes readers and routing ask (`IncrementalMarket`'s state, declared
    here for the type checker)."""

    merged: Market
    rep: FoldReputation
    _cold: ColdStore | None
    _cold_parts: int
    _ord: dict[str, _Ordered]
    _deadlines: list[tuple[int, bytes]]
    _open_from: int
    _leases_of: dict[bytes, list[bytes]]
    _logs: dict[bytes, PartyLog]
    _movers: dict[bytes, tuple[str, bytes | None]]
    _settles: dict[bytes, list[tuple[CKey, int, bytes]]]

    # ------------------------------------------------------------ reader indexes

    def _watch_auction(self, k: bytes, old: Auction | None, new: Auction | None) -> None:
        dl_old = old.deadline_ms if old is not None else None
        dl_new = new.deadline_ms if new is not None else None
        if dl_old == dl_new:
            return
        if dl_old is not None:
            i = bisect_left(self._deadlines, (dl_old, k))
            if i < len(self._deadlines) and self._deadlines[i] == (dl_old, k):
                del self._deadlines[i]  # (pruned already if it ended before _open_from)
        if dl_new is not None and dl_new >= self._open_from:
            insort(self._deadlines, (dl_new, k))

    def _open_auctions(self, now_ms: int) -> list[Auction]:
        """Auctions whose deadline is at or after `now_ms`, in canonical order. Those
        that ended before the latest time asked for are dropped from the index; asking
        for an earlier time than ever before scans every auction once."""
        d = self.merged.auctions
        if now_ms < self._open_from:
            return [a for a in d.values() if a.deadline_ms >= now_ms]
        dl = self._deadlines
        cut = bisect_left(dl, (now_ms,))
        del dl[:cut]
        self._open_from = now_ms
        sk = self._ord["auctions"].sk
        keys = [k for _, k in dl]
        if self._cold_parts:  # cold auctions ended an hour ago, as a rule: none here
            assert self._cold is not None
            keys += self._cold.open_from(now_ms)
        return [d[k] for k in sorted(keys, key=sk)]

    def _watch_lease(self, k: bytes, old: Lease | None, new: Lease | None) -> None:
        if old is not None:
            self._index_lease(k, old, False)
        if new is not None:
            self._index_lease(k, new, True)
        logs = self._logs
        if logs:
            for x in (old, new):
                if x is not None:
                    for p in {x.provider, *x.keys}:
                        if p in logs:
                            logs[p].note("leases", k)

    def _index_lease(self, k: bytes, lease: Lease, add: bool) -> None:
        for p in {lease.provider, *lease.keys}:
            if add:
                self._leases_of.setdefault(p, []).append(k)
            else:
                lst = self._leases_of[p]
                lst.remove(k)
                if not lst:
                    del self._leases_of[p]

    def _watch_subcontract(self, k: bytes, old: SubcontractRecord | None,
                           new: SubcontractRecord | None) -> None:
        logs = self._logs
        for x in (old, new):
            if x is not None and x.provider in logs:
                logs[x.provider].note("subcontracts", k)

    def _party_log(self, key: bytes) -> PartyLog:
        old = self._logs.get(key)
        if old is not None:
            old.ended = True
        log = self._logs[key] = PartyLog()
        return log

    # ------------------------------------------------------------ cold indexes

    def _cool_idx(self, p: _Part, vals: dict[str, dict[Any, Any]],
                  sks: dict[str, dict[Any, CKey]],
                  movers: tuple[tuple[bytes, str, bytes | None], ...]) -> ColdIdx:
        """Take a partition going cold out of the in-memory indexes; what it had there
        goes to the store's tables (`ColdIdx`), where the readers find it."""
        a = vals.get("auctions", {}).get(p.key)
        if a is not None:
            self._watch_auction(p.key, a, None)
        settles = []
        for ck, (parties, end, lease_id) in p.out_s.items():
            self._settle_remove(parties, ck)
            settles += [(k, ck, end, lease_id) for k in parties]
        leases = []
        for k, lease in vals.get("leases", {}).items():
            self._index_lease(k, lease, False)
            leases += [(party, sks["leases"][k], k) for party in {lease.provider, *lease.keys}]
        ratings = [(subj, role, ck[0], self.rep.cool(subj, role, ck[0], sat, score, w))
                   for ck, (subj, role, sat, score, w) in p.out_r.items()]
        return ColdIdx(None if a is None else a.deadline_ms, movers, tuple(settles),
                       tuple(leases), tuple(ratings))

    def _thaw_idx(self, p: _Part, vals: dict[str, dict[Any, Any]],
                  movers: tuple[tuple[bytes, str, bytes | None], ...]) -> None:
        """The reverse of `_cool_idx` (the store forgets its rows)."""
        for i, kind, ref in movers:
            self._movers[i] = (kind, ref)
        a = vals.get("auctions", {}).get(p.key)
        if a is not None:
            self._watch_auction(p.key, None, a)
        for ck, (parties, end, lease_id) in p.out_s.items():
            self._settle_add(parties, ck, end, lease_id)
        for k, lease in vals.get("leases", {}).items():
            self._index_lease(k, lease, True)
        for ck, (subj, role, sat, score, w) in p.out_r.items():
            self.rep.thaw(subj, role, ck[0], sat, score, w)

    def _mover(self, event_id: bytes) -> tuple[str, bytes | None] | None:
        """(kind, ref) of a present commit, award or subcontract (cold ones: the store)."""
        t = self._movers.get(event_id)
        if t is None and self._cold_parts:
            assert self._cold is not None
            t = self._cold.mover(event_id)
        return t

    # ------------------------------------------------------------ settlement index

    def _settle_add(self, parties: tuple[bytes, ...], ck: CKey, end: int, lease: bytes) -> None:
        for k in parties:
            insort(self._settles.setdefault(k, []), (ck, end, lease))

    def _settle_remove(self, parties: tuple[bytes, ...], ck: CKey) -> None:
        for k in parties:
            lst = self._settles[k]
            del lst[bisect_left(lst, ck, key=lambda e: e[0])]
            if not lst:
                del self._settles[k]
