"""The ledger's pending buffer: events waiting for their predecessor (split from
`ledger`, which re-exports these names)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from .errors import Reason
from .events import Event

Source = Hashable
"""Whom a pending event is charged to: the forwarding peer (None: local / unattributed)."""


@dataclass(slots=True, eq=False)
class _Held:
    """One pending event: its wire only (decoded again, unverified, when it is due), so
    memory is the record's size plus this header, whatever the body decodes into."""

    author: bytes
    seq: int
    id: bytes
    wire: bytes
    source: Source
    blame: bool  # the source published it itself: its expiry is the source's fault
    added: float

    @property
    def size(self) -> int:
        return len(self.wire) + HELD_OVERHEAD


HELD_OVERHEAD = 256  # bytes charged per pending event beyond its wire (header, dict slots)


@dataclass(frozen=True)
class PendingLimits:
    """Bounds of the pending buffer (`[limits] pending_*`)."""

    per_author: int = 1024
    total: int = 65_536
    peer_events: int = 2048
    peer_bytes: int = 4 << 20
    total_bytes: int = 32 << 20
    ttl_s: float = 60.0


@dataclass(frozen=True)
class Gap:
    """Missing seqs `first..last` of `author`, with who sent the events waiting on it."""

    author: bytes
    first: int
    last: int
    sources: tuple[Source, ...]  # first come first
    added: float  # when the first of its waiting events arrived (the author's, since then)


class _Pending:
    """Events waiting for their predecessor, charged to the source that sent them:
    bounded per author, per source (events, bytes) and in total (events, bytes);
    entries expire `ttl_s` after they arrive.

    When the total is full, an event from a source holding less than the biggest
    holder evicts that holder's oldest entries: one source cannot keep everyone
    else's out-of-order events out. Several candidates may wait at one
    (author, seq): which of them chains is only known when the gap fills, and
    keeping them all lets a fork be detected in whichever order its halves arrive."""

    def __init__(self, limits: PendingLimits) -> None:
        self.limits = limits
        self.by_author: dict[bytes, dict[int, dict[bytes, _Held]]] = {}
        self.counts: dict[bytes, int] = {}
        self.size = 0
        self.bytes = 0
        self.by_source: dict[Source, OrderedDict[int, _Held]] = {}  # in arrival order
        self.source_bytes: Counter[Source] = Counter()
        self.evicted = 0
        # Per author, kept as entries come and go so that the gap list costs what
        # changed, not the whole buffer (20,000 one-event authors: ~15 us each to
        # summarize, 0.3 s on the loop per gap round): the sources holding its
        # events (first come first, with counts), when its first event arrived,
        # and which authors changed since the last summary (`Ledger.pending_gaps`).
        self.author_sources: dict[bytes, dict[Source, int]] = {}
        self.since: dict[bytes, float] = {}
        self.touched: OrderedDict[bytes, None] = OrderedDict()  # in the order they changed

    def add(self, ev: Event, source: Source, blame: bool, now: float) -> str | None:
        """Hold `ev`; None if held (or already held), else why not: "pending_full"."""
        slot = self.by_author.get(ev.author)
        if slot is not None and ev.id in slot.get(ev.seq, {}):
            return None
        return self.restore(_Held(ev.author, ev.seq, ev.id, ev.wire, source, blame, now))

    def restore(self, h: _Held) -> str | None:
        lim = self.limits
        if self.counts.get(h.author, 0) >= lim.per_author:
            return Reason.PENDING_FULL
        mine = self.by_source.get(h.source)
        if (mine is not None and len(mine) >= lim.peer_events) or \
                self.source_bytes[h.source] + h.size > lim.peer_bytes:
            return Reason.PENDING_FULL
        while self.size >= lim.total or self.bytes + h.size > lim.total_bytes:
            if not self._evict_for(h.source, h.size):
                return Reason.PENDING_FULL
        slot = self.by_author.setdefault(h.author, {})
        slot.setdefault(h.seq, {})[h.id] = h
        self.counts[h.author] = self.counts.get(h.author, 0) + 1
        srcs = self.author_sources.setdefault(h.author, {})
        srcs[h.source] = srcs.get(h.source, 0) + 1
        self.since.setdefault(h.author, h.added)
        self.touched[h.author] = None
        self.size += 1
        self.bytes += h.size
        self.by_source.setdefault(h.source, OrderedDict())[id(h)] = h
        self.source_bytes[h.source] += h.size
        return None

    def _evict_for(self, source: Source, size: int) -> bool:
        """Make room by dropping the oldest entry of the biggest holder, if that is
        not `source` and holds more than `source` would after adding."""
        if not self.source_bytes:
            return False
        big, held = max(self.source_bytes.items(), key=lambda kv: kv[1])
        if big == source or held <= self.source_bytes[source] + size:
            return False
        oldest = next(iter(self.by_source[big].values()))
        self._remove(oldest)
        self.evicted += 1
        return True

    def _remove(self, h: _Held) -> None:
        slot = self.by_author[h.author]
        cands = slot[h.seq]
        del cands[h.id]
        if not cands:
            del slot[h.seq]
        self._forget(h)
        if not slot:
            del self.by_author[h.author]

    def _forget(self, h: _Held) -> None:
        """Uncount `h`, already gone from `by_author[author][seq]`."""
        self.size -= 1
        self.bytes -= h.size
        self.counts[h.author] -= 1
        self.touched[h.author] = None
        if not self.counts[h.author]:
            del self.counts[h.author]
            del self.author_sources[h.author]
            del self.since[h.author]
        else:
            srcs = self.author_sources[h.author]
            srcs[h.source] -= 1
            if not srcs[h.source]:
                del srcs[h.source]
        mine = self.by_source[h.source]
        del mine[id(h)]
        self.source_bytes[h.source] -= h.size
        if not mine:
            del self.by_source[h.source]
            del self.source_bytes[h.source]

    def pop(self, author: bytes, seq: int) -> list[_Held]:
        """Remove and return every candidate at (author, seq), in arrival order."""
        slot = self.by_author.get(author)
        if not slot or seq not in slot:
            return []
        held = list(slot.pop(seq).values())
        for h in held:
            self._forget(h)
        if not slot:
            del self.by_author[author]
        return held

    def drop_upto(self, author: bytes, seq: int) -> None:
        """Forget buffered events at or below a seq we now hold."""
        slot = self.by_author.get(author)
        if not slot:
            return
        for s in [s for s in slot if s <= seq]:
            for h in slot.pop(s).values():
                self._forget(h)
        if not slot:
            del self.by_author[author]

    def expire(self, now: float, limit: int | None = None) -> list[_Held]:
        """Remove and return entries older than `ttl_s`, at most `limit` of them."""
        cutoff = now - self.limits.ttl_s
        out: list[_Held] = []
        for mine in list(self.by_source.values()):
            while mine and (limit is None or len(out) < limit):
                h = next(iter(mine.values()))
                if h.added > cutoff:
                    break
                out.append(h)
                self._remove(h)  # may delete `mine` from by_source once empty
        return out
