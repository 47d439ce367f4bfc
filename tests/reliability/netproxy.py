"""A loopback TCP proxy that injects network faults between node processes.

netem is not available on every machine (no `sch_netem` module: "Specified qdisc
kind is unknown"), so links are emulated in user space: every node dials its peers
through one `Link` per ordered pair (its bootstrap addresses point at the links'
ports), and each link forwards both directions of every connection with

* `delay_s` (+ uniform `jitter_s`) of one-way latency per chunk, order preserved;
* `loss`: the probability that a chunk is "lost" and retransmitted, i.e. held back
  for a TCP retransmission timeout (`rto_s`, doubling on repeated loss) — bytes
  are never dropped from inside a TCP stream, which no real network does either;
* `reset`: the probability per chunk that the connection is torn down (RST);
* `blackhole()`: nothing is forwarded and everything is discarded, new
  connections are accepted but never reach the other side (like SYNs and
  packets vanishing); `heal()` closes the stranded connections (TCP would
  have given up on them) and forwards new ones again.

Threads only (no trio), so tests, `bench/chaos.py` and `bench/soak.py` can all use
it. `Network(n)` builds the full mesh of links for n nodes; `partition(groups)`
blackholes every link between groups.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

CHUNK = 64 * 1024


@dataclass
class LinkStats:
    connections: int = 0
    bytes: int = 0
    delayed_chunks: int = 0
    lost_chunks: int = 0
    resets: int = 0
    discarded_bytes: int = 0


class _Pipe:
    """One direction of one connection: a reader thread and a timed writer thread.

    Due times never decrease (TCP delivers in order), so the queue stays sorted."""

    def __init__(self, link: Link, src: socket.socket, dst: socket.socket) -> None:
        self.link, self.src, self.dst = link, src, dst
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.last_due = 0.0
        self.rto = link.rto_s

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _due(self) -> float:
        lk = self.link
        due = time.monotonic() + lk.delay_s + (lk.rng.uniform(0, lk.jitter_s) if lk.jitter_s else 0)
        if lk.loss and lk.rng.random() < lk.loss:
            lk.stats.lost_chunks += 1
            due += self.rto
            self.rto = min(self.rto * 2, 3.0)
        else:
            self.rto = lk.rto_s
        self.last_due = max(due, self.last_due)
        return self.last_due

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK)
                if not data:
                    break
                lk = self.link
                if lk.blackholed:
                    lk.stats.discarded_bytes += len(data)
                    continue
                if lk.reset and lk.rng.random() < lk.reset:
                    lk.stats.resets += 1
                    self.close(abort=True)
                    return
                lk.stats.bytes += len(data)
                if lk.delay_s or lk.loss or lk.jitter_s:
                    lk.stats.delayed_chunks += 1
                with self.cond:
                    self.queue.append((self._due(), data))
                    self.cond.notify()
        except OSError:
            pass  # closed under us (reset, heal, close): nothing left to read
        with self.cond:
            self.queue.append((0.0, None))  # end of stream, after everything queued
            self.cond.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait(0.5)
                    if self.closed:
                        return
                    due, data = self.queue[0]
                    wait = due - time.monotonic()
                    if data is not None and wait > 0:
                        self.cond.wait(min(wait, 0.5))
                        continue
                    self.queue.popleft()
                if data is None:
                    with contextlib.suppress(OSError):
                        self.dst.shutdown(socket.SHUT_WR)
                    return
                if self.link.blackholed:
                    self.link.stats.discarded_bytes += len(data)
                    continue
                self.dst.sendall(data)
        except OSError:
            self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for s in (self.src, self.dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RD)  # wakes a thread blocked in recv()
            with contextlib.suppress(OSError):
                if abort:  # RST instead of FIN, as a dropped connection looks
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()


@dataclass
class Link:
    """Forwards connections made to `port` (127.0.0.1) to `target_port`."""

    target_port: int
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    reset: float = 0.0
    rto_s: float = 0.2
    seed: int = 0
    port: int = 0
    blackholed: bool = False
    stats: LinkStats = field(default_factory=LinkStats)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._pipes: list[_Pipe] = []
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.stats.connections += 1
            if self.blackholed:
                with self._lock:
                    self._held.append(client)  # accepted, never answered
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipes = [_Pipe(self, client, upstream), _Pipe(self, upstream, client)]
            with self._lock:
                self._pipes += pipes
                self._pipes = [p for p in self._pipes if not p.closed]
            for p in pipes:
                p.start()

    def set(self, *, delay_s: float | None = None, jitter_s: float | None = None,
            loss: float | None = None, reset: float | None = None) -> None:
        if delay_s is not None:
            self.delay_s = delay_s
        if jitter_s is not None:
            self.jitter_s = jitter_s
        if loss is not None:
            self.loss = loss
        if reset is not None:
            self.reset = reset

    def clear(self) -> None:
        self.set(delay_s=0.0, jitter_s=0.0, loss=0.0, reset=0.0)

    def blackhole(self) -> None:
        self.blackholed = True

    def heal(self) -> None:
        """Forward again; connections stranded by the blackhole are reset."""
        self.blackholed = False
        self.drop_connections()

    def drop_connections(self) -> None:
        with self._lock:
            pipes, self._pipes = self._pipes, []
            held, self._held = self._held, []
        for p in pipes:
            self.stats.resets += 1
            p.close(abort=True)
        for s in held:
            s.close()

    def close(self) -> None:
        self._stopped = True
        self._sock.close()
        self.drop_connections()


class Network:
    """A link for every ordered pair (i dials j through `links[i, j]`)."""

    def __init__(self, ports: list[int], seed: int = 0) -> None:
        self.n = len(ports)
        self.links: dict[tuple[int, int], Link] = {}
        for i in range(self.n):
            for j in range(self.n):
                if i != j:
                    self.links[i, j] = Link(ports[j], seed=seed * 1000 + i * 31 + j)

    def port(self, src: int, dst: int) -> int:
        return self.links[src, dst].port

    def between(self, a: Iterable[int], b: Iterable[int]) -> list[Link]:
        a, b = list(a), list(b)
        return [self.links[i, j] for i in a for j in b if i != j] + [
            self.links[j, i] for i in a for j in b if i != j]

    def partition(self, *groups: Iterable[int]) -> None:
        gs = [list(g) for g in groups]
        for x, ga in enumerate(gs):
            for gb in gs[x + 1:]:
                for link in self.between(ga, gb):
                    link.blackhole()

    def heal(self) -> None:
        for link in self.links.values():
            if link.blackholed:
                link.heal()

    def set_all(self, **kw: float) -> None:
        for link in self.links.values():
            link.set(**kw)

    def stats(self) -> LinkStats:
        total = LinkStats()
        for link in self.links.values():
            for k in vars(total):
                setattr(total, k, getattr(total, k) + getattr(link.stats, k))
        return total

    def close(self) -> None:
        for link in self.links.values():
            link.close()
