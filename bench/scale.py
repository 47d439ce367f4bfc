#!/usr/bin/env python3
"""Scale: a node serving a ledger of 1,000,000 mixed events from 100,000 authors.

    .venv/bin/python bench/scale.py [--quick] [--events N] [--authors N] [--cache DIR]
                                    [--no-sync] [--fresh] [--trace N]

1. **Ledger.** Auctions as a market runs them, in time order over weeks of ledger
   time: a recipient's request, bids from 4 providers, the award (lowest price),
   the payment, both parties' ratings after the lease ends, and now and then a
   provider's offer that supersedes its previous one. Recipients and providers are
   100,000 authors (a fifth of them providers). Signed for real
   (`tests/testkit.py` `sign_fast`), stored with `Ledger.append_signed`; kept in `--cache`
   (default /tmp/bidmesh-scale) so later runs skip the generation (`--fresh` redoes it).
2. **Serving.** A fresh process opens the ledger and builds the derived market as the
   daemon does on a first start (`LiveMarket`, then `market()`): `build_s` is the time
   to that point (`build_cpu_s` its CPU time, steadier on a shared machine), `rss_mb`
   the process RSS once serving (after a GC), `peak_rss_mb` its high water mark
   (`cold_partitions` of `partitions`: auctions in the market's cold store); it
   then writes the market snapshot (`snapshot_save_s`, `snapshot_mb`; the daemon does
   that in a forked child). A second process restarts as the daemon does, from the
   snapshot: `restart_s` / `restart_cpu_s`, `restored_rss_mb`;
   `restart_vs_build_ratio` compares their CPU times. `open_auctions_us` and
   `leases_of_us` (one party): the indexed lookups the provider agent and queries
   make every tick, with ratios against scanning every auction / lease;
   `rating_pass_us`: the provider agent's rating pass of the busiest provider of those
   (`rating_pass_leases` leases) on a tick after its first, against that first one,
   which walks them all (`rating_walk_us`); `cold_store_mb`: the cold store's file.
   Baseline for `rss_vs_empty_ratio`: the same process over an empty ledger
   (`empty_rss_mb`). `reputation_lookup_us`: `market.reputation.score` of a random
   author as of a random time of the ledger, mean over 20,000.
3. **Sync**: two copies of the ledger, one with 100 more events (one each from 100
   existing authors); a session on the other driven against `sync.handle` of the
   first, in one process (no network, so `sync_s` is the protocol's own work), on
   `/sync/2` as nodes run it (`node.sync_recon`): `sync_round_trips`, `sync_bytes`
   (requests + responses), `sync_s`, `sync_bytes_vs_raw_ratio` against the 100
   records' bytes, `recon_index_build_s` (a node's one-time index build after a
   start, not in `sync_s`); and the same on `/sync/1` (HEADS paging, for older
   nodes): `sync1_*`, `sync_bytes_vs_sync1_ratio`.

4. `--trace N`: one more serving process (first build) under `tracemalloc`, printing
   the N source lines holding the most Python heap once it serves (`trace_mib`: the
   total; its RSS is not comparable, tracing costs memory and time).

`--quick`: 100,000 events from 10,000 authors. The machine is shared: see `load1`.
Several runs may share `--cache` (the ledger is only read; each run's snapshot, empty
ledger and sync copies are its own). Last line: JSON figures.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # testkit: seeds and fast signing, not shipped

from testkit import keypair, sign_fast  # noqa: E402

from node import sync  # noqa: E402
from node.events import (  # noqa: E402
    Award,
    Bid,
    Body,
    Event,
    Members,
    Offer,
    Payment,
    Rating,
    Request,
    ServiceOffer,
    considered_digest,
    domain_tag,
)
from node.ledger import Ledger, Status  # noqa: E402
from node.sync_recon import ReconSession  # noqa: E402
from node.sync_session import SyncSession  # noqa: E402

NETWORK = "scalebench"
GEN_VERSION = 1  # bump when the generated ledger changes
DAY = 86_400_000
AUCTION_EVERY_MS = 20_000
BIDDERS = 4


def _seed(i: int) -> bytes:
    return hashlib.sha256(b"bidmesh-scale/" + str(i).encode()).digest()


# A planned event: (ts_ms, author index, kind, arguments); ids of earlier planned
# events are referred to by their plan index and resolved while signing.
_Plan = tuple[int, int, str, tuple[Any, ...]]


def plan(n_events: int, n_authors: int, end_ms: int, rnd: random.Random) -> list[_Plan]:
    n_prov = max(BIDDERS + 1, n_authors // 5)
    recipients = list(range(n_prov, n_authors))
    rnd.shuffle(recipients)
    auctions = int(n_events / 9.5) + 1
    t0 = end_ms - auctions * AUCTION_EVERY_MS - 3_600_000
    out: list[_Plan] = []
    for k in range(auctions):
        t = t0 + k * AUCTION_EVERY_MS + rnd.randrange(AUCTION_EVERY_MS)
        r = recipients[k % len(recipients)]
        close, start, dur = t + 120_000, t + 180_000, 600_000
        req = len(out)
        out.append((t, r, "request", (close, start, dur)))
        bids = []
        for p in rnd.sample(range(n_prov), BIDDERS):
            bids.append((rnd.randrange(100, 10_000), t + rnd.randrange(1000, 119_000), p))
        bid_ix = []
        for price, ts, p in bids:
            bid_ix.append(len(out))
            out.append((ts, p, "bid", (req, price)))
        order = sorted(range(BIDDERS), key=lambda i: (bids[i][0], bids[i][1]))
        win = order[0]
        price = bids[win][0]
        at = close + rnd.randrange(1000, 30_000)
        award = len(out)
        out.append((at, r, "award", (req, bid_ix[win], price, tuple(bid_ix))))
        out.append((at + rnd.randrange(1000, 60_000), r, "payment", (award, price, k)))
        end = start + dur
        prov = bids[win][2]
        out.append((end + rnd.randrange(1000, 600_000), r, "rating",
                    (award, prov, "provider", rnd.random() < 0.9, rnd.randrange(1, 6))))
        out.append((end + rnd.randrange(1000, 600_000), prov, "rating",
                    (award, r, "recipient", rnd.random() < 0.95, rnd.randrange(1, 6))))
        if rnd.random() < 0.5:
            out.append((t + rnd.randrange(AUCTION_EVERY_MS), rnd.randrange(n_prov), "offer",
                        (rnd.randrange(1, 100), k)))
    order = sorted(range(len(out)), key=lambda i: out[i][0])[:n_events]
    keep = set(order)
    # Truncating drops the latest events only; references point to earlier ones.
    remap = {old: new for new, old in enumerate(order)}
    res: list[_Plan] = []
    for i in order:
        ts, a, kind, args = out[i]
        if kind in ("bid", "award", "payment", "rating"):
            if args[0] not in keep:
                continue
            args = (remap[args[0]], *args[1:])
        if kind == "award":
            args = (args[0], remap[args[1]], args[2], tuple(remap[b] for b in args[3]))
        res.append((ts, a, kind, args))
    return res


def _body(kind: str, args: tuple[Any, ...], ids: list[bytes], pks: list[bytes]) -> Body:
    if kind == "request":
        close, start, dur = args
        return Request(service="bandwidth", chain=(), start_ms=start, duration_ms=dur,
                       max_rate_bps=100_000_000, min_rate_bps=None, members=Members(),
                       reserve=10_000, currency="EUR", close_ms=close, reveal_ms=close,
                       rule="lowest", sealed=False, group=False)
    if kind == "bid":
        return Bid(request=ids[args[0]], price=args[1])
    if kind == "award":
        req, win, price, considered = args
        cids = tuple(ids[b] for b in considered)
        return Award(request=ids[req], winner=ids[win], price=price, considered=cids,
                     considered_digest=considered_digest(list(cids)),
                     considered_count=len(cids))
    if kind == "payment":
        award, price, k = args
        return Payment(lease=ids[award], amount=price, currency="EUR", method="card",
                       reference=f"ch_{k}")
    if kind == "rating":
        award, subject, role, sat, score = args
        return Rating(lease=ids[award], subject=pks[subject], role=role, satisfied=sat,
                      score=score)
    price, k = args
    return Offer(services=(ServiceOffer(name="bandwidth", price=price, capacity=10_240),),
                 currency="EUR", addrs=(f"/ip4/10.{k % 250}.0.1/tcp/4001",))


def generate(path: Path, n_events: int, n_authors: int, end_ms: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    rnd = random.Random(7)
    plans = plan(n_events, n_authors, end_ms, rnd)
    t_plan = time.perf_counter() - t0
    keys = [keypair(_seed(i)) for i in range(n_authors)]
    pks = [pk for pk, _ in keys]
    tag = domain_tag(NETWORK)
    heads: dict[int, tuple[int, bytes]] = {}
    ids: list[bytes] = []
    tmp = path.with_suffix(".tmp")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    led = Ledger(tmp, network=NETWORK)
    batch: list[Event] = []
    t_sign = 0.0
    for ts, a, kind, args in plans:
        t1 = time.perf_counter()
        seq, prev = heads.get(a, (0, None))  # type: ignore[arg-type]
        pk, sk = keys[a]
        ev = sign_fast(pk, sk, tag, seq + 1, prev, ts, _body(kind, args, ids, pks))
        t_sign += time.perf_counter() - t1
        heads[a] = (seq + 1, ev.id)
        ids.append(ev.id)
        batch.append(ev)
        if len(batch) >= 20_000:
            _store(led, batch)
            batch = []
    _store(led, batch)
    kinds = led.count_by_kind()
    led.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    led.close()
    tmp.rename(path)
    return {"gen_s": round(time.perf_counter() - t0, 1), "plan_s": round(t_plan, 1),
            "sign_s": round(t_sign, 1), "kinds": kinds, "authors_used": len(heads)}


def _store(led: Ledger, batch: list[Event]) -> None:
    for r in led.append_signed(batch):
        if r.status is not Status.ACCEPTED:
            raise SystemExit(f"generated event not accepted: {r}")


def _mem() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            got[k] = int(v.split()[0]) / 1024
    return got["VmRSS"], got["VmHWM"]


def trace(path: str, top: int) -> None:
    """Child process: the first build under tracemalloc; the lines holding the most."""
    import tracemalloc

    from node.marketview import LiveMarket

    tracemalloc.start()
    led = Ledger(path, network=NETWORK)
    live = LiveMarket(led)
    live.market()
    gc.collect()
    snap = tracemalloc.take_snapshot()
    stats = snap.statistics("lineno")
    total = sum(st.size for st in stats)
    lines = []
    for st in stats[:top]:
        fr = st.traceback[0]
        where = fr.filename.replace(str(ROOT) + "/", "")
        lines.append(f"{st.size / 2**20:8.2f} MiB {st.count:9d}  {where}:{fr.lineno}")
    print(json.dumps({"trace_mib": round(total / 2**20, 1), "trace_top": lines}))


def serve(path: str, snapshot: str | None) -> None:
    """Child process: open the ledger and build the market as the daemon does (and
    write its snapshot), or, with `snapshot` existing, restart from it."""
    from node.marketview import LiveMarket, save_snapshot

    snap = Path(snapshot) if snapshot else None
    restoring = snap is not None and snap.exists()
    t0, c0 = time.perf_counter(), time.process_time()
    led = Ledger(path, network=NETWORK)
    live = LiveMarket(led, snapshot=snap if restoring else None)
    m = live.market()
    restart_s, restart_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    if restoring and not live.restored:
        raise SystemExit("the snapshot was not used")
    gc.collect()
    rss, hwm = _mem()
    out: dict[str, Any] = {"restart_s": restart_s, "restart_cpu_s": restart_cpu_s,
                           "rss_mb": rss, "peak_rss_mb": hwm,
                           "auctions": len(m.auctions), "leases": len(m.leases),
                           "ignored": len(m.ignored), "restored": live.restored,
                           "cold_partitions": live.view.engine.cold(),
                           "partitions": live.view.engine.partitions()}
    if snap is not None and not restoring:
        t1, c1 = time.perf_counter(), time.process_time()
        save_snapshot(live, snap)
        out["snapshot_save_s"] = time.perf_counter() - t1
        out["snapshot_save_cpu_s"] = time.process_time() - c1
        out["snapshot_mb"] = snap.stat().st_size / 2**20
    authors = sorted(led.heads())
    if authors:
        rnd = random.Random(3)
        lo = led.db.execute("SELECT MIN(ts_ms) FROM events").fetchone()[0]
        qs = [(rnd.choice(authors), rnd.choice(("provider", "recipient")),
               rnd.randrange(lo, m.now_ms + 1)) for _ in range(20_000)]
        score = m.reputation.score
        best = float("inf")
        for _ in range(3):
            t1 = time.perf_counter()
            for k, role, t in qs:
                score(k, role, t)
            best = min(best, time.perf_counter() - t1)
        out["reputation_lookup_us"] = best / len(qs) * 1e6
        t1 = time.perf_counter()
        live.market()  # a lookup with nothing new: what every request pays
        out["market_noop_us"] = (time.perf_counter() - t1) * 1e6
        # What the provider agent and queries ask every tick: open auctions, the
        # leases of a party; indexed, against a scan of every auction / lease.
        now = m.now_ms
        m.open_auctions(now - 1)  # the first ask drops what ended before it
        t1 = time.perf_counter()
        n_open = len(m.open_auctions(now))
        out["open_auctions_us"] = (time.perf_counter() - t1) * 1e6
        t1 = time.perf_counter()
        scan = [a for a in m.auctions.values() if a.deadline_ms >= now]
        out["open_auctions_scan_us"] = (time.perf_counter() - t1) * 1e6
        assert len(scan) == n_open
        keys = [rnd.choice(authors) for _ in range(100)]
        t1 = time.perf_counter()
        got = [len(m.leases_of(k)) for k in keys]
        out["leases_of_us"] = (time.perf_counter() - t1) * 1e6 / len(keys)
        # One key: with a cold store a scan reads every cold lease from it.
        t1 = time.perf_counter()
        want = [sum(1 for x in m.leases.values() if k == x.provider or k in x.keys)
                for k in keys[:1]]
        out["leases_of_scan_us"] = (time.perf_counter() - t1) * 1e6
        assert got[:1] == want
        # The provider agent's rating pass of the provider with the most leases: the
        # first tick walks them all (every cold one read from the store), the next
        # ones look at what waits for its rating and what changed.
        from node.agent import RatingPass, _ratings

        busiest = max(keys, key=lambda k: sum(x.provider == k for x in m.leases_of(k)))
        rp = RatingPass()
        t1 = time.perf_counter()
        _ratings(m, busiest, now, rp)
        out["rating_walk_us"] = (time.perf_counter() - t1) * 1e6
        live.market()
        t1 = time.perf_counter()
        _ratings(m, busiest, now, rp)
        out["rating_pass_us"] = (time.perf_counter() - t1) * 1e6
        out["rating_pass_leases"] = len(m.leases_of(busiest))
    out["cold_store_mb"] = os.path.getsize(live.view.cold.path) / 2**20
    print(json.dumps(out))


def _child(path: Path, snapshot: Path | None = None, trace_top: int = 0) -> dict[str, Any]:
    r = subprocess.run([sys.executable, __file__, "--serve", str(path),
                        *(["--snapshot", str(snapshot)] if snapshot else []),
                        *(["--trace", str(trace_top)] if trace_top else [])],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise SystemExit(f"serving process failed:\n{r.stderr[-4000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def _session(sess: SyncSession, remote: Ledger, version: int) -> tuple[int, int, float]:
    """Run a session against `remote` in-process: (round trips, bytes, seconds)."""
    nbytes = trips = 0
    t0 = time.perf_counter()
    while (req := sess.next_request()) is not None:
        data = req.encode()
        resp = sync.handle(remote, data, version)
        nbytes += len(data) + len(resp)
        trips += 1
        sess.on_response(sync.decode_response(resp, version))
    return trips, nbytes, time.perf_counter() - t0


def bench_sync(path: Path, work: Path, n_authors: int) -> dict[str, Any]:
    a_path, a1_path, b_path = work / "a.db", work / "a1.db", work / "b.db"
    for p in (a_path, a1_path, b_path):
        shutil.copy(path, p)
    b = Ledger(b_path, network=NETWORK)
    rnd = random.Random(11)
    tag = domain_tag(NETWORK)
    heads = b.heads()
    raw = 0
    new = []
    for i in rnd.sample(range(n_authors), 100):
        pk, sk = keypair(_seed(i))
        h = heads.get(pk)
        seq, prev, ts = (h.seq, h.id, h.ts_ms) if h else (0, None, 1_700_000_000_000)
        new.append(sign_fast(pk, sk, tag, seq + 1, prev, ts + 1,
                             Offer(services=(ServiceOffer("bandwidth", 5, 100),),
                                   currency="EUR", addrs=())))
        raw += len(new[-1].wire)
    _store(b, new)
    # /sync/2, what nodes run: each side builds its reconciliation index once after a
    # start (index_build_s, per node), then keeps it up to date; not in sync_s.
    a = Ledger(a_path, network=NETWORK)
    t0 = time.perf_counter()
    a.recon_index()
    b.recon_index()
    build_s = (time.perf_counter() - t0) / 2
    sess = ReconSession(a)
    trips, nbytes, sync_s = _session(sess, b, 2)
    ok = a.digest() == b.digest()
    # /sync/1 (HEADS paging), served for older nodes: the baseline.
    a1 = Ledger(a1_path, network=NETWORK)
    sess1 = SyncSession(a1)
    trips1, nbytes1, sync1_s = _session(sess1, b, 1)
    ok1 = a1.digest() == b.digest()
    for led in (a, a1, b):
        led.close()
    return {"sync_round_trips": trips, "sync_bytes": nbytes, "sync_s": round(sync_s, 3),
            "sync_bytes_vs_raw_ratio": round(nbytes / raw, 1), "sync_converged": ok,
            "sync_accepted": sess.stats.accepted, "recon_index_build_s": round(build_s, 2),
            "sync1_round_trips": trips1, "sync1_bytes": nbytes1, "sync1_s": round(sync1_s, 3),
            "sync1_converged": ok1,
            "sync_bytes_vs_sync1_ratio": round(nbytes / max(1, nbytes1), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 events, 10,000 authors")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--authors", type=int, default=None)
    ap.add_argument("--cache", default="/tmp/bidmesh-scale")
    ap.add_argument("--fresh", action="store_true", help="generate the ledger again")
    ap.add_argument("--no-sync", action="store_true")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--snapshot", help=argparse.SUPPRESS)
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="also a build under tracemalloc: its N largest source lines")
    args = ap.parse_args()
    if args.serve:
        if args.trace:
            return trace(args.serve, args.trace)
        return serve(args.serve, args.snapshot)
    n = args.events or (100_000 if args.quick else 1_000_000)
    authors = args.authors or max(BIDDERS + 2, n // 10)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"ledger-v{GEN_VERSION}-{n}-{authors}.db"
    gen: dict[str, Any] = {}
    if args.fresh or not path.exists():
        # Ledger time ends an hour before now, so every event is due.
        gen = generate(path, n, authors, int(time.time() * 1000) - 3_600_000)
        print(f"generated {n} events from {authors} authors in {gen['gen_s']} s "
              f"(signing {gen['sign_s']} s): {gen['kinds']}")
    else:
        print(f"reusing {path}")
    out: dict[str, Any] = {"events": n, "authors": authors, "quick": args.quick,
                           "load1": round(os.getloadavg()[0], 1),
                           "ledger_mb": round(path.stat().st_size / 2**20, 1)}
    if gen:
        out["gen_s"] = gen["gen_s"]
    me = os.getpid()  # other runs may share the cache: files of this run's own
    empty = cache / f"empty-{me}.db"
    empty.unlink(missing_ok=True)
    Ledger(empty, network=NETWORK).close()
    base = _child(empty)
    empty.unlink()
    snap = path.with_name(f"{path.stem}-{me}.snapshot")
    snap.unlink(missing_ok=True)  # written by this code, in the first serving process
    got = _child(path, snap)
    print(f"serving: first build {got['restart_s']:.2f} s, RSS {got['rss_mb']:.0f} MiB "
          f"(peak {got['peak_rss_mb']:.0f}; empty ledger {base['rss_mb']:.0f}), "
          f"{got['auctions']} auctions, {got['leases']} leases, {got['ignored']} ignored; "
          f"reputation lookup {got['reputation_lookup_us']:.1f} µs; snapshot written in "
          f"{got['snapshot_save_s']:.1f} s ({got['snapshot_mb']:.0f} MiB)")
    again = _child(path, snap)
    snap.unlink(missing_ok=True)
    print(f"restart from the snapshot: {again['restart_s']:.2f} s "
          f"({again['restart_cpu_s']:.2f} CPU s), RSS {again['rss_mb']:.0f} MiB")
    out.update({
        "build_s": round(got["restart_s"], 2),
        "build_cpu_s": round(got["restart_cpu_s"], 2),
        "snapshot_save_s": round(got["snapshot_save_s"], 2),
        "snapshot_save_cpu_s": round(got["snapshot_save_cpu_s"], 2),
        "snapshot_mb": round(got["snapshot_mb"], 1),
        "restored_rss_mb": round(again["rss_mb"], 1),
        "restart_vs_build_ratio": round(again["restart_cpu_s"] / got["restart_cpu_s"], 3),
    })
    got = got | {k: again[k] for k in ("restart_s", "restart_cpu_s")}
    out.update({
        "rss_mb": round(got["rss_mb"], 1), "peak_rss_mb": round(got["peak_rss_mb"], 1),
        "empty_rss_mb": round(base["rss_mb"], 1),
        "rss_vs_empty_ratio": round(got["rss_mb"] / base["rss_mb"], 2),
        "rss_kib_per_event": round((got["rss_mb"] - base["rss_mb"]) * 1024 / n, 3),
        "restart_s": round(got["restart_s"], 2),
        "restart_cpu_s": round(got["restart_cpu_s"], 2),
        "reputation_lookup_us": round(got["reputation_lookup_us"], 2),
        "market_noop_us": round(got["market_noop_us"], 1),
        "open_auctions_us": round(got["open_auctions_us"], 1),
        "open_auctions_vs_scan_ratio": round(got["open_auctions_us"]
                                             / got["open_auctions_scan_us"], 6),
        "leases_of_us": round(got["leases_of_us"], 1),
        "leases_of_vs_scan_ratio": round(got["leases_of_us"] / got["leases_of_scan_us"], 6),
        "rating_pass_us": round(got["rating_pass_us"], 1),
        "rating_walk_us": round(got["rating_walk_us"], 1),
        "rating_pass_vs_walk_ratio": round(got["rating_pass_us"] / got["rating_walk_us"], 4),
        "rating_pass_leases": got["rating_pass_leases"],
        "cold_store_mb": round(got["cold_store_mb"], 1),
        "auctions": got["auctions"], "leases": got["leases"],
        "partitions": got["partitions"], "cold_partitions": got["cold_partitions"],
    })
    if args.trace:
        t = _child(path, trace_top=args.trace)
        print(f"tracemalloc after the build: {t['trace_mib']} MiB of Python heap; by line:")
        print("\n".join(t["trace_top"]))
        out["trace_mib"] = t["trace_mib"]
    if not args.no_sync:
        work = cache / f"sync-{me}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            s = bench_sync(path, work, authors)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"sync of 100 new events: {s['sync_round_trips']} round trips, "
              f"{s['sync_bytes']} bytes, {s['sync_s']} s (converged: {s['sync_converged']}; "
              f"/sync/1: {s['sync1_round_trips']} round trips, {s['sync1_bytes']} bytes, "
              f"{s['sync1_s']} s)")
        out.update(s)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
