#!/usr/bin/env python3
"""Ledger ingest: signed events verified and stored per second, batched, against the
raw Ed25519 verify rate of the fastest verifier in the venv, measured in the same run.

    .venv/bin/python bench/ledger_ingest.py [--quick] [--events N] [--batch B]

Events are generated and signed up front by worker processes (many authors, chains
interleaved the way sync delivers them) into length-prefixed temp files, so the
measuring process never holds the whole set. Only `append_many` calls are timed.
The raw verify rate is measured on the same events, interleaved batch by batch with
the ingest, so other load on the machine hits both sides alike. Then single-event
`append` latency on the loaded ledger. Peak RSS is this process's (ru_maxrss): what
ingesting N events costs the node. Last line: JSON figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # testkit

import nacl.bindings
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from testkit import fake_id, seed

from node import codec
from node.events import Bid, _envelope, decode_wire, domain_tag
from node.ledger import Ledger, Status

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
        tag = domain_tag(NETWORK)
        led = Ledger(tmpd / "ledger.db", network=NETWORK)
        busy = vbusy = 0.0
        vdone = bad = 0
        for i, batch in enumerate(_interleave([Path(j[0]) for j in jobs[:-1]], a.batch)):
            if i % a.verify_every == 0:
                evs = [decode_wire(w, NETWORK, verify=False) for w in batch]
                raw = [(e.author, e.sig, tag + e.signed) for e in evs]
                del evs
                vbusy += _raw_verify(verifier, raw)
                vdone += len(raw)
            t = time.perf_counter()
            res = led.append_many(batch)
            busy += time.perf_counter() - t
            bad += sum(r.status is not Status.ACCEPTED for r in res)
        assert bad == 0, f"{bad} events not accepted"
        assert led.count() == total
        ingest_per_s = total / busy
        verify_per_s = vdone / vbusy
        print(f"ingest: {total:,} events in {busy:.1f} s = {ingest_per_s:,.0f}/s "
              f"(batches of {a.batch}, runs of {a.run} per author); "
              f"raw {verifier} verify of the same events "
              f"{verify_per_s:,.0f}/s")

        lat = []
        for (wire,) in _read(tmpd / "singles.bin", 1):
            t = time.perf_counter()
            r = led.append(wire)
            lat.append(time.perf_counter() - t)
            assert r.status is Status.ACCEPTED
        p50 = statistics.median(lat) * 1000
        p99 = sorted(lat)[int(len(lat) * 0.99)] * 1000
        print(f"single append: p50 {p50:.3f} ms, p99 {p99:.3f} ms ({len(lat)} appends)")
        led.close()

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ratio = ingest_per_s / verify_per_s
    print(f"ingest/verify ratio {ratio:.2f} (target >= 0.6); peak RSS {rss_mb:.0f} MB")
    print(json.dumps({
        "events": total,
        "batch": a.batch,
        "run": a.run,
        "ingest_per_s": round(ingest_per_s),
        "verify_per_s": round(verify_per_s),
        "verifier": verifier,
        "verify_sampled": vdone,
        "pynacl_verify_per_s": round(rates["pynacl"]),
        "cryptography_verify_per_s": round(rates["cryptography"]),
        "ingest_vs_verify_ratio": round(ratio, 3),
        "append_p50_ms": round(p50, 4),
        "append_p99_ms": round(p99, 4),
        "peak_rss_mb": round(rss_mb, 1),
        "ratio_ok": ratio >= 0.6,
        "rss_ok": rss_mb < 200,
        "p50_ok": p50 < 0.5,
    }))


if __name__ == "__main__":
    main()
