"""What a daemon owes its operator before and around the node itself: one process per
data dir, ports checked before anything starts, systemd readiness, a rotating log.

Stdlib only (no trio, no libp2p), so `bidmesh` subcommands can use it cheaply.

* `DataDirLock`: an exclusive `flock` on `DATA_DIR/node.lock` held for the life of the
  process (released by the kernel on any exit, SIGKILL included); the file holds the
  holder's pid so a refused second process can name it. Like kubo's `repo.lock`.
* `preflight(listen, http)`: bind every address the node is about to listen on, all at
  once, then release them: a port in use, an address not on this host or a privileged
  port becomes one line (`UsageError`, exit 2) before the ledger is opened or a
  connection made.
* `sd_notify(state)`: the systemd notify protocol (a datagram to `$NOTIFY_SOCKET`),
  for `Type=notify` units; a no-op elsewhere. `watchdog_interval()`: how often to send
  WATCHDOG=1 when the unit sets `WatchdogSec=` (none otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BidmeshError, UsageError

log = logging.getLogger("bidmesh.lifecycle")

LOCK_FILE = "node.lock"
# Exit status when the stop watchdog ends the process (sysexits EX_SOFTWARE): systemd
# and supervisors see the stop as failed, not clean.
EXIT_WATCHDOG = 70


# ------------------------------------------------------------------ data dir lock


class DataDirLock:
    """Exclusive lock on a data dir; `acquire()` raises UsageError naming the holder."""

    def __init__(self, data_dir: str | Path, what: str = "bidmesh node") -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UsageError(
                f"data dir {self.path.parent} is in use by {holder} (lock {self.path}); "
                "stop it first, or give this one another data dir") from None
        except OSError as e:
            os.close(fd)
            raise UsageError(f"cannot lock {self.path}: {e.strerror}") from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.what}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: unlinking it would let a third process lock a new
            # inode while a second still waits on the old one.
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    pid, _, what = text.partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"{what or 'a process'} pid {pid}"


def lock_holder(data_dir: str | Path) -> int | None:
    """The pid holding the data dir's lock, or None when it is free (CLI checks)."""
    path = Path(data_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).split(b" ", 1)[0]
            return int(pid) if pid.isdigit() else -1
        return None
    finally:
        os.close(fd)


# ------------------------------------------------------------------ preflight


@dataclass(frozen=True)
class Bind:
    """One address the node will listen on, with the config key it came from."""

    key: str
    host: str
    port: int
    shown: str  # as the operator wrote it


def tcp_binds(listen: Sequence[str]) -> list[Bind]:
    """`/ip4|ip6/ADDR/tcp/PORT` multiaddrs (already validated by config) as binds."""
    out = []
    for a in listen:
        parts = a.strip("/").split("/")
        out.append(Bind("p2p.listen", parts[1], int(parts[3]), a))
    return out


@contextlib.contextmanager
def _held(binds: Sequence[Bind]) -> Iterator[None]:
    socks: list[socket.socket] = []
    try:
        for b in binds:
            try:
                infos = socket.getaddrinfo(b.host, b.port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            except socket.gaierror as e:
                raise UsageError(f"{b.key} {b.shown}: cannot resolve {b.host!r} ({e})") from None
            for family, type_, proto, _, sockaddr in infos:
                s = socket.socket(family, type_, proto)
                socks.append(s)
                # As trio.open_tcp_listeners (py-libp2p's TCP listener too) does.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s.bind(sockaddr)
                    s.listen(1)
                except OSError as e:
                    raise UsageError(_bind_error(b, e)) from None
        yield
    finally:
        for s in socks:
            s.close()


def _bind_error(b: Bind, e: OSError) -> str:
    where = f"{b.key} {b.shown}"
    if e.errno == errno.EADDRINUSE:
        return (f"{where}: port {b.port} is already in use (another bidmesh node, or "
                "another program); stop it or choose another port")
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"{where}: {b.host} is not an address of this host; listen on 0.0.0.0 "
                "(or ::) or one of its addresses, and put a public or NAT address in "
                "p2p.announce")
    if e.errno == errno.EACCES:
        return (f"{where}: port {b.port} needs privileges (below 1024); use a higher port "
                "or give the service CAP_NET_BIND_SERVICE")
    if e.errno == errno.EAFNOSUPPORT:
        return f"{where}: this host has no {'IPv6' if ':' in b.host else 'IPv4'} support"
    return f"{where}: cannot listen: {e.strerror or e}"


def preflight(binds: Sequence[Bind]) -> None:
    """Bind all of `binds` at once (so two of ours that collide are caught too) and let
    them go. UsageError with one line for the first that fails."""
    with _held(binds):
        pass


# ------------------------------------------------------------------ systemd


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd's `$NOTIFY_SOCKET`; False when there is
    none. Errors are logged, never raised: readiness reporting must not stop a node."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":  # abstract namespace
        addr = "\0" + addr[1:]
    elif addr[0] != "/":
        log.warning("NOTIFY_SOCKET is not a Unix socket path; not notifying",
                    extra={"notify_socket": addr[:100]})
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify failed", extra={"error": str(e), "state": state[:60]})
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings when systemd's watchdog is on for this process
    (`$WATCHDOG_USEC`, and `$WATCHDOG_PID` absent or ours), else None. Half the timeout,
    as sd_watchdog_enabled(3) advises."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (a wrapper that started us)
    return int(usec) / 1e6 / 2


# ------------------------------------------------------------------ helpers


def single_error(exc: BaseException) -> BaseException:
    """The one BidmeshError inside nested exception groups (trio nurseries wrap what a
    start-up step raised), so it prints as one line; otherwise `exc` itself."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)
    walk(exc)
    ours = [e for e in leaves if isinstance(e, BidmeshError)]
    others = [e for e in leaves if not isinstance(e, BidmeshError)
              and type(e).__name__ != "Cancelled"]
    if ours and not others:
        return ours[0]
    return exc

