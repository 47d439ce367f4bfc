"""Talking to nodes without trusting them: dial, query with paging and bounds, verify
every record, union the answers of several nodes and note where they disagree."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import trio

from .. import query
from ..errors import BidmeshError, OperationError, PeerError, Reason, UntrustedAnswer, UsageError
from ..events import NETWORK_RE, Event
from ..keys import Identity, load_or_create_key
from .results import Disagreement, NodeFault
from .state import KEY_FILE, STATE_FILE, ClientState
from .verify import _auction_member, _check_events, set_digest

if TYPE_CHECKING:  # libp2p costs ~1 s to import: loaded when a client actually connects
    from .. import p2p

log = logging.getLogger("bidmesh.client")

MAX_PAGES = 10_000  # per query and node: bounds a node that keeps answering "more"


@dataclass
class _Node:
    addr: str
    peer: p2p.PeerId | None = None
    cursor: dict[str, int] = field(default_factory=dict)  # watch cursors


class QueryClient:
    """The light client's transport: nodes dialled over one libp2p host, the query
    protocol, paging, and the verified raw queries whose answers are unions of
    verified events (disagreements between nodes recorded). `LightClient` builds the
    recipient's views and actions on it; create one with `LightClient.open(...)`."""

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
                   confirm_quorum: int | None = None) -> AsyncIterator[Self]:
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
        from .. import p2p

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
        from ..p2p import request

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
                                      f"{type(resp).__name__}", Reason.WRONG_ANSWER)
            if resp.cursor < cursor:
                raise UntrustedAnswer(f"node {n.addr} moved the cursor backwards",
                                      Reason.BAD_CURSOR)
            events.extend(_check_events(n.addr, resp.records, self.network))
            if not resp.more:
                return events, resp.cursor
            if resp.cursor == cursor and not resp.records:
                raise UntrustedAnswer(f"node {n.addr} says there is more but sends nothing",
                                      Reason.BAD_CURSOR)
            cursor = resp.cursor
        raise UntrustedAnswer(f"node {n.addr} kept paging past {MAX_PAGES} pages",
                              Reason.BAD_CURSOR)

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
                    "elsewhere (or the state file was restored from an old copy)", Reason.OWN_FORK)

    # -------------------------------------------------------------- raw queries

    async def digest(self) -> dict[str, dict[str, Any]]:
        """Each node's network, state digest and counts."""
        answers = await self._each(lambda n: self._call(n, query.GetDigest()))
        out = {}
        for n, resp in answers:
            if not isinstance(resp, query.Digest):
                raise UntrustedAnswer(f"node {n.addr} answered DIGEST with "
                                      f"{type(resp).__name__}", Reason.WRONG_ANSWER)
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
                                              " that was not asked for", Reason.UNASKED_EVENT)

            async def fetch(n: _Node, chunk: list[bytes] = chunk) -> list[Event]:
                got: dict[bytes, Event] = {}
                rest = list(chunk)
                while rest:
                    resp = await self._call(n, query.GetEvents(tuple(rest)))
                    if not isinstance(resp, query.EventsPage):
                        raise UntrustedAnswer(f"node {n.addr} answered GET with "
                                              f"{type(resp).__name__}", Reason.WRONG_ANSWER)
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
                                          "the query", Reason.UNASKED_EVENT)

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
                                          f"{request_id.hex()[:16]}", Reason.UNASKED_EVENT)
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


def _single_leaf(eg: BaseExceptionGroup[BaseException]) -> BaseException | None:
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        if len(e.exceptions) != 1:
            return None
        e = e.exceptions[0]
    return e
