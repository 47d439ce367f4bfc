"""`bidmesh devnet` end to end: real node processes, the whole round, exit status 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]

STEPS = {
    "network up", "warm-up leases", "bids with reputation", "award verified",
    "sealed Vickrey auction", "streams byte-exact", "payments", "group purchase",
    "provider rated the recipient", "lease ended", "every node has the same state digest",
    "unpaid lease rated", "provider policy on an unpaid recipient",
    "tunnel fetch byte-exact", "tunnel usage signed",
}


def test_devnet_full_round(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "node.cli", "devnet", "--json", "--dir", str(tmp_path / "net")],
        capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert set(s["steps"]) >= STEPS
    assert len(set(s["digests"].values())) == 1 and len(s["digests"]) == 4
    assert all(v["exact"] for v in s["streams"].values()) and len(s["streams"]) == 3
    lease = s["lease"]
    assert lease["provider"] == "borealis"  # best value beat atlas's lower price
    assert {c["contractor"] for c in lease["subcontracts"]} <= {"cirrus", "delta"}
    assert lease["subcontracts"] and sum(u["segments"] for u in lease["usage"]) > 0
    by_id = {a["service"] + ("-sealed" if a["sealed"] else "") + ("-group" if a["group"]
             else ""): a for a in s["auctions"]}
    sealed = by_id["bandwidth-sealed"]
    prices = sorted(b["price"] for b in sealed["bids"] if b["price"] is not None)
    assert sealed["price"] == prices[1]  # Vickrey: the winner is paid the second price
    after = {r["who"]: r for r in s["reputation_after"]}
    before = {r["who"]: r for r in s["reputation_before"]}
    assert after["borealis"]["score"] > before["borealis"]["score"]
    assert after["delta"]["ratings"] >= 1  # the hirer rated its subcontractor
    assert all(r["satisfied"] >= 1 for r in s["recipients"])
    # mallory did not pay in the warm-up: borealis (min_recipient_score 50) skipped her
    # next request, atlas (risk_premium_pct 50) bid half again its list price.
    pol = {r["provider"]: r for r in s["recipient_policy"]["providers"]}
    assert s["recipient_policy"]["record"]["unpaid"] == 1
    assert pol["borealis"]["bid"] is None and pol["borealis"]["reason"] == "recipient_score"
    assert pol["borealis"]["skipped_counted"]["recipient_score"] >= 1
    assert pol["atlas"]["reason"] == "premium"
    assert pol["atlas"]["bid"] == -(-pol["atlas"]["list_price"] * 150 // 100)
    assert pol["delta"]["bid"] == pol["delta"]["list_price"]
    # dave's phone fetched a file through the bandwidth lease's tunnel; usage shows it.
    tun = s["tunnel"]
    assert tun["exact"] and tun["provider"] == sealed["winner"]
    assert tun["usage"]["bytes_out"] >= tun["bytes"] and tun["usage"]["active_ms"] > 0
