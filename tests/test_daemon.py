"""Real `bidmesh run` processes on loopback: convergence, crash recovery, partitions,
late joiners, graceful stop."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from daemon_helpers import NETWORK, cluster, wait_for

from node.ledger import Ledger
from node.status_file import read_status

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]


def test_converge_late_joiner_and_sigterm(tmp_path: Path) -> None:
    with cluster(tmp_path, 5) as c:
        first, late = c.procs[:4], c.procs[4]
        c.start_all(first)
        acked: dict[int, list[bytes]] = {}
        for p in first:
            acked[p.index] = c.publish(p, 60)
        digest = c.wait_converged(first)
        assert all(c.status(p)["events"] == 240 for p in first)
        # A node that joins late syncs the whole history.
        c.start(late)
        assert c.wait_converged() == digest
        acked[late.index] = c.publish(late, 10)
        # The read-only side (status.json, rewritten every 0.5 s here) shows the peers.
        final = c.wait_converged()

        def status_shows_it() -> bool:
            st = read_status(late.data_dir)
            return st["state"] == "running" and len(st["peers"]) == 4 and st["digest"] == final

        wait_for(status_shows_it, 60, "status.json to show peers and the digest")
        # The resource manager's limits and usage are in the status too.
        res = read_status(late.data_dir)["resources"]
        assert res["limits"]["max_connections"] == 64
        assert res["connections"]["inbound"] + res["connections"]["outbound"] >= 4
        # SIGTERM: each stops within its budget (node.stop_timeout_s; past it the stop
        # watchdog exits non-zero); everything acknowledged is on disk. No wall-clock
        # bound here: on a loaded host the signal's delivery and the exit take seconds.
        for p in c.procs:
            c.terminate(p, timeout=60)
            assert p.popen is not None and p.popen.returncode == 0
            assert read_status(p.data_dir)["state"] == "stopped"
        for p in c.procs:
            with Ledger(p.data_dir / "ledger.db", network=NETWORK, readonly=True) as led:
                assert led.count() == 250
                assert all(led.has(i) for ids in acked.values() for i in ids)


def test_sigkilled_node_catches_up_after_restart(tmp_path: Path) -> None:
    with cluster(tmp_path, 5) as c:
        c.start_all()
        for p in c.procs:
            c.publish(p, 20)
        c.wait_converged()
        victim = c.procs[2]
        peer_id = c.status(victim)["peer_id"]
        mine = c.publish(victim, 30)  # acknowledged, then killed without warning
        c.terminate(victim, signal.SIGKILL)
        for p in c.procs:
            if p is not victim:
                c.publish(p, 40)
        survivors = [p for p in c.procs if p is not victim]
        c.wait_converged(survivors)
        c.start(victim)
        st = c.status(victim)
        assert st["peer_id"] == peer_id  # same identity
        digest = c.wait_converged()
        assert c.status(victim)["events"] == 5 * 20 + 30 + 4 * 40
        with Ledger(c.procs[0].data_dir / "ledger.db", network=NETWORK, readonly=True) as led:
            assert all(led.has(i) for i in mine)
            assert led.digest().hex() == digest


def test_partitioned_halves_diverge_then_converge(tmp_path: Path) -> None:
    with cluster(tmp_path, 5) as c:
        c.start_all()
        c.publish(c.procs[0], 10)
        c.wait_converged()
        left, right = c.procs[:2], c.procs[2:]
        for side, other in ((left, right), (right, left)):
            for p in side:
                p.call({"op": "block", "peers": [q.peer_id for q in other], "seconds": 300})
        for p in left:
            c.publish(p, 30, "L")
        for p in right:
            c.publish(p, 20, "R")
        dl = c.wait_converged(left)
        dr = c.wait_converged(right)
        assert dl != dr
        assert {c.status(p)["events"] for p in left} == {10 + 60}
        assert {c.status(p)["events"] for p in right} == {10 + 60}
        for side, other in ((left, right), (right, left)):
            for p in side:
                p.call({"op": "unblock", "peers": [q.peer_id for q in other]})
        c.wait_converged()
        assert {c.status(p)["events"] for p in c.procs} == {10 + 60 + 60}


def test_restart_loads_the_market_snapshot(tmp_path: Path) -> None:
    """A node writes its derived market's snapshot soon after it has events; killed and
    started again, it loads the snapshot and folds only what arrived after it."""
    with cluster(tmp_path, 1) as c:
        p = c.procs[0]
        c.start_all()
        c.publish(p, 30)
        wait_for(lambda: c.status(p)["market"]["snapshot"]["saves"] >= 1, 120,
                 "a market snapshot")
        assert (p.data_dir / "market.snapshot").exists()
        assert not c.status(p)["market"]["snapshot"]["restored"]
        c.publish(p, 10)  # after the snapshot
        digest = c.status(p)["digest"]
        c.terminate(p, signal.SIGKILL)
        c.start(p)
        st = c.status(p)
        assert st["market"]["snapshot"]["restored"]
        # The startup heap is out of the cyclic GC's sight (daemon._freeze_startup_heap).
        assert st["gc"]["frozen"] > 10_000
        assert st["events"] == 40 and st["digest"] == digest
