"""Tunnels with real processes: `bidmesh run` provider daemons serving bandwidth leases,
`bidmesh client tunnel` SOCKS5 proxies, curl, and local HTTP servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon_helpers import cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]

BANDWIDTH = {"provider": {"enabled": True, "offers": {"bandwidth": {"price": 10,
                                                                    "capacity": 10_000}}},
             "dataplane": {"workers": 1},
             "bandwidth": {"allow": ["127.0.0.1/32"], "max_tunnels_per_member": 4}}


def test_daemon_serves_tunnels_only_when_it_offers_bandwidth(tmp_path: Path) -> None:
    with cluster(tmp_path / "bw", 1, overrides=BANDWIDTH) as c:
        c.start_all()
        p = c.procs[0]

        def tunnel_status() -> bool:
            return "tunnel" in c.status(p)["services"]

        wait_for(tunnel_status, 20, "the tunnel service in the status")
        st = c.status(p)
        tun = st["services"]["tunnel"]
        assert tun["egress"] is True and tun["allow"] == ["127.0.0.1/32"]
        assert tun["max_tunnels_per_member"] == 4 and tun["open_tunnels"] == 0
        proto = "/bidmesh/proctest/tunnel/1"
        assert st["resources"]["protocol_limits"][proto] == {"per_peer": 64, "total": 512}
    with cluster(tmp_path / "plain", 1) as c:
        c.start_all()
        # Services start together: once the query service shows, a tunnel one would too.
        wait_for(lambda: "query" in c.status(c.procs[0])["services"], 20, "the services")
        assert "tunnel" not in c.status(c.procs[0])["services"]
