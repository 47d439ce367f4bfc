"""Pull anti-entropy: the sync protocol's messages and a sans-I/O session.

Gossip is best effort; this is what makes convergence certain. A session runs
against one peer over the request/response protocol `/bidmesh/<network>/sync/1`:

1. DIGEST: compare state digests; equal means nothing to do.
2. HEADS (paged by author, ascending): the peer's effective head per author
   `(seq, id)` and the lowest seq at which it holds a fork proof for that author.
3. For every author the peer is ahead on: RANGE requests from our head (one record
   of overlap, so a diverging branch shows up as a fork proof rather than as a chain
   error), paged by count and bytes, until we reach the peer's head. For every
   author the peer holds an earlier fork proof for: FORKS.

A session is a small state machine (`next_request` / `on_response`) over a real
`Ledger`: it decides what to ask, appends what arrives, and never touches the
network. `drive()` runs it with any async `send` callable, which is how both the
libp2p shell (node/gossip.py) and the fake network in tests use it. `serve()`
answers a peer's request from the local ledger.

Every message is a msgpack array whose first element is a tag; every decoder
bounds the input size and rejects malformed input with `InvalidMessage`.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from . import recon, schema
from .errors import InvalidEvent, InvalidMessage, Reason
from .events import MAX_SEQ, MAX_WIRE, Event, decode_wire
from .ledger import AppendResult, Ledger, Status
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


# ------------------------------------------------------------------ client side


@dataclass(frozen=True)
class SyncLimits:
    """Page sizes we ask for, and the local bounds of one session (a peer's answers
    decide nothing about them; see `SyncSession`)."""

    heads_page: int = 512
    range_limit: int = 256
    range_bytes: int = 512 * 1024
    max_requests: int = 10_000  # per session; a longer catch-up continues in the next
    session_s: float = 300.0  # wall time of one session (needs a clock)
    stall_s: float = 30.0  # longest stretch without a stored event or fork proof (clock)
    idle_pages: int = 16  # answers that bring nothing new, per session
    slow_s: float = 5.0  # a slower RANGE answer must bring half a page to count (clock)


@dataclass
class _Want:
    author: bytes
    target: int  # fetch until our stored head reaches this seq
    forks: bool = False  # fetch fork proofs instead of a range
    probe: bool = False  # fetch just the record at `target` (same height, other id)
    started: bool = False


@dataclass
class SessionStats:
    requests: int = 0
    records: int = 0
    bytes: int = 0
    accepted: int = 0
    fork_proofs: int = 0
    skipped_live: int = 0  # authors left to gossip (see `live_after_ms`)
    idle: int = 0  # answers that brought nothing new (beyond the free HEADS pages)
    thin: int = 0  # slow RANGE answers with less than half a page of new events
    faults: collections.Counter[str] = field(default_factory=collections.Counter)


class SyncSession:
    """One anti-entropy exchange with one peer, as a state machine.

    Call `next_request()`; send it; feed the answer to `on_response()`; repeat until
    `next_request()` returns None. `accepted` collects events newly stored (to
    re-gossip); `stats.faults` counts the peer's invalid input by reason; a fault
    also ends the session (`failed`). `gaps=` skips DIGEST/HEADS and fetches the
    given (author, first, last) ranges at once. With `live_after_ms`, an author
    whose newest event we hold is timestamped at or after it is left to gossip:
    its events are flowing, and what the peer has beyond ours is most likely in
    flight (fetching it too would double the work under load). A lost tail shows
    up once our head for that author grows older; a lost batch in the middle is a
    gap, fetched by a `gaps=` session.

    Local bounds (`SyncLimits`; a peer cannot widen them): at most `max_requests`
    requests and, given a `clock`, `session_s` seconds; a session ends `stalled` when
    nothing new was stored for `stall_s` seconds (answers just under the request
    timeout, endless pages; a RANGE answer slower than `slow_s` that stores less
    than half a page does not count as news: a trickle) or when more than
    `idle_pages` answers brought nothing
    new (an empty or already-held RANGE, a FORKS without a new proof, a HEADS page
    that names no author we lack, beyond the pages our own authors can fill).
    `cut` says which bound ended it; `stalled` marks the peer as the cause (the
    shell backs off from it); a session cut by `max_requests` or `session_s` while
    making progress is not the peer's fault, and the next session continues.
    """

    def __init__(
        self,
        ledger: Ledger,
        limits: SyncLimits | None = None,
        *,
        gaps: list[tuple[bytes, int, int]] | None = None,
        live_after_ms: int | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.started_at = clock() if clock else 0.0
        self.progress_at = self.started_at  # last time something new was stored
        self.cut: str | None = None  # the local bound that ended the session
        self._free_heads: int | None = None  # HEADS pages without news that are not idle
        self._news = False  # an event or fork proof was stored
        self._sent_at = 0.0  # when the outstanding request went out (clock)
        self._slow = False  # the answer being handled came after slow_s
        self.live_after_ms = live_after_ms
        self.limits = limits or SyncLimits()
        self.stats = SessionStats()
        self.accepted: list[Event] = []
        self.failed: str | None = None
        self.in_sync = False  # digests were equal at the start
        self._wants: collections.deque[_Want] = collections.deque()
        self._cursor: bytes | None = None
        self._heads_more = True
        self._pending: SyncRequest | None = None
        if gaps is None:
            self._phase = "digest"
        else:
            self._phase = "heads_done"
            for author, first, last in gaps:
                self._wants.append(_Want(author, last))
                del first  # we always fetch from our own head: it is where the gap starts

    @property
    def done(self) -> bool:
        return self._phase == "done"

    @property
    def stalled(self) -> bool:
        """The peer kept the session busy without bringing anything new."""
        return self.cut in ("stalled", "idle")

    @property
    def progressed(self) -> bool:
        """Something new was stored (or we were already in sync)."""
        return self.in_sync or self._news

    def _end(self, cut: str, why: str) -> None:
        self.cut = cut
        if self.stalled or not self.progressed:
            self.failed = why
        self._phase = "done"

    def next_request(self) -> SyncRequest | None:
        if self._pending is not None:
            raise RuntimeError("next_request() called before on_response()")
        req = self._next()
        if req is None:
            self._phase = "done"
            self._pending = None
            return None
        now = self.clock() if self.clock else 0.0
        lim = self.limits
        if self.stats.requests >= lim.max_requests:
            self._end("requests", f"request budget of {lim.max_requests} exhausted")
        elif self.clock and now - self.progress_at >= lim.stall_s:
            self._end("stalled", f"nothing new for {now - self.progress_at:.1f} s")
        elif self.clock and now - self.started_at >= lim.session_s:
            self._end("time", f"session time limit of {lim.session_s:g} s")
        else:
            self.stats.requests += 1
            self._pending = req
            self._sent_at = now
            return req
        return None

    def _progress(self, substantial: bool = True) -> None:
        self._news = True
        if not substantial:
            self.stats.thin += 1
        elif self.clock:
            self.progress_at = self.clock()

    def _idle(self, what: str) -> bool:
        """Count an answer that brought nothing new; True when that ends the session."""
        self.stats.idle += 1
        if self.stats.idle > self.limits.idle_pages:
            self._end("idle", f"{self.stats.idle} answers brought nothing new (last: {what})")
            return True
        return False

    def _next(self) -> SyncRequest | None:
        if self._phase == "done" or self.failed:
            return None
        if self._phase == "digest":
            return DigestRequest()
        while self._wants:
            w = self._wants[0]
            req = self._want_request(w)
            if req is not None:
                return req
            self._wants.popleft()
        if self._phase == "heads":
            if self._heads_more:
                return HeadsRequest(self._cursor, self.limits.heads_page)
            self._phase = "heads_done"
        return None

    def _want_request(self, w: _Want) -> SyncRequest | None:
        if w.forks:
            return None if w.started else ForksRequest(w.author)
        forked_at = self.ledger.forked().get(w.author)
        if w.probe:
            if w.started or forked_at is not None:
                return None
            return RangeRequest(w.author, w.target, 1, self.limits.range_bytes)
        head = self.ledger.head(w.author)
        have = head.seq if head else 0
        target = w.target if forked_at is None else min(w.target, forked_at - 1)
        if have >= target:
            return None
        # First request: one record of overlap, so a diverging branch arrives as a
        # fork proof rather than as a chain error.
        from_seq = have + 1 if w.started else max(1, have)
        return RangeRequest(w.author, from_seq, self.limits.range_limit, self.limits.range_bytes)

    def on_response(self, resp: SyncResponse | None) -> None:
        """Feed the answer to the last request; None means it was lost or timed out."""
        req, self._pending = self._pending, None
        if req is None:
            raise RuntimeError("on_response() without an outstanding request")
        self._slow = (self.clock is not None
                      and self.clock() - self._sent_at > self.limits.slow_s)
        if resp is None:
            self.failed = "no response"
            return
        if isinstance(resp, ErrorResponse):
            self.failed = f"peer error {resp.code}: {resp.message}"
            return
        self._on_answer(req, resp)

    def _on_answer(self, req: SyncRequest, resp: SyncResponse) -> None:
        if isinstance(req, DigestRequest) and isinstance(resp, DigestResponse):
            if resp.digest == self.ledger.digest():
                self.in_sync = True
                self._progress()
                self._phase = "done"
            else:
                self._phase = "heads"
        elif isinstance(req, HeadsRequest) and isinstance(resp, HeadsResponse):
            self._on_heads(req, resp)
        elif isinstance(req, RangeRequest) and isinstance(resp, RangeResponse):
            self._on_range(req, resp)
        elif isinstance(req, ForksRequest) and isinstance(resp, ForksResponse):
            self._on_forks(req, resp)
        else:
            self._fault(Reason.WRONG_RESPONSE, f"{type(resp).__name__} to {type(req).__name__}")

    def _store(self, records: Sequence[bytes]) -> tuple[int, bool]:
        """Append an answer's records: (events accepted, whether one showed a fork).
        A peer's fault is charged unless it is a chain error that follows its fork."""
        forked = False
        new = 0
        for res in self.ledger.append_many(records):
            self.accepted.extend(res.accepted)
            new += len(res.accepted)
            self.stats.accepted += len(res.accepted)
            if res.status is Status.FORK:
                forked = True
            elif res.peer_fault and not (forked and res.reason in CHAIN_REASONS):
                self._fault(res.reason or "rejected", res.detail)
        return new, forked

    def _fault(self, reason: str, detail: str) -> None:
        self.stats.faults[reason] += 1
        self.failed = f"{reason}: {detail}"

    def _on_heads(self, req: HeadsRequest, resp: HeadsResponse) -> None:
        if len(resp.heads) > req.limit or any(
            req.after is not None and h.author <= req.after for h in resp.heads
        ):
            self._fault(Reason.BAD_PAGE, "HEADS page outside the requested window")
            return
        self._heads_more = resp.more and bool(resp.heads)
        if resp.heads:
            self._cursor = resp.heads[-1].author
        snap = heads_snapshot(self.ledger)
        local, forked = snap.heads, snap.forked
        if self._free_heads is None:
            # An honest peer's pages without news cover authors we hold at the same
            # head: at most our author count / page size of them (plus a short one).
            self._free_heads = len(local) // max(1, req.limit) + 1
        wants = len(self._wants)
        skipped = self.stats.skipped_live
        self._heads_page(resp, local, forked)
        if len(self._wants) == wants and self.stats.skipped_live == skipped:
            if self._free_heads > 0:
                self._free_heads -= 1
            else:
                self._idle("a HEADS page naming no author we lack")

    def _heads_page(self, resp: HeadsResponse, local: dict[bytes, tuple[int, bytes | None]],
                    forked: dict[bytes, int]) -> None:
        for h in resp.heads:
            self._consider(h, *local.get(h.author, (0, None)), forked.get(h.author))

    def _consider(self, h: HeadEntry, seq: int, id_: bytes | None,
                  mine_fork: int | None) -> None:
        """Want what the peer's entry `h` has beyond ours (`seq`, `id_`, `mine_fork`)."""
        if h.fork_seq is not None and (mine_fork is None or h.fork_seq < mine_fork):
            self._wants.append(_Want(h.author, 0, forks=True))
        if h.seq > seq:
            if self.live_after_ms is not None and seq > 0:
                mine = self.ledger.head(h.author)
                if mine is not None and mine.ts_ms >= self.live_after_ms:
                    self.stats.skipped_live += 1
                    return
            self._wants.append(_Want(h.author, h.seq))
        elif h.seq == seq and h.seq > 0 and h.id != id_ and mine_fork is None:
            # Same height, different event: fetch it; the ledger records the fork.
            self._wants.append(_Want(h.author, h.seq, probe=True))

    def _on_range(self, req: RangeRequest, resp: RangeResponse) -> None:
        w = self._wants[0]
        w.started = True
        if len(resp.records) > req.limit:
            self._fault(Reason.BAD_PAGE, "RANGE response longer than requested")
            return
        self.stats.records += len(resp.records)
        self.stats.bytes += sum(len(r) for r in resp.records)
        before = self.ledger.head(w.author)
        new, forked = self._store(resp.records)
        if self.failed:
            return
        after = self.ledger.head(w.author)
        if forked or after != before:
            # A slow answer with a few events: a trickle keeps no session alive.
            self._progress(forked or not self._slow or 2 * new >= req.limit)
        elif self._idle("a RANGE answer with nothing new"):
            return
        if forked or w.probe or not resp.records or after == before:
            # Done, or nothing more to gain from this peer for this author this round
            # (records we already had, e.g. gossip delivered them meanwhile).
            self._wants.popleft()

    def _on_forks(self, req: ForksRequest, resp: ForksResponse) -> None:
        self._wants[0].started = True
        added = False
        for a, b in resp.proofs:
            try:
                ea, eb = decode_wire(a, self.ledger.network), decode_wire(b, self.ledger.network)
            except InvalidEvent as e:
                self._fault(Reason.BAD_FORK_PROOF, str(e))
                return
            if ea.author != req.author or eb.author != ea.author or ea.seq != eb.seq or (
                ea.id == eb.id
            ):
                self._fault(Reason.BAD_FORK_PROOF,
                            "records are not two events at one (author, seq)")
                return
            if self.ledger.add_fork_proof(a, b):
                self.stats.fork_proofs += 1
                added = True
        if added:
            self._progress()
        else:
            self._idle("a FORKS answer without a new proof")


async def drive(
    session: SyncSession,
    send: Callable[[SyncRequest], Awaitable[SyncResponse | None]],
) -> SyncSession:
    """Run a session to the end with `send` (returns None for a lost request)."""
    while (req := session.next_request()) is not None:
        session.on_response(await send(req))
    return session
