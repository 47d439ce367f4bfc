"""The light client: a recipient's (or member device's) view of the market, trusting no node.

A light client keeps only its key and a small state file (its own chain head) in a
client directory, and talks to one or more nodes over the query protocol
(node/query.py). It never takes a node's word for anything:

* every event a node returns is decoded with full signature verification (and must
  match what was asked: the requested ids, filters or bundle);
* its own events are checked as a chain (author, consecutive seq, `prev` links)
  before it moves its head forward;
* derived views (auction standing and winner, leases, reputation) are recomputed
  locally from the returned events with the same pure `Market` fold every node uses;
* with two or more nodes configured, each answer set is compared by digest and any
  disagreement is reported (`LightClient.disagreements`); the client folds the union
  of the verified events, so a node can only hide events, not add false ones.

    async with LightClient.open(client_dir, ["/ip4/…/tcp/4001/p2p/12D3…"]) as c:
        req = await c.request("bandwidth", duration_ms=3_600_000, reserve=500,
                              close_in_ms=30_000)
        async for bids in c.watch_bids(req.id): ...
        award = await c.award(req.id)

The Python API and the `bidmesh client` command are documented in docs/client.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import query
from .agent import build_award
from .auction import Auction, Lease, Market, derive
from .auction.views import RecipientRecord, auction_recipient, lease_json
from .errors import (
    BidmeshError,
    InvalidEvent,
    OperationError,
    PeerError,
    RemoteError,
    UntrustedAnswer,
    UsageError,
)
from .events import (
    NETWORK_RE,
    Award,
    Body,
    Event,
    Members,
    Payment,
    Pledge,
    Rating,
    Request,
    decode_wire,
    sign_event,
)
from .keys import Identity, load_or_create_key
from .reputation import Score

if TYPE_CHECKING:  # libp2p costs ~1 s to import: loaded when a client actually connects
    from . import p2p
    from .dataplane.tunnel_client import Tunnel

log = logging.getLogger("bidmesh.client")

KEY_FILE = "client.key"
STATE_FILE = "state.json"
MAX_PAGES = 10_000  # per query and node: bounds a node that keeps answering "more"
MAX_CONTEXT_AUCTIONS = 256  # auction bundles fetched per level to verify awards
T = TypeVar("T")
_Results = list[tuple[str, "query.SubmitResult"]]  # (node, its answer) per submitted record


@dataclass(frozen=True)
class NodeFault:
    node: str
    reason: str
    detail: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Disagreement:
    """Nodes answered one query with different event sets."""

    query: str
    digests: dict[str, str]  # node -> digest of its answer set
    missing: dict[str, list[str]]  # node -> ids (hex) other nodes returned but it did not


@dataclass(frozen=True)
class BidInfo:
    """One bid (or sealed commit) with its provider's reputation as of the close."""

    id: bytes
    provider: bytes
    price: int | None
    status: str
    reason: str
    sealed: bool
    ts_ms: int
    winner: bool
    reputation: Score

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id.hex(), "provider": self.provider.hex(), "price": self.price,
                "status": self.status, "reason": self.reason, "sealed": self.sealed,
                "ts_ms": self.ts_ms, "winner": self.winner,
                "reputation": self.reputation.to_json()}


@dataclass(frozen=True)
class AuctionInfo:
    """An auction as re-derived locally: the market folded over the returned events."""

    market: Market
    auction: Auction
    bids: tuple[BidInfo, ...]
    status: str

    @property
    def recipient_record(self) -> RecipientRecord:
        """The recipient's payment record as of the auction's start."""
        return auction_recipient(self.market, self.auction)

    def to_json(self) -> dict[str, Any]:
        from .auction.views import auction_json

        d = auction_json(self.market, self.auction, int(time.time() * 1000))
        d["bid_list"] = [b.to_json() for b in self.bids]
        d["status"] = self.status
        return d


@dataclass(frozen=True)
class LeaseInfo:
    lease: Lease
    paid: int
    role: str  # our role: recipient | provider | member
    data: dict[str, Any]  # views.lease_json

    def to_json(self) -> dict[str, Any]:
        return {**self.data, "role": self.role}


@dataclass(frozen=True)
class Unverified:
    """An award of ours that yields no lease here, and why (stable reason, detail)."""

    award: bytes
    request: bytes
    reason: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"award": self.award.hex(), "request": self.request.hex(),
                "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class ReputationInfo:
    key: bytes
    as_of_ms: int
    provider: Score
    recipient: Score

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key.hex(), "as_of_ms": self.as_of_ms,
                "provider": self.provider.to_json(), "recipient": self.recipient.to_json()}


@dataclass
class ChainHead:
    seq: int = 0
    id: bytes | None = None
    ts_ms: int = 0


def now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------ local state


class ClientState:
    """`state.json` in the client dir: the network and our own chain head, plus the
    wire of our last signed event until a node confirmed it (so it is resent, never
    re-signed differently at the same seq)."""

    def __init__(self, path: Path, network: str) -> None:
        self.path = path
        self.network = network
        self.head = ChainHead()
        self.unconfirmed: list[bytes] = []
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            d = json.loads(self.path.read_text())
            net = d["network"]
            h = d.get("head") or {}
            head = ChainHead(int(h.get("seq", 0)),
                             bytes.fromhex(h["id"]) if h.get("id") else None,
                             int(h.get("ts_ms", 0)))
            unconfirmed = [bytes.fromhex(w) for w in d.get("unconfirmed", [])]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"client state {self.path} is unreadable ({e}); move it away "
                             "and the client re-syncs its head from the nodes") from e
        if net != self.network:
            raise UsageError(f"client dir {self.path.parent} belongs to network {net!r}, not "
                             f"{self.network!r}; pass --network {net} or use another --dir")
        self.head, self.unconfirmed = head, unconfirmed

    def save(self) -> None:
        d = {"network": self.network,
             "head": {"seq": self.head.seq, "id": self.head.id.hex() if self.head.id else None,
                      "ts_ms": self.head.ts_ms},
             "unconfirmed": [w.hex() for w in self.unconfirmed]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(d, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


# ------------------------------------------------------------------ answer checks


def _check_events(node: str, records: Iterable[bytes], network: str) -> list[Event]:
    out = []
    for r in records:
        try:
            out.append(decode_wire(r, network))  # full signature verification
        except InvalidEvent as e:
            raise UntrustedAnswer(f"node {node} returned an event that does not verify "
                                  f"({e.reason}): {e}", "forged_event") from e
    return out


def set_digest(events: Iterable[Event]) -> bytes:
    """Digest of an answer set (sorted ids): what cross-checking compares."""
    h = hashlib.sha256(b"bidmesh/answer/v1")
    for i in sorted(ev.id for ev in events):
        h.update(i)
    return h.digest()


def fold(events: Iterable[Event]) -> tuple[Market, list[tuple[bytes, int]]]:
    """Derive a Market from events in any order: dedupe, drop every author's events
    from a seq where two different events exist (a fork, as the ledger does), fold in
    canonical order. Returns the market and the (author, seq) forks seen."""
    by_id = {ev.id: ev for ev in events}
    slots: dict[tuple[bytes, int], bytes] = {}
    fork_at: dict[bytes, int] = {}
    for ev in by_id.values():
        other = slots.setdefault((ev.author, ev.seq), ev.id)
        if other != ev.id:
            fork_at[ev.author] = min(fork_at.get(ev.author, 1 << 62), ev.seq)
    keep = [ev for ev in by_id.values() if ev.seq < fork_at.get(ev.author, 1 << 62)]
    keep.sort(key=lambda e: (e.ts_ms, e.author, e.seq))
    return derive(keep), sorted(fork_at.items())


def _auction_member(ev: Event, request: bytes, commits: set[bytes]) -> bool:
    if ev.id == request:
        return ev.kind == "request"
    if ev.kind == "reveal":
        return ev.ref in commits
    return ev.ref == request and ev.kind in ("bid", "commit", "pledge", "award")


# ------------------------------------------------------------------ the client


@dataclass
class _Node:
    addr: str
    peer: p2p.PeerId | None = None
    cursor: dict[str, int] = field(default_factory=dict)  # watch cursors


class LightClient:
    """A recipient's client. Create with `LightClient.open(...)` (an async context)."""

    def __init__(self, identity: Identity, network: str, state: ClientState,
                 host: p2p.P2PHost, nodes: Sequence[str], *, timeout: float = 10.0,
                 confirm_quorum: int | None = None) -> None:
        self.identity = identity
        self.key = identity.public
        self.network = network
        self.state = state
        self.host = host
        self.nodes = [_Node(a) for a in nodes]
        self.timeout = timeout
        self.faults: list[NodeFault] = []
        self.disagreements: list[Disagreement] = []
        self.forks: list[tuple[bytes, int]] = []
        self._lock = trio.Lock()
        self._head_checked = False
        self.confirm_quorum = confirm_quorum
        self._protocol = query.protocol_id(network)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, client_dir: str | Path, nodes: Sequence[str], *, network: str = "main",
                   timeout: float = 10.0, key_file: str | Path | None = None,
                   listen: Sequence[str] | None = None,
                   confirm_quorum: int | None = None) -> AsyncIterator[LightClient]:
        """Load (or create) the key and state in `client_dir`, connect to `nodes`.
        `confirm_quorum`: how many nodes must hand a published record back before the
        client drops its own copy (default: a majority of `nodes`)."""
        if confirm_quorum is not None and not 1 <= confirm_quorum <= len(nodes):
            raise UsageError(f"confirm quorum must be 1..{len(nodes)} (the number of nodes)")
        if not nodes:
            raise UsageError("give at least one node multiaddr (--node /ip4/…/tcp/…/p2p/…)")
        if not NETWORK_RE.fullmatch(network):
            raise UsageError(f"network id {network!r} must match {NETWORK_RE.pattern}")
        d = Path(client_dir)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        ident = load_or_create_key(Path(key_file) if key_file else d / KEY_FILE)
        state = ClientState(d / STATE_FILE, network)
        from . import p2p

        try:
            async with p2p.open_host(ident.seed, listen or p2p.DEFAULT_LISTEN,
                                     max_connections=max(8, 2 * len(nodes))) as host:
                c = cls(ident, network, state, host, nodes, timeout=timeout,
                        confirm_quorum=confirm_quorum)
                await c.connect()
                yield c
        except BaseExceptionGroup as eg:
            # libp2p's host runs our body inside its nurseries: give callers the one
            # error that happened, not a group around it.
            leaf = _single_leaf(eg)
            if leaf is None:
                raise
            raise leaf from None

    # -------------------------------------------------------------- transport

    async def connect(self) -> None:
        """Dial every configured node; at least one must answer."""
        errors: list[str] = []

        async def dial(n: _Node) -> None:
            try:
                n.peer = await self.host.connect(n.addr, timeout=self.timeout)
            except OperationError as e:
                errors.append(f"{n.addr}: {e}")
                self._fault(n.addr, "unreachable", str(e))

        async with trio.open_nursery() as nursery:
            for n in self.nodes:
                nursery.start_soon(dial, n)
        if not any(n.peer for n in self.nodes):
            raise OperationError("no node reachable: " + "; ".join(errors))

    def _fault(self, node: str, reason: str, detail: str) -> None:
        self.faults.append(NodeFault(node, reason, detail))
        del self.faults[:-1000]
        log.warning("node fault", extra={"node": node, "reason": reason, "detail": detail})

    async def _call(self, n: _Node, req: query.QueryRequest) -> query.QueryResponse:
        if n.peer is None or not self.host.is_connected(n.peer):
            n.peer = await self.host.connect(n.addr, timeout=self.timeout)
        from .p2p import request

        data = await request(self.host, n.peer, self._protocol, req.encode(),
                                 query.MAX_RESPONSE, self.timeout)
        return query.decode_response(data)

    async def _each(self, fn: Callable[[_Node], Any]) -> list[tuple[_Node, Any]]:
        """Run `fn(node)` on every node concurrently; keep successes, record faults."""
        results: list[tuple[_Node, Any]] = []
        failures: list[BidmeshError] = []

        async def one(n: _Node) -> None:
            try:
                results.append((n, await fn(n)))
            except UntrustedAnswer as e:
                self._fault(n.addr, e.reason, str(e))
                failures.insert(0, e)
            except (PeerError, OperationError) as e:
                self._fault(n.addr, getattr(e, "reason", type(e).__name__), str(e))
                failures.append(e)

        async with trio.open_nursery() as nursery:
            for n in self.nodes:
                nursery.start_soon(one, n)
        if not results:
            if failures:
                raise failures[0]
            raise OperationError("no node configured")
        order = {id(n): i for i, n in enumerate(self.nodes)}
        results.sort(key=lambda r: order[id(r[0])])
        return results

    async def _pages(self, n: _Node, make: Callable[[query.Page], query.QueryRequest],
                     after: int = 0) -> tuple[list[Event], int]:
        """Every page of an events query from one node, verified; (events, cursor)."""
        events: list[Event] = []
        cursor = after
        for _ in range(MAX_PAGES):
            resp = await self._call(n, make(query.Page(cursor)))
            if not isinstance(resp, query.EventsPage):
                raise UntrustedAnswer(f"node {n.addr} answered an events query with "
                                      f"{type(resp).__name__}", "wrong_answer")
            if resp.cursor < cursor:
                raise UntrustedAnswer(f"node {n.addr} moved the cursor backwards",
                                      "bad_cursor")
            events.extend(_check_events(n.addr, resp.records, self.network))
            if not resp.more:
                return events, resp.cursor
            if resp.cursor == cursor and not resp.records:
                raise UntrustedAnswer(f"node {n.addr} says there is more but sends nothing",
                                      "bad_cursor")
            cursor = resp.cursor
        raise UntrustedAnswer(f"node {n.addr} kept paging past {MAX_PAGES} pages", "bad_cursor")

    async def _gather(self, what: str, make: Callable[[query.Page], query.QueryRequest],
                      check: Callable[[str, list[Event]], None] | None = None,
                      ) -> list[Event]:
        """Ask every node, verify each answer, cross-check, return the union."""

        async def fetch(n: _Node) -> list[Event]:
            evs, _ = await self._pages(n, make)
            if check is not None:
                check(n.addr, evs)
            return evs

        answers = await self._each(fetch)
        return self._union(what, [(n.addr, evs) for n, evs in answers])

    def _union(self, what: str, answers: list[tuple[str, list[Event]]]) -> list[Event]:
        union: dict[bytes, Event] = {}
        for _, evs in answers:
            for ev in evs:
                union.setdefault(ev.id, ev)
        if len(answers) >= 2:
            digests = {node: set_digest(evs).hex() for node, evs in answers}
            if len(set(digests.values())) > 1:
                missing = {node: sorted(i.hex() for i in set(union) - {e.id for e in evs})
                           for node, evs in answers}
                d = Disagreement(what, digests, {k: v for k, v in missing.items() if v})
                self.disagreements.append(d)
                del self.disagreements[:-1000]
                log.warning("nodes disagree", extra={"query": what, "digests": digests})
        self._check_own(union.values())
        return list(union.values())

    def _check_own(self, events: Iterable[Event]) -> None:
        """Our own events must agree with our head: another event at our head's seq
        means our key signed two chains (a fork of our own identity)."""
        h = self.state.head
        for ev in events:
            if ev.author == self.key and ev.seq == h.seq and ev.id != h.id:
                raise UntrustedAnswer(
                    f"the network holds another event at our seq {h.seq}: this key is used "
                    "elsewhere (or the state file was restored from an old copy)", "own_fork")

    # -------------------------------------------------------------- raw queries

    async def digest(self) -> dict[str, dict[str, Any]]:
        """Each node's network, state digest and counts."""
        answers = await self._each(lambda n: self._call(n, query.GetDigest()))
        out = {}
        for n, resp in answers:
            if not isinstance(resp, query.Digest):
                raise UntrustedAnswer(f"node {n.addr} answered DIGEST with "
                                      f"{type(resp).__name__}", "wrong_answer")
            if resp.network != self.network:
                raise UsageError(f"node {n.addr} serves network {resp.network!r}, not "
                                 f"{self.network!r}")
            out[n.addr] = {"digest": resp.digest.hex(), "events": resp.events,
                           "authors": resp.authors, "forks": resp.forks}
        return out

    async def get_events(self, ids: Sequence[bytes]) -> list[Event]:
        """Events by id (verified; ids no node has are absent)."""
        want = set(ids)
        out: dict[bytes, Event] = {}
        chunks = [list(ids)[i:i + query.MAX_IDS] for i in range(0, len(ids), query.MAX_IDS)]
        for chunk in chunks:
            def check(node: str, evs: list[Event]) -> None:
                for ev in evs:
                    if ev.id not in want:
                        raise UntrustedAnswer(f"node {node} returned event {ev.id.hex()[:16]}"
                                              " that was not asked for", "unasked_event")

            async def fetch(n: _Node, chunk: list[bytes] = chunk) -> list[Event]:
                got: dict[bytes, Event] = {}
                rest = list(chunk)
                while rest:
                    resp = await self._call(n, query.GetEvents(tuple(rest)))
                    if not isinstance(resp, query.EventsPage):
                        raise UntrustedAnswer(f"node {n.addr} answered GET with "
                                              f"{type(resp).__name__}", "wrong_answer")
                    evs = _check_events(n.addr, resp.records, self.network)
                    check(n.addr, evs)
                    got.update((e.id, e) for e in evs)
                    if not resp.more or not evs:
                        break
                    rest = [i for i in rest if i not in got]
                return list(got.values())

            answers = await self._each(fetch)
            for ev in self._union("get", [(n.addr, evs) for n, evs in answers]):
                out[ev.id] = ev
        return list(out.values())

    async def find_events(self, *, kind: str | None = None, author: bytes | None = None,
                          ref: bytes | None = None) -> list[Event]:
        """Events matching every filter given, from every node, verified."""

        def check(node: str, evs: list[Event]) -> None:
            for ev in evs:
                if ((kind and ev.kind != kind) or (author and ev.author != author)
                        or (ref and ev.ref != ref)):
                    raise UntrustedAnswer(f"node {node} returned {ev!r}, which does not match "
                                          "the query", "unasked_event")

        return await self._gather(f"find:{kind}:{author and author.hex()}:{ref and ref.hex()}",
                                  lambda p: query.FindEvents(kind, author, ref, p), check)

    async def auction_events(self, request_id: bytes) -> list[Event]:
        return await self._gather(f"auction:{request_id.hex()}",
                                  lambda p: query.AuctionBundle(request_id, p),
                                  self._auction_check(request_id))

    def _auction_check(self, request_id: bytes) -> Callable[[str, list[Event]], None]:
        def check(node: str, evs: list[Event]) -> None:
            commits = {e.id for e in evs if e.kind == "commit" and e.ref == request_id}
            for ev in evs:
                if not _auction_member(ev, request_id, commits):
                    raise UntrustedAnswer(f"node {node} put {ev!r} in the bundle of auction "
                                          f"{request_id.hex()[:16]}", "unasked_event")
        return check

    async def reputation_events(self, keys: Iterable[bytes]) -> list[Event]:
        ks = sorted(set(keys))
        out: dict[bytes, Event] = {}
        for i in range(0, len(ks), query.MAX_KEYS):
            chunk = tuple(ks[i:i + query.MAX_KEYS])

            def make(p: query.Page, c: tuple[bytes, ...] = chunk) -> query.QueryRequest:
                return query.ReputationBundle(c, p)

            for ev in await self._gather("reputation", make):
                out[ev.id] = ev
        return list(out.values())

    async def lease_events(self, key: bytes | None = None) -> list[Event]:
        k = key or self.key
        return await self._gather(f"leases:{k.hex()}", lambda p: query.LeasesOf(k, p))

    # -------------------------------------------------------------- derived views

    def _fold(self, events: Iterable[Event]) -> Market:
        market, forks = fold(events)
        for f in forks:
            if f not in self.forks:
                self.forks.append(f)
        return market

    async def auction(self, request_id: bytes) -> AuctionInfo:
        """The auction re-derived from verified events, bids with reputation."""
        evs = await self.auction_events(request_id)
        return await self._auction_info(request_id, evs)

    async def _auction_info(self, request_id: bytes, evs: list[Event],
                            rep: list[Event] | None = None) -> AuctionInfo:
        if not any(e.id == request_id for e in evs):
            raise UsageError(f"no node knows a request {request_id.hex()}")
        if rep is None:
            # Bidders' records (best value, the table) and the recipient's (its
            # payment record beside the request).
            keys = {e.author for e in evs if e.kind in ("bid", "commit", "request")}
            rep = await self.reputation_events(keys) if keys else []
        market = self._fold([*evs, *rep])
        a = market.auctions.get(request_id)
        if a is None:
            reason = next((i.reason for i in market.ignored if i.event_id == request_id), "?")
            raise UsageError(f"request {request_id.hex()[:16]} does not open an auction "
                             f"({reason})")
        return AuctionInfo(market, a, tuple(_bid_infos(market, a)), a.status(now_ms()))

    async def bids(self, request_id: bytes) -> list[BidInfo]:
        """Bids of an auction: price, provider, status, reputation score and counts."""
        return list((await self.auction(request_id)).bids)

    async def watch_bids(self, request_id: bytes, *, interval: float = 1.0,
                         until_ms: int | None = None) -> AsyncIterator[AuctionInfo]:
        """Yield the auction now and again whenever its bids change. Ends once the
        auction has an outcome, or `until_ms` (default: the bid deadline plus 2
        intervals) has passed. Each poll fetches only what arrived since the last."""
        events: dict[bytes, Event] = {}
        cursors: dict[str, int] = {}
        rep: dict[bytes, Event] = {}
        have_rep: set[bytes] = set()
        last: tuple[Any, ...] | None = None
        check = self._auction_check(request_id)
        while True:
            async def fetch(n: _Node) -> list[Event]:
                evs, cur = await self._pages(
                    n, lambda p: query.AuctionBundle(request_id, p), cursors.get(n.addr, 0))
                cursors[n.addr] = cur
                check(n.addr, [*events.values(), *evs])
                return evs

            answers = await self._each(fetch)
            for _, evs in answers:
                for ev in evs:
                    events.setdefault(ev.id, ev)
            self._check_own(events.values())
            bidders = {e.author for e in events.values()
                       if e.kind in ("bid", "commit", "request")}
            if bidders - have_rep:
                for ev in await self.reputation_events(bidders - have_rep):
                    rep[ev.id] = ev
                have_rep |= bidders
            if request_id in events:
                info = await self._auction_info(request_id, list(events.values()),
                                                list(rep.values()))
                sig = (info.status, tuple((b.id, b.status, b.price) for b in info.bids))
                if sig != last:
                    last = sig
                    yield info
                deadline = until_ms if until_ms is not None else (
                    info.auction.deadline_ms + int(2000 * interval))
                if info.auction.outcome is not None or now_ms() > deadline:
                    return
            elif until_ms is not None and now_ms() > until_ms:
                raise UsageError(f"no node knows a request {request_id.hex()}")
            await trio.sleep(interval)

    async def with_award_context(self, events: list[Event], depth: int = 2) -> list[Event]:
        """`events` plus what verifying their awards needs: each award's auction bundle,
        and for `best_value` auctions the bidders' reputation bundles as of the close
        (whose own best-value awards need the same again: `depth` levels, bounded)."""
        have = {e.id: e for e in events}
        auctions_done: set[bytes] = set()
        rep_done: set[bytes] = set()
        for _ in range(depth):
            need = sorted({e.body.request for e in have.values() if isinstance(e.body, Award)}
                          - auctions_done)[:MAX_CONTEXT_AUCTIONS]
            if not need:
                break
            for rid in need:
                if not any(e.kind == "request" and e.id == rid for e in have.values()):
                    have.update((e.id, e) for e in await self.auction_events(rid))
                auctions_done.add(rid)
            bidders: set[bytes] = set()
            for rid in need:
                req = have.get(rid)
                if req is not None and isinstance(req.body, Request) \
                        and req.body.rule == "best_value":
                    bidders |= {e.author for e in have.values()
                                if e.kind in ("bid", "commit") and e.ref == rid}
            if bidders - rep_done:
                have.update((e.id, e) for e in await self.reputation_events(bidders - rep_done))
                rep_done |= bidders
        return list(have.values())

    async def leases(self) -> list[LeaseInfo]:
        """Leases we are a party to (recipient, provider, member device, group member)."""
        return (await self.lease_report())[0]

    async def lease_report(self) -> tuple[list[LeaseInfo], list[Unverified]]:
        """Our leases, and the awards of ours that do not verify even with everything
        fetched that verifying them needs, each with the reason (never dropped
        silently)."""
        own = await self.lease_events()  # the bundles of leases the nodes say are ours
        market = self._fold(await self.with_award_context(own))
        out = []
        for lease in market.leases.values():
            role = ("recipient" if lease.recipient == self.key else
                    "provider" if lease.provider == self.key else
                    "member" if self.key in lease.keys else None)
            if role is not None:
                out.append(LeaseInfo(lease, market.paid.get(lease.id, 0), role,
                                     lease_json(market, lease)))
        bad = [_unverified(market, e) for e in own if isinstance(e.body, Award)
               and e.body.winner is not None and e.id not in market.leases]
        return out, [b for b in bad if b is not None]

    async def lease(self, lease_id: bytes) -> tuple[Market, Lease]:
        events = await self.lease_events()
        if not any(e.id == lease_id and e.kind == "award" for e in events):
            events += await self.get_events([lease_id])
        events = await self.with_award_context(events)
        market = self._fold(events)
        lease = market.leases.get(lease_id)
        if lease is None:
            award = next((e for e in events if e.id == lease_id), None)
            why = _unverified(market, award) if award is not None else None
            raise UsageError(f"no lease {lease_id.hex()[:16]} of ours is known to the nodes"
                             + (f": its award does not verify ({why.reason})" if why else
                                " (is the award accepted? see `bidmesh client leases`)"))
        return market, lease

    async def reputation(self, key: bytes, as_of_ms: int | None = None) -> ReputationInfo:
        """A key's reputation in both roles, re-derived from its rating bundle."""
        # The rated deals' awards verify only with their bidders' reputations (best
        # value), so fetch those too: a rating on a lease that does not verify counts
        # for nothing, which showed a recipient at 50 % with 0 ratings.
        market = self._fold(await self.with_award_context(await self.reputation_events([key])))
        t = now_ms() if as_of_ms is None else as_of_ms
        return ReputationInfo(key, t, market.reputation.score(key, "provider", t),
                              market.reputation.score(key, "recipient", t))

    # -------------------------------------------------------------- own chain

    async def sync_head(self) -> ChainHead:
        """Move our head forward to the highest chain of ours a node can prove.

        Each node's claim about our head is only a claim: nodes are tried from the
        highest claim down, and a node that cannot prove its claim with a chain of our
        own signed events linking to our head is faulted and outvoted by the next. A
        lying node never blocks us; at worst we keep the head we have."""
        async def heads(n: _Node) -> query.HeadInfo:
            resp = await self._call(n, query.GetHeads((self.key,)))
            if not isinstance(resp, query.Heads) or len(resp.heads) != 1 \
                    or resp.heads[0].author != self.key:
                raise UntrustedAnswer(f"node {n.addr} answered HEADS wrongly", "wrong_answer")
            return resp.heads[0]

        answers = await self._each(heads)
        for n, claim in sorted(answers, key=lambda a: -a[1].seq):
            if claim.seq <= self.state.head.seq:
                break
            try:
                await self._adopt_chain(n, claim.seq)
                break
            except UntrustedAnswer as e:
                self._fault(n.addr, e.reason, str(e))
            except (PeerError, OperationError) as e:
                self._fault(n.addr, getattr(e, "reason", type(e).__name__), str(e))
        self._head_checked = True
        return self.state.head

    async def _adopt_chain(self, n: _Node, claimed: int) -> None:
        """Fetch our events after our head from `n`; adopt them if they link and reach
        the seq it claimed (UntrustedAnswer otherwise, leaving our head as it was)."""
        h = self.state.head
        evs, _ = await self._pages(n, lambda p: query.FindEvents(None, self.key, None, p))
        chain = sorted((e for e in evs if e.author == self.key and e.seq > h.seq),
                       key=lambda e: e.seq)
        prev, seq, ts = h.id, h.seq, h.ts_ms
        for ev in chain:
            if ev.seq != seq + 1 or ev.prev != prev:
                raise UntrustedAnswer(f"node {n.addr} returned our events with a broken "
                                      f"chain at seq {ev.seq}", "bad_chain")
            prev, seq, ts = ev.id, ev.seq, ev.ts_ms
        if seq < claimed:
            raise UntrustedAnswer(f"node {n.addr} claims our head is seq {claimed} "
                                  f"but proves only {seq}", "bad_chain")
        self.state.head = ChainHead(seq, prev, ts)
        self.state.save()

    @property
    def quorum(self) -> int:
        """How many of our nodes must hand a record back before we drop our copy."""
        return self.confirm_quorum or len(self.nodes) // 2 + 1

    def pending(self) -> list[Event]:
        """Our signed records no quorum of our nodes has yet proven to hold, oldest
        first: kept in the state file and re-submitted by every command."""
        return [decode_wire(w, self.network, verify=False) for w in self.state.unconfirmed]

    async def _submit(self, wires: Sequence[bytes]) -> dict[bytes, _Results]:
        """Submit to every node; per wire, each answering node's result."""
        async def send(n: _Node) -> list[query.SubmitResult]:
            resp = await self._call(n, query.Submit(tuple(wires)))
            if not isinstance(resp, query.Submitted) or len(resp.results) != len(wires):
                raise UntrustedAnswer(f"node {n.addr} answered SUBMIT wrongly", "wrong_answer")
            return list(resp.results)

        out: dict[bytes, list[tuple[str, query.SubmitResult]]] = {w: [] for w in wires}
        for n, results in await self._each(send):
            for w, r in zip(wires, results, strict=True):
                out[w].append((n.addr, r))
        return out

    async def holders(self, ids: Sequence[bytes]) -> dict[bytes, set[str]]:
        """Which of our nodes hand back each event by id (verified, byte-identical to
        what was asked for): the proof that a node holds it, unlike its word."""
        want = set(ids)
        out: dict[bytes, set[str]] = {i: set() for i in want}

        async def fetch(n: _Node) -> None:
            resp = await self._call(n, query.GetEvents(tuple(sorted(want))[:query.MAX_IDS]))
            if not isinstance(resp, query.EventsPage):
                raise UntrustedAnswer(f"node {n.addr} answered GET with "
                                      f"{type(resp).__name__}", "wrong_answer")
            for ev in _check_events(n.addr, resp.records, self.network):
                if ev.id in want:
                    out[ev.id].add(n.addr)

        with contextlib.suppress(PeerError, OperationError):  # faults are recorded
            await self._each(fetch)
        return out

    async def _flush_unconfirmed(self) -> dict[bytes, _Results]:
        """Re-submit every unconfirmed record (in chain order), then drop those a
        quorum of our nodes hands back. A node saying "accepted" proves nothing."""
        if not self.state.unconfirmed:
            return {}
        wires = list(self.state.unconfirmed)[:query.MAX_IDS]
        try:
            results = await self._submit(wires)
        except (PeerError, OperationError) as e:
            log.warning("no node took our unconfirmed records", extra={"error": str(e)})
            return {}
        ids = [decode_wire(w, self.network, verify=False).id for w in wires]
        held = await self.holders(ids)
        done = {w for w, i in zip(wires, ids, strict=True) if len(held[i]) >= self.quorum}
        if done:
            self.state.unconfirmed = [w for w in self.state.unconfirmed if w not in done]
            self.state.save()
        return results

    async def flush(self) -> list[Event]:
        """Re-submit our unconfirmed records; return those still unconfirmed."""
        async with self._lock:
            await self._flush_unconfirmed()
        return self.pending()

    async def publish(self, body: Body | Callable[[int], Body]) -> Event:
        """Sign `body` as our next event, submit it to every node, and keep it in our
        state file until a quorum of our nodes hands it back (`pending()`). A callable
        is given the event's timestamp and returns the body (times relative to it)."""
        async with self._lock:
            await self._flush_unconfirmed()
            await self.sync_head()
            h = self.state.head
            ts = max(now_ms(), h.ts_ms)
            if not isinstance(body, Body):
                body = body(ts)
            ev = sign_event(self.identity.seed, h.seq + 1, h.id, ts, body, self.network)
            before = ChainHead(h.seq, h.id, h.ts_ms)
            # Write ahead: once signed and sent, this is our event at this seq forever.
            self.state.head = ChainHead(ev.seq, ev.id, ev.ts_ms)
            self.state.unconfirmed = [*self.state.unconfirmed, ev.wire]
            self.state.save()
            mine = (await self._flush_unconfirmed()).get(ev.wire, [])
            if not mine and ev.wire in self.state.unconfirmed:
                raise OperationError("no node took the event; it is kept and resent by the "
                                     "next command (see `bidmesh client whoami`)")
            for node, r in mine:
                if not r.ok:
                    self._fault(node, r.reason or r.status, f"refused our event: {r.detail}")
            # Forget the event only when every one of our nodes answered and each
            # rejected it as invalid: then no node holds it and the seq is free again.
            # Anything less (one node unreachable, one "accepted") keeps it, since
            # re-signing that seq could fork our own chain.
            answered = {node for node, _ in mine}
            if all(r.status == "rejected" for _, r in mine) \
                    and answered >= {n.addr for n in self.nodes}:
                self.state.head = before
                self.state.unconfirmed = [w for w in self.state.unconfirmed if w != ev.wire]
                self.state.save()
                node, r = mine[0]
                raise RemoteError(f"node {node} rejected the {body.KIND} ({r.reason}): "
                                  f"{r.detail}")
            return ev

    # -------------------------------------------------------------- recipient actions

    async def request(
        self, service: str, *, duration_ms: int, reserve: int, currency: str = "EUR",
        close_ms: int | None = None, close_in_ms: int = 60_000, start_ms: int | None = None,
        chain: Sequence[str] = (), max_rate_bps: int | None = None,
        min_rate_bps: int | None = None, devices: Sequence[bytes] = (),
        phones: Sequence[str] = (), users: Sequence[str] = (), max_devices: int | None = None,
        rule: str = "lowest", sealed: bool = False, reveal_ms: int | None = None,
        reveal_window_ms: int = 30_000, group: bool = False, note: str = "",
    ) -> Event:
        """Post a request (an auction). Times are ms since the epoch; by default bids
        close `close_in_ms` after the request's own timestamp, sealed bids are revealed
        within `reveal_window_ms` after that, and the lease starts at the bid deadline."""
        def build(posted_ms: int) -> Request:
            # From the signed timestamp, not from before the round trips publish()
            # makes first: on a slow link or a loaded host those took longer than a
            # short window, and the request closed before it was posted.
            close = close_ms if close_ms is not None else posted_ms + close_in_ms
            reveal = reveal_ms if reveal_ms is not None else (
                close + reveal_window_ms if sealed else close)
            try:
                return Request(
                    service=service, chain=tuple(chain),
                    start_ms=start_ms if start_ms is not None else reveal,
                    duration_ms=duration_ms, max_rate_bps=max_rate_bps,
                    min_rate_bps=min_rate_bps,
                    members=Members(devices=tuple(devices), phones=tuple(phones),
                                    users=tuple(users), max_devices=max_devices),
                    reserve=reserve, currency=currency, close_ms=close, reveal_ms=reveal,
                    rule=rule, sealed=sealed, group=group, note=note)
            except InvalidEvent as e:
                raise UsageError(f"invalid request: {e}") from e

        build(now_ms())  # a bad request is refused before any network traffic
        return await self.publish(build)

    async def award(self, request_id: bytes) -> tuple[Event, Award]:
        """Award our auction to the winner the rule gives over every valid bid (as
        re-derived here), naming every bid considered."""
        info = await self.auction(request_id)
        a = info.auction
        if a.recipient != self.key:
            raise UsageError("only the recipient who posted the request can award it")
        if a.outcome is not None:
            raise UsageError(f"auction already decided ({a.status(now_ms())})")
        if now_ms() <= a.deadline_ms:
            raise UsageError(f"bids are final only after {a.deadline_ms} "
                             f"(in {(a.deadline_ms - now_ms()) / 1000:.1f} s); award then")
        body = build_award(info.market, a)
        return await self.publish(body), body

    async def pledge(self, request_id: bytes, *, willing: bool = True, amount: int = 0,
                     sponsor: Sequence[bytes] = ()) -> Event:
        """Join a group request: whether we pay, at most how much, and whom we sponsor."""
        info = await self.auction(request_id)
        if not info.auction.request.group:
            raise UsageError("that request is not a group request")
        try:
            body = Pledge(request=request_id, willing=willing, amount=amount,
                          sponsor=tuple(sponsor))
        except InvalidEvent as e:
            raise UsageError(f"invalid pledge: {e}") from e
        return await self.publish(body)

    async def pay(self, lease_id: bytes, amount: int | None = None, method: str = "ledger",
                  reference: str = "", on_behalf: Sequence[bytes] = ()) -> Event:
        """Pay for a lease. Default amount: our share (group) or what is still owed."""
        market, lease = await self.lease(lease_id)
        if self.key != lease.recipient and self.key not in lease.group_members:
            raise UsageError("only the recipient or a group member pays for a lease")
        if amount is None:
            share = lease.shares().get(self.key) if lease.group_members else None
            mine = sum(p.amount for p in market.payments.get(lease.id, ())
                       if p.payer == self.key)
            owed = lease.price - market.paid.get(lease.id, 0)
            amount = max(0, (share - mine) if share is not None else owed)
            if amount == 0:
                raise UsageError(f"nothing is owed on lease {lease.id.hex()[:16]} by us; "
                                 "pass --amount to pay more anyway")
        try:
            body = Payment(lease=lease.id, amount=amount, currency=lease.currency,
                           method=method, reference=reference, on_behalf=tuple(on_behalf))
        except InvalidEvent as e:
            raise UsageError(f"invalid payment: {e}") from e
        return await self.publish(body)

    async def rate(self, lease_id: bytes, *, satisfied: bool, score: int,
                   text: str = "") -> Event:
        """Rate the other party of a lease (a member device rates the provider)."""
        market, lease = await self.lease(lease_id)
        if any(r.rater == self.key for r in market.ratings.get(lease.id, ())):
            raise UsageError(f"we already rated lease {lease.id.hex()[:16]}; a lease is rated "
                             "once per side")
        if self.key == lease.provider:
            subject, role = lease.recipient, "recipient"
        elif self.key in lease.keys:
            subject, role = lease.provider, "provider"
        else:
            raise UsageError("only the parties of a lease can rate it")
        try:
            body = Rating(lease=lease.id, subject=subject, role=role, satisfied=satisfied,
                          score=score, text=text)
        except InvalidEvent as e:
            raise UsageError(f"invalid rating: {e}") from e
        return await self.publish(body)

    # -------------------------------------------------------------- dataplane

    async def provider_addrs(self, provider: bytes) -> list[str]:
        """Dataplane multiaddrs from the provider's latest offer (verified)."""
        offers = await self.find_events(kind="offer", author=provider)
        if not offers:
            return []
        latest = max(offers, key=lambda e: e.seq)
        return list(getattr(latest.body, "addrs", ()))

    async def stream(self, lease_id: bytes, source: Any, *,
                     sink: Callable[[bytes], Any] | None = None,
                     chains: Sequence[Sequence[str]] | None = None, protocol: str = "lp",
                     delegation: bytes | None = None, timeout: float = 60.0) -> Any:
        """Send `source` (bytes chunks of `protocol` packets) through the provider of
        our lease and receive the processed stream (see node/dataplane/client.py).
        A member device streams with its own key. Returns the dataplane's result."""
        from .dataplane.client import stream_through_lease

        _, lease = await self.lease(lease_id)
        from .p2p import peer_id_from_pubkey

        peer = peer_id_from_pubkey(lease.provider)
        if not self.host.is_connected(peer):
            addrs = await self.provider_addrs(lease.provider)
            for a in [*addrs, *(n.addr for n in self.nodes)]:
                if a.endswith(str(peer)):
                    with contextlib.suppress(OperationError):
                        await self.host.connect(a, timeout=self.timeout)
                        break
            else:
                if not self.host.is_connected(peer):
                    raise OperationError(f"cannot reach provider {lease.provider.hex()[:16]}: "
                                         "no dialable address in its offer")
        use_chains = chains or [lease_chain(lease)]
        return await stream_through_lease(
            self.host, peer, lease, self.identity, source, protocol, use_chains,
            network=self.network, delegation=delegation, sink=sink, timeout=timeout)


    # -------------------------------------------------------------- tunnels (bandwidth)

    async def reach_provider(self, lease: Lease) -> p2p.PeerId:
        """The lease's provider, connected (dialed through its offer's addresses)."""
        from .p2p import peer_id_from_pubkey

        peer = peer_id_from_pubkey(lease.provider)
        if self.host.is_connected(peer):
            return peer
        addrs = await self.provider_addrs(lease.provider)
        errors = []
        for a in [*addrs, *(n.addr for n in self.nodes)]:
            if a.endswith(str(peer)):
                try:
                    await self.host.connect(a, timeout=self.timeout)
                    return peer
                except OperationError as e:
                    errors.append(f"{a}: {e}")
        if self.host.is_connected(peer):
            return peer
        raise OperationError(f"cannot reach provider {lease.provider.hex()[:16]}: "
                             + ("; ".join(errors[:3]) if errors else
                                "no dialable address in its offer"))

    async def open_tunnel(self, lease: bytes | Lease, host: str, port: int, *,
                          delegation: bytes | None = None,
                          timeout: float | None = None) -> Tunnel:
        """Open a tunnel to `host:port` through the provider of a bandwidth lease
        (docs/dataplane.md §14): a trio HalfCloseableStream. The provider resolves
        `host`. Raises TunnelUnauthorized / TunnelRefused (`.reason`) when refused,
        OperationError when the provider cannot be reached; reading or writing an open
        tunnel raises TunnelFailed (`lease_ended`, `broken`, ...)."""
        from .dataplane.tunnel_client import open_tunnel

        if not isinstance(lease, Lease):
            _, lease = await self.lease(lease)
        peer = await self.reach_provider(lease)
        return await open_tunnel(self.host, peer, lease.id, host, port, network=self.network,
                                 delegation=delegation, timeout=timeout or self.timeout)


def lease_chain(lease: Lease) -> list[str]:
    """What a lease's stream is processed with: its chain; else its service when that is
    a processing service; else (transport such as `bandwidth`) passed through as is."""
    if lease.chain:
        return list(lease.chain)
    from .processors import load_processors

    return [lease.service] if lease.service in load_processors() else ["identity"]


def _single_leaf(eg: BaseExceptionGroup[BaseException]) -> BaseException | None:
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        if len(e.exceptions) != 1:
            return None
        e = e.exceptions[0]
    return e


def _unverified(market: Market, award: Event) -> Unverified | None:
    if not isinstance(award.body, Award) or award.id in market.leases:
        return None
    rid = award.body.request
    ign = next((i for i in market.ignored if i.event_id == award.id), None)
    if ign is not None:
        return Unverified(award.id, rid, ign.reason, "the award counts for nothing")
    check = market.awards.get(award.id)
    if check is not None and check.problems:
        return Unverified(award.id, rid, check.problems[0], "; ".join(check.problems))
    if rid not in market.auctions:
        return Unverified(award.id, rid, "auction_unknown",
                          "no node returned the request this award decides")
    return Unverified(award.id, rid, "not_verified", "the award yields no lease here")


def _bid_infos(market: Market, a: Auction) -> list[BidInfo]:
    out = []
    won = a.outcome.winner if a.outcome is not None else None
    for b in a.bids.values():
        rep = market.reputation.score(b.provider, "provider", a.request.close_ms)
        out.append(BidInfo(b.id, b.provider, b.price, b.status, b.reason, b.sealed, b.ts_ms,
                           won == b.id, rep))
    return out
