"""The advertised addresses (node/addrs.py) plugged into py-libp2p.

* `AddrPolicy` is the host's `addrs_factory` (BasicHost.get_addrs, which identify,
  signed peer records and `P2PHost.addrs` use): expands unspecified listen addresses,
  applies `p2p.announce` / `p2p.announce_append`.

One list for every peer, loopback left out whenever there is anything else
(`addrs.advertised`), rather than go-libp2p's per-peer filter in identify: the signed
peer record (in identify and in every pubsub RPC) is built from the same list, and a
per-peer list made upstream issue a new record (higher seq) per identify, after which
peers dropped our pubsub RPCs carrying the cached older one, subscriptions included:
gossip stopped between hosts when that was tried.
"""

from __future__ import annotations

from collections.abc import Sequence

import multiaddr

from .. import addrs


class AddrPolicy:
    def __init__(self, announce: Sequence[str] = (), announce_append: Sequence[str] = ()
                 ) -> None:
        self.announce = tuple(announce)
        self.announce_append = tuple(announce_append)

    def advertised(self, candidates: Sequence[str]) -> list[str]:
        return addrs.advertised(candidates, self.announce, self.announce_append,
                                addrs.interface_ips())

    def __call__(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        return [multiaddr.Multiaddr(a) for a in self.advertised([str(c) for c in candidates])]
