"""Events: the envelope, every body kind, the codec, signing and verification.

Envelope (msgpack array): `[v, author, seq, prev, ts_ms, kind, body]`.
`signed = packb(envelope)`, `sig = Ed25519(domain_tag(network) + signed)`,
`id = sha256(signed)`, wire = `packb([signed, sig])`. See docs/PROTOCOL.md.

Append-time checks here are self-contained (size, codec, canonical form, signature,
schema). Rules that need other events (who may award, who may rate) live in the
derivations (auction.py, reputation.py), so every node stores the same events.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import nacl.bindings
import nacl.exceptions

from . import codec
from .errors import InvalidEvent, InvalidMessage, Reason
from .schema import Bool, Bytes, Enum, Int, List, Nested, Opt, Str, Struct, bad, f

VERSION = 1
MAX_SIGNED = 16 * 1024  # envelope bytes
MAX_WIRE = MAX_SIGNED + 128  # [signed, sig] framing adds at most a few bytes
MAX_TS_MS = (1 << 53) - 1  # keeps timestamps exact in JSON clients
MAX_SEQ = (1 << 53) - 1  # per author; the same bound holds in sync and query messages
NETWORK_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
SERVICE_RE = r"[a-z0-9][a-z0-9._:+-]{0,63}"

ID = Bytes(32)
KEY = Bytes(32)
MONEY = Int(0, (1 << 53) - 1)
TS = Int(0, MAX_TS_MS)
TEXT = Str(280)
CURRENCY = Str(8, 3, r"[A-Z][A-Z0-9]{2,7}")
SERVICE = Str(64, 1, SERVICE_RE)
RATE = Opt(Int(1, 1 << 48))  # bits per second


@functools.lru_cache(maxsize=64)
def domain_tag(network: str) -> bytes:
    """Signatures are bound to one network, so events cannot be replayed across them."""
    if not NETWORK_RE.fullmatch(network):
        raise ValueError(f"network id {network!r} must match {NETWORK_RE.pattern}")
    return b"bidmesh/event/v1/" + network.encode() + b"\n"


# ---------------------------------------------------------------- body kinds


class Body(Struct):
    KIND: ClassVar[str]
    REF: ClassVar[str | None] = None  # field holding the primary referenced event id

    def ref(self) -> bytes | None:
        return getattr(self, self.REF) if self.REF else None


@dataclass(frozen=True)
class Members(Struct):
    """Who may share a lease besides the recipient."""

    devices: tuple[bytes, ...] = f(List(KEY, 256, unique=True), default=())
    phones: tuple[str, ...] = f(List(Str(16, 3, r"\+[0-9]{2,15}"), 256, unique=True), default=())
    users: tuple[str, ...] = f(List(Str(64, 1), 256, unique=True), default=())
    max_devices: int | None = f(Opt(Int(1, 65535)), default=None)


@dataclass(frozen=True)
class Request(Body):
    """A recipient auctions a block of time of usage of a service."""

    KIND = "request"
    service: str = f(SERVICE)
    chain: tuple[str, ...] = f(List(SERVICE, 8))  # processing services, in order
    start_ms: int = f(TS)
    duration_ms: int = f(Int(1, 10 * 366 * 86_400_000))
    max_rate_bps: int | None = f(RATE)
    min_rate_bps: int | None = f(RATE)
    members: Members = f(Nested(Members))
    reserve: int = f(MONEY)  # most the recipient will pay; bids above are void
    currency: str = f(CURRENCY)
    close_ms: int = f(TS)
    reveal_ms: int = f(TS)  # sealed: end of the reveal window; open: equals close_ms
    rule: str = f(Enum("lowest", "best_value", "vickrey"))
    sealed: bool = f(Bool())
    group: bool = f(Bool())  # awarded only once members' pledges cover the price
    note: str = f(TEXT, default="")

    def validate(self) -> None:
        if self.min_rate_bps and self.max_rate_bps and self.min_rate_bps > self.max_rate_bps:
            raise bad("min_rate_bps", "exceeds max_rate_bps")
        if self.reveal_ms < self.close_ms:
            raise bad("reveal_ms", "is before close_ms")
        if not self.sealed and self.reveal_ms != self.close_ms:
            raise bad("reveal_ms", "must equal close_ms for open bids")
        if self.rule == "vickrey" and not self.sealed:
            raise bad("rule", "vickrey needs sealed bids")


@dataclass(frozen=True)
class Bid(Body):
    """An open bid: the provider's price for the whole block."""

    KIND = "bid"
    REF = "request"
    request: bytes = f(ID)
    price: int = f(MONEY)
    note: str = f(TEXT, default="")


@dataclass(frozen=True)
class Commit(Body):
    """Sealed bid, phase 1: `commitment = commitment_hash(request, price, nonce)`."""

    KIND = "commit"
    REF = "request"
    request: bytes = f(ID)
    commitment: bytes = f(ID)


@dataclass(frozen=True)
class Reveal(Body):
    """Sealed bid, phase 2: opens a commit after close, before `reveal_ms`."""

    KIND = "reveal"
    REF = "commit"
    commit: bytes = f(ID)
    price: int = f(MONEY)
    nonce: bytes = f(Bytes(16, 32))


@dataclass(frozen=True)
class Award(Body):
    """The recipient names the bids it considered and the winner (nil: no deal)."""

    KIND = "award"
    REF = "request"
    request: bytes = f(ID)
    winner: bytes | None = f(Opt(ID))  # bid id, or commit id for sealed auctions
    price: int = f(MONEY)  # the clearing price the recipient will pay
    considered: tuple[bytes, ...] = f(List(ID, 256, unique=True))  # empty if > 256 bids
    considered_digest: bytes = f(ID)  # considered_digest() of every considered id
    considered_count: int = f(Int(0, 1 << 32))


@dataclass(frozen=True)
class Payment(Body):
    """The recipient or a sponsor pays for a lease (award id)."""

    KIND = "payment"
    REF = "lease"
    lease: bytes = f(ID)
    amount: int = f(MONEY)
    currency: str = f(CURRENCY)
    method: str = f(Str(32, 1, r"[a-z0-9-]+"))  # card, ledger, transfer, ...
    reference: str = f(Str(128))  # e.g. card charge id
    on_behalf: tuple[bytes, ...] = f(List(KEY, 256, unique=True), default=())


@dataclass(frozen=True)
class Rating(Body):
    """One party of a lease (or subcontract) rates the other."""

    KIND = "rating"
    REF = "lease"
    lease: bytes = f(ID)  # award id, or subcontract event id
    subject: bytes = f(KEY)
    role: str = f(Enum("provider", "recipient"))  # role of the subject
    satisfied: bool = f(Bool())  # provider: service delivered; recipient: paid
    score: int = f(Int(1, 5))
    text: str = f(TEXT, default="")


@dataclass(frozen=True)
class ServiceOffer(Struct):
    name: str = f(SERVICE)
    price: int = f(MONEY)  # minor units per MiB processed (or per hour for bandwidth)
    capacity: int = f(Int(0, 1 << 40))  # KiB/s the provider commits to


@dataclass(frozen=True)
class Offer(Body):
    """A provider advertises what it can do; the latest offer per provider counts."""

    KIND = "offer"
    services: tuple[ServiceOffer, ...] = f(List(Nested(ServiceOffer), 64))
    currency: str = f(CURRENCY)
    addrs: tuple[str, ...] = f(List(Str(256, 1), 8))  # multiaddrs to reach the dataplane
    note: str = f(TEXT, default="")


@dataclass(frozen=True)
class Pledge(Body):
    """A group member joins a group request, says if it pays, and whom it sponsors."""

    KIND = "pledge"
    REF = "request"
    request: bytes = f(ID)
    willing: bool = f(Bool())
    amount: int = f(MONEY)  # most this member pays in total (own share + sponsored)
    sponsor: tuple[bytes, ...] = f(List(KEY, 64, unique=True), default=())

    def validate(self) -> None:
        if not self.willing and (self.amount or self.sponsor):
            raise bad("amount", "an unwilling member pledges nothing")


@dataclass(frozen=True)
class MemberUsage(Struct):
    member: bytes = f(KEY)
    bytes_in: int = f(Int(0, 1 << 62))
    bytes_out: int = f(Int(0, 1 << 62))
    segments: int = f(Int(0, 1 << 62))
    active_ms: int = f(Int(0, 1 << 62))


@dataclass(frozen=True)
class Usage(Body):
    """The provider's signed usage summary when a lease ends."""

    KIND = "usage"
    REF = "lease"
    lease: bytes = f(ID)
    members: tuple[MemberUsage, ...] = f(List(Nested(MemberUsage), 256))
    shortfall_ms: int = f(Int(0, 1 << 62))  # time below the minimum rate
    rate_limited: int = f(Int(0, 1 << 62))  # times a member hit the maximum rate
    subcontracts: int = f(Int(0, 1 << 32))


@dataclass(frozen=True)
class Subcontract(Body):
    """A provider records work it handed to another provider, so both can rate it."""

    KIND = "subcontract"
    REF = "lease"
    lease: bytes = f(ID)
    contractor: bytes = f(KEY)
    services: tuple[str, ...] = f(List(SERVICE, 8))
    segments: int = f(Int(0, 1 << 62))
    bytes_in: int = f(Int(0, 1 << 62))
    result_digest: bytes = f(ID)  # sha256 over the ordered result digests


KINDS: dict[str, type[Body]] = {
    cls.KIND: cls
    for cls in (Request, Bid, Commit, Reveal, Award, Payment, Rating, Offer, Pledge, Usage,
                Subcontract)
}


def commitment_hash(request: bytes, price: int, nonce: bytes) -> bytes:
    data = b"bidmesh/commit/v1" + request + price.to_bytes(8, "big") + nonce
    return hashlib.sha256(data).digest()


def considered_digest(ids: list[bytes] | tuple[bytes, ...]) -> bytes:
    return hashlib.sha256(b"bidmesh/considered/v1" + b"".join(sorted(ids))).digest()


# ---------------------------------------------------------------- envelope


@codec.fast_pickle
@dataclass(frozen=True, slots=True)
class Event:
    """A verified event. Construct with `sign_event` or `decode_wire` only."""

    author: bytes
    seq: int
    prev: bytes | None
    ts_ms: int
    kind: str
    body: Body
    signed: bytes
    sig: bytes
    id: bytes

    @property
    def wire(self) -> bytes:
        """`packb([signed, sig])`, put together directly (as `_split_canonical_wire`
        takes it apart): the envelope as bin8/bin16, the 64-byte signature as bin8."""
        n = len(self.signed)
        if len(self.sig) != 64 or n > 0xFFFF:
            return codec.pack([self.signed, self.sig])
        head = b"\x92\xc4" + bytes((n,)) if n < 256 else b"\x92\xc5" + n.to_bytes(2, "big")
        return b"".join((head, self.signed, b"\xc4\x40", self.sig))

    @property
    def ref(self) -> bytes | None:
        return self.body.ref()

    def __repr__(self) -> str:
        return f"Event({self.kind} {self.author.hex()[:8]}#{self.seq} id={self.id.hex()[:12]})"


def _envelope(author: bytes, seq: int, prev: bytes | None, ts_ms: int, body: Body) -> bytes:
    return codec.pack([VERSION, author, seq, prev, ts_ms, body.KIND, body.to_map()])


# Deriving the key pair costs as much as a signature; a node signs with one key.
_keypair = functools.lru_cache(maxsize=16)(nacl.bindings.crypto_sign_seed_keypair)


def sign_event(
    seed_or_sk: bytes, seq: int, prev: bytes | None, ts_ms: int, body: Body, network: str
) -> Event:
    """Sign a body as the next event of the key's chain. `seed_or_sk`: 32-byte seed."""
    pk, sk = _keypair(seed_or_sk)
    if (seq == 1) != (prev is None):
        raise ValueError("prev must be None exactly when seq == 1")
    if not 0 <= ts_ms <= MAX_TS_MS:
        raise ValueError("ts_ms out of range")
    signed = _envelope(pk, seq, prev, ts_ms, body)
    if len(signed) > MAX_SIGNED:
        raise ValueError(f"event is {len(signed)} bytes, limit {MAX_SIGNED}")
    sig = nacl.bindings.crypto_sign(domain_tag(network) + signed, sk)[:64]
    return Event(pk, seq, prev, ts_ms, body.KIND, body, signed, sig,
                 hashlib.sha256(signed).digest())


def decode_wire(
    wire: bytes, network: str, *, tag: bytes | None = None, verify: bool = True
) -> Event:
    """Fully check one wire record; raise InvalidEvent with a precise reason."""
    split = _split_canonical_wire(wire)
    if split is not None:
        return decode_signed(split[0], split[1], network, tag=tag, verify=verify)
    return _decode_general(wire, network, tag, verify)


def decode_stored(wire: bytes, network: str, keys: dict[bytes, bytes] | None = None) -> Event:
    """Decode a record this node's ledger stored, so already checked in full on
    append: neither the signature nor the canonical encoding is checked again (a
    quarter of the decoding; derivation re-reads every stored record on a restart).
    Never for bytes from anywhere else. With `keys`, the author is the one bytes
    object kept there per key (derived state holds an author per event)."""
    split = _split_canonical_wire(wire)
    if split is not None:
        ev = decode_signed(split[0], split[1], network, verify=False, canonical=False)
    else:
        ev = _decode_general(wire, network, None, False)
    if keys is not None:
        author = keys.setdefault(ev.author, ev.author)
        if author is not ev.author:
            # Our own new object, not yet seen by anyone: set in place (a
            # dataclasses.replace per event cost more than the rest of the decode).
            object.__setattr__(ev, "author", author)
    return ev


def _decode_general(wire: bytes, network: str, tag: bytes | None, verify: bool) -> Event:
    # Not the canonical shape: the general decoder finds the precise reason.
    try:
        outer = codec.unpack_canonical(wire, MAX_WIRE)
    except InvalidMessage as e:
        raise InvalidEvent(f"wire record: {e}", e.reason) from e
    if type(outer) is not list or len(outer) != 2:
        raise InvalidEvent("wire record must be [signed, sig]", Reason.MALFORMED)
    signed, sig = outer
    if type(signed) is not bytes or type(sig) is not bytes or len(sig) != 64:
        raise InvalidEvent("wire record must be [bin signed, bin(64) sig]", Reason.MALFORMED)
    return decode_signed(signed, sig, network, tag=tag, verify=verify)


def _split_canonical_wire(wire: bytes) -> tuple[bytes, bytes] | None:
    """(signed, sig) if `wire` is byte for byte `packb([signed, sig])` with a 64-byte sig
    and signed within limits, else None. The hot path: no generic decode, no re-encode."""
    n = len(wire)
    if n < 69 or n > MAX_WIRE or wire[0] != 0x92:
        return None
    h = wire[1]
    if h == 0xC4:  # bin8: always the shortest form for its length
        size, off = wire[2], 3
    elif h == 0xC5:  # bin16: canonical only for lengths >= 256
        size, off = (wire[2] << 8) | wire[3], 4
        if size < 256:
            return None
    else:
        return None
    end = off + size
    if end + 66 != n or wire[end] != 0xC4 or wire[end + 1] != 64:
        return None
    return wire[off:end], wire[end + 2:]


_UINT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # msgpack uint 8/16/32/64 headers


def peek_chain_position(wire: bytes) -> tuple[bytes, int, bytes] | None:
    """(author, seq, signed) read straight from the bytes of a wire record in the
    canonical shape (docs/PROTOCOL.md: `[bin signed, bin(64) sig]`, the envelope a
    7-array starting `1, bin(32) author, seq`), without decoding it; None for any
    other shape. Nothing here is checked: use it only to find a stored record to
    compare with."""
    split = _split_canonical_wire(wire) if type(wire) is bytes else None
    if split is None:
        return None
    signed = split[0]
    if len(signed) < 37 or signed[:4] != b"\x97\x01\xc4\x20":
        return None
    b = signed[36]
    if b < 0x80:
        return signed[4:36], b, signed
    width = _UINT_WIDTH.get(b)
    if width is None or len(signed) < 37 + width:
        return None
    return signed[4:36], int.from_bytes(signed[37:37 + width], "big"), signed


def decode_signed(
    signed: bytes, sig: bytes, network: str, *, tag: bytes | None = None, verify: bool = True,
    canonical: bool = True,
) -> Event:
    """Check an envelope; `verify=False` (and `canonical=False`) only for bytes we
    stored after checking them."""
    if len(signed) > MAX_SIGNED:
        raise InvalidEvent(f"event is {len(signed)} bytes, limit {MAX_SIGNED}", Reason.OVERSIZED)
    try:
        env = (codec.unpack_canonical(signed, MAX_SIGNED) if canonical
               else codec.unpack(signed, MAX_SIGNED))
    except InvalidMessage as e:
        raise InvalidEvent(f"envelope: {e}", e.reason) from e
    if type(env) is not list or len(env) != 7:
        raise InvalidEvent("envelope must be a 7-element array", Reason.MALFORMED)
    v, author, seq, prev, ts_ms, kind, body = env
    if v != VERSION or type(v) is not int:
        raise InvalidEvent(f"unsupported version {v!r}", Reason.BAD_VERSION)
    if type(author) is not bytes or len(author) != 32:
        raise InvalidEvent("author must be 32 bytes", Reason.MALFORMED)
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise InvalidEvent("seq must be an integer >= 1", Reason.MALFORMED)
    if seq == 1:
        if prev is not None:
            raise InvalidEvent("seq 1 must have nil prev", Reason.BAD_CHAIN)
    elif type(prev) is not bytes or len(prev) != 32:
        raise InvalidEvent("prev must be a 32-byte id when seq > 1", Reason.BAD_CHAIN)
    if type(ts_ms) is not int or not 0 <= ts_ms <= MAX_TS_MS:
        raise InvalidEvent("ts_ms out of range", Reason.MALFORMED)
    if type(kind) is not str:
        raise InvalidEvent("kind must be a string", Reason.MALFORMED)
    cls = KINDS.get(kind)
    if cls is None:
        raise InvalidEvent(f"unknown event kind {kind[:32]!r}", Reason.UNKNOWN_KIND)
    # Signature before schema: an unsigned body is not worth a precise schema error.
    if verify:
        try:
            nacl.bindings.crypto_sign_open(sig + (tag or domain_tag(network)) + signed, author)
        except (nacl.exceptions.BadSignatureError, ValueError) as e:
            raise InvalidEvent("signature does not verify", Reason.BAD_SIGNATURE) from e
    parsed = cls.from_map(body)
    return Event(author, seq, prev, ts_ms, kind, parsed, signed, sig,
                 hashlib.sha256(signed).digest())


def event_to_json(ev: Event) -> dict[str, Any]:
    """A JSON-safe view (bytes as hex) for CLI and HTTP output."""
    return {
        "id": ev.id.hex(),
        "author": ev.author.hex(),
        "seq": ev.seq,
        "prev": ev.prev.hex() if ev.prev else None,
        "ts_ms": ev.ts_ms,
        "kind": ev.kind,
        "body": jsonable(ev.body.to_map()),
    }


def jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v
