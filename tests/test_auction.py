"""Auctions: bids, sealed bids, clearing rules, award verification, leases, payments,
ratings, offers, and order independence over a real Ledger."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from market_helpers import (
    CLOSE,
    DURATION,
    START,
    World,
    award,
    ident,
    key,
    payment,
    rating,
    reasons,
    request,
)

from node.auction import (
    DeviceAdmission,
    Market,
    clear,
    derive,
    find_auction,
    make_delegation,
    rank_offers,
    verify_award,
)
from node.auction.views import auction_json, ignored_json, leases_json, market_json
from node.errors import Unauthorized, UsageError
from node.events import (
    Bid,
    Commit,
    Members,
    Offer,
    Reveal,
    ServiceOffer,
    Subcontract,
    Usage,
    sign_event,
)
from node.ledger import Ledger, Status


@pytest.fixture
def w(tmp_path: Path) -> World:
    return World(tmp_path)


# ---------------------------------------------------------------- open bids


def test_lowest_wins_and_lease_is_created(w: World) -> None:
    req = w.pub("alice", request(members=Members(devices=(key("phone1"),))), 10)
    b1 = w.bid("p1", req, 500, 20)
    b2 = w.bid("p2", req, 300, 30)
    b3 = w.bid("p3", req, 400, 40)
    aw = w.pub("alice", award(req.id, b2.id, 300, [b1.id, b2.id, b3.id]), CLOSE + 1)
    m = w.market()
    check = verify_award(m, aw.id)
    assert check.valid and check.problems == () and check.omitted == ()
    assert check.expected_winner == b2.id and check.expected_price == 300
    lease = m.leases[aw.id]
    assert (lease.provider, lease.recipient, lease.price) == (key("p2"), key("alice"), 300)
    assert (lease.start_ms, lease.end_ms, lease.max_rate_bps) == (START, START + DURATION,
                                                                  10_000_000)
    assert lease.may_use(key("alice"), START) and lease.may_use(key("phone1"), START + 99)
    assert not lease.may_use(key("alice"), START - 1)
    assert not lease.may_use(key("alice"), START + DURATION)
    assert not lease.may_use(key("p1"), START)
    assert m.auctions[req.id].status(m.now_ms) == "awarded"
    assert m.evidence == [] and m.ignored == []


def test_ties_break_by_earliest_ts_then_smaller_id(w: World) -> None:
    req = w.pub("alice", request(), 10)
    late = w.bid("p1", req, 300, 30)
    early = w.bid("p2", req, 300, 20)
    a, b = w.bid("p3", req, 200, 50), w.bid("p4", req, 200, 50)
    m = w.market()
    auc = m.auctions[req.id]
    won, price = clear("lowest", auc.valid_bids(), 1000, lambda k: 0)
    assert won is not None and won.id == min(a.id, b.id) and price == 200
    entries = [e for e in auc.valid_bids() if e.id in (late.id, early.id)]
    won, _ = clear("lowest", entries, 1000, lambda k: 0)
    assert won is not None and won.id == early.id


def test_invalid_bids_are_ignored_with_reasons(w: World) -> None:
    req = w.pub("alice", request(reserve=500), 10)
    sealed = w.pub("bob", request(sealed=True, rule="vickrey"), 11)
    unknown = w.pub("p1", Bid(request=b"\x01" * 32, price=1), 20)
    selfbid = w.bid("alice", req, 10, 21)
    above = w.bid("p2", req, 501, 22)
    at_reserve = w.bid("p3", req, 500, 23)
    on_sealed = w.bid("p4", sealed, 5, 24)
    commit_open = w.pub("p5", Commit(request=req.id, commitment=b"\x02" * 32), 25)
    at_close = w.bid("p6", req, 450, CLOSE)
    late = w.bid("p7", req, 1, CLOSE + 1)
    m = w.market()
    assert reasons(m, unknown) == ["unknown_request"]
    assert reasons(m, selfbid) == ["self_dealing"]
    assert reasons(m, above) == ["above_reserve"]
    assert reasons(m, on_sealed) == ["sealed_needs_commit"]
    assert reasons(m, commit_open) == ["open_needs_bid"]
    assert reasons(m, late) == ["late"]
    valid = {b.id for b in m.auctions[req.id].valid_bids()}
    assert valid == {at_reserve.id, at_close.id}
    assert {"id": late.id.hex(), "kind": "bid", "reason": "late"} in ignored_json(m)


def test_request_closing_before_it_was_posted_is_ignored(w: World) -> None:
    req = w.pub("alice", request(close_ms=5, reveal_ms=5), 10)
    bid = w.bid("p1", req, 1, 11)
    m = w.market()
    assert reasons(m, req) == ["closes_before_posted"]
    assert reasons(m, bid) == ["unknown_request"]


def test_latest_bid_per_provider_replaces_earlier(w: World) -> None:
    req = w.pub("alice", request(reserve=500), 10)
    first = w.bid("p1", req, 100, 20)
    second = w.bid("p1", req, 200, 30)
    w.bid("p2", req, 150, 40)
    m = w.market()
    auc = m.auctions[req.id]
    assert auc.bids[first.id].status == "replaced" and reasons(m, first) == ["replaced"]
    assert {b.id for b in auc.valid_bids()} == {second.id, auc.latest[key("p2")]}
    # An on-time bid above the reserve withdraws the earlier one; a late bid does not.
    w.bid("p1", req, 900, 50)
    w.bid("p2", req, 1, CLOSE + 5)
    m = w.market()
    assert [b.provider for b in m.auctions[req.id].valid_bids()] == [key("p2")]


# ---------------------------------------------------------------- awards


def test_award_from_someone_else_early_or_unknown_is_ignored(w: World) -> None:
    req = w.pub("alice", request(), 10)
    b = w.bid("p1", req, 100, 20)
    other = w.pub("mallory", award(req.id, b.id, 100, [b.id]), CLOSE + 1)
    early = w.pub("alice", award(req.id, b.id, 100, [b.id]), CLOSE)
    unknown = w.pub("alice", award(b"\x07" * 32, b.id, 100, [b.id]), CLOSE + 2)
    m = w.market()
    assert reasons(m, other) == ["not_recipient"]
    assert reasons(m, early) == ["award_before_close"]
    assert reasons(m, unknown) == ["unknown_request"]
    assert m.leases == {} and m.auctions[req.id].status(m.now_ms) == "closed"
    with pytest.raises(UsageError, match="not_recipient"):
        verify_award(m, other.id)


def test_wrong_winner_or_price_is_flagged_and_a_correction_stands(w: World) -> None:
    req = w.pub("alice", request(), 10)
    cheap = w.bid("p1", req, 100, 20)
    dear = w.bid("p2", req, 200, 21)
    ids = [cheap.id, dear.id]
    bad = w.pub("alice", award(req.id, dear.id, 200, ids), CLOSE + 1)
    wrong_price = w.pub("alice", award(req.id, cheap.id, 150, ids), CLOSE + 2)
    good = w.pub("alice", award(req.id, cheap.id, 100, ids), CLOSE + 3)
    again = w.pub("alice", award(req.id, cheap.id, 100, ids), CLOSE + 4)
    m = w.market()
    assert verify_award(m, bad.id).problems == ("wrong_winner",)
    assert not verify_award(m, bad.id).valid
    assert verify_award(m, wrong_price.id).problems == ("wrong_price",)
    assert reasons(m, bad) == ["invalid_award:wrong_winner"]
    assert verify_award(m, good.id).valid and list(m.leases) == [good.id]
    assert reasons(m, again) == ["already_awarded"]
    kinds = [(e.kind, e.award) for e in m.evidence]
    assert kinds == [("wrong_winner", bad.id), ("wrong_price", wrong_price.id)]
    assert all(e.recipient == key("alice") for e in m.evidence)


def test_only_invalid_awards_leave_status_award_invalid(w: World) -> None:
    req = w.pub("alice", request(), 10)
    b = w.bid("p1", req, 100, 20)
    w.pub("alice", award(req.id, b.id, 999, [b.id]), CLOSE + 1)
    m = w.market()
    assert m.auctions[req.id].status(m.now_ms) == "award_invalid" and m.leases == {}


def test_omitted_bid_that_would_not_win_is_evidence_but_lease_stands(w: World) -> None:
    req = w.pub("alice", request(), 10)
    cheap = w.bid("p1", req, 100, 20)
    dear = w.bid("p2", req, 200, 21)
    aw = w.pub("alice", award(req.id, cheap.id, 100, [cheap.id]), CLOSE + 1)
    m = w.market()
    check = verify_award(m, aw.id)
    assert check.valid and check.omitted == (dear.id,)
    assert aw.id in m.leases
    assert [(e.kind, e.bid) for e in m.evidence] == [("omitted_bid", dear.id)]


def test_omitted_bid_that_would_win_invalidates_the_award(w: World) -> None:
    req = w.pub("alice", request(), 10)
    cheap = w.bid("p1", req, 100, 20)
    dear = w.bid("p2", req, 200, 21)
    aw = w.pub("alice", award(req.id, dear.id, 200, [dear.id]), CLOSE + 1)
    m = w.market()
    check = verify_award(m, aw.id)
    assert not check.valid and check.problems == ("omitted_bids_change_result",)
    assert check.expected_winner == cheap.id and m.leases == {}
    assert [(e.kind, e.bid) for e in m.evidence] == [("omitted_bid", cheap.id)]


def test_considered_ids_that_are_not_valid_bids_are_harmless(w: World) -> None:
    req = w.pub("alice", request(reserve=150), 10)
    cheap = w.bid("p1", req, 100, 20)
    above = w.bid("p2", req, 200, 21)
    aw = w.pub("alice", award(req.id, cheap.id, 100, [cheap.id, above.id]), CLOSE + 1)
    check = verify_award(w.market(), aw.id)
    assert check.valid and check.extra == (above.id,)


def test_award_by_digest_only(w: World) -> None:
    req = w.pub("alice", request(), 10)
    bids = [w.bid(f"p{i}", req, 100 + i, 20 + i) for i in range(3)]
    ids = [b.id for b in bids]
    ok = w.pub("alice", award(req.id, ids[0], 100, ids, listed=False), CLOSE + 1)
    m = w.market()
    assert verify_award(m, ok.id).valid and verify_award(m, ok.id).considered_known


def test_unmatched_digest_is_judged_against_every_valid_bid(w: World) -> None:
    req = w.pub("alice", request(), 10)
    bids = [w.bid(f"p{i}", req, 100 + i, 20 + i) for i in range(3)]
    partial = [b.id for b in bids[1:]]
    bad = w.pub("alice", award(req.id, bids[1].id, 101, partial, listed=False), CLOSE + 1)
    ok = w.pub("alice", award(req.id, bids[0].id, 100, partial, listed=False), CLOSE + 2)
    m = w.market()
    assert verify_award(m, bad.id).problems == ("wrong_winner",)
    c = verify_award(m, ok.id)
    assert c.valid and not c.considered_known
    assert ("considered_unverifiable", ok.id) in [(e.kind, e.award) for e in m.evidence]


def test_listed_considered_with_inconsistent_digest_is_invalid(w: World) -> None:
    req = w.pub("alice", request(), 10)
    b = w.bid("p1", req, 100, 20)
    body = award(req.id, b.id, 100, [b.id])
    from dataclasses import replace
    aw = w.pub("alice", replace(body, considered_count=2), CLOSE + 1)
    assert verify_award(w.market(), aw.id).problems == ("considered_digest_mismatch",)


def test_no_deal_award(w: World) -> None:
    empty = w.pub("alice", request(), 10)
    busy = w.pub("bob", request(), 11)
    w.bid("p1", busy, 100, 20)
    none_ok = w.pub("alice", award(empty.id, None, 0), CLOSE + 1)
    none_bad = w.pub("bob", award(busy.id, None, 0), CLOSE + 1)
    m = w.market()
    assert verify_award(m, none_ok.id).valid
    assert m.auctions[empty.id].status(m.now_ms) == "no_deal"
    assert verify_award(m, none_bad.id).problems == ("declined_valid_bids",)
    assert m.leases == {}


# ---------------------------------------------------------------- sealed bids


def test_sealed_vickrey_pays_second_price(w: World) -> None:
    req = w.pub("alice", request(sealed=True, rule="vickrey", reserve=900), 10)
    c1, n1 = w.commit("p1", req, 300, 20)
    c2, n2 = w.commit("p2", req, 500, 21)
    c3, n3 = w.commit("p3", req, 400, 22)
    m = w.market()
    entries = m.auctions[req.id].bids.values()
    assert all(b.status == "committed" and b.price is None for b in entries)
    assert m.auctions[req.id].status(CLOSE + 1) == "revealing"
    w.reveal("p1", c1, 300, n1, CLOSE + 1)
    w.reveal("p2", c2, 500, n2, CLOSE + 2)
    w.reveal("p3", c3, 400, n3, CLOSE + 3)
    aw = w.pub("alice", award(req.id, c1.id, 400, [c1.id, c2.id, c3.id]), CLOSE + 51)
    m = w.market()
    assert verify_award(m, aw.id).valid and m.leases[aw.id].price == 400


def test_vickrey_single_bid_pays_reserve(w: World) -> None:
    req = w.pub("alice", request(sealed=True, rule="vickrey", reserve=900), 10)
    c1, n1 = w.commit("p1", req, 300, 20)
    w.reveal("p1", c1, 300, n1, CLOSE + 10)
    aw = w.pub("alice", award(req.id, c1.id, 900, [c1.id]), CLOSE + 51)
    m = w.market()
    assert verify_award(m, aw.id).valid and m.leases[aw.id].price == 900


def test_sealed_reveal_rules(w: World) -> None:
    req = w.pub("alice", request(sealed=True, rule="lowest", reserve=900), 10)
    c1, n1 = w.commit("p1", req, 300, 20)
    c2, n2 = w.commit("p2", req, 200, 21)
    c3, _ = w.commit("p3", req, 100, 22)
    old, n_old = w.commit("p4", req, 50, 23)
    c4, n4 = w.commit("p4", req, 950, 24)
    c5, n5 = w.commit("p5", req, 250, 25)
    c6, n6 = w.commit("p6", req, 260, 26)
    early = w.reveal("p1", c1, 300, n1, CLOSE)
    thief = w.reveal("p2", c1, 300, n1, CLOSE + 1)
    wrong = w.reveal("p2", c2, 201, n2, CLOSE + 2)
    ok1 = w.reveal("p1", c1, 300, n1, CLOSE + 3)
    twice = w.reveal("p1", c1, 300, n1, CLOSE + 4)
    replaced = w.reveal("p4", old, 50, n_old, CLOSE + 5)
    above = w.reveal("p4", c4, 950, n4, CLOSE + 6)
    ghost = w.pub("p5", Reveal(commit=b"\x09" * 32, price=1, nonce=b"\x00" * 16), CLOSE + 7)
    w.reveal("p5", c5, 250, n5, CLOSE + 8)
    late = w.reveal("p6", c6, 260, n6, CLOSE + 51)
    aw = w.pub("alice", award(req.id, c5.id, 250, [c1.id, c5.id]), CLOSE + 52)
    m = w.market()
    assert reasons(m, early) == ["reveal_early"]
    assert reasons(m, thief) == ["not_committer"]
    assert reasons(m, wrong) == ["commitment_mismatch"]
    assert reasons(m, ok1) == []
    assert reasons(m, twice) == ["already_revealed"]
    assert reasons(m, replaced) == ["commit_replaced"]
    assert reasons(m, above) == [] and reasons(m, c4) == ["above_reserve"]
    assert reasons(m, ghost) == ["unknown_commit"]
    assert reasons(m, late) == ["reveal_late"]
    assert reasons(m, c2) == ["unrevealed"] and reasons(m, c3) == ["unrevealed"]
    assert reasons(m, c6) == ["unrevealed"]
    auc = m.auctions[req.id]
    assert {b.id for b in auc.valid_bids()} == {c1.id, c5.id}
    assert verify_award(m, aw.id).valid


# ---------------------------------------------------------------- best value


def _rated_provider(w: World, provider: str, score: int, satisfied: bool, t0: int) -> None:
    """A finished lease of `provider` for `buyer-<provider>`, rated by the buyer."""
    buyer = "buyer-" + provider
    req = w.pub(buyer, request(close_ms=t0 + 10, reveal_ms=t0 + 10, start_ms=t0 + 20,
                               duration_ms=5), t0)
    b = w.bid(provider, req, 10, t0 + 1)
    aw = w.pub(buyer, award(req.id, b.id, 10, [b.id]), t0 + 11)
    w.pub(buyer, rating(aw.id, provider, "provider", satisfied, score), t0 + 25)


def test_best_value_weighs_reputation_as_of_close(w: World) -> None:
    for i in range(3):
        _rated_provider(w, "good", 5, True, 10 + 30 * i)
        _rated_provider(w, "bad", 1, False, 11 + 30 * i)
    close = 1000
    req = w.pub("alice", request(rule="best_value", close_ms=close, reveal_ms=close,
                                 start_ms=2000), 500)
    good = w.bid("good", req, 120, 600)
    bad = w.bid("bad", req, 100, 601)
    # A glowing rating after close must not count for this auction.
    _rated_provider(w, "bad", 5, True, close + 1)
    m0 = w.market()
    rep_good = m0.reputation.score(key("good"), "provider", close)
    rep_bad = m0.reputation.score(key("bad"), "provider", close)
    assert rep_good.ratings == 3 and rep_bad.ratings == 3
    assert 120 * (2_000_000 - rep_good.ppm) < 100 * (2_000_000 - rep_bad.ppm)
    aw = w.pub("alice", award(req.id, good.id, 120, [good.id, bad.id]), close + 100)
    m = w.market()
    assert verify_award(m, aw.id).valid
    view = auction_json(m, m.auctions[req.id])
    shown = {b["provider"]: b["reputation"] for b in view["bid_list"]}
    assert shown[key("bad").hex()]["ratings"] == 3  # as of the close, not now
    assert m.reputation.score(key("bad"), "provider").ratings == 4


# ---------------------------------------------------------------- leases


def _leased(w: World, **kw: object) -> tuple[Market, bytes]:
    req = w.pub("alice", request(**kw), 10)
    b = w.bid("prov", req, 100, 20)
    aw = w.pub("alice", award(req.id, b.id, 100, [b.id]), CLOSE + 1)
    return w.market(), aw.id


def test_delegation_and_device_admission(w: World) -> None:
    m, lid = _leased(w, members=Members(phones=("+4912345",), users=("carol",),
                                        max_devices=2))
    lease = m.leases[lid]
    dev1, dev2, dev3 = key("d1"), key("d2"), key("d3")
    tok = make_delegation(ident("alice"), lid, dev1, "+4912345")
    assert lease.check_delegation(dev1, tok) == "+4912345"
    with pytest.raises(Unauthorized):
        lease.check_delegation(dev2, tok)  # bound to the device key
    with pytest.raises(Unauthorized, match="not signed by the recipient"):
        lease.check_delegation(dev1, make_delegation(ident("mallory"), lid, dev1, "carol"))
    forged = tok[:40] + bytes([tok[40] ^ 1]) + tok[41:]
    with pytest.raises(Unauthorized, match="does not verify"):
        lease.check_delegation(dev1, forged)
    adm = DeviceAdmission(lease)
    assert adm.admit(key("alice"), START) == "member"
    assert adm.admit(dev1, START, tok) == "+4912345"
    assert adm.admit(dev1, START + 1, tok) == "+4912345"  # same device counts once
    assert adm.admit(dev2, START, make_delegation(ident("alice"), lid, dev2, "tablet")) == "tablet"
    with pytest.raises(Unauthorized, match="at most 2"):
        adm.admit(dev3, START, make_delegation(ident("alice"), lid, dev3, "carol"))
    with pytest.raises(Unauthorized, match="not active"):
        adm.admit(dev1, START + DURATION, tok)
    with pytest.raises(Unauthorized, match="delegation token"):
        adm.admit(dev3, START)
    with pytest.raises(UsageError):
        make_delegation(ident("alice"), lid, dev1, "")


def test_delegation_label_must_name_a_member_without_max_devices(w: World) -> None:
    m, lid = _leased(w, members=Members(users=("carol",)))
    lease = m.leases[lid]
    good = make_delegation(ident("alice"), lid, key("d1"), "carol")
    assert lease.check_delegation(key("d1"), good) == "carol"
    with pytest.raises(Unauthorized, match="names no member"):
        lease.check_delegation(key("d1"), make_delegation(ident("alice"), lid, key("d1"), "eve"))
    with pytest.raises(Unauthorized, match="wrong size"):
        lease.check_delegation(key("d1"), b"short")


# ---------------------------------------------------------------- payments


def test_payments(w: World) -> None:
    _, lid = _leased(w)
    ok = w.pub("alice", payment(lid, 60), 150)
    w.pub("alice", payment(lid, 40), 151)
    unknown = w.pub("alice", payment(b"\x05" * 32, 1), 152)
    stranger = w.pub("mallory", payment(lid, 1), 153)
    wrong_cur = w.pub("alice", payment(lid, 1, currency="USD"), 154)
    behalf = w.pub("alice", payment(lid, 1, on_behalf=(key("mallory"),)), 155)
    m = w.market()
    assert m.paid[lid] == 100 and m.payments[lid][0].event_id == ok.id
    assert reasons(m, unknown) == ["unknown_lease"]
    assert reasons(m, stranger) == ["payer_not_member"]
    assert reasons(m, wrong_cur) == ["currency_mismatch"]
    assert reasons(m, behalf) == ["on_behalf_not_member"]
    assert m.payers_for(lid) == {key("alice"): [key("alice")]}
    assert m.settled(key("prov"), START + DURATION) == 1
    assert m.settled(key("prov"), START + DURATION - 1) == 0
    assert leases_json(m)[0]["paid"] == 100


# ---------------------------------------------------------------- ratings


def test_ratings_both_ways_once_each(w: World) -> None:
    m, lid = _leased(w, members=Members(devices=(key("phone"),)))
    early = w.pub("alice", rating(lid, "prov", "provider"), START - 1)
    by_device = w.pub("phone", rating(lid, "prov", "provider", True, 4), START + 5)
    again = w.pub("alice", rating(lid, "prov", "provider", False, 1), START + 6)
    prov = w.pub("prov", rating(lid, "alice", "recipient", True, 5), START + 7)
    prov2 = w.pub("prov", rating(lid, "alice", "recipient", False, 1), START + 8)
    stranger = w.pub("mallory", rating(lid, "prov", "provider"), START + 9)
    wrong_subject = w.pub("phone", rating(lid, "mallory", "provider"), START + 10)
    wrong_role = w.pub("prov", rating(lid, "alice", "provider"), START + 11)
    selfie = w.pub("prov", rating(lid, "prov", "recipient"), START + 12)
    unknown = w.pub("alice", rating(b"\x03" * 32, "prov", "provider"), START + 13)
    m = w.market()
    assert reasons(m, early) == ["before_lease_start"]
    assert reasons(m, by_device) == [] and reasons(m, prov) == []
    assert reasons(m, again) == ["already_rated"] and reasons(m, prov2) == ["already_rated"]
    assert reasons(m, stranger) == ["not_a_party"]
    assert reasons(m, wrong_subject) == ["wrong_subject"]
    assert reasons(m, wrong_role) == ["wrong_role"]
    assert reasons(m, selfie) == ["self_dealing"]
    assert reasons(m, unknown) == ["unknown_lease"]
    p = m.reputation.score(key("prov"), "provider")
    r = m.reputation.score(key("alice"), "recipient")
    assert (p.ratings, p.satisfied, p.stars_sum) == (1, 1, 4)
    assert (r.ratings, r.satisfied) == (1, 1)
    assert m.reputation.score(key("alice"), "provider").ratings == 0


def test_subcontract_ratings(w: World) -> None:
    _, lid = _leased(w)
    sc = w.pub("prov", Subcontract(lease=lid, contractor=key("sub"), services=("zstd",),
                                   segments=3, bytes_in=100, result_digest=b"\x00" * 32), 210)
    notprov = w.pub("mallory", Subcontract(lease=lid, contractor=key("sub"), services=(),
                                           segments=0, bytes_in=0,
                                           result_digest=b"\x00" * 32), 211)
    selfsc = w.pub("prov", Subcontract(lease=lid, contractor=key("prov"), services=(),
                                       segments=0, bytes_in=0, result_digest=b"\x00" * 32), 212)
    r1 = w.pub("prov", rating(sc.id, "sub", "provider", True, 3), 220)
    r2 = w.pub("sub", rating(sc.id, "prov", "recipient", True, 5), 221)
    r3 = w.pub("alice", rating(sc.id, "sub", "provider"), 222)
    r4 = w.pub("sub", rating(notprov.id, "mallory", "recipient"), 223)
    m = w.market()
    assert reasons(m, notprov) == ["not_lease_provider"]
    assert reasons(m, selfsc) == ["self_dealing"]
    assert reasons(m, r1) == [] and reasons(m, r2) == []
    assert reasons(m, r3) == ["not_a_party"] and reasons(m, r4) == ["unknown_lease"]
    assert m.reputation.score(key("sub"), "provider").stars_sum == 3
    assert m.reputation.score(key("prov"), "recipient").ratings == 1


def test_usage_from_the_provider_only(w: World) -> None:
    _, lid = _leased(w)
    ok = w.pub("prov", Usage(lease=lid, members=(), shortfall_ms=0, rate_limited=0,
                             subcontracts=0), 301)
    bad = w.pub("alice", Usage(lease=lid, members=(), shortfall_ms=0, rate_limited=0,
                               subcontracts=0), 302)
    m = w.market()
    assert reasons(m, ok) == [] and reasons(m, bad) == ["not_lease_provider"]
    assert len(m.usage[lid]) == 1


# ---------------------------------------------------------------- offers


def _offer(price: int, capacity: int, service: str = "zstd") -> Offer:
    return Offer(services=(ServiceOffer(name=service, price=price, capacity=capacity),),
                 currency="EUR", addrs=("/ip4/127.0.0.1/tcp/1",))


def test_rank_offers(w: World) -> None:
    _rated_provider(w, "good", 5, True, 10)
    w.pub("cheap", _offer(1, 10), 100)
    w.pub("big", _offer(1, 99), 101)
    w.pub("good", _offer(50, 1), 102)
    first = w.pub("dear", _offer(1, 1), 103)
    w.pub("dear", _offer(9, 1), 104)  # the latest offer counts
    w.pub("other", _offer(1, 1, "lz4"), 105)
    m = w.market()
    ranked = [r.provider for r in rank_offers(m, "zstd", 200)]
    assert ranked == [key("good"), key("big"), key("cheap"), key("dear")]
    assert rank_offers(m, "zstd", 200, exclude=key("good"))[0].provider == key("big")
    assert reasons(m, first) == []  # superseded, not ignored: it counted until replaced
    assert m.offers[key("dear")].event_id != first


# ---------------------------------------------------------------- folding


def test_apply_refuses_out_of_order_events(w: World) -> None:
    a = w.pub("alice", request(), 10)
    b = w.bid("p1", a, 5, 20)
    m = Market()
    m.apply(b)
    with pytest.raises(UsageError, match="canonical order"):
        m.apply(a)
    with pytest.raises(UsageError):
        m.apply(b)


def test_find_auction_by_prefix(w: World) -> None:
    req = w.pub("alice", request(), 10)
    m = w.market()
    assert find_auction(m, req.id.hex()[:8]).id == req.id
    with pytest.raises(UsageError, match="no auction"):
        find_auction(m, "zz")


def _scenario(tmp: Path) -> tuple[list[bytes], dict[str, object]]:
    """A busy market: open, sealed and best-value auctions, invalid events, payments,
    ratings both ways, a subcontract and offers. Returns the wires and the derivation."""
    w = World(tmp)
    for i in range(2):
        _rated_provider(w, "good", 5, True, 10 + 40 * i)
        _rated_provider(w, "bad", 2, False, 11 + 40 * i)
    r1 = w.pub("alice", request(close_ms=300, reveal_ms=300, start_ms=400, rule="best_value",
                                members=Members(devices=(key("phone"),))), 200)
    r2 = w.pub("bob", request(close_ms=300, sealed=True, rule="vickrey", start_ms=400), 201)
    b1 = w.bid("good", r1, 120, 210)
    b2 = w.bid("bad", r1, 100, 210)
    w.bid("alice", r1, 1, 211)
    c1, n1 = w.commit("p1", r2, 300, 220)
    c2, n2 = w.commit("good", r2, 200, 221)
    w.bid("late", r1, 1, 301)
    w.reveal("p1", c1, 300, n1, 310)
    w.reveal("good", c2, 200, n2, 320)
    a1 = w.pub("alice", award(r1.id, b1.id, 120, [b1.id, b2.id]), 301)
    a2 = w.pub("bob", award(r2.id, c2.id, 300, [c1.id, c2.id]), 351)
    w.pub("alice", payment(a1.id, 120), 360)
    w.pub("bob", payment(a2.id, 300), 361)
    w.pub("phone", rating(a1.id, "good", "provider", True, 4), 410)
    w.pub("good", rating(a1.id, "alice", "recipient", True, 5), 411)
    w.pub("good", rating(a2.id, "bob", "recipient", False, 2), 412)
    w.pub("bob", rating(a2.id, "good", "provider", True, 5), 412)
    sc = w.pub("good", Subcontract(lease=a2.id, contractor=key("p1"), services=("zstd",),
                                   segments=1, bytes_in=1, result_digest=b"\x00" * 32), 420)
    w.pub("p1", rating(sc.id, "good", "recipient", True, 5), 430)
    w.pub("p1", _offer(3, 3), 440)
    w.pub("bad", _offer(2, 3), 441)
    g = w.pub("carol", request(group=True, close_ms=500, reveal_ms=500, start_ms=600,
                               members=Members(devices=(key("erin"), key("dave")))), 450)
    w.pledge("carol", g, True, 100, sponsor=("dave",), ts=460)
    w.pledge("erin", g, True, 100, ts=461)
    w.pledge("dave", g, False, ts=462)
    gb = w.bid("p1", g, 150, 470)
    w.bid("p2", g, 180, 471)
    ga = w.pub("carol", award(g.id, gb.id, 150, [gb.id]), 501)  # omits p2: evidence only
    w.pub("erin", payment(ga.id, 75), 510)
    w.pub("carol", payment(ga.id, 75, on_behalf=(key("carol"), key("dave"))), 511)
    w.pub("dave", rating(ga.id, "p1", "provider", False, 2), 600)
    w.pub("erin", rating(ga.id, "p1", "provider", True, 5), 601)  # already rated
    m = w.market()
    assert len(m.leases) == 3 + 4 and verify_award(m, a2.id).valid
    assert verify_award(m, ga.id).omitted and len(m.leases[ga.id].group_members) == 3
    wires = list(w.ledger.iter_wires())
    w.ledger.close()
    return wires, market_json(m)


_TMP = tempfile.TemporaryDirectory()
SCENARIO = _scenario(Path(_TMP.name))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_any_arrival_order_gives_the_same_market(rnd: random.Random) -> None:
    wires, want = SCENARIO
    order = list(wires)
    rnd.shuffle(order)
    with tempfile.TemporaryDirectory() as d:
        led = Ledger(Path(d) / "l.db", network="test")
        # Deliver in shuffled batches; gaps wait in the pending buffer.
        for i in range(0, len(order), 7):
            led.append_many(order[i:i + 7])
        assert led.count() == len(wires) and led.pending_count == 0
        got = market_json(derive(led.iter_canonical()))
        led.close()
    assert got == want


@settings(max_examples=15, deadline=None)
@given(st.randoms(use_true_random=False))
def test_fork_excludes_equivocator_everywhere(rnd: random.Random) -> None:
    with tempfile.TemporaryDirectory() as d:
        w = World(Path(d) / "a")
        req = w.pub("alice", request(), 10)
        w.pub("cheat", request(), 11)  # seq 1 of the cheat stays valid
        honest = w.bid("p1", req, 200, 20)
        cheat = w.bid("cheat", req, 100, 21)  # seq 2: forked below
        aw = w.pub("alice", award(req.id, honest.id, 200, [honest.id]), CLOSE + 1)
        other = sign_event(ident("cheat").seed, 2, cheat.prev, 22,
                           Bid(request=req.id, price=150), "test")
        wires = [*w.ledger.iter_wires(), other.wire]
        w.ledger.close()
        rnd.shuffle(wires)
        led = Ledger(Path(d) / f"b{rnd.random()}.db", network="test")
        statuses = {r.status for r in led.append_many(wires)}
        # Pull sync resends what a peer lacks; resending must not change the outcome.
        statuses |= {r.status for r in led.append_many(wires)}
        assert Status.FORK in statuses and led.forked() == {key("cheat"): 2}
        m = derive(led.iter_canonical())
        led.close()
    auc = m.auctions[req.id]
    assert cheat.id not in auc.bids and other.id not in auc.bids
    assert len(m.auctions) == 2  # the cheat's seq-1 request still counts
    assert verify_award(m, aw.id).valid and aw.id in m.leases


def test_views_are_json_and_show_status_and_evidence(w: World) -> None:
    import json

    from node.auction.views import auctions_json, offers_json, reputation_json

    req = w.pub("alice", request(), 10)
    cheap = w.bid("p1", req, 100, 20)
    dear = w.bid("p2", req, 200, 21)
    aw = w.pub("alice", award(req.id, cheap.id, 100, [cheap.id]), CLOSE + 1)
    w.pub("p1", _offer(5, 5), START + 1)
    w.pub("alice", rating(aw.id, "p1", "provider", True, 5), START + 2)
    m = w.market()
    json.dumps(market_json(m))
    [summary] = auctions_json(m)
    assert summary["status"] == "awarded" and summary["winner"] == cheap.id.hex()
    full = auction_json(m, m.auctions[req.id])
    assert [e["kind"] for e in full["evidence"]] == ["omitted_bid"]
    assert full["evidence"][0]["bid"] == dear.id.hex()
    assert [b["winner"] for b in full["bid_list"]] == [True, False]
    [row] = reputation_json(m, key("p1"))
    assert row["provider"]["ratings"] == 1 and row["recipient"]["ratings"] == 0
    assert offers_json(m, "zstd")[0]["provider"] == key("p1").hex()
