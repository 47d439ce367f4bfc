"""What a provider node and a recipient do on their own, as pure decisions.

`provider_actions` looks at derived market state and returns the event bodies a
provider should publish now: an offer when its services changed, bids on requests
for services it sells (sealed ones by commit, revealed after close with a nonce
derived from its seed, so a restarted node can still reveal), and its rating of the
recipient once a lease is paid or has ended unpaid. `build_award` is the recipient's
side: the award that the request's rule yields over every valid bid. The daemon and
the light client perform the returned actions; nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from .auction import Auction, Market, PartyLog, clear
from .auction.views import RecipientRecord, auction_recipient
from .events import (
    Award,
    Bid,
    Body,
    Commit,
    Offer,
    Rating,
    Reveal,
    ServiceOffer,
    commitment_hash,
    considered_digest,
)
from .reputation import PPM

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class ProviderPolicy:
    """A provider's price list and manners. Prices are minor units per hour of lease."""

    offers: tuple[ServiceOffer, ...]
    currency: str = "EUR"
    addrs: tuple[str, ...] = ()
    bid_services: frozenset[str] = field(default_factory=frozenset)  # empty: all offered
    rate_recipients: bool = True
    note: str = ""
    recipients: RecipientPolicy = field(default_factory=lambda: RecipientPolicy())

    def price_for(self, service: str, duration_ms: int) -> int | None:
        for so in self.offers:
            if so.name == service:
                return max(1, -(-so.price * duration_ms // HOUR_MS))
        return None

    def sells(self, service: str) -> bool:
        if self.bid_services and service not in self.bid_services:
            return False
        return any(so.name == service for so in self.offers)


NEW_RECIPIENT = ("bid", "skip")


@dataclass(frozen=True)
class RecipientPolicy:
    """Whom a provider bids for, judged on the recipient's payment record as of the
    auction's start (so every node derives the same verdict from the same events):

    * `min_score_ppm`: a rated recipient scoring below it is skipped;
    * `new_recipient`: "bid" or "skip" recipients with no rating yet;
    * `risk_premium_pct`: added to the price for a recipient (above the minimum) that
      has been rated unpaid or has a lease still open unpaid; skipped when the
      premium would exceed the request's reserve.
    """

    min_score_ppm: int = 0
    new_recipient: str = "bid"
    risk_premium_pct: int = 0

    def __post_init__(self) -> None:
        if self.new_recipient not in NEW_RECIPIENT:
            raise ValueError(f"new_recipient must be one of {NEW_RECIPIENT}")
        if not 0 <= self.min_score_ppm <= PPM or not 0 <= self.risk_premium_pct <= 1000:
            raise ValueError("min_score_ppm 0..1e6, risk_premium_pct 0..1000")


@dataclass(frozen=True)
class Verdict:
    """What the recipient policy says about one auction: bid (at `price`) or skip."""

    bid: bool
    price: int
    reason: str  # "" | new_recipient | recipient_score | premium | premium_over_reserve
    detail: str


def recipient_verdict(rec: RecipientRecord, pol: RecipientPolicy, price: int,
                      reserve: int) -> Verdict:
    """Pure: the policy applied to a recipient's record and our list price."""
    s = rec.score
    if rec.new and rec.open_unpaid == 0:
        if pol.new_recipient == "skip":
            return Verdict(False, price, "new_recipient",
                           "recipient has no payment record yet (new_recipient = skip)")
        return Verdict(True, price, "", "")
    if not rec.new and s.ppm < pol.min_score_ppm:
        return Verdict(False, price, "recipient_score",
                       f"recipient paid record {rec.label()} is below "
                       f"min_recipient_score {pol.min_score_ppm / 10_000:g}%")
    if (rec.unpaid or rec.open_unpaid) and pol.risk_premium_pct:
        high = -(-price * (100 + pol.risk_premium_pct) // 100)
        why = (f"{rec.unpaid} unpaid rating(s), {rec.open_unpaid} lease(s) open unpaid; "
               f"+{pol.risk_premium_pct}%: {price} -> {high}")
        if high > reserve:
            return Verdict(False, high, "premium_over_reserve", why + f" > reserve {reserve}")
        return Verdict(True, high, "premium", why)
    return Verdict(True, price, "", "")


@dataclass(frozen=True)
class Skip:
    """An auction the provider sells for but does not bid on, and why."""

    auction: bytes
    recipient: bytes
    reason: str
    detail: str


def sealed_nonce(seed: bytes, request_id: bytes) -> bytes:
    """Deterministic per-request nonce: secret (keyed by the seed) and re-derivable."""
    return hmac.new(seed, b"bidmesh/nonce/v1" + request_id, hashlib.sha256).digest()[:16]


def provider_actions(
    market: Market, me: bytes, seed: bytes, policy: ProviderPolicy, now_ms: int,
    published_offer: Offer | None = None, rating_pass: RatingPass | None = None,
) -> list[Body]:
    """Bodies `me` should publish at wall time `now_ms`, given the market so far."""
    return provider_plan(market, me, seed, policy, now_ms, published_offer, rating_pass)[0]


def provider_plan(
    market: Market, me: bytes, seed: bytes, policy: ProviderPolicy, now_ms: int,
    published_offer: Offer | None = None, rating_pass: RatingPass | None = None,
) -> tuple[list[Body], list[Skip]]:
    """`provider_actions`, plus the open auctions skipped by the recipient policy.
    Give the same `rating_pass` at every tick: the rating pass then looks at what
    changed and what still waits, not at every lease ever held."""
    out: list[Body] = []
    skips: list[Skip] = []
    offer = Offer(services=policy.offers, currency=policy.currency, addrs=policy.addrs,
                  note=policy.note)
    current = market.offers.get(me)
    if (current is None or current.offer != offer) and published_offer != offer:
        out.append(offer)
    for a in market.open_auctions(now_ms):  # indexed: not every auction ever held
        action = _bid_action(market, a, me, seed, policy, now_ms)
        if isinstance(action, Skip):
            skips.append(action)
        elif action is not None:
            out.append(action)
    if policy.rate_recipients:
        out.extend(_ratings(market, me, now_ms, rating_pass or RatingPass()))
    return out, skips


def _bid_action(market: Market, a: Auction, me: bytes, seed: bytes, policy: ProviderPolicy,
                now_ms: int) -> Body | Skip | None:
    req = a.request
    if a.recipient == me or me in a.pledges or not policy.sells(req.service):
        return None
    if req.currency != policy.currency:
        return None  # prices are in our currency; no conversion guesses
    price = policy.price_for(req.service, req.duration_ms)
    if price is None or price > req.reserve:
        return None
    mine = a.latest.get(me)
    listed = price
    v = recipient_verdict(auction_recipient(market, a), policy.recipients, price, req.reserve)
    if mine is None and now_ms <= req.close_ms and not v.bid:
        return Skip(a.id, a.recipient, v.reason, v.detail)
    price = v.price
    if now_ms <= req.close_ms:
        if mine is not None:
            return None
        if req.sealed:
            nonce = sealed_nonce(seed, a.id)
            return Commit(request=a.id, commitment=commitment_hash(a.id, price, nonce))
        return Bid(request=a.id, price=price)
    if req.sealed and mine is not None and now_ms <= req.reveal_ms:
        entry = a.bids[mine]
        if entry.status == "committed":
            nonce = sealed_nonce(seed, a.id)
            # The premium was part of what we committed to; try both prices in case
            # the record changed (a late event) between commit and reveal.
            for p in dict.fromkeys((price, listed)):
                if commitment_hash(a.id, p, nonce) == entry.commitment:
                    return Reveal(commit=mine, price=p, nonce=nonce)
    return None


@dataclass
class RatingPass:
    """What the provider's rating pass keeps between ticks: the market it walked and
    that market's log of our leases and subcontracts (`Market.party_log`), and those
    still waiting for our rating (not started, running unpaid, or rated by us but the
    rating not in the market yet). A tick looks at those and at what the log says
    changed, so it costs what is new, not every lease ever held; a new market object
    (a rebuild, a restart) or a market without a log is walked in full."""

    market: Market | None = None
    log: PartyLog | None = None
    leases: dict[bytes, None] = field(default_factory=dict)
    subcontracts: dict[bytes, None] = field(default_factory=dict)
    walks: int = 0  # full walks
    looked: int = 0  # leases and subcontracts looked at by the other passes

    def candidates(self, market: Market, me: bytes) -> tuple[list[bytes], list[bytes]]:
        """(lease ids, subcontract ids) to look at now."""
        changed = None
        if market is self.market and self.log is not None:
            changed = self.log.drain()
        if changed is None:  # walk everything (the new log starts before this walk)
            self.market, self.log = market, market.party_log(me)
            self.walks += 1
            self.leases, self.subcontracts = {}, {}
            return ([x.id for x in market.leases_of(me)],
                    [k for k, sc in market.subcontracts.items() if sc.provider == me])
        new_l, new_s = changed
        got = ([*self.leases, *(k for k in new_l if k not in self.leases)],
               [*self.subcontracts, *(k for k in new_s if k not in self.subcontracts)])
        self.looked += len(got[0]) + len(got[1])
        return got


def _ratings(market: Market, me: bytes, now_ms: int, rp: RatingPass) -> list[Body]:
    """Rate each recipient once: satisfied when paid in full, else after the lease ended;
    and each contractor we hired (its results were verified before we used them)."""
    out: list[Body] = []
    lease_ids, sc_ids = rp.candidates(market, me)
    waiting_s: dict[bytes, None] = {}
    for k in sc_ids:
        sc = market.subcontracts.get(k)
        if sc is None or sc.provider != me or \
                any(r.rater == me for r in market.ratings.get(sc.event_id, ())):
            continue
        waiting_s[k] = None
        out.append(Rating(lease=sc.event_id, subject=sc.contractor, role="provider",
                          satisfied=True, score=5, text="subcontracted results verified"))
    waiting_l: dict[bytes, None] = {}
    for k in lease_ids:
        lease = market.leases.get(k)
        if lease is None or lease.provider != me:
            continue
        if any(r.rater == me for r in market.ratings.get(lease.id, ())):
            continue
        waiting_l[k] = None
        if now_ms < lease.start_ms:
            continue
        paid = market.paid.get(lease.id, 0) >= lease.price
        if not paid and now_ms < lease.end_ms:
            continue
        out.append(Rating(lease=lease.id, subject=lease.recipient, role="recipient",
                          satisfied=paid, score=5 if paid else 1,
                          text="paid in full" if paid else "not paid by lease end"))
    rp.leases, rp.subcontracts = waiting_l, waiting_s
    return out


def build_award(market: Market, auction: Auction) -> Award:
    """The recipient's award: the rule over every valid bid, naming them all."""
    valid = auction.valid_bids()
    req = auction.request
    close = req.close_ms

    def ppm(k: bytes) -> int:
        return market.reputation.ppm(k, "provider", close)

    winner, price = clear(req.rule, valid, req.reserve, ppm)
    if req.group and winner is not None and auction.pledged() < (price or 0):
        winner, price = None, None
    ids = [b.id for b in valid]
    return Award(
        request=auction.id,
        winner=winner.id if winner else None,
        price=price or 0,
        considered=tuple(sorted(ids)) if len(ids) <= 256 else (),
        considered_digest=considered_digest(ids),
        considered_count=len(ids),
    )


def reputation_label(market: Market, key: bytes, as_of_ms: int) -> str:
    """Short human label for a provider's standing, for tables."""
    s = market.reputation.score(key, "provider", as_of_ms)
    return f"{s.ppm * 100 // PPM}% ({s.ratings} ratings)"


def offers_from_config(table: Mapping[str, Mapping[str, int]]) -> tuple[ServiceOffer, ...]:
    """`{"zstd": {"price": 5, "capacity": 1000}}` → ServiceOffer tuple (sorted by name)."""
    return tuple(
        ServiceOffer(name=name, price=int(v.get("price", 0)), capacity=int(v.get("capacity", 0)))
        for name, v in sorted(table.items())
    )
