"""Budgeted gap fetching (sans-I/O): which gaps to pull, from whom, and when to stop.

A gap is a run of missing seqs of one author that pending events wait on
(`Ledger.pending_gaps`). Pulling one costs a RANGE request at the peer we ask,
so a stranger who sends 20,000 fresh authors with one event at seq 2 each must
not buy 20,000 requests per round, repeated until restart. Rules:

* a round asks one peer for at most `authors_per_round` gaps;
* each peer has a request budget (`peer_requests_per_s`, bursts of `BURST_S`);
  a round takes one token per gap asked, and a peer without tokens is not asked;
* each gap (author, first missing seq: one that made progress is a new gap) is
  asked of at most `tries` different peers, no sooner than
  `RETRY_S` after the previous try (gossip often fills gaps by itself), the
  peers that sent the waiting events first (they claimed to have the chain);
  after that it is left to periodic sync or to expire with its events
  (`pending_ttl_s`), and the planner forgets it;
* gaps are taken round-robin across the sources that caused them, oldest
  first within each, so one source's thousands of gaps cannot delay another
  source's one.

`plan()` returns the next round or None; `next_due()` says when one could be due
again if nothing new happens. The shell (node/gossip.py) performs the rounds.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

from .budget import KeyedBuckets
from .ledger import Gap

BURST_S = 4.0
RETRY_S = 1.0

Peer = Hashable


@dataclass(frozen=True)
class GapRound:
    peer: Peer
    gaps: tuple[tuple[bytes, int, int], ...]  # (author, first, last) for SyncSession


@dataclass
class _Tried:
    first: int  # the gap's first missing seq: one that made progress is a new gap
    peers: set[Peer] = field(default_factory=set)
    not_before: float = 0.0
    seen: int = 0  # the last plan() that saw the gap (older: filled or expired)


class GapPlanner:
    def __init__(self, authors_per_round: int, peer_requests_per_s: float, tries: int) -> None:
        self.authors_per_round = authors_per_round
        self.tries = tries
        self._tokens = KeyedBuckets(peer_requests_per_s, peer_requests_per_s * BURST_S)
        # By author. A plan runs on the event loop over every gap (20,000 under a gap
        # storm): one pass, a dictionary lookup per gap, no key objects built.
        self._tried: dict[bytes, _Tried] = {}
        self._plans = 0
        self.rounds = 0
        self.asked = 0
        self.given_up = 0  # gaps that used all their tries (until they fill or expire)

    def _tried_of(self, g: Gap) -> _Tried | None:
        t = self._tried.get(g.author)
        return t if t is not None and t.first == g.first else None

    def _eligible(self, gaps: Sequence[Gap], now: float) -> list[Gap]:
        self._plans += 1
        stamp = self._plans
        tried = self._tried
        out = []
        for g in gaps:
            t = tried.get(g.author)
            if t is not None:
                if t.first == g.first:
                    t.seen = stamp
                    if len(t.peers) >= self.tries or t.not_before > now:
                        continue
                else:  # progressed: a new gap
                    self._forget(g.author, t)
            out.append(g)
        if tried:
            for author, t in [(a, t) for a, t in tried.items() if t.seen != stamp]:
                self._forget(author, t)  # filled, moved on or expired
        return out

    def _forget(self, author: bytes, t: _Tried) -> None:
        del self._tried[author]
        if len(t.peers) >= self.tries:
            self.given_up -= 1

    def plan(self, gaps: Sequence[Gap], peers: Sequence[Peer], now: float) -> GapRound | None:
        """The next round for these gaps and connected sync-capable `peers`, or None."""
        if not peers:
            return None
        if not any(self._tokens.bucket(p, now).tokens >= 1 for p in peers):
            return None
        eligible = self._eligible(gaps, now)
        if not eligible:
            return None
        connected = set(peers)
        target = None
        for g in eligible:  # the first gap that some peer with tokens can be asked about
            tried = self._tried_of(g)
            asked = tried.peers if tried else set()
            choices = [p for p in g.sources if p in connected and p not in asked]
            choices += [p for p in peers if p not in asked and p not in choices]
            for p in choices:
                if self._tokens.bucket(p, now).tokens >= 1:
                    target = p
                    break
            if target is not None:
                break
        if target is None:
            return None
        bucket = self._tokens.bucket(target, now)
        room = min(self.authors_per_round, int(bucket.tokens))
        picked = list(itertools.islice(
            _round_robin(eligible, room, self._tried, target), room))
        for g in picked:
            t = self._tried_of(g)
            if t is None:
                t = self._tried[g.author] = _Tried(g.first, seen=self._plans)
            t.peers.add(target)
            t.not_before = now + RETRY_S
            if len(t.peers) >= self.tries:
                self.given_up += 1
        bucket.tokens -= len(picked)
        self.rounds += 1
        self.asked += len(picked)
        return GapRound(target, tuple((g.author, g.first, g.last) for g in picked))

    def failed(self, rnd: GapRound) -> None:
        """The round's session failed (busy, timed out, cut): that says nothing about
        whether the peer has the events, so it does not use up a try. The tokens stay
        spent and the retry delay stands, so a peer that always fails costs no more."""
        for author, first, _last in rnd.gaps:
            t = self._tried.get(author)
            if t is not None and t.first == first:
                if len(t.peers) >= self.tries:
                    self.given_up -= 1
                t.peers.discard(rnd.peer)

    def next_due(self, gaps: Sequence[Gap], now: float) -> float | None:
        """The earliest time a round could be due for these gaps (None: never, until
        new gaps arrive): a retry coming of age, or a peer's tokens refilling."""
        due: float | None = None
        for g in gaps:
            t = self._tried_of(g)
            if t is None:
                return now + 1 / self._tokens.rate  # untried: as soon as a token is back
            if len(t.peers) < self.tries:
                due = t.not_before if due is None else min(due, t.not_before)
        return None if due is None else max(due, now + 1 / self._tokens.rate)

    def status(self) -> dict[str, int]:
        return {"rounds": self.rounds, "asked": self.asked, "given_up": self.given_up,
                "tracked": len(self._tried)}


def _round_robin(gaps: list[Gap], cap: int, tried: dict[bytes, _Tried],
                 target: Peer) -> Iterator[Gap]:
    """Interleave the gaps not yet asked of `target` by their first source, in the
    given order (the ledger lists authors by when their first pending event arrived)
    within each source. A round takes at most `cap` gaps, so at most `cap` of each
    source are kept; one pass, no call per gap (20,000 under a gap storm)."""
    by_source: dict[Hashable, deque[Gap]] = {}
    for g in gaps:
        t = tried.get(g.author)
        if t is not None and t.first == g.first and target in t.peers:
            continue
        key = g.sources[0] if g.sources else None
        q = by_source.get(key)
        if q is None:
            q = by_source[key] = deque()
        if len(q) < cap:
            q.append(g)
    queues = list(by_source.values())
    while queues:
        for q in queues:
            yield q.popleft()
        queues = [q for q in queues if q]
