"""Pull anti-entropy, the asking side: `SyncSession`, a sans-I/O state machine.

A session runs against one peer over `/bidmesh/<network>/sync/1` (the messages and
the serving side are node/sync.py; `/sync/2`'s `ReconSession` is node/sync_recon.py):
DIGEST, then HEADS pages, then RANGE and FORKS for what the peer has beyond ours.
It is a small state machine (`next_request` / `on_response`) over a real `Ledger`:
it decides what to ask, appends what arrives, and never touches the network.
`drive()` runs it with any async `send` callable, which is how both the libp2p
shell (node/gossip.py) and the fake network in tests use it.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from .errors import InvalidEvent, Reason
from .events import Event, decode_wire, peek_chain_position
from .ledger import Ledger, Status
from .sync import (
    CHAIN_REASONS,
    DigestRequest,
    DigestResponse,
    ErrorResponse,
    ForksRequest,
    ForksResponse,
    HeadEntry,
    HeadsRequest,
    HeadsResponse,
    RangeRequest,
    RangeResponse,
    SyncRequest,
    SyncResponse,
    heads_snapshot,
)


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

    def next_if_stored(self, resp: SyncResponse | None) -> SyncRequest | None:
        """The request `next_request()` will return after `on_response(resp)` if every
        record of `resp` is stored, asked before it is (no state changes); None when
        that cannot be told, or the next one would not continue a page. The shell
        sends it while it checks and stores `resp` (pipelining: the peer serves the
        next page meanwhile) and uses its answer only if `next_request()` returns the
        same request; a wrong guess costs the peer one page it served for nothing."""
        req = self._pending
        if (self.failed or not isinstance(req, RangeRequest)
                or not isinstance(resp, RangeResponse) or not resp.records
                or len(resp.records) > req.limit or not self._wants):
            return None
        w = self._wants[0]
        if w.probe or w.forks or w.author != req.author:
            return None
        seq = self._last_seq(w.author, resp.records)
        if seq is None or seq >= self._target(w):
            return None  # done with this author: the next request is another's
        return RangeRequest(w.author, seq + 1, self.limits.range_limit, self.limits.range_bytes)

    @staticmethod
    def _last_seq(author: bytes, records: Sequence[bytes]) -> int | None:
        """The seq of the last record, if it is `author`'s (read from the bytes,
        unchecked: only a guess at where our head will be once they are stored)."""
        pos = peek_chain_position(records[-1])
        return pos[1] if pos is not None and pos[0] == author else None

    def _target(self, w: _Want) -> int:
        forked_at = self.ledger.forked().get(w.author)
        return w.target if forked_at is None else min(w.target, forked_at - 1)

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
