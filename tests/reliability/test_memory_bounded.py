"""A short, bounded version of bench/soak.py: two node processes gossip and sync
3 000 events in 300 messages; afterwards the trio task count and open file
descriptors are back where they were, and RSS grew by less than 10 MB (storage and
the derived market included)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from daemon_helpers import Cluster, Proc, cluster, wait_for

from .faultnet import wait_converged

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]


def measure(c: Cluster, p: Proc) -> tuple[float, int, int]:
    assert p.popen is not None
    proc = psutil.Process(p.popen.pid)
    return proc.memory_info().rss / 2**20, proc.num_fds(), int(c.status(p)["tasks"])


def test_gossip_load_leaves_tasks_fds_and_memory_flat(tmp_path: Path) -> None:
    with cluster(tmp_path, 2, overrides={"dataplane": {"enabled": False}}) as c:
        c.start_all()
        wait_for(lambda: all(len(c.status(p)["peers"]) == 1 for p in c.procs), 20, "connected")
        for i in range(20):  # warm-up: imports, caches, first pages
            c.publish(c.procs[i % 2], 10, "warm")
        wait_converged(c)
        before = [measure(c, p) for p in c.procs]
        for i in range(300):
            c.publish(c.procs[i % 2], 10, "load")
            if i % 50 == 49:
                c.procs[0].call({"op": "sync"})
        wait_converged(c)
        after = [measure(c, p) for p in c.procs]
        for (rss0, fds0, tasks0), (rss1, fds1, tasks1) in zip(before, after, strict=True):
            assert tasks1 <= tasks0 + 2, (tasks0, tasks1)
            assert fds1 <= fds0 + 2, (fds0, fds1)
            assert rss1 - rss0 < 10, (rss0, rss1)
        print(f"before {before} after {after}")
