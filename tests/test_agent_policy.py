"""The provider's recipient policy (node/agent.py RecipientPolicy): pure verdicts on a
recipient's payment record, and the agent skipping or charging more over a real ledger
where a recipient left a lease unpaid."""

from __future__ import annotations

from pathlib import Path

import pytest
from testkit import NETWORK, seed

from node.agent import (
    ProviderPolicy,
    RecipientPolicy,
    Skip,
    build_award,
    provider_plan,
    recipient_verdict,
)
from node.auction import derive
from node.auction.views import RecipientRecord, auction_recipient
from node.events import Bid, Commit, Members, Request, Reveal, ServiceOffer
from node.keys import Identity
from node.ledger import Ledger
from node.reputation import Score

K = b"\x07" * 32


def rec(ratings: int, paid: int, ppm: int, open_unpaid: int = 0) -> RecipientRecord:
    return RecipientRecord(Score(K, "recipient", 0, ppm, ratings, paid, ratings - paid,
                                 5 * ratings, ratings), open_unpaid)


def test_verdicts_are_pure_decisions_on_the_record() -> None:
    default = RecipientPolicy()
    for r in (rec(0, 0, 500_000), rec(3, 0, 100_000), rec(2, 2, 900_000)):
        assert recipient_verdict(r, default, 100, 1000).bid  # no policy: bid for all
    strict = RecipientPolicy(min_score_ppm=600_000, new_recipient="skip")
    v = recipient_verdict(rec(0, 0, 500_000), strict, 100, 1000)
    assert (v.bid, v.reason) == (False, "new_recipient")
    v = recipient_verdict(rec(2, 1, 500_000), strict, 100, 1000)
    assert (v.bid, v.reason) == (False, "recipient_score") and "below" in v.detail
    assert recipient_verdict(rec(2, 2, 900_000), strict, 100, 1000).reason == ""
    premium = RecipientPolicy(risk_premium_pct=25)
    v = recipient_verdict(rec(3, 2, 700_000), premium, 100, 1000)
    assert (v.bid, v.price, v.reason) == (True, 125, "premium")
    v = recipient_verdict(rec(0, 0, 500_000, open_unpaid=1), premium, 101, 1000)
    assert (v.bid, v.price) == (True, 127)  # rounded up; an open unpaid lease counts
    v = recipient_verdict(rec(3, 2, 700_000), premium, 100, 110)
    assert (v.bid, v.reason) == (False, "premium_over_reserve")
    assert recipient_verdict(rec(3, 3, 1_000_000), premium, 100, 1000).price == 100
    with pytest.raises(ValueError):
        RecipientPolicy(new_recipient="maybe")


RECIPIENT = Identity.from_seed(seed(100))
FRESH = Identity.from_seed(seed(101))
PROVIDER = Identity.from_seed(seed(1))


def _request(t0: int, *, sealed: bool = False, reserve: int = 8) -> Request:
    close = t0 + 1000
    return Request(service="bandwidth", chain=(), start_ms=close + 1000, duration_ms=3_600_000,
                   max_rate_bps=None, min_rate_bps=None, members=Members(max_devices=1),
                   reserve=reserve, currency="EUR", close_ms=close,
                   reveal_ms=close + (1000 if sealed else 0), rule="lowest", sealed=sealed,
                   group=False)


def _act(led: Ledger, pol: RecipientPolicy, now: int) -> tuple[list[object], list[Skip]]:
    policy = ProviderPolicy(offers=(ServiceOffer(name="bandwidth", price=5, capacity=1),),
                            recipients=pol)
    bodies, skips = provider_plan(derive(led.iter_canonical()), PROVIDER.public,
                                  PROVIDER.seed, policy, now)
    for b in bodies:
        led.publish(PROVIDER, b, now)  # type: ignore[arg-type]
    return list(bodies), skips


def test_agent_skips_or_charges_a_recipient_who_did_not_pay(tmp_path: Path) -> None:
    t0 = 5_000_000
    with Ledger(tmp_path / "l.db", network=NETWORK) as led:
        # Warm-up: the recipient is served at the list price and never pays.
        r1 = led.publish(RECIPIENT, _request(t0), t0)
        bids, _ = _act(led, RecipientPolicy(), t0 + 10)
        assert [b.price for b in bids if isinstance(b, Bid)] == [5]
        m = derive(led.iter_canonical())
        aw = led.publish(RECIPIENT, build_award(m, m.auctions[r1.id]), t0 + 1100)
        lease = derive(led.iter_canonical()).leases[aw.id]
        _act(led, RecipientPolicy(), lease.end_ms + 1)  # rates "not paid by lease end"
        t1 = lease.end_ms + 10
        r2 = led.publish(RECIPIENT, _request(t1), t1)
        m = derive(led.iter_canonical())
        record = auction_recipient(m, m.auctions[r2.id])
        assert (record.paid, record.unpaid, record.score.ratings) == (0, 1, 1)
        # A minimum score: skipped, with the reason, once per auction per tick.
        bodies, skips = _act(led, RecipientPolicy(min_score_ppm=500_000), t1 + 10)
        assert not [b for b in bodies if isinstance(b, Bid)]
        assert [(s.auction, s.reason) for s in skips] == [(r2.id, "recipient_score")]
        # A premium instead: the bid is 5 + 40 % = 7, within the reserve of 8.
        bodies, skips = _act(led, RecipientPolicy(risk_premium_pct=40), t1 + 20)
        assert [b.price for b in bodies if isinstance(b, Bid)] == [7] and not skips
        # A new recipient under new_recipient = skip; the old one is not "new".
        r3 = led.publish(FRESH, _request(t1 + 30), t1 + 30)
        _, skips = _act(led, RecipientPolicy(new_recipient="skip"), t1 + 40)
        assert [(s.auction, s.reason) for s in skips] == [(r3.id, "new_recipient")]


def test_sealed_premium_commit_is_revealed(tmp_path: Path) -> None:
    t0 = 9_000_000
    with Ledger(tmp_path / "l.db", network=NETWORK) as led:
        r1 = led.publish(RECIPIENT, _request(t0), t0)
        _act(led, RecipientPolicy(), t0 + 10)
        m = derive(led.iter_canonical())
        aw = led.publish(RECIPIENT, build_award(m, m.auctions[r1.id]), t0 + 1100)
        end = derive(led.iter_canonical()).leases[aw.id].end_ms
        _act(led, RecipientPolicy(), end + 1)
        pol = RecipientPolicy(risk_premium_pct=40)
        req = led.publish(RECIPIENT, _request(end + 10, sealed=True), end + 10)
        bodies, _ = _act(led, pol, end + 20)
        assert [type(b) for b in bodies] == [Commit]
        bodies, _ = _act(led, pol, req.body.close_ms + 10)  # type: ignore[attr-defined]
        assert [(type(b), getattr(b, "price", None)) for b in bodies] == [(Reveal, 7)]
