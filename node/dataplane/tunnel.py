"""The provider side of bandwidth leases: `/bidmesh/<network>/tunnel/1`.

A member opens one libp2p stream per tunnel naming the lease and a destination; the
provider checks the lease (member, window, `max_devices`, caps), resolves the
destination itself, checks every resolved address against its egress policy, connects
to an allowed one and pipes bytes both ways under the lease's shared rate until both
sides have half-closed, the window ends (`lease_ended`) or something breaks. Formats and
rules: docs/dataplane.md §14. The limits and the per-lease state (shared rate, meters,
open tunnels) are in `tunnel_state.py`.

Per byte the provider does one socket read or write and one frame write or read
(`node.p2p` frames, one yamux frame per 64 KiB read), with no copy beyond py-libp2p's.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from ..auction import Lease
from ..errors import (
    BidmeshError,
    InvalidMessage,
    PeerError,
    Reason,
    Refusal,
    RemoteError,
    StreamClosed,
    Unauthorized,
)
from ..events import Body, MemberUsage, Usage
from ..p2p import (
    P2PHost,
    Stream,
    StreamTimeout,
    close_quietly,
    read_frame,
    remote_pubkey,
    reset_quietly,
    set_stream_handler,
    touch_stream,
    write_frame,
)
from .clock import mono_ms
from .egress import EgressPolicy
from .tunnel_state import (
    READ_SIZE,
    LeaseTunnels,
    MemberUse,
    Tunnel,
    TunnelConfig,
)
from .tunnel_wire import (
    DATA,
    EOF,
    MAX_DATA,
    MAX_OPEN,
    TunnelEnd,
    TunnelOpen,
    TunnelReply,
    tunnel_protocol,
)

__all__ = ["TunnelConfig", "TunnelService", "default_resolve", "local_addresses"]

log = logging.getLogger(__name__)
_MAX_USAGE_MEMBERS = 256

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def default_resolve(host: str, port: int) -> list[str]:
    """The addresses of `host` (an IP literal is its own answer), in resolver order."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    out: list[str] = []
    for *_, sockaddr in infos:
        ip = str(sockaddr[0]).split("%", 1)[0]
        if ip not in out:
            out.append(ip)
    return out


async def _dial(ip: str, port: int) -> trio.SocketStream:
    """Connect to exactly `ip` (trio.open_tcp_stream would hide the errno in a group)."""
    family = trio.socket.AF_INET6 if ":" in ip else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # sets TCP_NODELAY


def local_addresses(extra: Iterable[str] = ()) -> list[str]:
    """This machine's interface addresses (refused as destinations unless allowed)."""
    out = set(extra)
    try:
        import ifaddr  # a py-libp2p dependency

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                addr = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
                out.add(str(addr).split("%", 1)[0])
    except (ImportError, OSError) as e:  # no interface list: loopback/private still refused
        log.warning("cannot list local addresses for the egress policy: %s", e)
    return sorted(out)


class TunnelService:
    """Serves `/bidmesh/<network>/tunnel/1` for bandwidth leases (docs/dataplane.md §14).

    `lease_lookup(lease_id)`, `publish(body)` and `clock()` (wall ms) as for
    `DataplaneService`; `resolve(host, port)` returns addresses (tests inject one);
    `own_addrs` are refused as destinations unless an allow rule names them.
    """

    def __init__(self, host: P2PHost, network: str,
                 lease_lookup: Callable[[bytes], Lease | None],
                 publish: Callable[[Body], None],
                 clock: Callable[[], int],
                 config: TunnelConfig | None = None, *,
                 resolve: Resolver = default_resolve,
                 own_addrs: Iterable[str] | None = None) -> None:
        self.host, self.network = host, network
        self.lease_lookup, self.publish, self.clock, self.resolve = (
            lease_lookup, publish, clock, resolve)
        self.config = cfg = config or TunnelConfig()
        own = local_addresses() if own_addrs is None else list(own_addrs)
        self.policy = EgressPolicy(enabled=cfg.egress, allow=cfg.allow, deny=cfg.deny, own=own)
        self.counters: Counter[str] = Counter()
        self._leases: dict[bytes, LeaseTunnels] = {}
        self._open = 0  # tunnels connected or connecting
        self._opening = 0  # streams still reading their opening frame
        self._changed = trio.Event()
        self._installed = False

    # ------------------------------------------------------------------ lifecycle

    def install(self) -> None:
        if not self._installed:
            self._installed = True
            proto, cfg = tunnel_protocol(self.network), self.config
            # A tunnel stream lives as long as its download and a member may hold 16 per
            # lease: the generic stream caps (8 per peer per protocol, 64 per protocol)
            # and idle expiry (60 s without an inbound frame; a download sends none)
            # would cut tunnels. The caps here bound them instead: open + opening.
            self.host.resources.set_protocol_limits(proto, cfg.max_streams_per_peer,
                                                    2 * cfg.max_tunnels)
            set_stream_handler(self.host, proto, self._on_stream)

    async def run(self) -> None:
        """Serve until cancelled; at each lease's end close its tunnels, publish Usage."""
        self.install()
        cfg = self.config
        while True:
            now = self.clock()
            for lid, st in list(self._leases.items()):
                if not st.closed and st.lease.end_ms <= now:
                    await self.close_lease(lid)
            ends = [st.lease.end_ms for st in self._leases.values() if not st.closed]
            wait = cfg.lease_check_s
            if ends:
                wait = min(wait, max(0.0, (min(ends) - self.clock()) / 1000) + 0.001)
            with trio.move_on_after(wait):
                await self._changed.wait()
            self._changed = trio.Event()

    async def close_lease(self, lease_id: bytes) -> Usage | None:
        """Cut the lease's tunnels (`lease_ended`), publish its Usage once and return it;
        None if no tunnel was ever opened under it here, or it was closed already."""
        st = self._leases.get(lease_id)
        if st is None or st.closed:
            await trio.lowlevel.checkpoint()
            return None
        st.closed = True
        for t in list(st.tunnels):
            t.fail(Reason.LEASE_ENDED, f"lease {lease_id.hex()[:12]} has ended")
        with trio.move_on_after(self.config.write_timeout_s + self.config.close_grace_s + 5):
            await st.idle.wait()
        shortfall = st.meter.close(mono_ms()) if st.meter is not None else 0
        members = sorted(st.members.items(), key=lambda kv: (-kv[1].bytes_in - kv[1].bytes_out,
                                                              kv[0]))[:_MAX_USAGE_MEMBERS]
        body = Usage(lease=lease_id, members=tuple(
            MemberUsage(member=k, bytes_in=m.bytes_in, bytes_out=m.bytes_out, segments=0,
                        active_ms=m.active_ms) for k, m in sorted(members)),
            shortfall_ms=shortfall, rate_limited=st.rate.limited if st.rate else 0,
            subcontracts=0)
        try:
            self.publish(body)
            self.counters["usage_published"] += 1
        except BidmeshError as e:
            self.counters["publish_failed:usage"] += 1
            log.warning("could not publish the tunnels' usage of a lease: %s", e)
        return body

    def stats(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "egress": cfg.egress, "allow": list(cfg.allow), "deny": list(cfg.deny),
            "max_tunnels": cfg.max_tunnels, "max_tunnels_per_lease": cfg.max_tunnels_per_lease,
            "max_tunnels_per_member": cfg.max_tunnels_per_member,
            "open_tunnels": self._open, "opening": self._opening,
            "counters": dict(self.counters),
            "leases": {lid.hex(): {
                "tunnels": len(st.tunnels), "closed": st.closed,
                "rate_limited": st.rate.limited if st.rate else 0,
                "shortfall_ms": st.meter.shortfall_ms if st.meter else 0,
                "members": {k.hex(): {"bytes_in": m.bytes_in, "bytes_out": m.bytes_out,
                                      "tunnels": m.tunnels, "open": m.open,
                                      "active_ms": m.active_ms}
                            for k, m in st.members.items()},
            } for lid, st in self._leases.items()},
        }

    # ------------------------------------------------------------------ opening

    async def _refuse(self, stream: Stream, reason: str, message: str) -> None:
        self.counters[f"refused:{reason}"] += 1
        log.info("refusing a tunnel (%s): %s", reason, message)
        try:
            await write_frame(stream, TunnelReply(False, reason, message).encode(), 5.0)
        except BidmeshError as e:
            log.debug("could not tell the member why (%s)", e)

    def _admit(self, peer: bytes, req: TunnelOpen) -> LeaseTunnels:
        cfg = self.config
        lease = self.lease_lookup(req.lease)
        if lease is None:
            raise Unauthorized(f"no lease {req.lease.hex()[:12]} is known here", Reason.NO_LEASE)
        if lease.provider != self.host.pubkey:
            raise Unauthorized(f"lease {lease.id.hex()[:12]} is not ours", Reason.NOT_OUR_LEASE)
        if lease.service != "bandwidth":
            raise Unauthorized(f"lease {lease.id.hex()[:12]} is for {lease.service!r}; "
                               "tunnels need a bandwidth lease", Reason.WRONG_SERVICE)
        now = self.clock()
        if not lease.active(now):
            raise Unauthorized(f"lease {lease.id.hex()[:12]} is active in "
                               f"[{lease.start_ms}, {lease.end_ms}), not at {now}",
                               Reason.OUTSIDE_WINDOW)
        st = self._leases.get(lease.id)
        if st is None:
            st = self._leases[lease.id] = LeaseTunnels(lease, cfg)
            self._changed.set()
        if st.closed:
            raise Unauthorized(f"lease {lease.id.hex()[:12]} was closed", Reason.LEASE_CLOSED)
        try:
            st.admission.admit(peer, now, req.delegation)
        except Unauthorized as e:
            raise Unauthorized(str(e), e.reason if e.reason != Reason.UNAUTHORIZED
                               else Reason.NOT_MEMBER) from None
        if not self.policy.enabled:
            raise PeerError("this provider does not carry traffic (egress disabled)",
                            Reason.EGRESS_DISABLED)
        if self._open >= cfg.max_tunnels:
            raise PeerError(f"this provider has {cfg.max_tunnels} tunnels open; retry later",
                            Reason.TOO_MANY_TUNNELS)
        if len(st.tunnels) >= cfg.max_tunnels_per_lease:
            raise PeerError(f"the lease has {cfg.max_tunnels_per_lease} tunnels open (the "
                            "provider's cap)", Reason.TOO_MANY_TUNNELS)
        if st.open_for(peer) >= cfg.max_tunnels_per_member:
            raise PeerError(f"you have {cfg.max_tunnels_per_member} tunnels open under this "
                            "lease (the provider's cap)", Reason.TOO_MANY_TUNNELS)
        return st

    async def _connect(self, req: TunnelOpen) -> tuple[trio.SocketStream, str]:
        cfg = self.config
        with trio.move_on_after(cfg.connect_timeout_s):
            try:
                addrs = await self.resolve(req.host, req.port)
            except OSError as e:
                raise Refusal(Reason.RESOLVE_FAILED, f"cannot resolve {req.host}: {e}") from None
            if not addrs:
                raise Refusal(Reason.RESOLVE_FAILED, f"{req.host} has no address")
            allowed = [a for a in addrs if self.policy.check(a, req.port) is None]
            if not allowed:
                first = addrs[0]
                raise Refusal(self.policy.check(first, req.port) or Reason.EGRESS_DENIED,
                               f"{req.host} ({first}): {self.policy.explain(first, req.port)}")
            last: OSError | None = None
            for ip in allowed[:4]:  # connect to exactly the address checked: no rebinding
                try:
                    return await _dial(ip, req.port), ip
                except OSError as e:
                    last = e
            code = getattr(last, "errno", None)
            if code == errno.ECONNREFUSED:
                raise Refusal(Reason.CONNECTION_REFUSED,
                               f"{req.host} port {req.port} refused the connection")
            raise Refusal(Reason.UNREACHABLE, f"cannot connect to {req.host} port {req.port}: "
                                          f"{last}")
        raise Refusal(Reason.TIMEOUT, f"resolving and connecting to {req.host} port {req.port} "
                                  f"took longer than {cfg.connect_timeout_s} s")

    async def _on_stream(self, stream: Stream) -> None:
        peer = remote_pubkey(stream)
        cfg = self.config
        if self._opening >= cfg.max_tunnels:
            self.counters["refused:busy"] += 1
            await reset_quietly(stream)  # a flood of silent openers: no work for them
            return
        self._opening += 1
        try:
            raw = await read_frame(stream, MAX_OPEN, cfg.open_timeout_s)
            req = TunnelOpen.decode(raw)
            st = self._admit(peer, req)
        except (PeerError, StreamTimeout, StreamClosed) as e:
            reason = Reason.TIMEOUT if isinstance(e, StreamTimeout) else e.reason
            await self._refuse(stream, reason, str(e))
            return
        except RemoteError:
            self.counters["refused:reset"] += 1
            return
        finally:
            self._opening -= 1
        t = Tunnel(st, stream, peer, req)
        st.add(t)  # holds its cap slot while connecting
        self._open += 1
        try:
            try:
                t.sock, ip = await self._connect(req)
            except Refusal as e:
                await self._refuse(stream, e.reason, str(e))
                return
            lease = st.lease
            try:
                await write_frame(stream, TunnelReply(
                    True, addr=ip, max_rate_bps=lease.max_rate_bps,
                    min_rate_bps=lease.min_rate_bps, end_ms=lease.end_ms).encode(),
                    cfg.write_timeout_s)
            except BidmeshError as e:
                log.info("could not answer a tunnel opening: %s", e)
                return
            self.counters["tunnels_opened"] += 1
            await self._serve(t)
        finally:
            if t.sock is not None:
                with trio.CancelScope(shield=True):
                    await t.sock.aclose()
            self._open -= 1
            st.remove(t)

    # ------------------------------------------------------------------ piping

    async def _serve(self, t: Tunnel) -> None:
        with t.scope:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._watch, t)
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._guard, t, self._up)
                    pumps.start_soon(self._guard, t, self._down)
                outer.cancel_scope.cancel()
        if t.error is None and t.scope.cancelled_caught:
            t.error = Refusal(Reason.CANCELLED, "the provider stopped the tunnel")
        if t.error is None:
            self.counters["tunnels_ok"] += 1
            end = TunnelEnd(True, bytes_up=t.bytes_up, bytes_down=t.bytes_down)
        else:
            self.counters[f"tunnels_failed:{t.error.reason}"] += 1
            log.info("tunnel to %s:%d ended (%s): %s", t.req.host, t.req.port, t.error.reason,
                     t.error)
            end = TunnelEnd(False, t.error.reason, str(t.error), t.bytes_up, t.bytes_down)
        if t.member_gone:
            await reset_quietly(t.stream)
            return
        await self._finish(t, end)

    async def _finish(self, t: Tunnel, end: TunnelEnd) -> None:
        """Send END, half-close, and let the member close; reset one that does not."""
        cfg = self.config
        try:
            await write_frame(t.stream, end.encode(), min(5.0, cfg.write_timeout_s))
        except BidmeshError as e:
            log.debug("could not send a tunnel's END: %s", e)
            await reset_quietly(t.stream)
            return
        if t.error is not None and t.error.reason in (Reason.BAD_FRAME, Reason.OVERSIZED,
                                                      Reason.TRUNCATED):
            await reset_quietly(t.stream)  # the member's frames are out of step: no drain
            return
        await close_quietly(t.stream)
        if t.up_eof:
            return
        closed = False
        with trio.move_on_after(cfg.close_grace_s):
            try:
                while not closed:  # drain what the member still sends until it closes
                    await read_frame(t.stream, 1 + MAX_DATA, math.inf)
            except BidmeshError:
                closed = True
        if not closed:
            await reset_quietly(t.stream)

    async def _guard(self, t: Tunnel, fn: Callable[[Tunnel], Awaitable[None]]) -> None:
        try:
            await fn(t)
        except Refusal as e:
            t.fail(e.reason, str(e))
        except RemoteError:
            t.member_gone = True
            t.fail(Reason.MEMBER_RESET, "the member reset the tunnel")
        except StreamTimeout as e:
            t.member_gone = True  # write_frame reset the stream
            t.fail(Reason.TIMEOUT, str(e))
        except PeerError as e:
            t.fail(e.reason, str(e))
        except BidmeshError as e:
            t.member_gone = True
            t.fail(Reason.STREAM_FAILED, str(e))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            t.fail(Reason.DESTINATION_RESET, f"the connection to {t.req.host} broke: {e!r}")

    async def _up(self, t: Tunnel) -> None:
        """Member -> destination: DATA frames written to the socket; EOF half-closes it."""
        st, sock = t.st, t.sock
        assert sock is not None
        member = st.members[t.member]
        while True:
            try:
                frame = await read_frame(t.stream, 1 + MAX_DATA, math.inf)
            except StreamClosed:
                frame = EOF  # the member half-closed the stream itself: same as EOF
            kind = frame[:1]
            if kind == EOF and len(frame) == 1:
                t.up_eof = True
                await sock.send_eof()
                return
            if kind != DATA or len(frame) < 2:
                raise InvalidMessage("tunnel frames from members are DATA or EOF",
                                     Reason.BAD_FRAME)
            n = len(frame) - 1
            t.last = trio.current_time()
            st.busy(+1)
            try:
                if st.rate is not None:
                    await st.rate.take(t.member, n)
                # Socket-level sends bill exactly what the kernel took, even when the
                # lease's end cancels us half way (SocketStream.send_all would not say).
                view = memoryview(frame)[1:]
                while view:
                    sent = await sock.socket.send(view)
                    view = view[sent:]
                    t.bytes_up += sent
                    member.bytes_in += sent
                    st.delivered(sent)
            finally:
                st.busy(-1)

    async def _down(self, t: Tunnel) -> None:
        """Destination -> member: each socket read becomes one DATA frame."""
        st, sock, cfg = t.st, t.sock, self.config
        assert sock is not None
        member = st.members[t.member]
        size = READ_SIZE if st.rate is None else st.rate.chunk
        while True:
            data = await sock.receive_some(size)
            if not data:
                await write_frame(t.stream, EOF, cfg.write_timeout_s)
                t.down_eof = True
                return
            n = len(data)
            t.last = trio.current_time()
            st.busy(+1)
            try:
                if st.rate is not None:
                    await st.rate.take(t.member, n)
                try:
                    await write_frame(t.stream, data, cfg.write_timeout_s, DATA)
                except trio.Cancelled:
                    # write_frame's writes are shielded: a cancellation (the lease's
                    # end) surfaces only after the whole frame went out. Bill it.
                    self._sent_down(t, member, n)
                    raise
            finally:
                st.busy(-1)
            self._sent_down(t, member, n)

    @staticmethod
    def _sent_down(t: Tunnel, member: MemberUse, n: int) -> None:
        t.bytes_down += n
        member.bytes_out += n
        t.st.delivered(n)

    async def _watch(self, t: Tunnel) -> None:
        """Cut the tunnel at the lease's end (`lease_ended`) or when idle (`idle`)."""
        cfg, lease = self.config, t.st.lease
        seen = t.last
        while True:
            if t.last != seen:
                # Traffic either way keeps the member's connection from being closed
                # as idle (a download brings no inbound frame to touch it).
                seen = t.last
                touch_stream(t.stream)
            left_ms = lease.end_ms - self.clock()
            if left_ms <= 0:
                t.fail(Reason.LEASE_ENDED, f"lease {lease.id.hex()[:12]} has ended")
                return
            idle_left = t.last + cfg.idle_timeout_s - trio.current_time()
            if idle_left <= 0:
                t.fail(Reason.IDLE, f"no traffic for {cfg.idle_timeout_s} s")
                return
            await trio.sleep(min(idle_left, left_ms / 1000 + 0.001, cfg.lease_check_s))
