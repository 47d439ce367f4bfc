"""MarketView stays equal to a fresh derivation whatever order events land in."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from testkit import NETWORK, seed

from node.auction import derive, views
from node.events import Bid, Members, Request, sign_event
from node.keys import Identity
from node.ledger import Ledger
from node.marketview import LiveMarket, MarketView


def test_view_matches_fresh_derivation(tmp_path: Path) -> None:
    rec = Identity.from_seed(seed(1))
    provs = [Identity.from_seed(seed(10 + i)) for i in range(4)]
    with Ledger(tmp_path / "src.db", network=NETWORK) as src:
        req = src.publish(rec, Request(
            service="bandwidth", chain=(), start_ms=0, duration_ms=60_000, max_rate_bps=None,
            min_rate_bps=None, members=Members(), reserve=100, currency="EUR", close_ms=10_000,
            reveal_ms=10_000, rule="lowest", sealed=False, group=False), 1000)
        for i, p in enumerate(provs):
            for k in range(3):
                src.publish(p, Bid(request=req.id, price=50 - i - k), 2000 + 100 * k - 10 * i)
        wires = list(src.iter_wires())
    rnd = random.Random(7)
    rnd.shuffle(wires)
    with Ledger(tmp_path / "dst.db", network=NETWORK) as dst:
        view = MarketView(dst)
        for i in range(0, len(wires), 3):
            for res in dst.append_many(wires[i:i + 3]):
                view.note(res.accepted)
            view.market()
        got = views.market_json(view.market())
        assert got == views.market_json(derive(dst.iter_canonical()))
        assert view.engine.rederived >= 1  # shuffled arrival re-derived an auction
        assert view.refolds == 0  # ... never the whole market


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def _request(close_ms: int) -> Request:
    return Request(
        service="bandwidth", chain=(), start_ms=close_ms + 1000, duration_ms=60_000,
        max_rate_bps=None, min_rate_bps=None, members=Members(), reserve=100,
        currency="EUR", close_ms=close_ms, reveal_ms=close_ms, rule="lowest", sealed=False,
        group=False)


def test_future_events_are_held_until_due(tmp_path: Path) -> None:
    """Events dated beyond now + skew are stored but left out of the market until the
    clock reaches them; then the market is exactly derive() over the due events."""
    rec = Identity.from_seed(seed(1))
    far = Identity.from_seed(seed(2))
    provs = [Identity.from_seed(seed(10 + i)) for i in range(3)]
    clock = Clock(1_000_000)
    with Ledger(tmp_path / "l.db", network=NETWORK) as led:
        view = LiveMarket(led, skew_ms=5_000, clock=clock)
        req = led.publish(rec, _request(1_100_000), 1_000_000)
        future = led.publish(far, Bid(request=req.id, price=1), (1 << 53) - 1)
        soon = led.publish(provs[0], Bid(request=req.id, price=40), 1_050_000)
        led.publish(provs[1], Bid(request=req.id, price=30), 1_002_000)
        m = view.market()
        assert future.id not in m.auctions[req.id].bids
        assert soon.id not in m.auctions[req.id].bids  # 50 s ahead: held too
        assert len(m.auctions[req.id].bids) == 1
        assert m.now_ms == 1_002_000
        assert view.view.held() == 2
        due = [e for e in led.iter_canonical() if e.ts_ms <= clock.ms + 5_000]
        assert views.market_json(m) == views.market_json(derive(due))
        clock.ms = 1_046_000  # soon is due now
        m = view.market()
        assert soon.id in m.auctions[req.id].bids and future.id not in m.auctions[req.id].bids
        # an ordinary new event still costs one event, the far-future one changes nothing
        before = view.view.engine.applied
        led.publish(provs[2], Bid(request=req.id, price=20), 1_050_500)
        m = view.market()
        assert view.view.engine.applied - before == 1
        due = [e for e in led.iter_canonical() if e.ts_ms <= clock.ms + 5_000]
        assert views.market_json(m) == views.market_json(derive(due))
        assert view.view.held() == 1
        # a fresh view over the same ledger at the same time agrees (held from the start)
        fresh = MarketView(led, skew_ms=5_000, clock=clock)
        assert views.market_json(fresh.market()) == views.market_json(m)


def test_fork_proof_removes_the_authors_events(tmp_path: Path) -> None:
    rec = Identity.from_seed(seed(1))
    p = Identity.from_seed(seed(10))
    with Ledger(tmp_path / "l.db", network=NETWORK) as led:
        view = LiveMarket(led)
        req = led.publish(rec, _request(10_000), 1000)
        b1 = led.publish(p, Bid(request=req.id, price=40), 2000)
        assert b1.id in view.market().auctions[req.id].bids
        other = sign_event(seed(10), 1, None, 2500, Bid(request=req.id, price=1), NETWORK)
        assert led.add_fork_proof(b1.wire, other.wire)
        m = view.market()
        assert b1.id not in m.auctions[req.id].bids
        assert views.market_json(m) == views.market_json(derive(led.iter_canonical()))


def test_random_arrival_and_clock_equal_derive_of_due_events(tmp_path: Path) -> None:
    """Authors' chains interleaved at random, the clock moving in random steps: after
    every step the view equals derive() over the stored events dated <= now + skew."""
    from fold_helpers import NETWORK as HNET
    from fold_helpers import history

    rnd = random.Random(3)
    evs = history(rnd, n_auctions=14)
    chains: dict[bytes, list[bytes]] = {}
    for e in evs:
        chains.setdefault(e.author, []).append(e.wire)
    clock = Clock(0)
    with Ledger(tmp_path / "l.db", network=HNET) as led:
        live = LiveMarket(led, skew_ms=40, clock=clock)
        while chains:
            a = rnd.choice(list(chains))
            n = rnd.randint(1, 4)
            led.append_many(chains[a][:n])
            chains[a] = chains[a][n:]
            if not chains[a]:
                del chains[a]
            clock.ms += rnd.randint(0, 25)
            if rnd.random() < 0.5:
                m = live.market()
                due = [e for e in led.iter_canonical() if e.ts_ms <= clock.ms + 40]
                assert views.market_json(m) == views.market_json(derive(due))
        clock.ms = 1 << 50
        m = live.market()
        assert views.market_json(m) == views.market_json(derive(led.iter_canonical()))


def _history_ledger(led: Ledger, evs: list, upto: int) -> None:
    led.append_many([e.wire for e in evs[:upto]])


@pytest.mark.parametrize("cold_after_ms", [None, 0])
def test_snapshot_restart_equals_a_fresh_build(tmp_path: Path, cold_after_ms: int | None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart from a snapshot folds only what arrived after it (new events, a new
    fork proof, held events now due) and ends equal to a fresh build; with closed
    auctions in the cold store too (cold_after_ms=0: every evicted one)."""
    import os

    from node import marketview
    from node.auction import fold

    if cold_after_ms is not None:
        monkeypatch.setattr(fold, "COLD_AFTER_MS", cold_after_ms)
        monkeypatch.setattr(marketview, "DEFAULT_MAX_LOADED", 2)

    from fold_helpers import NETWORK as HNET
    from fold_helpers import history
    from fold_helpers import snapshot as full_snapshot

    from node.marketview import load_snapshot, save_snapshot, save_snapshot_forked

    evs = history(random.Random(8), n_auctions=12)
    snap = tmp_path / "market.snapshot"
    clock = Clock(max(e.ts_ms for e in evs) - 50)  # the last events are held at first
    with Ledger(tmp_path / "l.db", network=HNET) as led:
        _history_ledger(led, evs, len(evs) * 2 // 3)
        live = LiveMarket(led, skew_ms=10, clock=clock, snapshot=snap)
        assert not live.restored  # no file yet
        live.market()
        save_snapshot(live, snap)
        applied = live.view.engine.applied
        if cold_after_ms is not None:
            assert live.view.engine.cold() > 0
        # after the snapshot: the rest of the history, a fork proof, the clock moves on
        _history_ledger(led, evs, len(evs))
        victim = next(e for e in evs if e.kind == "bid")
        other = sign_event(b"\x00" * 32, 1, None, 1, Bid(request=victim.ref or b"", price=1),
                           HNET)
        assert other.author != victim.author
        clock.ms += 100
        again = LiveMarket(led, skew_ms=10, clock=clock, snapshot=snap)
        assert again.restored and again.view.engine.applied == applied
        fresh = LiveMarket(led, skew_ms=10, clock=clock)
        assert views.market_json(again.market()) == views.market_json(fresh.market())
        assert views.market_json(again.market()) == views.market_json(
            derive(led.iter_canonical()))
        # a forked child writes the same thing, and the parent goes on meanwhile
        pid = save_snapshot_forked(again, snap)
        assert os.waitpid(pid, 0)[1] == 0
        again.view.cold.release()
        third = LiveMarket(led, skew_ms=10, clock=clock, snapshot=snap)
        assert third.restored
        assert views.market_json(third.market()) == views.market_json(fresh.market())
        # every reader, the cold indexes' (leases of a party, settled counts, ratings)
        assert full_snapshot(third.market()) == full_snapshot(fresh.market())
        # other settings, or a damaged file: no snapshot, a build instead
        assert load_snapshot(led, snap, skew_ms=11, clock=clock) is None
        snap.write_bytes(snap.read_bytes()[:-100])
        assert load_snapshot(led, snap, skew_ms=10, clock=clock) is None
        assert not LiveMarket(led, skew_ms=10, clock=clock, snapshot=snap).restored


def test_snapshot_of_another_ledger_is_not_used(tmp_path: Path) -> None:
    from fold_helpers import NETWORK as HNET
    from fold_helpers import history

    from node.marketview import load_snapshot, save_snapshot

    evs = history(random.Random(9), n_auctions=4)
    snap = tmp_path / "market.snapshot"
    with Ledger(tmp_path / "a.db", network=HNET) as a:
        _history_ledger(a, evs, len(evs))
        save_snapshot(LiveMarket(a), snap)
        assert load_snapshot(a, snap) is not None
    with Ledger(tmp_path / "b.db", network=HNET) as b:  # fewer events
        _history_ledger(b, evs, len(evs) // 2)
        assert load_snapshot(b, snap) is None
    others = history(random.Random(10), n_auctions=8)
    with Ledger(tmp_path / "c.db", network=HNET) as c:  # as many, other events
        c.append_many([e.wire for e in others][:len(evs)])
        assert c.count() == len(evs) and load_snapshot(c, snap) is None
    with Ledger(tmp_path / "d.db", network=HNET) as d:  # the same events, another order
        by_author: dict[bytes, list[bytes]] = {}
        for e in evs:
            by_author.setdefault(e.author, []).append(e.wire)
        for wires in reversed(list(by_author.values())):
            d.append_many(wires)
        got = load_snapshot(d, snap)
        assert got is not None
        assert views.market_json(got[0].market()) == views.market_json(
            derive(d.iter_canonical()))


def test_snapshotter_writes_when_due_and_clears_stale_temporaries(tmp_path: Path) -> None:
    import time

    from fold_helpers import NETWORK as HNET
    from fold_helpers import history

    from node.marketview import Snapshotter

    evs = history(random.Random(12), n_auctions=3)
    snap = tmp_path / "market.snapshot"
    stale = tmp_path / "market.snapshot.tmp4242"  # a writer killed with its node
    stale.write_bytes(b"half")
    with Ledger(tmp_path / "l.db", network=HNET) as led:
        live = LiveMarket(led, snapshot=snap)
        s = Snapshotter(live, snap, min_events=5, max_age_s=3600)
        assert not stale.exists()
        assert not s.due()  # nothing stored yet
        led.append_many([e.wire for e in evs[:3]])
        assert s.due()  # events, and no snapshot fits
        s.start()
        assert not s.due()  # one writer at a time
        deadline = time.monotonic() + 120  # the forked writer; generous under load
        while s.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.saves == 1 and s.fits and s.status()["saved_cursor"] == 3
        led.append_many([e.wire for e in evs[3:6]])
        assert not s.due()  # 3 < min_events, and not an hour yet
        led.append_many([e.wire for e in evs[6:]])
        assert s.due()
        assert LiveMarket(led, snapshot=snap).restored


def test_cold_store_file_is_private_and_swept_when_its_process_is_gone(tmp_path: Path) -> None:
    from node.marketcold import SqliteCold

    dead = tmp_path / "bidmesh-cold-999999999-x.db"  # no such process
    dead.write_bytes(b"")
    other = tmp_path / "bidmesh-cold-notapid.db"
    other.write_bytes(b"")
    store = SqliteCold(tmp_path)
    assert not dead.exists() and other.exists() and Path(store.path).exists()
    store.put(b"k" * 32, 5, b"state", b"vals", (), ())
    assert store.take(b"k" * 32) == b"state" and store.take(b"k" * 32) is None
    store.close()
    assert not Path(store.path).exists()


def test_a_views_cold_store_lives_beside_its_ledger(tmp_path: Path) -> None:
    """In the node's data dir, not the temp dir (often a tmpfs: RAM again); an
    in-memory ledger or a directory it may not write falls back to the temp dir."""
    import os
    import tempfile

    from node.marketcold import open_beside

    with Ledger(tmp_path / "ledger.db", network=NETWORK) as led:
        view = MarketView(led)
        assert Path(view.cold.path).parent == tmp_path
        view.cold.close()
        assert not list(tmp_path.glob("bidmesh-cold-*"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # as root every directory is writable
            store = open_beside(ro / "ledger.db")
            assert Path(store.path).parent == Path(tempfile.gettempdir())
            store.close()
    finally:
        ro.chmod(0o700)
    store = open_beside(Path(":memory:"))
    assert Path(store.path).parent == Path(tempfile.gettempdir())
    store.close()


def test_cold_store_held_for_a_snapshot_keeps_its_file_and_catches_up_on_release(
        tmp_path: Path) -> None:
    """While held (a forked child reads the file), takes and puts stay in memory and
    every answer is as if they had been written; release writes them."""
    import io
    import sqlite3

    from node.auction.foldstate import ColdIdx
    from node.errors import UsageError
    from node.marketcold import SqliteCold

    store = SqliteCold(tmp_path)
    at = (5, b"a" * 32, 1)
    store.put(b"A" * 32, 5, b"sA", b"vA", ((b"k", "provider", 3, at),), ((b"k", at, 4),),
              ColdIdx(None, keys=((0, b"kA", at),)))
    store.hold()
    outside = sqlite3.connect(store.path)  # what a child's own connection sees

    def file_pks() -> set[bytes]:
        return {r[0] for r in outside.execute("SELECT pk FROM parts")}

    assert file_pks() == {b"A" * 32}  # committed before the hold
    assert store.rep_readers(b"k", "provider", 3) == [(at, b"A" * 32)]
    assert store.key(0, b"kA") == (at, b"A" * 32)
    assert store.ordered(0) == [(at, b"kA", b"A" * 32)]
    assert store.take(b"A" * 32) == b"sA"
    assert store.take(b"A" * 32) is None and store.values(b"A" * 32) is None
    assert store.rep_readers(b"k", "provider", 0) == []
    assert store.set_readers(b"k", (0, b"", 0), 4) == []
    assert store.key(0, b"kA") is None and store.ordered(0) == []
    at_b = (9, b"b" * 32, 1)
    store.put(b"B" * 32, 9, b"sB", b"vB", (), ((b"k", at_b, 8),),
              ColdIdx(None, keys=((0, b"kB", at_b),)))
    assert store.values(b"B" * 32) == b"vB" and store.max_top() == 9
    assert store.set_readers(b"k", (0, b"", 0), 8) == [(at_b, b"B" * 32)]
    assert store.key(0, b"kB") == (at_b, b"B" * 32) and store.key(1, b"kB") is None
    assert store.ordered(0) == [(at_b, b"kB", b"B" * 32)]
    assert file_pks() == {b"A" * 32}  # the file did not change
    assert [(r[0], r[6].keys) for r in store.rows()] == [(b"B" * 32, ((0, b"kB", at_b),))]
    with pytest.raises(UsageError):  # the file is not the whole store while held
        store.copy_file(io.BytesIO())
    store.release()
    assert file_pks() == {b"B" * 32}
    assert store.ordered(0) == [(at_b, b"kB", b"B" * 32)] and store.key(0, b"kA") is None
    assert outside.execute("SELECT COUNT(*) FROM keys").fetchone()[0] == 1
    assert store.take(b"B" * 32) == b"sB"
    assert store.ordered(0) == [] and store.key(0, b"kB") is None
    outside.close()
    store.close()


def test_cold_store_indexes_answer_through_a_hold_and_a_snapshot(tmp_path: Path) -> None:
    """The cold parts of the engine's indexes (`ColdIdx`): each reader answers from
    the tables, as if held puts and takes were written, and `rows()` gives them back
    for a snapshot."""
    from node.auction.foldstate import ColdIdx
    from node.marketcold import SqliteCold

    pa, pb, party = b"A" * 32, b"B" * 32, b"p" * 32
    at = (5, b"a" * 32, 1)
    ia = ColdIdx(100, movers=((b"w" * 32, "award", pa),), settles=((party, at, 50, b"w" * 32),),
                 leases=((party, at, b"w" * 32),), ratings=((party, "recipient", 60, 21),))
    ib = ColdIdx(300, settles=((party, (9, b"b" * 32, 1), 70, b"x" * 32),),
                 leases=((party, (9, b"b" * 32, 1), b"x" * 32),),
                 ratings=((party, "recipient", 80, 19),))
    store = SqliteCold(tmp_path)

    def answers() -> tuple[object, ...]:
        return (store.mover(b"w" * 32), store.settled(party, None, 60),
                store.settled(party, (9, b"b" * 32, 1), 1000), store.settled(party, None, 1000, 1),
                sorted(store.leases(party)), sorted(store.open_from(200)),
                sorted(store.ratings(party, "recipient")), store.rating_keys(),
                store.max_rating_ts())

    store.put(pa, 5, b"sA", b"vA", (), (), ia)
    assert answers() == (("award", pa), 1, 1, 1, [(at, b"w" * 32)], [], [(60, 21)],
                         {(party, "recipient")}, 60)
    store.hold()
    store.put(pb, 9, b"sB", b"vB", (), (), ib)
    both = (("award", pa), 1, 1, 1, [(at, b"w" * 32), ((9, b"b" * 32, 1), b"x" * 32)], [pb],
            [(60, 21), (80, 19)], {(party, "recipient")}, 80)
    assert answers() == both
    assert {r[0]: r[6] for r in store.rows()} == {pa: ia, pb: ib}
    store.release()
    assert answers() == both
    assert store.take(pa) == b"sA"
    assert answers() == (None, 0, 0, 1, [((9, b"b" * 32, 1), b"x" * 32)], [pb], [(80, 19)],
                         {(party, "recipient")}, 80)
    store.hold()
    store.take(pb)  # taken while held: still in the file, not in the answers
    assert answers() == (None, 0, 0, 0, [], [], [], set(), 0)
    store.release()
    assert answers() == (None, 0, 0, 0, [], [], [], set(), 0)
    store.close()


def test_cold_store_file_gives_back_the_pages_of_partitions_taken_back(tmp_path: Path) -> None:
    """A long-lived node thaws and re-cools partitions: the store's file follows what
    is cold now (incremental vacuum after a commit), not everything that ever was."""
    from node.auction.foldstate import ColdIdx
    from node.marketcold import SqliteCold

    store = SqliteCold(tmp_path)
    blob = b"x" * 3000
    pks = [i.to_bytes(4, "big") * 8 for i in range(2000)]
    for i, pk in enumerate(pks):
        store.put(pk, i, blob, blob, (), (), ColdIdx(i, movers=((pk[::-1], "award", pk),)))
    store.commit()
    full, _ = store.pages()
    for pk in pks[100:]:
        assert store.take(pk) == blob
    store.commit()
    pages, _ = store.pages()
    assert store.vacuums > 0 and pages < full // 4
    page = store.db.execute("PRAGMA page_size").fetchone()[0]
    assert Path(store.path).stat().st_size == pages * page
    assert all(store.values(pk) == blob for pk in pks[:100])
    assert store.mover(pks[5][::-1]) == ("award", pks[5]) and store.mover(pks[500][::-1]) is None
    store.close()
