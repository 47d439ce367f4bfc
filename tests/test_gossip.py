"""Replication on real py-libp2p hosts over loopback (in one process)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import wait_until

from node import codec, config, discovery, gossip, sync
from node.errors import InvalidMessage
from node.events import Offer
from node.keys import Identity
from node.ledger import Ledger
from node.p2p import P2PHost, PubSub, make_pubsub, open_host, set_stream_handler

NET = "gossiptest"


def body(i: int) -> Offer:
    return Offer(services=(), currency="EUR", addrs=(), note=f"e{i}")


@dataclass
class TNode:
    ident: Identity
    host: P2PHost
    ps: PubSub
    ledger: Ledger
    rep: gossip.Replicator

    def publish(self, n: int) -> list[bytes]:
        out = []
        for i in range(n):
            ev = self.ledger.publish(self.ident, body(i), int(time.time() * 1000))
            self.rep.publish_event(ev)
            out.append(ev.id)
        return out


@asynccontextmanager
async def tnodes(tmp: Path, n: int, *, pubsub: dict[str, int] | None = None,
                 **overrides: dict[str, Any]) -> AsyncIterator[list[TNode]]:
    cfg = config.from_dict({"node": {"network": NET},
                            "sync": {"interval_s": 0.5, "request_timeout_s": 5},
                            **overrides})
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(n):
            ident = Identity.from_seed(bytes([i + 1]) * 32)
            host = await stack.enter_async_context(open_host(ident.seed))
            ps = await stack.enter_async_context(make_pubsub(host, **(pubsub or {})))
            led = Ledger(tmp / f"n{i}.db", network=NET)
            stack.callback(led.close)
            nodes.append(TNode(ident, host, ps, led, gossip.Replicator(host, ps, led, cfg)))
        # Innermost, so the services stop before their hosts and ledgers close.
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.rep.run)
                await node.rep.ready.wait()
            yield nodes
            nursery.cancel_scope.cancel()




async def wait_mesh(nodes: list[TNode]) -> None:
    topic = gossip.topic_name(NET)
    await wait_until(lambda: all(len(n.ps.topic(topic).peers()) >= 1 for n in nodes))


def test_batch_codec() -> None:
    data = gossip.encode_batch([b"\x01", b"\x02"])
    assert gossip.decode_batch(data) == [b"\x01", b"\x02"]
    for bad in (b"\xc1", codec.pack([2, [b"x"]]), codec.pack([1, []]), codec.pack([1, [b""]]),
                codec.pack([1, ["s"]]), codec.pack([True, [b"x"]]), codec.pack([1, [b"x"] * 513])):
        with pytest.raises(InvalidMessage):
            gossip.decode_batch(bad)


async def test_events_published_on_one_appear_on_all(tmp_path: Path) -> None:
    async with tnodes(tmp_path, 3, sync={"interval_s": 3600.0, "on_connect": False}) as ns:
        a, b, c = ns
        await a.host.connect(b.host.addrs[0])
        await b.host.connect(c.host.addrs[0])
        await wait_mesh(ns)
        a.publish(200)
        c.publish(200)
        await wait_until(lambda: all(n.ledger.count() == 400 for n in ns))
        assert len({n.ledger.digest() for n in ns}) == 1
        # Pushed by gossip alone (periodic and on-connect sync are off here).
        assert b.rep.stats.sync_rounds == 0 and b.rep.stats.batches_received >= 2
        assert b.rep.stats.batches_received < 400  # batched


async def test_gossip_is_paced_per_batch_ms(tmp_path: Path) -> None:
    """py-libp2p's cost is per message: a node sending an event every 20 ms
    publishes at most one round of messages per batch_ms, and loses nothing."""
    async with tnodes(tmp_path, 2, gossip={"batch_ms": 300.0},
                      sync={"interval_s": 3600.0, "on_connect": False}) as ns:
        a, b = ns
        await a.host.connect(b.host.addrs[0])
        topic = a.ps.topic(gossip.topic_name(NET))
        # Our own messages go to the mesh only: before it forms, to nobody.
        await wait_until(lambda: b.host.peer_id in topic.mesh_peers())
        start = trio.current_time()
        for _ in range(60):
            a.publish(1)
            await trio.sleep(0.02)
        await wait_until(lambda: b.ledger.count() == 60)
        rounds = (trio.current_time() - start) / 0.3 + 1
        assert 2 <= a.rep.stats.batches_sent <= rounds + 1
        assert b.rep.stats.sync_rounds == 0


async def test_sync_backs_off_while_gossip_runs_late(tmp_path: Path) -> None:
    """Events that arrive long after their timestamps (gossip running late) widen the
    window in which periodic sync leaves an author to gossip, up to a cap."""
    async with tnodes(tmp_path, 2, gossip={"batch_ms": 50.0},
                      sync={"interval_s": 3600.0, "on_connect": False}) as ns:
        a, b = ns
        await a.host.connect(b.host.addrs[0])
        topic = a.ps.topic(gossip.topic_name(NET))
        await wait_until(lambda: b.host.peer_id in topic.mesh_peers())
        assert b.rep.live_window_s() == gossip.LIVE_S
        late_ms = int(time.time() * 1000) - 8_000
        for i in range(10):
            ev = a.ledger.publish(a.ident, body(i), late_ms + i)
            a.rep.publish_event(ev)
            await wait_until(lambda i=i: b.ledger.count() == i + 1)  # type: ignore[misc]
        assert b.rep.stats.gossip_delay_s > 3
        assert gossip.LIVE_S + 5 < b.rep.live_window_s() <= gossip.LIVE_WINDOW_MAX_S
        # Old events only (re-gossip, a restarted peer's backlog) are not a measure.
        before = b.rep.stats.gossip_delay_s
        ev = a.ledger.publish(Identity.generate(), body(99), late_ms - 60_000)
        a.rep.publish_event(ev)
        await wait_until(lambda: b.ledger.count() == 11)
        assert b.rep.stats.gossip_delay_s == before


async def test_pull_sync_catches_up_without_gossip(tmp_path: Path) -> None:
    async with tnodes(tmp_path, 3) as ns:
        a, b, c = ns
        await a.host.connect(b.host.addrs[0])
        a.publish(100)
        await wait_until(lambda: b.ledger.count() == 100)
        # Stored but never gossiped (as if written while offline): only pull finds them.
        for i in range(250):
            a.ledger.publish(a.ident, body(1000 + i), int(time.time() * 1000))
        await wait_until(lambda: b.ledger.digest() == a.ledger.digest())  # periodic sync
        # c joins late: the on-connect sync fetches the whole history.
        await c.host.connect(b.host.addrs[0])
        await wait_until(lambda: c.ledger.digest() == a.ledger.digest())
        assert c.ledger.count() == 350 and b.rep.stats.sync_events >= 250
        assert c.rep.stats.events["accepted"] == 350  # each event stored exactly once


async def test_periodic_sync_that_pulls_looks_again_soon(tmp_path: Path) -> None:
    """Events gossip never brought (as for a node outside the mesh) arrive by
    periodic sync, and such a round schedules the next one soon."""
    async with tnodes(tmp_path, 2, sync={"interval_s": 0.5, "on_connect": False}) as ns:
        a, b = ns
        await a.host.connect(b.host.addrs[0])
        for i in range(50):
            a.ledger.publish(a.ident, body(i), int(time.time() * 1000))
        await wait_until(lambda: b.ledger.digest() == a.ledger.digest())
        assert b.rep.stats.sync_events == 50 and b.rep.stats.sync_catch_up >= 1


async def test_node_pruned_out_of_the_mesh_returns(tmp_path: Path) -> None:
    """A node PRUNEd by every topic peer, as over-full heartbeats do, backed off 60 s
    from all of them (py-libp2p 0.8.1 `handle_prune`), and peers whose mesh is full
    never GRAFT it: it stayed outside the mesh for a minute, getting events only by
    sync. With heartbeat PRUNEs costing `PRUNER_BACK_OFF_S` on both sides and the
    mesh watchdog it is back within seconds, and gossip reaches it again."""
    async with tnodes(tmp_path, 3, pubsub={"degree": 2, "degree_low": 1, "degree_high": 3},
                      sync={"interval_s": 3600.0, "on_connect": False}) as ns:
        a, b, c = ns
        ta, tb, tc = (n.ps.topic(gossip.topic_name(NET)) for n in ns)
        await b.host.connect(c.host.addrs[0])
        await wait_until(lambda: c.host.peer_id in tb.mesh_peers()
                         and b.host.peer_id in tc.mesh_peers())
        await a.host.connect(b.host.addrs[0])
        await a.host.connect(c.host.addrs[0])
        await wait_until(lambda: len(ta.peers()) == 2 and bool(ta.mesh_peers()))
        # Pushed out: both PRUNE it (as an over-full heartbeat would).
        await tb.prune(a.host.peer_id)
        await tc.prune(a.host.peer_id)
        await wait_until(lambda: a.rep.stats.mesh_lost >= 1)
        await wait_until(lambda: bool(ta.mesh_peers()), timeout=45)  # upstream alone: >= 60 s
        back = ta.mesh_peers()
        await wait_until(lambda: a.host.peer_id in tb.mesh_peers() | tc.mesh_peers())
        # Gossip reaches it again (sync is off here).
        (b if b.host.peer_id in back else c).publish(5)
        await wait_until(lambda: a.ledger.count() == 5)
        assert a.rep.stats.sync_rounds == 0 and a.rep.stats.events["accepted_gossip"] == 5
        assert a.rep.mesh_state()["mesh_peers"] >= 1


async def test_garbage_peer_is_counted_and_cut_off(tmp_path: Path) -> None:
    async with tnodes(tmp_path, 3, gossip={"fault_threshold": 5, "block_s": 60.0}) as ns:
        a, b, c = ns
        await a.host.connect(b.host.addrs[0])
        await b.host.connect(c.host.addrs[0])
        await wait_mesh(ns)
        ids = a.publish(50)
        async with open_host(bytes([66]) * 32) as evil, make_pubsub(evil) as eps:
            await evil.connect(b.host.addrs[0])
            topic = eps.topic(gossip.topic_name(NET))
            sub = await topic.subscribe()  # join the mesh like an honest peer
            del sub
            await wait_until(lambda: evil.peer_id in b.ps.topic(topic.name).peers())
            wire = a.ledger.get_wire(ids[0])
            assert wire is not None
            forged = codec.pack([codec.unpack(wire, 1 << 20)[0], bytes(64)])  # bad signature
            for i in range(10):
                payload = b"\xc1garbage" if i % 2 else gossip.encode_batch([forged])
                await topic.publish(payload + bytes([i]) if i % 2 else payload)
                if b.host.is_blocked(evil.peer_id):
                    break
            await wait_until(lambda: b.rep.stats.cut_off == 1)
            assert b.host.is_blocked(evil.peer_id)
            await wait_until(lambda: not b.host.is_connected(evil.peer_id))
            assert sum(b.rep.stats.faults.values()) >= 5
            assert str(evil.peer_id) in b.rep.stats.cut_off_peers
        # Honest traffic is unaffected and nothing accepted was lost.
        c.publish(50)
        await wait_until(lambda: all(n.ledger.count() == 100 for n in ns))
        assert len({n.ledger.digest() for n in ns}) == 1
        assert a.rep.stats.cut_off == c.rep.stats.cut_off == 0


async def test_mdns_discovers_lan_peers(tmp_path: Path) -> None:
    cfg = config.from_dict({"p2p": {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0}})
    async with open_host(bytes([71]) * 32, ["/ip4/0.0.0.0/tcp/0"]) as a, \
            open_host(bytes([72]) * 32, ["/ip4/0.0.0.0/tcp/0"]) as b, \
            trio.open_nursery() as nursery:
        for h in (a, b):
            disc = discovery.Discovery(h, cfg)
            nursery.start_soon(disc.run)
            nursery.start_soon(discovery.run_mdns, h, disc, NET)
        await wait_until(lambda: a.is_connected(b.peer_id) or b.is_connected(a.peer_id), 20)
        nursery.cancel_scope.cancel()


async def test_discovery_redials_a_dropped_bootstrap_peer_at_once() -> None:
    """A connected bootstrap address is not polled (only checked again after
    `discovery.RECHECK_S`, 30 s): a closed connection wakes discovery, which redials
    it at once, every time."""
    cfg = config.from_dict({"p2p": {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0}})
    async with open_host(bytes([73]) * 32) as a, open_host(bytes([74]) * 32) as b, \
            trio.open_nursery() as nursery:
        disc = discovery.Discovery(a, cfg)
        disc.add(b.addrs[0])
        nursery.start_soon(disc.run)

        def conns() -> list[object]:
            return list(a._swarm.connections.get(b.peer_id, []))

        await wait_until(lambda: a.is_connected(b.peer_id), 20, "the first dial")
        for _ in range(2):
            before = conns()

            def redialed(before: list[object] = before) -> bool:
                return a.is_connected(b.peer_id) and not any(c in before for c in conns())

            await b.disconnect(a.peer_id)  # the far end hangs up
            await wait_until(redialed, 15, "a redial")
        nursery.cancel_scope.cancel()


async def test_a_sync_peer_that_lets_requests_time_out_is_backed_off(tmp_path: Path) -> None:
    """Issue 12: a peer that takes our sync requests and never answers held a sync slot
    for the whole request timeout every time it was picked; now it is backed off."""
    async def never_answer(stream: Any) -> None:
        await trio.sleep(30)  # bounded: the requester gives up after 1 s

    async with tnodes(tmp_path, 1, sync={"request_timeout_s": 1.0, "on_connect": False,
                                         "interval_s": 3600}) as (a,), \
            open_host(bytes([77]) * 32) as silent:
        set_stream_handler(silent, a.rep.protocol, never_answer)
        await a.host.connect(silent.addrs[0])
        s = await a.rep.sync_with(silent.peer_id)
        assert s is not None and s.failed and not s.progressed
        assert a.rep.stats.sync_timed_out == 1
        assert a.rep.sync_record.backed_off(silent.peer_id)
        assert await a.rep.sync_with(silent.peer_id) is None  # not picked again now
        assert silent.peer_id not in a.rep._sync_candidates()


async def test_sync_reconciles_and_falls_back_for_an_older_peer(tmp_path: Path) -> None:
    """Sessions run on /sync/2; a peer serving only /sync/1 (an older node) is synced
    over that, whether identify told us first or multistream's "na" did."""
    from node import p2p, sync

    async with tnodes(tmp_path, 2, sync={"on_connect": False, "interval_s": 3600}) as ns, \
            open_host(bytes([78]) * 32) as old:
        a, b = ns
        old_led = Ledger(tmp_path / "old.db", network=NET)
        ident = Identity.from_seed(bytes([79]) * 32)
        for i in range(30):
            old_led.publish(ident, body(i), 1000 + i)

        async def serve_v1(pubkey: bytes, payload: bytes) -> bytes:
            return sync.handle(old_led, payload)

        p2p.serve_requests(old, sync.protocol_id(NET), serve_v1, sync.MAX_REQUEST)
        for i in range(40):
            a.ledger.publish(Identity.from_seed(bytes([100 + i]) * 32), body(i), 1000)
        await b.host.connect(a.host.addrs[0])
        s = await b.rep.sync_with(a.host.peer_id)
        assert s is not None and s.failed is None and b.ledger.digest() == a.ledger.digest()
        assert b.rep.stats.sync_reconciled == 1 and a.rep.stats.sync_served >= 1
        await b.host.connect(old.addrs[0])
        s = await b.rep.sync_with(old.peer_id)
        assert s is not None and s.failed is None and b.ledger.count() == 70
        assert b.rep.stats.sync_reconciled == 1  # this one ran on /sync/1
        old_led.close()


async def test_a_long_chain_a_gap_releases_is_stored_in_slices(tmp_path: Path) -> None:
    """Issue 12: filling a gap in front of a long chain stores at most DRAIN_SLICE of
    the waiting events in that store (one loop step); the replicator's drain task
    stores the rest a slice per step. Every event is stored and heard of once; those
    a gossip peer sent us are not gossiped again, the others (SUBMIT) are."""
    async with tnodes(tmp_path, 2, sync={"interval_s": 3600.0, "on_connect": False}) as ns:
        a, b = ns
        heard: list[bytes] = []
        b.rep.listeners.append(lambda evs: heard.extend(e.id for e in evs))
        pushed: list[bytes] = []
        gossip_on = b.rep.gossip

        def spy(wires: list[bytes]) -> None:
            pushed.extend(wires)
            gossip_on(wires)

        b.rep.gossip = spy  # type: ignore[method-assign]
        chains = {}
        for who, n in (("submit", 300), ("gossip", 150)):
            ident = Identity.from_seed(bytes([0x40 + len(chains)]) * 32)
            chains[who] = [a.ledger.publish(ident, body(i), int(time.time() * 1000) + i)
                           for i in range(n)]
        sub, gsp = chains["submit"], chains["gossip"]
        b.ledger.append_many([e.wire for e in sub[1:]], source=("submit", b"k"))
        b.ledger.append_many([e.wire for e in gsp[1:]], source=a.host.peer_id)
        assert b.ledger.pending_count == 299 + 149
        first = b.ledger.append_many([sub[0].wire, gsp[0].wire])
        assert [len(r.accepted) for r in first] == [1 + gossip.DRAIN_SLICE, 1]
        assert b.ledger.ready_count == 2  # the rest of both chains waits for the task
        await wait_until(lambda: b.ledger.count() == 450 and b.ledger.pending_count == 0)
        drained = 450 - 2 - gossip.DRAIN_SLICE
        assert b.rep.stats.events["accepted_drained"] == drained == len(heard) == len(set(heard))
        assert pushed == [e.wire for e in sub[1 + gossip.DRAIN_SLICE:]]  # SUBMIT's rest only


async def test_sync_does_not_check_records_gossip_stored_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of a sync answer that the ledger holds by the time the answer arrives
    (gossip stored them while it was on its way) skip the signature check; the rest
    are checked and stored as before."""
    from node import gossip_pull
    from node.ledger import check_records

    async with tnodes(tmp_path, 2, sync={"on_connect": False, "interval_s": 3600}) as ns:
        a, b = ns
        ident = Identity.from_seed(bytes([81]) * 32)
        wires = [a.ledger.publish(ident, body(i), 1000 + i).wire for i in range(30)]
        checked: list[bytes] = []

        def spy(records: list[bytes], network: str) -> list[Any]:
            checked.extend(records)
            return check_records(records, network)

        monkeypatch.setattr(gossip_pull, "check_records", spy)
        send = b.rep._send

        async def send_then_gossip(*args: Any) -> Any:
            resp = await send(*args)
            if gossip_pull._records_of(resp) and not b.ledger.count():
                b.ledger.append_many(wires[:12])  # as if gossip delivered these meanwhile
            return resp

        monkeypatch.setattr(b.rep, "_send", send_then_gossip)
        await b.host.connect(a.host.addrs[0])
        s = await b.rep.sync_with(a.host.peer_id)
        assert s is not None and s.failed is None
        assert b.ledger.digest() == a.ledger.digest() and b.ledger.count() == 30
        assert checked == wires[12:] and len(s.accepted) == 18


async def test_catch_up_pages_are_pipelined(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh node pulling a long chain asks for each page while it still checks and
    stores the one before (the peer serves it meanwhile): every page after the first
    goes out before our head has reached where it starts, and none is asked for
    nothing."""
    async with tnodes(tmp_path, 2, sync={"on_connect": False, "interval_s": 3600,
                                         "range_limit": 64}) as ns:
        a, b = ns
        ident = Identity.from_seed(bytes([82]) * 32)
        for i in range(640):
            a.ledger.publish(ident, body(i), 1000 + i)
        early: list[bool] = []  # per FETCH: sent before the page it follows was stored
        send = b.rep._send

        async def spy(peer: Any, req: Any, version: int = 1) -> Any:
            if isinstance(req, sync.FetchRequest):
                head = b.ledger.head(ident.public)
                early.append((head.seq if head else 0) < req.entries[0].from_seq)
            return await send(peer, req, version)

        monkeypatch.setattr(b.rep, "_send", spy)
        await b.host.connect(a.host.addrs[0])
        s = await b.rep.sync_with(a.host.peer_id)
        assert s is not None and s.failed is None
        assert b.ledger.digest() == a.ledger.digest()
        assert len(early) == 10 and all(early[1:])
        assert (b.rep.stats.sync_ahead, b.rep.stats.sync_ahead_dropped) == (9, 0)
