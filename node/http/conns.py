"""Which HTTP connections may be open: pure admission (`ConnTable`), the clock
passed in."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Final

import trio

# Connection admission is pure (`ConnTable`); `serve()` and `_serve_conn()` in
# server.py are the I/O shell. Rules (docs/decisions.md, "HTTP server"):
# * at most `max_connections`, and `max_connections_per_ip` from one address;
# * a connection is *waiting* while it has no complete request head: idle between
#   keep-alive requests (at most `keep_alive_s`) or receiving a head (which must
#   complete within `request_timeout_s` of its first byte: slowloris);
# * when a newcomer finds the node or its address full, the connection waiting
#   longest (at least EVICT_AFTER_S) is closed for it; only if none is waiting
#   that long does the newcomer get a 503. Connections being answered are never
#   evicted.

# A waiting connection younger than this is not evicted for a newcomer: an honest
# client sends its request head within milliseconds of connecting.
EVICT_AFTER_S: Final = 1.0


@dataclass(eq=False)
class ConnSlot:
    ip: str
    waiting_since: float | None
    scope: trio.CancelScope | None = None
    released: bool = False
    evicted: bool = False


class ConnTable:
    """Which HTTP connections may be open (sans-I/O; the clock is passed in)."""

    def __init__(self, max_total: int, max_per_ip: int, evict_after_s: float = EVICT_AFTER_S
                 ) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.evict_after_s = evict_after_s
        self._slots: set[ConnSlot] = set()
        self._per_ip: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._slots)

    def admit(self, ip: str, now: float) -> tuple[ConnSlot | None, list[ConnSlot]]:
        """A slot for a new connection from `ip` (None: refuse it with 503) and the
        connections evicted for it (already released: the shell closes them)."""
        evicted: list[ConnSlot] = []
        if self._per_ip[ip] >= self.max_per_ip and not self._evict(now, evicted, ip):
            return None, []
        if len(self._slots) >= self.max_total and not self._evict(now, evicted, None):
            return None, evicted
        slot = ConnSlot(ip, now)
        self._slots.add(slot)
        self._per_ip[ip] += 1
        return slot, evicted

    def _evict(self, now: float, out: list[ConnSlot], ip: str | None) -> bool:
        cutoff = now - self.evict_after_s
        old = [s for s in self._slots if s.waiting_since is not None
               and s.waiting_since <= cutoff and (ip is None or s.ip == ip)]
        if not old:
            return False
        victim = min(old, key=lambda s: s.waiting_since or 0.0)
        victim.evicted = True
        self.release(victim)
        out.append(victim)
        return True

    def release(self, slot: ConnSlot) -> None:
        if slot.released:
            return
        slot.released = True
        self._slots.discard(slot)
        self._per_ip[slot.ip] -= 1
        if self._per_ip[slot.ip] <= 0:
            del self._per_ip[slot.ip]

    @staticmethod
    def waiting(slot: ConnSlot, now: float) -> None:
        """The connection waits for a request head (idle keep-alive or a head arriving)."""
        slot.waiting_since = now

    @staticmethod
    def busy(slot: ConnSlot) -> None:
        """A complete request head arrived: it is being answered, not evictable."""
        slot.waiting_since = None


# A connection paced longer than this is answered 503 at once instead.
ACCEPT_WAIT_MAX_S: Final = 5.0


class AcceptPacer:
    """New connections are served at most `rate` a second after a burst of `burst`
    (GCRA, sans-I/O). Admitting and answering a connection costs ~1 ms of the event
    loop; a hundred opened at once made an honest peer's request to the node wait
    ~70 ms of CPU behind them (bench/hostile.py http_holders, `wait_cpu_ratio` 8.6):
    spread over time, the same connections cost the same CPU, a little at a time.
    Honest clients open a connection now and then and are not delayed."""

    def __init__(self, rate: float, burst: int, wait_max_s: float = ACCEPT_WAIT_MAX_S
                 ) -> None:
        self.interval = 1.0 / rate
        self.tolerance = (burst - 1) * self.interval
        self.wait_max_s = wait_max_s
        self._tat = float("-inf")  # theoretical arrival time of the next connection

    def delay(self, now: float) -> float | None:
        """How long a connection arriving `now` waits before it is served; None: it
        would wait longer than `wait_max_s` (refuse it; it takes no place)."""
        tat = max(self._tat, now)
        wait = max(0.0, tat - self.tolerance - now)
        if wait > self.wait_max_s:
            return None
        self._tat = tat + self.interval
        return wait
