"""The libp2p host boundary against a real `bidmesh run` process (issue 12, items 1-2):
malformed frames on py-libp2p's own protocols and a stream of fresh identities no
longer end the daemon; the offender is counted and cut off."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_helpers import Cluster, Proc, cluster, wait_for

from node.p2p import P2PHost, open_host, parse_peer_id

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]

OVERRIDES = {"gossip": {"fault_threshold": 5, "block_s": 120.0},
             "limits": {"peerstore_max": 16}}


def status(c: Cluster, p: Proc) -> dict[str, Any]:
    return c.status(p)


async def identified(host: P2PHost, target: Proc) -> bool:
    """Whether `host` ran identify against `target` (it learned its protocols)."""
    store = host.libp2p.get_peerstore()
    peer = parse_peer_id(target.peer_id)
    with trio.move_on_after(10):
        while True:
            try:
                if "/ipfs/id/1.0.0" in store.get_protocols(peer):
                    return True
            except KeyError:
                pass
            await trio.sleep(0.05)
    return False


async def test_malformed_meshsub_and_many_identities_leave_the_daemon_serving(
        tmp_path: Path) -> None:
    with cluster(tmp_path, 1, overrides=OVERRIDES) as c:
        (node,) = c.procs
        c.start_all()
        # 1. Malformed meshsub frames (protobuf DecodeError in py-libp2p's handler:
        #    this ended the daemon) until the sender is cut off.
        async with open_host(os.urandom(32)) as attacker:
            await attacker.connect(node.addr)
            target = parse_peer_id(node.peer_id)
            for _ in range(5):
                try:
                    stream = await attacker.new_stream(target, "/meshsub/1.1.0", timeout=5)
                    await stream.write(b"\x0a" + b"\xff" * 10)
                    with trio.move_on_after(2):
                        while await stream.read(1024):
                            pass
                except Exception:  # reset, refused or blocked: any end is fine here
                    pass
            st = await trio.to_thread.run_sync(status, c, node)
            assert node.alive()
            assert st["resources"]["stream_faults"].get("malformed", 0) >= 5
            assert str(attacker.peer_id) in st["blocked"]
        # 2. Fresh identities one after another, past the peerstore bound (16 here).
        for _ in range(24):
            async with open_host(os.urandom(32)) as visitor:
                await visitor.connect(node.addr)
                assert await identified(visitor, node)
        # 3. Still alive and serving: identify works for a newcomer, publishing works.
        async with open_host(os.urandom(32)) as honest:
            await honest.connect(node.addr)
            assert await identified(honest, node)
        assert node.alive()
        await trio.to_thread.run_sync(c.publish, node, 3)

        def bounded() -> bool:
            ps = c.status(node)["resources"]["peerstore"]
            return bool(ps["size"] <= 16 and ps["pruned"] > 0 and ps["own_entry_restored"] == 0)

        await trio.to_thread.run_sync(wait_for, bounded, 10, "the peerstore to be pruned")
