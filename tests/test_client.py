"""The light client against in-process nodes (a ledger + QueryService on a real libp2p
host over loopback): a full round on its own key, a tampering node detected, nodes
that disagree reported, its own chain re-synced from the nodes."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import zstandard

from node import codec, query
from node.client import ClientState, LightClient, now_ms
from node.errors import UntrustedAnswer
from node.events import Bid, decode_wire
from node.keys import Identity
from node.ledger import Ledger
from node.p2p import open_host

NET = "clienttest"


def ident(i: int) -> Identity:
    return Identity.from_seed(bytes([0x40 + i]) * 32)


@dataclass
class NodeUnderTest:
    ledger: Ledger
    service: query.QueryService
    addr: str


class TamperingService(query.QueryService):
    """A node that alters one field of every bid it returns, keeping the signature."""

    def answer(self, peer_pubkey: bytes, req: query.QueryRequest) -> query.QueryResponse:
        resp = super().answer(peer_pubkey, req)
        if not isinstance(resp, query.EventsPage):
            return resp
        out = []
        for r in resp.records:
            ev = decode_wire(r, NET, verify=False)
            if ev.kind == "bid":
                env = codec.unpack(ev.signed, 1 << 16)
                env[6]["price"] = 1  # a bargain nobody offered
                r = codec.pack([codec.pack(env), ev.sig])
            out.append(r)
        return query.EventsPage(tuple(out), resp.cursor, resp.more)


@asynccontextmanager
async def nodes(tmp_path: Path, n: int, cls: list[type[query.QueryService]] | None = None,
                ) -> AsyncIterator[list[NodeUnderTest]]:
    async with AsyncExitStack() as stack:
        out = []
        for i in range(n):
            led = Ledger(tmp_path / f"node{i}.db", network=NET)
            stack.callback(led.close)
            host = await stack.enter_async_context(open_host(bytes([0x10 + i]) * 32))
            svc = (cls[i] if cls else query.QueryService)(led, None, led.append, NET)
            svc.register(host)
            out.append(NodeUnderTest(led, svc, host.addrs[0]))
        yield out


def publish_everywhere(ns: list[NodeUnderTest], who: Identity, body: Bid, ts: int) -> None:
    ev = ns[0].ledger.publish(who, body, ts)
    for n in ns[1:]:
        n.ledger.append(ev.wire)


async def wait_past(ms: int) -> None:
    with trio.fail_after(10):
        while now_ms() <= ms:
            await trio.sleep(0.02)


async def test_full_round_on_own_key(tmp_path: Path) -> None:
    async with nodes(tmp_path, 2) as ns, \
            LightClient.open(tmp_path / "alice", [n.addr for n in ns], network=NET) as c:
        req = await c.request("bandwidth", duration_ms=60_000, reserve=1000, close_in_ms=600,
                              max_rate_bps=8_000_000)
        for n in ns:  # the client submitted to both nodes
            assert n.ledger.has(req.id)
        bob, carol = ident(1), ident(2)
        t = req.ts_ms + 1  # on time however long the submission above took
        publish_everywhere(ns, bob, Bid(request=req.id, price=700), t)
        publish_everywhere(ns, carol, Bid(request=req.id, price=650), t)
        bids = await c.bids(req.id)
        assert sorted(b.price or 0 for b in bids) == [650, 700]
        assert all(b.reputation.ratings == 0 and b.status == "valid" for b in bids)
        await wait_past(req.body.reveal_ms)  # type: ignore[attr-defined]
        award_ev, award = await c.award(req.id)
        assert award.price == 650 and award.winner is not None
        leases = await c.leases()
        assert [x.lease.id for x in leases] == [award_ev.id]
        assert leases[0].lease.provider == carol.public and leases[0].role == "recipient"
        pay = await c.pay(award_ev.id, method="card", reference="ch_42")
        assert pay.body.amount == 650  # type: ignore[attr-defined]
        rate = await c.rate(award_ev.id, satisfied=True, score=4, text="fast")
        assert rate.seq == 4 and rate.author == c.key
        rep = await c.reputation(carol.public)
        assert rep.provider.ratings == 1 and rep.provider.satisfied == 1
        info = await c.auction(req.id)
        assert info.status == "awarded" and any(b.winner for b in info.bids)
        assert not c.faults and not c.disagreements
        state = json.loads((tmp_path / "alice" / "state.json").read_text())
        assert state["head"]["seq"] == 4 and state["unconfirmed"] == []


async def test_tampering_node_is_detected(tmp_path: Path) -> None:
    async with nodes(tmp_path, 2, [TamperingService, query.QueryService]) as ns:
        bob = ident(1)
        async with LightClient.open(tmp_path / "a", [ns[1].addr], network=NET) as c:
            req = await c.request("zstd", duration_ms=1000, reserve=100, close_in_ms=60_000)
        ns[0].ledger.append(ns[1].ledger.get_wire(req.id) or b"")
        publish_everywhere([ns[1], ns[0]], bob, Bid(request=req.id, price=90), now_ms())
        # Only the tampering node: the client refuses its answer outright.
        async with LightClient.open(tmp_path / "a", [ns[0].addr], network=NET) as c:
            with pytest.raises(UntrustedAnswer) as e:
                await c.bids(req.id)
            assert e.value.reason == "forged_event"
        # With an honest node too: the fault is reported, the honest answer used.
        async with LightClient.open(tmp_path / "a", [ns[0].addr, ns[1].addr],
                                    network=NET) as c:
            bids = await c.bids(req.id)
            assert [b.price for b in bids] == [90]
            assert [f.node for f in c.faults] == [ns[0].addr]
            assert c.faults[0].reason == "forged_event"


async def test_disagreement_reported_and_union_used(tmp_path: Path) -> None:
    async with nodes(tmp_path, 2) as ns, \
            LightClient.open(tmp_path / "a", [n.addr for n in ns], network=NET) as c:
        req = await c.request("zstd", duration_ms=1000, reserve=100, close_in_ms=60_000)
        # A bid only node 0 has: the client folds the union and reports the gap.
        ns[0].ledger.publish(ident(3), Bid(request=req.id, price=80), now_ms())
        bids = await c.bids(req.id)
        assert [b.price for b in bids] == [80]
        d = c.disagreements[-1]
        assert d.query.startswith("auction:") and list(d.missing) == [ns[1].addr]
        other = ns[0].ledger.events(kind="bid")[0][1]
        assert {e.id for e in await c.get_events([other.id])} == {other.id}


async def test_head_resynced_from_nodes(tmp_path: Path) -> None:
    """A second client dir with the same key (state lost) continues the chain instead of
    forking its own identity."""
    async with nodes(tmp_path, 1) as ns:
        async with LightClient.open(tmp_path / "a", [ns[0].addr], network=NET) as c:
            await c.request("zstd", duration_ms=1000, reserve=100, close_in_ms=60_000)
            await c.request("zstd", duration_ms=1000, reserve=100, close_in_ms=60_000)
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "client.key").write_bytes((tmp_path / "a" / "client.key").read_bytes())
        (tmp_path / "b" / "client.key").chmod(0o600)
        async with LightClient.open(tmp_path / "b", [ns[0].addr], network=NET) as c:
            ev = await c.request("zstd", duration_ms=1000, reserve=100, close_in_ms=60_000)
            assert ev.seq == 3
        assert not ns[0].ledger.forked()
        assert ClientState(tmp_path / "b" / "state.json", NET).head.seq == 3


async def test_unreachable_nodes_fail_clearly(tmp_path: Path) -> None:
    from node.errors import OperationError

    async with open_host(b"\x33" * 32) as h:
        dead = h.addrs[0]  # no query service registered on it
    with pytest.raises(OperationError):
        async with LightClient.open(tmp_path / "a", [dead], network=NET, timeout=2):
            pass


async def test_member_device_streams_and_rates_with_its_own_key(tmp_path: Path) -> None:
    """Request with a member device; the provider node also runs the dataplane. The
    device (not the recipient) streams through the lease and rates the provider."""
    from node.dataplane import DataplaneConfig, DataplaneService, split_results
    from node.processors import ProcessContext, load_processors, run_chain
    from node.processors.pool import WorkerPool
    from node.segments import decode_packets, encode_lp

    provider = ident(7)
    led = Ledger(tmp_path / "provider.db", network=NET)
    try:
        async with WorkerPool(load_processors(), 1) as pool, \
                open_host(provider.seed) as host, trio.open_nursery() as nursery:
            svc = query.QueryService(led, None, led.append, NET)
            svc.register(host)
            dp = DataplaneService(host, provider, NET, lambda i: svc.live.market().leases.get(i),
                                  svc.live.market, pool, lambda b: led.publish(provider, b,
                                                                               now_ms()),
                                  config=DataplaneConfig(services=frozenset({"zstd"})))
            nursery.start_soon(dp.run)
            addr = host.addrs[0]
            async with LightClient.open(tmp_path / "phone", [addr], network=NET) as phone:
                device = phone.key
            async with LightClient.open(tmp_path / "alice", [addr], network=NET) as alice:
                req = await alice.request("zstd", chain=["zstd"], duration_ms=60_000,
                                          reserve=100, close_in_ms=500, devices=[device])
                led.publish(provider, Bid(request=req.id, price=40), req.ts_ms + 1)
                await wait_past(req.body.reveal_ms)  # type: ignore[attr-defined]
                award_ev, _ = await alice.award(req.id)
            pkts = [bytes([i]) * (100 + i) for i in range(50)]
            got: list[bytes] = []
            async with LightClient.open(tmp_path / "phone", [addr], network=NET) as phone:
                (info,) = await phone.leases()
                assert info.role == "member" and info.lease.id == award_ev.id

                async def sink(frame: bytes) -> None:
                    got.append(frame)

                with trio.fail_after(120):
                    res = await phone.stream(award_ev.id, [encode_lp(pkts)], sink=sink)
                assert res.trailer.ok and res.trailer.packets == 50
                procs = load_processors()
                back: list[bytes] = []
                for seq, result in split_results(b"".join(got)):
                    ctx = ProcessContext(award_ev.id, res.stream_id, seq, res.key)
                    back += decode_packets(run_chain(procs, ("zstd-d",), result, ctx))
                assert back == pkts
                rating = await phone.rate(award_ev.id, satisfied=True, score=5)
                assert rating.author == device
            # The same through `bidmesh client stream`: a file in, results out in order.
            data = bytes(range(256)) * 1000
            (tmp_path / "in.bin").write_bytes(data)
            with trio.fail_after(120):
                proc = await trio.run_process(
                    [sys.executable, "-m", "node.cli", "client", "--dir", str(tmp_path / "phone"),
                     "--node", addr, "--network", NET, "--timeout", "60",
                     "stream", award_ev.id.hex(),
                     "--in", str(tmp_path / "in.bin"), "--out", str(tmp_path / "out.bin"),
                     "--packet", "10000", "--progress", "yes"],
                    capture_stdout=True, capture_stderr=True, check=False)
            assert proc.returncode == 0, proc.stderr.decode()
            assert b"lease ends in" in proc.stderr  # the progress bar shows the lease
            out = zstandard.ZstdDecompressor().decompressobj().decompress(
                (tmp_path / "out.bin").read_bytes())
            assert b"".join(decode_packets(out)) == data
            m = svc.live.market()
            assert [r.rater for r in m.ratings[award_ev.id]] == [device]
            assert m.reputation.score(provider.public, "provider").ratings == 1
            nursery.cancel_scope.cancel()
    finally:
        led.close()
