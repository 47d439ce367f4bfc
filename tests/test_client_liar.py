"""A light client among lying nodes (issue 13 item 5): a fake node in the test process
(a real libp2p host serving the query protocol) answers SUBMIT "accepted" without
storing anything and claims the client's head is at seq 1000. The client keeps its
signed records until a quorum of its nodes hands them back, re-submits them on the
next command, and outvotes the head claim instead of blocking on it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio
from daemon_helpers import free_port

from node import query
from node.client import LightClient, now_ms
from node.events import decode_wire
from node.keys import Identity
from node.ledger import Ledger
from node.p2p import open_host, peer_id_from_pubkey

NET = "liartest"


class Liar(query.QueryService):
    """Says "accepted" to every submission and stores nothing; claims every author's
    head is at seq 1000. Answers every other query honestly from its (empty) ledger."""

    def answer(self, peer_pubkey: bytes, req: query.QueryRequest) -> query.QueryResponse:
        if isinstance(req, query.Submit):
            self.lied = getattr(self, "lied", 0) + len(req.records)
            return query.Submitted(tuple(
                query.SubmitResult("accepted", decode_wire(w, NET, verify=False).id, None, "")
                for w in req.records))
        if isinstance(req, query.GetHeads):
            return query.Heads(tuple(query.HeadInfo(a, 1000, b"\x99" * 32, now_ms(), None)
                                     for a in req.authors))
        return super().answer(peer_pubkey, req)


class Node:
    """An honest node (ledger + query service) on a fixed loopback port, so it can be
    unreachable first and come up later at the address the client was given."""

    def __init__(self, tmp: Path, i: int, cls: type[query.QueryService] = query.QueryService,
                 ) -> None:
        self.seed = bytes([0x60 + i]) * 32
        self.port = free_port()
        self.ledger = Ledger(tmp / f"n{i}.db", network=NET)
        self.cls = cls
        pid = peer_id_from_pubkey(Identity.from_seed(self.seed).public)
        self.addr = f"/ip4/127.0.0.1/tcp/{self.port}/p2p/{pid}"

    @asynccontextmanager
    async def up(self) -> AsyncIterator[query.QueryService]:
        async with open_host(self.seed, [f"/ip4/127.0.0.1/tcp/{self.port}"]) as host:
            svc = self.cls(self.ledger, None, self.ledger.append, NET)
            svc.register(host)
            yield svc


async def test_liar_cannot_make_the_client_drop_its_events(tmp_path: Path) -> None:
    liar, h1, h2 = Node(tmp_path, 0, Liar), Node(tmp_path, 1), Node(tmp_path, 2)
    addrs = [liar.addr, h1.addr, h2.addr]
    try:
        # 1. Only the liar is reachable: it "accepts" two events and stores neither.
        async with liar.up() as lsvc, \
                LightClient.open(tmp_path / "c", addrs, network=NET, timeout=3) as c:
            first = await c.request("zstd", duration_ms=1000, reserve=10, close_in_ms=60_000)
            second = await c.request("zstd", duration_ms=1000, reserve=20, close_in_ms=60_000)
            assert lsvc.lied >= 2 and not liar.ledger.has(first.id)  # type: ignore[attr-defined]
            assert second.seq == first.seq + 1 and second.prev == first.id
            assert [e.id for e in c.pending()] == [first.id, second.id]
            assert {f.node for f in c.faults} >= {h1.addr, h2.addr}
        state = json.loads((tmp_path / "c" / "state.json").read_text())
        assert len(state["unconfirmed"]) == 2 and state["head"]["seq"] == 2
        # 2. The honest nodes come back: the next command re-submits both in chain order,
        # fetches them back from two of the three nodes and only then drops its copy.
        async with AsyncExitStack() as stack:
            for n in (liar, h1, h2):
                await stack.enter_async_context(n.up())
            async with LightClient.open(tmp_path / "c", addrs, network=NET, timeout=3) as c:
                assert c.quorum == 2
                assert await c.flush() == []
                for n in (h1, h2):
                    assert n.ledger.has(first.id) and n.ledger.has(second.id)
                assert not liar.ledger.has(first.id)
                # The liar's seq-1000 claim is outvoted, not a reason to stop.
                third = await c.request("zstd", duration_ms=1000, reserve=30,
                                        close_in_ms=60_000)
                assert third.seq == 3 and third.prev == second.id
                assert c.pending() == [] and h1.ledger.has(third.id)
                assert any(f.node == liar.addr and f.reason == "bad_chain" for f in c.faults)
    finally:
        for n in (liar, h1, h2):
            n.ledger.close()


async def test_head_claim_outvoted_and_unproven_record_kept(tmp_path: Path) -> None:
    liar, honest = Node(tmp_path, 0, Liar), Node(tmp_path, 1)
    key = tmp_path / "k.key"
    try:
        async with liar.up(), honest.up():
            async with LightClient.open(tmp_path / "c", [liar.addr, honest.addr],
                                        network=NET, key_file=key) as c:
                ev = await c.request("zstd", duration_ms=1000, reserve=10, close_in_ms=60_000)
                assert honest.ledger.has(ev.id)
                # Two nodes, majority two: the liar never hands it back, so it stays
                # listed (and resent), with the one node that does hold it.
                assert [e.id for e in c.pending()] == [ev.id]
                assert (await c.holders([ev.id]))[ev.id] == {honest.addr}
            # A client that lost its state re-syncs its head from the honest node even
            # though the liar claims seq 1000 first.
            async with LightClient.open(tmp_path / "fresh", [liar.addr, honest.addr],
                                        network=NET, key_file=key) as c:
                with trio.fail_after(20):
                    h = await c.sync_head()
                assert (h.seq, h.id) == (1, ev.id)
                assert [f.reason for f in c.faults if f.node == liar.addr] == ["bad_chain"]
            # With quorum one (the user trusts any node that proves it), it is confirmed.
            async with LightClient.open(tmp_path / "c", [liar.addr, honest.addr],
                                        network=NET, key_file=key, confirm_quorum=1) as c:
                assert await c.flush() == []
    finally:
        liar.ledger.close()
        honest.ledger.close()
