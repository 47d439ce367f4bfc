"""MarketView stays equal to a fresh derivation whatever order events land in."""

from __future__ import annotations

import random
from pathlib import Path

from node.auction import derive, views
from node.events import Bid, Members, Request, sign_event
from node.keys import Identity
from node.ledger import Ledger
from node.marketview import LiveMarket, MarketView
from node.testing import NETWORK, seed


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
