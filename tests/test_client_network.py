"""The light client against a real 3-node network: `bidmesh run` processes on loopback
serving the query protocol and the HTTP API (node/query.py, node/http.py as daemon
services). One node tampers with what it returns and is caught."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_helpers import NETWORK, ROOT, Cluster, Proc, wait_for

from node import config
from node.client import LightClient, now_ms
from node.errors import UntrustedAnswer
from node.events import Bid, Rating

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]

SHIM = '''
"""Test-only daemon service: `tamper_test` makes a node's query service alter every bid
it returns (configured from DATA_DIR/test-services.json)."""
import json

from node import codec, query
from node.events import decode_wire


def _conf(node):
    return json.loads((node.config.node.data_dir / "test-services.json").read_text())


class Tamper:
    name = "tamper-test"

    async def run(self, node):
        if not _conf(node).get("tamper"):
            return
        svc = node.services["query"]
        honest = svc.answer

        def answer(peer, req):
            resp = honest(peer, req)
            if not isinstance(resp, query.EventsPage):
                return resp
            out = []
            for r in resp.records:
                ev = decode_wire(r, svc.network, verify=False)
                if ev.kind == "bid":
                    env = codec.unpack(ev.signed, 1 << 16)
                    env[6]["price"] = 1
                    r = codec.pack([codec.pack(env), ev.sig])
                out.append(r)
            return query.EventsPage(tuple(out), resp.cursor, resp.more)

        svc.answer = answer


def tamper_test_service(node):
    return Tamper()
'''

def make_shim(base: Path) -> Path:
    """A directory with a dist-info registering the test service under
    `bidmesh.services`."""
    shim = base / "shim"
    dist = shim / "bidmesh_test_services-0.dist-info"
    dist.mkdir(parents=True)
    (shim / "bidmesh_test_services.py").write_text(textwrap.dedent(SHIM))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bidmesh-test-services\n"
                                   "Version: 0\n")
    (dist / "entry_points.txt").write_text(
        "[bidmesh.services]\ntamper_test = bidmesh_test_services:tamper_test_service\n")
    return shim


class ServiceCluster(Cluster):
    def __init__(self, base: Path, n: int, tamper: set[int]) -> None:
        super().__init__(base, n)
        for p in self.procs:
            # Port 0: the daemon binds a free port itself and reports it in its status
            # (a port picked here could be taken before the daemon binds it).
            cfg = config.load(p.cfg_path)
            cfg = replace(cfg, http=replace(cfg.http, enabled=True, port=0,
                                            growth_interval_s=0.5))
            p.cfg_path.write_text(config.to_toml(cfg))
        self.shim = make_shim(base)
        for p in self.procs:
            (p.data_dir / "test-services.json").write_text(json.dumps(
                {"tamper": p.index in tamper}))

    def wait_ready(self, p: Proc, timeout: float = 120.0) -> None:
        super().wait_ready(p, timeout)

        def http_port() -> bool:
            port = self.status(p)["services"].get("http", {}).get("port")
            p.extra["http_port"] = port
            return bool(port)
        wait_for(http_port, timeout, f"node {p.index}'s HTTP port")

    def start(self, p: Proc, wait: bool = True) -> None:
        from daemon_helpers import run_command

        with open(p.dir / "stderr.log", "ab") as log:
            env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{self.shim}")
            p.popen = subprocess.Popen(run_command(p.cfg_path), stdout=subprocess.DEVNULL,
                                       stderr=log, cwd=p.dir, env=env)
        if wait:
            self.wait_ready(p)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[ServiceCluster]:
    c = ServiceCluster(tmp_path, 3, tamper={2})
    try:
        c.start_all()
        yield c
    finally:
        c.stop_all()


def http_get(p: Proc, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.extra['http_port']}{path}",
                                timeout=10) as r:
        body = r.read()
        return body.decode() if path == "/metrics" else json.loads(body)


async def publish(p: Proc, body: Any) -> str:
    kind_body = [body.KIND, body.to_map()]
    resp = await trio.to_thread.run_sync(lambda: p.call({"op": "publish",
                                                         "events": [kind_body]}))
    return bytes(resp["ids"][0]).hex()


async def converged(c: Cluster) -> str:
    return await trio.to_thread.run_sync(c.wait_converged)


async def bid_window_ms(net: ServiceCluster, floor_ms: int) -> int:
    """A bidding window for a request the test bids on from the nodes (their clocks
    sign the bids): four times what a convergence round and two control calls take on
    this machine now, at least `floor_ms` (a loaded CI host is many times slower)."""
    t0 = trio.current_time()
    await converged(net)
    for p in net.procs[:2]:
        await trio.to_thread.run_sync(net.status, p)
    return max(floor_ms, int((trio.current_time() - t0) * 4000))


async def wait_past(ms: int) -> None:
    with trio.fail_after(30):
        while now_ms() <= ms:
            await trio.sleep(0.05)


async def test_full_round_against_three_daemons(net: ServiceCluster, tmp_path: Path) -> None:
    honest, bad = net.procs[:2], net.procs[2]
    addrs = [p.addr for p in net.procs]
    p1 = net.procs[1]
    p1_key = p1.ident.public
    # Round 1 (another recipient): node 1 wins, is paid and rated: it has a reputation.
    async with LightClient.open(tmp_path / "bea", addrs[:2], network=NETWORK) as bea:
        r1 = await bea.request("bandwidth", duration_ms=600_000, reserve=500,
                               close_in_ms=await bid_window_ms(net, 1500))
        await converged(net)
        await publish(p1, Bid(request=r1.id, price=300))
        await converged(net)
        await wait_past(r1.body.reveal_ms)  # type: ignore[attr-defined]
        a1, _ = await bea.award(r1.id)
        await bea.pay(a1.id, reference="ch_1")
        await bea.rate(a1.id, satisfied=True, score=5)
    await converged(net)

    # Round 2 on the client's own key, talking to all three nodes.
    async with LightClient.open(tmp_path / "alice", addrs, network=NETWORK) as c:
        req = await c.request("bandwidth", duration_ms=600_000, reserve=1000,
                              close_in_ms=await bid_window_ms(net, 4000),
                              max_rate_bps=10_000_000, devices=[b"\x05" * 32])
        await converged(net)
        await publish(net.procs[0], Bid(request=req.id, price=450))
        await publish(p1, Bid(request=req.id, price=420))
        seen: list[Any] = []
        with trio.fail_after(30):
            async with aclosing(c.watch_bids(req.id, interval=0.3)) as updates:
                async for info in updates:
                    seen.append(info)
                    if len(info.bids) == 2:
                        break
        bids = {b.provider: b for b in seen[-1].bids}
        assert {b.price for b in bids.values()} == {420, 450}
        assert bids[p1_key].reputation.ratings == 1  # reputation shown next to the bid
        assert bids[p1_key].reputation.satisfied == 1
        # The tampering node was caught on every answer with bids; the others agreed.
        assert c.faults and {f.node for f in c.faults} == {bad.addr}
        assert {f.reason for f in c.faults} == {"forged_event"}
        await wait_past(req.body.reveal_ms)  # type: ignore[attr-defined]
        award_ev, award = await c.award(req.id)
        assert award.price == 420
        await converged(net)
        leases = await c.leases()
        assert [x.lease.provider for x in leases] == [p1_key]
        await c.pay(award_ev.id, method="card", reference="ch_2")
        rating = await c.rate(award_ev.id, satisfied=True, score=4, text="as promised")
        # The provider rates the recipient back; the client sees its own reputation.
        await publish(p1, Rating(lease=award_ev.id, subject=c.key, role="recipient",
                                 satisfied=True, score=5))
        await converged(net)
        mine = await c.reputation(c.key)
        assert mine.recipient.ratings == 1 and mine.recipient.satisfied == 1
        theirs = await c.reputation(p1_key)
        assert theirs.provider.ratings == 2
        assert rating.author == c.key and rating.seq == 4
        assert not [d for d in c.disagreements if bad.addr not in d.digests]

    # A client whose only node tampers refuses the answer.
    async with LightClient.open(tmp_path / "alice", [bad.addr], network=NETWORK) as c:
        with pytest.raises(UntrustedAnswer):
            await c.bids(req.id)

    # Operators: the HTTP API and metrics of a real daemon.
    health = await trio.to_thread.run_sync(http_get, honest[0], "/api/health")
    assert health["ok"] and health["peers"] >= 2
    auction = await trio.to_thread.run_sync(http_get, honest[0], f"/api/auctions/{req.id.hex()}")
    assert auction["status"] == "awarded" and len(auction["bid_list"]) == 2
    metrics = await trio.to_thread.run_sync(http_get, honest[0], "/metrics")
    assert 'bidmesh_query_submitted_total{outcome="accepted"}' in metrics
    assert "bidmesh_sync_rounds_total" in metrics
    status = await trio.to_thread.run_sync(lambda: net.status(honest[0]))
    assert status["services"]["query"]["requests"]["Submit"] >= 1

    # The command line: client data commands and the operator's ledger tools.
    def cli(*args: str) -> Any:
        exe = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "bidmesh"
        cmd = [str(exe)] if exe.exists() else ["python", "-m", "node.cli"]
        r = subprocess.run([*cmd, *args], capture_output=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()

    client = ["client", "--dir", str(tmp_path / "alice"), "--node", honest[0].addr,
              "--node", honest[1].addr, "--network", NETWORK, "--timeout", "60"]
    leases_out = await trio.to_thread.run_sync(lambda: json.loads(cli(*client, "leases",
                                                                      "--json")))
    assert leases_out[0]["id"] == award_ev.id.hex() and leases_out[0]["paid"] == 420
    bids_table = await trio.to_thread.run_sync(lambda: cli(*client, "bids", req.id.hex()))
    assert "420" in bids_table and "REPUTATION" in bids_table
    ledger = ["ledger", "--data-dir", str(honest[0].data_dir), "--network", NETWORK]
    peers = await trio.to_thread.run_sync(lambda: json.loads(cli(*ledger, "peers", "--json")))
    assert len(peers["peers"]) >= 2
    sync = await trio.to_thread.run_sync(lambda: json.loads(cli(*ledger, "sync", "--now",
                                                                "--json")))
    assert sync["sync_now"]["synced_with"] >= 1 and sync["sync_rounds"] >= 1
    assert json.loads(await trio.to_thread.run_sync(lambda: cli(*ledger, "forks",
                                                                "--json"))) == []
    watched = await trio.to_thread.run_sync(lambda: cli(*ledger, "watch", "--from-start",
                                                        "--count", "3", "--json"))
    assert [json.loads(line)["cursor"] for line in watched.splitlines()] == [1, 2, 3]
