"""JSON-able views of market state for the CLI and the light client (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..events import jsonable
from ..reputation import Score
from .lease import Lease
from .market import Market, rank_offers
from .records import Auction, AwardCheck, BidEntry

JSON = dict[str, Any]


def _hex(b: bytes | None) -> str | None:
    return b.hex() if b is not None else None


@dataclass(frozen=True)
class RecipientRecord:
    """A recipient's payment record as of a moment (an auction's start): its score as a
    recipient, how often providers rated it paid / unpaid, and its leases that had
    begun, were not paid in full and not yet rated by their provider (still open)."""

    score: Score
    open_unpaid: int

    @property
    def paid(self) -> int:
        return self.score.satisfied

    @property
    def unpaid(self) -> int:
        return self.score.unsatisfied

    @property
    def new(self) -> bool:
        return self.score.ratings == 0

    def to_json(self) -> JSON:
        return {"key": self.score.key.hex(), "as_of_ms": self.score.as_of_ms,
                "score": round(self.score.score, 4), "score_ppm": self.score.ppm,
                "ratings": self.score.ratings, "paid": self.paid, "unpaid": self.unpaid,
                "open_unpaid": self.open_unpaid}

    def label(self) -> str:
        return record_text(self.to_json())


def rep_text(ppm: int, ratings: int) -> str:
    """Reputation for humans, the one format everywhere: `66.7% (3 ratings)`, or
    `new (0 ratings)` (JSON keeps `score_ppm` and the counts)."""
    if not ratings:
        return "new (0 ratings)"
    return f"{ppm / 10_000:.1f}% ({ratings} rating{'s' if ratings != 1 else ''})"


def rep_label(s: Score) -> str:
    return rep_text(s.ppm, s.ratings)


def rep_json_text(d: dict[str, Any]) -> str:
    """`rep_text` of a `Score.to_json()` or `RecipientRecord.to_json()` dict."""
    return rep_text(int(d["score_ppm"]), int(d["ratings"]))


def record_text(d: dict[str, Any]) -> str:
    """A recipient record (its JSON) for humans: score, then paid / unpaid counts and
    leases still open unpaid: `50.0% (2 ratings), 1 paid / 1 unpaid, 1 open unpaid`."""
    s = rep_json_text(d)
    if d["ratings"]:
        s += f", {d['paid']} paid / {d['unpaid']} unpaid"
    if d["open_unpaid"]:
        s += f", {d['open_unpaid']} open unpaid"
    return s


def recipient_record(market: Market, key: bytes, as_of_ms: int) -> RecipientRecord:
    score = market.reputation.score(key, "recipient", as_of_ms)
    open_unpaid = 0
    for lease in market.leases.values():
        if lease.recipient != key or lease.start_ms > as_of_ms:
            continue
        paid = sum(p.amount for p in market.payments.get(lease.id, ()) if p.ts_ms <= as_of_ms)
        rated = any(r.rater == lease.provider and r.ts_ms <= as_of_ms
                    for r in market.ratings.get(lease.id, ()))
        if paid < lease.price and not rated:
            open_unpaid += 1
    return RecipientRecord(score, open_unpaid)


def auction_recipient(market: Market, a: Auction) -> RecipientRecord:
    """The recipient's record as of the auction's start (its request's timestamp)."""
    return recipient_record(market, a.recipient, a.ts_ms)


def bid_json(market: Market, a: Auction, b: BidEntry) -> JSON:
    """A bid with its provider's reputation as of the auction's close."""
    rep = market.reputation.score(b.provider, "provider", a.request.close_ms)
    won = a.outcome is not None and a.outcome.winner == b.id
    return {
        "id": b.id.hex(), "provider": b.provider.hex(), "ts_ms": b.ts_ms,
        "sealed": b.sealed, "price": b.price, "status": b.status, "reason": b.reason,
        "winner": won, "reputation": rep.to_json(),
    }


def award_json(c: AwardCheck) -> JSON:
    return {
        "id": c.award_id.hex(), "ts_ms": c.ts_ms, "winner": _hex(c.winner), "price": c.price,
        "valid": c.valid, "problems": list(c.problems),
        "expected_winner": _hex(c.expected_winner), "expected_price": c.expected_price,
        "omitted": [i.hex() for i in c.omitted], "extra": [i.hex() for i in c.extra],
        "considered_count": c.considered_count, "considered_known": c.considered_known,
    }


def auction_summary(market: Market, a: Auction, now_ms: int | None = None) -> JSON:
    r = a.request
    out = a.outcome
    return {
        "id": a.id.hex(), "recipient": a.recipient.hex(), "ts_ms": a.ts_ms,
        "service": r.service, "chain": list(r.chain), "rule": r.rule, "sealed": r.sealed,
        "group": r.group, "reserve": r.reserve, "currency": r.currency,
        "start_ms": r.start_ms, "duration_ms": r.duration_ms, "close_ms": r.close_ms,
        "reveal_ms": r.reveal_ms,
        "status": a.status(market.now_ms if now_ms is None else now_ms),
        "bids": len(a.bids), "valid_bids": len(a.valid_bids()),
        "winner": _hex(out.winner) if out else None, "price": out.price if out else None,
        "lease": _hex(a.lease),
        "recipient_record": auction_recipient(market, a).to_json(),
    }


def auction_json(market: Market, a: Auction, now_ms: int | None = None) -> JSON:
    """One auction in full: request, every bid with reputation, awards, evidence."""
    r = a.request
    d = auction_summary(market, a, now_ms)
    d.update({
        "max_rate_bps": r.max_rate_bps, "min_rate_bps": r.min_rate_bps,
        "members": jsonable(r.members.to_map()), "note": r.note,
        "bid_list": [bid_json(market, a, b) for b in a.bids.values()],
        "pledges": [
            {"member": p.member.hex(), "willing": p.willing, "amount": p.amount,
             "sponsor": [s.hex() for s in p.sponsor], "ts_ms": p.ts_ms}
            for p in a.pledges.values()
        ],
        "pledged": a.pledged(),
        "awards": [award_json(c) for c in a.awards],
        "evidence": [
            {"award": e.award.hex(), "kind": e.kind, "bid": _hex(e.bid)}
            for e in market.evidence if e.request == a.id
        ],
    })
    return d


def auctions_json(market: Market, now_ms: int | None = None) -> list[JSON]:
    return [auction_summary(market, a, now_ms) for a in market.auctions.values()]


def lease_json(market: Market, lease: Lease) -> JSON:
    return {
        "id": lease.id.hex(), "request": lease.request.hex(), "bid": lease.bid.hex(),
        "provider": lease.provider.hex(), "recipient": lease.recipient.hex(),
        "service": lease.service, "chain": list(lease.chain),
        "start_ms": lease.start_ms, "end_ms": lease.end_ms,
        "max_rate_bps": lease.max_rate_bps, "min_rate_bps": lease.min_rate_bps,
        "price": lease.price, "currency": lease.currency,
        "devices": [k.hex() for k in lease.devices], "phones": list(lease.phones),
        "users": list(lease.users), "max_devices": lease.max_devices,
        "group_members": [k.hex() for k in lease.group_members],
        "payers": [{"member": m.hex(), "pledged": n} for m, n in lease.payers],
        "shares": {m.hex(): n for m, n in lease.shares().items()},
        "sponsorships": [{"sponsor": s.hex(), "member": m.hex()} for s, m in lease.sponsorships],
        "paid": market.paid.get(lease.id, 0),
        "payments": [
            {"id": p.event_id.hex(), "payer": p.payer.hex(), "ts_ms": p.ts_ms,
             "amount": p.amount, "currency": p.currency, "method": p.method,
             "reference": p.reference, "on_behalf": [k.hex() for k in p.on_behalf]}
            for p in market.payments.get(lease.id, [])
        ],
        "ratings": [
            {"id": r.event_id.hex(), "rater": r.rater.hex(), "subject": r.subject.hex(),
             "role": r.role, "ts_ms": r.ts_ms, "satisfied": r.satisfied, "score": r.score,
             "text": r.text, "weight": r.weight}
            for r in market.ratings.get(lease.id, [])
        ],
        "usage": [jsonable(u.to_map()) for u in market.usage.get(lease.id, [])],
    }


def leases_json(market: Market) -> list[JSON]:
    return [lease_json(market, x) for x in market.leases.values()]


def reputation_json(
    market: Market, key: bytes | None = None, as_of_ms: int | None = None
) -> list[JSON]:
    """Per key (every rated key, or just `key`): score and counts in both roles."""
    t = market.now_ms if as_of_ms is None else as_of_ms
    keys = [key] if key is not None else market.reputation.keys()
    rep = market.reputation
    return [
        {"key": k.hex(), "as_of_ms": t,
         "provider": rep.score(k, "provider", t).to_json(),
         "recipient": rep.score(k, "recipient", t).to_json()}
        for k in keys
    ]


def ignored_json(market: Market) -> list[JSON]:
    return [{"id": i.event_id.hex(), "kind": i.kind, "reason": i.reason}
            for i in market.ignored]


def offers_json(market: Market, service: str, as_of_ms: int | None = None) -> list[JSON]:
    t = market.now_ms if as_of_ms is None else as_of_ms
    return [
        {"provider": r.provider.hex(), "service": r.service.name, "price": r.service.price,
         "capacity": r.service.capacity, "currency": r.currency, "addrs": list(r.addrs),
         "reputation": r.reputation.to_json(), "offer": r.offer_id.hex()}
        for r in rank_offers(market, service, t)
    ]


def market_json(market: Market) -> JSON:
    """Everything derived, for comparing nodes (and tests)."""
    return {
        "now_ms": market.now_ms,
        "auctions": [auction_json(market, a) for a in market.auctions.values()],
        "leases": leases_json(market),
        "reputation": reputation_json(market),
        "ignored": ignored_json(market),
        "offers": {k.hex(): v.event_id.hex() for k, v in sorted(market.offers.items())},
        "subcontracts": sorted(k.hex() for k in market.subcontracts),
    }
