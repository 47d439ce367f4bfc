"""Helpers for tests, test vectors, fuzzers and benchmarks: fixed seeds, one sample
body per kind, a chain builder, and raw signing of arbitrary envelope bytes.

Not used by the node itself and not shipped in the wheel (it lives in tests/;
bench/, fuzz/ and docs/make_vectors.py put tests/ on sys.path). `sign_raw` signs
bytes as given, so tests can build events a correct encoder would never produce
(non-canonical, unknown kind, bad body) and check that receivers reject them for the
right reason.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nacl.bindings

from node import codec
from node.events import (
    KINDS,
    VERSION,
    Award,
    Bid,
    Body,
    Commit,
    Event,
    Members,
    MemberUsage,
    Offer,
    Payment,
    Pledge,
    Rating,
    Request,
    Reveal,
    ServiceOffer,
    Subcontract,
    Usage,
    commitment_hash,
    considered_digest,
    domain_tag,
    sign_event,
)

NETWORK = "testnet"


def seed(i: int) -> bytes:
    """A fixed 32-byte Ed25519 seed per index."""
    return hashlib.sha256(b"bidmesh-test-seed/" + str(i).encode()).digest()


def public_key(seed_: bytes) -> bytes:
    pk, _ = nacl.bindings.crypto_sign_seed_keypair(seed_)
    return bytes(pk)


def fake_id(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def sample_bodies() -> dict[str, Body]:
    """One valid body per kind, with every optional field used somewhere."""
    req, bid, lease = fake_id("request"), fake_id("bid"), fake_id("lease")
    nonce = bytes(range(16))
    bodies: list[Body] = [
        Request(
            service="bandwidth", chain=("zstd",), start_ms=1_700_000_000_000,
            duration_ms=3_600_000, max_rate_bps=100_000_000, min_rate_bps=1_000_000,
            members=Members(devices=(public_key(seed(90)),), phones=("+4915112345678",),
                            users=("alice",), max_devices=4),
            reserve=5_000, currency="EUR", close_ms=1_699_999_000_000,
            reveal_ms=1_699_999_600_000, rule="vickrey", sealed=True, group=False,
            note="evening block",
        ),
        Bid(request=req, price=4_200, note="fibre"),
        Commit(request=req, commitment=commitment_hash(req, 4_100, nonce)),
        Reveal(commit=fake_id("commit"), price=4_100, nonce=nonce),
        Award(request=req, winner=bid, price=4_200, considered=(bid,),
              considered_digest=considered_digest([bid]), considered_count=1),
        Payment(lease=lease, amount=4_200, currency="EUR", method="card",
                reference="ch_123", on_behalf=(public_key(seed(91)),)),
        Rating(lease=lease, subject=public_key(seed(92)), role="provider", satisfied=True,
               score=5, text="smooth"),
        Offer(services=(ServiceOffer(name="zstd", price=3, capacity=10_240),),
              currency="EUR", addrs=("/ip4/127.0.0.1/tcp/4001",), note=""),
        Pledge(request=req, willing=True, amount=1_000, sponsor=(public_key(seed(93)),)),
        Usage(lease=lease, members=(MemberUsage(member=public_key(seed(90)), bytes_in=10,
                                                bytes_out=20, segments=1, active_ms=1000),),
              shortfall_ms=0, rate_limited=0, subcontracts=1),
        Subcontract(lease=lease, contractor=public_key(seed(94)), services=("zstd",),
                    segments=3, bytes_in=4096, result_digest=fake_id("result")),
    ]
    out = {b.KIND: b for b in bodies}
    assert set(out) == set(KINDS), "sample_bodies must cover every kind"
    return out


def sign_raw(seed_: bytes, signed: bytes, network: str = NETWORK) -> bytes:
    """Ed25519 signature over domain_tag(network) + signed, for any bytes."""
    _, sk = nacl.bindings.crypto_sign_seed_keypair(seed_)
    return bytes(nacl.bindings.crypto_sign(domain_tag(network) + signed, sk)[:64])


def keypair(seed_: bytes) -> tuple[bytes, bytes]:
    """(public key, 64-byte secret key) of a seed, for `sign_fast`."""
    pk, sk = nacl.bindings.crypto_sign_seed_keypair(seed_)
    return bytes(pk), bytes(sk)


def sign_fast(pk: bytes, sk: bytes, tag: bytes, seq: int, prev: bytes | None, ts_ms: int,
              body: Body) -> Event:
    """`sign_event` for benchmarks signing as many authors: the key pair comes derived
    (`keypair`) and the domain tag precomputed, since `sign_event` re-derives the pair
    of any key beyond its small cache (as costly as the signature)."""
    signed = codec.pack([VERSION, pk, seq, prev, ts_ms, body.KIND, body.to_map()])
    sig = nacl.bindings.crypto_sign(tag + signed, sk)[:64]
    return Event(pk, seq, prev, ts_ms, body.KIND, body, signed, sig,
                 hashlib.sha256(signed).digest())


def verify_us(chains: Sequence[Sequence[Event]], network: str, rounds: int = 7) -> float:
    """Thread CPU µs of one raw Ed25519 check (libsodium) of an event's signature, the
    median of `rounds` over the first 200 events of each chain: the baseline the ingest
    and catch-up benches set their CPU per event against."""
    tag = domain_tag(network)
    msgs = [(ev.sig + tag + ev.signed, ev.author) for c in chains for ev in c[:200]]
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        for m, pk in msgs:
            nacl.bindings.crypto_sign_open(m, pk)
        times.append((time.thread_time() - t0) / len(msgs) * 1e6)
    return sorted(times)[len(times) // 2]


def wire_of(signed: bytes, sig: bytes) -> bytes:
    return bytes(msgpack.packb([signed, sig], use_bin_type=True))


def raw_event(
    seed_: bytes,
    envelope: list[Any],
    network: str = NETWORK,
    *,
    packed: bytes | None = None,
) -> tuple[bytes, bytes, bytes]:
    """Sign an envelope given as a Python list (packed as-is, keys in given order) or as
    `packed` bytes. Returns (signed, sig, wire)."""
    signed = packed if packed is not None else bytes(msgpack.packb(envelope, use_bin_type=True))
    sig = sign_raw(seed_, signed, network)
    return signed, sig, wire_of(signed, sig)


@dataclass
class Chain:
    """Builds successive events of one author's chain."""

    seed: bytes
    network: str = NETWORK
    ts_ms: int = 1_700_000_000_000
    events: list[Event] = field(default_factory=list)

    @property
    def public(self) -> bytes:
        return public_key(self.seed)

    def next(self, body: Body | None = None, *, ts_ms: int | None = None) -> Event:
        head = self.events[-1] if self.events else None
        ev = self.make(len(self.events) + 1, head.id if head else None, body, ts_ms=ts_ms)
        self.events.append(ev)
        return ev

    def make(self, seq: int, prev: bytes | None, body: Body | None = None, *,
             ts_ms: int | None = None) -> Event:
        """An event at any position (for forks and gaps); does not extend the chain."""
        if body is None:
            body = Bid(request=fake_id("request"), price=seq, note="")
        ts = self.ts_ms + seq if ts_ms is None else ts_ms
        return sign_event(self.seed, seq, prev, ts, body, self.network)


_INTS = [(0xCC, ">B", 0, 255), (0xCD, ">H", 0, 65535), (0xCE, ">I", 0, 2**32 - 1),
         (0xCF, ">Q", 0, 2**64 - 1), (0xD0, ">b", -128, 127), (0xD1, ">h", -2**15, 2**15 - 1),
         (0xD2, ">i", -2**31, 2**31 - 1), (0xD3, ">q", -2**63, 2**63 - 1)]


def any_encoding(v: Any, choose: Callable[[Sequence[bytes]], bytes]) -> bytes:
    """Some valid msgpack encoding of `v`, letting `choose` pick among every header width
    that fits and every order of map entries: the canonical one and all the others.
    For differential tests of the canonical check."""

    def hdr(n: int, fix: tuple[int, int] | None, wide: list[tuple[int, int]]) -> bytes:
        opts = [bytes([fix[0] | n])] if fix is not None and n < fix[1] else []
        opts += [bytes([code]) + n.to_bytes(w, "big") for code, w in wide if n < 1 << (8 * w)]
        return choose(opts)

    if v is None:
        return b"\xc0"
    if v is True or v is False:
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        opts = []
        if -32 <= v < 128:
            opts.append(struct.pack(">b", v) if v < 0 else bytes([v]))
        opts += [bytes([c]) + struct.pack(fmt, v) for c, fmt, lo, hi in _INTS if lo <= v <= hi]
        return choose(opts)
    if isinstance(v, float):
        return choose([b"\xcb" + struct.pack(">d", v)])
    if isinstance(v, str):
        b = v.encode()
        return hdr(len(b), (0xA0, 32), [(0xD9, 1), (0xDA, 2), (0xDB, 4)]) + b
    if isinstance(v, bytes):
        return hdr(len(v), None, [(0xC4, 1), (0xC5, 2), (0xC6, 4)]) + v
    if isinstance(v, (list, tuple)):
        return hdr(len(v), (0x90, 16), [(0xDC, 2), (0xDD, 4)]) + b"".join(
            any_encoding(x, choose) for x in v)
    if isinstance(v, dict):
        entries = [any_encoding(k, choose) + any_encoding(x, choose) for k, x in v.items()]
        out = []
        while entries:  # any order: choose the next entry among those left
            e = choose(entries)
            entries.remove(e)
            out.append(e)
        return hdr(len(v), (0x80, 16), [(0xDE, 2), (0xDF, 4)]) + b"".join(out)
    raise TypeError(f"cannot encode {type(v).__name__}")
