"""The narrated round (`play`): auctions, awards, streams, payments and ratings."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import trio

from ..auction import verify_award
from ..auction.views import rep_label
from ..client import LightClient, now_ms
from ..errors import StepFailed
from ..events import Usage
from ..output import Output
from .net import (
    CLOSE_MS,
    LEASE_MS,
    Devnet,
    bids_final,
    client,
    expected_output,
    make_ts,
    market_of,
    poll,
    rep_row,
)
from .scenes import (
    MALLORY_LEASE_MS,
    bids_in_revealed,
    knows,
    net_member,
    recipient_policy_shown,
    tunnel_fetch,
    tunnel_usage,
    unpaid_warm_up,
)
from .summary import (
    auction_row,
)


def _nodes(addrs: list[str], start: int, count: int) -> list[str]:
    """`count` node addresses from `start` on, wrapping: the slices a 4- or 5-node devnet
    uses, and still one node per client on the 3 hosts of netns_testnet.py --quick."""
    return list(dict.fromkeys(addrs[(start + j) % len(addrs)] for j in range(count)))


async def play(net: Devnet, out: Output) -> dict[str, Any]:
    n = net.n
    addrs = [p.addr for p in net.providers]
    base = net.base
    summary: dict[str, Any] = {"state_dir": str(base)}

    # 1. Warm-up: earlier leases give the providers different reputations, and
    # mallory a record of not paying.
    async with contextlib.AsyncExitStack() as stack0:
        walter = await stack0.enter_async_context(client(base, "walter", _nodes(addrs, 0, 2)))
        n.say("warm-up: walter buys zstd and bandwidth leases to build reputations")
        r_z = await walter.request("zstd", duration_ms=LEASE_MS, reserve=100,
                                   close_in_ms=CLOSE_MS, rule="lowest")
        r_b = await walter.request("bandwidth", duration_ms=LEASE_MS, reserve=100,
                                   close_in_ms=CLOSE_MS, rule="lowest")
        mallory = await stack0.enter_async_context(client(base, "mallory", _nodes(addrs, 1, 2)))
        r_m = await mallory.request("bandwidth", duration_ms=MALLORY_LEASE_MS, reserve=100,
                                    close_in_ms=CLOSE_MS, rule="lowest")
        n.say("warm-up: mallory takes a 1 s bandwidth lease and will not pay for it")
        await bids_final(net, max(r_z.body.reveal_ms, r_b.body.reveal_ms))  # type: ignore[attr-defined]
        leases = []
        for r in (r_z, r_b):
            aw, body = await walter.award(r.id)
            if body.winner is None:
                raise StepFailed(f"warm-up auction {r.id.hex()[:8]} got no bids")
            leases.append(aw.id)
        _, l_z = await walter.lease(leases[0])
        _, l_b = await walter.lease(leases[1])
        for lease_id in leases:
            await walter.pay(lease_id, method="card", reference=f"ch_{lease_id.hex()[:8]}")
        await walter.rate(l_z.id, satisfied=False, score=2, text="segments arrived late")
        await walter.rate(l_b.id, satisfied=True, score=5, text="solid link")
        n.done("warm-up leases", f"{net.name_of(l_z.provider)} rated 2★ unsatisfied, "
                                 f"{net.name_of(l_b.provider)} rated 5★")
        await unpaid_warm_up(net, mallory, r_m.id)

    # 2. Main auctions: alice's shared processing lease (best value) and dave's sealed one.
    devices = [f"{who}-{dev}" for who, dev in (("alice", "phone"), ("alice", "laptop"),
                                               ("alice", "tv"))]
    async with contextlib.AsyncExitStack() as stack:
        alice = await stack.enter_async_context(client(base, "alice", _nodes(addrs, 0, 2)))
        dave = await stack.enter_async_context(client(base, "dave", _nodes(addrs, 2, 2)))
        devs = [await stack.enter_async_context(client(base, d, [addrs[(i + 1) % len(addrs)]]))
                for i, d in enumerate(devices)]
        provider_keys = [p.ident.public for p in net.providers]
        market0 = await market_of(alice, provider_keys, [])
        summary["reputation_before"] = [rep_row(market0, net, p.ident.public, "provider")
                                        for p in net.providers]
        chain = ["zstd", "aes-gcm"]
        req_a = await alice.request(
            "zstd", chain=chain, duration_ms=LEASE_MS, reserve=40, close_in_ms=CLOSE_MS,
            rule="best_value", devices=[d.key for d in devs], max_devices=3,
            max_rate_bps=16_000_000, min_rate_bps=256_000,
            note="shared by alice's phone, laptop and tv")
        dave_phone = await stack.enter_async_context(
            client(base, "dave-phone", _nodes(addrs, 3, 1)))
        req_b = await dave.request("bandwidth", duration_ms=LEASE_MS, reserve=40,
                                   close_in_ms=CLOSE_MS, sealed=True, reveal_window_ms=2000,
                                   rule="vickrey", max_rate_bps=8_000_000,
                                   devices=[dave_phone.key])
        n.say(f"alice auctions zstd→aes-gcm for 3 devices (best value, 16/0.256 Mbit/s): "
              f"{req_a.id.hex()[:12]}")
        n.say(f"dave auctions bandwidth, sealed Vickrey: {req_b.id.hex()[:12]}")
        mallory = await stack.enter_async_context(client(base, "mallory", _nodes(addrs, 1, 2)))
        req_m = await mallory.request("bandwidth", duration_ms=LEASE_MS, reserve=40,
                                      close_in_ms=CLOSE_MS, rule="lowest")
        n.say(f"mallory, who did not pay, auctions bandwidth again: {req_m.id.hex()[:12]}")

        async def bids_in(c: LightClient, rid: bytes, want: int) -> list[Any] | None:
            bids = await c.bids(rid)
            return bids if len(bids) >= want else None

        bids_a = await poll("bids on alice's auction",
                            lambda: bids_in(alice, req_a.id, 3), timeout=15)
        for b in bids_a:
            r = b.reputation
            n.say(f"   bid {b.price:>3} EUR-cents from {net.name_of(b.provider):9} "
                  f"reputation {rep_label(r)}")
        n.done("bids with reputation", f"{len(bids_a)} open bids on alice's auction")

        await bids_final(net, req_a.body.reveal_ms)  # type: ignore[attr-defined]
        aw_a, award_a = await alice.award(req_a.id)
        market_a, lease_a = await alice.lease(aw_a.id)
        check = verify_award(market_a, aw_a.id)
        if not check.valid:
            raise StepFailed(f"alice's award does not verify: {check.problems}")
        n.done("award verified", f"{net.name_of(lease_a.provider)} wins at {award_a.price} "
                                 f"(best value over {check.considered_count} bids)")

        await bids_final(net, req_b.body.reveal_ms)  # type: ignore[attr-defined]
        await poll("sealed reveals", lambda: bids_in_revealed(dave, req_b.id, 2), timeout=10)
        aw_b, award_b = await dave.award(req_b.id)
        market_b, lease_b = await dave.lease(aw_b.id)
        if not verify_award(market_b, aw_b.id).valid:
            raise StepFailed("dave's sealed award does not verify")
        n.done("sealed Vickrey auction", f"{net.name_of(lease_b.provider)} wins, pays the "
                                         f"second price {award_b.price}")
        summary["recipient_policy"] = await recipient_policy_shown(net, mallory, req_m.id)

        # 2b. dave's phone fetches a file through the bandwidth lease's tunnel.
        summary["tunnel"] = await tunnel_fetch(net, dave_phone, lease_b)

        # 3. Stream: each device sends its own MPEG-TS through the winner.
        winner = next(p for p in net.providers if p.ident.public == lease_a.provider)
        n.say(f"devices stream MPEG-TS through {winner.spec.name} "
              f"(it lacks aes-gcm and must subcontract it)")
        results: dict[str, tuple[int, int, bool]] = {}

        async def stream_one(name: str, dev: LightClient, seed: int) -> None:
            ts = make_ts(6000, seed)
            res = await dev.stream(lease_a.id, [ts], chains=[chain], protocol="ts", timeout=30)
            want = expected_output(ts, lease_a, res.stream_id, res.key, [chain])
            results[name] = (len(ts), len(res.output), res.output == want)

        for dev in devs:  # devices use other nodes than alice: wait for the lease there
            await poll("the lease to reach every device's node",
                       functools.partial(knows, dev.lease, lease_a.id), timeout=10)
        t_stream = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i, (name, dev) in enumerate(zip(devices, devs, strict=True)):
                nursery.start_soon(stream_one, name, dev, i)
        took = time.monotonic() - t_stream
        total = sum(r[0] for r in results.values())
        if not all(r[2] for r in results.values()):
            raise StepFailed(f"stream output differs from local processing: {results}")
        n.done("streams byte-exact", f"3 devices, {total / 1e6:.2f} MB in {took:.1f} s "
                                     f"({total * 8 / took / 1e6:.1f} Mbit/s, limit 16)")
        summary["streams"] = {k: {"bytes_in": v[0], "bytes_out": v[1], "exact": v[2]}
                              for k, v in results.items()}

        # 4. Payments and ratings, both ways; a device rates for alice.
        await alice.pay(lease_a.id, method="card", reference="ch_alice_1")
        await dave.pay(lease_b.id, method="ledger", reference="dave-credit")
        await devs[0].rate(lease_a.id, satisfied=True, score=5, text="smooth stream")
        await dave.rate(lease_b.id, satisfied=True, score=4)
        n.done("payments", "alice by card, dave by ledger credit; alice's phone rated "
                           f"{net.name_of(lease_a.provider)} 5★")

        # 5. Group purchase: erin sponsors frank; grace pays her own share.
        erin = await stack.enter_async_context(client(base, "erin", _nodes(addrs, 1, 2)))
        frank = await stack.enter_async_context(client(base, "frank", _nodes(addrs, 2, 2)))
        grace = await stack.enter_async_context(client(base, "grace", _nodes(addrs, 0, 1)))
        # Longer to close: the request must reach every member's node and three
        # pledges be confirmed by their nodes first (seen late on a loaded netns run).
        req_g = await erin.request("bandwidth", duration_ms=LEASE_MS, reserve=40,
                                   close_in_ms=2 * CLOSE_MS, group=True, rule="lowest",
                                   devices=[frank.key, grace.key],  # who may pledge
                                   note="erin, frank and grace buy together")
        for c in (frank, grace):  # they use other nodes: wait for the request to get there
            await poll("the group request to reach every member's node",
                       functools.partial(knows, c.auction, req_g.id), timeout=10)
        async with trio.open_nursery() as nursery:  # at once: each waits for its nodes
            nursery.start_soon(functools.partial(frank.pledge, req_g.id, willing=False))
            nursery.start_soon(functools.partial(erin.pledge, req_g.id, willing=True,
                                                 amount=12, sponsor=[frank.key]))
            nursery.start_soon(functools.partial(grace.pledge, req_g.id, willing=True,
                                                 amount=8))
        n.say("group: erin (pays, sponsors frank), frank (won't pay), grace (pays)")
        await bids_final(net, req_g.body.reveal_ms)  # type: ignore[attr-defined]
        aw_g, award_g = await erin.award(req_g.id)
        market_g, lease_g = await erin.lease(aw_g.id)
        if not verify_award(market_g, aw_g.id).valid or award_g.winner is None:
            raise StepFailed("the group award does not verify")
        if frank.key not in lease_g.group_members:
            raise StepFailed("the sponsored member is not covered by the group lease")
        for c in (frank, grace):  # other nodes than erin's: wait for the award there
            await poll("the group lease to reach every member's node",
                       functools.partial(knows, c.lease, lease_g.id), timeout=10)
        await erin.pay(lease_g.id, method="card", reference="erin+frank",
                       on_behalf=[erin.key, frank.key])
        await grace.pay(lease_g.id, method="card", reference="grace")
        await frank.rate(lease_g.id, satisfied=True, score=4, text="thanks erin")
        n.done("group purchase", f"{net.name_of(lease_g.provider)} at {award_g.price}; "
                                 f"shares {sorted(lease_g.shares().values())}, frank sponsored")

        # 6. Providers rate the payers; the lease ends; usage is signed.
        async def usage_seen() -> Usage | None:
            got = await alice.find_events(kind="usage", ref=lease_a.id)
            body = got[-1].body if got else None
            return body if isinstance(body, Usage) else None

        async def rated_back() -> bool | None:
            rs = await alice.find_events(kind="rating", ref=lease_a.id)
            return True if any(getattr(r.body, "subject", None) == alice.key for r in rs) else None

        await poll("the provider's rating of alice", rated_back, timeout=15)
        n.done("provider rated the recipient", "alice paid: satisfied")
        n.say(f"waiting for the lease to end ({(lease_a.end_ms - now_ms()) / 1000:.0f} s) "
              "and its signed usage summary")
        usage = await poll("the usage summary", usage_seen,
                           timeout=(lease_a.end_ms - now_ms()) / 1000 + 20)
        await tunnel_usage(net, dave, lease_b, summary["tunnel"])
        auctions = [r_z.id, r_b.id, req_a.id, req_b.id, req_g.id]
        final = await market_of(alice, [*provider_keys, alice.key, dave.key, erin.key],
                                auctions)
        subs = [s for s in final.subcontracts.values() if s.lease == lease_a.id]
        if not subs:
            raise StepFailed("the winner recorded no subcontract for the aes-gcm step")
        n.done("lease ended", f"usage: {sum(m.bytes_in for m in usage.members)} bytes in, "
                              f"{sum(m.segments for m in usage.members)} segments, "
                              f"aes-gcm subcontracted to "
                              f"{', '.join(sorted({net.name_of(s.contractor) for s in subs}))}")
        summary["lease"] = {
            "id": lease_a.id.hex(), "provider": net.name_of(lease_a.provider),
            "members": len(lease_a.devices), "max_rate_bps": lease_a.max_rate_bps,
            "min_rate_bps": lease_a.min_rate_bps, "price": lease_a.price,
            "usage": [{"member": net_member(devs, devices, m.member), "bytes_in": m.bytes_in,
                       "bytes_out": m.bytes_out, "segments": m.segments} for m in usage.members],
            "shortfall_ms": usage.shortfall_ms, "rate_limited": usage.rate_limited,
            "subcontracts": [{"contractor": net.name_of(s.contractor),
                              "services": list(s.services)} for s in subs],
        }
        summary["auctions"] = [auction_row(final, net, rid) for rid in auctions]
        summary["reputation_after"] = [rep_row(final, net, p.ident.public, "provider")
                                       for p in net.providers]
        summary["recipients"] = [
            {**rep_row(final, net, c.key, "recipient"), "who": who}
            for who, c in (("alice", alice), ("dave", dave), ("erin", erin))]
    digests = await net.wait_converged()
    summary["digests"] = digests
    n.done("every node has the same state digest", next(iter(digests.values()))[:16])
    return summary
