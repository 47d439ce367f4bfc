"""Sync slots and per-peer sync history (node/sync_peers.py) against tarpits, on trio's
virtual clock with real ledgers and real sessions: a crowd of tarpit identities never
holds every slot, each is cut and backed off, and a fresh node still catches up with
an honest peer (issue 12 item 5)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from test_sync import FakeTarpit, body, ledger

from node import sync
from node.keys import Identity
from node.ledger import Ledger
from node.sync_peers import SlotGate, SyncRecord, SyncSlots
from node.sync_session import SyncLimits, SyncSession, drive


def test_strangers_never_hold_the_reserved_slots() -> None:
    s = SyncSlots(4, 1)
    assert [s.take(f"t{i}", False) for i in range(5)] == [True, True, True, False, False]
    assert not s.take("t0", True)  # one session per peer, known or not
    assert s.take("honest", True) and not s.take("other", True)  # all four in use
    s.release("t1")
    s.wait("known", True)
    assert not s.take("t9", False)  # a known peer waits: it goes first
    assert s.take("known", True)
    s.unwait("known")
    assert s.status() == {"slots": 4, "reserved": 1, "held": 4, "held_by_strangers": 2,
                          "waiting": 0, "per_subnet": 1_000_000, "refused_per_subnet": 0}
    assert SyncSlots(1, 5).reserved == 0  # at least one slot stays open to strangers


def test_record_backs_off_doubling_and_forgives_progress() -> None:
    now = [0.0]
    r = SyncRecord(lambda: now[0], penalty_s=10.0, penalty_max_s=35.0, max_peers=3)
    r.productive("a")
    assert not r.backed_off("a")
    assert [r.stalled("a"), r.stalled("a"), r.stalled("a")] == [10.0, 20.0, 35.0]
    assert r.backed_off("a") and r.backed_off_count() == 1
    now[0] = 35.0
    assert not r.backed_off("a")
    r.productive("a")
    assert r.stalled("a") == 10.0  # strikes cleared by the productive session
    for p in ("b", "c", "d"):
        r.stalled(p)
    assert not r.backed_off("a")  # forgotten: bounded memory (least recently touched)
    assert r.stalls == 7


def test_strangers_of_one_subnet_share_its_slots_and_good_ones_go_first() -> None:
    s = SyncSlots(4, 1, per_group=2)
    # A stream of fresh identities from one subnet: two sessions, not three.
    assert [s.take(f"n{i}", False, "10.0.0.0/24") for i in range(3)] == [True, True, False]
    assert s.take("other", False, "10.0.1.0/24")  # another subnet: the last stranger slot
    assert s.status()["refused_per_subnet"] == 1
    assert s.take("known", True, "10.0.0.0/24")  # peers we dialed are not counted
    s.release("n0")
    s.release("other")
    s.wait("good", False, good=True)  # a stranger whose last session was productive
    assert not s.take("fresh", False, "10.0.2.0/24")  # waits behind it
    assert s.take("good", False, "10.0.3.0/24", good=True)
    assert s.unwait("good")  # it had precedence: waiters are woken
    s.release("good")
    assert s.take("fresh", False, "10.0.2.0/24")
    assert s.take("no-address", False, None)  # an unknown address is not grouped
    assert s.status()["held_by_strangers"] == 3


def test_a_peer_whose_requests_time_out_is_backed_off_and_loses_its_good_record() -> None:
    now = [0.0]
    r = SyncRecord(lambda: now[0], penalty_s=10.0, penalty_max_s=100.0)
    r.productive("a")
    assert r.good("a") and not r.good("b")
    assert r.timed_out("a") == 10.0 and r.backed_off("a") and not r.good("a")
    assert r.stalled("a") == 20.0  # timeouts and stalls are strikes in one row
    assert (r.timeouts, r.stalls) == (1, 1)
    r.reconnected("a")
    assert r.backed_off("a")  # a stall's back-off survives a reconnection ...
    now[0] = 100.0
    assert r.timed_out("a") == 40.0
    r.reconnected("a")  # ... a timeout's does not (a partition healed, say)
    assert not r.backed_off("a")


class Node:
    """The shell's use of the pieces (node/gossip.py `sync_with`/`_session`), minus I/O."""

    def __init__(self, led: Ledger, limits: SyncLimits) -> None:
        self.led = led
        self.limits = limits
        self.record = SyncRecord(trio.current_time, penalty_s=60.0)
        self.gate = SlotGate(SyncSlots(4, 1))
        self.stalled: list[str] = []

    async def sync_with(self, peer: str, send: object, dialed: bool) -> SyncSession | None:
        if self.record.backed_off(peer):
            return None
        if not await self.gate.acquire(peer, lambda: dialed, self.limits.session_s):
            return None
        try:
            s = SyncSession(self.led, self.limits, clock=trio.current_time)
            await drive(s, send)  # type: ignore[arg-type]
        finally:
            self.gate.release(peer)
        if s.stalled:
            self.record.stalled(peer)
            self.stalled.append(peer)
        elif s.progressed:
            self.record.productive(peer)
        return s


async def fresh_node_beside_tarpits(tmp_path: Path, *, dialed: bool, n_pits: int = 6
                                    ) -> tuple[float, Node, list[FakeTarpit]]:
    honest, fresh = ledger(tmp_path, "honest"), ledger(tmp_path, "fresh")
    for i in range(30):
        ident = Identity.generate()
        for j in range(10):
            honest.publish(ident, body(i * 100 + j), 1000 + j)
    node = Node(fresh, SyncLimits(heads_page=8, range_limit=4, stall_s=30.0))
    pits = [FakeTarpit(delay=4.5) for _ in range(n_pits)]

    async def honest_send(req: sync.SyncRequest) -> sync.SyncResponse | None:
        await trio.sleep(0.05)
        return sync.decode_response(sync.handle(honest, req.encode()))

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        # The tarpits connected first: their on-connect sessions queue before ours.
        for i, pit in enumerate(pits):
            nursery.start_soon(node.sync_with, f"pit{i}", pit.send, False)
        await trio.sleep(0.1)

        async def periodic() -> None:  # on connect, then every 5 s, as the shell does
            while fresh.digest() != honest.digest():
                nursery.start_soon(node.sync_with, "honest", honest_send, dialed)
                await trio.sleep(5.0)

        nursery.start_soon(periodic)
        with trio.fail_after(600):
            while fresh.digest() != honest.digest():
                await trio.sleep(0.1)
        took = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    return took, node, pits


async def test_dialed_honest_peer_syncs_at_once_beside_tarpits(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    took, node, pits = await fresh_node_beside_tarpits(tmp_path, dialed=True)
    assert took < 10.0  # the reserved slot: no wait for any tarpit
    assert sum(1 for p in pits if p.requests) == 3  # strangers held the other three
    assert not node.stalled  # caught up before any tarpit session was even cut


async def test_stranger_honest_peer_syncs_once_tarpits_are_cut(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """An honest peer that dialed us is a stranger too: it gets a slot when tarpit
    sessions are cut (stall_s), and the cut tarpits are backed off, not picked again."""
    took, node, pits = await fresh_node_beside_tarpits(tmp_path, dialed=False)
    assert took < 2 * (30.0 + 4.5) + 5.0 + 1.0
    assert len(node.stalled) >= 3 and all(p.startswith("pit") for p in node.stalled)
    assert all(node.record.backed_off(p) for p in node.stalled)
    # A tarpit never answered more than a stall's worth of slow requests per session.
    assert all(p.requests <= 2 + 30.0 / 4.5 + 1 for p in pits)
