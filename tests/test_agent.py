"""Provider and recipient decisions (node/agent.py) over a real ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
from testkit import NETWORK, seed

from node.agent import ProviderPolicy, build_award, provider_actions, sealed_nonce
from node.auction import derive, verify_award
from node.events import (
    Bid,
    Body,
    Commit,
    Members,
    Offer,
    Payment,
    Rating,
    Request,
    Reveal,
    ServiceOffer,
)
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


@pytest.mark.parametrize("cold", [False, True])
def test_the_rating_pass_looks_at_what_changed_and_rates_as_a_full_walk(cold: bool) -> None:
    """With the live market's party log, a provider's rating pass looks at its waiting
    leases and at those that changed, not at every lease it ever held (cold ones read
    from the store), and publishes what a full walk of the derived market does."""
    import random

    from fold_helpers import history

    from node.agent import RatingPass, _ratings
    from node.auction.fold import IncrementalMarket
    from node.marketcold import SqliteCold

    evs = history(random.Random(40), n_auctions=40)
    by_id = {e.id: e for e in evs}
    store = SqliteCold() if cold else None
    eng = IncrementalMarket(source=lambda ids: [by_id[i] for i in ids], max_loaded=2,
                            cold=store, cold_after_ms=0)
    provs = sorted({e.author for e in evs if e.kind in ("bid", "commit")})
    passes = {p: RatingPass() for p in provs}
    rated = 0

    def key(b: Body) -> tuple[bytes, str]:
        assert isinstance(b, Rating)
        return b.lease, b.role

    for i in range(0, len(evs), 3):
        eng.add(evs[i:i + 3])
        m = eng.market()
        plain = derive(evs[:i + 3])
        for p in provs:
            now = m.now_ms + (i % 5) * 20
            rp = passes[p]
            got = _ratings(m, p, now, rp)
            assert sorted(got, key=key) == sorted(_ratings(plain, p, now, RatingPass()), key=key)
            # What the next tick looks at (with what changes): ours not rated by us yet.
            mine = [x.id for x in plain.leases_of(p) if x.provider == p]
            done = {k for k in mine if any(r.rater == p for r in plain.ratings.get(k, ()))}
            assert set(rp.leases) == set(mine) - done
            rated += len(done)
    if cold:
        assert eng.cold() > 0
    assert all(rp.walks == 1 for rp in passes.values())  # the first tick only
    assert rated > 0 and sum(rp.looked for rp in passes.values()) > 0
    if store is not None:
        store.close()


def test_a_party_log_is_bounded_and_one_a_party() -> None:
    """Past LOG_MAX keys the log overflows (its reader walks everything once more); a
    second log of the same party ends the first (its reader walks again too)."""
    from node.auction import PartyLog
    from node.auction.fold import IncrementalMarket

    m = IncrementalMarket().market()
    first = m.party_log(b"k" * 32)
    second = m.party_log(b"k" * 32)
    assert first.drain() is None and second.drain() == ([], [])
    for i in range(PartyLog.LOG_MAX + 1):
        second.note("leases", i.to_bytes(4, "big"))
    assert second.drain() is None and second.drain() == ([], [])
    second.note("subcontracts", b"s")
    assert second.drain() == ([], [b"s"]) and derive([]).party_log(b"k" * 32) is None
