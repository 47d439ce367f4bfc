"""`bidmesh ledger auctions | auction | leases | reputation | ignored`, as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from market_helpers import CLOSE, START, World, award, key, payment, rating, request

from node import paths
from node.events import Bid

ROOT = Path(__file__).resolve().parent.parent


def bidmesh(*args: str | Path, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if check is not None:
        assert proc.returncode == check, (proc.stdout, proc.stderr)
    return proc


@pytest.fixture(scope="module")
def market_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("market")
    w = World(d, paths.ledger_path(d).name)
    req = w.pub("alice", request(), 10)
    cheap = w.bid("p1", req, 100, 20)
    dear = w.bid("p2", req, 200, 21)
    late = w.bid("p3", req, 50, CLOSE + 1)
    aw = w.pub("alice", award(req.id, cheap.id, 100, [cheap.id]), CLOSE + 2)
    w.pub("alice", payment(aw.id, 100), CLOSE + 3)
    w.pub("alice", rating(aw.id, "p1", "provider", True, 4), START + 1)
    w.pub("p1", rating(aw.id, "alice", "recipient", True, 5), START + 2)
    other = w.pub("bob", request(close_ms=CLOSE + 1000, reveal_ms=CLOSE + 1000), START + 3)
    w.pub("p2", Bid(request=other.id, price=10), START + 4)
    w.ledger.close()
    return d, {"req": req.id, "cheap": cheap.id, "dear": dear.id, "late": late.id,
               "award": aw.id, "other": other.id}


def js(d: Path, *args: str) -> Any:
    return json.loads(bidmesh("ledger", "--data-dir", d, *args, "--json").stdout)


def test_help_lists_market_commands() -> None:
    out = bidmesh("ledger", "--help").stdout
    for cmd in ("auctions", "auction", "leases", "reputation", "ignored"):
        assert cmd in out


def test_auctions(market_dir: tuple[Path, dict[str, bytes]]) -> None:
    d, ids = market_dir
    data = js(d, "auctions")
    by_id = {a["id"]: a for a in data}
    assert by_id[ids["req"].hex()]["status"] == "awarded"
    assert by_id[ids["req"].hex()]["winner"] == ids["cheap"].hex()
    assert by_id[ids["other"].hex()]["status"] == "open"  # judged at ledger time
    human = bidmesh("ledger", "--data-dir", d, "auctions").stdout
    assert "AUCTION" in human and "awarded" in human and ids["req"].hex()[:16] in human


def test_auction_detail_shows_reputation_and_evidence(
        market_dir: tuple[Path, dict[str, bytes]]) -> None:
    d, ids = market_dir
    a = js(d, "auction", ids["req"].hex()[:10])
    assert a["id"] == ids["req"].hex()
    bids = {b["id"]: b for b in a["bid_list"]}
    assert bids[ids["cheap"].hex()]["winner"]
    assert bids[ids["cheap"].hex()]["reputation"]["ratings"] == 0  # as of the close
    assert [e["kind"] for e in a["evidence"]] == ["omitted_bid"]
    assert a["evidence"][0]["bid"] == ids["dear"].hex()
    assert a["awards"][0]["valid"] is True
    human = bidmesh("ledger", "--data-dir", d, "auction", ids["req"].hex()).stdout
    assert "REP" in human and "omitted_bid" in human and "awarded" in human
    missing = bidmesh("ledger", "--data-dir", d, "auction", "ffff", check=2)
    assert "no auction" in missing.stderr and missing.stderr.count("\n") == 1


def test_leases(market_dir: tuple[Path, dict[str, bytes]]) -> None:
    d, ids = market_dir
    [lease] = js(d, "leases")
    assert lease["id"] == ids["award"].hex() and lease["paid"] == 100
    assert lease["provider"] == key("p1").hex() and len(lease["ratings"]) == 2
    assert "LEASE" in bidmesh("ledger", "--data-dir", d, "leases").stdout


def test_reputation(market_dir: tuple[Path, dict[str, bytes]]) -> None:
    d, _ = market_dir
    rows = {r["key"]: r for r in js(d, "reputation")}
    assert rows[key("p1").hex()]["provider"]["ratings"] == 1
    assert rows[key("alice").hex()]["recipient"]["satisfied"] == 1
    [one] = js(d, "reputation", key("p1").hex()[:12])
    assert one["provider"]["mean_stars"] == 4.0
    [before] = js(d, "reputation", key("p1").hex(), "--as-of", str(START))
    assert before["provider"]["ratings"] == 0
    human = bidmesh("ledger", "--data-dir", d, "reputation").stdout
    assert "AS PROVIDER" in human


def test_ignored(market_dir: tuple[Path, dict[str, bytes]]) -> None:
    d, ids = market_dir
    data = js(d, "ignored")
    assert {"id": ids["late"].hex(), "kind": "bid", "reason": "late"} in data
    assert js(d, "ignored", "--kind", "award") == []
    assert "late" in bidmesh("ledger", "--data-dir", d, "ignored").stdout
