"""What a node tells others to dial: its advertised addresses.

The listen addresses are what the node binds; they are not always what others can
reach. As go-libp2p does:

* an unspecified listen address (`0.0.0.0`, `::`) is expanded to the host's interface
  addresses (IPv6 link-local ones are left out: they need a zone to be dialed);
* `p2p.announce`, when set, replaces the listen addresses (behind NAT, in a
  container: the address others reach); `p2p.announce_append` adds to either;
* loopback addresses are left out whenever the node has any other address: peers on
  other hosts cannot use them, peers on the same host can dial the interface address,
  and one list for everyone keeps the signed peer record stable (node/p2p/addrs.py).
  A loopback-only node (a devnet on 127.0.0.1) keeps them.

`advertised()` and the filters are pure; `interface_ips()` reads the interfaces (via
`ifaddr`, a py-libp2p dependency) and is cached for `IFACE_TTL_S`, so an address that
appears or goes away is noticed within that time.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable, Sequence

log = logging.getLogger("bidmesh.addrs")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IFACE_TTL_S = 5.0
UNSPECIFIED = ("0.0.0.0", "::")

_cache: tuple[float, tuple[IPAddress, ...]] | None = None


def interface_ips(now: float | None = None) -> tuple[IPAddress, ...]:
    """This host's interface addresses (loopback included), cached IFACE_TTL_S."""
    global _cache
    now = time.monotonic() if now is None else now
    if _cache is not None and now - _cache[0] < IFACE_TTL_S:
        return _cache[1]
    ips: list[IPAddress] = []
    try:
        import ifaddr

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                raw = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
                try:
                    ips.append(ipaddress.ip_address(str(raw).split("%", 1)[0]))
                except ValueError:
                    continue
    except (ImportError, OSError) as e:
        log.warning("cannot list interface addresses; advertising loopback only",
                    extra={"error": str(e)})
        ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    result = tuple(dict.fromkeys(ips))
    _cache = (now, result)
    return result


def _split(maddr: str) -> list[str]:
    return maddr.strip("/").split("/")


def host_of(maddr: str) -> IPAddress | None:
    """The IP of an /ip4 or /ip6 multiaddr, else None (dns, malformed)."""
    parts = _split(maddr)
    if len(parts) < 2 or parts[0] not in ("ip4", "ip6"):
        return None
    try:
        return ipaddress.ip_address(parts[1])
    except ValueError:
        return None


def is_loopback(maddr: str) -> bool:
    ip = host_of(maddr)
    return ip is not None and ip.is_loopback


def strip_p2p(maddr: str) -> str:
    return maddr.split("/p2p/", 1)[0]


def expand(addrs: Iterable[str], ips: Sequence[IPAddress]) -> list[str]:
    """Each unspecified /ip4|ip6 address replaced by one per interface address of its
    family (link-local IPv6 left out); other addresses unchanged."""
    out: list[str] = []
    for a in addrs:
        parts = _split(strip_p2p(a))
        if len(parts) >= 2 and parts[0] in ("ip4", "ip6") and parts[1] in UNSPECIFIED:
            version = 4 if parts[0] == "ip4" else 6
            rest = "/".join(parts[2:])
            for ip in ips:
                if ip.version == version and not (version == 6 and ip.is_link_local):
                    out.append(f"/{parts[0]}/{ip}/{rest}")
        else:
            out.append(strip_p2p(a))
    return list(dict.fromkeys(out))


def advertised(listening: Iterable[str], announce: Sequence[str], announce_append: Sequence[str],
               ips: Sequence[IPAddress]) -> list[str]:
    """The addresses to tell peers (without /p2p/): `announce` or the expanded listen
    addresses, then `announce_append`; in order, without repeats; loopback ones only
    when there is nothing else (`for_everyone`)."""
    base = [strip_p2p(a) for a in announce] if announce else expand(listening, ips)
    return for_everyone(list(dict.fromkeys([*base, *(strip_p2p(a) for a in announce_append)])))


def for_everyone(addrs: Sequence[str]) -> list[str]:
    """No loopback addresses, unless there are no others (then only peers on the same
    host can reach the node anyway, and they are on loopback too)."""
    public = [a for a in addrs if not is_loopback(a)]
    return public or list(addrs)
