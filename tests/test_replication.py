"""The replication policy (node/replication.py), sans-I/O: pure stepping on a manual
clock, and whole nodes on a seeded fake network under trio's virtual clock (real
ledgers and sync codecs; gossip along a mesh the test can cut)."""

from __future__ import annotations

import collections
import itertools
import random

import pytest
import trio
import trio.testing
from conftest import FakeNetRunner
from fakenet import FakeMesh

from node import config
from node.events import Event, Offer, sign_event
from node.keys import Identity
from node.replication import (
    CATCH_UP_S,
    GAP_GRACE_MAX_S,
    GAP_GRACE_S,
    LIVE_S,
    LIVE_WINDOW_MAX_S,
    MESH_CHECK_S,
    MESH_GRACE_S,
    MESH_RETRY_MAX_S,
    MESH_RETRY_S,
    Clock,
    ReplicationPolicy,
)

NET = "repltest"
EPOCH = 1_800_000_000.0


def body(i: int) -> Offer:
    return Offer(services=(), currency="EUR", addrs=(), note=f"e{i}")


class Manual:
    """A clock the test steps by hand."""

    def __init__(self) -> None:
        self.t = 100.0
        self.clock = Clock.virtual(lambda: self.t, EPOCH)

    def step(self, s: float) -> None:
        self.t += s


def policy(clock: Clock, seed: int = 1, **sections: dict[str, object]) -> ReplicationPolicy[int]:
    return ReplicationPolicy(config.from_dict(dict(sections)), clock, random.Random(seed))


# ------------------------------------------------------------------ pure stepping


def test_pacing_one_round_per_batch_ms_and_batch_bounds() -> None:
    m = Manual()
    p = policy(m.clock, gossip={"batch_ms": 200.0, "batch_events": 3,
                                "max_batch_bytes": 17 * 1024})
    assert p.round_at() < m.t  # quiet so far: the first event goes out at once
    p.queue([b"a" * 10] * 7)
    assert p.stats.outbox_max == 7
    p.start_round()
    assert p.round_at() == pytest.approx(m.t + 0.2)
    assert [len(p.next_batch()) for _ in range(2)] == [3, 3]
    p.queue([b"b" * 10] * 2)  # queued while the round is being published ...
    assert [len(p.next_batch()) for _ in range(2)] == [1, 0]  # ... waits for the next
    m.step(0.05)
    assert p.round_at() > m.t  # the next round waits for batch_ms
    m.step(0.15)
    p.start_round()
    assert [len(p.next_batch()) for _ in range(2)] == [2, 0]
    # Bytes bound: records that would pass max_batch_bytes wait for the next batch.
    p.queue([b"x" * 9000, b"y" * 9000, b"z" * 20_000])
    p.start_round()
    assert [len(p.next_batch()) for _ in range(4)] == [1, 1, 1, 0]


def test_publish_pace_holds_a_burst_below_peers_receive_budget() -> None:
    """A burst of our own events (a client's SUBMITs, a control-socket publish) goes
    out at `gossip.publish_*`, not at once: peers fault a node whose own publishes
    exceed their receive budget (node/budget.py)."""
    m = Manual()
    p = policy(m.clock, gossip={"batch_ms": 10.0, "batch_events": 64,
                                "publish_events_per_s": 100, "publish_burst_s": 1.0,
                                "publish_bytes_per_s": 64 * 1024})
    p.queue([b"e" * 100] * 250)
    p.start_round()
    assert [len(p.next_batch()) for _ in range(3)] == [64, 36, 0]  # the burst: 100
    assert p.stats.publish_paced == 1 and p.outbox_len == 150
    assert p.round_at() == pytest.approx(m.t + 0.64)  # room for a whole batch again
    sent, t0 = 100, m.t
    while p.outbox_len:
        m.t = max(m.t, p.round_at())
        p.start_round()
        while batch := p.next_batch():
            sent += len(batch)
        assert sent <= 100 + 100 * (m.t - t0) + 1e-9  # never beyond burst + rate
    assert sent == 250 and m.t - t0 == pytest.approx(1.5, abs=0.2)
    # Bytes too: 40 records of 10 KB against 64 KiB/s with 64 KiB of burst.
    p.queue([b"b" * 10_000] * 40)
    m.t += 10  # both paces full again
    p.start_round()
    first = sum(len(b) for b in iter(p.next_batch, []))
    assert first == 6  # 6 x ~10 KB fit the 64 KiB burst
    t0, sent = m.t, 0
    while p.outbox_len:
        m.t = max(m.t, p.round_at())
        p.start_round()
        sent += sum(len(b) for b in iter(p.next_batch, []))
    assert sent == 34 and m.t - t0 == pytest.approx(34 * 10_008 / 65536, rel=0.1)


def test_publish_pace_below_one_record_still_sends() -> None:
    """A pace whose burst is smaller than one record sends one record per refill."""
    m = Manual()
    p = policy(m.clock, gossip={"batch_ms": 0.0, "publish_events_per_s": 1,
                                "publish_burst_s": 0.5, "publish_bytes_per_s": 64 * 1024})
    p.queue([b"e"] * 3)
    p.start_round()
    assert [len(p.next_batch()) for _ in range(2)] == [1, 0]
    m.t = p.round_at()
    assert m.t > 100.0
    p.start_round()
    assert len(p.next_batch()) == 1


def test_live_window_follows_gossip_delay_within_bounds() -> None:
    m = Manual()
    p = policy(m.clock)
    assert p.live_window_s() == LIVE_S
    assert p.live_after_ms() == int((EPOCH + m.t - LIVE_S) * 1000)
    for _ in range(60):  # gossip reaching us 8 s after the events were signed
        p.gossip_received(int((EPOCH + m.t - 8) * 1000))
    assert LIVE_S + 5 < p.live_window_s() <= LIVE_WINDOW_MAX_S
    assert p.gap_grace_s() == GAP_GRACE_MAX_S
    # Old events only (re-gossip, a restarted peer's backlog) are not a measure.
    before = p.stats.gossip_delay_s
    p.gossip_received(int((EPOCH + m.t - 70) * 1000))
    assert p.stats.gossip_delay_s == before
    for _ in range(200):
        p.gossip_received(int((EPOCH + m.t) * 1000))
    assert p.live_window_s() == pytest.approx(LIVE_S, abs=0.01)
    assert p.gap_grace_s() == GAP_GRACE_S


def test_regossip_only_what_gossip_clearly_lost() -> None:
    m = Manual()
    p = policy(m.clock, gossip={"regossip_window_s": 30.0})
    ident = Identity.from_seed(bytes([9]) * 32)
    now_ms = int((EPOCH + m.t) * 1000)

    def ev(seq: int, age_ms: int) -> Event:
        return sign_event(ident.seed, seq, None if seq == 1 else bytes(32), now_ms - age_ms,
                          body(seq), NET)

    young, lost, ancient = ev(1, 2_000), ev(2, 15_000), ev(3, 60_000)
    assert p.regossip([young, lost, ancient]) == [lost.wire]
    assert p.stats.regossiped == 1 and p.outbox_len == 1
    # Gossip already behind (the outbox holds events): push nothing more.
    assert p.regossip([lost]) == []
    p.next_batch()
    off = policy(m.clock, gossip={"regossip_window_s": 0.0})
    assert off.regossip([lost]) == []


def test_faults_cut_off_at_threshold_within_window() -> None:
    m = Manual()
    p = policy(m.clock, gossip={"fault_threshold": 3, "fault_window_s": 10.0, "block_s": 60.0})
    assert p.fault(7, "malformed") is None
    m.step(11)  # the first fault left the window
    assert p.fault(7, "malformed") is None
    assert p.fault(7, "bad_signature") is None
    cut = p.fault(7, "bad_signature")
    assert cut is not None and cut.peer == 7 and cut.block_s == 60.0
    assert cut.faults == 3 and cut.reasons == {"malformed": 2, "bad_signature": 2}
    assert p.stats.cut_off == 1 and p.stats.faults["bad_signature"] == 2
    assert p.stats.cut_off_peers == {"7": EPOCH + m.t + 60.0}
    # A peer that is blocked already is counted, never cut twice.
    for _ in range(5):
        assert p.fault(8, "x", blocked=lambda peer: peer == 8) is None
    assert p.stats.cut_off == 1
    m.step(61)
    p.fault(9, "x")
    assert p.stats.cut_off_peers == {}  # the shown block expired


def test_periodic_rounds_jittered_seeded_and_sooner_after_a_pull() -> None:
    m = Manual()
    a = policy(m.clock, 5, sync={"interval_s": 4.0})
    b = policy(m.clock, 5, sync={"interval_s": 4.0})
    delays = [a.periodic_delay() for _ in range(20)]
    assert delays == [b.periodic_delay() for _ in range(20)]  # seeded: reproducible
    assert all(2.0 <= d <= 6.0 for d in delays) and len(set(delays)) == 20
    a.periodic_done(0)
    assert a.periodic_delay() >= 2.0
    a.periodic_done(5)  # pulled events gossip had not brought: look again soon
    assert a.periodic_delay() <= CATCH_UP_S * 1.5 and a.stats.sync_catch_up == 1
    assert a.periodic_delay() >= 2.0  # ... once
    assert a.pick([]) is None and a.pick([3, 4]) in (3, 4)


def test_connected_reports_new_peers_once() -> None:
    p = policy(Manual().clock)
    assert sorted(p.connected({1, 2})) == [1, 2]
    assert p.connected({1, 2, 3}) == [3] and p.stats.peers == 3
    assert p.connected({3}) == []
    assert p.connected({1, 3}) == [1]  # reconnected: synced with again


def test_mesh_watchdog_regrafts_after_grace_with_backoff() -> None:
    m = Manual()
    p = policy(m.clock, gossip={"mesh_degree": 2})
    peers = {1, 2, 3, 4}
    # No topic peers: nothing to graft, nothing counted.
    assert p.mesh_check(set(), set()) is None
    m.step(MESH_GRACE_S * 2)
    assert p.mesh_check(set(), set()) is None and p.stats.mesh_lost == 0
    assert p.mesh_check({1}, peers) is None
    # An empty mesh with topic peers: at once, stop refusing their GRAFTs (want 0);
    # upstream's heartbeat gets MESH_GRACE_S before we GRAFT ourselves.
    t0 = m.t
    actions = []
    for _ in range(int(MESH_GRACE_S / MESH_CHECK_S) + 60):
        if (a := p.mesh_check(set(), peers)) is not None:
            actions.append((m.t, a))
        m.step(MESH_CHECK_S)
    assert actions[0] == (t0, actions[0][1]) and actions[0][1].want == 0
    grafts = actions[1:]
    assert grafts[0][0] == pytest.approx(t0 + MESH_GRACE_S)
    assert all(a.want == 2 and sorted(a.peers) == sorted(peers) for _, a in grafts)
    gaps = [t2 - t1 for (t1, _), (t2, _) in itertools.pairwise(grafts)]
    assert gaps[:3] == pytest.approx([MESH_RETRY_S, 2 * MESH_RETRY_S, 4 * MESH_RETRY_S])
    assert max(gaps) <= MESH_RETRY_MAX_S
    assert p.stats.mesh_lost == 1 and p.stats.mesh_regrafts == len(grafts)
    assert p.stats.mesh_empty_s == pytest.approx(m.t - MESH_CHECK_S - t0)
    # Back in the mesh: the episode ends; a new loss starts over.
    assert p.mesh_check({1}, peers) is None
    m.step(1)
    again = p.mesh_check(set(), peers)
    assert again is not None and again.want == 0 and p.stats.mesh_lost == 2
    m.step(MESH_GRACE_S)
    again = p.mesh_check(set(), peers)
    assert again is not None and again.want == 2
    # Seeded: the same order from the same seed, whatever the set order.
    picks = []
    for order in (list(range(20)), list(range(19, -1, -1))):
        mq = Manual()
        q = policy(mq.clock, 3, gossip={"mesh_degree": 3})
        q.mesh_check(set(), set(order))
        mq.step(MESH_GRACE_S)
        a = q.mesh_check(set(), set(order))
        assert a is not None
        picks.append(a.peers)
    assert picks[0] == picks[1]


# ------------------------------------------------------------------ fake network


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fake_mesh_converges_paced_and_batched(
        fake_net: FakeNetRunner, seed: int, autojump_clock: trio.testing.MockClock) -> None:
    net = fake_net.mesh(5, seed, degree=2)
    start = trio.current_time()
    await net.run(per_node=60, rate=20.0)
    elapsed = trio.current_time() - start
    for p in net.policies:
        # Pacing: at most one batch per batch_ms (one round holds one batch here),
        # so 60 events at 20/s share a few messages.
        assert p.stats.batches_sent <= elapsed / 0.2 + 1
        assert p.stats.batches_sent < 60
        assert p.stats.mesh_lost == 0 and p.stats.cut_off == 0
    # Both paths carried events: gossip, and sync repairing its drops (events queued
    # behind a dropped batch are released, and counted, by the sync that fills it).
    for p in net.policies:
        assert p.stats.events["accepted_gossip"] > 0 and p.stats.sync_events > 0


async def test_node_cut_out_of_the_mesh_is_regrafted_and_converges_meanwhile(
        fake_net: FakeNetRunner, autojump_clock: trio.testing.MockClock) -> None:
    net = fake_net.mesh(5, 4, degree=2, drop=0.0)
    victim = 2
    seen: dict[str, int] = {}

    async def lose_mesh(net: FakeMesh) -> None:
        await trio.sleep(2.0)
        net.cut(victim)  # PRUNEd by every mesh peer ...
        net.refuse_until[victim] = trio.current_time() + 12.0  # ... which back off a while
        await trio.sleep(1 + net.delay)  # batches already on their way still arrive
        seen["gossip_at_cut"] = net.policies[victim].stats.events["accepted_gossip"]

    await net.run(per_node=120, rate=4.0, during=lose_mesh)
    p = net.policies[victim]
    assert p.stats.mesh_lost == 1
    assert p.stats.mesh_regrafts >= 2  # the first tries were refused
    # Regrafted once the peers accepted, after the grace and the backoff schedule.
    assert 2.0 + 12.0 <= net.regrafted_at[victim] <= 2.0 + 12.0 + 2 * MESH_RETRY_S + 2
    assert net.mesh(victim)
    # Meanwhile it got the others' events by periodic sync, soon after each round
    # that pulled (catch-up), and none by gossip; after the regraft gossip again.
    assert p.stats.sync_catch_up >= 1
    assert net.gossip_at_regraft[victim] == seen["gossip_at_cut"]
    assert p.stats.events["accepted_gossip"] > seen["gossip_at_cut"]
    assert collections.Counter(led.count() for led in net.ledgers) == {600: 5}


async def test_peer_forging_events_is_cut_off_by_everyone_it_reaches(
        fake_net: FakeNetRunner, autojump_clock: trio.testing.MockClock) -> None:
    net = fake_net.mesh(5, 6, degree=4, drop=0.0,
                        gossip={"batch_ms": 200.0, "mesh_degree": 4, "fault_threshold": 3,
                                "fault_window_s": 60.0, "block_s": 600.0})
    liar = 4
    net.liars.add(liar)
    await net.run(per_node=40, rate=5.0)
    for i in range(4):
        p = net.policies[i]
        assert net.blocked[i] == {liar}
        assert p.stats.cut_off == 1 and set(p.stats.cut_off_peers) == {str(liar)}
        assert p.stats.faults["bad_signature"] == 3
        assert liar not in net.mesh(i)
    # The honest nodes hold everything honest, and each other's events by gossip.
    assert all(net.ledgers[i].count() >= 4 * 40 for i in range(4))
