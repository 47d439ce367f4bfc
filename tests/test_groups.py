"""Group requests: pledges, sponsors, coverage of the price, lease membership,
payments on behalf of others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from market_helpers import CLOSE, START, World, award, key, payment, rating, reasons, request

from node.auction import verify_award
from node.auction.views import lease_json
from node.events import Members, Request


def group_request(*invited: str, **kw: Any) -> Request:
    """A group request naming who may pledge (besides the requester)."""
    return request(group=True, members=Members(devices=tuple(key(n) for n in invited)), **kw)


@pytest.fixture
def w(tmp_path: Path) -> World:
    return World(tmp_path)


def test_group_award_covered_by_pledges_leases_everyone(w: World) -> None:
    invited = ("alice-phone", "bob", "carol", "dave", "erin")
    req = w.pub("alice", request(group=True, reserve=900,
                                 members=Members(devices=tuple(key(n) for n in invited))), 10)
    w.pledge("alice", req, True, 300, sponsor=("dave",), ts=20)
    w.pledge("bob", req, True, 200, sponsor=("dave", "erin"), ts=21)
    w.pledge("carol", req, True, 100, ts=22)
    w.pledge("dave", req, False, ts=23)
    w.pledge("erin", req, False, ts=24)
    frank = w.pledge("frank", req, True, 0, ts=25)  # a stranger: his pledge does not count
    b = w.bid("prov", req, 600, 30)
    aw = w.pub("alice", award(req.id, b.id, 600, [b.id]), CLOSE + 1)
    m = w.market()
    assert verify_award(m, aw.id).valid
    lease = m.leases[aw.id]
    members = {key(n) for n in ("alice", "bob", "carol", "dave", "erin")}
    assert set(lease.group_members) == members
    for n in ("bob", "dave", "erin", "alice-phone"):
        assert lease.may_use(key(n), START)
    assert not lease.may_use(key("frank"), START)
    assert reasons(m, frank) == ["not_invited"]
    assert set(lease.sponsorships) == {(key("alice"), key("dave")), (key("bob"), key("dave")),
                                       (key("bob"), key("erin"))}
    assert lease.shares() == {key("alice"): 300, key("bob"): 200, key("carol"): 100}
    assert sum(lease.shares().values()) == lease.price
    view = lease_json(m, lease)
    assert {s["member"] for s in view["sponsorships"]} == {key("dave").hex(), key("erin").hex()}


def test_award_before_pledges_cover_the_price_is_invalid(w: World) -> None:
    req = w.pub("alice", group_request("bob", reserve=900), 10)
    w.pledge("alice", req, True, 100, ts=20)
    w.pledge("bob", req, True, 100, ts=21)
    b = w.bid("prov", req, 300, 30)
    bad = w.pub("alice", award(req.id, b.id, 300, [b.id]), CLOSE + 1)
    nodeal = w.pub("alice", award(req.id, None, 0, [b.id]), CLOSE + 2)
    m = w.market()
    assert verify_award(m, bad.id).problems == ("pledges_short",)
    assert m.leases == {}
    assert verify_award(m, nodeal.id).valid  # declining is fine when pledges fall short
    assert m.auctions[req.id].status(m.now_ms) == "no_deal"


def test_shares_split_with_largest_remainder() -> None:
    from node.auction import Lease

    a, b, c = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    lease = Lease(id=b"\x00" * 32, request=b"\x00" * 32, bid=b"\x00" * 32, provider=c,
                  recipient=a, service="x", chain=(), start_ms=0, end_ms=1, max_rate_bps=None,
                  min_rate_bps=None, price=100, currency="EUR", devices=(), phones=(),
                  users=(), max_devices=None, group_members=(a, b, c),
                  payers=((a, 1), (b, 1), (c, 1)), sponsorships=())
    assert lease.shares() == {a: 34, b: 33, c: 33}


def test_pledge_rules(w: World) -> None:
    solo = w.pub("alice", request(), 10)
    grp = w.pub("bob", group_request("carol", "dave"), 11)
    not_group = w.pledge("carol", solo, True, 10, ts=20)
    unknown = w.pub("carol", type(not_group.body)(request=b"\x04" * 32, willing=True,
                                                  amount=1, sponsor=()), 21)
    first = w.pledge("carol", grp, True, 10, ts=22)
    w.pledge("carol", grp, True, 50, ts=23)
    late = w.pledge("dave", grp, True, 10, ts=CLOSE + 1)
    m = w.market()
    assert reasons(m, not_group) == ["not_group_request"]
    assert reasons(m, unknown) == ["unknown_request"]
    assert reasons(m, first) == ["replaced"]
    assert reasons(m, late) == ["late"]
    assert m.auctions[grp.id].pledged() == 50


def test_group_members_cannot_bid_on_their_own_request(w: World) -> None:
    req = w.pub("alice", group_request("insider"), 10)
    w.pledge("alice", req, True, 500, ts=20)
    w.pledge("insider", req, True, 10, ts=21)
    inside = w.bid("insider", req, 1, 30)
    outside = w.bid("prov", req, 400, 31)
    aw = w.pub("alice", award(req.id, outside.id, 400, [outside.id]), CLOSE + 1)
    m = w.market()
    assert [b.id for b in m.auctions[req.id].valid_bids()] == [outside.id]
    assert inside.id in m.auctions[req.id].bids
    assert verify_award(m, aw.id).valid


def test_sponsor_pays_on_behalf_and_members_rate(w: World) -> None:
    req = w.pub("alice", group_request("bob", "carol"), 10)
    w.pledge("alice", req, True, 50, ts=20)
    w.pledge("bob", req, True, 100, sponsor=("carol",), ts=21)
    w.pledge("carol", req, False, ts=22)
    b = w.bid("prov", req, 150, 30)
    aw = w.pub("alice", award(req.id, b.id, 150, [b.id]), CLOSE + 1)
    w.pub("alice", payment(aw.id, 50), 150)
    w.pub("bob", payment(aw.id, 100, on_behalf=(key("bob"), key("carol"))), 151)
    outsider = w.pub("prov", payment(aw.id, 1), 152)
    r = w.pub("carol", rating(aw.id, "prov", "provider", True, 5), START + 1)
    m = w.market()
    assert m.paid[aw.id] == 150 and reasons(m, outsider) == ["payer_not_member"]
    assert m.payers_for(aw.id) == {key("alice"): [key("alice")],
                                   key("bob"): [key("bob"), key("carol")]}
    assert reasons(m, r) == [] and m.reputation.score(key("prov"), "provider").ratings == 1
    assert m.settled(key("carol"), START + 1000) == 1


def test_strangers_pledge_counts_for_nothing(w: World) -> None:
    """A key the requester did not name pledges `willing, amount = 0`: ignored
    (`not_invited`), so it is no member, cannot stream, delegate or be sponsored in."""
    from market_helpers import ident

    from node.auction import DeviceAdmission, make_delegation
    from node.errors import Unauthorized

    req = w.pub("alice", group_request("bob", "carol"), 10)
    w.pledge("alice", req, True, 100, sponsor=("carol", "mallory"), ts=20)
    w.pledge("bob", req, True, 100, ts=21)
    w.pledge("carol", req, False, ts=22)
    stranger = w.pledge("mallory", req, True, 0, ts=23)
    b = w.bid("prov", req, 200, 30)
    aw = w.pub("alice", award(req.id, b.id, 200, [b.id]), CLOSE + 1)
    m = w.market()
    assert reasons(m, stranger) == ["not_invited"]
    assert key("mallory") not in m.auctions[req.id].pledges
    lease = m.leases[aw.id]
    assert set(lease.group_members) == {key("alice"), key("bob"), key("carol")}
    assert (key("alice"), key("carol")) in lease.sponsorships  # sponsors still work
    assert not lease.may_use(key("mallory"), START)
    assert lease.may_use(key("carol"), START) and lease.may_use(key("bob"), START)
    token = make_delegation(ident("mallory"), lease.id, key("mallory-phone"), "phone")
    with pytest.raises(Unauthorized):
        DeviceAdmission(lease).admit(key("mallory-phone"), START, token)
    with pytest.raises(Unauthorized):
        DeviceAdmission(lease).admit(key("mallory"), START)


def test_group_consent_vector() -> None:
    """docs/test-vectors.json's group-consent vectors derive as they say."""
    import json

    from node.auction import derive
    from node.events import decode_wire

    root = Path(__file__).resolve().parent.parent
    vecs = [v for v in json.loads((root / "docs" / "test-vectors.json").read_text())
            if "group_consent" in v.get("derivation", {})]
    assert [v["derivation"]["group_consent"] for v in vecs] == ["request", "pledge", "pledge"]
    evs = [decode_wire(bytes.fromhex(v["wire_hex"]), v["network"]) for v in vecs]
    m = derive(evs)
    a = m.auctions[evs[0].id]
    for v, ev in zip(vecs[1:], evs[1:], strict=True):
        d = v["derivation"]
        assert (ev.author in a.pledges) is d["counts"]
        got = [i.reason for i in m.ignored if i.event_id == ev.id]
        assert got == ([d["ignored"]] if d["ignored"] else [])
