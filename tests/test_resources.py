"""node/resources.py: the pure resource manager, on a fake clock."""

from __future__ import annotations

import pytest

from node.errors import LimitExceeded, RateLimited, UsageError
from node.resources import Direction, Limits, ResourceManager, subnet_of

IN, OUT = Direction.INBOUND, Direction.OUTBOUND


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manager(**kw: object) -> tuple[ResourceManager, Clock]:
    clock = Clock()
    return ResourceManager(Limits(**kw), clock), clock  # type: ignore[arg-type]


def scope_of(rm: ResourceManager, *args: object, stream: bool = False) -> str:
    with pytest.raises(LimitExceeded) as info:
        if stream:
            rm.open_stream(*args)  # type: ignore[arg-type]
        else:
            rm.open_connection(*args)  # type: ignore[arg-type]
    assert isinstance(info.value, RateLimited)
    assert info.value.reason == f"limit_{info.value.scope}"
    return info.value.scope


def test_subnets() -> None:
    assert subnet_of("203.0.113.7") == "203.0.113.0/24"
    assert subnet_of("2001:db8:1:2:3::1", 48) == "2001:db8:1::/48"
    assert subnet_of("2001:db8:1:2ff:3::1", 56) == "2001:db8:1:200::/56"


@pytest.mark.parametrize("kw", [
    {"max_connections": 0}, {"outbound_reserved": 40, "trusted_reserved": 24},
    {"trusted_reserved_streams": 64}, {"ipv6_prefix": 8}, {"conn_idle_s": 0},
    {"ip_exempt": ("not-a-net",)}, {"streams_per_peer_protocol": 0}, {"idle_pressure": 1.5},
    {"conn_grace_s": 0},
])
def test_limits_are_range_checked(kw: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        Limits(**kw)  # type: ignore[arg-type]


def test_inbound_flood_leaves_outbound_and_trusted_slots() -> None:
    rm, _ = manager(max_connections=10, outbound_reserved=3, trusted_reserved=2,
                    conns_per_ip=100, conns_per_subnet=100)
    rm.set_bootstrap(["boot"])
    strangers = [rm.open_connection(f"s{i}", f"10.0.{i}.1", IN) for i in range(5)]
    assert scope_of(rm, "s99", "10.9.9.9", IN) == "conns_inbound_strangers"
    # Trusted peers (bootstrap, known-good) get the reserved inbound slots.
    rm.open_connection("boot", "10.1.1.1", IN)
    rm.mark_good("good")
    rm.open_connection("good", "10.1.1.2", IN)
    rm.mark_good("good2")
    assert scope_of(rm, "good2", "10.1.1.3", IN) == "conns_inbound"
    # Our own dials still have their reserve.
    for i in range(3):
        rm.open_connection(f"dial{i}", None, OUT)
    assert scope_of(rm, "dial9", None, OUT) == "conns_total"
    # Releasing frees exactly the slot, idempotently.
    rm.close_connection(strangers[0])
    rm.close_connection(strangers[0])
    assert rm.status()["connections"]["inbound_strangers"] == 4
    rm.open_connection("s100", "10.9.9.8", IN)
    assert scope_of(rm, "s101", "10.9.9.7", IN) == "conns_total"
    st = rm.status()
    assert st["connections"] == {"inbound": 7, "outbound": 3, "inbound_strangers": 5,
                                 "peers": 10}
    assert st["refused"]["conns_total"] == 2 and st["refused_total"] == 4


def test_per_ip_subnet_and_peer_limits() -> None:
    rm, _ = manager(conns_per_ip=2, conns_per_subnet=3, conns_per_peer=1)
    rm.open_connection("a", "198.51.100.1", IN)
    rm.open_connection("b", "198.51.100.1", IN)
    assert scope_of(rm, "c", "198.51.100.1", IN) == "conns_per_ip"
    rm.open_connection("c", "198.51.100.2", IN)
    assert scope_of(rm, "d", "198.51.100.3", IN) == "conns_per_subnet"
    rm.open_connection("d", "198.51.101.3", IN)  # another /24
    assert scope_of(rm, "a", "192.0.2.1", IN) == "conns_per_peer"
    # Loopback is exempt from IP limits by default; outbound dials are never counted per IP.
    for i in range(5):
        rm.open_connection(f"lo{i}", "127.0.0.1", IN)
        rm.open_connection(f"out{i}", "198.51.100.1", OUT)
    # IPv6 subnets by prefix.
    rm6, _ = manager(conns_per_ip=8, conns_per_subnet=2, ipv6_prefix=48)
    rm6.open_connection("a", "2001:db8:1:1::1", IN)
    rm6.open_connection("b", "2001:db8:1:2::1", IN)
    assert scope_of(rm6, "c", "2001:db8:1:ffff::9", IN) == "conns_per_subnet"
    rm6.open_connection("c", "2001:db8:2::1", IN)


def test_bootstrap_peers_are_not_counted_per_ip() -> None:
    rm, _ = manager(conns_per_ip=1, ip_exempt=())
    rm.open_connection("stranger", "127.0.0.1", IN)
    assert scope_of(rm, "boot", "127.0.0.1", IN) == "conns_per_ip"
    rm.mark_good("boot")  # known-good is not enough: easy to earn
    assert scope_of(rm, "boot", "127.0.0.1", IN) == "conns_per_ip"
    rm.set_bootstrap(["boot"])
    lease = rm.open_connection("boot", "127.0.0.1", IN)
    rm.close_connection(lease)
    assert rm.status()["connections"]["inbound"] == 1


def test_stream_fairness_between_peers() -> None:
    rm, _ = manager(streams_per_protocol=16, streams_per_peer_protocol=4,
                    trusted_reserved_streams=4, streams_per_peer=6)
    p = "/bidmesh/sync/1"
    hog = [rm.open_stream("hog", p) for _ in range(4)]
    assert scope_of(rm, "hog", p, stream=True) == "streams_per_peer_protocol"
    # The hog's other protocols count against its per-peer total.
    rm.open_stream("hog", "/q/1")
    rm.open_stream("hog", "/q/1")
    assert scope_of(rm, "hog", "/r/1", stream=True) == "streams_per_peer"
    # Other strangers fill up to the trusted reserve, a trusted peer gets the rest.
    others = [rm.open_stream(f"s{i // 4}", p) for i in range(8)]
    assert scope_of(rm, "s9", p, stream=True) == "streams_per_protocol_strangers"
    assert rm.try_open_stream("s9", p) is None
    rm.mark_good("good")
    good = [rm.open_stream("good", p) for _ in range(4)]
    assert scope_of(rm, "boot", p, stream=True) == "streams_per_protocol"
    assert good[0].reserved and not others[0].reserved
    for lease in hog:
        rm.close_stream(lease)
    # 12 of 16 in use: strangers may use only 12 in all, whoever holds them.
    assert rm.try_open_stream("s9", p) is None
    rm.close_stream(good[0])
    assert rm.try_open_stream("s9", p) is not None
    assert rm.status()["streams_per_protocol"] == {p: 12, "/q/1": 2}


def test_requests_in_flight_per_peer() -> None:
    rm, _ = manager(requests_per_peer=2)
    a = rm.start_request("a", "/x")
    rm.start_request("a", "/y")
    assert rm.try_start_request("a", "/x") is None
    assert rm.try_start_request("b", "/x") is not None
    rm.end_request(a)
    rm.end_request(a)
    assert rm.try_start_request("a", "/x") is not None
    assert rm.status()["requests_in_flight"] == 3
    assert rm.refused["requests_per_peer"] == 1


def test_idle_expiry_on_a_fake_clock() -> None:
    rm, clock = manager(conn_idle_s=60, stream_idle_s=10, long_lived=("/meshsub/",),
                        idle_pressure=0.0)
    rm.set_bootstrap(["boot"])
    idle_in = rm.open_connection("idle", "10.0.0.1", IN)
    busy_in = rm.open_connection("busy", "10.0.0.2", IN)
    rm.open_connection("boot", "10.0.0.3", IN)
    rm.open_connection("dialed", None, OUT)
    quiet = rm.open_stream("idle", "/bidmesh/sync/1")
    talky = rm.open_stream("busy", "/bidmesh/sync/1")
    rm.open_stream("busy", "/meshsub/1.2.0")
    clock.now += 9
    rm.touch_stream(talky)
    assert rm.idle() == type(rm.idle())((), ())
    clock.now += 1
    report = rm.idle()
    assert report.streams == (quiet,) and report.conns == ()
    clock.now += 30
    rm.touch("busy")  # useful traffic keeps a connection
    clock.now += 20.5
    report = rm.idle()
    # 60.5 s since open: the silent stranger goes; bootstrap and our dial stay.
    assert report.conns == (idle_in,)
    assert busy_in not in report.conns
    # An unreleased stream is reported again after another full timeout.
    assert set(report.streams) == {quiet, talky}
    assert rm.idle() == type(report)((), ())  # reported once per timeout
    assert rm.status()["closed_idle"] == 4


def test_idle_connections_are_closed_only_under_pressure() -> None:
    # 10 - 2 - 2 = 6 stranger slots; pressure at half of them.
    rm, clock = manager(max_connections=10, outbound_reserved=2, trusted_reserved=2,
                        conn_idle_s=60, idle_pressure=0.5)
    quiet = [rm.open_connection(f"s{i}", f"10.0.{i}.1", IN) for i in range(2)]
    clock.now += 100
    assert rm.idle().conns == ()  # 2 of 6: a quiet network keeps its links
    rm.open_connection("s2", "10.0.2.1", IN)
    assert set(rm.idle().conns) == set(quiet)  # 3 of 6: the idle ones go


def test_idle_strangers_are_evicted_for_newcomers() -> None:
    # 10 - 2 - 2 = 6 stranger slots, all held.
    rm, clock = manager(max_connections=10, outbound_reserved=2, trusted_reserved=2,
                        conns_per_ip=100, conns_per_subnet=100, conn_grace_s=5)
    rm.set_bootstrap(["boot"])
    held = [rm.open_connection(f"s{i}", f"10.0.{i}.1", IN) for i in range(6)]
    # Within the grace period nobody is evicted: the newcomer is refused.
    clock.now += 4
    assert scope_of(rm, "new0", "10.9.9.1", IN) == "conns_inbound_strangers"
    assert rm.take_evicted() == []
    # Strangers that talk are kept; the one unused longest goes.
    clock.now += 2
    rm.touch("s0")
    clock.now += 1
    rm.touch("s1")
    new = rm.open_connection("new1", "10.9.9.2", IN)
    evicted = rm.take_evicted()
    assert [c.peer for c in evicted] == ["s2"] and evicted[0].released
    assert rm.take_evicted() == []
    rm.close_connection(evicted[0])  # the shell's disconnect: idempotent
    st = rm.status()
    assert st["evicted"] == 1 and st["connections"]["inbound_strangers"] == 6
    assert "conns_inbound_strangers" in st["refused"] and st["refused_total"] == 1
    # Trusted peers are never evicted; our dials and trusted newcomers can evict strangers.
    rm.open_connection("boot", "10.1.1.1", IN)
    rm.mark_good("good")
    rm.open_connection("good", "10.1.1.2", IN)
    for i in range(2):
        rm.open_connection(f"dial{i}", None, OUT)
    rm.mark_good("good2")
    rm.open_connection("good2", "10.1.1.3", IN)  # inbound full: a stranger makes room
    assert [c.peer for c in rm.take_evicted()] == ["s3"]
    clock.now += 10
    for c in (new, *held):
        if not c.released:
            rm.touch(c.peer)  # every stranger busy: nothing to evict
    assert scope_of(rm, "dial9", None, OUT) == "conns_total"
    assert rm.take_evicted() == []
    # Address limits refuse before anyone is evicted.
    rm2, clock2 = manager(max_connections=4, outbound_reserved=1, trusted_reserved=1,
                          conns_per_ip=1)
    rm2.open_connection("a", "10.0.0.1", IN)
    rm2.open_connection("b", "10.0.0.2", IN)
    clock2.now += 60
    assert scope_of(rm2, "c", "10.0.0.1", IN) == "conns_per_ip"
    assert rm2.take_evicted() == [] and rm2.status()["evicted"] == 0


def test_good_peers_are_a_bounded_lru() -> None:
    rm, _ = manager(good_peers_max=3)
    for p in "abcd":
        rm.mark_good(p)
    assert not rm.is_trusted("a") and rm.is_trusted("d")
    rm.mark_good("b")
    rm.mark_good("e")
    assert rm.is_trusted("b") and not rm.is_trusted("c")


def test_status_renders_as_metrics() -> None:
    from node.http import _Metrics, _resource_metrics

    rm, _ = manager(conns_per_ip=1)
    rm.open_connection("a", "10.0.0.1", IN)
    with pytest.raises(LimitExceeded):
        rm.open_connection("b", "10.0.0.1", IN)
    rm.open_connection("c", None, OUT)
    rm.open_stream("a", "/x/1")
    w = _Metrics()
    _resource_metrics(w, rm.status() | {"stream_faults": {"malformed": 2},
                                        "peerstore": {"size": 5}})
    samples = dict(line.rsplit(" ", 1) for line in w.text().splitlines()
                   if not line.startswith("#"))
    assert samples['bidmesh_limit{name="conns_per_ip"}'] == "1"
    assert samples['bidmesh_limit{name="max_connections"}'] == "64"
    assert samples["bidmesh_limit_conn_idle_seconds"] == "120.0"
    assert samples['bidmesh_connections{direction="inbound"}'] == "1"
    assert samples['bidmesh_connections{direction="outbound"}'] == "1"
    assert samples["bidmesh_p2p_streams"] == "1"
    assert samples['bidmesh_limit_refused_total{scope="conns_per_ip"}'] == "1"
    assert samples['bidmesh_stream_faults_total{reason="malformed"}'] == "2"
    assert samples["bidmesh_peerstore_peers"] == "5"


def test_self_limited_protocol_has_its_own_caps_and_no_idle_expiry() -> None:
    rm, clock = manager(streams_per_protocol=4, streams_per_peer_protocol=2,
                        trusted_reserved_streams=1, streams_per_peer=3, stream_idle_s=10)
    tun = "/bidmesh/x/tunnel/1"
    rm.set_protocol_limits(tun, per_peer=5, total=7)
    held = [rm.open_stream("m", tun) for _ in range(5)]  # beyond every generic stream cap
    assert scope_of(rm, "m", tun, stream=True) == "streams_per_peer_protocol"
    # Tunnels do not use up the peer's generic streams (its sync keeps working) ...
    rm.open_stream("m", "/bidmesh/sync/1")
    rm.open_stream("m", "/bidmesh/sync/1")
    assert scope_of(rm, "m", "/bidmesh/sync/1", stream=True) == "streams_per_peer_protocol"
    rm.open_stream("other", tun)
    rm.open_stream("other", tun)
    assert scope_of(rm, "third", tun, stream=True) == "streams_per_protocol"
    # ... and are never reported idle (the tunnel service has its own idle timeout).
    clock.now += 100
    assert all(s.protocol != tun for s in rm.idle().streams)
    rm.close_stream(held[0])
    rm.close_stream(held[0])  # idempotent
    assert rm.try_open_stream("third", tun) is not None
    assert rm.status()["protocol_limits"] == {tun: {"per_peer": 5, "total": 7}}
    with pytest.raises(UsageError):
        rm.set_protocol_limits(tun, per_peer=0, total=1)
