"""Pure parts of a shared lease's rate control for tunnels: who gets the next tokens
(deficit round robin between members) and how long members wanted more than the
provider delivered below the minimum rate (`shortfall_ms`). No trio, no clock: the
caller passes the time. Docs: docs/dataplane.md §14 (rates).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import UsageError

__all__ = ["DemandMeter", "FairQueue", "Ticket"]


@dataclass(eq=False)
class Ticket:
    """A request for `n` bytes of the lease's tokens by one member."""

    member: bytes
    n: int
    granted: bool = False
    data: object = field(default=None, repr=False)  # the caller's (e.g. a trio.Event)


class FairQueue:
    """Deficit round robin over members with waiting tickets.

    Each member in turn gets `quantum` bytes of credit; its tickets are served in
    order while the credit lasts, then the next member's turn begins. Members thus
    get equal bytes over time however many tunnels (tickets) each has open. With
    `quantum` at least the largest ticket, every turn serves at least one ticket.
    """

    def __init__(self, quantum: int) -> None:
        if quantum < 1:
            raise UsageError("FairQueue quantum must be >= 1")
        self.quantum = quantum
        self._queues: dict[bytes, deque[Ticket]] = {}
        self._turns: deque[bytes] = deque()
        self._credit: dict[bytes, int] = {}
        self._fresh = True  # the member at the front has not had its credit this turn

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._turns)

    def push(self, t: Ticket) -> None:
        q = self._queues.get(t.member)
        if q is None:
            q = self._queues[t.member] = deque()
            self._turns.append(t.member)
            self._credit[t.member] = 0
        q.append(t)

    def head(self) -> Ticket | None:
        """The ticket to serve next (not removed), or None when nobody waits."""
        while self._turns:
            m = self._turns[0]
            if self._fresh:
                self._credit[m] += self.quantum
                self._fresh = False
            t = self._queues[m][0]
            if t.n <= self._credit[m]:
                return t
            self._turns.rotate(-1)
            self._fresh = True
        return None

    def pop(self) -> Ticket:
        """Remove and return `head()` (which must not be None)."""
        t = self.head()
        if t is None:
            raise UsageError("FairQueue.pop on an empty queue")
        self._credit[t.member] -= t.n
        q = self._queues[t.member]
        q.popleft()
        if not q:
            self._drop(t.member)
        return t

    def discard(self, t: Ticket) -> None:
        """Forget a ticket whose owner gave up (cancelled); no-op if it is not queued."""
        q = self._queues.get(t.member)
        if q is None or t not in q:
            return
        q.remove(t)
        if not q:
            self._drop(t.member)

    def _drop(self, m: bytes) -> None:
        if self._turns and self._turns[0] == m:
            self._fresh = True
        del self._queues[m]
        del self._credit[m]  # idle members keep no credit (DRR)
        self._turns.remove(m)


class DemandMeter:
    """Shortfall below a minimum rate, counted only while members had demand.

    `busy(+1/-1, now)` marks data held by the provider on its way (read from one side,
    not yet written to the other); `delivered(n, now)` counts bytes written. Time is cut
    into windows of `window_ms`; a window whose delivery was below
    `min_rate · demand time` adds its demand time to `shortfall_ms`. A member waiting
    for data the destination does not send is not demand; a member that stops reading
    while the provider holds data for it is (the provider cannot tell it from a slow
    link: weigh the figure, as for streams).
    """

    def __init__(self, min_rate_bps: int, window_ms: int, now_ms: int) -> None:
        if min_rate_bps < 0 or window_ms < 1:
            raise UsageError("DemandMeter needs min_rate_bps >= 0 and window_ms >= 1")
        self.min_rate = min_rate_bps  # bytes per second
        self.window_ms = window_ms
        self.shortfall_ms = 0
        self.windows_short = 0
        self._start = now_ms
        self._last = now_ms
        self._busy = 0
        self._demand_ms = 0
        self._bytes = 0

    def _advance(self, now_ms: int) -> None:
        now_ms = max(now_ms, self._last)
        while now_ms >= self._start + self.window_ms:
            end = self._start + self.window_ms
            if self._busy:
                self._demand_ms += end - self._last
            self._judge()
            self._start = self._last = end
        if self._busy:
            self._demand_ms += now_ms - self._last
        self._last = now_ms

    def _judge(self) -> None:
        if self._demand_ms and self._bytes * 1000 < self.min_rate * self._demand_ms:
            self.shortfall_ms += self._demand_ms
            self.windows_short += 1
        self._demand_ms = self._bytes = 0

    def busy(self, delta: int, now_ms: int) -> None:
        self._advance(now_ms)
        self._busy = max(0, self._busy + delta)

    def delivered(self, n: int, now_ms: int) -> None:
        self._advance(now_ms)
        self._bytes += n

    def close(self, now_ms: int) -> int:
        """Judge the last, partial window; return `shortfall_ms`."""
        self._advance(now_ms)
        self._judge()
        return self.shortfall_ms
