"""What the light client shows, against in-process nodes (ledger + QueryService on real
libp2p hosts over loopback): a best-value lease whose award verifies only with the
bidders' reputations survives the round trip (`leases`, `reputation` agree with the
nodes), an award that cannot verify is listed with its reason, and id prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_client import NET, NodeUnderTest, ident, nodes, publish_everywhere, wait_past

from node import query
from node.auction import derive
from node.client import LightClient, now_ms
from node.client.resolve import match_prefix, resolve
from node.errors import UsageError
from node.events import Award, Bid, Members, Payment, Rating, Request
from node.keys import Identity


def _req(t: int, reserve: int = 1000) -> Request:
    return Request(service="bandwidth", chain=(), start_ms=t + 100, duration_ms=1000,
                   max_rate_bps=None, min_rate_bps=None, members=Members(max_devices=1),
                   reserve=reserve, currency="EUR", close_ms=t + 50, reveal_ms=t + 50,
                   rule="lowest", sealed=False, group=False)


async def test_best_value_lease_and_reputation_agree_with_nodes(tmp_path: Path) -> None:
    bob, carol, dave = ident(1), ident(2), ident(3)
    async with nodes(tmp_path, 2) as ns:
        _history(ns, bob, dave)
        async with LightClient.open(tmp_path / "alice", [n.addr for n in ns],
                                    network=NET) as c:
            req = await c.request("bandwidth", duration_ms=60_000, reserve=1000,
                                  close_in_ms=600, rule="best_value")
            tb = req.ts_ms + 1  # on time however long the submission took
            publish_everywhere(ns, bob, Bid(request=req.id, price=600), tb)
            publish_everywhere(ns, carol, Bid(request=req.id, price=650), tb)
            await wait_past(req.body.reveal_ms)  # type: ignore[attr-defined]
            award_ev, _ = await c.award(req.id)
            node_market = derive(ns[0].ledger.iter_canonical())
            assert node_market.leases[award_ev.id].provider == carol.public  # not cheaper bob
            leases, bad = await c.lease_report()
            assert [x.lease.id for x in leases] == [award_ev.id] and bad == []
            await c.pay(award_ev.id)
            # carol (the provider) rates alice as a payer, on both nodes.
            rating = Rating(lease=award_ev.id, subject=c.key, role="recipient",
                            satisfied=True, score=5)
            publish_everywhere(ns, carol, rating, now_ms())  # type: ignore[arg-type]
            mine = await c.reputation(c.key)
            want = derive(ns[1].ledger.iter_canonical()).reputation.score(
                c.key, "recipient", mine.as_of_ms)
            assert (mine.recipient.ppm, mine.recipient.ratings) == (want.ppm, want.ratings)
            assert want.ratings == 1 and want.ppm > 500_000
            bobs = await c.reputation(bob.public)
            assert bobs.provider.ratings == 1 and bobs.provider.unsatisfied == 1
            # The bids table shows alice's payment record as of her auction's start.
            info = await c.auction(req.id)
            assert info.recipient_record.new and info.to_json()["recipient_record"]["ratings"] == 0


def _history(ns: list[NodeUnderTest], bob: Identity, dave: Identity) -> None:
    """dave hired bob and rated him unsatisfied, so bob's reputation (as of a later
    close) is below a newcomer's neutral one and decides a best-value auction."""
    t = now_ms() - 60_000
    r0 = ns[0].ledger.publish(dave, _req(t), t)
    b0 = ns[0].ledger.publish(bob, Bid(request=r0.id, price=100), t + 10)
    a0 = ns[0].ledger.publish(dave, _award(r0.id, b0.id, 100), t + 60)
    ns[0].ledger.publish(dave, Payment(lease=a0.id, amount=100, currency="EUR",
                                       method="card", reference="x"), t + 200)
    ns[0].ledger.publish(dave, Rating(lease=a0.id, subject=bob.public, role="provider",
                                      satisfied=False, score=1), t + 2000)
    for _, ev in ns[0].ledger.events(limit=1000):
        for n in ns[1:]:
            n.ledger.append(ev.wire)


def _award(request: bytes, winner: bytes, price: int) -> Award:
    from node.events import considered_digest

    return Award(request=request, winner=winner, price=price, considered=(winner,),
                 considered_digest=considered_digest([winner]), considered_count=1)


class HidesReputation(query.QueryService):
    """A node that answers every reputation bundle with nothing."""

    def answer(self, peer_pubkey: bytes, req: query.QueryRequest) -> query.QueryResponse:
        if isinstance(req, query.ReputationBundle):
            return query.EventsPage((), 0, False)
        return super().answer(peer_pubkey, req)


async def test_unverifiable_award_is_listed_with_its_reason(tmp_path: Path) -> None:
    bob, carol = ident(1), ident(2)
    async with nodes(tmp_path, 2, [query.QueryService, HidesReputation]) as ns:
        _history(ns, bob, ident(3))
        async with LightClient.open(tmp_path / "alice", [ns[0].addr], network=NET) as c:
            req = await c.request("bandwidth", duration_ms=60_000, reserve=1000,
                                  close_in_ms=600, rule="best_value")
            tb = req.ts_ms + 1  # on time however long the submission took
            publish_everywhere(ns, bob, Bid(request=req.id, price=600), tb)
            publish_everywhere(ns, carol, Bid(request=req.id, price=650), tb)
            await wait_past(req.body.reveal_ms)  # type: ignore[attr-defined]
            award_ev, _ = await c.award(req.id)
        for ev in (req, award_ev):
            ns[1].ledger.append(ev.wire)
        # Through the node that hides bob's rating, carol's win cannot be re-derived:
        # the award is listed with the reason, not dropped silently.
        async with LightClient.open(tmp_path / "alice", [ns[1].addr], network=NET) as c:
            leases, bad = await c.lease_report()
            assert leases == []
            assert [(u.award, u.request) for u in bad] == [(award_ev.id, req.id)]
            assert bad[0].reason.startswith("invalid_award") or bad[0].reason == "wrong_winner"
            with pytest.raises(UsageError, match="does not verify"):
                await c.lease(award_ev.id)


async def test_id_prefixes(tmp_path: Path) -> None:
    async with nodes(tmp_path, 2) as ns, \
            LightClient.open(tmp_path / "alice", [n.addr for n in ns], network=NET) as c:
        r1 = await c.request("zstd", duration_ms=1000, reserve=10, close_in_ms=60_000)
        r2 = await c.request("zstd", duration_ms=1000, reserve=20, close_in_ms=60_000)
        for r in (r1, r2):
            assert await resolve(c, r.id.hex()[:16], "request") == r.id
            assert await resolve(c, r.id.hex()[:16].upper(), "request") == r.id
        assert await resolve(c, r1.id.hex(), "request") == r1.id
        assert await resolve(c, c.key.hex()[:12], "key") == c.key
        with pytest.raises(UsageError, match="no request"):
            await resolve(c, "ffff" if not r1.id.hex().startswith("ffff") else "eeee",
                          "request")
        with pytest.raises(UsageError, match="too short"):
            await resolve(c, "ab", "request")
        with pytest.raises(UsageError, match="not hex"):
            await resolve(c, "zz12", "lease")
    # Ambiguous: two ids sharing the typed digits (the error lists them).
    a, b = bytes.fromhex("abcd01" + "00" * 29), bytes.fromhex("abcd02" + "00" * 29)
    with pytest.raises(UsageError, match=r"ambiguous: it matches 2 .*abcd01.*abcd02"):
        match_prefix("abcd", [a, b], "lease")
    assert match_prefix("abcd02", [a, b], "lease") == b


async def test_ambiguous_key_prefix_on_real_nodes(tmp_path: Path) -> None:
    """Two providers whose keys share their first 4 hex digits both publish offers:
    the 4-digit prefix is refused (in Python and by the command), naming both; one
    more digit picks one."""
    import sys

    import trio

    from node.events import Offer, ServiceOffer

    seen: dict[str, Identity] = {}
    pair: tuple[Identity, Identity] | None = None
    for i in range(1, 5000):  # a 16-bit prefix collides after ~300 keys
        who = Identity.from_seed(i.to_bytes(32, "big"))
        other = seen.setdefault(who.public.hex()[:4], who)
        if other is not who and other.public.hex()[4] != who.public.hex()[4]:
            pair = (other, who)
            break
    assert pair is not None
    offer = Offer(services=(ServiceOffer(name="zstd", price=5, capacity=100),),
                  currency="EUR", addrs=())
    async with nodes(tmp_path, 2) as ns:
        for who in pair:
            publish_everywhere(ns, who, offer, now_ms())  # type: ignore[arg-type]
        prefix = pair[0].public.hex()[:4]
        async with LightClient.open(tmp_path / "alice", [n.addr for n in ns],
                                    network=NET) as c:
            with pytest.raises(UsageError, match="ambiguous: it matches 2") as e:
                await resolve(c, prefix, "key")
            assert all(w.public.hex()[:16] in str(e.value) for w in pair)
            for who in pair:
                assert await resolve(c, who.public.hex()[:5], "key") == who.public
        with trio.fail_after(120):  # the nodes run in this process: do not block it
            r = await trio.run_process(
                [sys.executable, "-m", "node.cli", "client", "--dir", str(tmp_path / "alice"),
                 "--node", ns[0].addr, "--network", NET, "--timeout", "60",
                 "reputation", prefix],
                capture_stdout=True, capture_stderr=True, check=False)
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert "ambiguous" in err and "more hex digits" in err
