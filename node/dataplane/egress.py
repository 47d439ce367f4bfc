"""Egress policy of tunnels (pure): may this provider connect to `ip:port` for a member?

Checked on every address a destination name resolved to, never on the name itself, and
the provider then connects to exactly the address it checked (no second resolution), so
a name that resolves to a public address once and to 127.0.0.1 the next time (DNS
rebinding) gains nothing. Order of the decision:

1. `deny` rules (CIDR + ports) refuse: `egress_denied`;
2. `allow` rules admit, even addresses of the classes below (tests allow 127.0.0.1);
3. loopback, private, link-local, multicast, unspecified, reserved, shared (CGN) and
   documentation addresses — anything not globally routable — and the node's own
   addresses are refused: `private_destination`;
4. anything else is allowed.

Rules are strings `"CIDR"` or `"CIDR PORTS"`, PORTS a comma-separated list of ports
and ranges (`"10.0.0.0/8 80,443,8000-8100"`); no PORTS means every port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import Reason, UsageError

__all__ = ["EgressPolicy", "EgressRule", "IPAddress", "parse_rule"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class EgressRule:
    network: IPNetwork
    ports: tuple[tuple[int, int], ...]  # inclusive ranges; () = every port

    def matches(self, ip: IPAddress, port: int) -> bool:
        if ip.version != self.network.version or ip not in self.network:
            return False
        return not self.ports or any(lo <= port <= hi for lo, hi in self.ports)


def _ports(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        lo_s, _, hi_s = part.strip().partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s or lo_s)
        except ValueError:
            raise UsageError(f"port range {part!r} is not N or N-M") from None
        if not 1 <= lo <= hi <= 65535:
            raise UsageError(f"port range {part!r} must be within 1..65535, low to high")
        out.append((lo, hi))
    return tuple(out)


def parse_rule(text: str) -> EgressRule:
    """`"CIDR"` or `"CIDR PORTS"` (see the module doc); UsageError if malformed."""
    if not isinstance(text, str):
        raise UsageError(f"an egress rule is a string like '10.0.0.0/8 80,443', got {text!r}")
    parts = text.split(None, 1)
    if not parts:
        raise UsageError("an egress rule must not be empty")
    try:
        net = ipaddress.ip_network(parts[0], strict=False)
    except ValueError:
        raise UsageError(f"{parts[0]!r} is not a CIDR like 10.0.0.0/8 or ::1/128") from None
    return EgressRule(net, _ports(parts[1]) if len(parts) > 1 else ())


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip


class EgressPolicy:
    """Decide per resolved address; `check` returns None (allowed) or a reason code."""

    def __init__(self, *, enabled: bool = True, allow: Iterable[str] = (),
                 deny: Iterable[str] = (), own: Iterable[str | IPAddress] = ()) -> None:
        self.enabled = enabled
        self.allow = tuple(parse_rule(r) for r in allow)
        self.deny = tuple(parse_rule(r) for r in deny)
        self.own = frozenset(_unmapped(ipaddress.ip_address(a)) for a in own)

    def check(self, ip: str | IPAddress, port: int) -> Reason | None:
        if not self.enabled:
            return Reason.EGRESS_DISABLED
        addr = _unmapped(ipaddress.ip_address(ip))
        if not 1 <= port <= 65535:
            return Reason.EGRESS_DENIED
        if any(r.matches(addr, port) for r in self.deny):
            return Reason.EGRESS_DENIED
        if any(r.matches(addr, port) for r in self.allow):
            return None
        if addr in self.own or addr.is_multicast or not addr.is_global:
            return Reason.PRIVATE_DESTINATION
        return None

    def explain(self, ip: str | IPAddress, port: int) -> str:
        """A one-line explanation of `check`'s verdict, for the member."""
        reason = self.check(ip, port)
        if reason is None:
            return f"{ip} port {port} is allowed"
        if reason == Reason.EGRESS_DISABLED:
            return "this provider does not carry traffic (egress disabled)"
        if reason == Reason.EGRESS_DENIED:
            return f"{ip} port {port} is denied by this provider's egress policy"
        return (f"{ip} is a private, loopback, link-local, multicast or own address; "
                "providers refuse those unless their egress policy allows them")
