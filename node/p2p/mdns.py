"""LAN discovery: py-libp2p's zeroconf-based mDNS, feeding dial addresses to a callback.

    await run_mdns(host, on_addr, network)   # until cancelled; on_addr("/ip4/…/p2p/12D3…")
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.discovery.mdns.mdns import create_mdns_discovery
from libp2p.peer.peerinfo import PeerInfo

from .host import P2PHost

log = logging.getLogger("bidmesh.gossip")  # where these lines were logged before the move


async def run_mdns(host: P2PHost, on_addr: Callable[[str], None], network: str) -> None:
    """Advertise this node on the LAN (service `_p2p-<network>._udp.local.`) and call
    `on_addr(multiaddr)`, in the trio thread, for each address a peer announces.

    Worked around upstream (0.8.1): `MDNSDiscovery()` and its `start()` block for
    ~1.5 s in zeroconf's service probing, so both run in a worker thread and we
    skip `start()`'s cleanup task; with `host=` given it advertises the listen
    address as-is (`/ip4/0.0.0.0/...`, undialable), so we pass only the TCP port
    and let it advertise the machine's own IPs; discovered peers arrive on a
    zeroconf thread through the module-global `peerDiscovery`, so the handler only
    hands the address over to trio.
    """
    ports = [a.split("/tcp/")[1].split("/")[0] for a in host.addrs if "/tcp/" in a]
    if not ports:
        log.warning("mDNS needs a TCP listen address; not starting it")
        return
    token = trio.lowlevel.current_trio_token()
    me = str(host.peer_id)

    def on_peer(info: PeerInfo) -> None:  # runs on a zeroconf thread
        pid = str(info.peer_id)
        if pid == me:
            return
        for a in info.addrs:
            addr = str(a)
            if "/ip4/0.0.0.0/" in addr or "/ip6/::/" in addr:
                continue
            if "/p2p/" not in addr:
                addr = f"{addr}/p2p/{pid}"
            try:
                token.run_sync_soon(on_addr, addr)
            except trio.RunFinishedError:
                return

    md = await trio.to_thread.run_sync(lambda: create_mdns_discovery(
        host.libp2p.get_network(), port=int(ports[0]), private_network_fingerprint=network))
    peerDiscovery.register_peer_discovered_handler(on_peer)
    try:
        await trio.to_thread.run_sync(md.broadcaster.register)
        log.info("mDNS discovery started", extra={"service": md.service_type})
        await trio.sleep_forever()
    finally:
        peerDiscovery.unregister_peer_discovered_handler(on_peer)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(md.stop)  # unregisters: ~0.3 s
