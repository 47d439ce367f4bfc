#!/usr/bin/env python3
"""Ledger ingest: signed events verified and stored per second, batched, against the
raw Ed25519 verify rate of the fastest verifier in the venv, measured in the same run.

    .venv/bin/python bench/ledger_ingest.py [--quick] [--events N] [--batch B]
                                            [--cache-kib K1,K2,...] [--repeat R]

Events are generated and signed up front by worker processes (many authors, chains
interleaved the way sync delivers them) into length-prefixed temp files, so the
measuring process never holds the whole set. Only `append_many` calls are timed.
The raw verify rate is measured on the same events, interleaved batch by batch with
the ingest, so other load on the machine hits both sides alike. Then single-event
`append` latency on the loaded ledger, and random lookups on it: `holds` (the
duplicate check of a re-gossiped record), an event by id (the market's loads) and
`id_at`, in CPU microseconds each. Each ingest runs in a process of its own; its peak RSS
(ru_maxrss) is what ingesting N events costs the node.

`--cache-kib`: the same events ingested with each page cache size for the ledger
(`Ledger(cache_kib=...)`, the node's `node.ledger_cache_mib`), `--repeat` times, in
turns; `by_cache` gives the medians per size, `cpu_vs_first` the CPU per stored
event against the first size listed. Last line: JSON figures (the top-level ones
are the first size's).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # testkit

import nacl.bindings
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from testkit import fake_id, seed

from node import codec
from node.events import Bid, _envelope, decode_wire, domain_tag
from node.ledger import CACHE_KIB, Ledger, Status, idk

NETWORK = "bench"
LEN = struct.Struct(">I")


def _gen(args: tuple[str, int, int, int, int]) -> int:
    """Write `per_author` events for each author in [first, first + n): runs of `run`
    consecutive events of one author, authors taken round-robin (as pull sync delivers
    per-author ranges; run=1 is the worst case, one event per author per batch)."""
    path, first, n, per_author, run = args
    tag = domain_tag(NETWORK)
    keys = [nacl.bindings.crypto_sign_seed_keypair(seed(first + i)) for i in range(n)]
    prev: list[bytes | None] = [None] * n
    req = fake_id("bench-request")
    bodies = [Bid(request=req, price=p, note="") for p in range(64)]
    import hashlib

    with open(path, "wb") as f:
        for s0 in range(1, per_author + 1, run):
            out = []
            for i, (pk, sk) in enumerate(keys):
                for s in range(s0, min(s0 + run, per_author + 1)):
                    signed = _envelope(pk, s, prev[i], 1_700_000_000_000 + s,
                                       bodies[(i + s) % 64])
                    sig = nacl.bindings.crypto_sign(tag + signed, sk)[:64]
                    prev[i] = hashlib.sha256(signed).digest()
                    wire = codec.pack([signed, sig])
                    out.append(LEN.pack(len(wire)) + wire)
            f.write(b"".join(out))
    return n * per_author


def _read(path: Path, batch: int) -> Iterator[list[bytes]]:
    with open(path, "rb") as f:
        while True:
            out = []
            for _ in range(batch):
                h = f.read(4)
                if not h:
                    break
                out.append(f.read(LEN.unpack(h)[0]))
            if not out:
                return
            yield out


def _interleave(paths: list[Path], batch: int) -> Iterator[list[bytes]]:
    its = [_read(p, batch) for p in paths]
    while its:
        for it in list(its):
            b = next(it, None)
            if b is None:
                its.remove(it)
            else:
                yield b


def verify_baseline(n: int) -> tuple[float, str, dict[str, float]]:
    """Raw verify rate of each Ed25519 implementation on realistic messages."""
    tag = domain_tag(NETWORK)
    pk, sk = nacl.bindings.crypto_sign_seed_keypair(seed(0))
    msgs = []
    for i in range(256):
        signed = _envelope(pk, i + 1, None if i == 0 else fake_id(str(i)), i,
                           Bid(request=fake_id("r"), price=i, note=""))
        msgs.append((tag + signed, nacl.bindings.crypto_sign(tag + signed, sk)[:64]))
    rates: dict[str, float] = {}
    t = time.perf_counter()
    for i in range(n):
        m, s = msgs[i & 255]
        nacl.bindings.crypto_sign_open(s + m, pk)
    rates["pynacl"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(n):
        m, s = msgs[i & 255]
        Ed25519PublicKey.from_public_bytes(pk).verify(s, m)
    rates["cryptography"] = n / (time.perf_counter() - t)
    best = max(rates, key=lambda k: rates[k])
    return rates[best], best, rates


def _raw_verify(verifier: str, raw: list[tuple[bytes, bytes, bytes]]) -> float:
    """Seconds to verify (pk, sig, tag + signed) triples with the raw verifier."""
    if verifier == "pynacl":
        t = time.perf_counter()
        for pk, sig, msg in raw:
            nacl.bindings.crypto_sign_open(sig + msg, pk)
        return time.perf_counter() - t
    t = time.perf_counter()
    for pk, sig, msg in raw:
        Ed25519PublicKey.from_public_bytes(pk).verify(sig, msg)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 60 s on 2 cores)")
    ap.add_argument("--events", type=int, help="events to ingest (default 1,000,000)")
    ap.add_argument("--batch", type=int, default=1000, help="events per append_many")
    ap.add_argument("--authors", type=int, default=1000)
    ap.add_argument("--run", type=int, default=100,
                    help="consecutive events per author in the stream (sync delivers "
                         "per-author ranges; 1 = every batch spans 1000 authors)")
    ap.add_argument("--singles", type=int, default=2000, help="single appends timed")
    ap.add_argument("--verify-every", type=int, default=2,
                    help="time the raw verifier on every n-th batch")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--cache-kib", type=lambda v: [int(x) for x in v.split(",")],
                    help="the ledger's page cache sizes to compare, comma-separated "
                         "(default: node.ledger.CACHE_KIB alone); the first is the reference")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cache size, in turns")
    ap.add_argument("--lookups", type=int, default=20_000,
                    help="random lookups timed per kind after the ingest")
    a = ap.parse_args()
    total = a.events or (60_000 if a.quick else 1_000_000)
    authors = min(a.authors, total)
    per_author = max(1, total // authors)
    total = authors * per_author
    singles = min(a.singles, 500) if a.quick else a.singles

    with tempfile.TemporaryDirectory(prefix="bidmesh-bench-") as tmp:
        tmpd = Path(tmp)
        t0 = time.perf_counter()
        nw = max(1, min(a.workers, authors))
        share = [authors // nw + (1 if i < authors % nw else 0) for i in range(nw)]
        jobs, first = [], 1
        for i, n in enumerate(share):
            jobs.append((str(tmpd / f"gen{i}.bin"), first, n, per_author, a.run))
            first += n
        # Single-event appends use fresh authors beyond the bulk set.
        jobs.append((str(tmpd / "singles.bin"), first, singles, 1, 1))
        with mp.get_context("spawn").Pool(nw) as pool:
            pool.map(_gen, jobs)
        gen_s = time.perf_counter() - t0
        print(f"generated {total:,} + {singles} events with {nw} workers in {gen_s:.1f} s")

        # Which verifier is fastest, then its rate measured on the very events being
        # ingested, batch by batch, interleaved with ingest so that load from other
        # processes affects both sides alike.
        _, verifier, rates = verify_baseline(3_000 if a.quick else 20_000)
        print("raw verify: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in rates.items())
              + f" -> baseline {verifier}")
        caches = a.cache_kib or [CACHE_KIB]
        paths = [j[0] for j in jobs[:-1]]
        runs: list[dict[str, Any]] = []
        # Each cache size in a process of its own (its peak RSS is its own), in turns
        # (A B C A B C ...) so that load changes on the machine hit every size alike.
        with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for rep in range(a.repeat):
                for kib in caches:
                    r = pool.apply(_ingest, ((str(tmpd), paths, str(tmpd / "singles.bin"),
                                              kib, a.batch, a.verify_every, verifier,
                                              total, a.lookups),))
                    r["repeat"] = rep
                    runs.append(r)
                    print(f"cache {kib:>6} KiB: ingest {r['ingest_per_s']:,}/s "
                          f"({r['ingest_cpu_us_per_event']} us CPU per event; raw verify "
                          f"{r['verify_per_s']:,}/s, ratio {r['ingest_vs_verify_ratio']}); "
                          f"single append p50 {r['append_p50_ms']} ms p99 "
                          f"{r['append_p99_ms']} ms; lookups (CPU): holds "
                          f"{r['holds_us']} us, by id {r['by_id_us']} us, id_at "
                          f"{r['id_at_us']} us; peak RSS {r['peak_rss_mb']} MB", flush=True)

    by_cache = {kib: [r for r in runs if r["cache_kib"] == kib] for kib in caches}
    ref = by_cache[caches[0]]

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    summary = []
    for kib, rows in by_cache.items():
        summary.append({
            "cache_kib": kib,
            **{k: round(med(rows, k), 4) for k in (
                "ingest_per_s", "ingest_cpu_us_per_event", "ingest_vs_verify_ratio",
                "append_p50_ms", "append_p99_ms", "holds_us", "by_id_us", "id_at_us",
                "peak_rss_mb")},
            # Against the first cache size listed (CPU per event: > 1 is dearer).
            "cpu_vs_first": round(med(rows, "ingest_cpu_us_per_event")
                                  / med(ref, "ingest_cpu_us_per_event"), 3),
            "ratio_vs_first": round(med(rows, "ingest_vs_verify_ratio")
                                    / med(ref, "ingest_vs_verify_ratio"), 3),
        })
    first = summary[0]
    print(f"ingest/verify ratio {first['ingest_vs_verify_ratio']:.2f} (target >= 0.6); "
          f"peak RSS {first['peak_rss_mb']:.0f} MB")
    print(json.dumps({
        "events": total,
        "batch": a.batch,
        "run": a.run,
        "verifier": verifier,
        "pynacl_verify_per_s": round(rates["pynacl"]),
        "cryptography_verify_per_s": round(rates["cryptography"]),
        **{k: first[k] for k in ("ingest_per_s", "ingest_vs_verify_ratio", "append_p50_ms",
                                 "append_p99_ms", "peak_rss_mb")},
        "ratio_ok": first["ingest_vs_verify_ratio"] >= 0.6,
        "rss_ok": first["peak_rss_mb"] < 200,
        "p50_ok": first["append_p50_ms"] < 0.5,
        "by_cache": summary,
        "runs": runs,
    }))


def _ingest(job: tuple[str, list[str], str, int, int, int, str, int, int]) -> dict[str, Any]:
    """One ingest of the generated events into a fresh ledger with a `cache_kib` page
    cache (in a process of its own), then single appends and lookups on it."""
    tmp, paths, singles_path, kib, batch_n, verify_every, verifier, total, lookups = job
    tmpd = Path(tmp)
    tag = domain_tag(NETWORK)
    db = tmpd / f"ledger-{kib}.db"
    led = Ledger(db, network=NETWORK, cache_kib=kib)
    busy = vbusy = cpu = 0.0
    vdone = bad = 0
    sample: list[bytes] = []  # stored wires for the lookups, spread over the ledger
    every = max(1, total // max(1, lookups))
    seen = 0
    for i, batch in enumerate(_interleave([Path(p) for p in paths], batch_n)):
        if i % verify_every == 0:
            evs = [decode_wire(w, NETWORK, verify=False) for w in batch]
            raw = [(e.author, e.sig, tag + e.signed) for e in evs]
            del evs
            vbusy += _raw_verify(verifier, raw)
            vdone += len(raw)
        c, t = time.process_time(), time.perf_counter()
        res = led.append_many(batch)
        busy += time.perf_counter() - t
        cpu += time.process_time() - c
        bad += sum(r.status is not Status.ACCEPTED for r in res)
        for w in batch:
            if seen % every == 0:
                sample.append(w)
            seen += 1
    assert bad == 0, f"{bad} events not accepted"
    assert led.count() == total

    lat = []
    for (wire,) in _read(Path(singles_path), 1):
        t = time.perf_counter()
        r = led.append(wire)
        lat.append(time.perf_counter() - t)
        assert r.status is Status.ACCEPTED

    # Lookups on the loaded ledger, in random order (what a small cache would make
    # dearer): the duplicate check of a re-gossiped record (`holds`), the market's
    # load of events by id (node/marketview.py `_load`, by the id key), `id_at`.
    rng = random.Random(kib)
    rng.shuffle(sample)
    evs = [decode_wire(w, NETWORK, verify=False) for w in sample]
    # CPU time (user + system: a page the cache lacks is a read() from the OS), which
    # other load on the machine inflates far less than wall time.
    t = time.process_time()
    assert all(led.holds(w) for w in sample)
    holds_us = (time.process_time() - t) / len(sample) * 1e6
    t = time.process_time()
    for e in evs:
        led.db.execute("SELECT id, wire FROM events WHERE idk = ?", (idk(e.id),)).fetchall()
    by_id_us = (time.process_time() - t) / len(evs) * 1e6
    t = time.process_time()
    for e in evs:
        led.id_at(e.author, e.seq)
    id_at_us = (time.process_time() - t) / len(evs) * 1e6
    led.close()
    for suffix in ("", "-wal", "-shm"):
        (tmpd / f"ledger-{kib}.db{suffix}").unlink(missing_ok=True)
    ingest_per_s = total / busy
    verify_per_s = vdone / vbusy
    return {
        "cache_kib": kib,
        "ingest_per_s": round(ingest_per_s),
        "ingest_cpu_us_per_event": round(cpu / total * 1e6, 2),
        "verify_per_s": round(verify_per_s),
        "ingest_vs_verify_ratio": round(ingest_per_s / verify_per_s, 3),
        "append_p50_ms": round(statistics.median(lat) * 1000, 4),
        "append_p99_ms": round(sorted(lat)[int(len(lat) * 0.99)] * 1000, 4),
        "holds_us": round(holds_us, 2),
        "by_id_us": round(by_id_us, 2),
        "id_at_us": round(id_at_us, 2),
        "lookups": len(sample),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    main()
