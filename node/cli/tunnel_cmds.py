"""`bidmesh client tunnel LEASE --socks 127.0.0.1:1080`: a local SOCKS5 proxy whose
connections are tunnels through a bandwidth lease (node/tunnel_proxy.py).

Before listening it checks what it can (a bandwidth lease, we are a member, the window
has not passed) and reaches the provider, so a refusal is one line and exit status 1
instead of a proxy that refuses everything. It then serves until Ctrl-C / SIGTERM or
the lease's end; a progress line on a terminal shows open tunnels, bytes and the rate
against the lease's limits; each refused or broken tunnel is one line on stderr; at
exit a summary (JSON with --json).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

import trio

from ..client import LightClient, now_ms
from ..client.resolve import resolve
from ..errors import Reason, Unauthorized, UsageError
from ..tunnel_proxy import TunnelProxy, listen, parse_listen

__all__ = ["run_tunnel"]


def _bps(v: float | None) -> str:
    if not v:
        return "-"
    for unit, f in (("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if v >= f:
            return f"{v / f:.1f} {unit}"
    return f"{v:.0f} b/s"


def _size(n: int) -> str:
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} B"


class _Screen:
    """stderr lines, and the progress line redrawn under them on a terminal."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.drawn = False

    def line(self, text: str) -> None:
        if self.drawn:
            sys.stderr.write("\r\x1b[K")
            self.drawn = False
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def status(self, text: str) -> None:
        if self.progress:
            sys.stderr.write("\r" + text + "\x1b[K")
            sys.stderr.flush()
            self.drawn = True

    def end(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False


async def run_tunnel(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    where = parse_listen(a.socks, allow_lan=a.allow_lan)
    if not 1 <= a.max_connections <= 10_000:
        raise UsageError("--max-connections must be 1..10000")
    lease_id = await resolve(c, a.lease, "lease")
    _, lease = await c.lease(lease_id)
    short = lease_id.hex()[:16]
    if lease.service != "bandwidth":
        raise UsageError(f"lease {short} is for {lease.service!r}; tunnels need a bandwidth "
                         "lease (use `client stream` for processing leases)")
    if c.key not in lease.keys:
        raise Unauthorized(f"this client (key {c.key.hex()[:16]}) is not a member of lease "
                           f"{short}: the recipient must list it as a device (--device) "
                           "when requesting", Reason.NOT_MEMBER)
    if now_ms() >= lease.end_ms:
        raise Unauthorized(f"lease {short} ended {(now_ms() - lease.end_ms) // 1000} s ago",
                           Reason.OUTSIDE_WINDOW)
    show = a.progress == "yes" or (a.progress == "auto" and sys.stderr.isatty())
    screen = _Screen(show)
    peer = await c.reach_provider(lease)
    limits = (f"max {_bps(lease.max_rate_bps)}" if lease.max_rate_bps else "no max") + (
        f", min {_bps(lease.min_rate_bps)}" if lease.min_rate_bps else "")
    if now_ms() < lease.start_ms:
        wait = (lease.start_ms - now_ms()) / 1000
        screen.line(f"lease {short} starts in {wait:.0f} s; waiting")
        await trio.sleep(wait)

    def on_error(line: str) -> None:
        screen.line(f"bidmesh: {line}")

    proxy = TunnelProxy(lambda host, port: c.open_tunnel(lease, host, port),
                        max_connections=a.max_connections, on_error=on_error)
    ended = "interrupted"
    t0 = time.monotonic()
    listeners = await listen(*where)  # before anything runs: a port in use is one line
    bound = listeners[0].socket.getsockname()
    host, port = str(bound[0]), int(bound[1])
    hp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.serve_listeners, listeners)
        screen.line(f"SOCKS5 proxy on {hp} through lease {short} via provider {peer} "
                    f"({limits}; ends in {(lease.end_ms - now_ms()) // 1000} s); e.g. "
                    f"curl --socks5-hostname {hp} URL")

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        async def progress() -> None:
            last, last_t = 0, time.monotonic()
            while True:
                await trio.sleep(0.5)
                st = proxy.stats
                now = time.monotonic()
                moved = st.bytes_up + st.bytes_down
                rate = (moved - last) * 8 / max(now - last_t, 1e-6)
                last, last_t = moved, now
                screen.status(f"tunnels {st.active} open / {st.tunnels} total  "
                              f"down {_size(st.bytes_down)} up {_size(st.bytes_up)} at "
                              f"{_bps(rate)} ({limits}; lease ends in "
                              f"{max(0, (lease.end_ms - now_ms()) // 1000)} s)")

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(progress)
        # The lease's end: the provider cuts every tunnel (`lease_ended`); we stop.
        await trio.sleep(max(0.0, (lease.end_ms - now_ms()) / 1000) + 0.5)
        ended = "lease_ended"
        nursery.cancel_scope.cancel()
    screen.end()
    summary = {"lease": lease_id.hex(), "provider": str(peer), "listen": hp,
               "ended": ended, "seconds": round(time.monotonic() - t0, 3),
               **proxy.stats.as_dict()}
    st = proxy.stats
    problems = sum(st.refused.values()) + sum(st.failed.values())
    out.emit(summary, f"{ended}: {st.tunnels} tunnel(s), down {_size(st.bytes_down)}, up "
                      f"{_size(st.bytes_up)}" + (f", {problems} refused or failed "
                                                 f"({dict(st.refused + st.failed)})"
                                                 if problems else ""))
    return 0
