"""Advertised addresses: expansion of 0.0.0.0 / ::, announce, loopback filtering; on
real hosts (identify, status, offers). Across hosts: bench/netns_testnet.py."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import trio
from daemon_helpers import NETWORK, cluster, wait_for
from test_lifecycle import bidmesh

from node import addrs, config
from node.errors import ConfigError
from node.events import Event
from node.keys import Identity
from node.ledger import Ledger
from node.p2p import addrs as p2p_addrs
from node.p2p import open_host

IPS = tuple(ipaddress.ip_address(a) for a in
            ("127.0.0.1", "10.1.2.3", "::1", "fd00::5", "fe80::1"))


def test_unspecified_expanded_per_family() -> None:
    got = addrs.expand(["/ip4/0.0.0.0/tcp/4001/p2p/QmX", "/ip6/::/tcp/4002",
                        "/ip4/10.9.9.9/tcp/7"], IPS)
    assert got == ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.1.2.3/tcp/4001",
                   "/ip6/::1/tcp/4002", "/ip6/fd00::5/tcp/4002",  # no link-local
                   "/ip4/10.9.9.9/tcp/7"]


def test_announce_replaces_and_append_adds() -> None:
    listen = ["/ip4/0.0.0.0/tcp/4001"]
    assert addrs.advertised(listen, [], [], IPS) == ["/ip4/10.1.2.3/tcp/4001"]
    assert addrs.advertised(listen, ["/dns4/n.example/tcp/4001"], [], IPS) == [
        "/dns4/n.example/tcp/4001"]
    assert addrs.advertised(listen, [], ["/ip4/203.0.113.7/tcp/4001",
                                         "/ip4/10.1.2.3/tcp/4001"], IPS) == [
        "/ip4/10.1.2.3/tcp/4001", "/ip4/203.0.113.7/tcp/4001"]


def test_loopback_only_when_nothing_else() -> None:
    adv = ["/ip4/127.0.0.1/tcp/1", "/ip6/::1/tcp/1", "/ip4/10.1.2.3/tcp/1"]
    assert addrs.for_everyone(adv) == ["/ip4/10.1.2.3/tcp/1"]
    assert addrs.for_everyone(adv[:2]) == adv[:2]  # a loopback-only node keeps them
    assert addrs.advertised(["/ip4/127.0.0.1/tcp/1"], [], [], IPS) == ["/ip4/127.0.0.1/tcp/1"]
    loopback_only = tuple(ip for ip in IPS if ip.is_loopback)
    assert addrs.advertised(["/ip4/0.0.0.0/tcp/1"], [], [], loopback_only) == [
        "/ip4/127.0.0.1/tcp/1"]


def test_policy_is_the_hosts_addrs_factory() -> None:
    from multiaddr import Multiaddr

    policy = p2p_addrs.AddrPolicy(announce_append=["/ip4/198.51.100.4/tcp/4001"])
    got = policy([Multiaddr("/ip4/127.0.0.1/tcp/5000")])
    assert [str(a) for a in got] == ["/ip4/198.51.100.4/tcp/4001"]


@pytest.mark.parametrize(("value", "needle"), [
    (["/ip4/0.0.0.0/tcp/4001"], "unspecified"),
    (["/ip4/1.2.3.4/udp/4001/quic-v1"], "announce TCP"),
    (["1.2.3.4:4001"], "not a multiaddr"),
])
def test_announce_validated(value: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=r"p2p\.announce") as e:
        config.from_dict({"p2p": {"announce": value}})
    assert needle in str(e.value)


async def test_wildcard_listener_advertises_interfaces_over_identify() -> None:
    async with open_host(Identity.from_seed(b"A" * 32).seed, ["/ip4/0.0.0.0/tcp/0"]) as a, \
            open_host(Identity.from_seed(b"B" * 32).seed) as b:
        port = a.listen_addrs[0].split("/tcp/")[1].split("/")[0]
        assert a.listen_addrs[0].startswith("/ip4/0.0.0.0/")
        v4 = [f"/ip4/{ip}/tcp/{port}" for ip in addrs.interface_ips() if ip.version == 4]
        want = {f"{m}/p2p/{a.peer_id}" for m in addrs.for_everyone(v4)}
        assert set(a.addrs) == want and not any("0.0.0.0" in x for x in a.addrs)
        await b.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{a.peer_id}")
        store = b.libp2p.get_peerstore()
        with trio.fail_after(10):  # identify (and the signed record) bring the list
            while not want <= {addrs.strip_p2p(str(m)) + f"/p2p/{a.peer_id}"
                               for m in store.addrs(a.peer_id)}:
                await trio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
def test_offer_status_and_peers_show_advertised(tmp_path: Path) -> None:
    public = "/ip4/198.51.100.4/tcp/4001"
    over = {"provider": {"enabled": True, "offers": {"zstd": {"price": 5, "capacity": 10}}},
            "p2p": {"announce_append": [public]}}
    with cluster(tmp_path, 1, overrides=over) as c:
        p = c.procs[0]
        c.start(p)
        st = c.status(p)
        me = f"/p2p/{p.peer_id}"
        # Loopback is left out when there is anything else to advertise.
        assert st["advertised_addrs"] == [public + me]

        def offers() -> list[Event]:
            with Ledger(p.data_dir / "ledger.db", network=NETWORK, readonly=True) as led:
                return [ev for _, ev in led.events(kind="offer", limit=10)]
        wait_for(lambda: bool(offers()), 20, "the provider's offer")
        assert [list(ev.body.to_map()["addrs"]) for ev in offers()] == [[public + me]]
        proc = bidmesh("ledger", "--data-dir", p.data_dir, "peers", "--json")
        shown = json.loads(proc.stdout)
        assert shown["advertised_addrs"] == st["advertised_addrs"]
        assert shown["offer_addrs"] == [public + me]
        assert shown["listen_addrs"] == [f"/ip4/127.0.0.1/tcp/{p.port}{me}"]
