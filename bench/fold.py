#!/usr/bin/env python3
"""Market lookup cost on a large ledger: incremental derivation vs a full re-fold.

    .venv/bin/python bench/fold.py [--quick] [--auctions N]

Builds a real SQLite ledger of signed events (a random market history: auctions of
every rule, awards, payments, ratings, subcontracts, offers; ~60k events by default,
~20k with --quick), opens a `LiveMarket` on it (the node's view) and times
`market()` right after one new event lands:

* `normal`: an ordinary new event (a bid dated now);
* `backdated`: an event dated in the middle of the history (a new bidder at the
  reserve on an old auction) — before: one full re-fold each;
* `voiding`: the same with the lowest price: the award left that bid out, so it is
  void now, its lease and the lease's ratings go, and every best_value award those
  ratings decided is checked again (the cost of what the event really touches);
* `future`: normal events while an event dated 2^53-1 is stored — before: every
  lookup re-folded the whole ledger, forever.

Baseline measured in the same run: `derive(ledger.iter_canonical())`, the full
canonical re-fold the old view did in the last two cases. Medians and maxima over
`--rounds` lookups. Last line: JSON figures (`*_ratio` = lookup / full re-fold).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fold_helpers import NETWORK, Actor, history  # noqa: E402

from node.auction import derive  # noqa: E402
from node.events import Bid, Event  # noqa: E402
from node.ledger import Ledger  # noqa: E402
from node.marketview import LiveMarket  # noqa: E402


def _time(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--auctions", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    n_auctions = args.auctions or (2400 if args.quick else 6400)
    rounds = args.rounds or (20 if args.quick else 40)
    rnd = random.Random(1)

    t0 = time.perf_counter()
    evs: list[Event] = history(rnd, n_auctions=n_auctions, n_prov=40, n_rec=60, span=400)
    gen_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        led = Ledger(Path(tmp) / "bench.db", network=NETWORK)
        by_author: dict[bytes, list[Event]] = {}
        for e in evs:
            by_author.setdefault(e.author, []).append(e)
        wires = [e.wire for chain in by_author.values() for e in chain]
        for i in range(0, len(wires), 5000):
            led.append_many(wires[i:i + 5000])
        n = led.count()
        last_ts = evs[-1].ts_ms
        clock = [last_ts]
        t0 = time.perf_counter()
        live = LiveMarket(led, skew_ms=300_000, clock=lambda: clock[0])
        live.market()
        build_s = time.perf_counter() - t0
        refold = min(_time(lambda: derive(led.iter_canonical())) for _ in range(2))
        print(f"{n} events, {len(live.view.engine.events)} folded, "
              f"{live.view.engine.partitions()} partitions (generated in {gen_s:.1f} s)")
        print(f"initial build {build_s:.2f} s; full canonical re-fold {refold * 1000:.0f} ms")

        requests = [e for e in evs if e.kind == "request"]
        fresh = 0

        def bidder() -> Actor:
            nonlocal fresh
            fresh += 1
            return Actor(f"bench-bidder-{fresh}")

        def lookup_after(ev: Event) -> float:
            assert led.append(ev.wire).accepted, "bench event not stored"
            return _time(live.market)

        def normal() -> float:
            clock[0] += 7
            req = requests[-1]
            return lookup_after(bidder().sign(Bid(request=req.id, price=50), clock[0]))

        def backdated(price: int) -> float:
            req = rnd.choice(requests[len(requests) // 4: len(requests) // 2])
            return lookup_after(bidder().sign(Bid(request=req.id, price=price), req.ts_ms + 1))

        out: dict[str, object] = {"events": n, "partitions": live.view.engine.partitions(),
                                  "build_s": round(build_s, 3),
                                  "refold_ms": round(refold * 1000, 2)}
        samples = {"normal": [normal() for _ in range(rounds)],
                   "backdated": [backdated(100) for _ in range(rounds)],
                   "voiding": [backdated(1) for _ in range(rounds)]}
        before = live.view.engine.applied
        far = bidder().sign(Bid(request=requests[-1].id, price=1), (1 << 53) - 1)
        assert led.append(far.wire).accepted
        samples["future"] = [normal() for _ in range(rounds)]
        applied_future = live.view.engine.applied - before
        for name, xs in samples.items():
            med, mx = statistics.median(xs), max(xs)
            print(f"lookup after a {name:9} event: median {med * 1000:7.3f} ms, "
                  f"max {mx * 1000:7.3f} ms  ({med / refold:.5f} of a full re-fold)")
            out[f"{name}_median_ms"] = round(med * 1000, 4)
            out[f"{name}_max_ms"] = round(mx * 1000, 4)
            out[f"{name}_vs_refold_ratio"] = round(med / refold, 6)
        out["future_events_applied"] = applied_future
        out["future_event_held"] = live.view.held() == 1
        m = live.market()
        out["equal_to_derive"] = (m.now_ms == derive(
            e for e in led.iter_canonical() if e.ts_ms <= clock[0] + 300_000).now_ms)
        led.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
