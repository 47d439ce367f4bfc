#!/usr/bin/env python3
"""Sync cost by protocol: /sync/1 (HEADS paging) against /sync/2 (set reconciliation).

    .venv/bin/python bench/recon.py [--quick] [--authors N ...] [--diffs D] [--work DIR]

For each author count: two ledgers holding the same authors (one event each, signed
for real), the second with `--diffs` more events (one each from existing authors)
plus a tenth of that from new authors; then one session of the first against the
second, in one process over the real codecs (`sync.handle`), per protocol:
`round_trips`, `bytes` (requests + responses), `s` (both sides' work, wall time)
and `index_build_s` (a node's one-time cost of its reconciliation index, paid at
its first /sync/2 session after a start; excluded from `s`). Baseline for
`*_vs_raw_ratio`: the bytes of the differing records. bench/scale.py measures the
same on its 1,000,000-event market ledger.

`--quick`: 10,000 authors. Default: 10,000 and 100,000. Last line: JSON figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # testkit: seeds and fast signing, not shipped

from testkit import keypair, sign_fast  # noqa: E402

from node import sync  # noqa: E402
from node.events import Event, Offer, ServiceOffer, domain_tag  # noqa: E402
from node.ledger import Ledger  # noqa: E402
from node.sync_recon import ReconSession  # noqa: E402
from node.sync_session import SyncSession  # noqa: E402

NETWORK = "reconbench"
BODY = Offer(services=(ServiceOffer("bandwidth", 5, 100),), currency="EUR", addrs=())


def _seed(i: int) -> bytes:
    return hashlib.sha256(b"bidmesh-recon/" + str(i).encode()).digest()


def _event(i: int, seq: int, prev: bytes | None, tag: bytes) -> Event:
    pk, sk = keypair(_seed(i))
    return sign_fast(pk, sk, tag, seq, prev, 1_700_000_000_000 + seq, BODY)


def build(path: Path, authors: int, network: str) -> None:
    led = Ledger(path, network=network)
    tag = domain_tag(network)
    batch: list[Event] = []
    for i in range(authors):
        batch.append(_event(i, 1, None, tag))
        if len(batch) >= 5000:
            led.append_signed(batch)
            batch = []
    led.append_signed(batch)
    led.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    led.close()


def diverge(led: Ledger, authors: int, diffs: int, network: str) -> int:
    """Add `diffs` events from existing authors and diffs/10 new authors; raw bytes."""
    tag = domain_tag(network)
    heads = led.heads()
    new: list[Event] = []
    step = max(1, authors // diffs)
    for k in range(diffs):
        i = (k * step) % authors
        pk, _ = keypair(_seed(i))
        h = heads[pk]
        new.append(_event(i, h.seq + 1, h.id, tag))
    for k in range(diffs // 10):
        new.append(_event(10_000_000 + k, 1, None, tag))
    led.append_signed(new)
    return sum(len(e.wire) for e in new)


def session(local: Ledger, remote: Ledger, version: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    s: SyncSession = (ReconSession(local) if version == 2 else SyncSession(local))
    nbytes = trips = 0
    while (req := s.next_request()) is not None:
        data = req.encode()
        resp = sync.handle(remote, data, version)
        nbytes += len(data) + len(resp)
        trips += 1
        s.on_response(sync.decode_response(resp, version))
    return {"round_trips": trips, "bytes": nbytes, "s": round(time.perf_counter() - t0, 3),
            "converged": local.digest() == remote.digest(), "accepted": s.stats.accepted,
            "failed": s.failed}


def run(authors: int, diffs: int, work: Path) -> dict[str, Any]:
    base = work / f"base-{authors}.db"
    if not base.exists():
        t0 = time.perf_counter()
        build(base, authors, NETWORK)
        print(f"built {authors} authors in {time.perf_counter() - t0:.1f} s")
    out: dict[str, Any] = {"authors": authors, "diffs": diffs}
    for version in (1, 2):
        a_path, b_path = work / f"a{version}.db", work / f"b{version}.db"
        shutil.copy(base, a_path)
        shutil.copy(base, b_path)
        a, b = Ledger(a_path, network=NETWORK), Ledger(b_path, network=NETWORK)
        raw = diverge(b, authors, diffs, NETWORK)
        if version == 2:
            t0 = time.perf_counter()
            a.recon_index()
            b.recon_index()
            out["index_build_s"] = round((time.perf_counter() - t0) / 2, 3)
        r = session(a, b, version)
        out.update({f"sync{version}_{k}": v for k, v in r.items()})
        out[f"sync{version}_bytes_vs_raw_ratio"] = round(r["bytes"] / raw, 2)
        out["raw_bytes"] = raw
        a.close()
        b.close()
    out["sync2_vs_sync1_bytes_ratio"] = round(out["sync2_bytes"] / out["sync1_bytes"], 4)
    out["sync2_vs_sync1_round_trips_ratio"] = round(
        out["sync2_round_trips"] / out["sync1_round_trips"], 4)
    out["sync2_vs_sync1_s_ratio"] = round(out["sync2_s"] / max(out["sync1_s"], 1e-6), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 authors only")
    ap.add_argument("--authors", type=int, nargs="*", default=None)
    ap.add_argument("--diffs", type=int, default=100)
    ap.add_argument("--work", default=None, help="keep generated ledgers here")
    args = ap.parse_args()
    sizes = args.authors or ([10_000] if args.quick else [10_000, 100_000])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bidmesh-recon-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in sizes:
            r = run(n, args.diffs, work)
            results.append(r)
            print(f"{n} authors, {args.diffs}+{args.diffs // 10} differing events: "
                  f"/sync/1 {r['sync1_round_trips']} trips {r['sync1_bytes']} B "
                  f"{r['sync1_s']} s; /sync/2 {r['sync2_round_trips']} trips "
                  f"{r['sync2_bytes']} B {r['sync2_s']} s (index {r['index_build_s']} s)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {"quick": args.quick, "load1": round(os.getloadavg()[0], 1)}
    for r in results:
        n = r["authors"]
        out.update({f"{k}_{n}": v for k, v in r.items() if k != "authors"})
    last = results[-1]
    out.update({"sync_bytes": last["sync2_bytes"], "sync_round_trips": last["sync2_round_trips"],
                "sync_s": last["sync2_s"],
                "sync2_vs_sync1_bytes_ratio": last["sync2_vs_sync1_bytes_ratio"],
                "sync2_bytes_within_64k": last["sync2_bytes"] <= 64 * 1024})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
