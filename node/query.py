"""The query protocol between light clients and nodes, and the node's side of it.

Request/response over `/bidmesh/<network>/query/1` (`p2p.serve_requests`): one
request frame, one response frame. Every message is a msgpack array whose first
element is an integer tag; decoders bound the size and raise `InvalidMessage` on
anything malformed (the requester then sees `RequestRefused` with the reason).

Answers carry events as their exact wire records, never derived state: a light
client verifies every signature and re-derives auctions, leases and reputation
itself with the same pure `Market` fold (node/client/). A node can therefore lie
only by omission, which a client talking to several nodes detects by comparing the
sets it gets back.

Paging: every query that returns events takes `after` (an arrival cursor, 0 for
the start), `limit` (records) and `max_bytes` (record bytes; one record may exceed
it so that progress is always made). The answer's `cursor` is passed as `after` to
get the next page; `more` says whether there is one. Cursors are the node's local
arrival order: they mean nothing to another node. Events of an author from the
seq of a fork proof on are never returned (they count for nothing anywhere).

The node side: `QueryService(ledger, view, submit, network)`, `register(host)`.
The messages and their limits (declared in `query_messages`, re-exported here) are
specified in docs/PROTOCOL.md ("Query protocol").
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

from .auction import Market
from .budget import KeyedBuckets, MultiBudget
from .errors import InvalidMessage, RateLimited, Reason
from .ledger import AppendResult, Ledger, Status, check_records
from .marketview import LiveMarket, MarketView
from .query_messages import (
    CURSOR,
    DEFAULT_LIMIT,
    DEFAULT_PAGE_BYTES,
    ID,
    KEY,
    KIND_NAMES,
    MAX_CURSOR,
    MAX_IDS,
    MAX_KEYS,
    MAX_LIMIT,
    MAX_PAGE_BYTES,
    MAX_REQUEST,
    MAX_RESPONSE,
    MAX_SUBMIT,
    MIN_PAGE_BYTES,
    PAGE,
    RECORD,
    REQUESTS,
    RESPONSES,
    STATUSES,
    AuctionBundle,
    Digest,
    EventsPage,
    FindEvents,
    GetDigest,
    GetEvents,
    GetHeads,
    HeadInfo,
    Heads,
    KindName,
    LeasesOf,
    Message,
    Page,
    QueryRequest,
    QueryResponse,
    ReputationBundle,
    Submit,
    SubmitResult,
    Submitted,
    decode_request,
    decode_response,
    protocol_id,
)
from .resources import subnet_of

if TYPE_CHECKING:  # p2p pulls in libp2p (~1 s): only the node side needs it
    from . import p2p
    from .context import NodeContext


# The messages were split out to query_messages.py and are re-exported: clients
# and tests import them from here.
__all__ = [
    "AUCTION_WHERE", "CURSOR", "DEFAULT_LIMIT", "DEFAULT_PAGE_BYTES", "ID", "KEY",
    "KIND_NAMES", "MAX_CURSOR", "MAX_IDS", "MAX_KEYS", "MAX_LIMIT", "MAX_PAGE_BYTES",
    "MAX_REQUEST", "MAX_RESPONSE", "MAX_SUBMIT", "MIN_PAGE_BYTES", "PAGE", "RECORD",
    "REQUESTS", "RESPONSES", "STATUSES", "SUBMIT_BLOCK_S", "SUBMIT_REFUSALS_MAX",
    "AuctionBundle", "Digest", "EventsPage", "FindEvents", "GetDigest", "GetEvents",
    "GetHeads", "HeadInfo", "Heads", "KindName", "LeasesOf", "Message", "Page",
    "QueryRequest", "QueryResponse", "QueryService", "QueryStats", "ReputationBundle",
    "Submit", "SubmitFn", "SubmitFromFn", "SubmitManyFn", "SubmitResult", "Submitted",
    "auction_ids", "decode_request", "decode_response", "heads_of", "lease_ids",
    "node_service", "protocol_id", "reputation_ids",
]

log = logging.getLogger("bidmesh.query")

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
    for lease in market.leases_of(key):
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

SUBMIT_REFUSALS_MAX = 4
"""SUBMITs refused `rate_limited` in a row (nothing accepted between) after which the
peer is disconnected and refused for SUBMIT_BLOCK_S. Refusing costs the node a
stream and a request (~3-5 ms of CPU in py-libp2p) and the peer nothing: rotating
identities that went on submitting after each refusal (bench/hostile.py,
`submit_flood_rotating`: 20 SUBMITs per identity) made the node spend most of its
time refusing. Cut off, an identity costs its handshake and a few refusals, and new
identities come only as fast as inbound handshakes are admitted (ten a second).
A client that waits after a refusal, as the light client does, never meets this."""
SUBMIT_BLOCK_S = 60.0
_REFUSALS_KEPT = 4096  # peers whose refusals in a row are counted (least recent forgotten)

SubmitFn = Callable[[bytes], AppendResult]
SubmitFromFn = Callable[[bytes, Hashable], AppendResult]
"""`submit_from(wire, source)`: like `submit`, charging pending events to `source`."""
SubmitManyFn = Callable[[list[bytes], Hashable], list[AppendResult]]
"""`submit_many(wires, source)`: `submit_from` for a whole SUBMIT (one transaction)."""


@dataclass
class QueryStats:
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    submitted: collections.Counter[str] = field(default_factory=collections.Counter)
    records_out: int = 0
    bytes_out: int = 0
    rate_limited: int = 0
    submit_cut_off: int = 0  # peers disconnected for SUBMITting on after refusals

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests), "refused": dict(self.refused),
            "submitted": dict(self.submitted), "records_out": self.records_out,
            "bytes_out": self.bytes_out, "rate_limited": self.rate_limited,
            "submit_cut_off": self.submit_cut_off,
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
                 submit_from: SubmitFromFn | None = None,
                 submit_many: SubmitManyFn | None = None) -> None:
        if network != ledger.network:
            raise ValueError(f"network {network!r} is not the ledger's {ledger.network!r}")
        self.ledger = ledger
        self.live = view if isinstance(view, LiveMarket) else LiveMarket(ledger, view)
        self.submit_fn = submit
        self.submit_from = submit_from
        self.submit_many = submit_many
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
        self._block: Callable[[bytes], None] = lambda _pubkey: None
        self._refusals: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._check_limiter: trio.CapacityLimiter | None = None  # SUBMIT checks' thread
        self._prepaid: Submit | None = None  # the SUBMIT being stored, already charged

    # -- daemon service interface (node/daemon.py)

    async def run(self, node: NodeContext) -> None:
        self.register(node.host)
        await trio.sleep_forever()

    def status(self) -> dict[str, Any]:
        return {**self.stats.as_dict(),
                "submit_refused": dict(self.submit_budget.refused)}

    def register(self, host: p2p.P2PHost) -> None:
        from .p2p import peer_id_from_pubkey, serve_requests

        self._ip_of = lambda pubkey: host.remote_ip(peer_id_from_pubkey(pubkey))
        self._block = lambda pubkey: host.block(peer_id_from_pubkey(pubkey), SUBMIT_BLOCK_S)
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
            if isinstance(req, Submit):
                resp = await self._submit_off_loop(peer_pubkey, req)
                self._refusals.pop(peer_pubkey, None)
            else:
                resp = self.answer(peer_pubkey, req)
        except RateLimited:
            self.stats.rate_limited += 1
            self.stats.refused[Reason.RATE_LIMITED] += 1
            if isinstance(req, Submit):
                self._refused(peer_pubkey)
            raise
        if isinstance(resp, EventsPage):
            self.stats.records_out += len(resp.records)
        data = resp.encode()
        self.stats.bytes_out += len(data)
        return data

    def _refused(self, peer: bytes) -> None:
        """Count a SUBMIT refused `rate_limited`; cut the peer off at
        SUBMIT_REFUSALS_MAX in a row (the answer still goes out first)."""
        n = self._refusals.pop(peer, 0) + 1
        if n < SUBMIT_REFUSALS_MAX:
            self._refusals[peer] = n
            while len(self._refusals) > _REFUSALS_KEPT:
                self._refusals.popitem(last=False)
            return
        self.stats.submit_cut_off += 1
        log.info("peer cut off for submitting on after refusals", extra={
            "peer": peer.hex(), "refused": n, "blocked_s": SUBMIT_BLOCK_S})
        self._block(peer)

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

    async def _submit_off_loop(self, peer: bytes, req: Submit) -> QueryResponse:
        """SUBMIT as served to peers: the budgets are charged before any CPU is spent
        on the records, their signatures are checked on a worker thread (as received
        gossip is, node/ingest.py), and only storing them runs on the event loop.
        Checked on the loop, 16 records of rotating identities held every other
        request of the node for ~5-10 ms per SUBMIT (bench/hostile.py)."""
        self._take(peer, len(req.records))
        records = list(req.records)
        if self._check_limiter is None:
            self._check_limiter = trio.CapacityLimiter(1)  # one thread, as for gossip
        checked = await trio.to_thread.run_sync(check_records, records, self.network,
                                                limiter=self._check_limiter)
        with self.ledger.prechecked(records, checked):
            self._prepaid = req
            try:
                return self.answer(peer, req)  # (subclasses answer through it)
            finally:
                self._prepaid = None

    def _submit(self, peer: bytes, req: Submit) -> Submitted:
        if req is not self._prepaid:
            self._take(peer, len(req.records))
        results = []
        # Charged to the submitter if it must wait for a predecessor, so one client's
        # orphans cannot take the pending room of every other one.
        source = ("submit", peer)
        if self.submit_many is not None:
            try:
                outcomes = self.submit_many(list(req.records), source)
            except sqlite3.Error as e:
                log.error("storing submitted events failed", extra={"error": str(e)})
                outcomes = [_store_error() for _ in req.records]
        else:
            outcomes = []
            for wire in req.records:
                try:
                    outcomes.append(self.submit_fn(wire) if self.submit_from is None
                                    else self.submit_from(wire, source))
                except sqlite3.Error as e:
                    log.error("storing a submitted event failed", extra={"error": str(e)})
                    outcomes.append(_store_error())
        for res in outcomes:
            self.stats.submitted[res.status.value] += 1
            if res.reason:
                self.stats.submitted["rejected:" + res.reason] += 1
            results.append(SubmitResult.of(res))
        return Submitted(tuple(results))

    def _take(self, peer: bytes, n: int) -> None:
        # The "ip" scope counts a subnet (/24, IPv6 /56), like inbound connections
        # (node/resources.py): one host holds many addresses of its subnet (any IPv6
        # host a /64), and rotating addresses would multiply a per-address budget.
        ip = self._ip_of(peer)
        try:
            net = None if ip is None else subnet_of(ip)
        except ValueError:
            net = ip
        scope = self.submit_budget.charge(
            {"peer": peer, "ip": net, "node": "node"}, n, self._clock())
        if scope is not None:
            rate = self.submit_budget.scopes[scope].rate
            whom = {"peer": "you are", "ip": "your address (subnet) is",
                    "node": "this node's clients are"}[scope]
            raise RateLimited(f"{whom} submitting faster than {rate:g} events/s; "
                              "slow down and retry")


# ------------------------------------------------------------------ daemon integration


def _store_error() -> AppendResult:
    return AppendResult(Status.REJECTED, reason=Reason.STORE_ERROR,
                        detail="the node could not store it; try again")


def node_service(node: NodeContext) -> QueryService:
    """Factory for the daemon (`bidmesh.services` entry point or `node.add_service`)."""
    lim = node.config.limits
    return QueryService(node.ledger, node.live, node.submit, node.ledger.network,
                        submit_rate=lim.submit_peer_per_s, submit_burst=lim.submit_peer_burst,
                        ip_rate=lim.submit_ip_per_s, ip_burst=lim.submit_ip_burst,
                        node_rate=lim.submit_node_per_s, node_burst=lim.submit_node_burst,
                        submit_from=node.submit, submit_many=node.submit_many)
