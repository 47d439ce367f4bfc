"""IncrementalMarket == derive() over the canonical order of the present events, for
any delivery order, back-dated events, removals (forks) and cross-auction effects."""

from __future__ import annotations

import random

import pytest
from fold_helpers import history, snapshot

from node.auction import derive
from node.auction.fold import IncrementalMarket, ckey
from node.auction.foldstate import LAZY_DICTS
from node.events import Event
from node.marketcold import SqliteCold


def _canon(evs: list[Event]) -> list[Event]:
    return sorted(evs, key=ckey)


def _engine(evs: list[Event], evict: bool | str,
            present: dict[bytes, Event] | None = None) -> IncrementalMarket:
    """A plain engine, or one that keeps 2 partitions loaded and loads the others'
    events back by id (from the whole history, as a ledger would), and keeps only the
    first and latest offer of each provider, asking `present` (the events the caller
    has added and not removed, as a ledger with its fork table would) for others.
    `evict="cold"`: also a cold store (a real SQLite file) that takes every evicted
    auction whose events are older than the latest one."""
    if not evict:
        return IncrementalMarket()
    by_id = {e.id: e for e in evs}
    have = present if present is not None else by_id

    def offers(author: bytes, latest: bool) -> Event | None:
        mine = [e for e in have.values() if e.author == author and e.kind == "offer"]
        return (max if latest else min)(mine, key=ckey, default=None)

    cold = SqliteCold() if evict == "cold" else None
    return IncrementalMarket(source=lambda ids: [by_id[i] for i in ids if i in by_id],
                             offers=offers, max_loaded=2, cold=cold, cold_after_ms=0)


@pytest.mark.parametrize("evict", [False, True, "cold"])
@pytest.mark.parametrize("case", range(12))
def test_any_delivery_order_gives_the_canonical_fold(case: int, evict: bool | str) -> None:
    rnd = random.Random(case)
    evs = history(rnd, n_auctions=8 + case % 5)
    order = list(evs)
    if case % 3 == 0:
        rnd.shuffle(order)  # anything goes
    elif case % 3 == 1:  # mostly in order, a few back-dated stragglers
        late = rnd.sample(order, len(order) // 8)
        order = [e for e in order if e not in late] + late
    else:
        order.reverse()
    present: dict[bytes, Event] = {}
    eng = _engine(evs, evict, present)
    seen: list[Event] = []
    i = 0
    while i < len(order):
        n = rnd.choice((1, 1, 2, 5, 17))
        batch = order[i:i + n]
        i += n
        eng.add(batch)
        seen += batch
        present.update((e.id, e) for e in batch)
        if rnd.random() < 0.3 or i >= len(order):
            assert snapshot(eng.market()) == snapshot(derive(_canon(seen)))


@pytest.mark.parametrize("evict", [False, True, "cold"])
@pytest.mark.parametrize("case", range(6))
def test_removals_and_readds_give_the_canonical_fold(case: int, evict: bool | str) -> None:
    rnd = random.Random(100 + case)
    evs = history(rnd, n_auctions=10)
    present = {e.id: e for e in evs}
    eng = _engine(evs, evict, present)
    eng.add(evs)
    eng.market()
    for _ in range(6):
        author = rnd.choice(evs).author  # a fork excludes an author from a seq on
        cut = rnd.randint(1, 6)
        gone = [e.id for e in evs if e.author == author and e.seq >= cut]
        for g in gone:  # the source no longer has them when the engine asks
            present.pop(g, None)
        eng.remove(gone)
        assert snapshot(eng.market()) == snapshot(derive(_canon(list(present.values()))))
        back = rnd.sample(gone, len(gone) // 2)
        eng.add([e for e in evs if e.id in back])
        present.update({e.id: e for e in evs if e.id in back})
    assert snapshot(eng.market()) == snapshot(derive(_canon(list(present.values()))))


def test_back_dated_event_rederives_its_auction_only() -> None:
    rnd = random.Random(5)
    evs = history(rnd, n_auctions=30)
    late = next(e for e in reversed(evs[: len(evs) // 2]) if e.kind == "bid")
    eng = IncrementalMarket()
    eng.add([e for e in evs if e is not late])
    eng.market()
    before = eng.applied
    eng.add([late])
    m = eng.market()
    assert snapshot(m) == snapshot(derive(evs))
    assert eng.applied - before < len(evs) // 4  # not a re-fold of everything


def test_evicted_partitions_load_back_and_memory_follows_the_active_ones() -> None:
    rnd = random.Random(9)
    evs = history(rnd, n_auctions=30)
    eng = _engine(evs, evict=True)
    half = len(evs) // 2
    for i in range(0, half, 7):  # in order, a few at a time, as a live node sees them
        eng.add(evs[i:i + 7])
        eng.market()
        assert eng.loaded() <= 2
    late = [e for e in evs[half:]] + [evs[3]]  # the rest, and one already present
    rnd.shuffle(late)
    eng.add(late)
    assert snapshot(eng.market()) == snapshot(derive(evs))
    assert eng.loads > 0 and eng.loaded() <= 2 < eng.partitions()
    n_offers = sum(e.kind == "offer" for e in evs)
    assert len(evs) - n_offers < len(eng) < len(evs) and evs[0].id in eng


def test_a_republished_offer_costs_nothing_per_offer() -> None:
    """With an offer source, the engine keeps a provider's first and latest offer only;
    removing the latest (a fork) brings back the one before it, from the source."""
    from node.events import Offer, ServiceOffer, sign_event

    seed = b"p" * 32
    evs, prev = [], None
    for seq in range(1, 51):
        ev = sign_event(seed, seq, prev, 1000 + seq,
                        Offer(services=(ServiceOffer(name="zstd", price=seq, capacity=1),),
                              currency="EUR", addrs=()), "t")
        evs.append(ev)
        prev = ev.id
    present = {e.id: e for e in evs}
    eng = _engine(evs, True, present)
    for ev in evs:
        eng.add([ev])
        eng.market()
    assert len(eng) == 2 and snapshot(eng.market()) == snapshot(derive(evs))
    for e in evs[40:]:
        del present[e.id]
    eng.remove([e.id for e in evs[40:]])
    m = eng.market()
    assert snapshot(m) == snapshot(derive(evs[:40])) and m.now_ms == evs[39].ts_ms
    assert not m.ignored  # a superseded offer is not an ignored event


def test_a_source_that_returns_other_events_is_refused() -> None:
    from node.errors import UsageError

    evs = history(random.Random(4), n_auctions=3)
    eng = IncrementalMarket(source=lambda ids: [], max_loaded=1)
    eng.add(evs)
    eng.market()
    with pytest.raises(UsageError):
        eng.remove([next(e.id for e in evs if e.kind == "request")])


def test_cold_partitions_leave_memory_and_late_events_and_forks_bring_them_back() -> None:
    """Closed auctions go to the cold store (their bookkeeping leaves memory); a late
    event or a fork reaching one takes it back, and the fold stays the canonical one."""
    rnd = random.Random(21)
    evs = history(rnd, n_auctions=30)
    late = [e for e in evs[: len(evs) // 2] if e.kind in ("bid", "rating")][::3]
    present = {e.id: e for e in evs if e not in late}
    eng = _engine(evs, "cold", present)
    for i in range(0, len(evs), 5):  # in order, as a live node sees them
        eng.add([e for e in evs[i:i + 5] if e.id in present])
        eng.market()
    assert eng.cold() > eng.partitions() // 2 and eng.loaded() <= 2
    hot_ids = len(eng._part_of)
    assert hot_ids < len(present) // 2  # cold partitions' event ids are not in memory
    _only_hot_in_memory(eng)
    assert snapshot(eng.market()) == snapshot(derive(_canon(list(present.values()))))
    thaws = eng.thaws
    eng.add(late)  # back-dated events into closed auctions
    present.update((e.id, e) for e in late)
    assert snapshot(eng.market()) == snapshot(derive(_canon(list(present.values()))))
    assert eng.thaws > thaws
    author = evs[3].author  # a fork proof excludes an early author's events
    gone = [e.id for e in evs if e.author == author and e.seq >= 2]
    for g in gone:
        present.pop(g, None)
    eng.remove(gone)
    assert snapshot(eng.market()) == snapshot(derive(_canon(list(present.values()))))
    assert len(eng) == len([e for e in present.values() if e.kind != "offer"]) + \
        len(eng._offer_of)
    assert evs[0].id in eng or evs[0].id not in present


def test_a_lazy_dict_merges_its_hot_entries_with_the_stores_keys_in_order() -> None:
    """The dict's storage holds the hot entries only; the cold ones are rows of the
    store's key table, their values in their partition's pickled values. Every read
    sees both, in canonical order, also while the store is held for a snapshot."""
    import pickle

    from node.auction.foldstate import SK, ColdIdx, ColdValues, LazyDict

    a = b"a" * 32
    cold = SqliteCold()
    d: LazyDict[bytes, int] = LazyDict("awards")
    for k, sk, v in ((b"h1", (1, a, 1), 10), (b"h5", (5, a, 5), 50)):
        dict.__setitem__(d, k, v)
        d.pos[k] = sk

    def put(pk: bytes, vals: dict[bytes, tuple[int, int]]) -> None:
        sks = {k: (t, a, t) for k, (t, _) in vals.items()}
        blob = pickle.dumps({"awards": {k: v for k, (_, v) in vals.items()},
                             SK: {"awards": sks}})
        keys = tuple((d.idx, k, sk) for k, sk in sks.items())
        cold.put(pk, 9, b"s" + pk, blob, (), (), ColdIdx(None, keys=keys))
        d.ncold += len(vals)

    put(b"p", {b"c3": (3, 30), b"c7": (7, 70)})
    d.load = ColdValues(cold)
    real = {b"h1": 10, b"c3": 30, b"h5": 50, b"c7": 70}

    def same(want: dict[bytes, int]) -> None:
        assert list(d) == d.keys() == list(want) and d.items() == list(want.items())
        assert d.values() == list(want.values()) and list(reversed(d)) == list(want)[::-1]
        assert len(d) == len(want) and d == want and (d != want) is False and d.copy() == want
        for k, v in want.items():
            assert k in d and d[k] == v and d.get(k) == v
        assert b"zz" not in d and d.get(b"zz", 7) == 7 and 5 not in d  # type: ignore[comparison-overlap]
        with pytest.raises(KeyError):
            d[b"zz"]

    same(real)
    assert dict.__len__(d) == 2  # the cold keys are not in the dict
    cold.hold()  # a snapshot's child reads the file: takes and puts stay in memory
    assert cold.take(b"p") == b"sp"
    d.ncold -= 2
    d.load.forget(b"p")
    same({b"h1": 10, b"h5": 50})
    put(b"q", {b"c3": (3, 31), b"c9": (9, 90)})
    same({b"h1": 10, b"c3": 31, b"h5": 50, b"c9": 90})
    cold.release()
    same({b"h1": 10, b"c3": 31, b"h5": 50, b"c9": 90})
    assert cold.take(b"q") == b"sq" and cold.key(d.idx, b"c3") is None
    d.ncold -= 2
    same({b"h1": 10, b"h5": 50})
    cold.close()


def _only_hot_in_memory(eng: IncrementalMarket) -> None:
    """The engine's in-memory indexes hold its hot partitions' entries only (those of
    cold ones are in the store's tables)."""
    hot = eng._parts
    assert all(eng._part_of.get(i) in hot for i in eng._movers)
    assert all(k in hot for _, k in eng._deadlines)
    n_settles = sum(len(parties) for p in hot.values() for parties, _, _ in p.out_s.values())
    assert sum(len(v) for v in eng._settles.values()) == n_settles
    hot_leases = {k for p in hot.values() for k in p.linked.get("leases", ())}
    assert {k for v in eng._leases_of.values() for k in v} <= hot_leases
    n_ratings = sum(len(p.out_r) for p in hot.values())
    assert sum(len(h.ts) for h in eng.rep._hist.values()) == n_ratings
    for name in LAZY_DICTS:  # the merged dicts' own storage: hot entries only
        d = eng._ord[name].d
        assert set(dict.keys(d)) == {k for p in hot.values() for k in p.linked.get(name, ())}
        assert set(eng._ord[name].pos) == set(dict.keys(d))


@pytest.mark.parametrize("case", range(4))
def test_cold_indexes_leave_memory_and_readers_answer_the_same(case: int) -> None:
    """With every evicted auction cold, the settlement index, routing's movers, the
    leases of each party, the deadlines and reputation's ratings of cold auctions are
    in the store only; every reader answers as `derive()` does, and late events
    routed through a cold award (payments, ratings) find their auction."""
    rnd = random.Random(300 + case)
    evs = history(rnd, n_auctions=25)
    awards = {e.id for e in evs if e.kind in ("award", "subcontract")}
    late = [e for e in evs[: len(evs) // 2]
            if e.kind in ("payment", "rating", "usage") and e.ref in awards][::2]
    present = {e.id: e for e in evs if e not in late}
    eng = _engine(evs, "cold", present)
    for i in range(0, len(evs), 4):
        eng.add([e for e in evs[i:i + 4] if e.id in present])
        eng.market()
    assert eng.cold() > 0
    _only_hot_in_memory(eng)
    assert snapshot(eng.market()) == snapshot(derive(_canon(list(present.values()))))
    thaws = eng.thaws
    for e in late:  # one at a time: each routes through a cold award
        eng.add([e])
        present[e.id] = e
        m = eng.market()
        _only_hot_in_memory(eng)
    assert eng.thaws > thaws
    assert snapshot(m) == snapshot(derive(_canon(list(present.values()))))
