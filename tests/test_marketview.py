"""MarketView stays equal to a fresh derivation whatever order events land in."""

from __future__ import annotations

import random
from pathlib import Path

from node.auction import derive, views
from node.events import Bid, Members, Request
from node.keys import Identity
from node.ledger import Ledger
from node.marketview import MarketView
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
        assert view.refolds >= 1  # shuffled arrival forced at least one re-fold
