"""Auctions, awards, leases, payments, ratings, groups and offers (pure core).

`market` holds the fold (`Market`, `derive`, `verify_award`, `rank_offers`), `records`
the records it keeps (`Auction`, `BidEntry`, ...), `lease` the object the dataplane
checks, `views` the JSON-able output. Rules: docs/auctions.md.
"""

from .lease import DELEGATION_TAG, DeviceAdmission, Lease, make_delegation
from .market import (
    BEST_VALUE_K,
    Market,
    clear,
    derive,
    find_auction,
    find_lease,
    rank_offers,
    verify_award,
)
from .records import (
    Auction,
    AwardCheck,
    BidEntry,
    Evidence,
    Ignored,
    OfferRecord,
    PartyLog,
    PaymentRecord,
    PledgeEntry,
    RankedOffer,
    RatingRecord,
    SubcontractRecord,
)

__all__ = [
    "BEST_VALUE_K", "DELEGATION_TAG", "Auction", "AwardCheck", "BidEntry", "DeviceAdmission",
    "Evidence", "Ignored", "Lease", "Market", "OfferRecord", "PartyLog", "PaymentRecord",
    "PledgeEntry", "RankedOffer", "RatingRecord", "SubcontractRecord", "clear", "derive",
    "find_auction", "find_lease", "make_delegation", "rank_offers", "verify_award",
]
