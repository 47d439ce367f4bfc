"""The query protocol between light clients and nodes, and the node's side of it.

Request/response over `/bidmesh/<network>/query/1` (`p2p.serve_requests`): one
request frame, one response frame. Every message is a msgpack array whose first
element is an integer tag; decoders bound the size and raise `InvalidMessage` on
anything malformed (the requester then sees `RequestRefused` with the reason).

Answers carry events as their exact wire records, never derived state: a light
client verifies every signature and re-derives auctions, leases and reputation
itself with the same pure `Market` fold (node/client.py). A node can therefore lie
only by omission, which a client talking to several nodes detects by comparing the
sets it gets back.

Paging: every query that returns events takes `after` (an arrival cursor, 0 for
the start), `limit` (records) and `max_bytes` (record bytes; one record may exceed
it so that progress is always made). The answer's `cursor` is passed as `after` to
get the next page; `more` says whether there is one. Cursors are the node's local
arrival order: they mean nothing to another node. Events of an author from the
seq of a fork proof on are never returned (they count for nothing anywhere).

The node side: `QueryService(ledger, view, submit, network)`, `register(host)`.
The messages and their limits are specified in docs/PROTOCOL.md ("Query protocol").
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from . import codec
from .auction import Market
from .budget import KeyedBuckets, MultiBudget
from .errors import InvalidMessage, RateLimited
from .events import KINDS, MAX_WIRE, NETWORK_RE
from .ledger import AppendResult, Ledger, Status
from .marketview import LiveMarket, MarketView

if TYPE_CHECKING:  # p2p pulls in libp2p (~1 s): only the node side needs it
    from . import p2p

log = logging.getLogger("bidmesh.query")

# ------------------------------------------------------------------ limits

MAX_IDS = 256  # ids per GET request, authors per HEADS request
MAX_KEYS = 64  # keys per REPUTATION request
MAX_SUBMIT = 16  # records per SUBMIT request
MAX_LIMIT = 1024  # records per page
MAX_PAGE_BYTES = 1024 * 1024  # record bytes per page (one record may exceed it)
MIN_PAGE_BYTES = 1024
MAX_REQUEST = MAX_SUBMIT * (MAX_WIRE + 8) + 1024
MAX_RESPONSE = MAX_PAGE_BYTES + MAX_WIRE + 64 * 1024
MAX_CURSOR = (1 << 63) - 1
MAX_SEQ = (1 << 53) - 1
DEFAULT_LIMIT = 512
DEFAULT_PAGE_BYTES = 512 * 1024
KIND_NAMES = frozenset(KINDS)


def protocol_id(network: str) -> str:
    return f"/bidmesh/{network}/query/1"


# ------------------------------------------------------------------ field checks


def _bad(what: str) -> InvalidMessage:
    return InvalidMessage(f"query message: {what}", "malformed")


def _bytes(v: Any, n: int, what: str) -> bytes:
    if type(v) is not bytes or len(v) != n:
        raise _bad(f"{what} must be {n} bytes")
    return v


def _opt_bytes(v: Any, n: int, what: str) -> bytes | None:
    return None if v is None else _bytes(v, n, what)


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(f"{what} must be an integer in [{lo}, {hi}]")
    return v


def _opt_int(v: Any, lo: int, hi: int, what: str) -> int | None:
    return None if v is None else _int(v, lo, hi, what)


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise _bad(f"{what} must be a boolean")
    return v


def _str(v: Any, hi: int, what: str) -> str:
    if type(v) is not str or len(v) > hi:
        raise _bad(f"{what} must be a string of at most {hi} characters")
    return v


def _list(v: Any, hi: int, what: str) -> list[Any]:
    if type(v) not in (list, tuple) or len(v) > hi:
        raise _bad(f"{what} must be a list of at most {hi} items")
    return list(v)


def _ids(v: Any, hi: int, what: str, lo: int = 0) -> tuple[bytes, ...]:
    items = _list(v, hi, what)
    if len(items) < lo:
        raise _bad(f"{what} needs at least {lo} item(s)")
    out = tuple(_bytes(x, 32, f"{what} item") for x in items)
    if len(set(out)) != len(out):
        raise _bad(f"{what} has duplicates")
    return out


def _records(v: Any, hi: int, what: str) -> tuple[bytes, ...]:
    out = []
    for r in _list(v, hi, what):
        if type(r) is not bytes or not 0 < len(r) <= MAX_WIRE:
            raise _bad(f"{what} must be records of 1..{MAX_WIRE} bytes")
        out.append(r)
    return tuple(out)


# ------------------------------------------------------------------ messages


Message = codec.TaggedMessage


@dataclass(frozen=True)
class Page:
    """Paging of a query that returns events."""

    after: int = 0
    limit: int = DEFAULT_LIMIT
    max_bytes: int = DEFAULT_PAGE_BYTES

    def __post_init__(self) -> None:
        _int(self.after, 0, MAX_CURSOR, "after")
        _int(self.limit, 1, MAX_LIMIT, "limit")
        _int(self.max_bytes, MIN_PAGE_BYTES, MAX_PAGE_BYTES, "max_bytes")

    def to_list(self) -> list[Any]:
        return [self.after, self.limit, self.max_bytes]


def _page(v: Any) -> Page:
    items = _list(v, 3, "page")
    if len(items) != 3:
        raise _bad("page is [after, limit, max_bytes]")
    return Page(items[0], items[1], items[2])


@dataclass(frozen=True)
class GetEvents(Message):
    """Events by id (1..256); unknown ids are simply absent from the answer."""

    TAG = 1
    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", _ids(self.ids, MAX_IDS, "ids", lo=1))

    def to_list(self) -> list[Any]:
        return [list(self.ids)]


@dataclass(frozen=True)
class FindEvents(Message):
    """Events matching every given filter (kind, author, referenced id), paged."""

    TAG = 2
    kind: str | None = None
    author: bytes | None = None
    ref: bytes | None = None
    page: Page = field(default_factory=Page)

    def __post_init__(self) -> None:
        if self.kind is not None and (type(self.kind) is not str
                                      or self.kind not in KIND_NAMES):
            raise InvalidMessage(f"query message: unknown event kind {str(self.kind)[:32]!r}",
                                 "unknown_kind")
        _opt_bytes(self.author, 32, "author")
        _opt_bytes(self.ref, 32, "ref")

    def to_list(self) -> list[Any]:
        return [self.kind, self.author, self.ref, self.page.to_list()]


@dataclass(frozen=True)
class AuctionBundle(Message):
    """A request event and every bid, commit, pledge and award referencing it, and
    every reveal referencing one of its commits."""

    TAG = 3
    request: bytes
    page: Page = field(default_factory=Page)

    def __post_init__(self) -> None:
        _bytes(self.request, 32, "request")

    def to_list(self) -> list[Any]:
        return [self.request, self.page.to_list()]


@dataclass(frozen=True)
class ReputationBundle(Message):
    """Everything needed to re-derive the reputation of 1..64 keys (see
    `reputation_ids`)."""

    TAG = 4
    keys: tuple[bytes, ...]
    page: Page = field(default_factory=Page)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", _ids(self.keys, MAX_KEYS, "keys", lo=1))

    def to_list(self) -> list[Any]:
        return [list(self.keys), self.page.to_list()]


@dataclass(frozen=True)
class LeasesOf(Message):
    """Every lease `key` is a party to (recipient, provider, member device, group
    member): each lease's auction bundle plus the events referencing the lease
    (payments, ratings, usage, subcontracts)."""

    TAG = 5
    key: bytes
    page: Page = field(default_factory=Page)

    def __post_init__(self) -> None:
        _bytes(self.key, 32, "key")

    def to_list(self) -> list[Any]:
        return [self.key, self.page.to_list()]


@dataclass(frozen=True)
class GetHeads(Message):
    """The node's effective chain head of each author (1..256)."""

    TAG = 6
    authors: tuple[bytes, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "authors", _ids(self.authors, MAX_IDS, "authors", lo=1))

    def to_list(self) -> list[Any]:
        return [list(self.authors)]


@dataclass(frozen=True)
class GetDigest(Message):
    TAG = 7

    def to_list(self) -> list[Any]:
        return []


@dataclass(frozen=True)
class Submit(Message):
    """Wire records (1..16) for the node to validate, store and gossip."""

    TAG = 8
    records: tuple[bytes, ...]

    def __post_init__(self) -> None:
        recs = _records(self.records, MAX_SUBMIT, "records")
        if not recs:
            raise _bad("submit needs at least one record")
        object.__setattr__(self, "records", recs)

    def to_list(self) -> list[Any]:
        return [list(self.records)]


QueryRequest = (GetEvents | FindEvents | AuctionBundle | ReputationBundle | LeasesOf | GetHeads
                | GetDigest | Submit)


@dataclass(frozen=True)
class EventsPage(Message):
    """Wire records in arrival order; pass `cursor` as `after` for the next page."""

    TAG = 1
    records: tuple[bytes, ...]
    cursor: int
    more: bool

    def __post_init__(self) -> None:
        recs = _records(self.records, MAX_LIMIT + MAX_IDS, "records")
        if sum(len(r) for r in recs) > MAX_PAGE_BYTES + MAX_WIRE:
            raise _bad("records exceed the page byte limit")
        object.__setattr__(self, "records", recs)
        _int(self.cursor, 0, MAX_CURSOR, "cursor")
        _bool(self.more, "more")

    def to_list(self) -> list[Any]:
        return [list(self.records), self.cursor, self.more]


@dataclass(frozen=True)
class HeadInfo:
    author: bytes
    seq: int  # 0: no event of this author (or forked at seq 1)
    id: bytes | None
    ts_ms: int
    fork_seq: int | None  # lowest seq with a fork proof; the head is just before it

    def __post_init__(self) -> None:
        _bytes(self.author, 32, "head author")
        _int(self.seq, 0, MAX_SEQ, "head seq")
        if (self.id is None) != (self.seq == 0):
            raise _bad("head id must be nil exactly when seq is 0")
        _opt_bytes(self.id, 32, "head id")
        _int(self.ts_ms, 0, MAX_SEQ, "head ts_ms")
        _opt_int(self.fork_seq, 1, MAX_SEQ, "fork_seq")

    def to_list(self) -> list[Any]:
        return [self.author, self.seq, self.id, self.ts_ms, self.fork_seq]


@dataclass(frozen=True)
class Heads(Message):
    TAG = 2
    heads: tuple[HeadInfo, ...]

    def __post_init__(self) -> None:
        if len(self.heads) > MAX_IDS:
            raise _bad(f"at most {MAX_IDS} heads")

    def to_list(self) -> list[Any]:
        return [[h.to_list() for h in self.heads]]


@dataclass(frozen=True)
class Digest(Message):
    TAG = 3
    network: str
    digest: bytes
    events: int
    authors: int
    forks: int

    def __post_init__(self) -> None:
        if type(self.network) is not str or not NETWORK_RE.fullmatch(self.network):
            raise _bad("network must be a network id")
        _bytes(self.digest, 32, "digest")
        for name in ("events", "authors", "forks"):
            _int(getattr(self, name), 0, MAX_CURSOR, name)

    def to_list(self) -> list[Any]:
        return [self.network, self.digest, self.events, self.authors, self.forks]


STATUSES = frozenset(s.value for s in Status)


@dataclass(frozen=True)
class SubmitResult:
    status: str  # accepted | duplicate | pending | rejected | fork
    event_id: bytes | None
    reason: str | None  # stable code for rejected
    detail: str

    def __post_init__(self) -> None:
        if type(self.status) is not str or self.status not in STATUSES:
            raise _bad(f"unknown submit status {str(self.status)[:32]!r}")
        _opt_bytes(self.event_id, 32, "event_id")
        if self.reason is not None:
            _str(self.reason, 64, "reason")
        _str(self.detail, 512, "detail")

    @property
    def ok(self) -> bool:
        return self.status in ("accepted", "duplicate", "pending")

    def to_list(self) -> list[Any]:
        return [self.status, self.event_id, self.reason, self.detail]

    @classmethod
    def of(cls, res: AppendResult) -> SubmitResult:
        return cls(res.status.value, res.event_id, res.reason, res.detail[:512])


@dataclass(frozen=True)
class Submitted(Message):
    TAG = 4
    results: tuple[SubmitResult, ...]

    def __post_init__(self) -> None:
        if len(self.results) > MAX_SUBMIT:
            raise _bad(f"at most {MAX_SUBMIT} submit results")

    def to_list(self) -> list[Any]:
        return [[r.to_list() for r in self.results]]


QueryResponse = EventsPage | Heads | Digest | Submitted


def _split(data: bytes, max_size: int) -> tuple[int, list[Any]]:
    return codec.split_tagged(data, max_size, "query")


def _arity(args: Any, n: int, what: str) -> None:
    codec.check_arity(args, n, what, "query")


def decode_request(data: bytes) -> QueryRequest:
    tag, a = _split(data, MAX_REQUEST)
    if tag == GetEvents.TAG:
        _arity(a, 1, "GET")
        return GetEvents(a[0])
    if tag == FindEvents.TAG:
        _arity(a, 4, "FIND")
        if a[0] is not None:
            _str(a[0], 32, "kind")
        return FindEvents(a[0], a[1], a[2], _page(a[3]))
    if tag == AuctionBundle.TAG:
        _arity(a, 2, "AUCTION")
        return AuctionBundle(a[0], _page(a[1]))
    if tag == ReputationBundle.TAG:
        _arity(a, 2, "REPUTATION")
        return ReputationBundle(a[0], _page(a[1]))
    if tag == LeasesOf.TAG:
        _arity(a, 2, "LEASES")
        return LeasesOf(a[0], _page(a[1]))
    if tag == GetHeads.TAG:
        _arity(a, 1, "HEADS")
        return GetHeads(a[0])
    if tag == GetDigest.TAG:
        _arity(a, 0, "DIGEST")
        return GetDigest()
    if tag == Submit.TAG:
        _arity(a, 1, "SUBMIT")
        return Submit(a[0])
    raise InvalidMessage(f"unknown query request tag {tag}", "unknown_request")


def decode_response(data: bytes) -> QueryResponse:
    tag, a = _split(data, MAX_RESPONSE)
    if tag == EventsPage.TAG:
        _arity(a, 3, "EVENTS")
        return EventsPage(a[0], a[1], a[2])
    if tag == Heads.TAG:
        _arity(a, 1, "HEADS")
        heads = []
        for h in _list(a[0], MAX_IDS, "heads"):
            h = _list(h, 5, "head")
            _arity(h, 5, "head")
            heads.append(HeadInfo(h[0], h[1], h[2], h[3], h[4]))
        return Heads(tuple(heads))
    if tag == Digest.TAG:
        _arity(a, 5, "DIGEST")
        return Digest(a[0], a[1], a[2], a[3], a[4])
    if tag == Submitted.TAG:
        _arity(a, 1, "SUBMITTED")
        results = []
        for r in _list(a[0], MAX_SUBMIT, "results"):
            r = _list(r, 4, "result")
            _arity(r, 4, "result")
            results.append(SubmitResult(r[0], r[1], r[2], r[3]))
        return Submitted(tuple(results))
    raise InvalidMessage(f"unknown query response tag {tag}", "unknown_response")


# ------------------------------------------------------------------ derived state, kept current


# ------------------------------------------------------------------ answering


def _select(ledger: Ledger, where: str, args: Iterable[object], page: Page) -> EventsPage:
    """One page of `SELECT ... WHERE <where>` in arrival order, bounded in bytes, with
    events past an author's fork left out."""
    forked = ledger.forked()
    q = (f"SELECT n, author, seq, wire FROM events WHERE n > ? AND ({where}) "
         "ORDER BY n LIMIT ?")
    out: list[bytes] = []
    size = 0
    cursor = page.after
    more = False
    # Fetch one extra row to know whether there is more; forked rows are skipped.
    rows = ledger.db.execute(q, [page.after, *args, page.limit + 1]).fetchall()
    for i, (n, author, seq, wire) in enumerate(rows):
        if i >= page.limit or (out and size + len(wire) > page.max_bytes):
            more = True
            break
        cursor = n
        if seq >= forked.get(author, 1 << 62):
            continue
        out.append(wire)
        size += len(wire)
    return EventsPage(tuple(out), cursor, more)


def _by_ids(ledger: Ledger, ids: set[bytes], page: Page) -> EventsPage:
    """A page of the events with the given ids, in arrival order."""
    if not ids:
        return EventsPage((), page.after, False)
    ledger.db.execute("CREATE TEMP TABLE IF NOT EXISTS q_ids(id BLOB PRIMARY KEY)")
    try:
        ledger.db.execute("DELETE FROM q_ids")
        ledger.db.executemany("INSERT OR IGNORE INTO q_ids VALUES(?)", [(i,) for i in ids])
        return _select(ledger, "idk IN (SELECT idk(id) FROM q_ids) AND id IN "
                       "(SELECT id FROM q_ids)", (), page)
    finally:
        ledger.db.execute("DELETE FROM q_ids")


# Four parameters, each the request id (`idk` is the ledger's indexed id key).
AUCTION_WHERE = ("(idk = idk(?) AND id = ?) OR ref = ? OR (kind = 'reveal' AND ref IN "
                 "(SELECT id FROM events WHERE ref = ? AND kind = 'commit'))")


def auction_ids(ledger: Ledger, request: bytes) -> set[bytes]:
    rows = ledger.db.execute(f"SELECT id FROM events WHERE {AUCTION_WHERE}", (request,) * 4)
    return {r[0] for r in rows}


def lease_ids(ledger: Ledger, market: Market, key: bytes) -> set[bytes]:
    """Auction bundles of every lease `key` is a party to, plus the events that
    reference those leases."""
    out: set[bytes] = set()
    for lease in market.leases.values():
        if key == lease.provider or key in lease.keys:
            out |= _lease_closure(ledger, lease.request, lease.id)
    return out


def _lease_closure(ledger: Ledger, request: bytes, lease: bytes) -> set[bytes]:
    ids = auction_ids(ledger, request)
    ids.update(r[0] for r in ledger.db.execute("SELECT id FROM events WHERE ref = ?", (lease,)))
    return ids


def reputation_ids(ledger: Ledger, market: Market, keys: Iterable[bytes]) -> set[bytes]:
    """What a client needs to re-derive the reputation of `keys` with `Market`:

    * every accepted rating whose subject is one of the keys;
    * for each, the rated deal: the lease's auction bundle and its payments, or the
      subcontract event plus its lease's auction bundle;
    * for each rating's weighing rater, up to `policy.rater_cap` of the rater's leases
      that were settled (paid in full and ended) by the time of the rating, each with
      its auction bundle and payments, so the rater weight comes out the same.

    Awards of those deeper auctions decided by `best_value` depend on bidders'
    reputations that are not included; docs/client.md describes that limit."""
    want = set(keys)
    out: set[bytes] = set()
    seen_leases: set[bytes] = set()
    cap = market.policy.rater_cap
    settled_by: dict[bytes, list[tuple[int, int, bytes]]] | None = None

    def add_lease(lease_id: bytes) -> None:
        if lease_id in seen_leases:
            return
        seen_leases.add(lease_id)
        lease = market.leases.get(lease_id)
        if lease is None:
            return
        out.update(auction_ids(ledger, lease.request))
        out.update(p.event_id for p in market.payments.get(lease_id, ()))

    for lease_id, ratings in market.ratings.items():
        for r in ratings:
            if r.subject not in want:
                continue
            out.add(r.event_id)
            weigh_as = r.rater
            lease = market.leases.get(lease_id)
            if lease is not None:
                add_lease(lease_id)
                if r.rater in lease.devices and r.rater not in lease.group_members:
                    weigh_as = lease.recipient
            else:
                sc = market.subcontracts.get(lease_id)
                if sc is not None:
                    out.add(sc.event_id)
                    add_lease(sc.lease)
            if r.weight <= 1:
                continue  # no settled lease counted for this rater: nothing more to show
            if settled_by is None:
                settled_by = _settled_index(market)
            n = 0
            for settle_ts, end_ms, lid in settled_by.get(weigh_as, ()):
                if n >= cap:
                    break
                if settle_ts <= r.ts_ms and end_ms <= r.ts_ms:
                    add_lease(lid)
                    n += 1
    return out


def _settled_index(market: Market) -> dict[bytes, list[tuple[int, int, bytes]]]:
    """Party key -> (ts at which the lease was paid in full, end_ms, lease id)."""
    idx: dict[bytes, list[tuple[int, int, bytes]]] = collections.defaultdict(list)
    for lease in market.leases.values():
        ts: int | None = None
        if lease.price == 0:
            check = market.awards.get(lease.id)
            ts = check.ts_ms if check else 0
        else:
            paid = 0
            for p in market.payments.get(lease.id, ()):
                paid += p.amount
                if paid >= lease.price:
                    ts = p.ts_ms
                    break
        if ts is None:
            continue
        for k in {lease.provider, lease.recipient, *lease.group_members}:
            idx[k].append((ts, lease.end_ms, lease.id))
    for v in idx.values():
        v.sort(key=lambda t: (t[1], t[0], t[2]))
    return idx


def heads_of(ledger: Ledger, authors: Iterable[bytes]) -> Heads:
    forked = ledger.forked()
    out = []
    for a in authors:
        fseq = forked.get(a)
        head = ledger.head(a)
        if head is None:
            out.append(HeadInfo(a, 0, None, 0, fseq))
        elif fseq is None:
            out.append(HeadInfo(a, head.seq, head.id, head.ts_ms, None))
        else:
            seq = fseq - 1
            row = ledger.db.execute("SELECT id, ts_ms FROM events WHERE author=? AND seq=?",
                                    (a, seq)).fetchone() if seq >= 1 else None
            if row is None:
                out.append(HeadInfo(a, 0, None, 0, fseq))
            else:
                out.append(HeadInfo(a, seq, row[0], row[1], fseq))
    return Heads(tuple(out))


# ------------------------------------------------------------------ the service

SubmitFn = Callable[[bytes], AppendResult]
SubmitFromFn = Callable[[bytes, Hashable], AppendResult]
"""`submit_from(wire, source)`: like `submit`, charging pending events to `source`."""


@dataclass
class QueryStats:
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    submitted: collections.Counter[str] = field(default_factory=collections.Counter)
    records_out: int = 0
    bytes_out: int = 0
    rate_limited: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests), "refused": dict(self.refused),
            "submitted": dict(self.submitted), "records_out": self.records_out,
            "bytes_out": self.bytes_out, "rate_limited": self.rate_limited,
        }


class QueryService:
    """Answers the query protocol from a ledger. `submit(wire)` stores and gossips a
    record (the daemon passes `Node.submit`); `view` is the derived market (None: build one)."""

    name = "query"

    def __init__(self, ledger: Ledger, view: LiveMarket | MarketView | None, submit: SubmitFn,
                 network: str, *, submit_rate: float = 50.0, submit_burst: float = 200.0,
                 ip_rate: float | None = None, ip_burst: float | None = None,
                 node_rate: float | None = None, node_burst: float | None = None,
                 timeout: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 submit_from: SubmitFromFn | None = None) -> None:
        if network != ledger.network:
            raise ValueError(f"network {network!r} is not the ledger's {ledger.network!r}")
        self.ledger = ledger
        self.live = view if isinstance(view, LiveMarket) else LiveMarket(ledger, view)
        self.submit_fn = submit
        self.submit_from = submit_from
        self.network = network
        self.protocol = protocol_id(network)
        self.stats = QueryStats()
        self.submit_rate = submit_rate
        self.submit_burst = submit_burst
        self.timeout = timeout
        self._clock = clock
        # SUBMIT budgets: per requesting peer (its key), per IP and for the node. A
        # budget per key alone let rotating identities submit at 10x the rate.
        scopes = {"peer": KeyedBuckets(submit_rate, submit_burst)}
        if ip_rate is not None:
            scopes["ip"] = KeyedBuckets(ip_rate, ip_burst or ip_rate)
        if node_rate is not None:
            scopes["node"] = KeyedBuckets(node_rate, node_burst or node_rate, 1)
        self.submit_budget = MultiBudget(scopes)
        self._ip_of: Callable[[bytes], str | None] = lambda _pubkey: None

    # -- daemon service interface (node/daemon.py)

    async def run(self, node: Any) -> None:
        self.register(node.host)
        await trio.sleep_forever()

    def status(self) -> dict[str, Any]:
        return {**self.stats.as_dict(),
                "submit_refused": dict(self.submit_budget.refused)}

    def register(self, host: p2p.P2PHost) -> None:
        from .p2p import peer_id_from_pubkey, serve_requests

        self._ip_of = lambda pubkey: host.remote_ip(peer_id_from_pubkey(pubkey))
        serve_requests(host, self.protocol, self.handle, MAX_REQUEST, timeout=self.timeout)

    # -- requests

    async def handle(self, peer_pubkey: bytes, payload: bytes) -> bytes:
        try:
            req = decode_request(payload)
        except InvalidMessage as e:
            self.stats.refused[e.reason] += 1
            raise
        self.stats.requests[type(req).__name__] += 1
        await trio.lowlevel.checkpoint()
        try:
            resp = self.answer(peer_pubkey, req)
        except RateLimited:
            self.stats.rate_limited += 1
            self.stats.refused["rate_limited"] += 1
            raise
        if isinstance(resp, EventsPage):
            self.stats.records_out += len(resp.records)
        data = resp.encode()
        self.stats.bytes_out += len(data)
        return data

    def answer(self, peer_pubkey: bytes, req: QueryRequest) -> QueryResponse:
        """Answer one decoded request (synchronous; bounded work per request)."""
        led = self.ledger
        if isinstance(req, GetEvents):
            return _by_ids(led, set(req.ids), Page(0, MAX_IDS, MAX_PAGE_BYTES))
        if isinstance(req, FindEvents):
            where, args = ["1"], list[object]()
            for col, val in (("kind", req.kind), ("author", req.author), ("ref", req.ref)):
                if val is not None:
                    where.append(f"{col} = ?")
                    args.append(val)
            return _select(led, " AND ".join(where), args, req.page)
        if isinstance(req, AuctionBundle):
            return _select(led, AUCTION_WHERE, (req.request,) * 4, req.page)
        if isinstance(req, ReputationBundle):
            return _by_ids(led, reputation_ids(led, self.live.market(), req.keys), req.page)
        if isinstance(req, LeasesOf):
            return _by_ids(led, lease_ids(led, self.live.market(), req.key), req.page)
        if isinstance(req, GetHeads):
            return heads_of(led, req.authors)
        if isinstance(req, GetDigest):
            return Digest(self.network, led.digest(), led.count(), len(led.heads()),
                          len(led.forked()))
        return self._submit(peer_pubkey, req)

    def _submit(self, peer: bytes, req: Submit) -> Submitted:
        self._take(peer, len(req.records))
        results = []
        for wire in req.records:
            try:
                # Charged to the submitter if it must wait for a predecessor, so one
                # client's orphans cannot take the pending room of every other one.
                res = (self.submit_fn(wire) if self.submit_from is None
                       else self.submit_from(wire, ("submit", peer)))
            except sqlite3.Error as e:
                log.error("storing a submitted event failed", extra={"error": str(e)})
                res = AppendResult(Status.REJECTED, reason="store_error",
                                   detail="the node could not store it; try again")
            self.stats.submitted[res.status.value] += 1
            if res.reason:
                self.stats.submitted["rejected:" + res.reason] += 1
            results.append(SubmitResult.of(res))
        return Submitted(tuple(results))

    def _take(self, peer: bytes, n: int) -> None:
        scope = self.submit_budget.charge(
            {"peer": peer, "ip": self._ip_of(peer), "node": "node"}, n, self._clock())
        if scope is not None:
            rate = self.submit_budget.scopes[scope].rate
            whom = {"peer": "you are", "ip": "your address is",
                    "node": "this node's clients are"}[scope]
            raise RateLimited(f"{whom} submitting faster than {rate:g} events/s; "
                              "slow down and retry")


# ------------------------------------------------------------------ daemon integration


def node_service(node: Any) -> QueryService:
    """Factory for the daemon (`bidmesh.services` entry point or `node.add_service`)."""
    lim = node.config.limits
    return QueryService(node.ledger, node.live, node.submit, node.ledger.network,
                        submit_rate=lim.submit_peer_per_s, submit_burst=lim.submit_peer_burst,
                        ip_rate=lim.submit_ip_per_s, ip_burst=lim.submit_ip_burst,
                        node_rate=lim.submit_node_per_s, node_burst=lim.submit_node_burst,
                        submit_from=node.submit)
