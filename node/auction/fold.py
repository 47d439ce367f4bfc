"""The market folded incrementally: an event costs what it touches, whatever its ts_ms.

`derive()` folds every event in canonical order (ts_ms, author, seq). Folded that way,
one event that sorts early (a back-dated event, a slow peer) forces a re-fold of the
whole ledger. `IncrementalMarket` gives exactly the same `Market` (the invariant its
property test checks against `derive()`), but folds each **partition** apart:

* an auction's partition holds its request and everything that reaches it through
  references: bids, commits, pledges, awards (`request`), reveals (commit → request),
  payments, usage, subcontracts and ratings (lease = award → request; a rating of a
  subcontract → subcontract → award → request). An event whose referenced event is
  unknown waits in a partition keyed by that id, and moves when the event arrives (or
  is excluded again, on a fork);
* offers are no partition: the market keeps each provider's latest offer, placed where
  its first one was, and nothing else reads them. With an offer source the engine
  keeps just those two per provider and asks the source when one of them is removed,
  so a provider re-publishing its offer for months costs no memory per offer;
* a partition folds with the plain `Market` code (`_PartMarket`), in canonical order:
  an event after its partition's last one is applied; one that sorts earlier
  re-derives that partition only.

What one partition reads from the others goes through `Market`'s four hooks and is
recorded: the reputation of bidders as of the close (best_value award checks) and
the settled leases of a rater (rating weights). A partition's outputs (accepted
ratings, settlements) go into shared indexes (`FoldReputation`, the settlement
index); when an output changes, exactly the partitions whose recorded reads it can
affect are re-derived. Every read at canonical key K depends only on outputs at keys
before K (an award is after the close it reads reputation at; a rating counts
settlements made before it), so this reaches the one fixpoint the canonical fold
reaches; the work queue takes partitions earliest key first, which keeps repeats rare.

The merged `Market` the rest of the node reads is kept in the canonical fold's
insertion order too (dicts and the ignored/evidence lists), so views are identical.
Pure: no clock, no I/O (the caller decides which events are due).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict
from itertools import islice
from typing import Any

from ..errors import UsageError
from ..events import Event
from ..reputation import FoldReputation, Policy
from .foldcold import ColdTier
from .foldidx import FoldIndexes
from .foldoffers import FoldOffers
from .foldstate import (
    _DICTS,
    _KIND_DICTS,
    _MOVERS,
    _REASSIGNED,
    LAZY_DICTS,
    CKey,
    ColdStore,
    LazyDict,
    OfferSource,
    Source,
    _Merged,
    _Offers,
    _Ordered,
    _Part,
    _Rating,
    _Settle,
    ckey,
)
from .lease import Lease
from .market import Market
from .records import Auction, PartyLog, RatingRecord

__all__ = ["COLD_AFTER_MS", "CKey", "ColdStore", "FoldedMarket", "IncrementalMarket",
           "OfferSource", "Source", "ckey"]

# A partition whose latest event is this much older than the latest event anywhere
# (and whose events are evicted) goes to the cold store, if the engine has one.
COLD_AFTER_MS = 3_600_000


class _PartMarket(Market):
    """One partition's fold; what it reads from / gives to other partitions goes to
    the engine's shared indexes and is recorded for dependency tracking."""

    def __init__(self, engine: IncrementalMarket, part: _Part) -> None:
        super().__init__(engine.policy)
        self._engine = engine
        self._part = part

    def _ppm(self, key: bytes, role: str, as_of_ms: int) -> int:
        assert self._last is not None
        self._engine._read_rep(self._part, key, role, as_of_ms, self._last)
        return self._engine.rep.ppm(key, role, as_of_ms)

    def _rater_settled(self, key: bytes, at_ms: int) -> int:
        assert self._last is not None
        return self._engine._read_settled(self._part, key, self._last, at_ms)

    def _accept_rating(self, r: RatingRecord) -> None:
        assert self._last is not None
        self._engine.rep.insert(r.subject, r.role, r.ts_ms, r.satisfied, r.score, r.weight)
        self._part.out_r[self._last] = (r.subject, r.role, r.satisfied, r.score, r.weight)

    def _settle(self, lease: Lease) -> None:
        assert self._last is not None
        parties = tuple(sorted({lease.provider, lease.recipient, *lease.group_members}))
        self._engine._settle_add(parties, self._last, lease.end_ms, lease.id)
        self._part.out_s[self._last] = (parties, lease.end_ms, lease.id)


class FoldedMarket(Market):
    """The merged market `IncrementalMarket` keeps; read it like any `Market`."""

    def __init__(self, engine: IncrementalMarket) -> None:
        super().__init__(engine.policy)
        self.reputation = engine.rep
        self._engine = engine
        if engine._cold is not None:
            for name in LAZY_DICTS:
                setattr(self, name, LazyDict(name))

    def apply(self, ev: Event) -> None:
        raise UsageError("a FoldedMarket is kept by IncrementalMarket; add events there")

    def settled(self, key: bytes, at_ms: int) -> int:
        eng = self._engine
        n = sum(1 for _, end, _ in eng._settles.get(key, ()) if end <= at_ms)
        if eng._cold_parts:
            assert eng._cold is not None
            n += eng._cold.settled(key, None, at_ms)
        return n

    def open_auctions(self, now_ms: int) -> list[Auction]:
        return self._engine._open_auctions(now_ms)

    def leases_of(self, key: bytes) -> list[Lease]:
        eng = self._engine
        sk = eng._ord["leases"].sk
        ents = [(sk(k), k) for k in eng._leases_of.get(key, ())]
        if eng._cold_parts:
            assert eng._cold is not None
            ents += eng._cold.leases(key)
        return [self.leases[k] for _, k in sorted(ents)]

    def party_log(self, key: bytes) -> PartyLog:
        return self._engine._party_log(key)


class IncrementalMarket(ColdTier, FoldIndexes, FoldOffers):
    """`derive()` kept current under insertions and removals in any order.

    `add(events)` / `remove(ids)` in any order; `market()` brings the merged market up
    to date and returns it, equal to `derive()` over the present events in canonical
    order.

    With a `source`, at most `max_loaded` partitions keep their events and their fold
    in memory (least recently touched first out, after `market()`); an evicted
    partition keeps its event ids, its outputs and its reads, and loads its events
    from `source` when an event reaches it again, then re-derives. Memory then follows
    the active auctions, not the history; results do not change. With a `cold`
    store too, an evicted auction `cold_after_ms` older than the latest event moves
    its bookkeeping and merged entries there (`foldcold.ColdTier`). The indexes
    readers ask are kept by `foldidx.FoldIndexes`, the offers by
    `foldoffers.FoldOffers`."""

    def __init__(self, policy: Policy | None = None, *, source: Source | None = None,
                 offers: OfferSource | None = None, max_loaded: int = 4096,
                 cold: ColdStore | None = None, cold_after_ms: int | None = None) -> None:
        if max_loaded < 1:
            raise UsageError("max_loaded must be >= 1")
        if cold is not None and source is None:
            raise UsageError("a cold store needs an event source")
        self._cold = cold
        self._cold_after = COLD_AFTER_MS if cold_after_ms is None else cold_after_ms
        self._cool_q: list[tuple[int, bytes]] = []  # (top, key) of evicted partitions
        self._cold_parts = self._cold_events = 0
        self._cold_top = 0  # >= the latest ts_ms of any cold partition's events
        self.policy = policy or Policy()
        self.rep = FoldReputation(self.policy)
        self._source = source
        self._offer_source = offers
        self._offers: dict[bytes, _Offers] = {}  # provider -> its present offers
        self._offer_of: dict[bytes, bytes] = {}  # id of a kept offer -> provider
        self._max_loaded = max_loaded
        self._loaded: OrderedDict[bytes, None] = OrderedDict()  # LRU, with a source
        self._part_of: dict[bytes, bytes] = {}  # present event id -> partition key
        # (kind, ref) of present commits, awards and subcontracts: what routing reads
        self._movers: dict[bytes, tuple[str, bytes | None]] = {}
        self._parts: dict[bytes, _Part] = {}
        self._settles: dict[bytes, list[tuple[CKey, int, bytes]]] = {}  # party -> by key
        self._rep_reads: dict[tuple[bytes, str], list[tuple[int, CKey, bytes]]] = {}
        self._set_reads: dict[bytes, list[tuple[CKey, int, bytes]]] = {}
        self._queue: list[tuple[CKey, bytes]] = []
        self._now = 0  # the latest ts_ms of any present event (the fold's now_ms)
        self._now_stale = False  # an event at _now was removed
        self.merged: FoldedMarket = FoldedMarket(self)
        m = self.merged
        self._ord = {name: _Ordered(getattr(m, name)) for name in _DICTS}
        self._ign = _Merged(m.ignored)
        self._evd = _Merged(m.evidence)
        # Indexes for readers that run often (the provider agent, queries): auctions by
        # deadline, kept from the earliest time asked for on (`_open_from`), and the
        # leases of each party (provider, recipient, devices, group members).
        self._deadlines: list[tuple[int, bytes]] = []
        self._open_from = -1
        self._leases_of: dict[bytes, list[bytes]] = {}
        self._logs: dict[bytes, PartyLog] = {}  # parties a reader follows (party_log)
        self._ord["auctions"].watch = self._watch_auction
        self._ord["leases"].watch = self._watch_lease
        self._ord["subcontracts"].watch = self._watch_subcontract
        self.applied = 0  # events folded (counting re-folds)
        self.rederived = 0  # partitions re-derived from their first event
        self.loads = 0  # evicted partitions loaded back from the source
        self.attach_cold(cold)
        self.thaws = 0  # cold partitions taken back from the cold store

    # ------------------------------------------------------------ input

    def add(self, events: list[Event]) -> int:
        """Include events (duplicates are ignored); returns how many were new."""
        n = 0
        for ev in sorted(events, key=ckey):
            if ev.kind == "offer":
                n += self._add_offer(ev)
                self._now = max(self._now, ev.ts_ms)
                continue
            pk = self._route(ev)
            # A present event is in the partition it routes to; a request's partition
            # (its key) holds the request itself, so a later one cannot be cold.
            if self._cold is not None and pk not in self._parts and \
                    (ev.kind != "request" or ev.ts_ms <= self._cold_top):
                self._thaw(pk)
            if ev.id in self._part_of:
                continue
            n += 1
            if ev.kind in _MOVERS:
                self._movers[ev.id] = (ev.kind, ev.ref)
            if ev.ts_ms > self._now:
                self._now = ev.ts_ms
            self._place(ev, pk, thawed=True)
            if ev.kind in _MOVERS and ev.id in self._parts:
                self._reroute(self._parts[ev.id])  # events that waited for this one
        return n

    def remove(self, ids: list[bytes]) -> None:
        """Exclude events (a fork proof excludes an author's events from a seq on)."""
        for i in ids:
            if self._cold is not None and i not in self._part_of:
                self._thaw_event(i)
            pk = self._part_of.pop(i, None)
            if pk is None:
                if i in self._offer_of:
                    self._remove_offer(i)
                continue
            self._movers.pop(i, None)
            p = self._parts[pk]
            self._load(p)
            j = next(j for j, (_, e) in enumerate(p.evs) if e.id == i)
            ck, ev = p.evs.pop(j)
            if ev.ts_ms == p.top:
                p.top = max((k[0] for k, _ in p.evs), default=0)
            if ev.ts_ms == self._now:
                self._now_stale = True
            self._dirty(p, ck, full=True)
            if ev.kind in _MOVERS:
                self._reroute(p)  # events routed through it wait for it again

    def market(self) -> FoldedMarket:
        """The merged market over the present events (folds whatever is pending)."""
        q = self._queue
        while q:
            ck, pk = heapq.heappop(q)
            p = self._parts.get(pk)
            if p is not None and p.dirty == ck:
                self._process(p)
        if self._source is not None:
            self._evict()
        for o in self._ord.values():
            o.fix()
        if self._now_stale:  # rare (forks): one int per partition
            self._now = max(max((p.top for p in self._parts.values()), default=0),
                            max((o.last[0][0] for o in self._offers.values()), default=0),
                            self._cold.max_top() if self._cold is not None else 0)
            self._now_stale = False
        if self._cold is not None:
            self._cool()
        self.merged.now_ms = self._now
        return self.merged

    def partitions(self) -> int:
        return len(self._parts) + self._cold_parts

    def loaded(self) -> int:
        """Partitions whose events and fold are in memory."""
        return len(self._loaded) if self._source is not None else len(self._parts)

    def __contains__(self, event_id: bytes) -> bool:
        """Whether an event is present (of offers: only those the engine keeps)."""
        if self._cold is not None and event_id not in self._part_of:
            self._thaw_event(event_id)
        return event_id in self._part_of or event_id in self._offer_of

    def __len__(self) -> int:
        """Present events in partitions, plus the offers the engine keeps."""
        return len(self._part_of) + self._cold_events + len(self._offer_of)

    # ------------------------------------------------------------ eviction

    def _load(self, p: _Part) -> None:
        """Make the partition's events present in memory, and note it as used."""
        if self._source is None:
            return
        if p.ids is not None:
            evs = self._source(p.ids)
            if [e.id for e in evs] != p.ids:
                raise UsageError("the event source returned other events than asked for")
            p.evs = [(ckey(e), e) for e in evs]  # ids were kept in the sorted order
            p.ids = None
            self.loads += 1
        self._loaded[p.key] = None
        self._loaded.move_to_end(p.key)

    def _evict(self) -> None:
        """Drop the least recently used clean partitions' events and folds."""
        lru = self._loaded
        while len(lru) > self._max_loaded:
            pk, _ = lru.popitem(last=False)
            p = self._parts.get(pk)
            if p is None or p.ids is not None:
                continue
            assert p.dirty is None  # the queue is empty when market() evicts
            p.ids = [e.id for _, e in p.evs]
            p.evs = []
            p.pm = None  # the next event here re-derives from the loaded events
            p.seen = {}  # counts of pm's dicts: a re-derivation starts them afresh
            p.reads_rep, p.reads_set = tuple(p.reads_rep), tuple(p.reads_set)
            if self._cold is not None:
                heapq.heappush(self._cool_q, (p.top, pk))

    # ------------------------------------------------------------ routing

    def _route(self, ev: Event) -> bytes:
        """The key of the partition `ev` folds in (see the module docstring)."""
        kind = ev.kind
        if kind == "request":
            return ev.id
        ref = ev.ref
        assert ref is not None
        if kind in ("bid", "commit", "pledge", "award"):
            return ref
        t = self._mover(ref)  # other targets route nothing through them
        if t is None:
            return ref
        t_kind, t_ref = t
        if kind == "reveal":
            return t_ref if t_kind == "commit" and t_ref is not None else ref
        if t_kind == "award" and t_ref is not None:
            return t_ref
        if t_kind == "subcontract" and kind == "rating" and t_ref is not None:
            a = self._mover(t_ref)
            return a[1] if a is not None and a[0] == "award" and a[1] else t_ref
        return ref

    def _place(self, ev: Event, pk: bytes, thawed: bool = False) -> None:
        p = self._parts.get(pk)
        if p is None and self._cold is not None and not thawed:
            p = self._thaw(pk)
        if p is None:
            p = self._parts[pk] = _Part(pk)
        self._load(p)
        ck = ckey(ev)
        i = bisect_left(p.evs, ck, key=lambda e: e[0])
        p.evs.insert(i, (ck, ev))
        if ev.ts_ms > p.top:
            p.top = ev.ts_ms
        self._part_of[ev.id] = pk
        if p.dirty is None and i == p.applied and (p.pm is not None or i == 0):
            # In order for a clean partition (the usual case, and the whole first
            # build, which `add` feeds in canonical order): fold it now, so reads of
            # other partitions see outputs in canonical order and rarely go stale.
            if p.pm is None:
                p.pm = _PartMarket(self, p)
            self._apply_tail(p)
        else:
            self._dirty(p, ck, full=i < p.applied)

    def _reroute(self, p: _Part) -> None:
        self._load(p)
        stay = []
        moved: list[Event] = []
        for ck, ev in p.evs:
            if self._route(ev) == p.key:
                stay.append((ck, ev))
            else:
                moved.append(ev)
        if not moved:
            return
        p.evs = stay
        p.top = max((k[0] for k, _ in stay), default=0)
        self._dirty(p, ckey(moved[0]), full=True)
        for ev in moved:
            self._place(ev, self._route(ev))

    def _dirty(self, p: _Part, ck: CKey, full: bool = False) -> None:
        if full:
            p.full = True
        if p.dirty is None or ck < p.dirty:
            p.dirty = ck
            heapq.heappush(self._queue, (ck, p.key))

    # ------------------------------------------------------------ folding one partition

    def _process(self, p: _Part) -> None:
        p.dirty = None
        self._load(p)
        if p.full or p.pm is None:
            self._rederive(p)
        else:
            self._apply_tail(p)
        if not p.evs:
            del self._parts[p.key]
            self._loaded.pop(p.key, None)

    def _apply_tail(self, p: _Part) -> None:
        """Fold the partition's events after those already folded (all in order)."""
        pm = p.pm
        assert pm is not None
        n_r, n_s = len(p.out_r), len(p.out_s)
        for ck, ev in p.evs[p.applied:]:
            pm.apply(ev)
            self._link(p, ck, ev.kind)
        self.applied += len(p.evs) - p.applied
        p.applied = len(p.evs)
        self._propagate(p, list(islice(p.out_r.items(), n_r, None)),
                        list(islice(p.out_s.items(), n_s, None)))

    def _rederive(self, p: _Part) -> None:
        # Dict keys stay linked through the re-fold (most come back at the same place);
        # those it no longer produces are removed after it.
        old_keys = p.linked
        self._unlink(p, dicts=False)
        old_r, old_s = p.out_r, p.out_s
        for ck, (subj, role, sat, score, weight) in old_r.items():
            self.rep.remove(subj, role, ck[0], sat, score, weight)
        for ck, (parties, _, _) in old_s.items():
            self._settle_remove(parties, ck)
        for sr in p.reads_rep:
            self._unread(self._rep_reads[(sr[0], sr[1])], (sr[2], sr[3], p.key))
        for ss in p.reads_set:
            self._unread(self._set_reads[ss[0]], (ss[1], ss[2], p.key))
        p.reads_rep, p.reads_set = set(), set()
        p.out_r, p.out_s = {}, {}
        p.full = False
        pm = p.pm = _PartMarket(self, p)
        for ck, ev in p.evs:
            pm.apply(ev)
            self._link(p, ck, ev.kind)
        for name, keys in old_keys.items():
            now = set(p.linked.get(name, ()))
            for k in keys:
                if k not in now:
                    self._ord[name].remove(k)
        self.applied += len(p.evs)
        self.rederived += 1
        p.applied = len(p.evs)
        ch_r = [(k, v) for k, v in p.out_r.items() if old_r.get(k) != v]
        ch_r += [(k, v) for k, v in old_r.items() if p.out_r.get(k) != v]
        ch_s = [(k, v) for k, v in p.out_s.items() if old_s.get(k) != v]
        ch_s += [(k, v) for k, v in old_s.items() if p.out_s.get(k) != v]
        self._propagate(p, ch_r, ch_s)

    @staticmethod
    def _unread(lst: list[Any], ent: tuple[Any, ...]) -> None:
        i = bisect_left(lst, ent)
        if i < len(lst) and lst[i] == ent:
            del lst[i]

    def _propagate(self, p: _Part, ratings: list[tuple[CKey, _Rating]],
                   settles: list[tuple[CKey, _Settle]]) -> None:
        """Re-derive the other partitions whose recorded reads a changed output affects
        (cold ones are taken back from the store first)."""
        cold = self._cold
        hits: list[tuple[CKey, bytes]] = []
        for ck, (subj, role, *_) in ratings:
            reads = self._rep_reads.get((subj, role), [])
            hits += [(rck, pk) for _as_of, rck, pk in reads[bisect_left(reads, (ck[0],)):]]
            if cold is not None and ck[0] <= self._cold_top:  # reads as of <= read at
                hits += cold.rep_readers(subj, role, ck[0])
        for ck, (parties, end, _) in settles:
            for party in parties:
                reads2 = self._set_reads.get(party, [])
                hits += [(rck, pk) for rck, ts, pk in
                         reads2[bisect_right(reads2, ck, key=lambda e: e[0]):] if ts >= end]
                if cold is not None and ck[0] <= self._cold_top:
                    hits += cold.set_readers(party, ck, end)
        for rck, pk in hits:
            if pk != p.key:
                q = self._parts.get(pk)
                if q is None:
                    q = self._thaw(pk)
                    assert q is not None, "a recorded reader is in memory or in the store"
                self._dirty(q, rck, full=True)

    # ------------------------------------------------------------ merged market

    def _link(self, p: _Part, ck: CKey, kind: str) -> None:
        """Put what folding the event at `ck` added to the partition into the merged
        market (new keys at the position a full fold gives them; shared objects)."""
        pm = p.pm
        assert pm is not None
        for name in _KIND_DICTS.get(kind, _DICTS):
            src: dict[Any, Any] = getattr(pm, name)
            n = p.seen.get(name, 0)
            if len(src) > n:
                o = self._ord[name]
                got = p.linked.setdefault(name, [])
                for k in reversed(list(islice(reversed(src), len(src) - n))):
                    o.put(k, ck, src[k])
                    got.append(k)
                p.seen[name] = len(src)
            if name in _REASSIGNED:
                d = self._ord[name].d
                for k, v in src.items():
                    d[k] = v
        for src_l, mine, merged in ((pm.ignored, p.ign, self._ign),
                                    (pm.evidence, p.evd, self._evd)):
            for i in range(len(mine), len(src_l)):
                sk = (ck, i, p.key)
                merged.put(sk, src_l[i])
                mine.append(sk)

    def _unlink(self, p: _Part, dicts: bool = True) -> None:
        for name, keys in p.linked.items() if dicts else ():
            o = self._ord[name]
            for k in keys:
                o.remove(k)
        for sk in p.ign:
            self._ign.remove(sk)
        for sk in p.evd:
            self._evd.remove(sk)
        p.linked, p.seen, p.ign, p.evd = {}, {}, [], []

    # ------------------------------------------------------------ shared indexes

    def _read_rep(self, p: _Part, key: bytes, role: str, as_of: int, at: CKey) -> None:
        r = (key, role, as_of, at)
        reads = p.reads_rep
        assert isinstance(reads, set)  # only a loaded partition folds
        if r not in reads:
            reads.add(r)
            insort(self._rep_reads.setdefault((key, role), []), (as_of, at, p.key))

    def _read_settled(self, p: _Part, key: bytes, at: CKey, at_ms: int) -> int:
        """Leases of `key` settled by events before `at` that ended by `at_ms`, counted
        up to the rater cap (all a weight needs)."""
        r = (key, at, at_ms)
        reads = p.reads_set
        assert isinstance(reads, set)  # only a loaded partition folds
        if r not in reads:
            reads.add(r)
            insort(self._set_reads.setdefault(key, []), (at, at_ms, p.key))
        cap = self.policy.rater_cap
        n = 0
        for sk, end, _ in self._settles.get(key, ()):
            if n >= cap or sk >= at:
                break
            if end <= at_ms:
                n += 1
        if n < cap and self._cold_parts:  # a query per rating folded, with a cold tier
            assert self._cold is not None
            n += self._cold.settled(key, at, at_ms, cap - n)
        return n
