"""The records the market fold keeps: auctions and their bids and pledges, award
verdicts, payments, ratings, subcontracts, offers, and per-party change logs.

Plain data (slots dataclasses, NamedTuples) built and updated by `Market`
(node/auction/market.py); snapshots and the cold store pickle them. market.py
imports every one of them again, so files written while they lived there
(pickled as `node.auction.market.<name>`) still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ..codec import fast_pickle
from ..events import Offer, Request, ServiceOffer
from ..reputation import Score


class Ignored(NamedTuple):
    """An event that counts for nothing in derived state, and why (a stable code)."""

    event_id: bytes
    kind: str
    reason: str


class Evidence(NamedTuple):
    """Something a recipient's award did wrong, visible to every node."""

    recipient: bytes
    request: bytes
    award: bytes
    kind: str  # omitted_bid, wrong_winner, wrong_price, ... (see AwardCheck.problems)
    bid: bytes | None  # the omitted bid (or commit) id, when there is one


@fast_pickle
@dataclass(slots=True)
class BidEntry:
    """One bid (open) or commit (sealed) of an auction, with its current standing."""

    id: bytes  # bid id, or commit id for sealed auctions
    provider: bytes
    ts_ms: int
    sealed: bool
    price: int | None  # None until a sealed bid is revealed
    status: str  # valid | committed | replaced | void
    reason: str = ""
    commitment: bytes | None = None
    reveal: bytes | None = None


@fast_pickle
@dataclass(slots=True)
class PledgeEntry:
    event_id: bytes
    member: bytes
    ts_ms: int
    willing: bool
    amount: int
    sponsor: tuple[bytes, ...]


@dataclass(frozen=True)
class AwardCheck:
    """`verify_award`'s verdict on one award event."""

    award_id: bytes
    request_id: bytes
    recipient: bytes
    ts_ms: int
    winner: bytes | None
    price: int
    valid: bool  # the award stands: a lease exists (or a no-deal stands)
    expected_winner: bytes | None  # the rule over every valid on-time bid
    expected_price: int | None
    problems: tuple[str, ...]  # why it is invalid (empty when valid)
    omitted: tuple[bytes, ...]  # valid on-time bids the award left out (evidence)
    extra: tuple[bytes, ...]  # considered ids that are not valid on-time bids (harmless)
    considered_count: int
    considered_known: bool  # False: a digest that matches no set we can name


@fast_pickle
@dataclass(frozen=True, slots=True)
class PaymentRecord:
    event_id: bytes
    lease: bytes
    payer: bytes
    ts_ms: int
    amount: int
    currency: str
    method: str
    reference: str
    on_behalf: tuple[bytes, ...]


@fast_pickle
@dataclass(frozen=True, slots=True)
class RatingRecord:
    event_id: bytes
    lease: bytes  # award id or subcontract id
    rater: bytes
    subject: bytes
    role: str
    ts_ms: int
    satisfied: bool
    score: int
    text: str
    weight: int


@fast_pickle
@dataclass(frozen=True, slots=True)
class SubcontractRecord:
    event_id: bytes
    lease: bytes
    provider: bytes  # the author, who hired
    contractor: bytes
    ts_ms: int
    services: tuple[str, ...]


class PartyLog:
    """Keys of one party's leases and subcontracts changed since the last `drain()`
    (added, replaced or removed), kept by the live market (`Market.party_log`). Never
    more than LOG_MAX: past that it overflows, and `drain()` says so (None: walk
    everything once more), so a log nobody drains any more costs little. One log a
    party: asking for another one ends the first (`ended`: its drain says None)."""

    LOG_MAX = 4096
    __slots__ = ("ended", "leases", "n", "overflow", "subcontracts")

    def __init__(self) -> None:
        self.leases: dict[bytes, None] = {}
        self.subcontracts: dict[bytes, None] = {}
        self.n = 0
        self.overflow = False
        self.ended = False

    def note(self, what: str, key: bytes) -> None:
        if self.overflow:
            return
        d = self.leases if what == "leases" else self.subcontracts
        if key not in d:
            d[key] = None
            self.n += 1
            if self.n > self.LOG_MAX:
                self.overflow = True
                self.leases, self.subcontracts, self.n = {}, {}, 0

    def drain(self) -> tuple[list[bytes], list[bytes]] | None:
        """(lease keys, subcontract keys) changed since the last drain, in the order
        they first changed; None after an overflow."""
        if self.ended:
            return None
        got = None if self.overflow else (list(self.leases), list(self.subcontracts))
        self.leases, self.subcontracts, self.n, self.overflow = {}, {}, 0, False
        return got


@fast_pickle
@dataclass(frozen=True, slots=True)
class OfferRecord:
    event_id: bytes
    provider: bytes
    ts_ms: int
    offer: Offer


class RankedOffer(NamedTuple):
    provider: bytes
    service: ServiceOffer
    currency: str
    addrs: tuple[str, ...]
    reputation: Score
    offer_id: bytes


@dataclass
class Auction:
    id: bytes
    recipient: bytes
    ts_ms: int
    request: Request
    bids: dict[bytes, BidEntry] = field(default_factory=dict)  # every bid/commit, in order
    latest: dict[bytes, bytes] = field(default_factory=dict)  # provider -> latest entry id
    pledges: dict[bytes, PledgeEntry] = field(default_factory=dict)  # latest per member
    awards: list[AwardCheck] = field(default_factory=list)
    outcome: AwardCheck | None = None  # the first valid award
    lease: bytes | None = None

    @property
    def deadline_ms(self) -> int:
        """Bids are final after this: close_ms (open) or reveal_ms (sealed)."""
        return self.request.reveal_ms

    def valid_bids(self) -> list[BidEntry]:
        """Valid on-time bids: latest per provider, revealed if sealed, within the
        reserve, not from the recipient or a group pledger."""
        out = []
        for bid_id in self.latest.values():
            b = self.bids[bid_id]
            if b.status == "valid" and b.provider not in self.pledges:
                out.append(b)
        return out

    def pledged(self) -> int:
        return sum(p.amount for p in self.pledges.values() if p.willing)

    def status(self, now_ms: int) -> str:
        if self.outcome is not None:
            return "awarded" if self.lease else "no_deal"
        if self.awards:
            return "award_invalid"
        if now_ms <= self.request.close_ms:
            return "open"
        if self.request.sealed and now_ms <= self.request.reveal_ms:
            return "revealing"
        return "closed"
