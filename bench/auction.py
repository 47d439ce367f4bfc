#!/usr/bin/env python3
"""Market derivation speed: clearing a 100,000-bid auction, folding ratings into
reputation incrementally, and one reputation lookup "as of" a time.

    .venv/bin/python bench/auction.py [--quick] [--bids N] [--ratings N]

Events are built unsigned (this measures derivation, not signature checks; the ledger
verified signatures on append). Timed: `Market.apply` of the request, every bid and
the award (whose verification recomputes the winner over all bids and the considered
digest), `Reputation.add` per rating, and `Reputation.score` lookups at random
as-of times. Baselines from the same run: `min()` over the bare (price, ts, id)
tuples, and a bare dict-of-sums update per rating. Clearing and lookups report the
best of 3 runs (the machine is shared). Last line: JSON figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.auction import Market, verify_award
from node.events import Award, Bid, Event, Members, Request, considered_digest
from node.reputation import Reputation

REPEAT = 3


def _id(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


def _ev(author: bytes, seq: int, ts: int, body: object) -> Event:
    assert hasattr(body, "KIND")
    kind = body.KIND  # type: ignore[attr-defined]
    return Event(author, seq, None, ts, kind, body, b"", b"",  # type: ignore[arg-type]
                 _id(author, seq, ts, kind))


def bench_clear(n: int, rule: str, rnd: random.Random) -> tuple[float, float, float]:
    recipient = _id("recipient")
    req_body = Request(service="bandwidth", chain=(), start_ms=10_000_000, duration_ms=3_600_000,
                       max_rate_bps=None, min_rate_bps=None, members=Members(),
                       reserve=1_000_000, currency="EUR", close_ms=1_000_000,
                       reveal_ms=1_000_000, rule=rule, sealed=False, group=False)
    req = _ev(recipient, 1, 1, req_body)
    bids = []
    for i in range(n):
        author = _id("provider", i)
        bids.append(_ev(author, 1, 2 + i * 9, Bid(request=req.id, price=rnd.randrange(1, 10**6))))
    bids.sort(key=lambda e: (e.ts_ms, e.author, e.seq))
    best = min(bids, key=lambda e: (e.body.price, e.ts_ms, e.id))  # type: ignore[attr-defined]
    ids = [e.id for e in bids]
    price = best.body.price  # type: ignore[attr-defined]
    award = _ev(recipient, 2, 1_000_001,
                Award(request=req.id, winner=best.id, price=price, considered=(),
                      considered_digest=considered_digest(ids), considered_count=len(ids)))
    best = (float("inf"), 0.0)
    for _ in range(REPEAT):  # best of REPEAT: the machine is shared
        t0 = time.perf_counter()
        m = Market()
        m.apply(req)
        for e in bids:
            m.apply(e)
        t1 = time.perf_counter()
        m.apply(award)
        t2 = time.perf_counter()
        best = min(best, (t2 - t0, t2 - t1))
        check = verify_award(m, award.id)
        if rule == "lowest":
            assert check.valid and award.id in m.leases, check
    raw = [(e.body.price, e.ts_ms, e.id) for e in bids]  # type: ignore[attr-defined]
    raw_s = float("inf")
    for _ in range(REPEAT):
        t3 = time.perf_counter()
        min(raw)
        raw_s = min(raw_s, time.perf_counter() - t3)
    return best[0], best[1], raw_s


def bench_ratings(n: int, keys: int, rnd: random.Random) -> tuple[float, float, float, Reputation]:
    subjects = [_id("subject", i) for i in range(keys)]
    rows = []
    ts = 0
    for _ in range(n):
        ts += rnd.randrange(0, 20_000)
        rows.append((subjects[rnd.randrange(keys)], "provider" if rnd.random() < 0.7
                     else "recipient", ts, rnd.random() < 0.8, rnd.randrange(1, 6),
                     rnd.randrange(1, 6)))
    rep = Reputation()
    add = rep.add
    t0 = time.perf_counter()
    for s, role, t, sat, score, wt in rows:
        add(s, role, t, sat, score, wt)
    t1 = time.perf_counter()
    sums: dict[tuple[bytes, str], list[int]] = {}
    t2 = time.perf_counter()
    for s, role, _t, sat, score, wt in rows:
        acc = sums.get((s, role))
        if acc is None:
            acc = sums[(s, role)] = [0, 0, 0]
        acc[0] += wt
        acc[1] += wt * (4 * sat + score - 1)
        acc[2] += 1
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2, float(ts), rep


def bench_lookup(rep: Reputation, span: float, lookups: int, keys: int,
                 rnd: random.Random) -> float:
    qs = [(_id("subject", rnd.randrange(keys)), rnd.randrange(int(span) + 1))
          for _ in range(lookups)]
    score = rep.score
    best = float("inf")
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        for k, t in qs:
            score(k, "provider", t)
        best = min(best, time.perf_counter() - t0)
    return best / lookups


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer ratings (< 60 s)")
    ap.add_argument("--bids", type=int, default=100_000)
    ap.add_argument("--ratings", type=int, default=None)
    args = ap.parse_args()
    n_ratings = args.ratings or (200_000 if args.quick else 1_000_000)
    rnd = random.Random(42)

    clear_s, verify_s, raw_min_s = bench_clear(args.bids, "lowest", rnd)
    print(f"clear {args.bids} bids (lowest): {clear_s:.3f} s "
          f"(award verification {verify_s * 1000:.1f} ms; bare min() {raw_min_s * 1000:.1f} ms)")
    bv_s, _, _ = bench_clear(args.bids, "best_value", rnd)
    print(f"clear {args.bids} bids (best_value, reputation lookups per bid): {bv_s:.3f} s")

    keys = max(1000, n_ratings // 100)
    add_s, raw_add_s, span, rep = bench_ratings(n_ratings, keys, rnd)
    per_s = n_ratings / add_s
    print(f"reputation: {n_ratings} ratings over {keys} keys in {add_s:.2f} s = "
          f"{per_s:,.0f}/s (bare dict sums {n_ratings / raw_add_s:,.0f}/s)")
    lookup_s = bench_lookup(rep, span, 100_000, keys, rnd)
    print(f"reputation lookup as of a random time: {lookup_s * 1e6:.2f} µs")
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss_mib:.0f} MiB")
    print(json.dumps({
        "bids": args.bids,
        "clear_100k_s": round(clear_s, 4),
        "clear_100k_best_value_s": round(bv_s, 4),
        "award_verify_s": round(verify_s, 4),
        "clear_vs_raw_min_ratio": round(clear_s / raw_min_s, 1),
        "ratings": n_ratings,
        "ratings_per_s": round(per_s),
        "ratings_vs_raw_sums_ratio": round(add_s / raw_add_s, 2),
        "reputation_lookup_us": round(lookup_s * 1e6, 2),
        "peak_rss_mib": round(rss_mib),
        "quick": args.quick,
    }))


if __name__ == "__main__":
    main()
