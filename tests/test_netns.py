"""Nodes on separate hosts (network namespaces this test creates and removes): the
default listen address 0.0.0.0 advertised as the host's address, offers dialable from
another host, loopback hidden from it, an added address re-published, a partition
healed. The full devnet round across hosts is `bench/netns_testnet.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]


def test_three_hosts_default_listen_offers_dialable_partition_heals() -> None:
    import netns_testnet

    why = netns_testnet.unavailable()
    if why:
        pytest.skip(f"network namespaces cannot be used here: {why}")
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                text=True).stdout.split())
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "netns_testnet.py"),
                           "--hosts", "3", "--no-round"], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["steps_failed"] == 0, (result["failed"], proc.stdout[-3000:])
    assert result["hosts"] == 3
    assert result["advertised_dialable"] is True and result["offer_addrs_dialed"] >= 4
    assert result["digests_equal"] is True
    for step in ("advertised addresses", "offer follows an added interface address",
                 "loopback not advertised to other hosts",
                 "partition heals (link down, events, link up)"):
        assert step in result["steps"]
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                               text=True).stdout.split())
    assert not {n for n in after - before if n.startswith("bmt")}  # all removed
