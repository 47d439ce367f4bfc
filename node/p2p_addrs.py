"""The advertised addresses (node/addrs.py) plugged into py-libp2p.

* `AddrPolicy` is the host's `addrs_factory` (BasicHost.get_addrs, which identify,
  signed peer records and `P2PHost.addrs` use): expands unspecified listen addresses,
  applies `p2p.announce` / `p2p.announce_append`.
* `filter_identify` wraps upstream's identify handler so a peer that is not on
  loopback is not told our loopback addresses (go-libp2p's identify does the same).
  The remote's address reaches the factory through a context variable set for the
  handler's task; everything else (status, offers, peer records) sees the full list.
  Not covered: identify *push* (sent to every peer when our addresses change) and the
  signed peer record still carry the full list, as upstream builds them once for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar

import multiaddr
from libp2p.abc import IHost, INetStream
from libp2p.identity.identify.identify import ID as IDENTIFY_ID
from libp2p.identity.identify.identify import identify_handler_for

from . import addrs

# The identify requester's IP while its answer is built; None outside identify.
_remote_ip: ContextVar[str | None] = ContextVar("bidmesh_identify_remote", default=None)


class AddrPolicy:
    def __init__(self, announce: Sequence[str] = (), announce_append: Sequence[str] = ()
                 ) -> None:
        self.announce = tuple(announce)
        self.announce_append = tuple(announce_append)

    def advertised(self, candidates: Sequence[str]) -> list[str]:
        return addrs.advertised(candidates, self.announce, self.announce_append,
                                addrs.interface_ips())

    def __call__(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        out = self.advertised([str(c) for c in candidates])
        remote = _remote_ip.get()
        if remote is not None:
            out = addrs.for_remote(out, remote)
        return [multiaddr.Multiaddr(a) for a in out]


def filter_identify(host: IHost) -> None:
    """Replace the identify handler by upstream's, run with the requester's IP known."""
    upstream = identify_handler_for(host, use_varint_format=True)

    async def handle(stream: INetStream) -> None:
        try:
            remote = stream.get_remote_address()
        except Exception:  # upstream raises several types for a closing connection
            remote = None
        # "" (unknown) counts as not loopback: tell it the non-loopback addresses only.
        token = _remote_ip.set(str(remote[0]) if remote else "")
        try:
            await upstream(stream)
        finally:
            _remote_ip.reset(token)

    host.set_stream_handler(IDENTIFY_ID, handle)
