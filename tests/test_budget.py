"""Rate budgets (node/budget.py): token buckets per scope, all-or-nothing charges,
gossip budgets per forwarding peer. Pure, on a fake clock."""

from __future__ import annotations

import pytest

from node.budget import Bucket, GossipBudget, KeyedBuckets, MultiBudget
from node.errors import UsageError


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_bucket_refills_at_rate_up_to_burst() -> None:
    b = Bucket.full(10, 20, 0.0)
    b.tokens = 0
    assert b.refill(1.0) == 10
    assert b.refill(100.0) == 20
    assert b.refill(50.0) == 20  # a clock going back adds nothing


def test_keyed_buckets_forget_least_recent_keys() -> None:
    kb = KeyedBuckets(1, 5, max_keys=2)
    kb.bucket("a", 0).tokens = 0
    kb.bucket("b", 0)
    kb.bucket("a", 0)  # a is the most recent now
    kb.bucket("c", 0)  # b goes
    assert len(kb) == 2 and kb.bucket("a", 0).tokens == 0
    with pytest.raises(UsageError):
        KeyedBuckets(0, 1)


def test_multi_budget_is_all_or_nothing_and_skips_unknown_keys() -> None:
    mb = MultiBudget({"peer": KeyedBuckets(1, 10), "ip": KeyedBuckets(1, 15),
                      "node": KeyedBuckets(1, 100, 1)})
    assert mb.charge({"peer": "p1", "ip": "1.2.3.4", "node": "n"}, 10, 0) is None
    # p2 from the same IP: its own bucket is full, the IP's has 5 left.
    assert mb.charge({"peer": "p2", "ip": "1.2.3.4", "node": "n"}, 10, 0) == "ip"
    # ... and that refusal took nothing from p2 or the node.
    assert mb.charge({"peer": "p2", "ip": None, "node": "n"}, 10, 0) is None
    assert mb.scopes["node"].bucket("n", 0).tokens == 80
    assert mb.refused == {"ip": 1}


def test_gossip_budget_drops_beyond_rate_and_counts_the_peer() -> None:
    clock = Clock()
    gb = GossipBudget(events_per_s=100, bytes_per_s=10_000, burst_s=2, clock=clock)
    assert gb.charge_events("flood", 200).ok  # the burst: 2 s of rate
    v = gb.charge_events("flood", 1)
    assert not v.ok and v.scope == "events"
    assert gb.charge_events("honest", 50).ok  # another peer is unaffected
    clock.t = 1.0
    assert gb.charge_events("flood", 100).ok and not gb.charge_events("flood", 1).ok
    assert gb.charge_bytes("flood", 20_000).ok
    v = gb.charge_bytes("flood", 1)
    assert not v.ok and v.scope == "bytes"
    st = gb.status()
    assert st["dropped_batches"] == {"events": 2, "bytes": 1}
    assert st["dropped_events"] == 2 and st["dropped_bytes"] == 1
    assert set(st["peers_over_budget"]) == {"flood"}
    assert st["peers_over_budget"]["flood"]["accepted_events"] == 300


def test_gossip_budget_sustained_flood_gets_its_rate_only() -> None:
    """A peer pushing 1,622 events/s (measured) for 15 s stores at most its budget."""
    clock = Clock()
    gb = GossipBudget(events_per_s=1000, bytes_per_s=1 << 20, burst_s=4, clock=clock)
    stored = 0
    for i in range(int(15 * 1622 / 256)):
        clock.t = i * 256 / 1622
        if gb.charge_events("flood", 256).ok:
            stored += 256
    assert stored <= 1000 * 15 + 4000
    assert stored >= 1000 * 15 - 256  # and it does get its budget


def test_gossip_budget_faults_only_own_publishes_beyond_their_rate() -> None:
    """Relayed batches fill the forwarding budget and are dropped without fault; a
    peer is at fault only when what it publishes itself exceeds the rate."""
    clock = Clock()
    gb = GossipBudget(events_per_s=100, bytes_per_s=10_000, burst_s=2, clock=clock)
    assert gb.charge_events("relay", 180).ok  # relayed: not its own
    v = gb.charge_events("relay", 50, own=True)  # its own share, within its own rate
    assert not v.ok and not v.fault  # dropped (the forwarding budget is full), no fault
    clock.t = 1.0
    assert gb.charge_events("relay", 100, own=True).ok
    clock.t = 1.5
    v = gb.charge_events("relay", 160, own=True)  # own bucket: 150 left < 160
    assert not v.ok and v.fault and v.scope == "events"
    assert gb.charge_bytes("flooder", 20_000, own=True).ok
    v = gb.charge_bytes("flooder", 1, own=True)
    assert not v.ok and v.fault and v.scope == "bytes"


def test_a_new_peer_starts_with_its_first_burst_only() -> None:
    """A peer we have not heard from starts with `first_s` of its rate, not a whole
    burst (bench/hostile.py `gossip_flood`: a new identity stored 4 s of budget at
    once); the burst grows back to `burst_s` while it stays under the rate."""
    clock = Clock()
    gb = GossipBudget(events_per_s=100, bytes_per_s=10_000, burst_s=4, clock=clock, first_s=1)
    assert gb.charge_events("new", 100).ok
    assert not gb.charge_events("new", 1).ok
    clock.t = 10.0  # quiet for longer than a burst
    assert gb.charge_events("new", 400).ok and not gb.charge_events("new", 1).ok
    assert gb.charge_bytes("other", 10_000).ok and not gb.charge_bytes("other", 1).ok
    # Its own publishes start with a whole burst: a newcomer's first paced burst is
    # dropped beyond the forwarding budget, but no fault.
    v = gb.charge_events("fresh", 150, own=True)
    assert not v.ok and not v.fault and v.scope == "events"
    with pytest.raises(UsageError):
        GossipBudget(events_per_s=1, bytes_per_s=1, burst_s=1, clock=clock, first_s=0)


def test_rotating_identities_share_their_subnet_budget() -> None:
    """Fresh identities from one subnet each get a first burst of their own, but
    together no more than the subnet's rate (plus its first burst); a batch the
    subnet refuses costs the peer nothing, and the peer is not named over its own
    budget."""
    clock = Clock()
    gb = GossipBudget(events_per_s=100, bytes_per_s=1 << 20, burst_s=2, clock=clock,
                      first_s=1, subnet_events_per_s=300)
    stored = 0
    for i in range(100):  # ten new identities a second for 10 s
        clock.t = i / 10
        while gb.charge_events(f"id{i}", 50, subnet="10.0.0.0/24").ok:
            stored += 50
    assert 300 * 9 <= stored <= 300 * 10 + 300
    v = gb.charge_events("late", 50, own=True, subnet="10.0.0.0/24")
    assert not v.ok and v.scope == "subnet_events" and not v.fault
    # All or nothing: the refusal took nothing from its own bucket (a first burst).
    assert gb.charge_events("late", 100, subnet="10.9.9.0/24").ok
    assert gb.charge_events("unknown-address", 100).ok  # no subnet: its own budget only
    st = gb.status()
    assert st["dropped_batches"].get("subnet_events", 0) >= 90
    assert st["subnet_events_per_s"] == 300 and st["first_s"] == 1
