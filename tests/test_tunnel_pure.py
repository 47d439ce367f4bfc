"""Pure parts of tunnels: wire formats, egress policy, fair sharing, shortfall metering."""

from __future__ import annotations

import pytest

from node.dataplane.egress import EgressPolicy, parse_rule
from node.dataplane.metering import DemandMeter, FairQueue, Ticket
from node.dataplane.tunnel_wire import TunnelEnd, TunnelOpen, TunnelReply, check_host
from node.errors import InvalidMessage, PeerError, UsageError

LEASE = bytes(range(32))


def test_open_round_trip_and_limits() -> None:
    o = TunnelOpen(LEASE, "Example.ORG", 443, b"tok")
    assert TunnelOpen.decode(o.encode()) == TunnelOpen(LEASE, "example.org", 443, b"tok")
    assert TunnelOpen.decode(TunnelOpen(LEASE, "::1", 80).encode()).host == "::1"
    for bad in ("", "a" * 254, "exa mple.org", "a..b", "-x.org", "x\x00.org", "ä.org"):
        with pytest.raises(InvalidMessage):
            check_host(bad)
    with pytest.raises(UsageError):
        TunnelOpen(LEASE, "x.org", 0)
    with pytest.raises(PeerError) as e:
        TunnelOpen.decode(b"\xc1")
    assert e.value.reason == "malformed"
    with pytest.raises(PeerError) as e:
        TunnelOpen.decode(b"\x81\xa1v\x01")  # version only: no lease
    assert e.value.reason == "bad_open"
    with pytest.raises(PeerError) as e:
        TunnelOpen.decode(b"\x00" * 2000)
    assert e.value.reason == "oversized"


def test_reply_and_end_round_trip() -> None:
    ok = TunnelReply(True, addr="1.2.3.4", max_rate_bps=8000, min_rate_bps=None, end_ms=5)
    assert TunnelReply.decode(ok.encode()) == ok
    no = TunnelReply(False, "not_member", "go away")
    assert TunnelReply.decode(no.encode()) == no
    end = TunnelEnd(False, "lease_ended", "over", 10, 20)
    assert TunnelEnd.decode(end.encode()[1:]) == end


def test_egress_policy_order_and_classes() -> None:
    p = EgressPolicy(allow=["127.0.0.1/32", "10.0.0.0/8 8000-8100"],
                     deny=["0.0.0.0/0 25", "10.1.0.0/16"], own=["203.0.113.9"])
    assert p.check("127.0.0.1", 80) is None
    assert p.check("::ffff:127.0.0.1", 80) is None  # mapped addresses are unmapped
    assert p.check("10.2.3.4", 8050) is None
    assert p.check("10.2.3.4", 8200) == "private_destination"
    assert p.check("10.1.3.4", 8050) == "egress_denied"  # deny before allow
    assert p.check("127.0.0.1", 25) == "egress_denied"
    assert p.check("8.8.8.8", 443) is None
    assert p.check("203.0.113.9", 443) == "private_destination"  # our own address
    for ip in ("100.64.1.1", "fe80::1", "fc00::1", "ff02::1", "0.0.0.0", "192.0.2.1"):
        assert p.check(ip, 443) == "private_destination", ip
    assert EgressPolicy(enabled=False).check("8.8.8.8", 443) == "egress_disabled"
    assert "egress policy" in p.explain("10.1.3.4", 80)
    for bad in ("", "10.0.0.0/33", "10.0.0.0/8 0", "10.0.0.0/8 9-3", "x 80"):
        with pytest.raises(UsageError):
            parse_rule(bad)


def test_fair_queue_gives_members_equal_bytes() -> None:
    q = FairQueue(quantum=100)
    for _ in range(30):
        q.push(Ticket(b"many", 100))
    q.push(Ticket(b"one", 100))
    served = []
    while q:
        t = q.pop()
        served.append(t.member)
        if t.member == b"one" and served.count(b"one") < 10:
            q.push(Ticket(b"one", 100))  # one tunnel: the next ticket after each grant
    first = served[:20]
    assert first.count(b"one") == 10 and first.count(b"many") == 10


def test_fair_queue_discard_and_large_tickets() -> None:
    q = FairQueue(quantum=10)
    a, b = Ticket(b"a", 35), Ticket(b"b", 5)
    q.push(a)
    q.push(b)
    assert q.pop() is b  # a needs 4 turns of credit; b fits at once
    c = Ticket(b"c", 1)
    q.push(c)
    q.discard(c)
    assert len(q) == 1 and q.pop() is a and not q
    with pytest.raises(UsageError):
        q.pop()


def test_demand_meter_counts_only_time_with_demand() -> None:
    m = DemandMeter(min_rate_bps=1000, window_ms=1000, now_ms=0)
    m.busy(+1, 0)
    m.delivered(200, 500)  # 200 B in a window with 1000 ms of demand: short
    m.busy(-1, 1000)
    m.delivered(0, 5000)  # idle windows: no demand, no shortfall
    m.busy(+1, 5000)
    m.delivered(5000, 5500)  # plenty
    m.busy(-1, 6000)
    assert m.close(6500) == 1000 and m.windows_short == 1
    n = DemandMeter(min_rate_bps=1000, window_ms=1000, now_ms=0)
    n.busy(+1, 0)
    n.busy(-1, 100)  # 100 ms of demand, 50 B: below 100 B expected
    n.delivered(50, 100)
    assert n.close(1000) == 100
