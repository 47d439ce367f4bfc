"""Provider and recipient decisions (node/agent.py) over a real ledger."""

from __future__ import annotations

from pathlib import Path

from testkit import NETWORK, seed

from node.agent import ProviderPolicy, build_award, provider_actions, sealed_nonce
from node.auction import derive, verify_award
from node.events import Bid, Commit, Members, Offer, Payment, Rating, Request, Reveal, ServiceOffer
from node.keys import Identity
from node.ledger import Ledger

RECIPIENT = Identity.from_seed(seed(100))
PROVIDERS = [Identity.from_seed(seed(i)) for i in range(3)]
PRICES = [7, 5, 9]


def _policy(price: int) -> ProviderPolicy:
    return ProviderPolicy(offers=(ServiceOffer(name="bandwidth", price=price, capacity=1000),))


def _request(sealed: bool, t0: int) -> Request:
    close = t0 + 1000
    return Request(
        service="bandwidth", chain=(), start_ms=close + 3000, duration_ms=3_600_000,
        max_rate_bps=8_000_000, min_rate_bps=1_000, members=Members(max_devices=3),
        reserve=8, currency="EUR", close_ms=close, reveal_ms=close + (1000 if sealed else 0),
        rule="vickrey" if sealed else "lowest", sealed=sealed, group=False,
    )


def _round(ledger: Ledger, now: int) -> list[object]:
    published = []
    for ident, price in zip(PROVIDERS, PRICES, strict=True):
        market = derive(ledger.iter_canonical())
        for body in provider_actions(market, ident.public, ident.seed, _policy(price), now):
            ledger.publish(ident, body, now)
            published.append(body)
    return published


def test_open_auction_round(tmp_path: Path) -> None:
    t0 = 1_000_000
    with Ledger(tmp_path / "l.db", network=NETWORK) as ledger:
        first = _round(ledger, t0)
        assert sum(isinstance(b, Offer) for b in first) == 3
        assert _round(ledger, t0 + 1) == []  # offers unchanged: nothing new
        req = ledger.publish(RECIPIENT, _request(False, t0), t0 + 10)
        bids = _round(ledger, t0 + 20)
        # The 9-per-hour provider is above the reserve of 8 and stays out.
        assert sorted(b.price for b in bids if isinstance(b, Bid)) == [5, 7]
        assert _round(ledger, t0 + 30) == []  # one bid per provider
        market = derive(ledger.iter_canonical())
        award = build_award(market, market.auctions[req.id])
        aw = ledger.publish(RECIPIENT, award, t0 + 2000)
        market = derive(ledger.iter_canonical())
        check = verify_award(market, aw.id)
        assert check.valid and check.price == 5
        lease = market.leases[aw.id]
        assert lease.provider == PROVIDERS[1].public
        # Unpaid and not ended: the provider does not rate yet.
        assert not [b for b in _round(ledger, lease.start_ms + 1) if isinstance(b, Rating)]
        ledger.publish(RECIPIENT, Payment(lease=aw.id, amount=5, currency="EUR", method="card",
                                          reference="ch_1"), lease.start_ms + 2)
        rated = [b for b in _round(ledger, lease.start_ms + 3) if isinstance(b, Rating)]
        assert len(rated) == 1 and rated[0].satisfied and rated[0].subject == RECIPIENT.public
        market = derive(ledger.iter_canonical())
        assert market.reputation.score(RECIPIENT.public, "recipient").satisfied == 1


def test_sealed_auction_commit_then_reveal(tmp_path: Path) -> None:
    t0 = 2_000_000
    with Ledger(tmp_path / "l.db", network=NETWORK) as ledger:
        req = ledger.publish(RECIPIENT, _request(True, t0), t0)
        commits = [b for b in _round(ledger, t0 + 10) if isinstance(b, Commit)]
        assert len(commits) == 2
        # Before close nothing is revealed; after close each reveals exactly once.
        assert not [b for b in _round(ledger, t0 + 20) if isinstance(b, Reveal)]
        reveals = [b for b in _round(ledger, t0 + 1500) if isinstance(b, Reveal)]
        assert sorted(r.price for r in reveals) == [5, 7]
        seeds = {p.public: p.seed for p in PROVIDERS}
        for r in reveals:
            commit = ledger.get(r.commit)
            assert commit is not None
            assert r.nonce == sealed_nonce(seeds[commit.author], req.id)
        assert not [b for b in _round(ledger, t0 + 1600) if isinstance(b, Reveal)]
        market = derive(ledger.iter_canonical())
        aw = ledger.publish(RECIPIENT, build_award(market, market.auctions[req.id]), t0 + 2500)
        check = verify_award(derive(ledger.iter_canonical()), aw.id)
        # Vickrey: the lowest (5) wins and is paid the second price (7).
        assert check.valid and check.price == 7


def test_no_bids_in_another_currency(tmp_path: Path) -> None:
    t0 = 3_000_000
    with Ledger(tmp_path / "l.db", network=NETWORK) as ledger:
        body = _request(False, t0)
        ledger.publish(RECIPIENT, Request(**{**body.__dict__, "currency": "USD"}), t0)
        assert not [b for b in _round(ledger, t0 + 10) if isinstance(b, Bid)]
