"""The provider's tunnels under one lease (tunnel.py serves them): the limits
(`TunnelConfig`), the lease's max rate shared fairly between its members
(`SharedRate`), its min-rate meter and per-member use, and each open `Tunnel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..auction import DeviceAdmission, Lease
from ..errors import Refusal, UsageError
from ..p2p import FRAME_HEADER, WRITE_PIECE, Stream
from ..segments import TokenBucket
from .clock import mono_ms
from .egress import EgressPolicy
from .metering import DemandMeter, FairQueue, Ticket
from .tunnel_wire import TunnelOpen

__all__ = ["READ_SIZE", "LeaseTunnels", "MemberUse", "SharedRate", "Tunnel", "TunnelConfig"]

# One tunnel DATA frame (u32 length, type byte, data) is one stream write, hence one
# yamux frame and one noise message (see node.p2p.WRITE_PIECE).
READ_SIZE = WRITE_PIECE - FRAME_HEADER.size - 1


@dataclass(frozen=True)
class TunnelConfig:
    """Provider-side tunnel limits (the `[bandwidth]` config section)."""

    egress: bool = True
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ("0.0.0.0/0 25", "::/0 25")
    max_tunnels: int = 256
    max_tunnels_per_lease: int = 64
    max_tunnels_per_member: int = 16
    # Tunnel streams one peer may hold open or opening (all its leases): its own cap in
    # the host's resource manager instead of the generic per-protocol stream caps.
    max_streams_per_peer: int = 64
    open_timeout_s: float = 10.0  # the opening frame must arrive within this
    connect_timeout_s: float = 10.0  # resolve + connect to the destination
    idle_timeout_s: float = 300.0  # no byte either way for this long: closed (`idle`)
    write_timeout_s: float = 30.0  # a member that stops reading
    close_grace_s: float = 2.0  # after END, wait this long for the member to close
    burst_ms: int = 250  # shared token bucket depth, in time at the max rate
    rate_window_ms: int = 1000  # min-rate judgement window
    lease_check_s: float = 1.0

    def __post_init__(self) -> None:
        if min(self.max_tunnels, self.max_tunnels_per_lease, self.max_tunnels_per_member,
               self.max_streams_per_peer) < 1:
            raise UsageError("TunnelConfig: tunnel caps must be >= 1")
        for name in ("open_timeout_s", "connect_timeout_s", "idle_timeout_s",
                     "write_timeout_s", "close_grace_s", "lease_check_s"):
            if getattr(self, name) <= 0:
                raise UsageError(f"TunnelConfig.{name} must be positive")
        EgressPolicy(allow=self.allow, deny=self.deny)  # rules parse, or UsageError


class SharedRate:
    """One token bucket for a lease, shared fairly between its members.

    Without contention a take costs one bucket check. When tokens run short, callers
    queue in a `FairQueue` (deficit round robin per member) and one of them at a time —
    the scheduler — sleeps until the head ticket's tokens exist, grants it, and goes on
    until its own ticket is granted; then it hands the role to a waiting caller.
    """

    def __init__(self, rate_bytes: int, burst_bytes: int) -> None:
        self.bucket = TokenBucket(rate_bytes, burst_bytes)
        # Grants of at most `chunk` bytes, and one chunk of credit per member per turn:
        # a member with one tunnel (one ticket waiting at a time) then gets as much as
        # one with many. (A quantum of a whole burst let many-ticket members take ~8
        # chunks per turn: measured 35/65 instead of 50/50.)
        self.chunk = min(READ_SIZE, max(4096, burst_bytes // 8), burst_bytes)
        self.queue = FairQueue(self.chunk)
        self.waiting: dict[Ticket, trio.Event] = {}
        self.scheduler: Ticket | None = None
        self.limited = 0

    async def take(self, member: bytes, n: int) -> None:
        while n > 0:
            part = min(n, self.chunk)
            await self._take(member, part)
            n -= part

    async def _take(self, member: bytes, n: int) -> None:
        if not self.queue and self.bucket.take(n, mono_ms()) == 0:
            return
        self.limited += 1
        t = Ticket(member, n)
        self.waiting[t] = trio.Event()
        self.queue.push(t)
        try:
            while not t.granted:
                if self.scheduler is None:
                    self.scheduler = t
                    try:
                        await self._schedule(t)
                    finally:
                        self.scheduler = None
                else:
                    await self.waiting[t].wait()
                    if not t.granted:
                        self.waiting[t] = trio.Event()
        finally:
            if not t.granted:
                self.queue.discard(t)
            self.waiting.pop(t, None)
            if self.scheduler is None:
                self._handoff()

    def _handoff(self) -> None:
        for t, ev in self.waiting.items():
            if not t.granted:
                ev.set()  # its owner becomes the scheduler
                return

    async def _schedule(self, me: Ticket) -> None:
        while not me.granted:
            head = self.queue.head()
            assert head is not None  # `me` is queued
            wait = self.bucket.take(head.n, mono_ms())
            if wait > 0:
                await trio.sleep(wait / 1000)
                continue
            self.queue.pop()
            head.granted = True
            ev = self.waiting.get(head)
            if ev is not None:
                ev.set()


@dataclass
class MemberUse:
    bytes_in: int = 0  # member -> destination
    bytes_out: int = 0  # destination -> member
    tunnels: int = 0  # opened in total
    open: int = 0
    active_ms: int = 0  # time with at least one tunnel open
    since: float = 0.0


class LeaseTunnels:
    def __init__(self, lease: Lease, cfg: TunnelConfig) -> None:
        self.lease = lease
        self.admission = DeviceAdmission(lease)
        self.rate: SharedRate | None = None
        if lease.max_rate_bps is not None:
            rate = max(1, lease.max_rate_bps // 8)  # the lease says bits/s
            self.rate = SharedRate(rate, max(rate * cfg.burst_ms // 1000, 4096))
        self.meter: DemandMeter | None = None
        if lease.min_rate_bps:
            self.meter = DemandMeter(lease.min_rate_bps // 8, cfg.rate_window_ms, mono_ms())
        self.members: dict[bytes, MemberUse] = {}
        self.tunnels: set[Tunnel] = set()
        self.idle = trio.Event()
        self.idle.set()
        self.closed = False

    def add(self, t: Tunnel) -> None:
        if not self.tunnels:
            self.idle = trio.Event()
        self.tunnels.add(t)
        m = self.members.setdefault(t.member, MemberUse())
        m.tunnels += 1
        if m.open == 0:
            m.since = trio.current_time()
        m.open += 1

    def remove(self, t: Tunnel) -> None:
        if t not in self.tunnels:
            return
        self.tunnels.discard(t)
        m = self.members[t.member]
        m.open -= 1
        if m.open == 0:
            m.active_ms += int((trio.current_time() - m.since) * 1000)
        if not self.tunnels:
            self.idle.set()

    def open_for(self, member: bytes) -> int:
        m = self.members.get(member)
        return m.open if m else 0

    def busy(self, delta: int) -> None:
        if self.meter is not None:
            self.meter.busy(delta, mono_ms())

    def delivered(self, n: int) -> None:
        if self.meter is not None:
            self.meter.delivered(n, mono_ms())


class Tunnel:
    def __init__(self, st: LeaseTunnels, stream: Stream, member: bytes,
                 req: TunnelOpen) -> None:
        self.st, self.stream, self.member, self.req = st, stream, member, req
        self.sock: trio.SocketStream | None = None
        self.scope = trio.CancelScope()
        self.error: Refusal | None = None
        self.member_gone = False  # the member reset the stream: nobody to tell
        self.up_eof = self.down_eof = False
        self.bytes_up = self.bytes_down = 0
        self.last = trio.current_time()

    def fail(self, reason: str, message: str) -> None:
        if self.error is None:
            self.error = Refusal(reason, message)
        self.scope.cancel()
