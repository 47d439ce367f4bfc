"""Auctions, awards, leases, payments, ratings, groups and offers: a pure fold.

`Market.apply(event)` folds one event at a time, in canonical order (ts_ms, author,
seq) as `Ledger.iter_canonical()` yields them; `derive(events)` folds a whole ledger.
Every node folding the same accepted events gets the same auctions, winners, leases
and reputations. Time is only ever an event's `ts_ms` compared with request fields,
never the local clock. Integer math decides every winner. Rules: docs/auctions.md.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import UsageError
from ..events import (
    Award,
    Bid,
    Commit,
    Event,
    Offer,
    Payment,
    Pledge,
    Rating,
    Request,
    Reveal,
    Subcontract,
    Usage,
    commitment_hash,
    considered_digest,
)
from ..reputation import PPM, Policy, Reputation
from .lease import Lease

# Every record, also for snapshots and cold-store files pickled while they lived here.
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

# best_value: effective = price * (1 + K * (1 - score)), K = BEST_VALUE_K[0] / [1].
BEST_VALUE_K = (1, 1)


def clear(
    rule: str, bids: list[BidEntry], reserve: int, ppm: Callable[[bytes], int]
) -> tuple[BidEntry | None, int | None]:
    """The winner and the price it is paid under `rule`. Ties: earliest ts, then id."""
    if not bids:
        return None, None
    if rule == "best_value":
        kn, kd = BEST_VALUE_K

        def eff(b: BidEntry) -> tuple[int, int, int, bytes]:
            p = b.price or 0
            return p * (kd * PPM + kn * (PPM - ppm(b.provider))), p, b.ts_ms, b.id

        w = min(bids, key=eff)
        return w, w.price
    if rule == "vickrey":
        two = heapq.nsmallest(2, bids, key=lambda b: (b.price, b.ts_ms, b.id))
        return two[0], (two[1].price if len(two) > 1 else reserve)
    w = min(bids, key=lambda b: (b.price, b.ts_ms, b.id))
    return w, w.price


class Market:
    """Derived market state. `apply` events in canonical order only."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.reputation = Reputation(policy)
        self.policy = self.reputation.policy
        self.auctions: dict[bytes, Auction] = {}
        self.awards: dict[bytes, AwardCheck] = {}
        self.leases: dict[bytes, Lease] = {}
        self.payments: dict[bytes, list[PaymentRecord]] = {}  # lease id -> payments
        self.paid: dict[bytes, int] = {}  # lease id -> total paid
        self.ratings: dict[bytes, list[RatingRecord]] = {}  # lease/subcontract id -> ratings
        self.subcontracts: dict[bytes, SubcontractRecord] = {}
        self.usage: dict[bytes, list[Usage]] = {}
        self.offers: dict[bytes, OfferRecord] = {}  # latest per provider
        self.ignored: list[Ignored] = []
        self.evidence: list[Evidence] = []
        self.now_ms = 0  # ts of the last applied event: ledger time
        self._last: tuple[int, bytes, int] | None = None
        self._commits: dict[bytes, bytes] = {}  # commit id -> request id
        self._rated: set[tuple[bytes, str]] = set()  # (lease, role of subject)
        self._settled: dict[bytes, list[int]] = {}  # key -> sorted end_ms of paid leases

    # ------------------------------------------------------------ folding

    def apply(self, ev: Event) -> None:
        """Fold one event. Raises UsageError if it is not after the last one in
        canonical order (then derive again from `Ledger.iter_canonical()`)."""
        key = (ev.ts_ms, ev.author, ev.seq)
        if self._last is not None and key <= self._last:
            raise UsageError("events must be applied in canonical order (ts_ms, author, seq); "
                             "re-derive from Ledger.iter_canonical()")
        self._last = key
        self.now_ms = ev.ts_ms
        _HANDLERS[ev.kind](self, ev)

    def apply_all(self, events: Iterable[Event]) -> Market:
        for ev in events:
            self.apply(ev)
        return self

    def _ignore(self, ev: Event, reason: str) -> None:
        self.ignored.append(Ignored(ev.id, ev.kind, reason))

    def _request(self, ev: Event) -> None:
        req = ev.body
        assert isinstance(req, Request)
        if req.close_ms < ev.ts_ms:
            return self._ignore(ev, "closes_before_posted")
        self.auctions[ev.id] = Auction(ev.id, ev.author, ev.ts_ms, req)

    def _entry(self, ev: Event, request: bytes, sealed: bool) -> tuple[Auction, BidEntry] | None:
        """Shared rules of bids and commits; None if the event was ignored."""
        a = self.auctions.get(request)
        if a is None:
            self._ignore(ev, "unknown_request")
            return None
        if a.request.sealed != sealed:
            self._ignore(ev, "sealed_needs_commit" if a.request.sealed else "open_needs_bid")
            return None
        if ev.author == a.recipient:
            self._ignore(ev, "self_dealing")
            return None
        if ev.ts_ms > a.request.close_ms:
            self._ignore(ev, "late")
            return None
        prev = a.latest.get(ev.author)
        if prev is not None:
            old = a.bids[prev]
            old.status, old.reason = "replaced", "replaced"
            self.ignored.append(Ignored(old.id, "commit" if sealed else "bid", "replaced"))
        entry = BidEntry(ev.id, ev.author, ev.ts_ms, sealed, None, "committed")
        a.bids[ev.id] = entry
        a.latest[ev.author] = ev.id
        return a, entry

    def _bid(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Bid)
        got = self._entry(ev, body.request, sealed=False)
        if got is None:
            return
        a, entry = got
        entry.price = body.price
        if body.price > a.request.reserve:
            entry.status, entry.reason = "void", "above_reserve"
            self._ignore(ev, "above_reserve")
        else:
            entry.status = "valid"

    def _commit(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Commit)
        got = self._entry(ev, body.request, sealed=True)
        if got is not None:
            got[1].commitment = body.commitment
            self._commits[ev.id] = body.request

    def _reveal(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Reveal)
        req_id = self._commits.get(body.commit)
        if req_id is None:
            return self._ignore(ev, "unknown_commit")
        a = self.auctions[req_id]
        entry = a.bids[body.commit]
        if ev.author != entry.provider:
            return self._ignore(ev, "not_committer")
        if ev.ts_ms <= a.request.close_ms:
            return self._ignore(ev, "reveal_early")
        if ev.ts_ms > a.request.reveal_ms:
            return self._ignore(ev, "reveal_late")
        if entry.status == "replaced":
            return self._ignore(ev, "commit_replaced")
        if entry.reveal is not None:
            return self._ignore(ev, "already_revealed")
        if commitment_hash(req_id, body.price, body.nonce) != entry.commitment:
            return self._ignore(ev, "commitment_mismatch")
        entry.reveal, entry.price = ev.id, body.price
        if body.price > a.request.reserve:
            entry.status, entry.reason = "void", "above_reserve"
            self.ignored.append(Ignored(entry.id, "commit", "above_reserve"))
        else:
            entry.status = "valid"

    def _pledge(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Pledge)
        a = self.auctions.get(body.request)
        if a is None:
            return self._ignore(ev, "unknown_request")
        if not a.request.group:
            return self._ignore(ev, "not_group_request")
        if ev.ts_ms > a.request.close_ms:
            return self._ignore(ev, "late")
        if ev.author != a.recipient and ev.author not in a.request.members.devices:
            # Consent: the requester names the group (docs/auctions.md "Groups").
            return self._ignore(ev, "not_invited")
        old = a.pledges.get(ev.author)
        if old is not None:
            self.ignored.append(Ignored(old.event_id, "pledge", "replaced"))
        a.pledges[ev.author] = PledgeEntry(ev.id, ev.author, ev.ts_ms, body.willing,
                                           body.amount, body.sponsor)

    # ------------------------------------------------------------ awards

    def _award(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Award)
        a = self.auctions.get(body.request)
        if a is None:
            return self._ignore(ev, "unknown_request")
        if ev.author != a.recipient:
            return self._ignore(ev, "not_recipient")
        if ev.ts_ms <= a.deadline_ms:
            return self._ignore(ev, "award_before_close")
        if a.outcome is not None:
            return self._ignore(ev, "already_awarded")
        if not a.awards:  # bids are final now: mark sealed bids never revealed
            for b in a.bids.values():
                if b.status == "committed":
                    b.status, b.reason = "void", "unrevealed"
                    self.ignored.append(Ignored(b.id, "commit", "unrevealed"))
        check = self._verify(a, ev, body)
        a.awards.append(check)
        self.awards[ev.id] = check
        for bid in check.omitted:
            self.evidence.append(Evidence(a.recipient, a.id, ev.id, "omitted_bid", bid))
        if not check.considered_known:
            self.evidence.append(Evidence(a.recipient, a.id, ev.id, "considered_unverifiable",
                                          None))
        for p in check.problems:
            if p != "omitted_bids_change_result":
                self.evidence.append(Evidence(a.recipient, a.id, ev.id, p, body.winner))
        if not check.valid:
            return self._ignore(ev, "invalid_award:" + check.problems[0])
        a.outcome = check
        if body.winner is not None:
            self._make_lease(a, ev, a.bids[body.winner], body.price)

    def _verify(self, a: Auction, ev: Event, body: Award) -> AwardCheck:
        valid = a.valid_bids()
        vids = {b.id for b in valid}
        problems: list[str] = []
        considered: list[BidEntry] | None
        extra: tuple[bytes, ...] = ()
        if body.considered:
            if (body.considered_digest != considered_digest(body.considered)
                    or body.considered_count != len(body.considered)):
                problems.append("considered_digest_mismatch")
            cset = set(body.considered)
            considered = [b for b in valid if b.id in cset]
            extra = tuple(i for i in body.considered if i not in vids)
        elif (body.considered_count == len(valid)
              and body.considered_digest == considered_digest(list(vids))):
            considered = valid
        elif body.considered_count == 0 and body.considered_digest == considered_digest([]):
            considered = []
        else:
            considered = None  # a digest we cannot match: judge against every valid bid
        ids = {b.id for b in considered} if considered is not None else vids
        omitted = tuple(sorted(b.id for b in valid if b.id not in ids))
        close = a.request.close_ms

        def ppm(k: bytes) -> int:
            return self._ppm(k, "provider", close)

        rule, reserve = a.request.rule, a.request.reserve
        exp_w, exp_p = clear(rule, valid, reserve, ppm)
        if considered is None or len(considered) == len(valid):
            c_w, c_p = exp_w, exp_p  # the same set (or unknown: judged against all)
        else:
            c_w, c_p = clear(rule, considered, reserve, ppm)
        if body.winner is None:
            if exp_w is not None and not (a.request.group and a.pledged() < (exp_p or 0)):
                problems.append("declined_valid_bids")
        elif body.winner not in vids:
            problems.append("winner_not_valid_bid")
        elif c_w is None or body.winner != c_w.id:
            problems.append("wrong_winner")
        elif body.price != c_p:
            problems.append("wrong_price")
        elif omitted and exp_w is not None and (body.winner != exp_w.id or body.price != exp_p):
            problems.append("omitted_bids_change_result")
        if body.winner is not None and a.request.group and a.pledged() < body.price:
            problems.append("pledges_short")
        return AwardCheck(
            award_id=ev.id, request_id=a.id, recipient=a.recipient, ts_ms=ev.ts_ms,
            winner=body.winner, price=body.price, valid=not problems,
            expected_winner=exp_w.id if exp_w else None, expected_price=exp_p,
            problems=tuple(problems), omitted=omitted, extra=extra,
            considered_count=body.considered_count, considered_known=considered is not None,
        )

    def _make_lease(self, a: Auction, ev: Event, bid: BidEntry, price: int) -> None:
        req = a.request
        members: tuple[bytes, ...] = ()
        payers: tuple[tuple[bytes, int], ...] = ((a.recipient, price),)
        sponsorships: list[tuple[bytes, bytes]] = []
        if req.group:
            willing = {m: p for m, p in a.pledges.items() if p.willing}
            for m, p in sorted(willing.items()):
                for s in p.sponsor:
                    other = a.pledges.get(s)
                    if other is not None and not other.willing:
                        sponsorships.append((m, s))
            members = tuple(sorted(set(willing) | {s for _, s in sponsorships}))
            payers = tuple(sorted((m, p.amount) for m, p in willing.items()))
        lease = Lease(
            id=ev.id, request=a.id, bid=bid.id, provider=bid.provider, recipient=a.recipient,
            service=req.service, chain=req.chain, start_ms=req.start_ms,
            end_ms=req.start_ms + req.duration_ms, max_rate_bps=req.max_rate_bps,
            min_rate_bps=req.min_rate_bps, price=price, currency=req.currency,
            devices=req.members.devices, phones=req.members.phones, users=req.members.users,
            max_devices=req.members.max_devices, group_members=members, payers=payers,
            sponsorships=tuple(sponsorships),
        )
        a.lease = ev.id
        self.leases[ev.id] = lease
        self.paid[ev.id] = 0
        if price == 0:
            self._settle(lease)

    # ------------------------------------------------------------ payments, ratings

    # Everything one auction's fold reads from or gives to the rest of the market goes
    # through these four methods, so `fold.IncrementalMarket` can fold auctions apart.

    def _ppm(self, key: bytes, role: str, as_of_ms: int) -> int:
        return self.reputation.ppm(key, role, as_of_ms)

    def _rater_settled(self, key: bytes, at_ms: int) -> int:
        return self.settled(key, at_ms)

    def _accept_rating(self, r: RatingRecord) -> None:
        self.reputation.add(r.subject, r.role, r.ts_ms, r.satisfied, r.score, r.weight)

    def _settle(self, lease: Lease) -> None:
        for k in {lease.provider, lease.recipient, *lease.group_members}:
            insort(self._settled.setdefault(k, []), lease.end_ms)

    def settled(self, key: bytes, at_ms: int) -> int:
        """Leases `key` was a party to that were fully paid and had ended by `at_ms`."""
        ends = self._settled.get(key)
        if not ends:
            return 0
        return bisect_right(ends, at_ms)

    def _payment(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Payment)
        lease = self.leases.get(body.lease)
        if lease is None:
            return self._ignore(ev, "unknown_lease")
        parties = {lease.recipient, *lease.group_members}
        if ev.author not in parties:
            return self._ignore(ev, "payer_not_member")
        if body.currency != lease.currency:
            return self._ignore(ev, "currency_mismatch")
        if any(k not in parties for k in body.on_behalf):
            return self._ignore(ev, "on_behalf_not_member")
        self.payments.setdefault(lease.id, []).append(PaymentRecord(
            ev.id, lease.id, ev.author, ev.ts_ms, body.amount, body.currency, body.method,
            body.reference, body.on_behalf))
        before = self.paid[lease.id]
        self.paid[lease.id] = before + body.amount
        if before < lease.price <= before + body.amount:
            self._settle(lease)

    def _rating(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Rating)
        author = ev.author
        lease = self.leases.get(body.lease)
        if lease is not None:
            start, weigh_as = lease.start_ms, author
            if author == lease.provider:
                subject, role = lease.recipient, "recipient"
            elif author in lease.keys:
                subject, role = lease.provider, "provider"
                if author in lease.devices and author not in lease.group_members:
                    weigh_as = lease.recipient  # a member device rates for the recipient
            else:
                return self._ignore(ev, "not_a_party")
        else:
            sc = self.subcontracts.get(body.lease)
            if sc is None:
                return self._ignore(ev, "unknown_lease")
            start, weigh_as = sc.ts_ms, author
            if author == sc.provider:
                subject, role = sc.contractor, "provider"
            elif author == sc.contractor:
                subject, role = sc.provider, "recipient"
            else:
                return self._ignore(ev, "not_a_party")
        if body.subject == author or subject == author:
            return self._ignore(ev, "self_dealing")
        if body.subject != subject:
            return self._ignore(ev, "wrong_subject")
        if body.role != role:
            return self._ignore(ev, "wrong_role")
        if ev.ts_ms < start:
            return self._ignore(ev, "before_lease_start")
        if (body.lease, role) in self._rated:
            return self._ignore(ev, "already_rated")
        self._rated.add((body.lease, role))
        weight = self.policy.rater_weight(self._rater_settled(weigh_as, ev.ts_ms))
        rec = RatingRecord(ev.id, body.lease, author, subject, role, ev.ts_ms, body.satisfied,
                           body.score, body.text, weight)
        self.ratings.setdefault(body.lease, []).append(rec)
        self._accept_rating(rec)

    def _subcontract(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Subcontract)
        lease = self.leases.get(body.lease)
        if lease is None:
            return self._ignore(ev, "unknown_lease")
        if ev.author != lease.provider:
            return self._ignore(ev, "not_lease_provider")
        if body.contractor == ev.author:
            return self._ignore(ev, "self_dealing")
        self.subcontracts[ev.id] = SubcontractRecord(ev.id, body.lease, ev.author,
                                                     body.contractor, ev.ts_ms, body.services)

    def _usage(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Usage)
        lease = self.leases.get(body.lease)
        if lease is None:
            return self._ignore(ev, "unknown_lease")
        if ev.author != lease.provider:
            return self._ignore(ev, "not_lease_provider")
        self.usage.setdefault(lease.id, []).append(body)

    def _offer(self, ev: Event) -> None:
        body = ev.body
        assert isinstance(body, Offer)
        # An earlier offer is superseded, not ignored: it counted until this one came.
        # No `Ignored` record for it, so a provider re-publishing its offer for months
        # costs no memory per offer (issue 18; docs/auctions.md "Provider offers").
        self.offers[ev.author] = OfferRecord(ev.id, ev.author, ev.ts_ms, body)

    # ------------------------------------------------------------ queries

    def open_auctions(self, now_ms: int) -> list[Auction]:
        """Auctions still taking bids, commits or reveals at `now_ms` (deadline at or
        after it), in canonical order. The live market answers from an index."""
        return [a for a in self.auctions.values() if a.deadline_ms >= now_ms]

    def leases_of(self, key: bytes) -> list[Lease]:
        """Leases `key` is a party to (provider, recipient, device or group member), in
        canonical order. The live market answers from an index."""
        return [x for x in self.leases.values() if key == x.provider or key in x.keys]

    def party_log(self, key: bytes) -> PartyLog | None:
        """Follow the changes of `key`'s leases (as a party) and subcontracts (as the
        hirer) from now on: the live market logs them, so a reader that walked them
        once then looks at what changed (`PartyLog.drain`). None: this market keeps no
        log (a plain `Market`): walk them all each time."""
        return None

    def payers_for(self, lease_id: bytes) -> dict[bytes, list[bytes]]:
        """Who paid for whom: payer -> members it paid on behalf of (itself if none)."""
        out: dict[bytes, list[bytes]] = {}
        for p in self.payments.get(lease_id, []):
            got = out.setdefault(p.payer, [])
            for k in p.on_behalf or (p.payer,):
                if k not in got:
                    got.append(k)
        return out


# Per class, not per instance: a dict of bound methods costs ~1 KiB per Market and a
# reference cycle that only the cyclic GC frees (the incremental fold makes one Market
# per auction, and drops them).
_HANDLERS: dict[str, Callable[[Market, Event], None]] = {
    "request": Market._request, "bid": Market._bid, "commit": Market._commit,
    "reveal": Market._reveal, "award": Market._award, "payment": Market._payment,
    "rating": Market._rating, "offer": Market._offer, "pledge": Market._pledge,
    "usage": Market._usage, "subcontract": Market._subcontract,
}


def derive(events: Iterable[Event], policy: Policy | None = None) -> Market:
    """Fold events given in canonical order (e.g. `Ledger.iter_canonical()`)."""
    return Market(policy).apply_all(events)


def verify_award(market: Market, award_id: bytes) -> AwardCheck:
    """The verdict on an award: winner/price recomputed from the ledger under the
    request's rule, omitted valid bids, and whether a lease stands."""
    check = market.awards.get(award_id)
    if check is None:
        reason = next((i.reason for i in market.ignored if i.event_id == award_id), None)
        detail = f" (ignored: {reason})" if reason else ""
        raise UsageError(f"no award {award_id.hex()[:16]} of a known request{detail}")
    return check


def rank_offers(
    market: Market, service: str, as_of_ms: int, exclude: bytes | None = None
) -> list[RankedOffer]:
    """Providers' latest offers of `service`: best provider reputation as of
    `as_of_ms` first, then lower price, then higher capacity, then key."""
    out = []
    for rec in market.offers.values():
        if rec.provider == exclude:
            continue
        for so in rec.offer.services:
            if so.name == service:
                rep = market.reputation.score(rec.provider, "provider", as_of_ms)
                out.append(RankedOffer(rec.provider, so, rec.offer.currency,
                                       rec.offer.addrs, rep, rec.event_id))
    out.sort(key=lambda r: (-r.reputation.ppm, r.service.price, -r.service.capacity,
                            r.provider))
    return out


def find_auction(market: Market, prefix: str) -> Auction:
    """An auction by full or unique leading hex of its request id."""
    return market.auctions[_find(market.auctions, prefix, "auction")]


def find_lease(market: Market, prefix: str) -> Lease:
    return market.leases[_find(market.leases, prefix, "lease")]


def _find(d: dict[bytes, Any], prefix: str, what: str) -> bytes:
    p = prefix.lower()
    hits = [k for k in d if k.hex().startswith(p)]
    if len(hits) != 1 or not p:
        n = "no" if not hits else "more than one"
        raise UsageError(f"{n} {what} matches {prefix!r}; give more hex digits of the id")
    return hits[0]
