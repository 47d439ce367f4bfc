"""Peer discovery: bootstrap multiaddrs dialed and redialed with backoff, mDNS finds.

Bootstrap multiaddrs are dialed and redialed with exponential backoff
(`p2p.reconnect_min_s` .. `p2p.reconnect_max_s`, jittered); the host enforces the
connection cap; optional mDNS (node/p2p/mdns.py) adds the addresses it finds.
"""

from __future__ import annotations

import collections
import logging
import random

import trio

from . import p2p
from .config import Config
from .errors import InvalidMessage, OperationError, UsageError

log = logging.getLogger("bidmesh.gossip")  # the logger name it had in gossip.py (log filters)

RECHECK_S = 30.0
"""How often a connected address is checked without a connection change to wake us."""


class Discovery:
    """Keeps connections to bootstrap peers (and mDNS finds) with backoff."""

    def __init__(self, host: p2p.P2PHost, config: Config, *,
                 rng: random.Random | None = None) -> None:
        self.host = host
        self.cfg = config.p2p
        self.addrs: dict[str, float] = {}  # multiaddr -> next attempt (trio time)
        self.failures: collections.Counter[str] = collections.Counter()
        # Addresses whose next check is a recheck of a connected peer (or of the cap),
        # not a redial after a failure: a connection change makes them due at once.
        self._rechecking: set[str] = set()
        self._wake = trio.Event()
        self._rng = rng or random.Random()  # redial jitter
        for a in self.cfg.bootstrap:
            self.add(a)

    def add(self, maddr: str) -> None:
        """Add an address to keep connected (bootstrap, mDNS, or an operator)."""
        if maddr not in self.addrs:
            self.addrs[maddr] = 0.0
        self._wake.set()

    def retry_now(self) -> None:
        for a in self.addrs:
            self.addrs[a] = 0.0
            self.failures[a] = 0
        self._wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_connections)
            while True:
                now = trio.current_time()
                for maddr, due in list(self.addrs.items()):
                    if due <= now and not self._still_connected(maddr, now):
                        self.addrs[maddr] = now + 1e9  # in flight
                        nursery.start_soon(self._dial, maddr)
                # Asleep until an address is due, one is added, or a connection
                # opens or closes (`_watch_connections`).
                with trio.move_on_at(min(self.addrs.values(), default=now + RECHECK_S)):
                    await self._wake.wait()
                self._wake = trio.Event()

    def _still_connected(self, maddr: str, now: float) -> bool:
        """Whether a due address needs no dial: connected already, or the connection
        cap is reached (checked again at the next connection change or RECHECK_S).
        These checks used to be a task per address every second, each a trio task
        spawn and a peer id decoded, for addresses that stay connected for days."""
        peer_str = maddr.rsplit("/p2p/", 1)[-1]
        try:
            connected = self.host.is_connected(peer_str)
        except InvalidMessage:
            log.error("bad bootstrap address", extra={"addr": maddr})
            del self.addrs[maddr]
            self._rechecking.discard(maddr)
            return True
        if connected or len(self.host.connected_peers()) >= self.cfg.max_connections:
            self.failures[maddr] = 0
            self.addrs[maddr] = now + RECHECK_S
            self._rechecking.add(maddr)
            return True
        self._rechecking.discard(maddr)
        return False

    async def _watch_connections(self) -> None:
        """Make every address waiting on a connected peer (or on the cap) due at the
        next connection change, so a dropped connection is redialed at once."""
        while True:
            changed = self.host.connections_event()
            await changed.wait()
            now = trio.current_time()
            for maddr in self._rechecking:  # not those backing off after a failed dial
                if maddr in self.addrs:
                    self.addrs[maddr] = min(self.addrs[maddr], now)
            self._wake.set()

    async def _dial(self, maddr: str) -> None:
        try:
            await self.host.connect(maddr, timeout=10.0)
        except UsageError as e:
            log.error("bad bootstrap address", extra={"addr": maddr, "error": str(e)})
            del self.addrs[maddr]
            return
        except OperationError as e:
            self.failures[maddr] += 1
            n = self.failures[maddr]
            delay = min(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s * 2 ** (n - 1))
            delay *= self._rng.uniform(0.8, 1.2)
            if n <= 3 or n % 10 == 0:
                log.info("dial failed", extra={"addr": maddr, "error": str(e),
                                               "attempt": n, "retry_s": round(delay, 2)})
            self.addrs[maddr] = trio.current_time() + delay
            return
        if self.failures[maddr]:
            log.info("connected", extra={"addr": maddr, "after_attempts": self.failures[maddr]})
        self.failures[maddr] = 0
        self.addrs[maddr] = trio.current_time() + RECHECK_S
        self._rechecking.add(maddr)


async def run_mdns(host: p2p.P2PHost, discovery: Discovery, network: str) -> None:
    """Advertise this node and dial peers found by mDNS on the LAN (node/p2p/mdns.py)."""
    from .p2p.mdns import run_mdns as mdns  # zeroconf: loaded only when mDNS is on

    await mdns(host, discovery.add, network)
