"""Which connected peers to pull from, and saying once why a pull failed.

A node's connections include light clients and nodes of other networks: they do not
serve `/bidmesh/<network>/sync/1`, so a sync with them fails every time (measured:
`sync failed 16 of 29` on a healthy 2-node network with devnet clients attached).
Identify tells us each peer's protocols; a peer identified without ours is not picked.
A peer not identified yet is given the benefit of the doubt (identify may still be
running; its sync fails at worst).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from . import p2p

log = logging.getLogger("bidmesh.gossip")

IDENTIFY_WAIT_S = 3.0  # on connect: how long to wait for identify before syncing anyway
MAX_LOGGED = 4096  # (peer, cause) pairs remembered for "log once"


class SyncPeers:
    def __init__(self, host: p2p.P2PHost, protocol: str) -> None:
        self.host = host
        self.protocol = protocol
        self._logged: set[tuple[str, str]] = set()

    def identified(self, peer: p2p.PeerId) -> bool:
        # Upstream (host/basic_host.py `_identify_peer`) records a finished identify
        # in `_identified_peers`; the peerstore's protocol list alone is not proof,
        # since stream negotiation caches protocols there too.
        return peer in getattr(self.host.libp2p, "_identified_peers", {})

    def lacks_sync(self, peer: p2p.PeerId) -> bool:
        """True when identify finished and the peer did not list our sync protocol."""
        if not self.identified(peer):
            return False
        try:
            protocols = self.host.libp2p.get_peerstore().get_protocols(peer)
        except Exception:  # PeerStoreError: pruned from the peerstore meanwhile
            return False
        return self.protocol not in protocols

    def eligible(self, peers: Sequence[p2p.PeerId]) -> list[p2p.PeerId]:
        return [p for p in peers if not self.lacks_sync(p)]

    async def wait_identified(self, peer: p2p.PeerId, timeout: float = IDENTIFY_WAIT_S) -> None:
        """Wait (bounded) for identify to finish on a new connection."""
        with trio.move_on_after(timeout):
            while not self.identified(peer) and self.host.is_connected(peer):
                await trio.sleep(0.05)

    def failed(self, peer: p2p.PeerId, cause: str, detail: str) -> None:
        """Log a sync failure once per peer and cause (later ones are counted only)."""
        key = (str(peer), cause)
        if key in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED:
            self._logged.clear()
        self._logged.add(key)
        log.info("sync failed", extra={"peer": str(peer), "cause": cause,
                                       "error": detail[:300],
                                       "note": "logged once per peer and cause"})


def cause_of(error: BaseException) -> str:
    """A short, stable cause for a failed sync request (the log-once key)."""
    reason = getattr(error, "reason", None)
    name = type(error).__name__
    return f"{name}:{reason}" if isinstance(reason, str) else name
