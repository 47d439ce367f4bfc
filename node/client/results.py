"""What the light client answers with: verified views of auctions, bids, leases and
reputation, and the record of nodes that misbehaved or disagreed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..auction import Auction, Lease, Market
from ..auction.views import RecipientRecord, auction_recipient
from ..events import Award, Event
from ..reputation import Score


@dataclass(frozen=True)
class NodeFault:
    node: str
    reason: str
    detail: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Disagreement:
    """Nodes answered one query with different event sets."""

    query: str
    digests: dict[str, str]  # node -> digest of its answer set
    missing: dict[str, list[str]]  # node -> ids (hex) other nodes returned but it did not


@dataclass(frozen=True)
class BidInfo:
    """One bid (or sealed commit) with its provider's reputation as of the close."""

    id: bytes
    provider: bytes
    price: int | None
    status: str
    reason: str
    sealed: bool
    ts_ms: int
    winner: bool
    reputation: Score

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id.hex(), "provider": self.provider.hex(), "price": self.price,
                "status": self.status, "reason": self.reason, "sealed": self.sealed,
                "ts_ms": self.ts_ms, "winner": self.winner,
                "reputation": self.reputation.to_json()}


@dataclass(frozen=True)
class AuctionInfo:
    """An auction as re-derived locally: the market folded over the returned events."""

    market: Market
    auction: Auction
    bids: tuple[BidInfo, ...]
    status: str

    @property
    def recipient_record(self) -> RecipientRecord:
        """The recipient's payment record as of the auction's start."""
        return auction_recipient(self.market, self.auction)

    def to_json(self) -> dict[str, Any]:
        from ..auction.views import auction_json

        d = auction_json(self.market, self.auction, int(time.time() * 1000))
        d["bid_list"] = [b.to_json() for b in self.bids]
        d["status"] = self.status
        return d


@dataclass(frozen=True)
class LeaseInfo:
    lease: Lease
    paid: int
    role: str  # our role: recipient | provider | member
    data: dict[str, Any]  # views.lease_json

    def to_json(self) -> dict[str, Any]:
        return {**self.data, "role": self.role}


@dataclass(frozen=True)
class Unverified:
    """An award of ours that yields no lease here, and why (stable reason, detail)."""

    award: bytes
    request: bytes
    reason: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"award": self.award.hex(), "request": self.request.hex(),
                "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class ReputationInfo:
    key: bytes
    as_of_ms: int
    provider: Score
    recipient: Score

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key.hex(), "as_of_ms": self.as_of_ms,
                "provider": self.provider.to_json(), "recipient": self.recipient.to_json()}


@dataclass
class ChainHead:
    seq: int = 0
    id: bytes | None = None
    ts_ms: int = 0


def now_ms() -> int:
    return int(time.time() * 1000)


def _unverified(market: Market, award: Event) -> Unverified | None:
    if not isinstance(award.body, Award) or award.id in market.leases:
        return None
    rid = award.body.request
    ign = next((i for i in market.ignored if i.event_id == award.id), None)
    if ign is not None:
        return Unverified(award.id, rid, ign.reason, "the award counts for nothing")
    check = market.awards.get(award.id)
    if check is not None and check.problems:
        return Unverified(award.id, rid, check.problems[0], "; ".join(check.problems))
    if rid not in market.auctions:
        return Unverified(award.id, rid, "auction_unknown",
                          "no node returned the request this award decides")
    return Unverified(award.id, rid, "not_verified", "the award yields no lease here")


def _bid_infos(market: Market, a: Auction) -> list[BidInfo]:
    out = []
    won = a.outcome.winner if a.outcome is not None else None
    for b in a.bids.values():
        rep = market.reputation.score(b.provider, "provider", a.request.close_ms)
        out.append(BidInfo(b.id, b.provider, b.price, b.status, b.reason, b.sealed, b.ts_ms,
                           won == b.id, rep))
    return out


def lease_chain(lease: Lease) -> list[str]:
    """What a lease's stream is processed with: its chain; else its service when that is
    a processing service; else (transport such as `bandwidth`) passed through as is."""
    if lease.chain:
        return list(lease.chain)
    from ..processors import load_processors

    return [lease.service] if lease.service in load_processors() else ["identity"]
