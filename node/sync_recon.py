"""The `/sync/2` session: set reconciliation instead of HEADS paging.

`/sync/1` pages through every author's head whenever digests differ: ~100 pages
per session at 100,000 authors. `/sync/2` (docs/PROTOCOL.md §7.5) finds the authors
that differ by reconciling fingerprints over the author key space (node/recon.py),
then fetches what the peer has beyond ours in batches of many authors:

1. RECON from the root: the peer answers each node asked about with its children's
   counts and fingerprints, or with its items when it holds at most one; we descend
   into the children that differ from ours (no DIGEST: the root's answer says
   whether we agree). Where we hold nothing at all, HEADS lists the node instead.
2. Items that differ become wants exactly as HEADS entries do in `/sync/1`
   (`SyncSession._consider`); FETCH pulls up to FETCH_ENTRIES_MAX authors per
   request, each from our head (left out when the peer holds the same record);
   FORKS as before.

`ReconSession` is the same sans-I/O state machine as `SyncSession`, with the same
local bounds (`SyncLimits`: requests, session time, stall and idle cuts, trickle
detection), plus the reconciliation's node budget (`Reconciler`): a peer answering
with made-up fingerprints (endless splitting) is cut as idle.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from . import recon
from .errors import Reason
from .events import MAX_SEQ, peek_chain_position
from .ledger import Ledger
from .recon import Node, Reconciler
from .sync import (
    FETCH_ENTRIES_MAX,
    SKIP_ID_BYTES,
    FetchEntry,
    FetchRequest,
    FetchResponse,
    ForksRequest,
    HeadEntry,
    HeadsRequest,
    HeadsResponse,
    ReconAnswer,
    ReconRequest,
    ReconResponse,
    SyncRequest,
    SyncResponse,
)
from .sync import ReconNode as ReconNodeWire
from .sync_session import SyncLimits, SyncSession, _Want

VERSION = 2


@dataclass
class _Listing:
    """A node where we hold nothing, listed with HEADS pages."""

    node: Node
    after: bytes | None
    high: bytes | None
    remaining: int  # what the peer said the node holds, less what it listed so far


def _before(key: bytes) -> bytes | None:
    """The key just before `key` (HEADS lists authors strictly after a key)."""
    v = int.from_bytes(key, "big")
    return None if v == 0 else (v - 1).to_bytes(32, "big")


class ReconSession(SyncSession):
    """One `/sync/2` exchange with one peer (see the module docstring and
    `SyncSession`). `salt` defaults to fresh random bytes (a peer must not know it
    before the session: it keys the fingerprints)."""

    def __init__(
        self,
        ledger: Ledger,
        limits: SyncLimits | None = None,
        *,
        gaps: list[tuple[bytes, int, int]] | None = None,
        live_after_ms: int | None = None,
        clock: Callable[[], float] | None = None,
        salt: bytes | None = None,
        nodes_base: int = 1024,
        nodes_per_found: int = 64,
    ) -> None:
        super().__init__(ledger, limits, gaps=gaps, live_after_ms=live_after_ms, clock=clock)
        self.recon = Reconciler(ledger.recon_index, salt or os.urandom(recon.SALT_BYTES),
                                nodes_base=nodes_base, nodes_per_found=nodes_per_found)
        self._listing: collections.deque[_Listing] = collections.deque()
        if gaps is None:
            self._phase = "heads"  # reconciling
            if not len(ledger.recon_index()):
                # A fresh node: every author differs, list them all (HEADS pages).
                self.recon.queue.clear()
                self._listing.append(_Listing(Node(0, 0), None, None, MAX_SEQ))
        self._asked: list[Node] = []  # nodes of the outstanding RECON request
        self._fetching: list[_Want] = []  # wants of the outstanding FETCH request
        self._root = True  # the next RECON answer is the root's

    # ---------------------------------------------------------- requests

    def _next(self) -> SyncRequest | None:
        if self._phase == "done" or self.failed:
            return None
        forks = next((w for w in self._wants if w.forks and not w.started), None)
        if forks is not None:
            # The inherited FORKS handling takes the want at the front.
            self._wants.remove(forks)
            self._wants.appendleft(forks)
            return ForksRequest(forks.author)
        fetch = self._fetch_request()
        req = self._fetch_or_listing(fetch, self._stall_near())
        if req is not None:
            return req
        if self._phase == "heads":
            batch = self.recon.batch()
            if batch is not None:
                split, nodes = batch
                self._asked = nodes
                return ReconRequest(self.recon.salt, split, tuple(
                    _wire_node(n) for n in nodes))
            if self.recon.over_budget:
                self._end("idle", f"reconciliation asked about {self.recon.asked} nodes and "
                          f"found {self.recon.found} differing items")
                return None
            self._phase = "heads_done"
        return fetch

    def _fetch_or_listing(self, fetch: FetchRequest | None,
                          stall_near: bool) -> FetchRequest | HeadsRequest | None:
        """`fetch` or the next listing page, whichever comes first; None: reconcile."""
        reconciling = self._phase == "heads" and not (self.recon.done and not self._listing)
        # Fetch once a FETCH would be full anyway (as many wants as records it may
        # bring), so a lossy link that ends sessions early still stores something.
        full = min(FETCH_ENTRIES_MAX, self.limits.range_limit)
        if fetch is not None and (not reconciling or len(fetch.entries) >= full or stall_near):
            return fetch
        if self._listing:
            lst = self._listing[0]
            return HeadsRequest(lst.after, max(1, min(lst.remaining, self.limits.heads_page)))
        return None

    def _stall_near(self) -> bool:
        """Half the stall time passed without storing anything: fetch what we know of
        before reconciling further (a slow honest peer is not cut for it)."""
        return self.clock is not None and (
            self.clock() - self.progress_at >= self.limits.stall_s / 2)

    def _fetch_request(self) -> FetchRequest | None:
        picked = self._fetch_entries()
        if not picked:
            return None
        self._fetching = [w for _, w in picked]
        return FetchRequest(tuple(e for e, _ in picked), self.limits.range_limit,
                            self.limits.range_bytes)

    def _fetch_entries(self, heads: dict[bytes, tuple[int, bytes]] | None = None,
                       done: frozenset[int] = frozenset()) -> list[tuple[FetchEntry, _Want]]:
        """The next FETCH's entries, in author order; wants with nothing left to
        fetch are dropped. With `heads` ((seq, id) to assume for some authors) and
        `done` (ids of wants to leave out): what they would be then, changing nothing."""
        entries: dict[bytes, tuple[FetchEntry, _Want]] = {}
        for w in list(self._wants):
            if w.forks or id(w) in done:
                continue
            e = self._entry(w, heads)
            if e is None:
                if heads is None:
                    self._wants.remove(w)
                continue
            if w.author not in entries:
                entries[w.author] = (e, w)
            if len(entries) >= FETCH_ENTRIES_MAX:
                break
        return [entries[a] for a in sorted(entries)]

    def _entry(self, w: _Want,
               heads: dict[bytes, tuple[int, bytes]] | None = None) -> FetchEntry | None:
        forked_at = self.ledger.forked().get(w.author)
        if w.probe:
            if w.started or forked_at is not None:
                return None
            held = self.ledger.id_at(w.author, w.target)
            return FetchEntry(w.author, w.target, held[:SKIP_ID_BYTES] if held else None)
        head = (heads or {}).get(w.author)
        if head is None and (h := self.ledger.head(w.author)) is not None:
            head = (h.seq, h.id)
        have = head[0] if head else 0
        target = w.target if forked_at is None else min(w.target, forked_at - 1)
        if have >= target:
            return None
        # From our head: the peer leaves it out when it holds the same record, and
        # sends its own when not, so a diverging branch arrives as a fork proof.
        return FetchEntry(w.author, max(1, have), head[1][:SKIP_ID_BYTES] if head else None)

    def next_if_stored(self, resp: SyncResponse | None) -> SyncRequest | None:
        """As `SyncSession.next_if_stored`, for FETCH: the same wants, each reached
        one from the last record the answer brought for it (read from the bytes)."""
        req = self._pending
        if not isinstance(req, FetchRequest) or not isinstance(resp, FetchResponse):
            return super().next_if_stored(resp)
        if (self.failed or len(resp.records) > len(self._fetching)
                or any(w.forks and not w.started for w in self._wants)):
            return None  # a FORKS request comes first
        heads: dict[bytes, tuple[int, bytes]] = {}
        done: set[int] = set()
        for w, recs in zip(self._fetching, resp.records, strict=False):
            if w.probe or not recs:
                done.add(id(w))
                continue
            pos = peek_chain_position(recs[-1])
            if pos is None or pos[0] != w.author:
                return None
            heads[w.author] = (pos[1], hashlib.sha256(pos[2]).digest())
        picked = self._fetch_entries(heads, frozenset(done))
        fetch = FetchRequest(tuple(e for e, _ in picked), self.limits.range_limit,
                             self.limits.range_bytes) if picked else None
        # Storing them is progress: the stall is not near then.
        return self._fetch_or_listing(fetch, False)

    # ---------------------------------------------------------- answers

    def _on_answer(self, req: SyncRequest, resp: SyncResponse) -> None:
        if isinstance(req, ReconRequest) and isinstance(resp, ReconResponse):
            self._on_recon(req, resp)
        elif isinstance(req, FetchRequest) and isinstance(resp, FetchResponse):
            self._on_fetch(req, resp)
        elif isinstance(req, HeadsRequest) and isinstance(resp, HeadsResponse):
            self._on_listing(req, resp)
        else:
            super()._on_answer(req, resp)

    def _local(self, h: HeadEntry, forked: dict[bytes, int]) -> None:
        item = self.ledger.recon_item(h.author)
        seq, id_ = (item.seq, item.id) if item else (0, None)
        self._consider(h, seq, id_, forked.get(h.author))

    def _on_recon(self, req: ReconRequest, resp: ReconResponse) -> None:
        nodes, self._asked = self._asked, []
        if len(resp.answers) != len(nodes):
            self._fault(Reason.BAD_RECON, f"{len(resp.answers)} answers to {len(nodes)} nodes")
            return
        wants, listing = len(self._wants), len(self._listing)
        queued = len(self.recon.queue)
        forked = self.ledger.forked()
        differing = 0
        for node, ans in zip(nodes, resp.answers, strict=True):
            if ans.items or not ans.counts:
                differ, fault = self.recon.on_items(node, recon.Items(tuple(
                    (h.author, recon.Item(h.seq, h.id, h.fork_seq)) for h in ans.items)))
                differing += len(differ)
                authors = {a for a, _ in differ}
                for h in ans.items:
                    if h.author in authors:
                        self._local(h, forked)
            else:
                fault = self.recon.on_split(node, req.split, _split_of(ans))
            if fault:
                self._fault(Reason.BAD_RECON, fault)
                return
        for node in self.recon.listing:
            low, high = recon.node_bounds(node.prefix, node.bits)
            self._listing.append(_Listing(node, _before(low), high, node.size or 1))
        self.recon.listing.clear()
        learned = (len(self._wants) > wants or len(self._listing) > listing
                   or len(self.recon.queue) > queued or differing)
        if self._root:
            self._root = False
            if not learned:
                self.in_sync = True  # nothing differs: the digests agree
                self._progress()

    def _on_listing(self, req: HeadsRequest, resp: HeadsResponse) -> None:
        lst = self._listing[0]
        if len(resp.heads) > req.limit or any(
                req.after is not None and h.author <= req.after for h in resp.heads):
            self._fault(Reason.BAD_PAGE, "HEADS page outside the requested window")
            return
        wants, skipped = len(self._wants), self.stats.skipped_live
        forked = self.ledger.forked()
        inside = [h for h in resp.heads if lst.high is None or h.author < lst.high]
        for h in inside:
            self._local(h, forked)
        self.recon.found += len(inside)
        lst.remaining -= len(inside)
        if not resp.more or len(inside) < len(resp.heads) or not inside or lst.remaining <= 0:
            self._listing.popleft()
        else:
            lst.after = inside[-1].author
        if len(self._wants) == wants and self.stats.skipped_live == skipped:
            self._idle("a HEADS page naming no author we lack")

    def _on_fetch(self, req: FetchRequest, resp: FetchResponse) -> None:
        wants, self._fetching = self._fetching, []
        reached = wants[:len(resp.records)]
        if len(resp.records) > len(req.entries) or (
                sum(len(r) for r in resp.records) > req.limit):
            self._fault(Reason.BAD_PAGE, "FETCH answer longer than requested")
            return
        flat = [w for recs in resp.records for w in recs]
        self.stats.records += len(flat)
        self.stats.bytes += sum(len(w) for w in flat)
        before = {w.author: self.ledger.head(w.author) for w in reached}
        new, forked = self._store(flat)
        if self.failed:
            return
        moved = {w.author for w in reached if self.ledger.head(w.author) != before[w.author]}
        if forked or moved:
            asked = sum(max(1, w.target - (h.seq if (h := before[w.author]) else 0))
                        for w in reached)
            # A slow answer with a few events: a trickle keeps no session alive.
            self._progress(forked or not self._slow or 2 * new >= min(req.limit, asked))
        elif self._idle("a FETCH answer with nothing new"):
            return
        done = {id(w) for w, recs in zip(reached, resp.records, strict=True)
                if w.probe or not recs or w.author not in moved}
        for w in reached:
            w.started = True
        if done:
            self._wants = collections.deque(w for w in self._wants if id(w) not in done)


def _wire_node(n: Node) -> ReconNodeWire:
    return ReconNodeWire(n.bits, recon.node_bytes(n.prefix, n.bits))


def _split_of(ans: ReconAnswer) -> recon.Split:
    fps = ans.fps
    n = recon.FP_BYTES
    return recon.Split(ans.counts, tuple(fps[i:i + n] for i in range(0, len(fps), n)))

