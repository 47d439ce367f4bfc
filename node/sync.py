"""Pull anti-entropy: the sync protocol's messages and its serving side.

Gossip is best effort; this is what makes convergence certain. A session runs
against one peer over the request/response protocol `/bidmesh/<network>/sync/1`:

1. DIGEST: compare state digests; equal means nothing to do.
2. HEADS (paged by author, ascending): the peer's effective head per author
   `(seq, id)` and the lowest seq at which it holds a fork proof for that author.
3. For every author the peer is ahead on: RANGE requests from our head (one record
   of overlap, so a diverging branch shows up as a fork proof rather than as a chain
   error), paged by count and bytes, until we reach the peer's head. For every
   author the peer holds an earlier fork proof for: FORKS.

The asking side, `SyncSession` (a sans-I/O state machine) and `drive()`, is
node/sync_session.py. `serve()` here answers a peer's request from the local ledger.

Every message is a msgpack array whose first element is a tag; every decoder
bounds the input size and rejects malformed input with `InvalidMessage`.
"""

from __future__ import annotations

import bisect
import itertools
import weakref
from dataclasses import dataclass

from . import recon, schema
from .errors import InvalidMessage, Reason
from .events import MAX_SEQ, MAX_WIRE
from .ledger import AppendResult, Ledger
from .schema import Bool, Bytes, Fixed, Int, List, Nested, Opt, Str, f

# ------------------------------------------------------------------ limits

MAX_REQUEST = 1024  # bytes; every request is tiny
MAX_RESPONSE = 2 * 1024 * 1024  # bytes; bounds every response below
HEADS_PAGE_MAX = 1024  # authors per HEADS page (~85 bytes each)
RANGE_LIMIT_MAX = 512  # records per RANGE response
RANGE_BYTES_MAX = 1024 * 1024  # record bytes per RANGE response (one record may exceed)
FORKS_MAX = 8  # fork proofs per FORKS response (lowest seqs first)

# Chain rejections an honest relayer can cause when an author equivocated: the
# relayer holds the other branch. They cost the author, not the sender.
CHAIN_REASONS = frozenset({Reason.PREV_MISMATCH, Reason.TS_REGRESS, Reason.BAD_CHAIN})


MAX_REQUEST_V2 = 16 * 1024  # bytes; RECON and FETCH list nodes and authors
FETCH_ENTRIES_MAX = 128  # authors per FETCH request
SKIP_ID_BYTES = 16  # id prefix a FETCH entry names our head by


def protocol_id(network: str, version: int = 1) -> str:
    """`/sync/1` (HEADS paging) or `/sync/2` (adds RECON and FETCH: node/sync_recon.py)."""
    return f"/bidmesh/{network}/sync/{version}"


def counts_against_peer(res: AppendResult) -> bool:
    """Whether a rejection says the sender is faulty (for per-peer accounting)."""
    return res.peer_fault and res.reason not in CHAIN_REASONS


# ------------------------------------------------------------------ messages
#
# Declared with node/schema.py: each message is a `Row` sent as `[TAG, field...]`;
# `decode_request` / `decode_response` bound the size and reject anything that does
# not match the declaration with `InvalidMessage` (reason "malformed").

Message = schema.Message
AUTHOR = Bytes(32)
ID = Bytes(32)
SEQ = Int(0, MAX_SEQ)
RECORD = Bytes(1, MAX_WIRE)  # one event's wire bytes


@dataclass(frozen=True)
class DigestRequest(Message):
    TAG = 1


@dataclass(frozen=True)
class DigestResponse(Message):
    TAG = 1
    digest: bytes = f(ID)
    authors: int = f(SEQ)
    forks: int = f(SEQ)


@dataclass(frozen=True)
class HeadsRequest(Message):
    """Heads of authors strictly after `after` (byte order), at most `limit`."""

    TAG = 2
    after: bytes | None = f(Opt(AUTHOR))
    limit: int = f(Int(1, HEADS_PAGE_MAX))


@dataclass(frozen=True)
class HeadEntry(schema.Row):
    author: bytes = f(AUTHOR)
    seq: int = f(SEQ)  # effective head: truncated before the author's first fork
    id: bytes | None = f(Opt(ID))  # None only when seq == 0 (forked at seq 1)
    fork_seq: int | None = f(Opt(Int(1, MAX_SEQ)))  # lowest seq with a fork proof, if any

    def validate(self) -> None:
        if (self.id is None) != (self.seq == 0):
            raise self.reject("id", "must be nil exactly when seq is 0")
        if self.fork_seq is not None and self.seq != self.fork_seq - 1:
            raise self.reject("fork_seq", "a forked author's head must be just before its fork")


@dataclass(frozen=True)
class HeadsResponse(Message):
    TAG = 2
    heads: tuple[HeadEntry, ...] = f(List(Nested(HeadEntry), HEADS_PAGE_MAX))
    more: bool = f(Bool())

    def validate(self) -> None:
        authors = [h.author for h in self.heads]
        if any(a >= b for a, b in itertools.pairwise(authors)):
            raise self.reject("heads", "must be in strictly ascending author order")


@dataclass(frozen=True)
class RangeRequest(Message):
    TAG = 3
    author: bytes = f(AUTHOR)
    from_seq: int = f(Int(1, MAX_SEQ))
    limit: int = f(Int(1, RANGE_LIMIT_MAX))
    max_bytes: int = f(Int(1, RANGE_BYTES_MAX))


@dataclass(frozen=True)
class RangeResponse(Message):
    """Consecutive wire records of one author from `from_seq`; `more` if cut short."""

    TAG = 3
    records: tuple[bytes, ...] = f(List(RECORD, RANGE_LIMIT_MAX))
    more: bool = f(Bool())

    def validate(self) -> None:
        if sum(len(r) for r in self.records) > RANGE_BYTES_MAX + MAX_WIRE:
            raise self.reject("records", "exceed the byte limit")


@dataclass(frozen=True)
class ForksRequest(Message):
    TAG = 4
    author: bytes = f(AUTHOR)


@dataclass(frozen=True)
class ForksResponse(Message):
    """Fork proofs for one author, lowest seq first: pairs of conflicting wires."""

    TAG = 4
    proofs: tuple[tuple[bytes, bytes], ...] = f(List(Fixed(RECORD, RECORD), FORKS_MAX))


@dataclass(frozen=True)
class ErrorResponse(Message):
    TAG = 0
    code: str = f(Str(32, 1))
    message: str = f(Str(512))


# ---- /sync/2 only: set reconciliation (node/recon.py) and batched fetching


@dataclass(frozen=True)
class ReconNode(schema.Row):
    """A trie node: the authors whose first `bits` bits are `prefix` (left-aligned in
    ceil(bits/8) bytes, unused low bits zero)."""

    bits: int = f(Int(0, recon.KEY_BITS))
    prefix: bytes = f(Bytes(0, recon.KEY_BITS // 8))

    def validate(self) -> None:
        if recon.node_from_bytes(self.prefix, self.bits) is None:
            raise self.reject("prefix", "must be ceil(bits/8) bytes with the unused bits zero")

    @property
    def key(self) -> tuple[int, int]:
        """(prefix as an integer, bits)."""
        return recon.node_from_bytes(self.prefix, self.bits) or 0, self.bits


@dataclass(frozen=True)
class ReconRequest(Message):
    """Summaries of `nodes` (disjoint, ascending), each split into 2^split children."""

    TAG = 5
    salt: bytes = f(Bytes(recon.SALT_BYTES))
    split: int = f(Int(1, recon.SPLIT_MAX))
    nodes: tuple[ReconNode, ...] = f(List(Nested(ReconNode), recon.NODES_MAX, lo=1))

    def validate(self) -> None:
        keys = [n.key for n in self.nodes]
        problem = recon.check_disjoint(keys)
        if problem:
            raise self.reject("nodes", problem)
        if max(bits for _, bits in keys) + self.split > recon.KEY_BITS:
            raise self.reject("split", "a node cannot be split below a full key")


@dataclass(frozen=True)
class ReconAnswer(schema.Row):
    """One node: split (`counts` of its 2^split children, `fps` the fingerprints of
    the non-empty ones, concatenated) or, when it holds at most LEAF_ITEMS items,
    those `items` (then `counts` and `fps` are empty)."""

    counts: tuple[int, ...] = f(List(SEQ, 1 << recon.SPLIT_MAX))
    fps: bytes = f(Bytes(0, recon.FP_BYTES << recon.SPLIT_MAX))
    items: tuple[HeadEntry, ...] = f(List(Nested(HeadEntry), recon.LEAF_ITEMS))

    def validate(self) -> None:
        if self.items and (self.counts or self.fps):
            raise self.reject("items", "an answer is either a split or items")
        if sum(1 for c in self.counts if c) * recon.FP_BYTES != len(self.fps):
            raise self.reject("fps", "one fingerprint per non-empty child")


@dataclass(frozen=True)
class ReconResponse(Message):
    TAG = 5
    answers: tuple[ReconAnswer, ...] = f(List(Nested(ReconAnswer), recon.NODES_MAX))


@dataclass(frozen=True)
class FetchEntry(schema.Row):
    """Records of `author` from `from_seq` on; the first is left out when its id
    starts with `skip_id` (our head: sent only if the peer's differs, i.e. a fork).
    A 16-byte prefix: two events with one prefix cost 2^64 work to make."""

    author: bytes = f(AUTHOR)
    from_seq: int = f(Int(1, MAX_SEQ))
    skip_id: bytes | None = f(Opt(Bytes(SKIP_ID_BYTES)))


@dataclass(frozen=True)
class FetchRequest(Message):
    TAG = 6
    entries: tuple[FetchEntry, ...] = f(List(Nested(FetchEntry), FETCH_ENTRIES_MAX, lo=1))
    limit: int = f(Int(1, RANGE_LIMIT_MAX))
    max_bytes: int = f(Int(1, RANGE_BYTES_MAX))

    def validate(self) -> None:
        if any(a.author >= b.author for a, b in itertools.pairwise(self.entries)):
            raise self.reject("entries", "must be in strictly ascending author order")


@dataclass(frozen=True)
class FetchResponse(Message):
    """One list of records per entry, in order, until `limit` or `max_bytes` ran out
    (one record may exceed it): entries past the end of the list were not reached."""

    TAG = 6
    records: tuple[tuple[bytes, ...], ...] = f(
        List(List(RECORD, RANGE_LIMIT_MAX), FETCH_ENTRIES_MAX))

    def validate(self) -> None:
        if sum(len(r) for r in self.records) > RANGE_LIMIT_MAX:
            raise self.reject("records", f"at most {RANGE_LIMIT_MAX} records in all")
        if sum(len(w) for r in self.records for w in r) > RANGE_BYTES_MAX + MAX_WIRE:
            raise self.reject("records", "exceed the byte limit")


SyncRequest = (DigestRequest | HeadsRequest | RangeRequest | ForksRequest | ReconRequest
               | FetchRequest)
SyncResponse = (DigestResponse | HeadsResponse | RangeResponse | ForksResponse | ErrorResponse
                | ReconResponse | FetchResponse)
REQUESTS = schema.Messages("sync", "request", MAX_REQUEST,
                           DigestRequest, HeadsRequest, RangeRequest, ForksRequest)
RESPONSES = schema.Messages("sync", "response", MAX_RESPONSE, ErrorResponse,
                            DigestResponse, HeadsResponse, RangeResponse, ForksResponse)
REQUESTS_V2 = schema.Messages("sync", "request", MAX_REQUEST_V2, DigestRequest, HeadsRequest,
                              RangeRequest, ForksRequest, ReconRequest, FetchRequest)
RESPONSES_V2 = schema.Messages("sync", "response", MAX_RESPONSE, ErrorResponse,
                               DigestResponse, HeadsResponse, RangeResponse, ForksResponse,
                               ReconResponse, FetchResponse)


def decode_request(data: bytes, version: int = 1) -> SyncRequest:
    decoder = REQUESTS_V2 if version == 2 else REQUESTS
    return decoder.decode(data)  # type: ignore[return-value]  # one of the classes above


def decode_response(data: bytes, version: int = 1) -> SyncResponse:
    decoder = RESPONSES_V2 if version == 2 else RESPONSES
    return decoder.decode(data)  # type: ignore[return-value]  # one of the classes above


# ------------------------------------------------------------------ server side


@dataclass(frozen=True)
class HeadsSnapshot:
    """`ledger.sync_heads()` with its authors sorted, and the fork map, as of `digest`."""

    digest: bytes
    heads: dict[bytes, tuple[int, bytes | None]]
    authors: list[bytes]
    forked: dict[bytes, int]


_snapshots: weakref.WeakKeyDictionary[Ledger, HeadsSnapshot] = weakref.WeakKeyDictionary()


def heads_snapshot(ledger: Ledger) -> HeadsSnapshot:
    """Heads as of the ledger's current digest, rebuilt only when that changed.

    Building one costs O(authors log authors) (~90 ms at 20,000 authors on a loaded
    2-core machine); per HEADS page, that let a peer paging our authors (or a fresh
    node pulling them) cost O(authors) each, and our own session the same per page
    it received. The digest covers every effective head and fork, so an equal
    digest means an equal snapshot."""
    digest = ledger.digest()
    snap = _snapshots.get(ledger)
    if snap is None or snap.digest != digest:
        heads = ledger.sync_heads()
        snap = HeadsSnapshot(digest, heads, sorted(heads), ledger.forked())
        _snapshots[ledger] = snap
    return snap


def serve(ledger: Ledger, req: SyncRequest, version: int = 1) -> SyncResponse:
    """Answer one request from the local ledger (cheap, bounded work). `/sync/2`
    answers HEADS from the reconciliation index (no snapshot to sort)."""
    if isinstance(req, ReconRequest):
        return _serve_recon(ledger, req)
    if isinstance(req, FetchRequest):
        return _serve_fetch(ledger, req)
    if isinstance(req, HeadsRequest) and version == 2:
        index = ledger.recon_index()
        page, more = index.page(req.after, req.limit)
        return HeadsResponse(tuple(HeadEntry(a, *it) for a in page
                                   if (it := index.item_of(a)) is not None), more)
    if isinstance(req, DigestRequest):
        snap = heads_snapshot(ledger)
        return DigestResponse(snap.digest, len(snap.heads), len(snap.forked))
    if isinstance(req, HeadsRequest):
        snap = heads_snapshot(ledger)
        start = 0 if req.after is None else bisect.bisect_right(snap.authors, req.after)
        page = snap.authors[start:start + req.limit]
        sh, forked = snap.heads, snap.forked
        heads = tuple(HeadEntry(a, *sh[a], _fork_seq(sh[a][0], forked.get(a))) for a in page)
        return HeadsResponse(heads, start + len(page) < len(snap.authors))
    if isinstance(req, RangeRequest):
        wires = ledger.range(req.author, req.from_seq, req.limit + 1)
        out: list[bytes] = []
        size = 0
        for w in wires[: req.limit]:
            if out and size + len(w) > req.max_bytes:
                break
            out.append(w)
            size += len(w)
        return RangeResponse(tuple(out), len(wires) > len(out))
    proofs = ledger.fork_proofs(req.author)[:FORKS_MAX]
    return ForksResponse(tuple((p.wire_a, p.wire_b) for p in proofs))


def _serve_recon(ledger: Ledger, req: ReconRequest) -> ReconResponse:
    return serve_recon_index(ledger.recon_index(), req)


def serve_recon_index(index: recon.ReconIndex, req: ReconRequest) -> ReconResponse:
    """The RECON answer from an index (pure; the test vectors use it without a ledger)."""
    out = []
    for node in req.nodes:
        prefix, bits = node.key
        ans = recon.answer(index, prefix, bits, req.split, req.salt)
        if isinstance(ans, recon.Items):
            out.append(ReconAnswer((), b"", tuple(HeadEntry(a, *it) for a, it in ans.items)))
        else:
            out.append(ReconAnswer(ans.counts, b"".join(ans.fps), ()))
    return ReconResponse(tuple(out))


def _serve_fetch(ledger: Ledger, req: FetchRequest) -> FetchResponse:
    out: list[tuple[bytes, ...]] = []
    n = size = 0
    for e in req.entries:
        if n >= req.limit or size >= req.max_bytes:
            break  # the rest are not reached
        start = e.from_seq
        if e.skip_id is not None and (
                (ledger.id_at(e.author, start) or b"")[:SKIP_ID_BYTES] == e.skip_id):
            start += 1
        recs: list[bytes] = []
        full = False
        for w in ledger.range(e.author, start, req.limit - n):
            if n and size + len(w) > req.max_bytes:
                full = True
                break
            recs.append(w)
            n += 1
            size += len(w)
        if full and not recs:
            break  # no room for this one: not reached (an empty list says "nothing")
        out.append(tuple(recs))
        if full:
            break
    return FetchResponse(tuple(out))


def _fork_seq(seq: int, fork_seq: int | None) -> int | None:
    """A HEADS entry names a fork only at its truncation point; a fork proof we hold
    above our own chain (fetched before the chain caught up) is announced later."""
    return fork_seq if fork_seq is not None and seq == fork_seq - 1 else None


def handle(ledger: Ledger, data: bytes, version: int = 1) -> bytes:
    """Decode, serve and encode; invalid requests get an ERROR response."""
    try:
        req = decode_request(data, version)
    except InvalidMessage as e:
        return ErrorResponse(e.reason[:32], str(e)[:512]).encode()
    return serve(ledger, req, version).encode()
