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
